"""Reference-free multi-view CCA merge (generalised CCA over all N models at once).

All-to-one CCA Merge aligns every model to one reference, an arbitrary choice. :func:`match_gcca` instead
maps all N models into one shared basis computed from all pairwise statistics (needs
``collect_statistics(..., pairs="all")``), averages there, and maps back to a unit basis in which the ReLU
is applied. It returns a normal :data:`~fedmerge.common.engine.matching.Alignment`, so the align/average step is
unchanged.

Notation per merge group (d units): S_ii, S_ij the probe (cross-)covariances; R_i = S_ii + gamma tr(S_ii)/d I
the ridge-regularised covariance (``regularization="trace"``, the same relative ridge as
:func:`~fedmerge.common.engine.matching.cca_pair`); W_i = R_i^-1/2 (eigh,
:func:`~fedmerge.common.engine.linalg.sym_powers`); whitened units y_i = W_i x_i; K_ij = W_i S_ij W_j^T.

**MAXVAR** (Kettenring 1971; Carroll 1968). C is the Nd x Nd block matrix with K_ij off the diagonal and
identity blocks on it (the regularised whitening defines each view's metric). Its top-d eigenvectors
V (eigenvalues Lambda) give Carroll's shared variates g = Lambda^-1/2 V^T y (unit variance, uncorrelated),
and splitting V into per-view blocks U_i (d x d): Cov(y_i, g) = U_i Lambda^1/2. Carroll's per-view
estimate of g is the regression Lambda^1/2 U_i^T y_i, which is singular whenever a shared direction is
absent from view i. We use the orthogonal fit instead: O_i = argmax over orthogonal O of
tr(O^T Cov(y_i, g)) = polar(U_i Lambda^1/2), i.e. the rotation of view i's whitened units that best
predicts the shared variates. Every view then enters the shared space by an invertible map

    G_i = O_i^T W_i,        G_i^-1 = R_i^1/2 O_i     (closed form, no inverse),

and for N = 2 this is CCA exactly: C has eigenvectors (u_k, v_k)/sqrt2 with eigenvalues 1 + rho_k (K_01 =
U diag(rho) V^T), so O_0 O_1^T = U V^T and G_0^-1 G_1 = R_0^1/2 U V^T R_1^-1/2, CCA Merge's transform.
Common rotations of the shared space (eigh's freedom inside degenerate eigenspaces) cancel in everything
below.

**SUMCOR** (``variant="sumcor"``): maximise the sum of all pairwise correlations of the shared coordinates,
sum_{i != j} tr(O_i^T K_ij O_j) over orthogonal O_i (= tr(O^T C O) - N d), from the MAXVAR solution by the
generalised power method O_i <- polar(sum_j (C + s I)_ij O_j), all models at once (a monotone ascent, and
symmetric in the models, unlike a model-by-model sweep whose local optimum depends on their order). For
N = 2 it is again CCA.

**Map-back basis.** Merging averages the models in shared coordinates, W~ = sum_i w_i G_i,out W_i
G_i,in^-1, and maps back with one basis B per group: W = B_out W~ B_in^-1. This equals averaging
T_i W_i T_i^-1 with T_i = B G_i (the same B for every model), which is the Alignment returned. The shared
coordinates are not a good basis for the nonlinearity; B chooses in which unit basis it is applied:

* ``basis="reference"`` (default): B = G_ref^-1, so T_ref = I and T_i = R_ref^1/2 O_ref O_i^T R_i^-1/2 (the all-to-one
  form, with the mapping computed from all models; for N = 2 equal to CCA Merge).
* ``basis="mean"`` (reference-free; measured on real networks it merges to chance, see docs/results.md,
  so it is not the default): the rows of A_i = G_i^-1 are model i's units as linear
  functionals of the shared coordinates (x_i = A_i z). The naive B = mean_i A_i is *not* exact: for N
  permuted copies A_i = P_i A_0, so it gives B = (mean_i P_i) A_0, a doubly stochastic mix of units that ReLU
  does not commute with (and is singular, e.g. for a swap of two units). The units of different models
  have to be put in correspondence before averaging, and that can be done in the shared space: B is the
  consensus of the models' unit functionals, found by alternating (i) one linear assignment per model
  between its (normalised) functionals and the consensus' by cosine similarity and (ii) the consensus
  = mean_i Pi_i A_i of the matched functionals, until no assignment changes. The alternation is started
  from every model in turn and the consensus with the highest total matched similarity kept, so the result
  does not depend on the order of the models or on ``reference``. For permuted copies every Pi_i A_i equals
  A_0 up to one common permutation, so B = Pi A_0 and T_i = Pi P_i^T: the merged model is model 0 with its
  units permuted, exactly; with positively rescaled copies the consensus unit is a positive multiple of
  the common unit, exact too (as gamma -> 0 with ``"trace"``, for every gamma with ``"corr"``). B^-1 is
  applied by solving; a numerically singular consensus falls back to the reference basis with a warning.

Dead units (no variance on the probe) carry no correlation, so nothing determines where they go. As in
``cca_pair`` (dead units of B onto dead units of A, in order), the k-th dead unit of every model is treated
as perfectly correlated with the k-th dead unit of every other (K_ij[a, b] = 1 for such a pair; their
whitened coordinates are otherwise decoupled from everything). The dead units then form shared directions
of their own (eigenvalue 1 + (n_k - 1) for n_k models with a k-th dead unit) and each model's d - m live
units fill the remaining d - m shared directions. Without it, the top-d directions of C would all be live
ones, a model with m dead units would reach only d - m of them, and the polar factor would complete the rest
arbitrarily (in particular not independently of the order of the models). Directions that remain
undetermined -- a model's unpaired dead units (more than any other model has), rank-deficient probes, exactly
zero canonical correlations -- are completed arbitrarily here as in ``cca_pair`` (differently, so the N = 2
identity with CCA and the independence of the model order hold on the determined part only).

The consensus is an unweighted mean over the models; the client weights enter the average in the shared
space as usual.

Cost per group: one eigh of an Nd x Nd matrix (O(N^3 d^3)), N SVDs of d x d, and for ``basis="mean"`` about
N^2 x (iterations) assignments of d x d.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.linalg import (
    DTYPE,
    dead_units,
    polar,
    sym_powers,
    unit_scales,
)
from fedmerge.common.engine.matching import (
    Alignment,
    MatchInputs,
    check_all_pairs,
    check_reference,
)
from fedmerge.common.engine.stats import Statistics

__all__ = ["match_gcca", "VARIANTS", "BASES"]

VARIANTS = ("maxvar", "sumcor")
BASES = ("mean", "reference")
REGULARIZATIONS = ("trace", "corr")
_PRIOR = 1.0  # dead units: treated as perfectly correlated with their prior partners
_MAX_COND = 1e12  # consensus bases worse conditioned than this fall back to the reference basis


def _whitening(s: torch.Tensor, gamma: float, regularization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, W^-1) with W R W^T = I for the regularised covariance R (raw units)."""
    d = s.shape[0]
    eye = torch.eye(d, dtype=DTYPE)
    if regularization == "trace":
        sc = max(float(torch.trace(s)) / d, 1e-300)
        h, mh = sym_powers(s + gamma * sc * eye)
        return mh, h
    sd = unit_scales(s)[0]
    h, mh = sym_powers(s / torch.outer(sd, sd) + gamma * eye)
    return mh / sd[None, :], sd[:, None] * h  # W = R_std^-1/2 D^-1, W^-1 = D R_std^1/2


