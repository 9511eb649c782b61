"""ZipIt! (Stoica et al., ICLR 2024) as a matching method: greedy zipping of all N models' features into one
set of merged features per group, same-model merges allowed (from the cross statistics of every pair)."""
from __future__ import annotations

import math

import numpy as np
import torch

from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.linalg import DTYPE, unit_scales
from fedmerge.common.engine.matching import (
    Alignment,
    MatchInputs,
    check_all_pairs,
    check_stats,
)
from fedmerge.common.engine.stats import Statistics

__all__ = ["match_zipit", "zipit_group"]


def _joint_correlation(stats: Statistics, g: int, n: int, d: int) -> np.ndarray:
    """Correlation matrix of all n*d features (model-major: feature (i, k) is row i*d + k)."""
    corr = np.zeros((n * d, n * d))
    sds = [unit_scales(stats.own[i][g].cov.to(DTYPE))[0] for i in range(n)]
    for i in range(n):
        for j in range(i, n):
            s_ij = stats.pair(i, j, g)[2].to(DTYPE)
            c = (s_ij / torch.outer(sds[i], sds[j])).numpy()
            corr[i * d:(i + 1) * d, j * d:(j + 1) * d] = c
            corr[j * d:(j + 1) * d, i * d:(i + 1) * d] = c.T
    return np.clip(np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)


def _packs(counts: np.ndarray, n: int, bins: int) -> bool:
    """Best-fit-decreasing test: can clusters (``counts[s]`` of size s) fill ``bins`` merged features of
    capacity n? Exact for n <= 3, a sufficient test beyond."""
    free = np.zeros(n + 1, dtype=np.int64)  # free[r]: open bins with r places left
    opened = 0
    for size in range(n, 0, -1):
        k = int(counts[size])
        for r in range(size, n + 1):
            if k == 0:
                break
            m = min(k, int(free[r]))
            free[r] -= m
            free[r - size] += m
            k -= m
        while k > 0:
            per = n // size
            put = min(k, per)
            opened += 1
            free[n - put * size] += 1
            k -= put
    return opened <= bins  # the volumes add up to n * bins, so <= bins bins means all of them full


def _feasible_size_pairs(alive_sizes: np.ndarray, n: int, d: int) -> np.ndarray:
    """table[s1, s2]: merging a size-s1 and a size-s2 cluster keeps a perfect packing into d features."""
    counts = np.bincount(alive_sizes, minlength=n + 1)[:n + 1]
    table = np.zeros((n + 1, n + 1), dtype=bool)
    for s1 in range(1, n + 1):
        for s2 in range(s1, n + 1 - s1):
            c = counts.copy()
            c[s1] -= 1
            c[s2] -= 1
            if c[s1] < 0 or c[s2] < 0:
                continue
            c[s1 + s2] += 1
            table[s1, s2] = table[s2, s1] = _packs(c, n, d)
    return table


