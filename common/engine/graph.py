"""Derive a model's merge graph from ``torch.fx``: which tensors share a feature basis.

A *group* is one feature basis that can be re-expressed by an invertible transform: the output units of a
layer, plus everything that is elementwise/BatchNorm/pooling-equivalent to them, plus every layer that adds
into the same residual stream. Groups touching the model's input or output are *fixed* (identity).

For every weight-bearing layer the spec records which group its output axis lives in and how its input axis
is laid out (a concatenation of groups, possibly flattened over ``repeat`` spatial positions). Merging code
only ever reads this spec, so a new architecture needs no new code. How each op moves a layout is data, the
op table in :mod:`fedmerge.common.engine.graph_ops`; an op it does not cover raises
:class:`UnsupportedModelError` naming the node and the module it came from (never a silent identity).

Statistics are measured at *sites*: for each group, the tensors that leave the pointwise chain
(conv -> BN -> ReLU ends at a pooling layer, a consumer, or a residual stream's post-add activation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from fedmerge.common.engine import graph_ops as ops
from fedmerge.common.engine.graph_ops import (
    FIXED,
    LayerSpec,
    Segment,
    UnsupportedModelError,
)

__all__ = ["FIXED", "RESIDUAL_SITES", "Group", "LayerSpec", "MergeSpec", "Segment", "UnsupportedModelError",
           "choose_sites", "derive_spec", "propagate", "resolve_groups", "trace"]


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


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return ops.is_fixed_head(m) or super().is_leaf_module(m, qualname)


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
    st = propagate(gm)
    layers, groups = resolve_groups(st)
    site_nodes = choose_sites(gm, st, groups, residual_sites)
    return MergeSpec(groups=groups, layers=layers, site_nodes=site_nodes)


def propagate(gm: fx.GraphModule) -> ops.State:
    """Step 1: walk the traced graph once, giving every feature tensor its layout (one op-table entry per node)."""
    st = ops.State(gm)
    for node in gm.graph.nodes:
        out_shape = ops.shape(node)
        if node.op == "placeholder":
            st.vals[node.name] = None if out_shape is None else ops.Val(
                (Segment(FIXED, out_shape[1] if len(out_shape) > 1 else 1),), 1, len(out_shape))
            continue
        if node.op == "output":
            for v in map(st.val, ops.flatten_args(node.args)):
                if v is not None:
                    st.uf.fix(v)
            continue
        if node.op == "get_attr":
            ops.fail(node, f"direct use of parameter/buffer '{node.target}' outside a module is not supported")
        ins = st.tensor_args(node)
        if node.op != "call_module" and not ins:  # no feature tensor involved (shape arithmetic, constants)
            st.vals[node.name] = None
            continue
        if out_shape is None and node.op != "call_module":
            if (node.op == "call_method" and node.target in ops.SHAPE_METHODS
                    or node.op == "call_function" and node.target is getattr):
                st.vals[node.name] = None
                continue
            ops.fail(node, f"op {node.target!r} returns a non-tensor value from a feature tensor")
        if node.op == "call_module":
            mod = st.modules[node.target]
            v = st.val(node.args[0]) if node.args else None
            if v is None:
                ops.fail(node, f"{type(mod).__name__} applied to a value that is not a feature tensor")
            op = ops.module_op(node, mod)
        else:
            v = st.val(node.args[0])
            op = ops.function_op(node) if node.op == "call_function" else ops.method_op(node)
        st.vals[node.name] = op.apply(st, node, v, ins, out_shape)
        st.roles[node.name] = op.role
    return st


def resolve_groups(st: ops.State) -> tuple[dict[str, LayerSpec], dict[int, Group]]:
    """Step 2: replace every provisional group by its union-find root; collect each basis' producers/consumers."""
    def res(segs):
        return tuple(Segment(st.uf.find(s.group), s.size) for s in segs)

    resolved = [LayerSpec(l.name, l.kind, res(l.out), res(l.inp), l.repeat, st.norm_of.get(l.name)) for l in st.layers]
    groups: dict[int, Group] = {}
    for l in resolved:  # a module called twice is listed twice here
        for s in l.out:
            if s.group != FIXED:
                grp = groups.setdefault(s.group, Group(s.group, s.size))
                if grp.dim != s.size:
                    raise UnsupportedModelError(f"layer '{l.name}' writes {s.size} units into a basis of {grp.dim}")
                grp.producers.append(l.name)
        for s in l.inp:
            if s.group != FIXED:
                groups.setdefault(s.group, Group(s.group, s.size)).consumers.append(l.name)
    return {l.name: l for l in resolved}, dict(sorted(groups.items()))


def choose_sites(gm: fx.GraphModule, st: ops.State, groups: dict[int, Group], residual_sites: str) -> list[str]:
    """Step 3: measure each group where its tensors leave the pointwise chain (fills ``Group.sites``); returns
    all site nodes in execution order."""
    chain = (ops.POINTWISE, ops.ADD)
    candidates: dict[int, list[str]] = {}  # per group: its measurable single-basis nodes, in execution order
    for node in gm.graph.nodes:
        v = st.vals.get(node.name)
        if (st.roles.get(node.name) not in (*chain, ops.LAYER) or v is None or len(v.segs) != 1 or v.repeat != 1
                or ops.shape(node) is None):
            continue
        g = st.uf.find(v.segs[0].group)
        if g == FIXED or g not in groups:
            continue
        candidates.setdefault(g, []).append(node.name)
        continues = [u for u in node.users if st.roles.get(u.name) in chain]
        if node.users and len(continues) < len(node.users):
            groups[g].sites.append(node.name)
    for g, grp in groups.items():
        if not grp.sites:  # e.g. a pre-activation residual stream: measure at its adds, else its producers
            cands = candidates.get(g, [])
            grp.sites = [n for n in cands if st.roles[n] == ops.ADD] or cands[-1:]
        if not grp.sites:
            raise UnsupportedModelError(f"no place to measure statistics for the basis written by {grp.producers}")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    if residual_sites == "last":
        for g, grp in groups.items():
            if len(grp.sites) > 1 and any(st.roles[n] == ops.ADD for n in candidates.get(g, [])):
                grp.sites = [max(grp.sites, key=order.__getitem__)]
    return sorted({s for g in groups.values() for s in g.sites}, key=order.__getitem__)
