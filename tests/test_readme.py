"""Every Python code block of README.md runs, with its placeholders (``models``, ``probe``, ``MyNet``,
``probe_images``, ``my_data``) filled here, so that the docs cannot drift from the code. The ServerApp and
ClientApp blocks run together: one CCA round over an in-process grid."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import Context, RecordDict

from fedmerge.server.inline import InlineGrid

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class MyNet(nn.Module):
    """A user's own small CNN with BatchNorm (not from the fedmerge zoo)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2), 1))


@pytest.fixture
def placeholders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(MyNet().eval())
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:96], y[:96]), batch_size=32)
    return {"models": models, "probe": x[96:], "MyNet": MyNet, "probe_images": x[96:], "my_data": data}


def test_readme_has_the_blocks_this_test_runs():
    assert len(BLOCKS) == 3
    assert "merge_models" in BLOCKS[0] and "CCAMerge" in BLOCKS[1] and "make_client_app" in BLOCKS[2]


def test_library_block_runs(placeholders):
    ns = dict(placeholders)
    exec(compile(BLOCKS[0], "README.md (library)", "exec"), ns)
    assert isinstance(ns["merged"], MyNet) and ns["stats"].num_models == 2


def test_server_and_client_blocks_run_one_round(placeholders, monkeypatch):
    torch.manual_seed(0)
    ns = dict(placeholders)
    exec(compile(BLOCKS[1], "README.md (server)", "exec"), ns)
    exec(compile(BLOCKS[2], "README.md (client)", "exec"), ns)
    grid = InlineGrid(ns["client_app"], 2)
    captured = {}
    from fedmerge.server.strategy import CCAMerge

    original = CCAMerge.start

    def start(self, *a, **kw):
        captured["strategy"] = self
        captured["result"] = original(self, *a, **kw)
        return captured["result"]

    monkeypatch.setattr(CCAMerge, "start", start)
    ns["main"](grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    rec = captured["strategy"].history[-1]
    assert rec.ok, rec.error
    assert rec.clients_merged == [0, 1] and rec.clients_rejected == []
    assert "ensemble" in rec.merge_info["reference_rule"]   # an image-only probe: no labels
    state = captured["result"].arrays.to_torch_state_dict()
    assert set(state) == set(MyNet().state_dict()) and all(torch.isfinite(v).all() for v in state.values()
                                                           if v.is_floating_point())
