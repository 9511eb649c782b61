"""The demo behind ``make demo`` at toy scale: the federated run, the same clients merged offline with every
baseline, one table and one picture that puts them side by side."""
import json

import pytest

from fedmerge.common.task.config import FedConfig
from fedmerge.demo import run_demo


def test_demo_table_and_picture(tmp_path):
    cfg = FedConfig(dataset="cifar10-mini", split="80/20", num_clients=2, arch="mlp", width=0.25, epochs=1,
                    max_train=96, probe_size=80, max_test=100, batch_size=32, gamma="0.1", reference="0",
                    out=str(tmp_path))
    summary = run_demo(cfg, backend="inline")
    methods = [r["method"] for r in summary["offline"]]
    assert methods == ["offline avg", "offline avg + REPAIR", "offline permute", "offline permute + REPAIR",
                       "offline cca", "offline cca + REPAIR"]  # no BatchNorm in the MLP: REPAIR rows too
    table = (tmp_path / "demo.md").read_text()
    assert "ensemble (upper bound)" in table and "federated cca (Flower)" in table and "offline permute" in table
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo.json").read_text())["federated"]["clients_merged"] == [0, 1]


def test_demo_names_the_federated_refinements(tmp_path):
    """``demo --distill``: the federated row says the merge was distilled, with its whole merge time."""
    cfg = FedConfig(dataset="cifar10-mini", split="80/20", num_clients=2, arch="mlp", width=0.25, epochs=1,
                    max_train=96, probe_size=80, max_test=100, batch_size=32, gamma="0.1", reference="0",
                    distill=True, out=str(tmp_path))
    summary = run_demo(cfg, backend="inline", baselines=("avg",), repair=False)
    row = next(ln for ln in (tmp_path / "demo.md").read_text().splitlines() if "(Flower)" in ln)
    assert row.startswith("| federated cca + distill (Flower) |")
    merge_s = summary["federated"]["rounds"][-1]["timings"]["merge"]
    assert float(row.split("|")[3]) == pytest.approx(merge_s, abs=0.051)
    assert merge_s >= summary["federated"]["rounds"][-1]["timings"]["merge_distill"]


def test_demo_offline_cca_is_the_federated_merge(tmp_path):
    """The demo's "same client models, merged offline" CCA row uses the federation's own probe slices, sample-count
    weights, gamma and reference choice: it is the federated merge (the accuracy on the same test images equal up
    to float32 round-off of the logits: at most one of the 100 test images may flip)."""
    cfg = FedConfig(dataset="cifar10-mini", split="80/20", num_clients=2, arch="mlp", width=0.25, epochs=1,
                    max_train=96, probe_size=80, max_test=100, batch_size=32, out=str(tmp_path))  # gamma, ref auto
    summary = run_demo(cfg, backend="inline", baselines=("cca",), repair=False)
    offline = summary["offline"][0]
    fed = summary["federated"]
    assert offline["method"] == "offline cca" and offline["gamma"] == fed["gamma"]
    assert abs(offline["accuracy"] - fed["accuracy"]["merged"]) <= 1 / 100
