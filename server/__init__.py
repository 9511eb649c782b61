"""fedmerge.server: the CCAMerge Flower strategy and the ServerApp."""
from .strategy import CCAMerge, RoundFailedError, RoundRecord

__all__ = ["CCAMerge", "RoundRecord", "RoundFailedError"]
