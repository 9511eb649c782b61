"""Derive a model's merge graph from ``torch.fx``: which tensors share a feature basis.

A *group* is one feature basis that can be re-expressed by an invertible transform: the output units of a
layer, plus everything that is elementwise/BatchNorm/pooling-equivalent to them, plus every layer that adds
into the same residual stream. Groups touching the model's input or output are *fixed* (identity).

For every weight-bearing layer the spec records which group its output axis lives in and how its input axis
is laid out (a concatenation of groups, possibly flattened over ``repeat`` spatial positions). Merging code
only ever reads this spec, so a new architecture needs no new code; an op the rules below do not cover
raises :class:`UnsupportedModelError` naming the node and the module it came from (never a silent identity).

Statistics are measured at *sites*: for each group, the tensors that leave the pointwise chain
(conv -> BN -> ReLU ends at a pooling layer, a consumer, or a residual stream's post-add activation).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

FIXED = 0  # the group of the model's input and output: never transformed


class UnsupportedModelError(ValueError):
    """The model contains an op or a layout that fedmerge cannot merge; the message names it."""


@dataclass(frozen=True)
class Segment:
    group: int  # FIXED (0) or a group id
    size: int


@dataclass
class LayerSpec:
    """A layer whose parameters transform: conv/linear (out axis + input layout) or BatchNorm (vectors)."""

    name: str
    kind: str  # "conv" | "linear" | "bn"
    out: tuple[Segment, ...]  # layout of the output axis (one segment for conv/linear)
    inp: tuple[Segment, ...] = ()  # layout of the input axis (conv/linear)
    repeat: int = 1  # linear after flatten: input index = channel * repeat + position
    norm: str | None = None  # conv/linear: the BatchNorm applied directly to its output, if any


@dataclass
class Group:
    id: int
    dim: int
    producers: list[str] = field(default_factory=list)  # layers writing this basis (conv/linear/bn names)
    consumers: list[str] = field(default_factory=list)  # layers reading it
    sites: list[str] = field(default_factory=list)  # fx node names where statistics are measured


@dataclass
class MergeSpec:
    groups: dict[int, Group]  # the transformable groups only (FIXED excluded)
    layers: dict[str, LayerSpec]  # in execution order
    site_nodes: list[str]  # all site node names, in execution order

    def describe(self) -> str:
        lines = []
        for g in self.groups.values():
            lines.append(f"group {g.id} (d={g.dim}): producers={g.producers} consumers={g.consumers} sites={g.sites}")
        return "\n".join(lines)


# --- op tables -------------------------------------------------------------------------------------------
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
    nn.Hardtanh, nn.Softplus, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.PReLU,
)
_SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_POINTWISE_FUNCS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, torch.tanh, torch.sigmoid, F.dropout,
    F.hardswish, F.mish, F.softplus,
}
_SPATIAL_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}
_SCALE = {operator.mul, operator.imul, operator.truediv, torch.mul}
_FLATTEN_FUNCS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_SHAPE_METHODS = {"size", "dim"}


class _UF:
    def __init__(self):
        self.parent = [FIXED]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == FIXED:  # FIXED stays the root so a fixed group is recognisable
            ra, rb = rb, ra
        self.parent[rb] = ra


@dataclass
class _Val:
    """What the propagation knows about a tensor: its channel layout and its spatial repeat if flattened."""

    segs: tuple[Segment, ...]
    repeat: int = 1  # > 1: flattened (N, C*repeat), channel-major
    ndim: int = 2


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return f"node '{node.name}' in module '{path}'"
    return f"node '{node.name}'"


def _is_fixed_head(mod: nn.Module) -> bool:
    return bool(getattr(mod, "fedmerge_fixed_input", False)) or type(mod).__name__ == "ClassEmbeddingHead"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_fixed_head(m) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (a fixed class-embedding head stays one leaf)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Models must be traceable "
            "(no Python control flow on tensor values)."
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


RESIDUAL_SITES = ("all", "last")


def derive_spec(model: nn.Module, example: torch.Tensor, *, residual_sites: str = "all") -> MergeSpec:
    """Trace ``model`` on an example batch (shapes) and derive its :class:`MergeSpec`.

    residual_sites: where a residual stream (a basis that several blocks add into) is measured: ``"all"`` its
    states after every block, pooled into one set of statistics (default), or ``"last"`` only the state at
    the end of the stream (the end of the stage, as upstream CCA Merge / ZipIt! measure ResNets)."""
    if residual_sites not in RESIDUAL_SITES:
        raise ValueError(f"residual_sites must be one of {RESIDUAL_SITES}, got {residual_sites!r}")
    gm = trace(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example[:2].to(next(iter(model.parameters())).device))
    model.train(was_training)
    modules = dict(gm.named_modules())
    uf = _UF()
    vals: dict[str, _Val | None] = {}
    layers: list[LayerSpec] = []
    pointwise_like: set[str] = set()  # nodes that continue a pointwise chain (BN, activations)
    spatial_nodes: set[str] = set()  # pooling outputs: measured before the pooling, not after
    add_nodes: set[str] = set()
    group_nodes: dict[str, int] = {}  # producer/pointwise/add outputs with one segment -> group

    def shape(n: fx.Node):
        meta = n.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def val(a):
        return vals.get(a.name) if isinstance(a, fx.Node) else None

    def tensor_args(node):
        return [a for a in _flatten_args(node.args) if isinstance(a, fx.Node) and vals.get(a.name) is not None]

    def fail(node, what):
        raise UnsupportedModelError(f"cannot merge {_where(node)}: {what}")

    for node in gm.graph.nodes:
        out_shape = shape(node)
        if node.op == "placeholder":
            if out_shape is None:
                vals[node.name] = None
                continue
            c = out_shape[1] if len(out_shape) > 1 else 1
            vals[node.name] = _Val((Segment(FIXED, c),), 1, len(out_shape))
            continue
        if node.op == "output":
            for a in _flatten_args(node.args):
                v = val(a)
                if v is not None:
                    for s in v.segs:
                        uf.union(FIXED, s.group)
            continue
        if node.op == "get_attr":
            fail(node, f"direct use of parameter/buffer '{node.target}' outside a module is not supported")

        ins = tensor_args(node)
        if node.op != "call_module" and not ins:
            # no feature tensor involved (shape arithmetic, constants)
            vals[node.name] = None
            continue
        if out_shape is None and node.op != "call_module":
            if node.op == "call_method" and node.target in _SHAPE_METHODS:
                vals[node.name] = None
                continue
            if node.op == "call_function" and node.target is getattr:
                vals[node.name] = None
                continue
            fail(node, f"op {node.target!r} returns a non-tensor value from a feature tensor")

        if node.op == "call_module":
            mod = modules[node.target]
            v = val(node.args[0]) if node.args else None
            if v is None:
                fail(node, f"{type(mod).__name__} applied to a value that is not a feature tensor")
            if _is_fixed_head(mod):
                for s in v.segs:
                    uf.union(FIXED, s.group)
                vals[node.name] = _Val((Segment(FIXED, out_shape[1]),), 1, len(out_shape))
            elif isinstance(mod, nn.Conv2d):
                if mod.groups != 1:
                    fail(node, f"grouped/depthwise Conv2d (groups={mod.groups}) of '{node.target}' is not supported")
                if v.repeat != 1:
                    fail(node, "Conv2d on a flattened tensor")
                _check_width(node, v, mod.in_channels)
                g = uf.new()
                layers.append(LayerSpec(node.target, "conv", (Segment(g, mod.out_channels),), v.segs))
                vals[node.name] = _Val((Segment(g, mod.out_channels),), 1, 4)
            elif isinstance(mod, nn.Linear):
                if v.ndim != 2:
                    fail(node, f"Linear '{node.target}' on a {v.ndim}-d tensor (only (N, features) inputs)")
                if sum(s.size for s in v.segs) * v.repeat != mod.in_features:
                    fail(node, f"Linear '{node.target}' expects {mod.in_features} inputs, layout gives "
                               f"{sum(s.size for s in v.segs) * v.repeat}")
                g = uf.new()
                layers.append(LayerSpec(node.target, "linear", (Segment(g, mod.out_features),), v.segs, v.repeat))
                vals[node.name] = _Val((Segment(g, mod.out_features),), 1, 2)
            elif isinstance(mod, _BN_MODULES):
                if v.repeat != 1:
                    fail(node, "BatchNorm on a flattened conv tensor")
                layers.append(LayerSpec(node.target, "bn", v.segs))
                vals[node.name] = v
                pointwise_like.add(node.name)
            elif isinstance(mod, _POINTWISE_MODULES):
                if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
                    fail(node, "per-channel PReLU is not supported")
                vals[node.name] = v
                pointwise_like.add(node.name)
            elif isinstance(mod, _SPATIAL_MODULES):
                vals[node.name] = _Val(v.segs, 1, len(out_shape))
                spatial_nodes.add(node.name)
            elif isinstance(mod, nn.Flatten):
                vals[node.name] = _flatten(node, v, shape(node.args[0]), out_shape, fail)
            else:
                fail(node, f"module type {type(mod).__name__} ('{node.target}') is not supported for merging "
                           "(supported: Conv2d, Linear, BatchNorm, elementwise activations, pooling, flatten, "
                           "add, cat)")
        elif node.op == "call_function":
            t = node.target
            if t in _POINTWISE_FUNCS:
                vals[node.name] = val(node.args[0])
                pointwise_like.add(node.name)
            elif t in _SPATIAL_FUNCS:
                v = val(node.args[0])
                vals[node.name] = _Val(v.segs, 1, len(out_shape))
                spatial_nodes.add(node.name)
            elif t in _ADD:
                vals[node.name] = _add(node, ins, uf, fail, vals)
                add_nodes.add(node.name)
            elif t in _SCALE:
                if len(ins) != 1:
                    fail(node, "product of two feature tensors is not supported")
                vals[node.name] = val(ins[0])
                pointwise_like.add(node.name)
            elif t in _FLATTEN_FUNCS:
                vals[node.name] = _flatten(node, val(node.args[0]), shape(node.args[0]), out_shape, fail)
            elif t is torch.cat:
                vals[node.name] = _cat(node, uf, fail, vals)
            elif t is torch.mean:
                vals[node.name] = _mean(node, val(node.args[0]), out_shape, fail)
            elif t is operator.getitem or t is getattr:
                fail(node, "indexing or attribute access on a feature tensor is not supported")
            else:
                fail(node, f"function {getattr(t, '__name__', t)!r} is not supported for merging")
        elif node.op == "call_method":
            m = node.target
            v = val(node.args[0])
            if m in _POINTWISE_METHODS:
                vals[node.name] = v
                pointwise_like.add(node.name)
            elif m in _FLATTEN_METHODS:
                vals[node.name] = _flatten(node, v, shape(node.args[0]), out_shape, fail)
            elif m == "mean":
                vals[node.name] = _mean(node, v, out_shape, fail)
            elif m in ("add", "add_"):
                vals[node.name] = _add(node, ins, uf, fail, vals)
                add_nodes.add(node.name)
            elif m in ("mul", "div", "mul_", "div_"):
                if len(ins) != 1:
                    fail(node, "product of two feature tensors is not supported")
                vals[node.name] = v
                pointwise_like.add(node.name)
            else:
                fail(node, f"tensor method '.{m}()' is not supported for merging")
        v = vals.get(node.name)
        measurable = (node.name in pointwise_like or node.name in add_nodes
                      or (node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear))))
        if measurable and v is not None and len(v.segs) == 1 and v.repeat == 1 and out_shape is not None:
            group_nodes[node.name] = v.segs[0].group

    # --- resolve groups -----------------------------------------------------------------------------------
    def res(segs):
        return tuple(Segment(uf.find(s.group), s.size) for s in segs)

    norm_of = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _BN_MODULES):
            src = node.args[0]
            if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                    and isinstance(modules[src.target], (nn.Conv2d, nn.Linear))):
                norm_of[src.target] = node.target
    resolved = [LayerSpec(l.name, l.kind, res(l.out), res(l.inp), l.repeat, norm_of.get(l.name)) for l in layers]
    groups: dict[int, Group] = {}
    for l in resolved:
        for s in l.out:
            if s.group != FIXED:
                grp = groups.setdefault(s.group, Group(s.group, s.size))
                if grp.dim != s.size:
                    raise UnsupportedModelError(f"layer '{l.name}' writes {s.size} units into a basis of {grp.dim}")
                grp.producers.append(l.name)
        for s in l.inp:
            if s.group != FIXED:
                groups.setdefault(s.group, Group(s.group, s.size)).consumers.append(l.name)

    # --- statistics sites -----------------------------------------------------------------------------------
    users = {n.name: [u for u in n.users] for n in gm.graph.nodes}
    site_order: list[str] = []
    per_group_candidates: dict[int, list[str]] = {}
    for name, g0 in group_nodes.items():
        g = uf.find(g0)
        if g == FIXED or g not in groups:
            continue
        per_group_candidates.setdefault(g, []).append(name)
        us = users[name]
        continues = [u for u in us if u.name in pointwise_like or u.name in add_nodes]
        if us and len(continues) < len(us):
            groups[g].sites.append(name)
    for g, grp in groups.items():
        if not grp.sites:  # e.g. a pre-activation residual stream: measure at its adds, else its producers
            cands = per_group_candidates.get(g, [])
            grp.sites = [n for n in cands if n in add_nodes] or cands[-1:]
        if not grp.sites:
            raise UnsupportedModelError(f"no place to measure statistics for the basis written by {grp.producers}")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    if residual_sites == "last":
        for g, grp in groups.items():
            if len(grp.sites) > 1 and any(n in add_nodes for n in per_group_candidates.get(g, [])):
                grp.sites = [max(grp.sites, key=order.__getitem__)]
    site_order = sorted({s for g in groups.values() for s in g.sites}, key=order.__getitem__)
    return MergeSpec(groups=dict(sorted(groups.items())), layers={l.name: l for l in resolved}, site_nodes=site_order)


def _flatten_args(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flatten_args(a)
        elif isinstance(a, dict):
            yield from _flatten_args(list(a.values()))
        else:
            yield a


def _check_width(node, v: _Val, expected: int) -> None:
    width = sum(s.size for s in v.segs)
    if width != expected:
        raise UnsupportedModelError(f"cannot merge {_where(node)}: expects {expected} input channels, "
                                    f"the traced layout has {width}")


def _flatten(node, v, in_shape, out_shape, fail) -> _Val:
    if v is None or in_shape is None or out_shape is None:
        fail(node, "flatten of an unknown value")
    if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
        fail(node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} is not a (N, -1) flatten")
    if len(in_shape) == 2:
        return v
    if v.repeat != 1:
        fail(node, "flatten of an already flattened tensor")
    spatial = 1
    for s in in_shape[2:]:
        spatial *= s
    return _Val(v.segs, spatial, 2)


def _mean(node, v, out_shape, fail) -> _Val:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if v is None or not dims or any(d in (1, -v.ndim + 1) for d in dims) or any(d == 0 for d in dims):
        fail(node, "mean over the channel or batch axis is not supported")
    return _Val(v.segs, 1, len(out_shape))


def _add(node, ins, uf: _UF, fail, vals) -> _Val:
    vs = [vals[a.name] for a in ins]
    if len(vs) == 1:
        return vs[0]  # adding a constant
    a, b = vs
    if a.repeat != b.repeat or [s.size for s in a.segs] != [s.size for s in b.segs]:
        fail(node, "residual add of tensors with different channel layouts")
    for sa, sb in zip(a.segs, b.segs):
        uf.union(sa.group, sb.group)
    return a


def _cat(node, uf, fail, vals) -> _Val:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    vs = [vals.get(t.name) if isinstance(t, fx.Node) else None for t in tensors]
    if any(v is None for v in vs):
        fail(node, "concatenation with a non-feature tensor")
    if dim not in (1, -vs[0].ndim + 1) or any(v.repeat != 1 for v in vs):
        fail(node, f"concatenation along dim {dim} (only the channel dim 1 is supported)")
    segs = tuple(s for v in vs for s in v.segs)
    return _Val(segs, 1, vs[0].ndim)
