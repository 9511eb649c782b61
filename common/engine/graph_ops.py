"""The op table of the merge graph: how each ``torch.fx`` op kind moves a tensor's feature layout.

Architectures are data here (as in ZipIt!'s graph definitions), but the data is the op vocabulary, not one
graph per model: every traced node is looked up in :data:`MODULE_OPS` (by module type, nearest in the MRO),
:data:`FUNCTION_OPS` (by the called function) or :data:`METHOD_OPS` (by the tensor method's name), and the
entry's :class:`Op` says what the node's output layout is and which role it plays for statistics sites.
A node that no entry covers raises :class:`UnsupportedModelError` naming the op and where it sits; a new op
kind is one new entry. A module that sets ``fedmerge_fixed_input = True`` (a fixed classifier head) is one
opaque op whose input basis is fixed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

FIXED = 0  # the group of the model's input and output: never transformed

# node roles: where a chain of same-basis tensors starts, continues or merges (drives the statistics sites)
LAYER = "layer"  # conv/linear output: a new basis starts here (measurable)
POINTWISE = "pointwise"  # elementwise/BatchNorm/scaling: the chain continues (measurable)
ADD = "add"  # residual add: two chains share a basis (measurable)
SPATIAL = "spatial"  # pooling: same basis, but measured before it, not after


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
class Val:
    """What the propagation knows about a tensor: its channel layout and its spatial repeat if flattened."""

    segs: tuple[Segment, ...]
    repeat: int = 1  # > 1: flattened (N, C*repeat), channel-major
    ndim: int = 2


class UnionFind:
    """Groups that turn out to be one basis (residual adds, the model's input/output) are merged here."""

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

    def fix(self, v: Val) -> None:
        for s in v.segs:
            self.union(FIXED, s.group)


class State:
    """What the walk over the traced graph has learnt so far; the op handlers read and extend it."""

    def __init__(self, gm: fx.GraphModule):
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.vals: dict[str, Val | None] = {}
        self.layers: list[LayerSpec] = []  # in execution order
        self.norm_of: dict[str, str] = {}  # conv/linear -> the BatchNorm applied directly (and only) to it
        self.roles: dict[str, str | None] = {}

    def val(self, a) -> Val | None:
        return self.vals.get(a.name) if isinstance(a, fx.Node) else None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in flatten_args(node.args) if isinstance(a, fx.Node) and self.vals.get(a.name) is not None]


Handler = Callable[[State, fx.Node, "Val | None", list, "tuple | None"], "Val | None"]


@dataclass(frozen=True)
class Op:
    """One op kind: ``apply(state, node, v, ins, out_shape)`` returns the output's layout (``v``: the layout
    of the node's first argument, ``ins``: its feature-tensor arguments); ``role`` places it in a chain."""

    apply: Handler
    role: str | None = None


def where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return f"node '{node.name}' in module '{path}'"
    return f"node '{node.name}'"


def fail(node: fx.Node, what: str):
    raise UnsupportedModelError(f"cannot merge {where(node)}: {what}")


def shape(n) -> tuple | None:
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def flatten_args(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from flatten_args(a)
        elif isinstance(a, dict):
            yield from flatten_args(list(a.values()))
        else:
            yield a


def is_fixed_head(mod: nn.Module) -> bool:
    """A module whose input basis is fixed (``fedmerge_fixed_input = True``): traced as one opaque op."""
    return bool(getattr(mod, "fedmerge_fixed_input", False))


# --- handlers ------------------------------------------------------------------------------------------------
def _same(st, node, v, ins, out_shape):
    return v


def _fixed_head(st, node, v, ins, out_shape):
    st.uf.fix(v)
    return Val((Segment(FIXED, out_shape[1]),), 1, len(out_shape))


def _conv(st, node, v, ins, out_shape):
    mod = st.modules[node.target]
    if mod.groups != 1:
        fail(node, f"grouped/depthwise Conv2d (groups={mod.groups}) of '{node.target}' is not supported")
    if v.repeat != 1:
        fail(node, "Conv2d on a flattened tensor")
    width = sum(s.size for s in v.segs)
    if width != mod.in_channels:
        fail(node, f"expects {mod.in_channels} input channels, the traced layout has {width}")
    g = st.uf.new()
    st.layers.append(LayerSpec(node.target, "conv", (Segment(g, mod.out_channels),), v.segs))
    return Val((Segment(g, mod.out_channels),), 1, 4)


def _linear(st, node, v, ins, out_shape):
    mod = st.modules[node.target]
    if v.ndim != 2:
        fail(node, f"Linear '{node.target}' on a {v.ndim}-d tensor (only (N, features) inputs)")
    if sum(s.size for s in v.segs) * v.repeat != mod.in_features:
        fail(node, f"Linear '{node.target}' expects {mod.in_features} inputs, layout gives "
                   f"{sum(s.size for s in v.segs) * v.repeat}")
    g = st.uf.new()
    st.layers.append(LayerSpec(node.target, "linear", (Segment(g, mod.out_features),), v.segs, v.repeat))
    return Val((Segment(g, mod.out_features),), 1, 2)


def _batchnorm(st, node, v, ins, out_shape):
    if v.repeat != 1:
        fail(node, "BatchNorm on a flattened conv tensor")
    st.layers.append(LayerSpec(node.target, "bn", v.segs))
    src = node.args[0]
    if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
            and isinstance(st.modules[src.target], (nn.Conv2d, nn.Linear))):
        st.norm_of[src.target] = node.target
    return v