def _check(stats: Statistics, spec: MergeSpec, reference, gamma, variant, basis, regularization) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"gcca variant must be one of {VARIANTS}, got {variant!r}")
    if basis not in BASES:
        raise ValueError(f"gcca basis must be one of {BASES}, got {basis!r}")
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"gcca regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
    if gamma is None or not float(gamma) >= 0 or not np.isfinite(float(gamma)):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if not isinstance(stats, Statistics):
        raise ValueError(f"expected a Statistics object, got {type(stats).__name__}")
    n = stats.num_models
    check_reference(reference, n)
    check_all_pairs(stats, "gcca")
    for i, own in enumerate(stats.own):
        for g, grp in spec.groups.items():
            if g not in own or tuple(own[g].m2.shape) != (grp.dim, grp.dim):
                raise ValueError(f"statistics of model {i} do not match merge group {g} (d={grp.dim})")
    return n


def _blocks(stats: Statistics, g: int, n: int, gamma: float, regularization: str):
    """Whitening pairs and the whitened cross blocks K_ij (with the dead-unit prior) of one group."""
    covs = [stats.own[i][g].cov.to(DTYPE) for i in range(n)]
    whit = [_whitening(s, gamma, regularization) for s in covs]
    dead = [dead_units(s) for s in covs]
    k = {}
    for i in range(n):
        for j in range(i + 1, n):
            s_ij = stats.pair(i, j, g)[2].to(DTYPE)
            kij = whit[i][0] @ s_ij @ whit[j][0].T
            m = min(len(dead[i]), len(dead[j]))
            if m:
                kij[dead[i][:m], dead[j][:m]] += _PRIOR
            k[(i, j)], k[(j, i)] = kij, kij.T
    return whit, k


def _joint(k: dict, n: int, d: int) -> torch.Tensor:
    """The Nd x Nd block matrix C: identity blocks on the diagonal, K_ij off it."""
    c = torch.eye(n * d, dtype=DTYPE)
    for (i, j), kij in k.items():
        c[i * d:(i + 1) * d, j * d:(j + 1) * d] = kij
    return (c + c.T) / 2


def _blockwise_polar(m: torch.Tensor, n: int, d: int) -> list[torch.Tensor]:
    return [polar(m[i * d:(i + 1) * d]) for i in range(n)]


