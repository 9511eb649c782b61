"""The merge graph's op table: an unsupported op is named, and a new op kind is one table entry."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmerge.common.engine import graph_ops
from fedmerge.common.engine.graph import FIXED, UnsupportedModelError, derive_spec

X = torch.randn(4, 3, 8, 8)


class Net(nn.Module):
    """conv -> act -> conv -> mean -> linear, with the activation pluggable."""

    def __init__(self, act):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5, 2)
        self.act = act

    def forward(self, x):
        return self.fc(F.relu(self.c2(self.act(self.c1(x)))).mean((2, 3)))


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _shape_of(spec):
    """The spec without fx node names (which follow the op's name)."""
    return ({g: (grp.dim, grp.producers, grp.consumers, len(grp.sites)) for g, grp in spec.groups.items()},
            spec.layers)


REFERENCE = _shape_of(derive_spec(Net(nn.ReLU()), X))


@pytest.mark.parametrize("act,table,key,like,message", [
    (Act(torch.abs), "FUNCTION_OPS", torch.abs, F.relu,
     r"node 'abs\w*' in module 'act': function 'abs' is not supported"),
    (Act(lambda x: x.abs()), "METHOD_OPS", "abs", "relu",
     r"node 'abs\w*' in module 'act': tensor method '\.abs\(\)' is not supported"),
    (nn.Softsign(), "MODULE_OPS", nn.Softsign, nn.Tanh,
     r"node 'act' in module 'act': module type Softsign \('act'\)"),
])
def test_a_new_op_kind_is_one_table_entry(monkeypatch, act, table, key, like, message):
    with pytest.raises(UnsupportedModelError, match=message):
        derive_spec(Net(act), X)
    ops = getattr(graph_ops, table)
    monkeypatch.setitem(ops, key, ops[like])
    assert _shape_of(derive_spec(Net(act), X)) == REFERENCE


def test_tables_hold_ops_with_known_roles():
    roles = {None, graph_ops.LAYER, graph_ops.POINTWISE, graph_ops.ADD, graph_ops.SPATIAL}
    for table in (graph_ops.MODULE_OPS, graph_ops.FUNCTION_OPS, graph_ops.METHOD_OPS):
        assert table and all(isinstance(op, graph_ops.Op) and op.role in roles for op in table.values())


def test_a_known_refusal_gives_its_reason():
    with pytest.raises(UnsupportedModelError, match="node 'getitem'.*indexing or attribute access"):
        derive_spec(Net(Act(lambda x: x[:, :6])), X)


class FixedHead(nn.Module):
    """Not the zoo's ClassEmbeddingHead: any module that sets the attribute is an opaque op with a fixed input."""

    fedmerge_fixed_input = True

    def __init__(self):
        super().__init__()
        self.register_buffer("e", torch.randn(3, 5))

    def forward(self, x):
        return F.normalize(x, dim=1) @ self.e.t()


class ClassEmbeddingHead(FixedHead):  # the class name alone means nothing
    fedmerge_fixed_input = False


def test_fixed_head_is_the_attribute_not_the_class_name():
    net = Net(nn.ReLU())
    net.fc = FixedHead()
    spec = derive_spec(net, X)
    assert spec.layers["c2"].out[0].group == FIXED and len(spec.groups) == 1
    net.fc = ClassEmbeddingHead()
    with pytest.raises(UnsupportedModelError, match="function 'normalize' is not supported"):
        derive_spec(net, X)
