"""Matching methods: pure functions from statistics (or weights) to per-group transforms.

Every method has one signature, ``fn(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, **hyper) ->
Alignment`` (:class:`MatchInputs` carries the statistics and/or the parameter dicts), and is registered with
what it reads and which hyper-parameters are tuned in :mod:`fedmerge.common.engine.methods`. Here: plain
averaging (:func:`identity_alignment`), Permute and CCA Merge; the shared numerics are in
:mod:`fedmerge.common.engine.linalg`.

An :data:`Alignment` maps each merge group to one ``(T, T_inv)`` pair per model, in float64: ``T`` maps the
model's units into the shared basis (the reference's, for all-to-one methods: there ``T_ref = I``), ``T_inv``
maps back. A merged layer is ``W = sum_i w_i T_i,out W_i T_i,in^-1`` (see :mod:`fedmerge.common.engine.align`).

CCA Merge (Horoi et al., ICML 2024): with regularised covariances S_AA, S_BB and cross-covariance S_AB,
SVD of S_AA^-1/2 S_AB S_BB^-1/2 = U diag(rho) V^T gives canonical bases P_A = S_AA^-1/2 U and
P_B = S_BB^-1/2 V; the transform mapping B's units onto A's is T = (P_B P_A^-1)^T
= S_AA^1/2 U V^T S_BB^-1/2, with inverse S_BB^1/2 V U^T S_AA^-1/2 (closed forms, no explicit inverse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.linalg import (
    DTYPE,
    dead_units,
    polar,
    single_threaded,
    sym_powers,
    unit_scales,
)
from fedmerge.common.engine.stats import Statistics

__all__ = ["Alignment", "MatchInputs", "DTYPE", "identity_alignment", "all_to_one", "check_reference",
           "check_stats", "check_all_pairs", "correlation", "permutation_from_scores", "permute_pair",
           "match_permute", "cca_pair", "CCABasis", "CCAPair", "CCARows", "cca_rows", "match_cca",
           "single_threaded", "REGULARIZATIONS"]

Alignment = dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
PairFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MatchInputs:
    """What a matching method reads: the models' activation statistics (:class:`Statistics`, for the methods that
    need them) and/or their parameter dicts (``states``, for the weight-based ones). Every matching method is
    ``fn(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, **hyper) -> Alignment``."""
    stats: Statistics | None = None
    states: Sequence[Mapping[str, torch.Tensor]] | None = None

    @property
    def num_models(self) -> int:
        """The number of models: of ``states`` when given, else of ``stats``."""
        return len(self.states) if self.states is not None else (self.stats.num_models if self.stats else 0)

    def need_stats(self, method: str) -> Statistics:
        if self.stats is None:
            raise ValueError(f"method {method!r} needs activation statistics")
        return self.stats

    def need_states(self, method: str) -> Sequence[Mapping[str, torch.Tensor]]:
        if self.states is None:
            raise ValueError(f"method {method!r} needs the models' parameters")
        return self.states


def identity_alignment(inputs: MatchInputs, spec: MergeSpec, reference: int = 0) -> Alignment:
    """Plain averaging: every model keeps its own units (identity transforms)."""
    return {g: [(torch.eye(grp.dim, dtype=DTYPE), torch.eye(grp.dim, dtype=DTYPE)) for _ in range(inputs.num_models)]
            for g, grp in spec.groups.items()}


def all_to_one(spec: MergeSpec, num_models: int, reference: int, pair_fn: PairFn) -> Alignment:
    """An all-to-one alignment: the reference keeps its units (identity), model i at group g gets
    ``pair_fn(i, g)``, its ``(T, T^-1)`` onto the reference."""
    out: Alignment = {}
    for g, grp in spec.groups.items():
        eye = torch.eye(grp.dim, dtype=DTYPE)
        out[g] = [(eye, eye) if i == reference else pair_fn(i, g) for i in range(num_models)]
    return out


def check_reference(reference, n: int) -> int:
    """``reference`` as a model index in ``[0, n)`` (ValueError otherwise)."""
    if isinstance(reference, bool) or not isinstance(reference, (int, np.integer)) or not 0 <= reference < n:
        raise ValueError(f"reference must be a model index in [0, {n}), got {reference!r}")
    return int(reference)


def check_stats(stats: Statistics, spec: MergeSpec) -> int:
    """The number of models of ``stats``, after checking that they hold every merge group of ``spec``."""
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


def check_all_pairs(stats: Statistics, method: str) -> None:
    """Methods over all N models at once need the cross statistics of every pair (ValueError otherwise)."""
    n = stats.num_models
    missing = [(i, j) for i in range(n) for j in range(i + 1, n) if not stats.has_pair(i, j)]
    if missing:
        raise ValueError(f"{method} needs statistics for all pairs; collect with pairs='all' "
                         f"(missing model pairs {missing[:5]})")


# --- permutation (linear assignment on correlations) --------------------------------------------------------
def correlation(s_aa: torch.Tensor, s_bb: torch.Tensor, s_ab: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sd_a = torch.sqrt(torch.clamp(torch.diagonal(s_aa), min=0))
    sd_b = torch.sqrt(torch.clamp(torch.diagonal(s_bb), min=0))
    return s_ab / torch.clamp(torch.outer(sd_a, sd_b), min=eps)


def permutation_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Permutation matrix P maximising sum_j scores[j, col(j)] with P[j, col(j)] = 1, so P @ x_B ~ x_A."""
    s = np.nan_to_num(scores.detach().cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    rows, cols = linear_sum_assignment(s, maximize=True)
    p = torch.zeros(scores.shape, dtype=DTYPE)
    p[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    return p


def permute_pair(s_aa, s_bb, s_ab):
    p = permutation_from_scores(correlation(s_aa, s_bb, s_ab))
    return p, p.T.clone()


def match_permute(inputs: MatchInputs, spec: MergeSpec, reference: int = 0) -> Alignment:
    """Permute: each model's units matched one-to-one to the reference's by maximal activation correlation."""
    stats = inputs.need_stats("permute")
    return all_to_one(spec, stats.num_models, reference, lambda i, g: permute_pair(*stats.pair(reference, i, g)))


# --- CCA --------------------------------------------------------------------------------------------------
def cca_pair(s_aa: torch.Tensor, s_bb: torch.Tensor, s_ab: torch.Tensor, gamma: float = 0.1,
             regularization: str = "trace") -> tuple[torch.Tensor, torch.Tensor]:
    """CCA transform (T, T^-1) mapping model B's units onto model A's.

    ``regularization="trace"`` (default): ridge ``gamma * tr(S)/d * I`` on the raw covariances -- the
    paper's form, with gamma relative to the mean unit variance. Exactly invariant to permutations, and to
    rescaling units as gamma -> 0. ``"corr"``: CCA on standardised units with ridge ``gamma * I`` on the
    correlation matrices: exactly invariant to positive rescaling for every gamma, but it gives near-dead
    units as much weight as strong ones, and merges real networks much worse (measured on two VGG11x0.25
    CIFAR-10 80/20 clients: 10-13% merged accuracy vs 36-39% with "trace").

    Directions the probe does not determine (dead units, probes smaller than the width) are mapped
    deterministically: dead units of B onto dead units of A, positively, in order.
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    d_a, d_b = s_aa.shape[0], s_bb.shape[0]
    prior = torch.zeros(d_a, d_b, dtype=s_ab.dtype)
    dead_a, dead_b = dead_units(s_aa), dead_units(s_bb)
    k = min(len(dead_a), len(dead_b))
    prior[dead_a[:k], dead_b[:k]] = 1.0
    if regularization == "corr":
        sd_a, sd_b = unit_scales(s_aa)[0], unit_scales(s_bb)[0]
        r_aa = s_aa / torch.outer(sd_a, sd_a) + gamma * torch.eye(d_a, dtype=s_aa.dtype)
        r_bb = s_bb / torch.outer(sd_b, sd_b) + gamma * torch.eye(d_b, dtype=s_bb.dtype)
        r_ab = s_ab / torch.outer(sd_a, sd_b)
        t, t_inv = _cca_core(r_aa, r_bb, r_ab, prior)
        # back to raw units: x_A = D_a z_A, z_A = T_std z_B, z_B = D_b^-1 x_B
        return sd_a[:, None] * t / sd_b[None, :], sd_b[:, None] * t_inv / sd_a[None, :]
    if regularization == "trace":
        sc_a = max(float(torch.trace(s_aa)) / d_a, 1e-300)
        sc_b = max(float(torch.trace(s_bb)) / d_b, 1e-300)
        return _cca_core(s_aa + gamma * sc_a * torch.eye(d_a, dtype=s_aa.dtype),
                         s_bb + gamma * sc_b * torch.eye(d_b, dtype=s_bb.dtype), s_ab, prior)
    raise ValueError(f"regularization must be 'corr' or 'trace', got {regularization!r}")


def _cca_core(s_aa, s_bb, s_ab, prior=None):
    a_h, a_mh = sym_powers(s_aa)
    b_h, b_mh = sym_powers(s_bb)
    u, sv, vh = torch.linalg.svd(a_mh @ s_ab @ b_mh)
    null = sv <= sv.max().clamp_min(1e-300) * 1e-9
    if bool(null.any()):  # undetermined directions: best orthogonal map towards the prior pairing
        u0, v0 = u[:, null], vh[null].T
        k = u0.T @ (prior if prior is not None else torch.zeros_like(s_ab)) @ v0
        q = polar(k) if float(k.abs().max()) > 0 else torch.eye(k.shape[0], dtype=k.dtype)
        live = ~null
        rot = u[:, live] @ vh[live] + u0 @ q @ v0.T
    else:
        rot = u @ vh
    t = a_h @ rot @ b_mh
    t_inv = b_h @ rot.T @ a_mh
    return t, t_inv


# --- CCA over a grid of gammas: every covariance decomposed once ----------------------------------------------
REGULARIZATIONS = ("trace", "corr")


class CCABasis:
    """What CCA needs of one model's covariance at one group, whatever gamma: the eigendecomposition of the
    symmetrised covariance (standardised for ``"corr"``), the ridge's scale (``tr(S)/d`` for ``"trace"``, 1 for
    ``"corr"``), the unit scales (``"corr"``) and the dead units. ``S + gamma * scale * I`` has the same
    eigenvectors as ``S`` and its eigenvalues shifted by ``gamma * scale``, so one ``eigh`` serves every gamma
    (and, for the reference, every model aligned onto it)."""

    def __init__(self, s: torch.Tensor, regularization: str = "trace"):
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be 'corr' or 'trace', got {regularization!r}")
        s = s.to(DTYPE)
        d = s.shape[0]
        scales, dead = unit_scales(s)
        self.dead = torch.nonzero(dead).flatten()
        if regularization == "corr":
            self.sd, self.scale = scales, 1.0
            s = s / torch.outer(scales, scales)
        else:
            self.sd, self.scale = None, max(float(torch.trace(s)) / d, 1e-300)
        self.evals, self.evecs = torch.linalg.eigh((s + s.T) / 2)

    def roots(self, gamma: float) -> torch.Tensor:
        """Square roots of the regularised covariance's eigenvalues, floored as
        :func:`~fedmerge.common.engine.linalg.sym_powers` floors them
        (condition number <= 1e8)."""
        e = self.evals + gamma * self.scale
        return torch.sqrt(torch.clamp(e, min=torch.clamp(e.max(), min=1e-300) * 1e-8))


class CCAPair:
    """One (reference A, model B) pair at one group, for any number of gammas: with A's and B's eigenbases
    ``Q_A``, ``Q_B`` (:class:`CCABasis`), ``S_A^-1/2 S_AB S_B^-1/2 = Q_A (D_A K D_B) Q_B^T`` with the fixed
    ``K = Q_A^T S_AB Q_B`` and diagonal ``D = (Lambda + gamma * scale)^-1/2``, so each gamma costs one SVD of
    ``D_A K D_B`` and four products; :meth:`transforms` equals :func:`cca_pair` (the same closed form, the
    undetermined directions completed by the same dead-unit prior, expressed in the eigenbases)."""

    def __init__(self, a: CCABasis, b: CCABasis, s_ab: torch.Tensor):
        if (a.sd is None) != (b.sd is None):
            raise ValueError("both bases of a CCA pair need the same regularization")
        self.a, self.b = a, b
        s_ab = s_ab.to(DTYPE)
        cross = s_ab if a.sd is None else s_ab / torch.outer(a.sd, b.sd)
        self.k = a.evecs.T @ cross @ b.evecs
        m = min(len(a.dead), len(b.dead))   # dead units of B onto dead units of A, positively, in order
        self.prior = a.evecs[a.dead[:m]].T @ b.evecs[b.dead[:m]] if m else None   # Q_A^T P Q_B

    def transforms(self, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        ra, rb = self.a.roots(gamma), self.b.roots(gamma)
        u, sv, vh = torch.linalg.svd(self.k / ra[:, None] / rb[None, :])
        null = sv <= sv.max().clamp_min(1e-300) * 1e-9
        if bool(null.any()):  # as _cca_core: the best orthogonal map towards the prior pairing
            u0, v0 = u[:, null], vh[null].T
            k = u0.T @ self.prior @ v0 if self.prior is not None else torch.zeros(u0.shape[1], v0.shape[1], dtype=DTYPE)
            q = polar(k) if float(k.abs().max()) > 0 else torch.eye(k.shape[0], dtype=k.dtype)
            live = ~null
            rot = u[:, live] @ vh[live] + u0 @ q @ v0.T
        else:
            rot = u @ vh
        qa, qb = self.a.evecs, self.b.evecs
        t = qa @ (ra[:, None] * rot / rb[None, :]) @ qb.T
        t_inv = qb @ (rb[:, None] * rot.T / ra[None, :]) @ qa.T
        if self.a.sd is not None:   # back to raw units (see cca_pair)
            sd_a, sd_b = self.a.sd, self.b.sd
            t, t_inv = sd_a[:, None] * t / sd_b[None, :], sd_b[:, None] * t_inv / sd_a[None, :]
        return t, t_inv


class CCARows:
    """Every model's CCA transforms onto the reference for a list of gammas, one model at a time (:meth:`row`,
    safe to call from several threads): the reference's covariance is decomposed once per group (here), every
    other model's once per group for all gammas."""

    def __init__(self, stats: Statistics, spec: MergeSpec, reference: int, gammas, regularization: str = "trace"):
        self.gammas = [float(g) for g in gammas]
        for gamma in self.gammas:
            if not gamma >= 0:
                raise ValueError(f"gamma must be >= 0, got {gamma}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be 'corr' or 'trace', got {regularization!r}")
        self.stats, self.spec, self.reference, self.regularization = stats, spec, reference, regularization
        self.refs = {g: CCABasis(stats.own[reference][g].cov, regularization) for g in spec.groups} \
            if stats.num_models > 1 else {}

    def row(self, i: int) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Model i's ``{group: (T, T^-1)}`` for each gamma (identities for the reference)."""
        rows: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in self.gammas]
        for g, grp in self.spec.groups.items():
            if i == self.reference:
                eye = torch.eye(grp.dim, dtype=DTYPE)
                for r in rows:
                    r[g] = (eye, eye)
                continue
            _, s_bb, s_ab = self.stats.pair(self.reference, i, g)
            pair = CCAPair(self.refs[g], CCABasis(s_bb, self.regularization), s_ab)
            for r, gamma in zip(rows, self.gammas):
                r[g] = pair.transforms(gamma)
        return rows


def cca_rows(stats: Statistics, spec: MergeSpec, reference: int, gammas, regularization: str = "trace",
             models=None):
    """CCA transforms model by model (a generator over ``models``, default every model in index order): for
    model i, a list with one ``{group: (T, T^-1)}`` per gamma in ``gammas`` (:class:`CCARows`). The reference's
    covariance is decomposed once per group for all models, every other model's once per group for all gammas;
    nothing of model i is kept after its row.
    The same transforms as :func:`match_cca` at each gamma, N * groups eigendecompositions instead of
    3 * N * groups * len(gammas)."""
    rows = CCARows(stats, spec, reference, gammas, regularization)
    for i in (range(stats.num_models) if models is None else models):
        yield rows.row(i)


def match_cca(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, gamma: float = 0.1,
              regularization: str = "trace") -> Alignment:
    """CCA Merge all-to-one: every model's units mapped onto the reference's canonical directions (the
    reference's covariance decomposed once for all models: :func:`cca_rows`)."""
    stats = inputs.need_stats("cca")
    out: Alignment = {g: [] for g in spec.groups}
    for (row,) in cca_rows(stats, spec, reference, [gamma], regularization):
        for g, pair in row.items():
            out[g].append(pair)
    return out
