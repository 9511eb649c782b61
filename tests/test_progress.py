"""Progress output: training lines, round/phase lines from the strategy, Flower's own noise hidden unless
verbose, and bad settings rejected."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmerge.client.train import TrainConfig, train
from fedmerge.common import progress


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record):
        self.lines.append((record.name, record.levelno, record.getMessage()))


@pytest.fixture
def flwr_lines():
    """Everything that reaches Flower's logger (and so its console handler), with Flower's level restored."""
    import flwr.common.logger  # noqa: F401

    logger = logging.getLogger("flwr")
    level = logger.level
    h = _Collect()
    logger.addHandler(h)
    yield h.lines
    logger.removeHandler(h)
    logger.setLevel(level)


def _loader(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def test_training_progress_lines(monkeypatch, flwr_lines):
    monkeypatch.setenv("FEDMERGE_PROGRESS", "lines")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    hist = train(model, _loader(), TrainConfig(epochs=2, lr=0.05, device="cpu", progress=True, desc="client 7: train"))
    mine = [m for name, _, m in flwr_lines if name == "flwr.fedmerge"]
    assert len(mine) == 1, mine       # short run: no interval line, one summary line
    assert mine[0].startswith(f"client 7: train: {hist['steps']} steps in ")
    assert "epoch 2/2: loss" in mine[0] and "train acc" in mine[0]


def test_progress_off_and_disabled(monkeypatch, flwr_lines):
    model = torch.nn.Linear(8, 3)
    monkeypatch.setenv("FEDMERGE_PROGRESS", "off")
    train(model, _loader(), TrainConfig(epochs=1, lr=0.05, device="cpu", progress=True))
    monkeypatch.setenv("FEDMERGE_PROGRESS", "lines")
    train(model, _loader(), TrainConfig(epochs=1, lr=0.05, device="cpu", progress=False))
    assert not [m for name, _, m in flwr_lines if name == "flwr.fedmerge"]


def test_interval_lines(monkeypatch, flwr_lines):
    monkeypatch.setenv("FEDMERGE_PROGRESS", "lines")
    b = progress.bar(4, "work", "items", interval=0.0)   # a line after every update but the last
    for _ in range(4):
        b.update()
    b.close()
    mine = [m for name, _, m in flwr_lines if name == "flwr.fedmerge"]
    assert [m.split(",")[0] for m in mine[:3]] == ["work: 1/4 items (25%)", "work: 2/4 items (50%)",
                                                    "work: 3/4 items (75%)"]
    assert mine[3].startswith("work: 4 items in ")


@pytest.mark.parametrize("var,value", [("FEDMERGE_PROGRESS", "loud"), ("FEDMERGE_VERBOSE", "maybe")])
def test_bad_settings_are_errors(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        progress.mode() if var == "FEDMERGE_PROGRESS" else progress.verbose_from_env()


def test_cli_rejects_bad_progress_setting(monkeypatch, capsys):
    from fedmerge.cli import main

    monkeypatch.setenv("FEDMERGE_PROGRESS", "loud")
    assert main(["simulate", "--backend", "inline", "--out", "unused"]) == 2
    assert "FEDMERGE_PROGRESS must be one of auto, bar, lines, off, got 'loud'" in capsys.readouterr().err


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_flower_keeps_progress_and_warnings(flwr_lines, verbose):
    from flwr.common.logger import log

    progress.quiet_flower(verbose)
    log(logging.INFO, "flower info")
    log(logging.WARNING, "flower warning")
    progress.info("fedmerge progress")
    got = [m for _, _, m in flwr_lines]
    assert "flower warning" in got and "fedmerge progress" in got
    assert ("flower info" in got) is verbose


def test_dropped_hides_only_the_named_line(flwr_lines):
    from flwr.common.logger import log

    with progress.dropped("known noise"):
        log(logging.WARNING, "some known noise here")
        log(logging.WARNING, "a real warning")
    log(logging.WARNING, "known noise outside the block")
    assert [m for _, _, m in flwr_lines] == ["a real warning", "known noise outside the block"]


def test_inline_federation_reports_rounds(monkeypatch, flwr_lines, tmp_path):
    """A 2-client inline federation of a tiny MLP reports each phase of the round and each client."""
    from fedmerge.common.task.config import FedConfig
    from fedmerge.simulate import simulate

    monkeypatch.setenv("FEDMERGE_PROGRESS", "lines")
    cfg = FedConfig(dataset="cifar10-mini", arch="mlp", width=0.25, num_clients=2, epochs=0.5, max_train=200,
                    max_test=200, probe_size=100, gamma="1.0", reference="0", out=str(tmp_path), seed=0)
    result = simulate(cfg, backend="inline")
    assert result["rounds"][-1]["ok"]
    mine = [m for name, _, m in flwr_lines if name == "flwr.fedmerge"]
    for want in ("round 1: 2 clients training", "client 0 round 1: train: ", "client 1 round 1: test accuracy",
                 "round 1: 2 of 2 training replies pass the reply checks",
                 "round 1: cross statistics against reference client 0: 2 replies",
                 "round 1: merged 2 clients with cca in ", "round 1: global model test accuracy",
                 "logit ensemble of the last merged clients"):
        assert any(m.startswith(want) for m in mine), (want, mine)
