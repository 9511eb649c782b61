"""The Flower service: the ClientApp called with messages, the strategy's two phases on a grid, bad replies,
the run config, and one real ``fedmerge simulate`` on Flower's simulation engine."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    RecordDict,
)

from fedmerge.client.app import LOCAL_KEY, task_client_app
from fedmerge.common.engine.merge import merge_models
from fedmerge.common.task.config import FedConfig
from fedmerge.common.task.loaders import build_global_model, probe_batches
from fedmerge.server.app import run_federation
from fedmerge.server.inline import InlineGrid, _ensure_task_identity
from fedmerge.server.strategy import CCAMerge

TINY = dict(dataset="cifar10-mini", arch="cnn", width=0.25, epochs=1, max_train=256, probe_size=120,
            max_test=200, batch_size=64, num_clients=3, min_clients=2)


def tiny(**kw) -> FedConfig:
    return FedConfig(**{**TINY, **kw})


def _msg(content, mtype, node=1):
    _ensure_task_identity()
    m = Message(content, dst_node_id=node, message_type=mtype)
    m.metadata.__dict__.update({"_message_id": "m1", "_src_node_id": 0, "_run_id": 1})
    return m


def test_client_app_called_with_messages(tmp_path):
    cfg = tiny(out=str(tmp_path))
    app = task_client_app(cfg.to_run_config())
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    # a query before training is refused with a clear error
    ref = build_global_model(cfg)
    q = _msg(RecordDict({"reference": ArrayRecord(ref.state_dict()), "config": ConfigRecord({})}),
             "query.cross_stats")
    with pytest.raises(Exception, match="before training"):
        app(q, ctx)
    reply = app(_msg(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}), "train"), ctx)
    c = reply.content
    assert set(c.array_records) == {"arrays", "own-stats"}
    sd = c.array_records["arrays"].to_torch_state_dict()
    assert sd.keys() == ref.state_dict().keys()
    m = c.metric_records["metrics"]
    assert m["num-examples"] == 256 and m["partition-id"] == 1 and 0 <= m["test-accuracy"] <= 1
    assert LOCAL_KEY in ctx.state.array_records
    # full-rank statistics: the query does not need the uploaded own statistics, so the client does not keep them
    # (a simulation holds every node's state in its driver)
    assert "fedmerge.own-stats" not in ctx.state.array_records
    reply = app(q, ctx)
    keys = list(reply.content.array_records["cross-stats"].keys())
    assert any(k.endswith(".c") for k in keys) and reply.content.metric_records["metrics"]["seconds-cross-stats"] > 0


def test_low_rank_query_reuses_the_statistics_sent_at_training(tmp_path, monkeypatch):
    """With stats_rank > 0 the cross block is whitened with the client's own statistics as it uploaded them at
    training: the query encodes only the reference's own block (not the client's again), and its reply equals a
    fresh computation's, array for array."""
    import fedmerge.client.protocol as protocol
    from fedmerge.common.wire.records import weights_digest

    cfg = tiny(out=str(tmp_path), stats_rank=2, stats_dtype="float16")
    app = task_client_app(cfg.to_run_config())
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    app(_msg(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}), "train"), ctx)
    assert protocol.OWN_KEY in ctx.state.array_records
    ref = build_global_model(cfg, seed=5)
    q = _msg(RecordDict({"reference": ArrayRecord(ref.state_dict()), "config": ConfigRecord({})}),
             "query.cross_stats")
    calls = {"encode_moments": 0, "own_statistics": 0}

    def counted(name):
        original = getattr(protocol, name)

        def wrapper(*a, **kw):
            calls[name] += 1
            return original(*a, **kw)
        return wrapper

    for name in calls:
        monkeypatch.setattr(protocol, name, counted(name))
    own_of = []
    collect = protocol.collect_statistics
    monkeypatch.setattr(protocol, "collect_statistics", lambda *a, **kw: own_of.append(kw.get("own_of")) or
                        collect(*a, **kw))
    got = app(q, ctx).content.array_records["cross-stats"]
    assert calls == {"encode_moments": 1, "own_statistics": 0}   # the reference's block only
    assert own_of == [[0]]   # the model's own block is not computed again either
    model = build_global_model(cfg)
    model.load_state_dict(ctx.state.array_records[LOCAL_KEY].to_torch_state_dict())
    fresh = protocol.cross_stats_records(ref, model, probe_batches(cfg)[0], reference_digest=weights_digest(
        ref.state_dict()), dtype="float16", rank=2)["cross-stats"]
    assert calls["encode_moments"] == 3   # recomputed: both own blocks encoded again
    assert any(k.endswith(".c.left") for k in got.keys()) and set(got.keys()) == set(fresh.keys())
    assert all(np.array_equal(got[k].numpy(), fresh[k].numpy()) for k in got.keys())

