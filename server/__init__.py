"""fedmerge.server: the CCAMerge Flower strategy and the ServerApp."""
from .strategy import CCAMerge, RoundRecord

__all__ = ["CCAMerge", "RoundRecord"]
