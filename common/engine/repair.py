"""After the average: BatchNorm reset and REPAIR (Jordan et al., 2023), the two ways the merge restores its units'
statistics on the probe."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from fedmerge.common.engine.graph import FIXED, MergeSpec
from fedmerge.common.engine.linalg import default_device
from fedmerge.common.engine.stats import Moments
from fedmerge.common.wire.probe import Batches

__all__ = ["REPAIR_TARGETS", "has_batchnorm", "reset_bn_stats", "check_repair_target", "repair_target_weights",
           "repair_layers", "output_moments", "add_repair_targets", "apply_repair", "repair_to"]

#: What REPAIR gives every merged unit (``repair_target``): ``"average"`` the (merge-weighted) average of the
#: aligned models' pre-activation mean and variance (REPAIR as Jordan et al. 2023 define it for interpolation;
#: this project's behaviour since REPAIR was added); ``"reference"`` the aligned reference model's own mean and
#: variance (CCA Merge, App. D: the merged model's statistics are repaired to the reference's).
REPAIR_TARGETS = ("average", "reference")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (then the merge re-estimates their statistics by default)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Batches, device=None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average)."""
    dev = default_device(device)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    orig_device = next(iter(model.parameters())).device
    model.eval().to(dev)
    saved = []
    for bn in bns:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for x, _ in batches:
        model(x.to(dev))
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    return model.eval().to(orig_device)


def check_repair_target(target) -> None:
    """``target`` must be one of :data:`REPAIR_TARGETS` (ValueError otherwise)."""
    if target not in REPAIR_TARGETS:
        raise ValueError(f"unknown repair_target {target!r}; choose one of {list(REPAIR_TARGETS)}")


def repair_target_weights(weights: Sequence[float], target: str = "average", reference: int = 0) -> list[float]:
    """The weight of each model's aligned statistics in REPAIR's target: the merge weights for ``"average"``,
    all of it on ``reference`` for ``"reference"``."""
    check_repair_target(target)
    if not 0 <= reference < len(weights):
        raise ValueError(f"reference {reference} is not a model index in [0, {len(weights)})")
    if target == "average":
        return [float(x) for x in weights]
    return [1.0 if i == reference else 0.0 for i in range(len(weights))]


class _Repaired(nn.Module):
    def __init__(self, layer: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.layer = layer
        bn_cls = nn.BatchNorm2d if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)) else nn.BatchNorm1d
        self.bn = bn_cls(mean.numel(), momentum=None).to(layer.weight.device)
        self.bn.weight.data.copy_(std.float())
        self.bn.bias.data.copy_(mean.float())

    def forward(self, x):
        return self.bn(self.layer(x))


def repair_layers(spec: MergeSpec, folded_bn: bool = False) -> list[str]:
    """The layers whose outputs REPAIR restores: conv/linear without a BatchNorm; with ``folded_bn`` also the
    folded BatchNorms (pure shifts after :func:`~fedmerge.common.engine.align.fold_batchnorm`), whose outputs are
    their producers' folded outputs."""
    return [l.norm if l.norm is not None else l.name for l in spec.layers.values()
            if l.kind in ("conv", "linear") and l.out[0].group != FIXED and (l.norm is None or folded_bn)]


@torch.no_grad()
def output_moments(model: nn.Module, names: list[str], batches: Batches, device) -> dict[str, Moments]:
    mods = dict(model.named_modules())
    acc = {n: Moments(0, None, None) for n in names}
    hooks = []

    def hook(name):
        def fn(_m, _i, out):
            x = out if out.dim() == 2 else out.transpose(0, 1).reshape(out.shape[1], -1).T
            acc[name] = acc[name].combine(Moments.of(x))
        return fn

    for n in names:
        hooks.append(mods[n].register_forward_hook(hook(n)))
    try:
        model.eval().to(device)
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: Moments(m.n, m.mean.cpu(), m.m2.cpu()) for n, m in acc.items()}