def test_server_assigns_partitions_when_nodes_have_none(tmp_path):
    cfg = tiny(out=str(tmp_path), num_clients=2, method="avg")
    grid = InlineGrid(task_client_app(cfg.to_run_config()), 2, node_config=lambda i: {})
    result = run_federation(grid, cfg)
    assert sorted(result["accuracy"]["clients_by_partition"]) == ["0", "1"]
    assert result["clients_rejected"] == []


def _saved_run(out, cfg, result):
    """What a run saved in ``out``: the client models (partition order), the global model, the clients'
    num-examples, the probe's fitting slice and 64 of its inputs."""
    from fedmerge.common.task.checkpoint import load_state

    def load(path):
        m = build_global_model(cfg)
        m.load_state_dict(load_state(path))
        return m.eval()

    parts = range(cfg.num_clients)
    models = [load(out / "clients" / f"client_{p}.safetensors") for p in parts]
    counts = [result["rounds"][0]["client_metrics"][str(p)]["num-examples"] for p in parts]
    fit, _ = probe_batches(cfg)
    return models, load(out / "global_model.safetensors"), counts, fit, torch.cat([b[0] for b in fit])[:64]


def test_two_phases_match_the_offline_merge(tmp_path):
    cfg = tiny(out=str(tmp_path), gamma="0.1", reference="0")
    grid = InlineGrid(task_client_app(cfg.to_run_config()), 3)
    result = run_federation(grid, cfg)
    types = [m.metadata.message_type for m in grid.sent]
    # phase 1 to all; phase 2 to all, the reference included (it must still hold the model it uploaded)
    assert types == ["train"] * 3 + ["query.cross_stats"] * 3
    assert result["clients_merged"] == [0, 1, 2] and result["reference"] == 0
    for key in ("merged", "clients", "ensemble", "average_of_clients"):
        assert result["accuracy"][key] is not None
    for key in ("training", "statistics", "transforms", "total"):
        assert result["timings"][key] >= 0
    assert set(result["bytes_uploaded"]) == {"0", "1", "2"}
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["method"] == "cca" and saved["config"]["num_clients"] == 3
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "global_model.safetensors").exists()
    # the same merge offline, from the saved client weights, gives the same model
    models, fed, counts, fit, x = _saved_run(tmp_path, cfg, result)
    offline = merge_models(models, fit, method="cca", reference=0, gamma=0.1, weights=counts)
    assert torch.allclose(fed.eval()(x), offline.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(300)   # a hang guard, not a speed assertion: it takes seconds on 2 cores
def test_twenty_clients_inline_round_of_a_tiny_model(tmp_path):
    """A 20-client CCA round (gamma chosen on the held-out probe, every reply checked and the cross blocks
    recomputed by the server) in one process; result.json times every phase of it. With gamma_clients=4 gamma
    is chosen on 4 clients (the reference among them), then all 20 are merged with it."""
    cfg = tiny(out=str(tmp_path), arch="mlp", width=0.0625, num_clients=20, max_train=32, probe_size=60,
               max_test=100, batch_size=32)
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 20), cfg)
    assert result["clients_merged"] == list(range(20)) and result["clients_rejected"] == []
    assert np.isfinite(result["accuracy"]["merged"]) and len(result["rounds"][0]["merge_info"]["gamma_scores"]) == 6
    per = result["timings"]["per_phase"]
    for key in ("phase1_wait", "verify_statistics", "select_reference", "phase2", "verify_cross_statistics", "merge",
                "merge_transforms", "merge_apply", "merge_evaluate", "merge_select_gamma"):
        assert per[key] >= 0, key
    assert result["rounds"][0]["merge_info"]["gamma_selected_on"] is None


