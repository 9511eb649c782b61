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


def test_np_merge_warns_when_the_held_out_loss_never_improves(caplog):
    """Two identical models: every coefficient gives the same merged model, so the held-out loss cannot improve;
    the plain average is kept and the warning names the cause (probe images the clients trained on)."""
    a = _trained(0)
    states = [a.state_dict(), a.state_dict()]
    x, y = _data(200, 5)
    fit, held = as_batches((x[:100], y[:100]), 50), as_batches((x[100:], y[100:]), 50)
    with caplog.at_level("WARNING", logger="flwr.fedmerge"):
        merged, info = np_merge(a, states, [0.5, 0.5], fit, held, steps=20, eval_every=5, patience=2)
    assert info["improved"] is False and info["held_loss_best"] == info["held_loss_start"]
    assert any("never improved" in r.getMessage() and "did not train on" in r.getMessage() for r in caplog.records)
    for k, v in merged.state_dict().items():
        assert torch.equal(v, states[0][k].float())
    caplog.clear()
    b = _trained(1)
    with caplog.at_level("WARNING", logger="flwr.fedmerge"):
        _, info = np_merge(a, [a.state_dict(), b.state_dict()], [0.5, 0.5], fit, held, steps=40, eval_every=5)
    assert any("never improved" in r.getMessage() for r in caplog.records) == (not info["improved"])
