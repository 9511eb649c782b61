"""Optimal-transport fusion (Singh & Jaggi, NeurIPS 2020) as a matching method, with an activation-based
cost (the Euclidean distance of raw activations by default; the correlation cost, which gives Permute's
assignment, as an option). All-to-one: each model's units transported onto the reference's."""
from __future__ import annotations

import math

import numpy as np
import torch

from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.linalg import DTYPE
from fedmerge.common.engine.matching import (
    Alignment,
    MatchInputs,
    all_to_one,
    check_reference,
    check_stats,
    correlation,
)

__all__ = ["match_ot", "ot_cost", "ot_pair", "OT_COSTS"]

#: Ground costs of :func:`match_ot` (see :func:`ot_cost`); the first is the default.
OT_COSTS = ("euclidean", "correlation")


def ot_cost(s_aa: torch.Tensor, s_bb: torch.Tensor, s_ab: torch.Tensor, mean_a: torch.Tensor,
            mean_b: torch.Tensor, cost: str = "euclidean") -> torch.Tensor:
    """OT fusion's ground cost between unit j of A (rows) and unit k of B (columns), from probe statistics.

    ``"euclidean"`` (default): the expected squared distance of the raw (un-standardised, un-centred)
    activations, ``E (a_j - b_k)^2 = var(a_j) + var(b_k) - 2 cov(a_j, b_k) + (mu_a_j - mu_b_k)^2``, i.e. the
    squared Euclidean distance of the two units' activation vectors over the probe divided by the number of
    samples: the activation-based ground metric of Singh & Jaggi (2020), as align-n-merge computes it. Units
    are matched by the values they take, scale and offset included.

    ``"correlation"``: the same distance between standardised, centred activations, ``2 - 2 corr(a_j, b_k)``
    (correlations as :func:`fedmerge.common.engine.matching.correlation` computes them for Permute). Minimising its
    sum over a permutation maximises the summed correlation, so exact EMD then solves Permute's assignment.
    """
    if cost == "euclidean":
        va, vb = torch.diagonal(s_aa).clamp(min=0), torch.diagonal(s_bb).clamp(min=0)
        out = va[:, None] + vb[None, :] - 2 * s_ab + (mean_a[:, None] - mean_b[None, :]) ** 2
    elif cost == "correlation":
        out = 2 - 2 * correlation(s_aa, s_bb, s_ab)
    else:
        raise ValueError(f"unknown OT cost {cost!r}; choose one of {', '.join(OT_COSTS)}")
    return torch.clamp(out, min=0)


def ot_pair(cost: torch.Tensor, reg: float | None = None, inverse: str = "transpose",
            num_iter_max: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Transport model B's units (columns of ``cost``) onto model A's (rows) with uniform marginals.

    ``reg=None``: exact EMD (``ot.emd``). With equal sizes the optimal plan is a vertex of the Birkhoff
    polytope, i.e. a permutation divided by d; we snap it to exact 0/1, so ``T`` is a permutation matrix and
    ``T_inv = T^T`` is its exact inverse. ``reg > 0``: entropic OT (log-domain Sinkhorn) with the cost
    normalised by its maximum, so ``reg`` is relative to the cost scale; ``T = d * plan`` is then doubly
    stochastic (each reference unit receives a weighted average of the model's units).

    ``inverse`` -- what the consuming layers apply on their input side:
      * ``"transpose"`` (default): ``T_inv = T^T``, as in OT fusion, where the next layer's incoming weights
        are combined with the same (normalised) transport map. Exact for EMD; for a soft plan it is not the
        matrix inverse but keeps the weights a convex combination (bounded, no amplification).
      * ``"pinv"``: the Moore-Penrose pseudo-inverse of ``T`` -- the least-squares inverse, exact whenever
        ``T`` is invertible, but it can amplify weights when the plan is very smooth (large ``reg``).
    """
    import ot  # POT; imported lazily so that importing fedmerge does not need it

    if inverse not in ("transpose", "pinv"):
        raise ValueError(f"inverse must be 'transpose' or 'pinv', got {inverse!r}")
    d_a, d_b = cost.shape
    m = np.ascontiguousarray(np.nan_to_num(cost.detach().cpu().numpy().astype(np.float64), nan=0.0,
                                           posinf=0.0, neginf=0.0))
    a = np.full(d_a, 1.0 / d_a)
    b = np.full(d_b, 1.0 / d_b)
    if reg is None:
        plan = ot.emd(a, b, m, numItermax=num_iter_max)
        t = torch.as_tensor(plan * d_a, dtype=DTYPE)
        if d_a == d_b:
            r = torch.round(t)
            if float((t - r).abs().max()) < 1e-6 and torch.equal(r.sum(0), torch.ones(d_b, dtype=DTYPE)) \
                    and torch.equal(r.sum(1), torch.ones(d_a, dtype=DTYPE)):
                t = r
    else:
        if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg > 0):
            raise ValueError(f"reg must be a positive number (entropic OT) or None (exact EMD), got {reg!r}")
        scale = float(m.max())
        m = m / scale if scale > 0 else m
        plan = ot.sinkhorn(a, b, m, reg, method="sinkhorn_log", numItermax=num_iter_max, stopThr=1e-10)
        t = torch.as_tensor(plan * d_a, dtype=DTYPE)
    if not torch.isfinite(t).all():
        raise FloatingPointError("optimal transport produced a non-finite plan (try a larger reg)")
    t_inv = t.T.clone() if inverse == "transpose" else torch.linalg.pinv(t)
    return t, t_inv


def match_ot(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, reg: float | None = None,
             cost: str = "euclidean", inverse: str = "transpose") -> Alignment:
    """OT fusion all-to-one: each model's units transported onto the reference's by an activation cost.

    Cost between reference unit j and model unit k (:func:`ot_cost`): ``cost="euclidean"`` (default) the
    expected squared distance of their raw activations, as in OT fusion (Singh & Jaggi 2020); ``"correlation"``
    the distance of standardised, centred activations (``2 - 2 corr``), with which exact EMD gives Permute's
    assignment. Uniform marginals; exact EMD by default, entropic Sinkhorn with ``reg`` (relative to the cost's
    maximum). See :func:`ot_pair` for ``T``/``T_inv`` (``inverse="transpose"`` or ``"pinv"``).
    """
    if cost not in OT_COSTS:
        raise ValueError(f"unknown OT cost {cost!r}; choose one of {', '.join(OT_COSTS)}")
    stats = inputs.need_stats("ot")
    n = check_stats(stats, spec)
    reference = check_reference(reference, n)
    for i in range(n):
        if i != reference and not stats.has_pair(reference, i):
            raise ValueError(f"ot needs cross statistics between the reference {reference} and model {i}")

    def pair(i: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        s_aa, s_bb, s_ab = stats.pair(reference, i, g)
        c = ot_cost(s_aa.to(DTYPE), s_bb.to(DTYPE), s_ab.to(DTYPE), stats.own[reference][g].mean.to(DTYPE),
                    stats.own[i][g].mean.to(DTYPE), cost=cost)
        return ot_pair(c, reg=reg, inverse=inverse)

    return all_to_one(spec, n, reference, pair)