def test_gamma_chosen_on_some_clients_in_a_federation(tmp_path):
    """--gamma-clients K: the run config reaches the strategy, gamma is chosen on K clients (the reference among
    them, named in result.json) and every client is merged; a value below 2, or another method, is an error."""
    cfg = tiny(out=str(tmp_path), arch="mlp", width=0.0625, num_clients=4, max_train=32, probe_size=60,
               max_test=100, gamma_clients=2)
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 4), cfg)
    on = result["rounds"][0]["merge_info"]["gamma_selected_on"]
    assert len(on) == 2 and result["reference"] in on and result["clients_merged"] == [0, 1, 2, 3]
    for bad in ({"gamma_clients": 1}, {"gamma_clients": -2}, {"gamma_clients": 3, "method": "permute"}):
        with pytest.raises(ValueError, match="gamma_clients"):
            tiny(**bad)
    with pytest.raises(ValueError, match="gamma_clients"):
        CCAMerge(model_fn=lambda: build_global_model(cfg), probe=probe_batches(cfg), method="zipit", gamma_clients=3)


@pytest.mark.parametrize("fault,phase,reason", [
    ("nan", "train", "NaN"), ("shape", "train", "shape"), ("drop-train", "train", "client error"),
    ("drop-query", "cross-statistics", "client error"), ("nan-query", "cross-statistics", "non-finite"),
    ("huge", "train", "exceeds the cap"),
])
def test_bad_client_is_rejected_and_round_goes_on(tmp_path, fault, phase, reason):
    cfg = tiny(out=str(tmp_path), faults=f"{fault}:2", reference="0", gamma="0.1")
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 3), cfg)
    rej = result["clients_rejected"]
    assert len(rej) == 1 and rej[0]["partition"] == 2 and rej[0]["phase"] == phase and reason in rej[0]["reason"]
    assert result["clients_merged"] == [0, 1] and result["rounds_completed"] == 1
    assert np.isfinite(result["accuracy"]["merged"])


def test_too_few_clients_keeps_previous_model(tmp_path):
    cfg = tiny(out=str(tmp_path), faults="nan:1,nan:2", min_clients=2, method="avg")
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 3), cfg)
    assert result["rounds_completed"] == 0 and len(result["clients_rejected"]) == 2
    assert result["rounds"][0]["ok"] is False and "min_clients" in result["rounds"][0]["error"]
    assert result["accuracy"]["merged"] is None


def test_multi_round_from_merged_model(tmp_path):
    cfg = tiny(out=str(tmp_path), num_clients=2, num_server_rounds=2, gamma="0.1")
    grid = InlineGrid(task_client_app(cfg.to_run_config()), 2)
    result = run_federation(grid, cfg)
    assert result["rounds_completed"] == 2 and set(result["accuracy"]["per_round"]) == {"1", "2"}
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains[0].content.array_records["arrays"]) == 0  # round 1: own inits
    assert len(trains[2].content.array_records["arrays"]) > 0   # round 2: the merged model


def test_run_config_is_checked():
    with pytest.raises(ValueError, match="unknown run-config key 'epoch'"):
        FedConfig.from_run_config({"epoch": 3})
    with pytest.raises(ValueError, match="method"):
        FedConfig.from_run_config({"method": "fedprox"})
    with pytest.raises(ValueError, match="cannot read"):
        FedConfig.from_run_config({"num-server-rounds": "two"})
    cfg = FedConfig.from_run_config({"num-server-rounds": 3, "common-init": "true", "gamma": "0.3"})
    assert cfg.num_server_rounds == 3 and cfg.common_init is True and cfg.gamma_value == 0.3
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg


def test_strategy_needs_probe_for_auto_choices():
    with pytest.raises(ValueError, match="gamma='auto'"):
        CCAMerge(model_fn=lambda: build_global_model(tiny()), example_input=torch.zeros(2, 3, 32, 32))
    s = CCAMerge(model_fn=lambda: build_global_model(tiny()), example_input=torch.zeros(2, 3, 32, 32), gamma=0.1)
    assert s.stats_where == "clients" and len(s.spec.groups) == 3


