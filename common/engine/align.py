"""Apply an alignment to a model's parameters and average aligned models.

For a layer with output group o and input layout [(g_1, c_1), ..., (g_k, c_k)] (x ``repeat`` spatial
positions after a flatten), model i's weight becomes ``T_i,o  W_i  blockdiag(T_i,g1^-1, ...)`` (conv kernels
per spatial tap), its bias ``T_i,o b``. BatchNorm vectors (weight, bias, running mean) transform like outputs,
its running variance through ``(T o T)(var + eps) - eps``: exact for permutations and positive rescalings,
and re-estimated anyway by a BatchNorm reset after a general (CCA) merge.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fedmerge.common.engine.graph import FIXED, LayerSpec, MergeSpec, Segment
from fedmerge.common.engine.matching import Alignment

StateDict = dict[str, torch.Tensor]


def _block(segs: Sequence[Segment], mats: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Block-diagonal matrix over the segments (identity for fixed ones); None when all are identity."""
    if all(s.group == FIXED or s.group not in mats for s in segs):
        return None
    total = sum(s.size for s in segs)
    out = torch.zeros(total, total, dtype=torch.float64)
    o = 0
    for s in segs:
        m = mats.get(s.group) if s.group != FIXED else None
        out[o:o + s.size, o:o + s.size] = m if m is not None else torch.eye(s.size, dtype=torch.float64)
        o += s.size
    return out


def align_state(state: StateDict, spec: MergeSpec, t: dict[int, torch.Tensor], t_inv: dict[int, torch.Tensor],
                bn_eps: dict[str, float] | None = None) -> StateDict:
    """Express one model's parameters in the shared basis given its per-group (T, T^-1)."""
    out = dict(state)
    for layer in spec.layers.values():
        _align_layer(out, layer, t, t_inv, (bn_eps or {}).get(layer.name, 1e-5))
    return out


def _align_layer(sd: StateDict, layer: LayerSpec, t, t_inv, eps: float) -> None:
    t_out = _block(layer.out, t)
    p = layer.name + "."
    if layer.kind == "bn":
        if t_out is None:
            return
        for k in ("weight", "bias", "running_mean"):
            if p + k in sd:
                v = sd[p + k]
                sd[p + k] = (t_out @ v.to(torch.float64)).to(v.dtype)
        if p + "running_var" in sd:
            v = sd[p + "running_var"]
            new = (t_out * t_out) @ (v.to(torch.float64) + eps) - eps
            sd[p + "running_var"] = torch.clamp(new, min=0).to(v.dtype)
        return
    w = sd[p + "weight"]
    w64 = w.to(torch.float64)
    if t_out is not None:
        w64 = torch.tensordot(t_out, w64, dims=([1], [0]))
        if sd.get(p + "bias") is not None:
            b = sd[p + "bias"]
            sd[p + "bias"] = (t_out @ b.to(torch.float64)).to(b.dtype)
    t_in = _block(layer.inp, t_inv)
    if t_in is not None:
        if layer.kind == "conv":  # (O, I, kh, kw): contract I with T_in^-1
            w64 = torch.einsum("oikl,ij->ojkl", w64, t_in)
        else:  # linear (O, I*repeat), channel-major
            o_dim = w64.shape[0]
            w64 = w64.reshape(o_dim, t_in.shape[0], layer.repeat)
            w64 = torch.einsum("ocr,cd->odr", w64, t_in).reshape(o_dim, -1)
    sd[p + "weight"] = w64.to(w.dtype)


def average_states(states: Sequence[StateDict], weights: Sequence[float], reference: int = 0) -> StateDict:
    """Weighted average of floating-point entries; integer buffers (BN counters) from the reference."""
    total = None
    for w, s in zip(weights, states):
        total = accumulate(total, s, w)
    return finish_average(total, states[reference])


def aligned_states(states: Sequence[StateDict], spec: MergeSpec, alignment: Alignment,
                   bn_eps: dict[str, float] | None = None) -> list[StateDict]:
    """Every model's parameters expressed in the reference basis."""
    return [aligned_row(sd, spec, {g: pairs[i] for g, pairs in alignment.items()}, bn_eps)
            for i, sd in enumerate(states)]


def aligned_row(state, spec: MergeSpec, row: dict, bn_eps) -> dict:
    """One model's parameters in the shared basis, from its ``{group: (T, T^-1)}``."""
    return align_state(state, spec, {g: p[0] for g, p in row.items()}, {g: p[1] for g, p in row.items()}, bn_eps)