def add_repair_targets(targets: dict, spec: MergeSpec, names: list[str], row: dict, moms: dict[str, Moments],
                        weight: float) -> None:
    """Add one model's output statistics, seen through its transforms ``row`` (mean ``T mu``, variance
    ``diag(T C T^T)``), with ``weight`` to REPAIR's per-layer targets."""
    for n in names:
        t = row[spec.layers[n].out[0].group][0]
        mean = t @ moms[n].mean
        var = torch.clamp(torch.einsum("ij,jk,ik->i", t, moms[n].cov, t), min=0)
        pm, pv = targets.get(n, (torch.zeros(0), torch.zeros(0)))
        targets[n] = (mean * weight + (pm if pm.numel() else 0), var * weight + (pv if pv.numel() else 0))


@torch.no_grad()
def apply_repair(merged: nn.Module, models: Sequence[nn.Module], spec: MergeSpec, alignment, weights,
                 batches: Batches, device, target: str = "average", reference: int = 0,
                 folded_bn: bool = False) -> nn.Module:
    """REPAIR (Jordan et al., 2023): give every merged unit a target pre-activation mean and variance, by a
    temporary BatchNorm re-estimated on the probe and folded into the layer.

    The target (:func:`repair_target_weights`): ``"average"`` the ``weights``-weighted average of the aligned
    endpoint models' per-unit means and variances (unit j of model i seen through its alignment ``T_i``: mean
    ``T_i mu_i``, variance ``diag(T_i C_i T_i^T)``); ``"reference"`` those of model ``reference`` alone (the paper's
    App. D; with CCA and permutations the reference's transform is the identity, so these are its own units'
    statistics). All BatchNorms are estimated in one pass (train mode, batch statistics), as upstream REPAIR
    does: a unit's input in that pass is normalised with its batch's statistics, not the folded ones, so units
    after the first repaired layer match their target up to that difference."""
    names = repair_layers(spec, folded_bn)
    if not names:
        return merged
    tw = repair_target_weights(weights, target, reference)
    targets: dict = {}
    for i, m in enumerate(models):
        if tw[i] == 0:
            continue  # no share in the target: no forward pass
        orig = next(iter(m.parameters())).device
        moms = output_moments(m, names, batches, device)
        m.to(orig)
        add_repair_targets(targets, spec, names, {g: pairs[i] for g, pairs in alignment.items()}, moms, tw[i])
    return repair_to(merged, names, targets, batches, device)


@torch.no_grad()
def repair_to(merged: nn.Module, names: list[str], targets: dict, batches: Batches, device,
              affine: dict | None = None) -> nn.Module:
    """Fold REPAIR's per-layer (mean, variance) ``targets`` into ``merged`` (see :func:`apply_repair`). When
    ``affine`` is a dict, it receives each repaired layer's per-unit map ``(scale, shift)``: the repaired weight
    is ``scale * W`` and bias ``scale * b + shift``."""
    if not names:
        return merged
    mods = dict(merged.named_modules())
    wrapped = {}
    for n in names:
        layer = mods[n]
        if layer.bias is None:
            continue  # nowhere to put the shift without changing the architecture
        parent_name, _, attr = n.rpartition(".")
        parent = mods[parent_name] if parent_name else merged
        mean, var = targets[n]
        wrapper = _Repaired(layer, mean, torch.sqrt(var + 1e-5))
        setattr(parent, attr, wrapper)
        wrapped[n] = (parent, attr, wrapper)
    try:
        merged.eval().to(device)
        for _, _, wr in wrapped.values():
            wr.bn.train()
        for x, _ in batches:
            merged(x.to(device))
    finally:
        for n, (parent, attr, wr) in wrapped.items():
            bn, layer = wr.bn, wr.layer
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(scale.view(shape))
            layer.bias.copy_((layer.bias - bn.running_mean) * scale + bn.bias)
            if affine is not None:
                affine[n] = (scale.detach().cpu().clone(), (bn.bias - bn.running_mean * scale).detach().cpu().clone())
            setattr(parent, attr, layer)
    return merged.cpu()
