"""NP Merge (non-uniform parameter-wise merging, Orozco Camacho et al. 2024), after alignment.

Every parameter entry of the merged model is a convex combination of the aligned models' entries,
``W = sum_i softmax(theta)_i * W_i`` (for two models: ``alpha * W_A + (1 - alpha) * W_B`` with
``alpha = sigmoid(theta)``), and ``theta`` is learned by gradient descent on a labelled slice of the probe
(the only data the server has). ``theta`` starts at the plain (weighted) average; the coefficients kept are
those with the lowest loss on a separate held-out slice (early stopping), so the result is never worse than
plain averaging on that slice. The labelled slices must be images the clients did not train on: on their
own training images the models are already fit, the held-out loss does not improve, and a warning says so.

``granularity``: one coefficient per model for every output unit of each parameter (``"unit"``, the default),
for every parameter entry (``"element"``, the method as published) or per parameter tensor (``"tensor"``). Per
unit measured better: on three pairs of VGG11 x0.25 80/20 clients, after REPAIR, 73.6 +- 0.4% vs 68.5 +- 1.9%
per entry, which fits the 1,600 labelled probe images and stops early (``docs/results.md``). ``affine``: a fixed
per-unit affine map applied to the merged layers, ``{layer: (scale, shift)}`` (REPAIR's, as
:func:`fedmerge.common.engine.repair.repair_to` returns it): the layer's merged weight is ``scale * W`` and its bias
``scale * b + shift``, so that the search starts at the repaired merge (REPAIR first, then NP Merge).
"""
from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fedmerge.common.engine.linalg import default_device
from fedmerge.common.engine.options import check_options, integer, number
from fedmerge.common.progress import LOGGER
from fedmerge.common.wire.probe import Batches

__all__ = ["np_merge", "GRANULARITIES", "OPTIONS", "check_np_merge_options"]

#: How finely NP Merge's coefficients vary: per parameter entry, per output unit, per parameter tensor.
GRANULARITIES = ("element", "unit", "tensor")


@torch.no_grad()
def _held_loss(model, params, buffers, held: Batches, dev) -> float:
    total, n = 0.0, 0
    for x, y in held:
        out = functional_call(model, {**params, **buffers}, (x.to(dev),))
        total += F.cross_entropy(out, y.to(dev), reduction="sum").item()
        n += y.numel()
    return total / max(n, 1)


def np_merge(template: nn.Module, aligned: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
             fit: Batches, held: Batches, steps: int = 200, lr: float = 0.05, eval_every: int = 20,
             patience: int = 3, device=None, granularity: str = "unit",
             affine: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[nn.Module, dict]:
    """Learn per-parameter merge coefficients over ``aligned`` state dicts; returns (model, info)."""
    if not fit.has_labels or not held.has_labels:
        raise ValueError("NP Merge needs a labelled probe (inputs and labels) to learn merge coefficients")
    if len(aligned) < 2:
        raise ValueError("NP Merge needs at least 2 aligned models")
    check_np_merge_options({"steps": steps, "lr": lr, "eval_every": eval_every, "patience": patience,
                            "granularity": granularity})
    dev = default_device(device)
    model = copy.deepcopy(template).to(dev).eval()
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.to(dev) for n, b in model.named_buffers()}
    # buffers (BN running stats, fixed heads) from the weighted average; BN is re-estimated afterwards
    for n in buffers:
        if buffers[n].is_floating_point():
            buffers[n] = sum(w * s[n].to(dev, torch.float32) for w, s in zip(weights, aligned)).to(buffers[n].dtype)
    stacked = {n: torch.stack([s[n].to(dev, torch.float32) for s in aligned]) for n in names}
    w = torch.tensor(list(weights), dtype=torch.float32, device=dev)
    init = torch.log(w / w.sum())
    theta = {n: (init.view(-1, *([1] * (stacked[n].dim() - 1))) * torch.ones(_coef_shape(stacked[n], granularity),
                                                                              device=dev)).requires_grad_()
             for n in names}
    opt = torch.optim.Adam(theta.values(), lr=lr)
    maps = _affine_maps(affine or {}, names, stacked, dev)

    def combine(th):
        out = {}
        for n in names:
            p = (torch.softmax(th[n], 0) * stacked[n]).sum(0)
            scale, shift = maps.get(n, (None, None))
            out[n] = p if scale is None else p * scale + (0 if shift is None else shift)
        return out

    def params():
        return combine(theta)

    with torch.no_grad():
        best_loss = start_loss = _held_loss(model, params(), buffers, held, dev)
    best = {n: t.detach().clone() for n, t in theta.items()}
    bad, step = 0, 0
    batches = itertools.cycle(list(fit))
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = F.cross_entropy(functional_call(model, {**params(), **buffers}, (x.to(dev),)), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            hl = _held_loss(model, params(), buffers, held, dev)
            if hl < best_loss - 1e-6:
                best_loss, bad = hl, 0
                best = {n: t.detach().clone() for n, t in theta.items()}
            else:
                bad += 1
                if bad >= patience:
                    break
    with torch.no_grad():
        final = combine(best)
        out = copy.deepcopy(template).cpu()
        sd = out.state_dict()
        for n in names:
            sd[n] = final[n].cpu().to(sd[n].dtype)
        for n, b in buffers.items():
            sd[n] = b.cpu()
        out.load_state_dict(sd)
    improved = best_loss < start_loss - 1e-6
    if steps > 0 and not improved:
        LOGGER.warning("NP Merge: the held-out probe loss never improved on the plain average (%.4f after %d "
                       "steps); the plain average is kept. NP Merge needs labelled probe images the clients did "
                       "not train on: on their own training images the models are already fit.", start_loss, step)
    return out.eval(), {"steps": step, "held_loss_start": start_loss, "held_loss_best": best_loss,
                        "improved": improved, "granularity": granularity, "after_repair": bool(affine)}


#: The options of :func:`np_merge` a caller sets (``np_merge={...}`` of ``merge_models``), each with its check.
OPTIONS = {
    "steps": integer(0),
    "lr": number(0),
    "eval_every": integer(1),
    "patience": integer(1),
    "granularity": (lambda v: v in GRANULARITIES, f"one of {list(GRANULARITIES)}"),
}


def check_np_merge_options(opts: dict) -> dict:
    """NP Merge's options (``np_merge={...}``), checked: see :data:`OPTIONS`."""
    return check_options(opts, OPTIONS, "np_merge")


def _coef_shape(stacked: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """The shape of one parameter's coefficient logits (models first), broadcast against ``stacked``."""
    if granularity == "element":
        return tuple(stacked.shape)
    if granularity == "unit" and stacked.dim() >= 2:
        return (stacked.shape[0], stacked.shape[1]) + (1,) * (stacked.dim() - 2)
    return (stacked.shape[0],) + (1,) * (stacked.dim() - 1)


def _affine_maps(affine: dict, names: list[str], stacked: dict, dev) -> dict[str, tuple]:
    """``{parameter: (scale, shift)}`` from per-layer ``(scale, shift)``: a layer's weight gets its scale, its bias
    the scale and the shift."""
    maps = {}
    for layer, (scale, shift) in affine.items():
        w, b = f"{layer}.weight", f"{layer}.bias"
        if w not in stacked:
            raise ValueError(f"affine map for {layer!r}: the model has no parameter {w!r}")
        shape = (-1,) + (1,) * (stacked[w].dim() - 2)
        maps[w] = (scale.to(dev, torch.float32).view(shape), None)
        if b in stacked:
            maps[b] = (scale.to(dev, torch.float32), shift.to(dev, torch.float32))
    return {n: m for n, m in maps.items() if n in names}
