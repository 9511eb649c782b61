"""Every client reply is untrusted input: each attack found against the server is a test here, at the strategy
level (honest replies recorded once from the real ClientApp, one client's reply mutated) and end to end
through the ServerApp's federation (the run finishes, result.json names the right client and reason, the
merged model is finite and within the stated norm bound)."""
import json
import math

import adversary as adv
import numpy as np
import pytest
import torch
from adversary import ATTACKER, QUERY_CROSS
from flwr.app import Array, ArrayRecord

from fedmerge.common.engine.stats import Moments
from fedmerge.common.wire.records import WireError, decode_array
from fedmerge.server.checks import ReplyRejected, norm_outliers, read_int, weight_norm


@pytest.fixture(scope="module")
def kit():
    return adv.record_honest()


# --- decoding before allocation ----------------------------------------------------------------------------------
def test_decode_array_checks_before_allocating():
    good = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert decode_array(good, "w", (2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]
    cases = {
        "declared shape": adv.raw("float32", (2, 3), adv.npy(np.zeros(3, np.float32))),
        "header claims": adv.raw("float32", (10 ** 6, 10 ** 6),
                                 adv.npy_with_header("{'descr': '<f4', 'fortran_order': False, "
                                                     "'shape': (1000000, 1000000), }")),
        "not numeric": adv.raw("object", (2,), adv.npy_with_header(
            "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", b"\0" * 16)),
        "unsupported serialization": adv.raw("float32", (3,), adv.npy(np.zeros(3, np.float32)), "torch.save"),
        "bad magic": adv.raw("float32", (3,), b"PK\x03\x04" + b"\0" * 40),
        "structured": adv.raw("float32", (1,), adv.npy(np.zeros(1, dtype=[("a", "<f4")]))),
        "unreadable npy header": adv.raw("float32", (3,), adv.npy_with_header("__import__('os')")),
        "declared dtype": adv.raw("float64", (3,), adv.npy(np.zeros(3, np.float32))),
        "expected": good,
    }
    for reason, arr in cases.items():
        with pytest.raises(WireError, match=reason):
            decode_array(arr, "w", (3, 2) if reason == "expected" else None)
    # other byte order and Fortran order are read as what they are
    be = Array(np.arange(4, dtype=">f4"))
    assert decode_array(be, "b").dtype == np.float32 and decode_array(be, "b").tolist() == [0, 1, 2, 3]
    f = Array(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    assert decode_array(f, "f").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_integer_metrics_and_norm_anchor_rules():
    assert read_int(256, "n", 1, 300) == 256 and read_int(256.0, "n", 1, 300) == 256
    for bad in (1.5, float("nan"), float("inf"), 1e308, [3], True, "7"):
        with pytest.raises(ReplyRejected):
            read_int(bad, "n", 1, 10 ** 12)
    # two honest clients near the server's own norm, one scaled x1000: the anchor stays with the honest ones
    anchor, out = norm_outliers([10.0, 11.0, 10500.0], trusted=9.0, factor=10)
    assert out == [2] and 9.0 <= anchor <= 11.0
    anchor, out = norm_outliers([10.0, 0.001], trusted=9.0, factor=10)  # with two clients, a shrunk one too
    assert out == [1] and anchor == 9.0
    big = {"w": torch.full((4,), 3.0e38)}
    assert math.isfinite(weight_norm(big))  # float64 accumulation: no overflow


# --- every attack, at the strategy level ----------------------------------------------------------------------------
TRAIN, CROSS = "train", QUERY_CROSS


def _indefinite(b: Moments) -> Moments:
    """Positive variances, but units 0 and 1 covary 4x more than Cauchy-Schwarz allows (eigenvalue < 0)."""
    m2 = b.m2.clone()
    m2[0, 1] = m2[1, 0] = 4 * torch.sqrt(m2[0, 0] * m2[1, 1]) + 1.0
    return Moments(b.n, b.mean, m2)

ROWS = [
    # crashes of the whole run before
    ("payload-not-declared-shape", TRAIN, adv.set_array("arrays", adv.first_weight, lambda a: adv.raw(
        a.dtype, a.shape, adv.npy(np.zeros(3, np.float32)))), "declared shape"),
    ("npy-header-enormous", TRAIN, adv.set_array("arrays", adv.first_weight, lambda a: adv.raw(
        a.dtype, a.shape, adv.npy_with_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000, 4000000000), }"))), "declared shape"),
    ("object-payload", TRAIN, adv.set_array("arrays", adv.first_weight, lambda a: adv.raw(
        a.dtype, a.shape, adv.npy_with_header(f"{{'descr': '|O', 'fortran_order': False, 'shape': {tuple(a.shape)}, }}",
                                              b"\0" * 8 * int(np.prod(a.shape))))), "not numeric"),
    ("unknown-serialization", TRAIN, adv.set_array("arrays", adv.first_weight, lambda a: adv.raw(
        a.dtype, a.shape, a.data, "torch.save")), "unsupported serialization"),
    ("partition-id-nan", TRAIN, adv.set_metric("partition-id", float("nan")), "partition-id"),
    ("partition-id-inf", TRAIN, adv.set_metric("partition-id", float("inf")), "partition-id"),
    ("partition-id-list", TRAIN, adv.set_metric("partition-id", [1.0, 2.0]), "partition-id"),
    ("probe-accuracy-list", TRAIN, adv.set_metric("probe-accuracy", [0.5]), "probe-accuracy"),
    ("seconds-cross-stats-list", CROSS, adv.set_metric("seconds-cross-stats", [1.0, 2.0]), "seconds-cross-stats"),
    ("own-covariance-zero", TRAIN, adv.own_blocks(lambda b: Moments(b.n, b.mean, b.m2 * 0)), "covariance is zero"),
    ("own-covariance-1e300", TRAIN, adv.own_blocks(lambda b: Moments(
        b.n, b.mean, 1e300 * torch.eye(b.m2.shape[0], dtype=torch.float64))), "activation scale"),
    ("float16-scales-at-the-limit", TRAIN, adv.scales_near_limit, "activation scale"),
    ("weights-near-float32-max", TRAIN, lambda rd: adv.set_weight(rd, lambda a: np.sign(a) * 3.0e38), "weight norm"),
    # poisonings accepted before
    ("probe-accuracy-1e9", TRAIN, adv.set_metric("probe-accuracy", 1e9), "probe-accuracy"),
    ("num-examples-1e12", TRAIN, adv.set_metric("num-examples", 10 ** 12), "num-examples"),
    ("num-examples-2^62", TRAIN, adv.set_metric("num-examples", 2 ** 62), "num-examples"),
    ("num-examples-1.5", TRAIN, adv.set_metric("num-examples", 1.5), "num-examples"),
    ("weights-1e30", TRAIN, lambda rd: adv.set_weight(rd, lambda a: np.sign(a) * 1e30), "weight norm"),
    ("weights-x1000", TRAIN, lambda rd: adv.set_weight(rd, lambda a: a * 1000), "weight norm"),
    ("own-covariance-not-psd", TRAIN, adv.own_blocks(_indefinite), "positive semidefinite"),
    ("own-covariance-negative-variance", TRAIN, adv.own_blocks(lambda b: Moments(
        b.n, b.mean, b.m2 - 2 * torch.trace(b.m2) * torch.outer(*(2 * [torch.linalg.eigh(b.m2)[1][:, -1]])))),
     "negative variance"),
    ("sample-count-2^62", TRAIN, adv.own_blocks(lambda b: Moments(2 ** 62, b.mean, b.m2)), "samples"),
    ("statistics-on-another-probe", TRAIN, adv.echo("probe-digest", "0" * 64), "different probe"),
    ("no-probe-digest", TRAIN, lambda rd: rd.config_records.pop("fedmerge"), "probe digest"),
    ("claims-another-partition", TRAIN, adv.set_metric("partition-id", 0), "claims partition 0"),
    ("cross-against-another-reference", CROSS, adv.echo("reference-digest", "f" * 64), "another reference"),
    ("cross-not-psd", CROSS, adv.set_array("cross-stats", lambda rd: next(
        k for k in rd.array_records["cross-stats"].keys() if k.endswith(".c")),
        lambda a: Array(a.numpy() * 50)), "Cauchy-Schwarz"),
    ("cross-seconds-negative", CROSS, adv.set_metric("seconds-cross-stats", -5.0), "seconds-cross-stats"),
]


@pytest.mark.parametrize("name,phase,mutate,reason", ROWS, ids=[r[0] for r in ROWS])
def test_attack_is_rejected_and_the_round_goes_on(kit, name, phase, mutate, reason):
    strategy, rec, arrays = adv.run_round(kit, {(phase, ATTACKER): mutate}, reference=0,
                                          max_examples=adv.partition_sizes(kit))
    rej = rec.clients_rejected
    assert [(r["partition"], r["phase"]) for r in rej] == [(ATTACKER, "train" if phase == TRAIN else "cross-statistics")]
    assert reason in rej[0]["reason"], rej[0]["reason"]
    assert rec.ok and rec.clients_merged == [0, 1] and adv.finite_state(arrays)
    assert weight_norm(arrays.to_torch_state_dict()) <= 10 * rec.merge_info["norm_anchor"]


@pytest.mark.parametrize("name,phase,mutate,reason", ROWS, ids=[r[0] for r in ROWS])
def test_attack_end_to_end_through_the_server_app(tmp_path, name, phase, mutate, reason):
    """The same attack from the real ClientApp through the ServerApp's federation: the run finishes,
    result.json names the client (by the server's map) and the reason, the merged model is finite and within
    the norm bound."""
    from fedmerge.client.app import task_client_app
    from fedmerge.common.task.checkpoint import load_state
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = adv.tiny(out=str(tmp_path), reference="0")
    app = adv.mutating_app(task_client_app(cfg.to_run_config()), {(phase, ATTACKER): mutate})
    run_federation(InlineGrid(app, 3), cfg)
    saved = json.loads((tmp_path / "result.json").read_text())
    rej = saved["clients_rejected"]
    assert [(r["partition"], r["phase"]) for r in rej] == [(ATTACKER, "train" if phase == TRAIN else "cross-statistics")]
    assert reason in rej[0]["reason"], rej[0]["reason"]
    assert saved["clients_merged"] == [0, 1] and saved["error"] is None and np.isfinite(saved["accuracy"]["merged"])
    merged = load_state(tmp_path / "global_model.safetensors")
    assert weight_norm(merged) <= 10 * saved["rounds"][0]["merge_info"]["norm_anchor"]


def test_every_client_claiming_1e308_examples_fails_the_round_cleanly(kit):
    muts = {(TRAIN, p): adv.set_metric("num-examples", 1e308) for p in range(3)}
    strategy, rec, arrays = adv.run_round(kit, muts)
    assert not rec.ok and "min_clients" in rec.error and len(arrays) == 0
    assert sorted(r["partition"] for r in rec.clients_rejected) == [0, 1, 2]
    assert all("num-examples" in r["reason"] for r in rec.clients_rejected)


def _scaled_statistics(s: float):
    """Own blocks x s and cross blocks x sqrt(s): every check that compares blocks with each other passes."""
    from fedmerge.common.engine.stats import CrossMoments

    return {(TRAIN, ATTACKER): adv.own_blocks(lambda b: Moments(b.n, b.mean, b.m2 * s)),
            (CROSS, ATTACKER): adv.cross_blocks(lambda b: CrossMoments(b.n, b.mean_a, b.mean_b, b.c * s ** 0.5))}


def test_own_statistics_are_checked_against_the_uploaded_weights(kit):
    """Statistics that agree with each other but not with the weights (own x 1e-6, cross x 1e-3): with a server
    probe the server recomputes every own block from the uploaded weights, rejects the liar, and merges with
    its own blocks."""
    strategy, rec, arrays = adv.run_round(kit, _scaled_statistics(1e-6), reference=0)
    assert [(r["partition"], r["phase"]) for r in rec.clients_rejected] == [(ATTACKER, "train")]
    assert "variances differ from the uploaded weights" in rec.clients_rejected[0]["reason"]
    assert rec.ok and rec.clients_merged == [0, 1] and "verify_statistics" in rec.timings


@pytest.mark.parametrize("s", [1e-6, 1e-80])
def test_without_a_server_probe_a_merge_that_fails_names_the_client_and_merges_the_others(kit, s):
    """No server probe, so own blocks cannot be recomputed: the same lie makes the merge leave the norm bound
    (1e-6) or overflow (1e-80). The reference merged with each client alone finds the culprit, which is
    rejected, and the others are merged."""
    strategy, rec, arrays = adv.run_round(kit, _scaled_statistics(s), reference=0, probe=None,
                                          example_input=torch.zeros(2, 3, 32, 32), bn_reset=False)
    assert rec.blamed == [ATTACKER]
    assert [(r["partition"], r["phase"]) for r in rec.clients_rejected] == [(ATTACKER, "merge")]
    assert rec.ok and rec.clients_merged == [0, 1] and adv.finite_state(arrays)
    assert weight_norm(arrays.to_torch_state_dict()) <= 10 * rec.merge_info["norm_anchor"]


def test_a_lying_reference_is_replaced_not_the_honest_clients(kit):
    """Without a server probe, a reference whose own blocks (and self-cross) are x1e-2 makes every other
    client's cross block fail the checks: the reference is blamed and replaced."""
    from fedmerge.common.engine.stats import CrossMoments

    muts = {(TRAIN, 2): adv.own_blocks(lambda b: Moments(b.n, b.mean, b.m2 * 1e-2)),
            (CROSS, 2): adv.cross_blocks(lambda b: CrossMoments(b.n, b.mean_a, b.mean_b, b.c * 1e-2))}
    strategy, rec, arrays = adv.run_round(kit, muts, reference=2, probe=None,
                                          example_input=torch.zeros(2, 3, 32, 32), bn_reset=False)
    assert [(r["partition"], r["phase"]) for r in rec.clients_rejected] == [(2, "cross-statistics")]
    assert rec.clients_rejected[0]["reason"].startswith("as reference") and "reference mismatch" in \
        rec.clients_rejected[0]["reason"]
    assert rec.ok and rec.clients_merged == [0, 1]


def test_a_rejected_reply_never_takes_a_partition(kit):
    """The node proposed partition 0 claims partition 2 with a reply that has no weights: it is rejected and
    partition 2 stays with its owner, in this round and the next."""
    def empty_claim(rd):
        rd.array_records.pop("arrays")
        rd.metric_records["metrics"]["partition-id"] = 2
    strategy = adv.make_strategy(kit.cfg, reference=0, max_examples=adv.partition_sizes(kit))
    grid = adv.InlineGrid(adv.replay_app(kit, {(TRAIN, 0): empty_claim}), 3)
    strategy.start(grid, ArrayRecord(), num_rounds=2)
    assert [[(r["partition"], r["reason"][:20]) for r in h.clients_rejected] for h in strategy.history] == \
        [[(2, "reply has no 'arrays")], [(0, "claims partition 2, ")]]
    # round 1: a rejected reply is named by the partition it claims (its own, as under Ray); round 2: partition
    # 2 is registered to its owner, the claim is refused and the node is named by its proposal
    assert [h.clients_merged for h in strategy.history] == [[1, 2], [1, 2]]
    assert sorted(strategy.partitions.values()) == [1, 2]


def test_norm_clip_keeps_the_client_within_the_bound(kit):
    """norm_action='clip': a client 1000x the honest scale is scaled back to 10x the anchor. Averaging then stays
    within the bound; CCA, which keeps each model's function, would carry the clipped model's scaled logits
    into the merge, so the merged model leaves the bound and that client is dropped from the merge, named."""
    mutate = lambda rd: adv.set_weight(rd, lambda a: a * 1000)  # noqa: E731
    strategy, rec, arrays = adv.run_round(kit, {(TRAIN, ATTACKER): mutate}, method="avg", norm_action="clip")
    assert rec.ok and rec.clients_merged == [0, 1, 2] and rec.clients_rejected == []
    scale = rec.clients_clipped[ATTACKER]
    assert 0 < scale < 0.1  # 1000x the honest norm brought back to <= 10x the anchor
    bound = 10 * rec.merge_info["norm_anchor"] * (1 + 1e-6)
    assert weight_norm(strategy.last_states[ATTACKER]) <= bound and weight_norm(arrays.to_torch_state_dict()) <= bound
    strategy, rec, arrays = adv.run_round(kit, {(TRAIN, ATTACKER): mutate}, reference=0, norm_action="clip")
    assert ATTACKER in rec.clients_clipped and rec.blamed == [ATTACKER]
    assert [(r["partition"], r["phase"]) for r in rec.clients_rejected] == [(ATTACKER, "merge")]
    assert rec.ok and rec.clients_merged == [0, 1] and weight_norm(arrays.to_torch_state_dict()) <= bound


def test_duplicate_and_unsampled_replies_are_rejected(kit):
    strategy, rec, _ = adv.run_round(kit, {}, grid_cls=adv.ExtraReplyGrid, grid_kw={"duplicate_of": 1}, reference=0)
    assert [(r["partition"], r["reason"]) for r in rec.clients_rejected] == [(1, "a second reply from this node in "
                                                                              "this phase")]
    assert rec.ok and rec.clients_merged == [0, 1, 2]
    strategy, rec, _ = adv.run_round(kit, {}, grid_cls=adv.ExtraReplyGrid, grid_kw={"stranger": 4242}, reference=0)
    assert [(r["node"], r["partition"]) for r in rec.clients_rejected] == [(4242, -1)]
    assert "not sampled" in rec.clients_rejected[0]["reason"] and rec.clients_merged == [0, 1, 2]


def test_cross_statistics_against_another_reference_with_a_lying_digest(kit):
    """The client echoes the right digest but sends cross statistics computed against another reference: the
    reference side's means give it away."""
    def stale(rd):
        honest_digest = rd.config_records["fedmerge"]["reference-digest"]
        rd.array_records["cross-stats"] = kit.cross[(1, ATTACKER)].array_records["cross-stats"]
        rd.config_records["fedmerge"]["reference-digest"] = honest_digest
    strategy, rec, arrays = adv.run_round(kit, {(CROSS, ATTACKER): stale}, reference=0)
    assert [r["partition"] for r in rec.clients_rejected] == [ATTACKER]
    assert "reference mismatch" in rec.clients_rejected[0]["reason"] and rec.clients_merged == [0, 1]


def test_reference_that_fails_in_the_statistics_phase_is_replaced(kit):
    def drop(rd):
        rd.array_records.pop("cross-stats")
    strategy, rec, arrays = adv.run_round(kit, {(CROSS, 0): drop}, reference=0)
    assert [(r["partition"], r["phase"]) for r in rec.clients_rejected] == [(0, "cross-statistics")]
    assert rec.clients_rejected[0]["reason"].startswith("as reference")
    assert rec.ok and rec.clients_merged == [1, 2] and rec.reference in (1, 2) and adv.finite_state(arrays)


def test_probe_accuracy_is_bounded_and_ignored_when_the_server_scores(kit):
    # a client claiming probe accuracy 1e9 is rejected
    strategy, rec, _ = adv.run_round(kit, {(TRAIN, ATTACKER): adv.set_metric("probe-accuracy", 1e9)})
    assert [r["partition"] for r in rec.clients_rejected] == [ATTACKER] and "probe-accuracy" in \
        rec.clients_rejected[0]["reason"]
    # a believable lie (1.0) does not make it the reference: the server scores the held-out probe itself
    strategy, rec, _ = adv.run_round(kit, {(TRAIN, ATTACKER): adv.set_metric("probe-accuracy", 1.0)})
    honest, _ = adv.run_round(kit, {})[1:]
    assert rec.merge_info["reference_rule"] == "held-out probe accuracy"
    assert rec.reference == honest.reference
    # without a server probe, the reported accuracy (bounded to [0, 1]) chooses
    strategy, rec, _ = adv.run_round(kit, {(TRAIN, ATTACKER): adv.set_metric("probe-accuracy", 1e9)},
                                     probe=None, example_input=torch.zeros(2, 3, 32, 32), bn_reset=False)
    assert [r["partition"] for r in rec.clients_rejected] == [ATTACKER]
    assert rec.merge_info["reference_rule"].startswith("client-reported")


def test_weighted_average_cannot_be_steered_by_counts(kit):
    """method=avg weights by num-examples: the counts are bounded by the partition sizes the server knows, and
    by 10^9 when it knows none."""
    sizes = adv.partition_sizes(kit)
    strategy, rec, _ = adv.run_round(kit, {(TRAIN, ATTACKER): adv.set_metric("num-examples", 10 ** 12)}, method="avg")
    assert [r["partition"] for r in rec.clients_rejected] == [ATTACKER] and "num-examples" in \
        rec.clients_rejected[0]["reason"]
    strategy, rec, arrays = adv.run_round(kit, {(TRAIN, ATTACKER): adv.set_metric("num-examples", sizes[2] + 1)},
                                          method="avg", max_examples=sizes)
    assert [r["partition"] for r in rec.clients_rejected] == [ATTACKER] and "exceeds partition 2" in \
        rec.clients_rejected[0]["reason"]
    assert rec.merge_info["weights"] == pytest.approx([sizes[0] / (sizes[0] + sizes[1]), sizes[1] / (sizes[0] + sizes[1])])


def test_identity_is_the_servers_map_across_rounds(kit):
    """A node's partition is fixed by its first reply; afterwards claiming another one is rejected."""
    strategy, rec, _ = adv.run_round(kit, {})
    nodes = sorted(strategy.partitions)
    assert [strategy.partitions[n] for n in nodes] == [0, 1, 2]
    with pytest.raises(ReplyRejected, match="is partition 0"):
        strategy._identify(nodes[0], 1)
    assert strategy._identify(nodes[0], None) == 0


# --- end to end through the ServerApp's federation (real clients, fault kinds) ---------------------------------------
E2E = [("bytes", "train", "declared shape"), ("count", "train", "num-examples"), ("scale", "train", "weight norm"),
       ("nonpsd", "train", "positive semidefinite"), ("partition", "train", "claims partition"),
       ("stale-ref", "cross-statistics", "another reference")]


@pytest.mark.parametrize("fault,phase,reason", E2E, ids=[e[0] for e in E2E])
def test_fault_kind_end_to_end(tmp_path, fault, phase, reason):
    from fedmerge.client.app import task_client_app
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = adv.tiny(out=str(tmp_path), faults=f"{fault}:2", reference="0")
    run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 3), cfg)
    saved = json.loads((tmp_path / "result.json").read_text())
    rej = saved["clients_rejected"]
    assert [(r["partition"], r["phase"]) for r in rej] == [(2, phase)] and reason in rej[0]["reason"]
    assert saved["clients_merged"] == [0, 1] and saved["rounds_completed"] == 1 and saved["error"] is None
    assert np.isfinite(saved["accuracy"]["merged"])
    from fedmerge.common.task.checkpoint import load_state
    merged = load_state(tmp_path / "global_model.safetensors")
    assert weight_norm(merged) <= 10 * saved["rounds"][0]["merge_info"]["norm_anchor"]


def test_reference_dropping_out_of_the_query_end_to_end(tmp_path):
    from fedmerge.client.app import task_client_app
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = adv.tiny(out=str(tmp_path), faults="drop-query:0", reference="0")
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 3), cfg)
    assert [(r["partition"], r["phase"]) for r in result["clients_rejected"]] == [(0, "cross-statistics")]
    assert result["clients_merged"] == [1, 2] and result["reference"] in (1, 2)


