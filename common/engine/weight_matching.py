"""Weight-based matching methods: Git Re-Basin weight matching (Ainsworth et al., ICLR 2023; the published
objective -- no BatchNorm running statistics, no conv/linear biases -- unless asked otherwise) and MergeMany
(the same paper's many-models algorithm).

They read the layer layout from the :class:`~fedmerge.common.engine.graph.MergeSpec` only (output segments, input
segments with the flatten ``repeat``, BatchNorm vectors, biases), so they work on any architecture the spec
supports with no per-architecture code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedmerge.common.engine.graph import FIXED, LayerSpec, MergeSpec
from fedmerge.common.engine.linalg import DTYPE
from fedmerge.common.engine.matching import Alignment, MatchInputs, check_reference

__all__ = ["match_weights", "match_merge_many"]

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


def match_weights(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, max_iter: int = 100, seed: int = 0,
                  wm_biases: bool = False, wm_running_stats: bool = False) -> Alignment:
    """Git Re-Basin weight matching, all-to-one: each model permuted to maximise ``sum_layers <W_ref, P W_i>``
    against the reference, by coordinate descent over groups. ``T`` is the permutation matrix, ``T_inv = T^T``.

    The objective is the published one by default: conv/linear weights on both axes and BatchNorm's weight
    and bias. BatchNorm running statistics are left out, as in Git Re-Basin's code (they are buffers, not
    parameters, there), and so are conv/linear biases, as in align-n-merge's VGG variant (nets whose hidden
    layers have no bias -- ResNets -- are unaffected; Git Re-Basin's MLP objective includes biases).
    ``wm_biases=True`` / ``wm_running_stats=True`` put them back (the objective before issue 16 had both)."""
    states = inputs.need_states("weight_matching")
    layers = _check_states(states, spec, max_iter, wm_biases, wm_running_stats)
    reference = check_reference(reference, len(states))
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


def match_merge_many(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, max_iter: int = 20, seed: int = 0,
                     inner_iter: int = 100, wm_biases: bool = False, wm_running_stats: bool = False) -> Alignment:
    """MergeMany (Ainsworth et al. 2023): start from all-to-one weight matching to ``reference``; then, in
    rounds over the models in random order, weight-match model i to the average of all the other (currently
    aligned) models, until a round changes no permutation (or ``max_iter`` rounds). The shared basis is only
    defined up to one common permutation; it is fixed by giving ``reference`` the identity (which changes
    nothing in the merged model). The objective is :func:`match_weights`' (``wm_biases``,
    ``wm_running_stats``)."""
    states = inputs.need_states("merge_many")
    layers = _check_states(states, spec, max_iter, wm_biases, wm_running_stats)
    if not (isinstance(inner_iter, (int, np.integer)) and inner_iter >= 1):
        raise ValueError(f"inner_iter must be a positive integer, got {inner_iter!r}")
    n = len(states)
    reference = check_reference(reference, n)
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