def _maxvar(c: torch.Tensor, n: int, d: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    evals, evecs = torch.linalg.eigh(c)
    lam = torch.clamp(evals[-d:], min=0)
    return _blockwise_polar(evecs[:, -d:] * torch.sqrt(lam)[None, :], n, d), evals  # polar(Cov(y_i, g))


def _sumcor(c: torch.Tensor, o: list[torch.Tensor], lam_min: float, max_iter: int, tol: float) -> list[torch.Tensor]:
    """Maximise f(O) = tr(O^T C O) = N d + sum_{i != j} tr(O_i^T K_ij O_j) over block-orthogonal O.

    Generalised power method (Journee et al., JMLR 2010): O <- blockwise polar((C + s I) O), all blocks at once
    (so the iterates do not depend on the order of the models). With s making C + s I positive semi-definite,
    f is convex and every step increases it; such steps are short, so each iteration first tries the
    undamped step (s = -1, i.e. O_i <- polar(sum_{j != i} K_ij O_j)) and keeps it when it increases f."""
    n, d = len(o), o[0].shape[0]
    shift = max(0.0, -lam_min) + 1e-12

    def value(x):
        return float(torch.sum(x * (c @ x)))

    stacked = torch.cat(o)
    f = value(stacked)
    for _ in range(max_iter):
        cx = c @ stacked
        cand = torch.cat(_blockwise_polar(cx - stacked, n, d))
        f_new = value(cand)
        if not f_new > f:
            cand = torch.cat(_blockwise_polar(cx + shift * stacked, n, d))
            f_new = value(cand)
        if f_new <= f:
            break
        stacked, done = cand, f_new - f <= tol * max(abs(f_new), 1e-300)
        f = f_new
        if done:
            break
    return [stacked[i * d:(i + 1) * d] for i in range(n)]


def _consensus(backs: list[torch.Tensor], max_iter: int = 50) -> torch.Tensor:
    """Consensus of the models' unit functionals (rows of each back-map A_i), see the module docstring."""
    n = len(backs)
    normed = [(a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)).numpy() for a in backs]
    best = None
    for start in range(n):
        cons = backs[start].numpy().copy()
        assign = [None] * n
        for _ in range(max_iter):
            cn = cons / np.maximum(np.linalg.norm(cons, axis=1, keepdims=True), 1e-300)
            new = []
            for i in range(n):
                _, cols = linear_sum_assignment(cn @ normed[i].T, maximize=True)  # consensus row c <- unit cols[c]
                new.append(cols)
            cons = sum(backs[i].numpy()[new[i]] for i in range(n)) / n
            done = all(a is not None and np.array_equal(a, b) for a, b in zip(assign, new))
            assign = new
            if done:
                break
        cn = cons / np.maximum(np.linalg.norm(cons, axis=1, keepdims=True), 1e-300)
        score = float(sum(np.sum(cn * normed[i][assign[i]]) for i in range(n)))
        if best is None or score > best[0] + 1e-9 * abs(best[0]):
            best = (score, cons)
    return torch.as_tensor(best[1], dtype=DTYPE)


def match_gcca(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, gamma: float = 0.1,
               variant: str = "maxvar", basis: str = "reference", regularization: str = "trace",
               max_iter: int = 100, tol: float = 1e-6) -> Alignment:
    """Generalised (multi-view) CCA Merge: every model mapped into one shared basis computed from all
    pairwise statistics, then back to one unit basis (see the module docstring for the derivation).

    variant: ``"maxvar"`` (Carroll's shared variates, one eigendecomposition) or ``"sumcor"`` (sum of pairwise
        correlations, generalised power method from MAXVAR; at most ``max_iter`` steps, relative ``tol``).
    basis: ``"reference"`` (default: the reference model's units, ``T_ref = I``) or ``"mean"`` (reference-free
        consensus of the models' units; ``reference`` is ignored; merges real networks to chance).
    gamma, regularization: the ridge, as in :func:`~fedmerge.common.engine.matching.cca_pair`.
    Needs cross statistics of every pair. Returns per group one float64 ``(T_i, T_i^-1)`` per model.
    """
    stats = inputs.need_stats("gcca")
    n = _check(stats, spec, reference, gamma, variant, basis, regularization)
    gamma = float(gamma)
    out: Alignment = {}
    for g, grp in spec.groups.items():
        d = grp.dim
        whit, k = _blocks(stats, g, n, gamma, regularization)
        c = _joint(k, n, d)
        o, evals = _maxvar(c, n, d)
        if variant == "sumcor":
            o = _sumcor(c, o, float(evals[0]), max_iter, tol)
        to_shared = [o[i].T @ whit[i][0] for i in range(n)]   # G_i
        backs = [whit[i][1] @ o[i] for i in range(n)]          # G_i^-1
        b = None
        if basis == "mean":
            b = _consensus(backs)
            if not float(torch.linalg.cond(b)) <= _MAX_COND:
                warnings.warn(f"gcca: consensus basis of merge group {g} is numerically singular; "
                              f"using model {reference}'s basis")
                b = None
        if b is None:
            b, b_inv = backs[reference], to_shared[reference]
            row = []
            for i in range(n):
                if i == reference:
                    eye = torch.eye(d, dtype=DTYPE)
                    row.append((eye, eye.clone()))
                else:
                    row.append((b @ to_shared[i], backs[i] @ b_inv))
        else:
            row = [(b @ to_shared[i], torch.linalg.solve(b, backs[i], left=False)) for i in range(n)]
        out[g] = row
    return out