def test_fedmerge_simulate_on_flower_simulation_engine(tmp_path):
    out = tmp_path / "sim"
    cmd = [sys.executable, "-m", "fedmerge.cli", "simulate", "--backend", "ray", "--clients", "2", "--arch", "cnn",
           "--width", "0.25", "--epochs", "1", "--max-train", "256", "--probe-size", "120", "--max-test", "200",
           "--split", "dirichlet", "--alpha", "0.5", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "merged (cca)" in p.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["num_clients"] == 2 and result["clients_merged"] == [0, 1]
    assert (out / "accuracy.png").exists()


def test_resume_continues_without_losing_or_repeating_rounds(tmp_path):
    cfg = tiny(out=str(tmp_path), num_clients=2, num_server_rounds=2, method="avg")
    first = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    assert first["rounds_completed"] == 2
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["round"] == 2 and (tmp_path / "checkpoints" / state["model"]).exists()
    more = tiny(out=str(tmp_path), num_clients=2, num_server_rounds=3, method="avg", resume=True)
    grid = InlineGrid(task_client_app(more.to_run_config()), 2)
    result = run_federation(grid, more)
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 2 and all(m.content.config_records["config"]["server-round"] == 3 for m in trains)
    assert len(trains[0].content.array_records["arrays"]) > 0  # continues from the saved global model
    assert [h["round"] for h in result["rounds"]] == [1, 2, 3] and set(result["accuracy"]["per_round"]) == {"1", "2", "3"}
    with pytest.raises(ValueError, match="different configuration"):
        run_federation(grid, tiny(out=str(tmp_path), num_clients=2, method="cca", resume=True))


def test_kill_and_resume_loses_no_round(tmp_path):
    """kill -9 the simulation mid-run, resume it: every round is done exactly once."""
    import os
    import signal
    import time
    out = tmp_path / "run"
    base = [sys.executable, "-m", "fedmerge.cli", "simulate", "--backend", "inline", "--clients", "2", "--arch", "cnn",
            "--width", "0.25", "--epochs", "1", "--max-train", "256", "--probe-size", "120", "--max-test", "200",
            "--method", "avg", "--rounds", "4", "--out", str(out)]
    p = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        st = out / "state.json"
        if st.exists() and json.loads(st.read_text())["round"] >= 2:
            break
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = json.loads((out / "state.json").read_text())["round"]
    assert 2 <= killed_at < 4
    r = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert [h["round"] for h in result["rounds"]] == [1, 2, 3, 4] and result["rounds_completed"] == 4


def test_slow_client_past_the_timeout_is_dropped(tmp_path):
    # the slow client sleeps past the timeout (timeout + 5 s); the others must answer well within it, even on a
    # loaded 2-core machine
    cfg = tiny(out=str(tmp_path), faults="slow:2", reference="0", gamma="0.1", timeout=20.0)
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 3), cfg)
    rej = result["clients_rejected"]
    assert [r["partition"] for r in rej] == [2] and "timed out" in rej[0]["reason"]
    assert result["clients_merged"] == [0, 1]


@pytest.mark.slow
def test_soak_twenty_rounds_with_random_faults(tmp_path):
    """20 rounds, a fault injected in a random round/client for every kind: each one is rejected exactly where
    it happened, no round is lost, and the final model is finite."""
    rng = np.random.default_rng(7)
    kinds = ["nan", "shape", "huge", "drop-train", "drop-query", "nan-query", "nan", "shape", "drop-train"]
    rounds = rng.choice(np.arange(1, 21), size=len(kinds), replace=False)
    planned = [(k, int(r), int(rng.integers(1, 3))) for k, r in zip(kinds, rounds)]  # clients 1..2 (0 = reference)
    faults = ",".join(f"{k}@{r}:{c}" for k, r, c in planned)
    cfg = tiny(out=str(tmp_path), faults=faults, reference="0", gamma="0.1", num_server_rounds=20, max_train=128,
               max_test=100, method_schedule="")   # CCA (and its statistics query) in every round
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 3), cfg)
    got = sorted((r["round"], r["partition"]) for r in result["clients_rejected"])
    assert got == sorted((r, c) for _, r, c in planned)
    assert result["rounds_completed"] == 20 and all(h["ok"] for h in result["rounds"])
    from fedmerge.common.task.checkpoint import load_state
    assert all(torch.isfinite(v).all() for v in load_state(tmp_path / "global_model.safetensors").values()
               if v.is_floating_point())


