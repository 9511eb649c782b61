"""The shared numerics of the matching methods: float64 dense linear algebra on covariance matrices, and the one
device rule of the project.

* :func:`sym_powers` -- ``(S^1/2, S^-1/2)`` of a symmetric positive definite matrix (eigh, floored eigenvalues).
* :func:`polar` -- the orthogonal polar factor ``U V^T`` of ``M = U diag(s) V^T``.
* :func:`unit_scales` / :func:`dead_units` -- per-unit standard deviations, and the units without variance.
* :func:`default_device` -- a torch device from ``None`` (CUDA when present, else the CPU) or a name.
* :func:`single_threaded` -- torch's intra-op threads set to 1 for a block.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["DTYPE", "default_device", "sym_powers", "polar", "unit_scales", "dead_units", "single_threaded"]

#: The dtype of every transform and decomposition.
DTYPE = torch.float64


def default_device(device=None) -> torch.device:
    """``device`` as a torch device; None: CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sym_powers(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S^1/2, S^-1/2) of a symmetric positive definite matrix via eigh."""
    s = (s + s.T) / 2
    evals, evecs = torch.linalg.eigh(s)
    floor = torch.clamp(evals.max(), min=1e-300) * 1e-8  # condition number <= 1e8 even with gamma = 0
    evals = torch.clamp(evals, min=floor)
    r = torch.sqrt(evals)
    return (evecs * r) @ evecs.T, (evecs / r) @ evecs.T


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor ``U V^T`` of the SVD ``m = U diag(s) V^T`` (the closest orthogonal matrix)."""
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def unit_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit standard deviations and the dead-unit mask of a covariance ``s``. Dead units (no variance on the
    probe) get the live units' typical scale, so that mapping them never produces huge weights."""
    var = torch.clamp(torch.diagonal(s), min=0)
    dead = var <= max(float(var.mean()), 1e-300) * 1e-12
    live = var[~dead]
    fill = float(live.mean()) if live.numel() else 1.0
    return torch.sqrt(torch.where(dead, torch.full_like(var, fill), var)), dead


def dead_units(s: torch.Tensor) -> torch.Tensor:
    """The indices of the units of covariance ``s`` without variance (see :func:`unit_scales`)."""
    return torch.nonzero(unit_scales(s)[1]).flatten()


@contextmanager
def single_threaded():
    """torch's intra-op threads set to 1 for the block (and restored). Dense LAPACK on matrices of a few hundred
    rows (eigh, SVD) runs in many short parallel regions: on a machine whose cores are busy (shared, or running
    the clients) two threads measured 4-6x slower than one for the CCA transforms of 512-unit layers
    (docs/results.md, "Scale"). The merge runs its per-model linear algebra single-threaded and spreads the models
    over threads instead, so that the transforms also do not depend on the thread count."""
    prev = torch.get_num_threads()
    if prev != 1:
        torch.set_num_threads(1)
    try:
        yield prev
    finally:
        if prev != 1:
            torch.set_num_threads(prev)
