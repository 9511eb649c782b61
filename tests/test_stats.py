"""Probe statistics: which blocks collect_statistics computes."""

import pytest
import torch
from toy_models import TinyMLP

from fedmerge.common.engine.stats import collect_statistics


def test_collect_statistics_own_of_computes_only_those_own_blocks():
    torch.manual_seed(0)
    models = [TinyMLP().eval() for _ in range(3)]
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    full = collect_statistics(models, x, reference=0)
    part = collect_statistics(models, x, reference=0, own_of=[0])
    assert part.own[1] == {} and part.own[2] == {}
    for g, m in full.own[0].items():
        assert torch.equal(part.own[0][g].m2, m.m2) and torch.equal(part.own[0][g].mean, m.mean)
    for k, blocks in full.cross.items():
        for g, c in blocks.items():
            assert torch.equal(part.cross[k][g].c, c.c)
    with pytest.raises(ValueError, match="own_of"):
        collect_statistics(models, x, own_of=[3])
