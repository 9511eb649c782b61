"""Baseline matching methods, in the :data:`~fedmerge.common.engine.matching.Alignment` format.

Every function here is pure: statistics (or parameter dicts) in, per-group ``(T, T_inv)`` pairs out, in
float64. A merged layer is ``sum_i w_i T_i,out W_i T_i,in^-1`` (:mod:`fedmerge.common.engine.align`), so an
all-to-one method gives ``T`` mapping model i's units onto the reference's and ``T_inv`` what the layers
consuming the group apply on their input side; the reference gets the identity.

* :func:`match_ot` -- optimal-transport fusion (Singh & Jaggi, NeurIPS 2020), activation-based cost (the
  Euclidean distance of raw activations by default; the correlation cost, which gives Permute's assignment,
  as an option).
* :func:`match_zipit` -- ZipIt! (Stoica et al., ICLR 2024): greedy zipping of all N models' features.
* :func:`match_weights` -- Git Re-Basin weight matching (Ainsworth et al., ICLR 2023); the published
  objective (no BatchNorm running statistics, no conv/linear biases) unless asked otherwise.
* :func:`match_merge_many` -- MergeMany (Ainsworth et al., ICLR 2023, the many-models algorithm).

The weight-based methods read the layer layout from the :class:`~fedmerge.common.engine.graph.MergeSpec` only
(output segments, input segments with the flatten ``repeat``, BatchNorm vectors, biases), so they work on
any architecture the spec supports with no per-architecture code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedmerge.common.engine.graph import FIXED, LayerSpec, MergeSpec
from fedmerge.common.engine.matching import Alignment, _unit_scales, correlation
from fedmerge.common.engine.stats import Statistics

__all__ = ["match_ot", "match_zipit", "match_weights", "match_merge_many", "ot_cost", "ot_pair", "zipit_group",
           "OT_COSTS"]

DTYPE = torch.float64
_IGNORED_KW = ("gamma", "reference")  # passed by generic callers; meaningless for some methods


def _check_kw(fn: str, kw: Mapping, ignored: Sequence[str] = _IGNORED_KW) -> None:
    bad = sorted(k for k in kw if k not in ignored)
    if bad:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {bad}")


def _check_reference(reference, n: int) -> int:
    if isinstance(reference, bool) or not isinstance(reference, (int, np.integer)) or not 0 <= reference < n:
        raise ValueError(f"reference must be a model index in [0, {n}), got {reference!r}")
    return int(reference)


def _check_stats(stats: Statistics, spec: MergeSpec) -> int:
    if not isinstance(stats, Statistics):
        raise ValueError(f"expected a Statistics object, got {type(stats).__name__}")
    n = stats.num_models
    if n < 2:
        raise ValueError(f"matching needs statistics of at least 2 models, got {n}")
    for i, own in enumerate(stats.own):
        missing = [g for g in spec.groups if g not in own]
        if missing:
            raise ValueError(f"statistics of model {i} lack merge groups {missing[:5]}: do they match the spec?")
        for g, grp in spec.groups.items():
            if tuple(own[g].m2.shape) != (grp.dim, grp.dim):
                raise ValueError(f"statistics of model {i} at group {g} have shape {tuple(own[g].m2.shape)}, "
                                 f"the spec says {grp.dim} units")
    return n


# === optimal transport (Singh & Jaggi 2020) =================================================================
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


def match_ot(stats: Statistics, spec: MergeSpec, reference: int = 0, reg: float | None = None,
             cost: str = "euclidean", inverse: str = "transpose", **kw) -> Alignment:
    """OT fusion all-to-one: each model's units transported onto the reference's by an activation cost.

    Cost between reference unit j and model unit k (:func:`ot_cost`): ``cost="euclidean"`` (default) the
    expected squared distance of their raw activations, as in OT fusion (Singh & Jaggi 2020); ``"correlation"``
    the distance of standardised, centred activations (``2 - 2 corr``), with which exact EMD gives Permute's
    assignment. Uniform marginals; exact EMD by default, entropic Sinkhorn with ``reg`` (relative to the cost's
    maximum). See :func:`ot_pair` for ``T``/``T_inv`` (``inverse="transpose"`` or ``"pinv"``).
    """
    _check_kw("match_ot", kw)
    if cost not in OT_COSTS:
        raise ValueError(f"unknown OT cost {cost!r}; choose one of {', '.join(OT_COSTS)}")
    n = _check_stats(stats, spec)
    reference = _check_reference(reference, n)
    out: Alignment = {}
    for g, grp in spec.groups.items():
        eye = torch.eye(grp.dim, dtype=DTYPE)
        row = []
        for i in range(n):
            if i == reference:
                row.append((eye, eye.clone()))
                continue
            if not stats.has_pair(reference, i):
                raise ValueError(f"ot needs cross statistics between the reference {reference} and model {i}")
            s_aa, s_bb, s_ab = stats.pair(reference, i, g)
            c = ot_cost(s_aa.to(DTYPE), s_bb.to(DTYPE), s_ab.to(DTYPE), stats.own[reference][g].mean.to(DTYPE),
                        stats.own[i][g].mean.to(DTYPE), cost=cost)
            row.append(ot_pair(c, reg=reg, inverse=inverse))
        out[g] = row
    return out


# === ZipIt! (Stoica et al. 2023) =============================================================================
def _joint_correlation(stats: Statistics, g: int, n: int, d: int) -> np.ndarray:
    """Correlation matrix of all n*d features (model-major: feature (i, k) is row i*d + k)."""
    corr = np.zeros((n * d, n * d))
    sds = [_unit_scales(stats.own[i][g].cov.to(DTYPE))[0] for i in range(n)]
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


def match_zipit(stats: Statistics, spec: MergeSpec, alpha: float = 0.3, beta: float = 0.125, **kw) -> Alignment:
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
    _check_kw("match_zipit", kw)
    n = _check_stats(stats, spec)
    missing = [(i, j) for i in range(n) for j in range(i + 1, n) if not stats.has_pair(i, j)]
    if missing:
        raise ValueError(f"zipit needs statistics for all pairs; collect with pairs='all' "
                         f"(missing model pairs {missing[:5]})")
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


# === weight matching (Git Re-Basin) =========================================================================
Perms = dict[int, np.ndarray]  # group -> perm with aligned[a] = original[perm[a]]


@dataclass
class _Layer:
    spec: LayerSpec
    keys: list[str]  # the parameters in the objective: conv/linear "weight" (+ "bias"), BN's vectors


def _layers(spec: MergeSpec, state: Mapping[str, torch.Tensor], biases: bool = False,
            running_stats: bool = False) -> list[_Layer]:
    """The parameters weight matching's objective reads, per layer: conv/linear weights (and their biases
    with ``biases``), BatchNorm weight and bias (and running mean / variance with ``running_stats``)."""
    out = []
    for l in spec.layers.values():
        if l.kind != "bn":
            names = ("weight", "bias") if biases else ("weight",)
        else:
            names = ("weight", "bias") + (("running_mean", "running_var") if running_stats else ())
        keys = [f"{l.name}.{k}" for k in names if state.get(f"{l.name}.{k}") is not None]
        if l.kind != "bn" and f"{l.name}.weight" not in state:
            raise ValueError(f"state dict has no '{l.name}.weight' for merge layer '{l.name}'")
        out.append(_Layer(l, keys))
    return out


def _seg_index(segs, perms: Perms) -> np.ndarray:
    idx, o = [], 0
    for s in segs:
        p = perms.get(s.group) if s.group != FIXED else None
        idx.append(o + (p if p is not None else np.arange(s.size)))
        o += s.size
    return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)


def _touches(l: LayerSpec, g: int) -> bool:
    return any(s.group == g for s in l.out) or any(s.group == g for s in l.inp)


def _permute_state(state: Mapping[str, torch.Tensor], layers: list[_Layer], perms: Perms) -> dict[str, torch.Tensor]:
    """Apply permutations (exactly, by indexing) to every layer of a float64 state."""
    out = dict(state)
    for lay in layers:
        l = lay.spec
        oi = torch.as_tensor(_seg_index(l.out, perms))
        for k in lay.keys:
            v = out[k].index_select(0, oi)
            if k.endswith(".weight") and l.kind != "bn" and l.inp:
                ii = torch.as_tensor(_seg_index(l.inp, perms))
                shape = v.shape
                v = v.reshape(shape[0], ii.numel(), -1).index_select(1, ii).reshape(shape)
            out[k] = v
    return out


def _f64(state: Mapping[str, torch.Tensor], layers: list[_Layer]) -> dict[str, torch.Tensor]:
    return {k: state[k].detach().cpu().to(DTYPE) for lay in layers for k in lay.keys}


def _similarity(g: int, d: int, target, model, layers: list[_Layer], perms: Perms) -> torch.Tensor:
    """L[a, b]: objective gained by mapping the model's unit b of group g to the target's unit a, with every
    other transform (neighbouring groups, and g itself where it appears on the other side) held fixed."""
    sim = torch.zeros(d, d, dtype=DTYPE)
    for lay in layers:
        l = lay.spec
        if not _touches(l, g):
            continue
        # output side: rows of the layer's output axis in group g (several segments for BN after a concat)
        o = 0
        for s in l.out:
            if s.group == g:
                for k in lay.keys:
                    a = target[k][o:o + d]
                    b = model[k]
                    if k.endswith(".weight") and l.kind != "bn" and l.inp:
                        ii = torch.as_tensor(_seg_index(l.inp, perms))
                        b = b.reshape(b.shape[0], ii.numel(), -1).index_select(1, ii)
                    b = b[o:o + d]
                    sim += a.reshape(d, -1) @ b.reshape(d, -1).T
            o += s.size
        if l.kind == "bn" or not l.inp:
            continue
        # input side: columns (channel-major, x repeat / kernel taps) of group g
        c = 0
        key = f"{l.name}.weight"
        oi = torch.as_tensor(_seg_index(l.out, perms))
        n_in = sum(s.size for s in l.inp)
        for s in l.inp:
            if s.group == g:
                a = target[key].reshape(target[key].shape[0], n_in, -1)[:, c:c + d]
                b = model[key].index_select(0, oi).reshape(model[key].shape[0], n_in, -1)[:, c:c + d]
                sim += a.transpose(0, 1).reshape(d, -1) @ b.transpose(0, 1).reshape(d, -1).T
            c += s.size
    return sim


def _lsa(sim: torch.Tensor) -> np.ndarray:
    s = np.nan_to_num(sim.numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _weight_match(target, model, spec: MergeSpec, layers: list[_Layer], init: Perms, max_iter: int,
                  rng: np.random.Generator) -> tuple[Perms, int]:
    """Coordinate descent (Git Re-Basin): groups in random order, each solved by linear assignment with the
    others fixed; stops after a sweep without improvement. Returns the permutations and the sweeps done."""
    perms = {g: p.copy() for g, p in init.items()}
    gids = [g for g in spec.groups if any(_touches(lay.spec, g) for lay in layers)]
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        improved = False
        for g in rng.permutation(gids):
            g = int(g)
            d = spec.groups[g].dim
            sim = _similarity(g, d, target, model, layers, perms)
            new = _lsa(sim)
            ar = np.arange(d)
            old_v, new_v = float(sim[ar, perms[g]].sum()), float(sim[ar, new].sum())
            if new_v > old_v + 1e-12 * max(abs(old_v), 1.0):
                perms[g] = new
                improved = True
        if not improved:
            break
    return perms, sweeps


def _to_alignment(spec: MergeSpec, all_perms: Sequence[Perms]) -> Alignment:
    out: Alignment = {}
    for g, grp in spec.groups.items():
        row = []
        for perms in all_perms:
            t = torch.zeros(grp.dim, grp.dim, dtype=DTYPE)
            t[torch.arange(grp.dim), torch.as_tensor(perms[g])] = 1.0
            row.append((t, t.T.clone()))
        out[g] = row
    return out


def _check_states(states, spec: MergeSpec, max_iter, biases: bool, running_stats: bool) -> list[_Layer]:
    if not isinstance(states, (list, tuple)) or len(states) < 2:
        raise ValueError("weight matching needs a list of at least 2 state dicts")
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    for name, flag in (("wm_biases", biases), ("wm_running_stats", running_stats)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    layers = _layers(spec, states[0], biases, running_stats)
    for i, sd in enumerate(states):
        for lay in layers:
            for k in lay.keys:
                if k not in sd:
                    raise ValueError(f"state dict {i} has no '{k}'")
                if sd[k].shape != states[0][k].shape:
                    raise ValueError(f"state dict {i}: '{k}' has shape {tuple(sd[k].shape)}, "
                                     f"model 0 {tuple(states[0][k].shape)}")
                if not torch.isfinite(sd[k]).all():
                    raise ValueError(f"state dict {i}: '{k}' has non-finite values")
    for lay in layers:
        l = lay.spec
        rows = sum(s.size for s in l.out)
        if l.kind != "bn" and states[0][f"{l.name}.weight"].shape[0] != rows:
            raise ValueError(f"layer '{l.name}' has {states[0][f'{l.name}.weight'].shape[0]} outputs, "
                             f"the merge spec says {rows}")
    return layers


def match_weights(states: Sequence[Mapping[str, torch.Tensor]], spec: MergeSpec, reference: int = 0,
                  max_iter: int = 100, seed: int = 0, wm_biases: bool = False, wm_running_stats: bool = False,
                  **kw) -> Alignment:
    """Git Re-Basin weight matching, all-to-one: each model permuted to maximise ``sum_layers <W_ref, P W_i>``
    against the reference, by coordinate descent over groups. ``T`` is the permutation matrix, ``T_inv = T^T``.

    The objective is the published one by default: conv/linear weights on both axes and BatchNorm's weight
    and bias. BatchNorm running statistics are left out, as in Git Re-Basin's code (they are buffers, not
    parameters, there), and so are conv/linear biases, as in align-n-merge's VGG variant (nets whose hidden
    layers have no bias -- ResNets -- are unaffected; Git Re-Basin's MLP objective includes biases).
    ``wm_biases=True`` / ``wm_running_stats=True`` put them back (the objective before issue 16 had both)."""
    _check_kw("match_weights", kw, ("gamma",))
    layers = _check_states(states, spec, max_iter, wm_biases, wm_running_stats)
    reference = _check_reference(reference, len(states))
    f64 = [_f64(sd, layers) for sd in states]
    ident = {g: np.arange(grp.dim) for g, grp in spec.groups.items()}
    all_perms = []
    for i in range(len(states)):
        if i == reference:
            all_perms.append(ident)
            continue
        rng = np.random.default_rng([seed, i])
        perms, _ = _weight_match(f64[reference], f64[i], spec, layers, ident, max_iter, rng)
        all_perms.append(perms)
    return _to_alignment(spec, all_perms)


def match_merge_many(states: Sequence[Mapping[str, torch.Tensor]], spec: MergeSpec, reference: int = 0,
                     max_iter: int = 20, seed: int = 0, inner_iter: int = 100, wm_biases: bool = False,
                     wm_running_stats: bool = False, **kw) -> Alignment:
    """MergeMany (Ainsworth et al. 2023): start from all-to-one weight matching to ``reference``; then, in
    rounds over the models in random order, weight-match model i to the average of all the other (currently
    aligned) models, until a round changes no permutation (or ``max_iter`` rounds). The shared basis is only
    defined up to one common permutation; it is fixed by giving ``reference`` the identity (which changes
    nothing in the merged model). The objective is :func:`match_weights`' (``wm_biases``,
    ``wm_running_stats``)."""
    _check_kw("match_merge_many", kw, ("gamma",))
    layers = _check_states(states, spec, max_iter, wm_biases, wm_running_stats)
    if not (isinstance(inner_iter, (int, np.integer)) and inner_iter >= 1):
        raise ValueError(f"inner_iter must be a positive integer, got {inner_iter!r}")
    n = len(states)
    reference = _check_reference(reference, n)
    f64 = [_f64(sd, layers) for sd in states]
    ident = {g: np.arange(grp.dim) for g, grp in spec.groups.items()}
    rng = np.random.default_rng(seed)
    perms: list[Perms] = []
    for i in range(n):
        perms.append(ident if i == reference
                     else _weight_match(f64[reference], f64[i], spec, layers, ident, inner_iter, rng)[0])
    aligned = [_permute_state(f64[i], layers, perms[i]) for i in range(n)]
    for _ in range(max_iter):
        changed = False
        for i in rng.permutation(n):
            i = int(i)
            others = [aligned[j] for j in range(n) if j != i]
            target = {k: sum(o[k] for o in others) / len(others) for k in others[0]}
            new, _ = _weight_match(target, f64[i], spec, layers, perms[i], inner_iter, rng)
            if any(not np.array_equal(new[g], perms[i][g]) for g in new):
                changed = True
                perms[i] = new
                aligned[i] = _permute_state(f64[i], layers, new)
        if not changed:
            break
    # canonical gauge: the reference keeps its own unit order (compose every perm with the reference's inverse)
    ref = perms[reference]
    inv = {g: np.argsort(p) for g, p in ref.items()}
    canon = [{g: p[g][inv[g]] for g in p} for p in perms]
    return _to_alignment(spec, canon)