@pytest.mark.parametrize("method,on_server", [("cca", True), ("zipit", False), ("weight_matching", False),
                                              ("permute", False), ("ot", False), ("merge_many", False)])
def test_every_method_through_the_strategy(tmp_path, method, on_server):
    cfg = tiny(out=str(tmp_path), method=method, stats_on_server=on_server, reference="0", gamma="0.1")
    grid = InlineGrid(task_client_app(cfg.to_run_config()), 3)
    result = run_federation(grid, cfg)
    types = [m.metadata.message_type for m in grid.sent]
    # statistics computed by the server (its own probe) or not needed: one phase only
    two_phase = method in ("cca", "permute", "ot") and not on_server
    assert types.count("query.cross_stats") == (3 if two_phase else 0)
    assert result["clients_merged"] == [0, 1, 2] and result["accuracy"]["merged"] is not None
    if not two_phase:
        own = [m for m in grid.sent if m.metadata.message_type == "train"]
        assert all(m.content.config_records["config"]["want-stats"] is False for m in own)


def test_repair_target_through_the_strategy(tmp_path):
    """repair_target reaches the strategy from the run config; the federated merge with REPAIR to the reference's
    statistics equals the offline one (same models, probe slice, gamma, weights), and differs from REPAIR to the
    average; unknown targets are errors everywhere."""
    cfg = tiny(out=str(tmp_path), num_clients=2, arch="mlp", gamma="0.1", reference="0", repair=True,
               repair_target="reference")
    assert FedConfig.from_run_config(cfg.to_run_config()).repair_target == "reference"
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    assert result["rounds"][0]["merge_info"]["repair_target"] == "reference"
    models, fed, counts, fit, x = _saved_run(tmp_path, cfg, result)
    outs = {t: merge_models(models, fit, method="cca", reference=0, gamma=0.1, weights=counts, repair=True,
                            repair_target=t).eval()(x) for t in ("reference", "average")}
    assert torch.allclose(fed.eval()(x), outs["reference"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs["average"], outs["reference"], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="repair_target"):
        tiny(repair_target="median")
    with pytest.raises(ValueError, match="repair_target"):
        CCAMerge(model_fn=lambda: build_global_model(tiny()), example_input=torch.zeros(2, 3, 32, 32), gamma=0.1,
                 repair_target="median")


def test_clients_without_the_query_handler_fail_the_round_with_one_clear_reason(tmp_path):
    """ClientApps that never registered the cross-statistics query: the round fails once, saying that no client
    answered the query and what a ClientApp must register, instead of blaming one reference after another."""
    from flwr.clientapp import ClientApp

    from fedmerge.server.strategy import RoundFailedError

    cfg = tiny(out=str(tmp_path), num_clients=2, arch="mlp", gamma="0.1", reference="0")
    full = task_client_app(cfg.to_run_config())
    app = ClientApp()

    @app.train()
    def train_only(msg, context):
        return full(msg, context)

    grid = InlineGrid(app, 2)
    strategy = CCAMerge(model_fn=lambda: build_global_model(cfg), probe=probe_batches(cfg), gamma=0.1, reference=0,
                        on_failed_round="raise")
    with pytest.raises(RoundFailedError, match="no client answered the cross-statistics query .*No query function "
                                               "registered.*must answer 'query.cross_stats'"):
        strategy.start(grid, ArrayRecord(), num_rounds=1)
    assert [r["phase"] for r in strategy.history[0].clients_rejected] == []


def test_bn_fold_through_the_strategy_equals_the_offline_merge(tmp_path):
    """bn_fold from the run config to CCAMerge: the federated merge of BatchNorm clients equals merge_models with
    bn_fold=True on the same models, probe slice, gamma and weights; combined with np_merge it is refused."""
    cfg = tiny(out=str(tmp_path), num_clients=2, arch="resnet20", gamma="0.1", reference="0", bn_fold=True)
    assert FedConfig.from_run_config(cfg.to_run_config()).bn_fold is True
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    info = result["rounds"][0]["merge_info"]
    assert info["bn_fold"] is True and info["bn_reset"] is False
    models, fed, counts, fit, x = _saved_run(tmp_path, cfg, result)
    offline = merge_models(models, fit, method="cca", reference=0, gamma=0.1, weights=counts, bn_fold=True)
    assert torch.allclose(fed.eval()(x), offline.eval()(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bn_fold and np_merge"):
        CCAMerge(model_fn=lambda: build_global_model(cfg), probe=probe_batches(cfg), bn_fold=True, np_merge=True)


def test_from_config_builds_what_the_config_describes():
    cfg = tiny(method="zipit", reference="1", gamma="0.1", repair=True, norm_bound=0.0, method_schedule="zipit,avg",
               num_clients=4, min_clients=3)
    s = CCAMerge.from_config(cfg, max_examples=7)
    assert (s.base_method, s.reference, s.gamma, s.repair, s.norm_bound) == ("zipit", 1, 0.1, True, None)
    assert (s.num_clients, s.min_clients, s.query_timeout, s.max_examples) == (4, 3, cfg.timeout, 7)
    assert s.method_schedule == ("zipit", "avg") and s.fit.num_samples == probe_batches(cfg)[0].num_samples
    assert CCAMerge.from_config(cfg, method="cca", method_schedule=None).method == "cca"   # overrides win
    assert s.grid is None   # attached by start(), never by configure_train


def test_one_reference_record_carries_the_merged_reference_weights(tmp_path):
    """Phase 2 sends every client one record of the reference's weights, encoded once from the weights the
    server merges, and the digest every client echoes is the one of those weights."""
    cfg = tiny(out=str(tmp_path), reference="0", gamma="0.1", num_clients=2, method_schedule="")
    grid = InlineGrid(task_client_app(cfg.to_run_config()), 2)
    strategy = CCAMerge.from_config(cfg, reference=0)
    strategy.start(grid, ArrayRecord(), num_rounds=1, timeout=cfg.timeout)
    assert strategy.history[-1].ok and strategy.grid is grid
    query = [m for m in grid.sent if m.metadata.message_type == "query.cross_stats"]
    sent = query[0].content.array_records["reference"]
    assert all(q.content.array_records["reference"] is sent for q in query)
    ref_state = strategy.last_states[0]
    assert sent.to_torch_state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in sent.to_torch_state_dict().items())


def test_ray_workers_bound_the_concurrent_clients():
    """``--ray-workers K``: each client asks Ray for cpus // K CPUs, so at most K run at once (one per CPU by
    default, never more than the clients); a bad value is a usage error."""
    from fedmerge.cli import main
    from fedmerge.common.task.config import FedConfig
    from fedmerge.simulate import ray_backend_config

    cfg = FedConfig(num_clients=100)
    assert ray_backend_config(cfg, None, 16)["client_resources"]["num_cpus"] == 1
    assert ray_backend_config(cfg, 1, 16)["client_resources"]["num_cpus"] == 16
    assert ray_backend_config(cfg, 4, 16)["client_resources"]["num_cpus"] == 4
    assert ray_backend_config(FedConfig(num_clients=2), None, 16)["client_resources"]["num_cpus"] == 8
    assert ray_backend_config(cfg, 64, 16)["init_args"]["num_cpus"] == 16
    for k in range(1, 17):   # slots = CPUs Ray has // CPUs a client asks for: exactly k, whatever k
        bc = ray_backend_config(cfg, k, 16)
        assert bc["init_args"]["num_cpus"] // bc["client_resources"]["num_cpus"] == k
    with pytest.raises(SystemExit):
        main(["simulate", "--ray-workers", "0"])
    assert main(["simulate", "--backend", "inline", "--ray-workers", "2"]) == 2   # not ignored: an error
    from fedmerge.simulate import simulate

    with pytest.raises(ValueError, match="ray backend"):
        simulate(cfg, backend="inline", ray_workers=2)
