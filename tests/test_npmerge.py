"""NP Merge: learned per-parameter merge coefficients after alignment."""

import pytest
import torch
import torch.nn.functional as F
from toy_models import TinyMLP

from fedmerge import merge_models
from fedmerge.common.engine.npmerge import np_merge
from fedmerge.common.wire.probe import as_batches


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    w = torch.randn(12, 4, generator=torch.Generator().manual_seed(99))
    y = (x @ w).argmax(1)
    return x, y


def _trained(seed):
    torch.manual_seed(seed)
    m = TinyMLP()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    x, y = _data(512, seed)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def test_np_merge_is_at_least_as_good_as_plain_cca_on_held_out():
    a, b = _trained(0), _trained(1)
    probe = _data(400, 5)
    plain, info0 = merge_models([a, b], probe, method="cca", gamma=0.1, return_info=True, seed=0)
    learned, info = merge_models([a, b], probe, method="cca", gamma=0.1, return_info=True, seed=0,
                                 np_merge={"steps": 60, "eval_every": 10})
    assert info.np_merge["held_loss_best"] <= info.np_merge["held_loss_start"] + 1e-9
    xt, yt = _data(400, 11)
    with torch.no_grad():
        l_plain = F.cross_entropy(plain(xt), yt).item()
        l_np = F.cross_entropy(learned(xt), yt).item()
    assert torch.isfinite(torch.tensor(l_np)) and l_np <= l_plain * 1.05
    assert type(learned) is type(a)


def test_zero_steps_is_the_plain_weighted_average():
    a, b = _trained(0), _trained(1)
    x, y = _data(200, 3)
    fit, held = as_batches((x, y)).split(0.2, 0)
    sa, sb = a.state_dict(), b.state_dict()
    m, info = np_merge(a, [sa, sb], [0.25, 0.75], fit, held, steps=0)
    for k, v in m.state_dict().items():
        assert torch.allclose(v, 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6)


def test_np_merge_needs_labels():
    a, b = _trained(0), _trained(1)
    with pytest.raises(ValueError, match="label"):
        merge_models([a, b], _data(200, 3)[0], method="cca", gamma=0.1, np_merge=True)


def test_np_merge_through_the_flower_strategy(tmp_path):
    from fedmerge.client.app import task_client_app
    from fedmerge.common.task.config import FedConfig
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = FedConfig(dataset="cifar10-mini", arch="cnn", width=0.25, epochs=1, max_train=256, probe_size=120,
                    max_test=200, num_clients=2, gamma="0.1", reference="0", np_merge=True, out=str(tmp_path))
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    assert result["rounds_completed"] == 1 and result["accuracy"]["merged"] is not None
    assert result["rounds"][0]["timings"]["merge_np_merge"] > 0
