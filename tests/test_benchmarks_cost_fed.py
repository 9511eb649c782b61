"""The cost and federated benchmark commands at toy settings: they run end to end and write their JSON,
markdown table and plot (the numbers themselves are the benchmarks' business, except the federated/offline
equality, which is exact)."""
import json

from benchmarks import cost, federated


def test_cost_benchmark_writes_results(tmp_path):
    out = tmp_path / "cost"
    cost.main(["--dataset", "cifar10-mini", "--archs", "resnet20", "--widths", "0.25", "--ns", "2,3",
               "--methods", "avg,permute,cca,zipit", "--probe-size", "40", "--transform-probe", "20",
               "--repeats", "1", "--out", str(out)])
    payload = json.loads((out / "cost.json").read_text())
    assert {"config", "points", "transforms", "round_bytes", "environment", "data_note"} <= set(payload)
    (pt,) = payload["points"]
    for key in ("forward_s", "own_statistics_s", "cross_statistics_s", "own_over_forward",
                "cross_over_two_forwards"):
        assert pt[key] > 0
    b = pt["bytes"]
    assert b["own"] == b["formula_own"] and b["cross"] == b["formula_cross"] and b["model"] > 0
    assert set(pt["memory"]) == {"forward", "own_statistics", "cross_statistics"}
    assert all(m["bytes"] >= 0 for m in pt["memory"].values())
    measured = {(t["method"], t["n"]) for t in payload["transforms"] if t["seconds"] is not None}
    assert {("cca", 2), ("cca", 3), ("zipit", 3), ("avg", 2), ("apply (merge_states)", 3)} <= measured
    md = (out / "cost.md").read_text()
    assert "CIFAR-10" in md and "labels exact" in md and "gamma = 0.1" in md
    assert md.count("| resnet20 | x0.25 |") >= 4  # (a)-(c), (e), (f) and the transforms table
    assert (out / "cost.png").stat().st_size > 1000


def test_federated_benchmark_writes_results_and_matches_offline(tmp_path):
    out = tmp_path / "fed"
    federated.main(["--dataset", "cifar10-mini", "--arch", "cnn", "--width", "0.25", "--clients", "2",
                    "--max-train", "64", "--probe-size", "60", "--max-test", "100", "--rounds", "2",
                    "--epochs", "1", "--arms", "cca,fedavg", "--one-shot", "avg", "--out", str(out)])
    payload = json.loads((out / "federated.json").read_text())
    assert {"config", "protocol", "equality", "one_shot", "arms", "data_note"} <= set(payload)
    assert set(payload["arms"]) == {"cca", "fedavg"}
    for arm in payload["arms"].values():
        assert [r["round"] for r in arm["rounds"]] == [1, 2]
        assert all(r["global_accuracy"] is not None for r in arm["rounds"])
        assert [r["cumulative_local_epochs"] for r in arm["rounds"]] == [1, 2]
    # the federated merge is the offline merge_models of the same client models with the same inputs
    assert [e["round"] for e in payload["equality"]] == [1, 2]
    for e in payload["equality"]:
        assert e["same_probe_split"] and e["abs_diff_pt"] <= 0.1 and e["max_logit_diff"] < 1e-4
        assert e["federated_gamma"] == e["offline_gamma"] and e["federated_reference"] == e["offline_reference"]
    assert [o["model"] for o in payload["one_shot"]][-1] == "offline avg"
    md = (out / "federated.md").read_text()
    assert "labels exact" in md and "| 1 |" in md and "| 2 |" in md and "federated acc %" in md
    assert (out / "federated.png").stat().st_size > 1000
    assert (out / "cca" / "result.json").exists() and (out / "fedavg" / "result.json").exists()