def accumulate(total: dict | None, state: dict, weight: float) -> dict:
    """Running weighted sum of the floating-point entries in float64, in model order (the sum
    :func:`~fedmerge.common.engine.align.average_states` forms, without holding the summands)."""
    if total is None:
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items() if v.is_floating_point()}
    for k, acc in total.items():
        acc += weight * state[k].to(torch.float64)
    return total


def finish_average(total: dict, reference_state: dict) -> dict:
    """The averaged parameters in the reference's dtypes; integer buffers (BN counters) from the reference."""
    return {k: total[k].to(v.dtype) if v.is_floating_point() else v.clone() for k, v in reference_state.items()}


def merge_states(states: Sequence[StateDict], spec: MergeSpec, alignment: Alignment, weights: Sequence[float],
                 reference: int = 0, bn_eps: dict[str, float] | None = None) -> StateDict:
    """Align every model with its transforms and average: the merged parameters."""
    return average_states(aligned_states(states, spec, alignment, bn_eps), weights, reference)


# --- BatchNorm folded into its producer: exact for any invertible transform --------------------------------------
# A general transform T (CCA) does not commute with a BatchNorm's per-unit scale: T diag(s) != diag(s') T. Folding
# each BatchNorm into the conv/linear that feeds it (eval mode: W <- diag(s) W, s = weight / sqrt(var + eps); the
# shift moves into the BatchNorm's bias) leaves BatchNorms that only add a bias, which transforms like any output
# vector (T b). The merged model then computes exactly the average of the aligned folded models.

def _folded(spec: MergeSpec):
    """The (conv/linear layer, its BatchNorm) pairs that folding touches."""
    return [(layer, layer.norm) for layer in spec.layers.values()
            if layer.kind in ("conv", "linear") and layer.norm is not None]


def _unit_bn(sd: StateDict, bn: str, eps: float) -> None:
    """A folded BatchNorm's constant parts: weight 1, running mean 0, running variance 1 - eps."""
    b = bn + "."
    sd[b + "weight"] = torch.ones_like(sd[b + "weight"])
    sd[b + "running_mean"] = torch.zeros_like(sd[b + "running_mean"])
    sd[b + "running_var"] = torch.full_like(sd[b + "running_var"], 1.0 - eps)


def fold_batchnorm(state: StateDict, spec: MergeSpec, bn_eps: dict[str, float]) -> StateDict:
    """``state`` with every BatchNorm that directly follows a conv/linear folded into it: the layer's weight
    scaled per output unit, its bias (if any) zero, the BatchNorm a pure shift (weight 1, running mean 0,
    running variance 1 - eps, bias = the folded shift). The same function in eval mode."""
    out = dict(state)
    for layer, bn in _folded(spec):
        p, b = layer.name + ".", bn + "."
        if b + "weight" not in out or b + "bias" not in out:
            raise ValueError(f"fold_batchnorm needs an affine BatchNorm ('{bn}' has no weight/bias)")
        eps = bn_eps.get(bn, 1e-5)
        w = out[p + "weight"]
        mean, var = out[b + "running_mean"].to(torch.float64), out[b + "running_var"].to(torch.float64)
        s = out[b + "weight"].to(torch.float64) / torch.sqrt(var + eps)
        bias = out.get(p + "bias")
        shift = out[b + "bias"].to(torch.float64) - s * mean + (s * bias.to(torch.float64) if bias is not None else 0.0)
        out[p + "weight"] = (w.to(torch.float64) * s.view((-1,) + (1,) * (w.dim() - 1))).to(w.dtype)
        if bias is not None:
            out[p + "bias"] = torch.zeros_like(bias)
        _unit_bn(out, bn, eps)
        out[b + "bias"] = shift.to(out[b + "bias"].dtype)
    return out


def unit_batchnorm(state: StateDict, spec: MergeSpec, bn_eps: dict[str, float]) -> StateDict:
    """After aligning and averaging folded states: the folded BatchNorms' constant parts (weight 1, running
    mean 0, running variance 1 - eps, the same in every folded model) set back to those constants (the
    alignment moves only their bias, the one part that transforms)."""
    out = dict(state)
    for _, bn in _folded(spec):
        _unit_bn(out, bn, bn_eps.get(bn, 1e-5))
    return out