def test_unknown_fault_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown fault kind 'nann'"):
        adv.tiny(faults="nann:1")
    with pytest.raises(ValueError, match="KIND"):
        adv.tiny(faults="nan:one")


@pytest.mark.parametrize("field,value,match", [
    ("round", "2", "field 'round' must be a int"), ("round", 99, "outside"),
    ("model", "../../etc/passwd", "field 'model'"), ("model_sha256", "0" * 64, "checksum"),
    ("partitions", {"5": 0, "6": 0}, "distinct partitions"), ("partitions", {"7": 10 ** 12}, "distinct partitions"),
    ("partitions", {"-3": 0}, "partitions"), ("partitions", {"05": 1}, "decimal node ids"),
    ("partitions", {"5": True}, "decimal node ids"), ("history", [{"round": 7, "ok": True}], "history"),
    ("history", [{"round": 1, "ok": True, "client_metrics": {"0": 5}}], "client_metrics"),
    ("evals", {"999": {"accuracy": 1.0}}, "evals"),
])
def test_resume_trusts_nothing(tmp_path, field, value, match):
    from fedmerge.client.app import task_client_app
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = adv.tiny(out=str(tmp_path), num_clients=2, num_server_rounds=1, method="avg")
    run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    path = tmp_path / "state.json"
    st = json.loads(path.read_text())
    assert {int(k) for k in st["partitions"]} and sorted(st["partitions"].values()) == [0, 1]
    st[field] = value
    path.write_text(json.dumps(st))
    more = adv.tiny(out=str(tmp_path), num_clients=2, num_server_rounds=2, method="avg", resume=True)
    with pytest.raises(ValueError, match=match):
        run_federation(InlineGrid(task_client_app(more.to_run_config()), 2), more)


