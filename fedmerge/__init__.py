"""fedmerge: merge neural networks trained by different parties without moving their data.

The import package maps the repository's top-level folders: ``common/`` -> ``fedmerge.common``,
``server/`` -> ``fedmerge.server``, ``client/`` -> ``fedmerge.client``.
"""
from __future__ import annotations

import os as _os

# Running from a source checkout without installation: let ``fedmerge.common`` etc. resolve to the
# top-level folders (an installed copy finds them through the package-dir mapping instead).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isdir(_os.path.join(_root, "common")) and _root not in __path__:
    __path__.append(_root)

__version__ = "0.1.0"

__all__ = ["merge_models", "collect_statistics", "__version__"]


def __getattr__(name: str):  # lazy: importing fedmerge must not import torch
    if name in ("merge_models", "collect_statistics"):
        from fedmerge.common.engine import merge as _merge

        return getattr(_merge, name)
    raise AttributeError(f"module 'fedmerge' has no attribute {name!r}")
