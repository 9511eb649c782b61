"""fedmerge.common."""