def zipit_group(corr: np.ndarray, n: int, d: int, alpha: float = 0.3, beta: float = 0.125
                ) -> list[list[tuple[int, int]]]:
    """Greedy zipping of n*d features into d merged features; returns the clusters as (model, unit) lists.

    Our reading of ZipIt!'s matching, generalised to n models by agglomeration: every feature starts as its
    own cluster; repeatedly the two clusters with the highest score are merged, the score being the average
    correlation between their members (for single features: their correlation). Same-model merges are
    allowed (ZipIt!'s main point), limited by the *same-model budget* ``beta``, in upstream ZipIt!'s convention
    (its ``b``; ``match_tensors_zipit``): zipping n*d features into d takes (n-1)*d merges, and each model
    may take part in at most ``floor(beta * floor((n-1) * d / n))`` merges that put two of its own features
    together -- ``floor(beta * d / 2)`` for two models. (Before issue 16 the budget here was
    ``floor(beta * d)``, with ``beta = 0.5`` by default: upstream's ``b = 1``, 8x upstream's default 0.125.)
    ``alpha`` controls repeated matching: a merge creating a cluster of more than n features has its score
    (the correlation shifted to [0, 2]) multiplied by ``alpha ** (size - n)``; ``alpha = 0`` forbids it, so
    for two models every feature is zipped exactly once (the paper's pairwise procedure); ``alpha = 1`` is
    unconstrained average-linkage agglomeration. Upstream's ``a`` plays the same role (0 forbids re-merging,
    1 does not penalise it) but multiplies a cluster's similarities by ``a`` at each merge, under
    minimum linkage. The defaults are upstream's (a = 0.3, b = 0.125); ``merge_models`` chooses both on the
    held-out probe slice (``fedmerge.common.engine.merge.ZIPIT_GRID``). With
    ``alpha = 0`` and n > 2, merges after which the clusters could no longer be packed exactly into d merged
    features of n members are skipped (a best-fit-decreasing test, exact for n <= 3). If the constraints
    leave no admissible merge before d clusters remain (never for n = 2; rare otherwise, e.g. same-model
    budgets spent), they are dropped for the remaining merges (smallest resulting cluster first, then the
    highest correlation).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    total = n * d
    members: list[list[int]] = [[f] for f in range(total)]
    counts = np.zeros((total, n), dtype=np.int64)  # features of each model in each cluster
    counts[np.arange(total), np.arange(total) // d] = 1
    sums = corr.astype(np.float64).copy()  # sum of member correlations between clusters
    np.fill_diagonal(sums, 0.0)
    sizes = np.ones(total)
    alive = np.ones(total, dtype=bool)
    budget = np.full(n, math.floor(beta * ((n - 1) * d // n) + 1e-9), dtype=np.int64)
    used = np.zeros(n, dtype=np.int64)

    def scores(constrained: bool) -> np.ndarray:
        s = sums / np.outer(sizes, sizes)
        bad = ~(alive[:, None] & alive[None, :])
        np.fill_diagonal(bad, True)
        if constrained:
            merged = sizes[:, None] + sizes[None, :]
            excess = merged - n
            if alpha == 0.0:
                bad |= excess > 0
                if n > 2:  # keep a perfect packing of the clusters into d merged features of n reachable
                    table = _feasible_size_pairs(sizes[alive].astype(np.int64), n, d)
                    si = sizes.astype(np.int64)
                    bad |= ~table[np.minimum(si, n)[:, None], np.minimum(si, n)[None, :]]
            elif alpha < 1.0:  # correlation shifted to [0, 2], scaled down per feature beyond n
                s = np.where(excess > 0, (s + 1.0) * alpha ** np.maximum(excess, 0) - 1.0, s)
            # same-model merges: clusters that both hold features of a model whose budget is spent
            spent = used >= budget
            if spent.any():
                has = (counts[:, spent] > 0).astype(np.float64)
                bad |= (has @ has.T) > 0
            return np.where(bad, -np.inf, s)
        merged = sizes[:, None] + sizes[None, :]
        s = np.where(bad, -np.inf, s - 4.0 * merged)  # smallest resulting cluster first, then correlation
        return s

    clusters = total
    while clusters > d:
        s = scores(True)
        flat = int(np.argmax(s))
        if not np.isfinite(s.flat[flat]):
            s = scores(False)
            flat = int(np.argmax(s))
        a, b = divmod(flat, total)
        a, b = min(a, b), max(a, b)
        shared = (counts[a] > 0) & (counts[b] > 0)
        used += shared.astype(np.int64)
        members[a] = members[a] + members[b]
        members[b] = []
        counts[a] += counts[b]
        counts[b] = 0
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        sums[a, a] = 0.0
        sizes[a] += sizes[b]
        alive[b] = False
        clusters -= 1
    out = [[(f // d, f % d) for f in sorted(members[c])] for c in range(total) if alive[c]]
    return out


def match_zipit(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, alpha: float = 0.3, beta: float = 0.125
                ) -> Alignment:
    """ZipIt!: zip all N models' features jointly into d merged features per group (see :func:`zipit_group`;
    ``alpha``/``beta`` default to upstream's a = 0.3, b = 0.125; ``merge_models`` chooses them on the held-out
    probe slice unless given).

    Needs cross statistics of every pair (``collect_statistics(..., pairs="all")``). Each merged feature c
    averages its members: merge matrices ``M_i[c, k] = 1/|c|`` for each member (i, k), unmerge matrices
    ``U_i[k, c] = 1`` (every original feature is read back from its merged feature). The merged layer is
    ``sum_i M_i,out W_i U_i,in``; the align/average step computes ``sum_i w_i T_i W_i T_inv_i`` with uniform
    ``w_i = 1/N``, so we return ``T_i = N M_i`` and ``T_inv_i = U_i``. For clusters holding one feature of
    every model (always so for exactly matched copies) the rows of ``T_i`` are 0/1 and non-uniform weights
    still give a convex combination; clusters with same-model merges assume uniform weights. No model is
    special: the merged features are ordered by their lowest (model, unit) member, so model 0's order is kept
    where possible. ``reference`` is accepted and ignored.
    """
    stats = inputs.need_stats("zipit")
    n = check_stats(stats, spec)
    check_all_pairs(stats, "zipit")
    out: Alignment = {}
    for g, grp in spec.groups.items():
        d = grp.dim
        clusters = zipit_group(_joint_correlation(stats, g, n, d), n, d, alpha=alpha, beta=beta)
        clusters.sort(key=lambda c: c[0])
        ms = [torch.zeros(d, d, dtype=DTYPE) for _ in range(n)]
        us = [torch.zeros(d, d, dtype=DTYPE) for _ in range(n)]
        for c, mem in enumerate(clusters):
            for i, k in mem:
                ms[i][c, k] = 1.0 / len(mem)
                us[i][k, c] = 1.0
        out[g] = [(n * ms[i], us[i]) for i in range(n)]
    return out
