"""fedmerge.client."""
