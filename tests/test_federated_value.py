"""``benchmarks.federated_value`` at toy settings: both parts run end to end through ``run_federation`` and write
their JSON, markdown and plots; runs are cached and reused; rounds-to-target is computed per seed."""
import json

import torch

from benchmarks import federated_value as fv


def test_rounds_to_target():
    rec = {"rounds": [{"round": 1, "global_accuracy": 0.5, "cumulative_upload_bytes": 10},
                      {"round": 2, "global_accuracy": 0.7, "cumulative_upload_bytes": 20},
                      {"round": 3, "global_accuracy": 0.6, "cumulative_upload_bytes": 30}]}
    assert fv.rounds_to(rec, 0.7) == (2, 20) and fv.rounds_to(rec, 0.5) == (1, 10)
    assert fv.rounds_to(rec, 0.71) == (None, None)


def test_federated_value_toy_run(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "fv"
    argv = ["--dataset", "cifar10-mini", "--arch", "cnn", "--width", "0.25", "--seeds", "1", "--clients", "2",
            "--splits", "iid", "--few-clients", "2", "--few-settings", "dirichlet:0.5", "--arms", "fedavg,cca-avg",
            "--epochs", "1", "--rounds", "2", "--max-train", "96", "--max-test", "100", "--probe-size", "100",
            "--out", str(out)]
    payload = fv.main(argv)
    one = payload["one_shot"]
    assert len(one) == 1 and one[0]["clients"] == 2 and one[0]["seeds"] == [0]
    for k in ("clients_mean", "clients_best", "ensemble", "avg", "permute", "cca"):
        assert 0 <= one[0][k]["mean"] <= 100
    few = payload["few_round"][0]
    assert set(few["arms"]) == {"fedavg", "cca-avg"}
    assert few["arms"]["cca-avg"]["methods"] == ["cca", "avg"] and few["arms"]["fedavg"]["methods"] == ["avg", "avg"]
    # equal total local epochs: 2 x 1 for both arms here (--epochs 1)
    assert few["arms"]["fedavg"]["epochs"] == [1.0, 1.0] and few["arms"]["cca-avg"]["epochs"] == [1.0, 1.0]
    assert few["arms"]["fedavg"]["rounds_to_target"][0] is not None   # FedAvg reaches its own final accuracy
    # a CCA round uploads statistics as well as weights; an avg round only weights
    runs = {r["arm"]: r for r in payload["runs"]["few_round"]}
    up = [x["upload_bytes"] for x in runs["cca-avg"]["rounds"]]
    assert up[0] > up[1] == runs["fedavg"]["rounds"][1]["upload_bytes"]
    saved = json.loads((out / "federated_value.json").read_text())
    assert saved["settings"]["seed_list"] == [0] and saved["runs"]["one_shot"][0]["config"]["lr"] == 0.05
    md = (out / "federated_value.md").read_text()
    assert "One-shot federation" in md and "rounds to target" in md
    assert (out / "federated_value_one_shot.png").stat().st_size > 1000
    assert (out / "federated_value_rounds.png").stat().st_size > 1000
    # a second invocation reuses every saved run (nothing is trained again)
    again = fv.main(argv + ["--part", "report"])
    assert again["runs"] == payload["runs"]