def test_resume_checks_the_checkpoint_and_restores_identity(tmp_path):
    from fedmerge.client.app import task_client_app
    from fedmerge.common.task.checkpoint import save_state
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = adv.tiny(out=str(tmp_path), num_clients=2, num_server_rounds=1, method="avg", common_init=True)
    run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    st = json.loads((tmp_path / "state.json").read_text())
    more = adv.tiny(out=str(tmp_path), num_clients=2, num_server_rounds=2, method="avg", common_init=True, resume=True)
    grid = InlineGrid(task_client_app(more.to_run_config()), 2)
    result = run_federation(grid, more)
    assert result["rounds_completed"] == 2
    assert {str(k): v for k, v in json.loads((tmp_path / "state.json").read_text())["partitions"].items()} == \
        st["partitions"]
    # a checkpoint rewritten with a NaN (and a matching checksum) is refused by name
    st = json.loads((tmp_path / "state.json").read_text())
    ck = tmp_path / "checkpoints" / st["model"]
    from fedmerge.common.task.checkpoint import load_state
    state = load_state(ck)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_state(state, ck)
    import hashlib
    st["model_sha256"] = hashlib.sha256(ck.read_bytes()).hexdigest()
    (tmp_path / "state.json").write_text(json.dumps(st))
    again = adv.tiny(out=str(tmp_path), num_clients=2, num_server_rounds=3, method="avg", common_init=True, resume=True)
    with pytest.raises(ValueError, match=f"'{key}' has non-finite values"):
        run_federation(InlineGrid(task_client_app(again.to_run_config()), 2), again)


