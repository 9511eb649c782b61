"""Per-round method schedules (``method_schedule``): parsing and validation, which method each round uses, and
a small inline federation in which round 1 runs CCA's statistics exchange and later rounds plain averaging
from the merged model."""
import pytest
import torch

from fedmerge.client.app import task_client_app
from fedmerge.common.task.config import FedConfig, parse_method_schedule
from fedmerge.common.task.loaders import build_global_model, probe_batches
from fedmerge.server.app import run_federation
from fedmerge.server.inline import InlineGrid
from fedmerge.server.strategy import CCAMerge, RoundRecord

TINY = dict(dataset="cifar10-mini", arch="cnn", width=0.25, epochs=1, max_train=128, probe_size=120,
            max_test=200, batch_size=64, num_clients=2, min_clients=2, gamma="0.1", reference="0")


def test_parse_method_schedule():
    assert parse_method_schedule("") is None and parse_method_schedule(None) is None
    assert parse_method_schedule("cca,avg") == ("cca", "avg")
    assert parse_method_schedule(" cca , permute ,avg") == ("cca", "permute", "avg")
    assert parse_method_schedule(["cca", "avg"]) == ("cca", "avg")
    assert parse_method_schedule("auto") == "auto" and parse_method_schedule("AUTO") == "auto"
    for bad, what in (("cca,fedavg", "unknown method 'fedavg'"), ("cca,,avg", "every entry"),
                      ("cca,auto", "'auto' is a whole schedule"), ([1, "avg"], "every entry")):
        with pytest.raises(ValueError, match=what):
            parse_method_schedule(bad)


def test_schedule_is_validated_everywhere():
    with pytest.raises(ValueError, match="unknown method 'cc'"):
        FedConfig(method_schedule="cc,avg")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        FedConfig.from_run_config({"method-schedule": "cca,nope"})
    assert FedConfig.from_run_config({"method-schedule": "cca,avg"}).method_schedule == "cca,avg"
    cfg = FedConfig(**TINY)
    fit, held = probe_batches(cfg)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        CCAMerge(model_fn=lambda: build_global_model(cfg), probe=(fit, held), method_schedule=["cca", "nope"])
    # every scheduled method must be possible: CCA's gamma='auto' needs a server probe
    with pytest.raises(ValueError, match="gamma='auto'"):
        CCAMerge(model_fn=lambda: build_global_model(cfg), example_input=fit.example(), method="avg",
                 bn_reset=False, method_schedule="cca,avg")


def test_method_for_round():
    cfg = FedConfig(**TINY)
    fit, held = probe_batches(cfg)

    def strategy(**kw):
        return CCAMerge(model_fn=lambda: build_global_model(cfg), probe=(fit, held), **kw)

    s = strategy(method="cca")
    assert [s.method_for_round(r, r > 1) for r in (1, 2, 5)] == ["cca"] * 3
    s = strategy(method_schedule="cca,permute,avg")
    assert [s.method_for_round(r, True) for r in (1, 2, 3, 4, 9)] == ["cca", "permute", "avg", "avg", "avg"]
    assert s.scheduled_methods() == ("cca", "permute", "avg") and s.method == "cca"
    s = strategy(method="cca", method_schedule="auto")
    assert s.method_for_round(1, False) == "cca" and s.method_for_round(1, True) == "avg"
    assert s.method_for_round(2, True) == "avg" and s.method_for_round(3, False) == "cca"


def test_round_record_keeps_its_method():
    rec = RoundRecord(round=2, ok=True, method="avg")
    assert RoundRecord.from_dict(rec.to_dict()).method == "avg"
    assert RoundRecord.from_dict({"round": 1, "ok": False}).method is None   # state.json of older runs
    with pytest.raises(ValueError, match="method"):
        RoundRecord.from_dict({**rec.to_dict(), "method": "fedprox"})