def _prelu(st, node, v, ins, out_shape):
    if st.modules[node.target].num_parameters != 1:
        fail(node, "per-channel PReLU is not supported")
    return v


def _spatial(st, node, v, ins, out_shape):
    return Val(v.segs, 1, len(out_shape))


def _flatten(st, node, v, ins, out_shape):
    in_shape = shape(node.args[0])
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
    return Val(v.segs, spatial, 2)


def _mean(st, node, v, ins, out_shape):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if v is None or not dims or any(d in (1, -v.ndim + 1) for d in dims) or any(d == 0 for d in dims):
        fail(node, "mean over the channel or batch axis is not supported")
    return Val(v.segs, 1, len(out_shape))


def _add(st, node, v, ins, out_shape):
    vs = [st.vals[a.name] for a in ins]
    if len(vs) == 1:
        return vs[0]  # adding a constant
    a, b = vs
    if a.repeat != b.repeat or [s.size for s in a.segs] != [s.size for s in b.segs]:
        fail(node, "residual add of tensors with different channel layouts")
    for sa, sb in zip(a.segs, b.segs):
        st.uf.union(sa.group, sb.group)
    return a


def _scale(st, node, v, ins, out_shape):  # x * c, c * x, x / c: the feature tensor is wherever it is
    if len(ins) != 1:
        fail(node, "product of two feature tensors is not supported")
    return st.val(ins[0])


def _scale_method(st, node, v, ins, out_shape):  # x.mul(c): the layout is the receiver's
    if len(ins) != 1:
        fail(node, "product of two feature tensors is not supported")
    return v


def _cat(st, node, v, ins, out_shape):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    vs = [st.vals.get(t.name) if isinstance(t, fx.Node) else None for t in tensors]
    if any(v is None for v in vs):
        fail(node, "concatenation with a non-feature tensor")
    if dim not in (1, -vs[0].ndim + 1) or any(v.repeat != 1 for v in vs):
        fail(node, f"concatenation along dim {dim} (only the channel dim 1 is supported)")
    return Val(tuple(s for v in vs for s in v.segs), 1, vs[0].ndim)


def unsupported(why: str) -> Op:
    """An entry for an op kind that is known and deliberately refused, with the reason."""
    def refuse(st, node, v, ins, out_shape):
        fail(node, why)
    return Op(refuse)


# --- the tables ------------------------------------------------------------------------------------------------
FIXED_HEAD = Op(_fixed_head)
_POINTWISE, _SPATIAL, _FLATTEN = Op(_same, POINTWISE), Op(_spatial, SPATIAL), Op(_flatten)
_MEAN, _SUM = Op(_mean), Op(_add, ADD)

MODULE_OPS: dict[type, Op] = {
    nn.Conv2d: Op(_conv, LAYER), nn.Linear: Op(_linear, LAYER),
    nn.BatchNorm1d: Op(_batchnorm, POINTWISE), nn.BatchNorm2d: Op(_batchnorm, POINTWISE),
    nn.PReLU: Op(_prelu, POINTWISE),
    **dict.fromkeys((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
                     nn.Hardtanh, nn.Softplus, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity), _POINTWISE),
    **dict.fromkeys((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), _SPATIAL),
    nn.Flatten: _FLATTEN,
}
FUNCTION_OPS: dict[Callable, Op] = {
    **dict.fromkeys((F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, torch.tanh, torch.sigmoid,
                     F.dropout, F.hardswish, F.mish, F.softplus), _POINTWISE),
    **dict.fromkeys((F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d), _SPATIAL),
    **dict.fromkeys((operator.add, operator.iadd, torch.add), _SUM),
    **dict.fromkeys((operator.mul, operator.imul, operator.truediv, torch.mul), Op(_scale, POINTWISE)),
    torch.flatten: _FLATTEN, torch.cat: Op(_cat), torch.mean: _MEAN,
    **dict.fromkeys((operator.getitem, getattr),
                    unsupported("indexing or attribute access on a feature tensor is not supported")),
}
METHOD_OPS: dict[str, Op] = {
    **dict.fromkeys(("relu", "sigmoid", "tanh", "contiguous", "clone"), _POINTWISE),
    **dict.fromkeys(("flatten", "view", "reshape"), _FLATTEN),
    "mean": _MEAN,
    **dict.fromkeys(("add", "add_"), _SUM),
    **dict.fromkeys(("mul", "div", "mul_", "div_"), Op(_scale_method, POINTWISE)),
}
SHAPE_METHODS = {"size", "dim"}  # read a feature tensor's shape: no feature value


def module_op(node: fx.Node, mod: nn.Module) -> Op:
    if is_fixed_head(mod):
        return FIXED_HEAD
    for cls in type(mod).__mro__:
        if cls in MODULE_OPS:
            return MODULE_OPS[cls]
    fail(node, f"module type {type(mod).__name__} ('{node.target}') is not supported for merging "
               "(supported: Conv2d, Linear, BatchNorm, elementwise activations, pooling, flatten, add, cat)")


def function_op(node: fx.Node) -> Op:
    op = FUNCTION_OPS.get(node.target)
    if op is None:
        fail(node, f"function {getattr(node.target, '__name__', node.target)!r} is not supported for merging")
    return op


def method_op(node: fx.Node) -> Op:
    op = METHOD_OPS.get(node.target)
    if op is None:
        fail(node, f"tensor method '.{node.target}()' is not supported for merging")
    return op