def test_result_json_is_written_when_the_federation_stops(tmp_path, monkeypatch):
    """Even an unexpected server error leaves result.json (with the error) and the finished rounds."""
    from fedmerge.client.app import task_client_app
    from fedmerge.server import app as server_app
    from fedmerge.server.inline import InlineGrid
    from fedmerge.server.strategy import CCAMerge

    calls = {"n": 0}
    original = CCAMerge.aggregate_train

    def flaky(self, server_round, replies):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return original(self, server_round, replies)

    monkeypatch.setattr(CCAMerge, "aggregate_train", flaky)
    cfg = adv.tiny(out=str(tmp_path), num_clients=2, num_server_rounds=2, method="avg", common_init=True)
    with pytest.raises(RuntimeError, match="disk on fire"):
        server_app.run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert "disk on fire" in saved["error"] and saved["rounds_completed"] == 1 and saved["partial"] is True


@pytest.mark.slow
def test_ray_backend_names_clients_by_the_servers_map(tmp_path):
    """Under Flower's Ray simulation the nodes have partitions of their own: the rejected NaN client is named by
    its partition (1), and drop-query hits client 2 even when it is the reference."""
    import subprocess
    import sys
    out = tmp_path / "sim"
    cmd = [sys.executable, "-m", "fedmerge.cli", "simulate", "--backend", "ray", "--clients", "4", "--split", "iid",
           "--arch", "cnn", "--width", "0.25", "--epochs", "1", "--max-train", "128", "--probe-size", "100",
           "--max-test", "100", "--rounds", "1", "--method", "cca", "--inject-fault", "nan:1", "--inject-fault",
           "drop-query:2", "--reference", "2", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    rej = sorted((r["partition"], r["phase"]) for r in result["clients_rejected"])
    assert rej == [(1, "train"), (2, "cross-statistics")]
    reasons = {r["partition"]: r["reason"] for r in result["clients_rejected"]}
    assert "NaN" in reasons[1] and reasons[2].startswith("as reference: client error")
    assert "drops out of the statistics query" in reasons[2] and "\n" not in reasons[2]
    assert result["clients_merged"] == [0, 3] and result["reference"] in (0, 3)


def test_negative_batchnorm_variance_is_rejected():
    from flwr.app import ArrayRecord

    from fedmerge.server.checks import decode_weights

    keys = {"bn.running_var": ((3,), torch.float32), "bn.weight": ((3,), torch.float32)}
    ok = ArrayRecord({"bn.running_var": Array(np.ones(3, np.float32)), "bn.weight": Array(np.ones(3, np.float32))})
    assert decode_weights(ok, keys)["bn.running_var"].tolist() == [1, 1, 1]
    bad = ArrayRecord({"bn.running_var": Array(np.array([1, -2, 1], np.float32)),
                       "bn.weight": Array(np.ones(3, np.float64))})  # float64 converted to the model's float32
    with pytest.raises(ReplyRejected, match="negative values"):
        decode_weights(bad, keys)
    # float64 beyond float32's range becomes inf on conversion: rejected, named
    with pytest.raises(ReplyRejected, match="after conversion"):
        decode_weights(ArrayRecord({"bn.running_var": Array(np.ones(3, np.float16)),
                                    "bn.weight": Array(np.full(3, 1e39, np.float64))}), keys)


def test_unlabelled_probe_chooses_gamma_and_reference_by_agreement_with_the_ensemble(kit):
    """The README's snippet: an image-only probe with gamma='auto' (it crashed with AttributeError before)."""
    from fedmerge.common.task.loaders import probe_batches
    from fedmerge.common.wire.probe import Batches

    fit, held = probe_batches(kit.cfg)
    strip = lambda b: Batches([(x, None) for x, _ in b])  # noqa: E731
    strategy, rec, arrays = adv.run_round(kit, {}, probe=(strip(fit), strip(held)), gamma="auto")
    assert rec.ok and rec.clients_merged == [0, 1, 2] and adv.finite_state(arrays)
    assert "ensemble" in rec.merge_info["reference_rule"] and rec.gamma in strategy.gamma_grid


def test_failed_round_can_be_loud(kit):
    from fedmerge.server import RoundFailedError

    muts = {(TRAIN, p): adv.set_metric("num-examples", 1e308) for p in range(3)}
    with pytest.raises(RoundFailedError, match="min_clients"):
        adv.run_round(kit, muts, on_failed_round="raise")
    with pytest.raises(ValueError, match="on_failed_round"):
        adv.make_strategy(kit.cfg, on_failed_round="explode")


def test_simulate_exits_non_zero_when_the_last_round_failed(tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "fedmerge.cli", "simulate", "--backend", "inline", "--clients", "2", "--arch", "mlp",
           "--width", "0.25", "--epochs", "1", "--max-train", "64", "--probe-size", "60", "--max-test", "100",
           "--gamma", "0.1", "--inject-fault", "nan:0", "--inject-fault", "nan:1", "--out", str(tmp_path / "o")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "the last round failed" in p.stderr and "min_clients" in p.stderr
    assert json.loads((tmp_path / "o" / "result.json").read_text())["rounds"][0]["ok"] is False


def test_duplicates_strangers_and_overflow_end_to_end(tmp_path):
    from fedmerge.client.app import task_client_app
    from fedmerge.server.app import run_federation

    for i, kw in enumerate(({"duplicate_of": 1}, {"stranger": 4242})):
        cfg = adv.tiny(out=str(tmp_path / str(i)), reference="0")
        result = run_federation(adv.ExtraReplyGrid(task_client_app(cfg.to_run_config()), 3, **kw), cfg)
        rej = result["clients_rejected"]
        assert len(rej) == 1 and ("second reply" in rej[0]["reason"] or "not sampled" in rej[0]["reason"])
        assert result["clients_merged"] == [0, 1, 2]
    # with the norm bound off, weights at float32's maximum overflow the server's own pass over the probe
    # (it recomputes every client's statistics): that client is rejected, the others merged
    cfg = adv.tiny(out=str(tmp_path / "2"), reference="0", norm_bound=0.0)
    app = adv.mutating_app(task_client_app(cfg.to_run_config()),
                           {(TRAIN, ATTACKER): lambda rd: adv.set_weight(rd, lambda a: np.sign(a) * 3.0e38)})
    result = run_federation(adv.InlineGrid(app, 3), cfg)
    rej = result["clients_rejected"]
    assert [(r["partition"], r["phase"]) for r in rej] == [(ATTACKER, "train")]
    assert "could not be recomputed (FloatingPointError" in rej[0]["reason"]
    assert result["clients_merged"] == [0, 1] and np.isfinite(result["accuracy"]["merged"])
    with pytest.raises(ValueError, match="norm_bound"):
        adv.tiny(norm_bound=0.5)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_honest_statistics_in_every_wire_dtype_pass_the_bounds(dtype):
    """Wide layers (d = 256), units with very different scales, and the reference's cross block with itself
    (canonical correlations ~1, the hardest case for the bounds): honest statistics pass in every wire dtype,
    the same cross block inflated 3x does not."""
    from fedmerge.common.engine.stats import CrossMoments
    from fedmerge.common.wire.compress import (
        block_encoding,
        decode_cross,
        decode_moments,
        encode_cross,
        encode_moments,
    )
    from fedmerge.server.checks import (
        check_cross,
        check_moments,
        psd_tolerance,
        transport,
    )

    g = torch.Generator().manual_seed(0)
    d, n = 256, 4096
    z = torch.randn(n, 48, generator=g, dtype=torch.float64)
    a = torch.relu(z @ torch.randn(48, d, generator=g, dtype=torch.float64)) * torch.logspace(-2, 2, d,
                                                                                            dtype=torch.float64)
    b = a + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)   # a near copy of A
    own_a, own_b = {0: Moments.of(a)}, {0: Moments.of(b)}
    spec = type("Spec", (), {"groups": {0: type("G", (), {"dim": d})()}})()
    decoded, enc = [], []
    for own in (own_a, own_b):
        arrays = encode_moments(own, dtype)
        decoded.append(decode_moments(arrays, spec))
        enc.append({0: block_encoding(arrays, "own.0")})
        check_moments(decoded[-1], {0: n}, {0: psd_tolerance(dtype)})
    for other, own_other in ((a, 0), (b, 1)):   # the reference with itself, and with the near copy
        cross = {0: CrossMoments.of(a, other)}
        arrays = encode_cross(cross, dtype)
        c = decode_cross(arrays, spec)
        wire = transport([{0: block_encoding(arrays, "cross.0")}, enc[0], enc[own_other]])
        check_cross(c, decoded[0], decoded[own_other], {0: n}, wire=wire)
        inflated = {0: CrossMoments(c[0].n, c[0].mean_a, c[0].mean_b, 3 * c[0].c)}
        with pytest.raises(ReplyRejected, match="Cauchy-Schwarz|canonical correlation"):
            check_cross(inflated, decoded[0], decoded[own_other], {0: n}, wire=wire)


@pytest.mark.slow
def test_bring_your_own_model_example_runs_on_flowers_simulation(tmp_path):
    """examples/byo_model.py: a user's own CNN, data and training loop with fedmerge's client API and CCAMerge,
    through flwr.simulation.run_simulation."""
    import subprocess
    import sys
    from pathlib import Path
    example = Path(__file__).resolve().parents[1] / "examples" / "byo_model.py"
    import os
    env = {**os.environ, "RAY_worker_niceness": "0"}   # Ray's default (nice 15) starves the clients on a busy machine
    p = subprocess.run([sys.executable, str(example), str(tmp_path / "byo_model.pt")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if "test accuracy" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["merged", "0", "1", "2"], p.stdout + p.stderr[-3000:]
    assert all(0.0 <= float(ln.rsplit(" ", 1)[1]) <= 1.0 for ln in lines)
    state = torch.load(tmp_path / "byo_model.pt")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["byo_model.pt"]   # writes nothing else into the cwd
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_reference_that_breaks_every_merge_is_replaced(kit):
    """No server probe: the reference (fixed, partition 2) inflates its own variances x1e6; every cross check
    passes (larger own blocks only loosen them) but every merge with it leaves the norm bound: it is rejected as
    reference and the round is merged around the next one."""
    muts = {(TRAIN, 2): adv.own_blocks(lambda b: Moments(b.n, b.mean, b.m2 * 1e6))}
    strategy, rec, arrays = adv.run_round(kit, muts, reference=2, probe=None,
                                          example_input=torch.zeros(2, 3, 32, 32), bn_reset=False)
    assert [(r["partition"], r["phase"]) for r in rec.clients_rejected] == [(2, "merge")]
    assert rec.clients_rejected[0]["reason"].startswith("as reference")
    assert rec.ok and rec.clients_merged == [0, 1] and rec.reference in (0, 1)


def test_a_claim_race_cannot_lock_out_the_node_the_partition_was_proposed_to(kit):
    """The node proposed partition 0 answers first and claims partition 1 (proposed to another node): the node
    the server proposed it to keeps it, in every round; the claimant is rejected."""
    strategy = adv.make_strategy(kit.cfg, reference=0, max_examples=adv.partition_sizes(kit))
    grid = adv.InlineGrid(adv.replay_app(kit, {(TRAIN, 0): adv.set_metric("partition-id", 1)}), 3)
    strategy.start(grid, ArrayRecord(), num_rounds=2)
    for h in strategy.history:   # round 1: proposed to another node; round 2: registered to it
        assert h.ok and h.clients_merged == [1, 2]
        assert [(r["node"], r["reason"][:18]) for r in h.clients_rejected] == [(grid.node_ids[0], "claims partition 1")]
    assert "the server proposed it to node" in strategy.history[0].clients_rejected[0]["reason"]
    assert strategy.partitions == {grid.node_ids[1]: 1, grid.node_ids[2]: 2}


def test_with_two_clients_a_failed_merge_blames_nobody(kit):
    """One pair left (client 1 sends nothing usable), the other client 1000x and clipped: the CCA merge leaves
    the bound; which of the two it fails on cannot be told apart, so nobody is named and the round fails."""
    muts = {(TRAIN, 1): lambda rd: rd.array_records.pop("arrays"),
            (TRAIN, ATTACKER): lambda rd: adv.set_weight(rd, lambda a: a * 1000)}
    strategy, rec, arrays = adv.run_round(kit, muts, reference=0, norm_action="clip")
    assert not rec.ok and rec.blamed == [] and "cannot be told apart" in rec.error and len(arrays) == 0


def test_cross_statistics_that_rotate_the_alignment_are_rejected(kit):
    """A cross block with the right scale, means and correlations but another rotation (its columns permuted)
    passes every consistency check; with a server probe it differs from the server's recomputation."""
    from fedmerge.common.engine.stats import CrossMoments

    g = torch.Generator().manual_seed(5)

    def permuted(b):   # columns and the model side's means permuted alike
        p = torch.randperm(b.c.shape[1], generator=g)
        return CrossMoments(b.n, b.mean_a, b.mean_b[p], b.c[:, p])
    rotate = adv.cross_blocks(permuted)
    strategy, rec, arrays = adv.run_round(kit, {(CROSS, ATTACKER): rotate}, reference=0)
    assert [(r["partition"], r["phase"]) for r in rec.clients_rejected] == [(ATTACKER, "cross-statistics")]
    assert rec.ok and rec.clients_merged == [0, 1]
    reason = rec.clients_rejected[0]["reason"]
    assert "differ from the two uploaded models" in reason or "means differ" in reason