class _KeepingGrid(InlineGrid):
    """An inline grid that keeps every training reply's weights and sample count, by round."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.replies: dict[int, list[tuple[dict, float]]] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == "train":
            rnd = int(messages[0].content.config_records["config"]["server-round"])
            self.replies[rnd] = [(r.content.array_records["arrays"].to_torch_state_dict(),
                                  float(r.content.metric_records["metrics"]["num-examples"])) for r in replies]
        return replies


@pytest.mark.parametrize("schedule", ["cca,avg", None])   # None: the service's default, "auto"
def test_cca_then_avg_federation(tmp_path, schedule):
    torch.set_num_threads(1)
    kw = {} if schedule is None else {"method_schedule": schedule}
    cfg = FedConfig(**TINY, num_server_rounds=3, out=str(tmp_path), **kw)
    assert cfg.method_schedule == (schedule or "auto")
    grid = _KeepingGrid(task_client_app(cfg.to_run_config()), 2)
    result = run_federation(grid, cfg)
    assert result["methods_per_round"] == {"1": "cca", "2": "avg", "3": "avg"}
    assert all(h["ok"] for h in result["rounds"]) and result["clients_rejected"] == []
    sent = [(int(m.content.config_records["config"]["server-round"]), m.metadata.message_type) for m in grid.sent]
    # round 1: CCA's two phases (weights + own statistics, then cross statistics); later rounds: weights only
    assert sent == [(1, "train")] * 2 + [(1, "query.cross_stats")] * 2 + [(2, "train")] * 2 + [(3, "train")] * 2
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    want = [bool(m.content.config_records["config"]["want-stats"]) for m in trains]
    assert want == [True, True, False, False, False, False]
    assert all(len(m.content.array_records["arrays"]) == 0 for m in trains[:2])   # round 1: own initialisations
    stats_bytes = [sum(h["bytes_statistics"].values()) for h in result["rounds"]]
    assert stats_bytes[0] > 0 and stats_bytes[1:] == [0, 0]
    # every client starts round 2 from the CCA-merged model, and round 2's global model is the plain
    # sample-weighted average of the round-2 client weights (FedAvg from a shared model)
    g2_in = [m.content.array_records["arrays"].to_torch_state_dict() for m in trains[2:4]]
    for k in g2_in[0]:
        assert torch.equal(g2_in[0][k], g2_in[1][k])
    g3_in = trains[4].content.array_records["arrays"].to_torch_state_dict()
    (s0, n0), (s1, n1) = grid.replies[2]
    for k, v in g3_in.items():
        avg = (n0 * s0[k].double() + n1 * s1[k].double()) / (n0 + n1)
        assert torch.allclose(v.double(), avg, atol=1e-6), k


def test_auto_averages_from_a_common_initialisation():
    cfg = FedConfig(**TINY, common_init=True)
    fit, held = probe_batches(cfg)
    s = CCAMerge(model_fn=lambda: build_global_model(cfg), probe=(fit, held), method="cca", method_schedule="auto")
    # round 1 with a common initial model: every client starts from the same weights
    assert s.method_for_round(1, from_global=True) == "avg"


def test_resume_of_a_run_saved_before_the_schedule_existed(tmp_path):
    """A state.json without ``method_schedule`` / ``augment`` ran with '' / True: resuming it with those
    values continues; with the new default ('auto') it is a different configuration, and says so."""
    import json

    kw = dict(TINY, method="avg", common_init=True, out=str(tmp_path), method_schedule="")
    run_federation(InlineGrid(task_client_app(FedConfig(**kw).to_run_config()), 2), FedConfig(**kw, num_server_rounds=1))
    state = json.loads((tmp_path / "state.json").read_text())
    for k in ("method_schedule", "augment"):
        state["config"].pop(k)
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="method_schedule: saved '', now 'auto'"):
        cfg = FedConfig(**{**kw, "method_schedule": "auto"}, num_server_rounds=2, resume=True)
        run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    cfg = FedConfig(**kw, num_server_rounds=2, resume=True)
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    assert result["rounds_completed"] == 2 and result["methods_per_round"] == {"1": "avg", "2": "avg"}
