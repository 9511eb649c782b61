"""Label-free distillation of a merged model into the clients' ensemble, on the unlabelled probe.

After the merge (alignment, averaging, REPAIR or a BatchNorm reset), every parameter of the merged model is
fitted to the logit ensemble of the models it came from -- the upper bound a merge is measured against -- with a
KL loss at temperature ``temperature`` on augmented probe images (random shifts and horizontal flips of image
inputs; other inputs as they are). No labels are read: the teachers' average logits are the targets. The
teachers' logits are computed once per augmented view (``views`` passes of the probe per teacher, one teacher at
a time), so the teachers are never held at once and each step costs one forward and backward pass of the merged
model. The parameters kept are those with the lowest KL to the ensemble on the held-out probe slice (checked
every ``eval_every`` steps, un-augmented; early stopping after ``patience`` checks without improvement), so the
result is never further from the ensemble on that slice than the merge it starts from.

Cost: ``views * len(teachers)`` forward passes of the probe, then ``steps`` optimiser steps of the merged model
(measured in ``docs/results.md``, "Beyond the paper").
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmerge.common.engine.linalg import default_device
from fedmerge.common.engine.options import check_options, integer, is_number, number
from fedmerge.common.engine.selection import probe_logits
from fedmerge.common.wire.probe import Batches

__all__ = ["distill", "augment_views", "ensemble_logits", "OPTIONS", "check_distill_options"]


def augment_views(batches: Batches, views: int, seed: int = 0, shift: int = 4) -> torch.Tensor:
    """The probe inputs in ``views`` augmented copies, one tensor of ``views * n`` samples (view-major, samples in
    probe order, filled in place: the only copy held): view 0 is the probe as it is; the others shift each image
    by up to ``shift`` pixels (zero padding) and flip half of them horizontally, from a generator seeded with
    ``seed``. Inputs that are not images (N, C, H, W) have one view."""
    x, _ = batches.tensors()
    if x.dim() != 4:
        return x
    n, c, h, w = x.shape
    out = torch.empty((views * n, c, h, w), dtype=x.dtype)
    out[:n] = x
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, views):
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        for i0 in range(0, n, 512):   # a block of images at a time: the padded copy is never the whole probe
            i1 = min(n, i0 + 512)
            padded = F.pad(x[i0:i1], (shift, shift, shift, shift))
            rows = (dy[i0:i1, None] + torch.arange(h))[:, None, :, None].expand(i1 - i0, c, h, w + 2 * shift)
            cols = (dx[i0:i1, None] + torch.arange(w))[:, None, None, :].expand(i1 - i0, c, h, w)
            v = padded.gather(2, rows).gather(3, cols)
            out[k * n + i0:k * n + i1] = torch.where(flip[i0:i1, None, None, None], v.flip(3), v)
    return out


@torch.no_grad()
def ensemble_logits(teachers: Sequence[nn.Module], inputs: Sequence[torch.Tensor], weights: Sequence[float],
                    device, batch_size: int = 500) -> list[torch.Tensor]:
    """The ``weights``-weighted average of the teachers' logits on each tensor of ``inputs`` (on the CPU); the
    teachers are read one at a time (a lazily built sequence is built once per teacher) and each is put back on
    its device afterwards, also when a forward pass fails."""
    if len(weights) != len(teachers):
        raise ValueError(f"{len(weights)} weights for {len(teachers)} teachers")
    out: list[torch.Tensor | None] = [None for _ in inputs]
    for teacher, wt in zip(teachers, weights):
        if wt == 0:
            continue
        orig = next(iter(teacher.parameters()), torch.empty(0)).device
        try:
            teacher.eval().to(device)
            for k, x in enumerate(inputs):
                z = torch.cat([teacher(x[i:i + batch_size].to(device)).float().cpu()
                               for i in range(0, x.shape[0], batch_size)])
                out[k] = z * wt if out[k] is None else out[k].add_(z, alpha=wt)
        finally:
            teacher.to(orig)
    return out


#: The options of :func:`distill` a caller sets (``distill={...}`` of ``merge_models``), each with its check.
OPTIONS = {
    "steps": integer(0),
    "lr": number(0),
    "batch_size": integer(1),
    "views": integer(1),
    "temperature": number(0),
    "eval_every": integer(1),
    "patience": integer(1),
    "seed": integer(),
}


def check_distill_options(opts: dict) -> dict:
    """Distillation's options (``distill={...}``), checked: see :data:`OPTIONS`."""
    return check_options(opts, OPTIONS, "distill")


def _kl(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(target_logits / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def _held_kl(model: nn.Module, held: Batches, target: torch.Tensor, device) -> float:
    return float(_kl(probe_logits(model, held, device), target, 1.0))


def distill(merged: nn.Module, teachers: Sequence[nn.Module], fit: Batches, held: Batches,
            weights: Sequence[float] | None = None, steps: int = 1000, lr: float = 1e-3, batch_size: int = 128,
            views: int = 8, temperature: float = 1.0, eval_every: int = 25, patience: int = 4, seed: int = 0,
            device=None) -> tuple[nn.Module, dict]:
    """Fit ``merged`` (a copy; every parameter, Adam with ``lr``) to the teachers' weighted average logits on
    ``views`` augmented views of the probe slice ``fit``; early stopping on the KL to the ensemble on ``held``.
    Labels in the probe are not read. Returns (model, info) with the steps taken, the held-out KL before and at
    the kept parameters, and whether it improved."""
    if len(teachers) < 1:
        raise ValueError("distillation needs the models that were merged (teachers)")
    check_distill_options({"steps": steps, "lr": lr, "batch_size": batch_size, "views": views,
                           "temperature": temperature, "eval_every": eval_every, "patience": patience, "seed": seed})
    if fit is None or held is None or fit.num_samples == 0 or held.num_samples == 0:
        raise ValueError("distillation needs a probe with a held-out slice")
    n = len(teachers)
    if weights is not None and (len(weights) != n or any(not is_number(x) or x < 0 for x in weights) or sum(weights) <= 0):
        raise ValueError(f"distill weights must be {n} non-negative numbers with a positive sum, got {weights}")
    dev = default_device(device)
    w = [1.0 / n] * n if weights is None else [float(x) / sum(weights) for x in weights]
    fit_x = augment_views(fit, views, seed)
    held_x, _ = held.tensors()
    fit_t, held_t = ensemble_logits(teachers, [fit_x, held_x], w, dev)
    model = copy.deepcopy(merged).to(dev).eval()   # eval: BatchNorm keeps its (reset) statistics
    start = best_kl = _held_kl(model, held, held_t, dev)
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(fit_x.shape[0], generator=gen)
    pos, bad, step = 0, 0, 0
    for step in range(1, steps + 1):
        if pos + batch_size > order.numel():
            order, pos = torch.randperm(fit_x.shape[0], generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = _kl(model(fit_x[idx].to(dev)).float(), fit_t[idx].to(dev), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            kl = _held_kl(model, held, held_t, dev)
            if kl < best_kl - 1e-6:
                best_kl, bad = kl, 0
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    break
    model.load_state_dict(best)
    return model.cpu().eval(), {"steps": step, "held_kl_start": start, "held_kl_best": best_kl,
                                "improved": best_kl < start - 1e-6, "views": fit_x.shape[0] // fit.num_samples,
                                "lr": lr}
