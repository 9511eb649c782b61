"""fedmerge.server."""
