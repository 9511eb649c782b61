"""Benchmark commands (two_models plot, many_models, splits, sensitivity) end to end on the embedded
cifar10-mini with tiny settings: result JSON, markdown table and PNG plots written with the expected rows.
Also: the statistics cache of the benchmarks gives exactly merge_models' merges, and the plot helpers."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives in the repo root

from benchmarks import many_models, sensitivity, splits, two_models
from benchmarks.common import (
    MergeCache,
    apply_arch_defaults,
    comma_list,
    fmt_mean_std,
    mean_std,
    method_list,
    replicate_args,
    replicates_record,
    summarise,
)
from benchmarks.plots import bar_chart, line_panels, line_plot
from fedmerge.common.engine.merge import GAMMA_GRID, merge_models
from fedmerge.common.task.models import build_model

TINY = ["--dataset", "cifar10-mini", "--max-train", "300", "--max-test", "100", "--epochs", "1", "--width",
        "0.125"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("arch", ["cnn", "resnet20"])
def test_merge_cache_matches_merge_models(arch):
    torch.manual_seed(0)
    models = [build_model(arch, 10, 0.125).eval() for _ in range(3)]
    probe = (torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)))
    bn = arch == "resnet20"
    cache = MergeCache(models, probe)
    # n=3 first fills the cache, n=2 then uses a prefix of the 3-model statistics
    if bn:  # merged ResNets are only meaningful with the BN reset
        cases = [(3, m, True) for m in ("avg", "permute", "cca", "zipit")] + [(2, "cca", True)]
    else:
        cases = [(3, m, post) for m in ("avg", "permute", "cca", "zipit") for post in (False, True)]
        cases += [(2, "cca", True), (2, "zipit", False), (2, "permute", True)]
    for n, method, post in cases:
        kw = {"bn_reset": post, "repair": False} if bn else {"bn_reset": False, "repair": post}
        a, ia = merge_models(models[:n], probe, method=method, reference=0, gamma="auto", return_info=True, **kw)
        b, ib, secs = cache.merge(n, method, gamma="auto", **kw)
        assert ia.gamma == ib.gamma and ia.params == ib.params and secs >= 0
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=f"{method} n={n} {k}")
    assert cache.statistics_s > 0


def test_plots(tmp_path):
    p = bar_chart(tmp_path / "b.png", ["a", "b"], {"x": [10.0, None], "y": [20.0, float("nan")]},
                  hlines={"ref": 50.0}, title="t")
    assert is_png(p)
    p = line_plot(tmp_path / "sub" / "l.png", [1, 10, 100], {"s": [1.0, None, 3.0]}, logx=True, xticks=[1, 10, 100],
                  hlines={"h": 2.0}, vlines={"v": 10.0}, points={"star": (10.0, 2.0)})
    assert is_png(p)
    with pytest.raises(ValueError):
        line_plot(tmp_path / "bad.png", [1, 2], {"s": [1.0]})
    p = line_panels(tmp_path / "panels.png", [
        {"x": [0.25, 0.5, 1.0], "series": {"a": [1.0, 2.0, None]}, "logx": 2, "hlines": {"target": 1.5},
         "styles": {"a": {"linestyle": "--", "marker": "s"}}, "title": "one"},
        {"x": [2, 4, 8], "series": {"b": [0.1, 1.0, 10.0]}, "logy": True, "xticks": [2, 4, 8]},
        {"x": [1, 2], "series": {}}])
    assert is_png(p)
    with pytest.raises(ValueError):
        line_panels(tmp_path / "bad.png", [{"x": [1, 2], "series": {"s": [1.0]}}])


def test_arch_defaults_fill_only_unset_values():
    table = {("resnet20", "cpu"): {"clients": 10, "width": 0.5, "epochs": 5}}
    a = argparse.Namespace(arch="resnet20", scale="cpu", clients=None, width=0.25, epochs=None)
    apply_arch_defaults(a, table)
    assert (a.clients, a.width, a.epochs) == (10, 0.25, 5)
    b = argparse.Namespace(arch="vgg11", scale="cpu", clients=None, width=None, epochs=None)
    apply_arch_defaults(b, table)
    assert (b.clients, b.width, b.epochs) == (None, None, None)


def test_method_list_takes_names_from_the_merge_registry():
    from fedmerge.common.engine.merge import METHODS

    assert comma_list(" a, b,,c ") == ["a", "b", "c"] and comma_list("2, 4", int) == [2, 4]
    assert method_list(" avg, cca,,permute ") == ["avg", "cca", "permute"]
    assert method_list(",".join(METHODS)) == list(METHODS) and method_list("") == []
    with pytest.raises(ValueError, match="unknown method"):
        method_list("cca,nope")
    p = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        method_list("nope", p)
    with pytest.raises(SystemExit):
        two_models.main(["--methods", "avg,nope"] + TINY)


def test_mean_std_summarise_and_replicates():
    s = mean_std([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3, "values": [1.0, 2.0, 3.0]}  # sample std (ddof 1)
    assert fmt_mean_std(s) == "2.00 ± 1.00"
    one = mean_std([4.0])
    assert one["std"] is None and fmt_mean_std(one) == "4.00"
    with pytest.raises(ValueError):
        mean_std([])
    runs = [[{"m": "a", "p": 0, "accuracy": 10.0}, {"m": "b", "p": 0, "accuracy": 20.0}],
            [{"m": "a", "p": 0, "accuracy": 14.0}, {"m": "b", "p": 0, "accuracy": 20.0}]]
    rows = summarise(runs, ("m", "p"))
    assert [(r["m"], r["accuracy"]["mean"], r["accuracy"]["values"]) for r in rows] == [
        ("a", 12.0, [10.0, 14.0]), ("b", 20.0, [20.0, 20.0])]
    assert rows[1]["accuracy"]["std"] == 0.0 and rows[0]["accuracy"]["std"] == pytest.approx(8 ** 0.5)
    with pytest.raises(ValueError, match="in 1 of 2 replicates"):
        summarise([runs[0], runs[1][:1]], ("m", "p"))
    with pytest.raises(ValueError, match="twice"):
        summarise([runs[0] + runs[0][:1]], ("m", "p"))
    args = argparse.Namespace(seed=5, replicates=3, arch="vgg11")
    reps = replicate_args(args)
    assert [a.seed for a in reps] == [5, 6, 7] and args.seed == 5 and all(a.arch == "vgg11" for a in reps)
    assert replicates_record(reps) == {"n": 3, "seeds": [5, 6, 7]}
    with pytest.raises(ValueError, match="replicates"):
        replicate_args(argparse.Namespace(seed=0, replicates=0))


def test_two_models_pairs_best_reference_and_repair_target(tmp_path):
    with pytest.raises(SystemExit):
        two_models.main(TINY + ["--pairs", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        two_models.main(TINY + ["--extra-rows", "magic", "--out", str(tmp_path)])
    two_models.main(TINY + ["--probe-size", "60", "--methods", "avg", "--extra-rows", "cca", "--pairs", "2",
                            "--out", str(tmp_path)])
    assert is_png(tmp_path / "two_models.png")
    res = json.loads((tmp_path / "two_models.json").read_text())
    # per pair: avg +- REPAIR onto client 0; CCA with reference='best' +- REPAIR; CCA + REPAIR to the reference
    rows = [("avg", "none", "0"), ("avg", "REPAIR", "0"), ("cca", "none", "best"), ("cca", "REPAIR", "best"),
            ("cca", "REPAIR to reference", "0")]
    assert [(r["method"], r["post"], r["reference"]) for r in res["summary"]] == rows
    assert res["replicates"] == {"n": 2, "seeds": [0, 1]} and len(res["runs"]) == 2 and len(res["results"]) == 10
    for row in res["summary"]:  # mean +- std of the per-pair records, kept in the JSON
        per = [x["accuracy"] for x in res["results"] if (x["method"], x["post"], x["reference"]) ==
               (row["method"], row["post"], row["reference"])]
        assert row["accuracy"] == mean_std(per)
    assert [b["values"] for b in res["bases"]] == [[r["bases"][i] for r in res["runs"]] for i in range(2)]
    for x in res["results"]:
        if x["reference"] == "best":  # chosen on the held-out probe slice: the first model with the best score
            scores = x["reference_scores"]
            assert len(scores) == 2 and x["chosen_reference"] == scores.index(max(scores))
        else:
            assert x["chosen_reference"] == 0 and x["reference_scores"] == []
        assert x["repair_target"] == {"none": None, "REPAIR": "average", "REPAIR to reference": "reference"}[x["post"]]
    md = (tmp_path / "two_models.md").read_text()
    assert "n = 2 pairs" in md and "test acc % (n = 2)" in md and " ± " in md and "| cca | none | best |" in md
    # the default regime is the paper's Table 1: both models on every non-probe image, from their own seeds
    assert res["data"]["split"] == "same" and res["data"]["client_sizes"] == [240, 240]
    # seeds, learning rate and epochs are recorded (the resolved values, not the unset command-line ones)
    assert res["training"]["lr"] == 0.1 and res["training"]["epochs"] == 1 and res["config"]["lr"] == "0.1"
    assert res["training"]["seed"] == 0 and res["training"]["client_seeds"] == [0, 1]
    assert [r["training"]["client_seeds"] for r in res["runs"]] == [[0, 1], [1000, 1001]]
    for seed in (0, 1):  # each pair's checkpoints, cached under its own seed
        assert len(list((tmp_path / "checkpoints").glob(f"vgg11_w0.125_e1_same_s{seed}_client*.json"))) == 2


def test_many_models(tmp_path):
    with pytest.raises(SystemExit):
        many_models.main(TINY + ["--methods", "avg,nonsense", "--out", str(tmp_path)])
    many_models.main(TINY + ["--probe-size", "60", "--clients", "3", "--methods", "avg,cca", "--sets", "2",
                             "--out", str(tmp_path)])
    res = json.loads((tmp_path / "many_models.json").read_text())
    assert res["replicates"] == {"n": 2, "seeds": [0, 1]}
    assert [len(b) for b in res["bases"]] == [3, 3] and [e["n"] for e in res["ensembles"]] == [2, 2]
    keys = {(n, m, p) for n in (2, 3) for m in ("avg", "cca") for p in ("none", "REPAIR")}
    assert {(r["n"], r["method"], r["post"]) for r in res["summary"]} == keys
    assert sorted((r["seed"], r["n"], r["method"], r["post"]) for r in res["results"]) == sorted(
        (s, *k) for s in (0, 1) for k in keys)
    for row in res["summary"]:
        assert row["accuracy"]["n"] == 2 and row["accuracy"]["values"] == [
            x["accuracy"] for x in res["results"] if (x["n"], x["method"], x["post"]) == (row["n"], row["method"],
                                                                                          row["post"])]
    assert res["mean_bases"][-1]["values"] == [sum(b) / 3 for b in res["bases"]]
    md = (tmp_path / "many_models.md").read_text()
    assert "| 2 |" in md and "| 3 |" in md and "cca + REPAIR %" in md and "pixels near-exact" in md
    assert "n = 2 sets" in md and " ± " in md
    assert is_png(tmp_path / "many_models.png")
    for seed in (0, 1):
        assert len(list((tmp_path / "checkpoints").glob(f"vgg11_w0.125_e1_n3_same_s{seed}_client*.json"))) == 3
    assert res["data"]["client_sizes"] == [240] * 3 and res["training"]["client_seeds"] == [0, 1, 2]


def test_splits(tmp_path):
    splits.main(TINY + ["--probe-size", "60", "--clients", "3", "--methods", "permute,zipit,cca",
                        "--out", str(tmp_path)])
    res = json.loads((tmp_path / "splits.json").read_text())
    assert res["split_names"] == ["80/20", "dirichlet", "disjoint"] and res["replicates"] == {"n": 1, "seeds": [0]}
    per = res["runs"][0]["splits"]
    assert list(per) == res["split_names"]
    for row in res["summary"]:  # one set: every cell is that set's value, without a std
        assert all(c["n"] == 1 and c["std"] is None for c in row["cells"].values())
    assert res["summary"][3]["cells"]["80/20"]["mean"] == per["80/20"]["ensemble"]
    assert res["training"]["epochs"] == 1 and res["training"]["lr"] == 0.1 and len(res["training"]["client_seeds"]) == 3
    assert {tuple(r["params"]) for r in res["results"] if r["method"] == "zipit"} == {("alpha", "beta")}
    assert {(r["split"], r["method"], r["post"]) for r in res["results"]} == {
        (s, m, "BN reset") for s in ("80/20", "dirichlet", "disjoint") for m in ("permute", "zipit", "cca")}
    assert max(per["disjoint"]["classes_per_client"]) <= 4  # 10 classes over 3 clients
    md = (tmp_path / "splits.md").read_text()
    for row in ("base (mean of clients)", "ensemble (mean logits)", "permute + BN reset", "ZipIt! + BN reset",
                "CCA + BN reset", "dirichlet(alpha=0.5)", "resnet20 x0.125"):
        assert row in md
    assert is_png(tmp_path / "splits.png")
    meta = json.loads(next((tmp_path / "checkpoints").glob("*disjoint*client0.json")).read_text())
    assert meta["model"]["head"]["kind"] == "embedding"


def test_sensitivity(tmp_path):
    sensitivity.main(TINY + ["--probe-size", "80", "--gammas", "0.01,1,10", "--probe-sizes", "40,80,160",
                             "--out", str(tmp_path)])
    res = json.loads((tmp_path / "sensitivity.json").read_text())
    assert res["checkpoints"] == str(tmp_path / "checkpoints")  # smoke runs never touch the real cache
    assert len(res["gamma"]["sweep"]) == 6
    for s in res["gamma"]["summary"].values():
        assert s["sweep_matches_auto_scores"] and s["auto_gamma"] in GAMMA_GRID
    assert [(r["probe_size"], r["from_clients"]) for r in res["probe"] if r["method"] == "cca"] == [
        (40, 0), (80, 0), (160, 80)]
    md = (tmp_path / "sensitivity.md").read_text()
    assert "(a) Test accuracy vs gamma" in md and "(b) Test accuracy vs probe size" in md
    assert is_png(tmp_path / "sensitivity_gamma.png") and is_png(tmp_path / "sensitivity_probe.png")


def test_np_merge_benchmark(tmp_path):
    from benchmarks import np_merge

    np_merge.main(TINY + ["--probe-size", "120", "--steps", "5", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "np_merge.json").read_text())
    got = {(r["method"], r["variant"]) for r in payload["results"]}
    assert got == {(m, v) for m in ("permute", "cca") for v in ("average", "NP Merge", "REPAIR")}
    md = (tmp_path / "np_merge.md").read_text()
    assert md.count("| NP Merge |") == 2
    np_rows = [r for r in payload["results"] if r["variant"] == "NP Merge"]
    assert all(0 < r["np_merge"]["steps"] <= 5 for r in np_rows)
    assert is_png(tmp_path / "np_merge.png")


def test_suite_plan_names_real_commands_and_rejects_unknown_ones():
    import importlib

    from benchmarks.__main__ import main as suite_main
    from benchmarks.__main__ import plan

    steps = plan("results/x", ["--scale", "cpu"])
    assert len({s[0] for s in steps}) == len(steps)
    for _, module, args in steps:
        assert callable(importlib.import_module(f"benchmarks.{module}").main) and "--out" in args
    # trainers run before the studies that reuse their checkpoints
    order = [s[0] for s in steps]
    assert order.index("two_models") < order.index("sensitivity") < order.index("np_merge")
    assert order.index("many_models") < order.index("reference_free")
    with pytest.raises(SystemExit):
        suite_main(["--only", "no_such_experiment"])
    # error bars: --replicates N gives the headline experiments N pairs / client sets, the studies keep one
    three = {label: args for label, _, args in plan("results/x", ["--scale", "cpu"], "cpu", 3)}
    assert three["two_models"][-2:] == ["--pairs", "3"] and three["splits"][-2:] == ["--sets", "3"]
    assert three["many_models"][-2:] == three["many_models_resnet20"][-2:] == ["--sets", "3"]
    assert all("--pairs" not in a and "--sets" not in a for label, a in three.items()
               if label not in ("two_models", "many_models", "many_models_resnet20", "splits"))
    assert plan("results/x", ["--scale", "cpu"]) == plan("results/x", ["--scale", "cpu"], "cpu", 1)
    with pytest.raises(ValueError, match="replicates"):
        plan("results/x", [], "cpu", 0)


def test_compression_benchmark(tmp_path):
    from benchmarks import compression

    raw = compression.main(TINY + ["--probe-size", "120", "--ranks", "8", "--bases", "whitened",
                                   "--out", str(tmp_path)])
    got = {(r["dtype"], r["rank"]) for r in raw}
    assert got == {("float64", 0), ("float32", 0), ("float16", 0), ("bfloat16", 0), ("float16", 8)}
    by = {(r["dtype"], r["rank"]): r for r in raw}
    # smaller encodings upload fewer bytes; float32 decodes almost exactly
    assert by[("float16", 0)]["stats_bytes"] < by[("float32", 0)]["stats_bytes"] < by[("float64", 0)]["stats_bytes"]
    assert by[("float32", 0)]["cross_err"] < 1e-6
    assert (tmp_path / "compression.md").read_text().count("| float16 |") == 2
    assert is_png(tmp_path / "compression.png")


def test_reference_free_benchmark(tmp_path):
    from benchmarks import reference_free

    reference_free.main(TINY + ["--probe-size", "120", "--clients", "3", "--post", "none", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "reference_free.json").read_text())
    md = (tmp_path / "reference_free.md").read_text()
    assert "| 2 |" in md and "| 3 |" in md
    assert (tmp_path / "checkpoints").is_dir() and payload


def test_learning_rate_by_scale_and_arch(tmp_path):
    """Paper scale trains VGG (no BatchNorm) at 0.08 -- 0.4 diverged on a GPU -- and ResNets at 0.4; --lr wins."""
    from benchmarks.common import base_parser, resolve

    def lr(*argv):
        return resolve(base_parser("t").parse_args(list(argv) + ["--out", str(tmp_path)]), "t")["lr"]

    assert lr("--scale", "paper", "--arch", "vgg11") == 0.08
    assert lr("--scale", "paper", "--arch", "resnet20") == 0.4
    assert lr("--scale", "cpu", "--arch", "vgg11") == 0.1
    assert lr("--scale", "paper", "--arch", "vgg11", "--lr", "0.05") == 0.05


def test_forward_time_runs_models_where_they_are():
    models = [build_model("cnn", 10, 0.125).eval() for _ in range(2)]
    batches = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))]
    assert two_models.forward_time(models, batches) > 0


def test_residual_sites_benchmark(tmp_path):
    from benchmarks import residual_sites

    residual_sites.main(["--dataset", "cifar10-mini", "--arch", "resnet20", "--width", "0.125", "--epochs", "1",
                         "--max-train", "400", "--max-test", "200", "--probe-size", "100", "--pairs", "2",
                         "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "residual_sites.json").read_text())
    assert payload["replicates"]["n"] == 2 and len(payload["runs"]) == 2
    assert {(r["sites"], r["method"], r["post"]) for r in payload["rows"]} == {
        (s, m, p) for s in ("all", "last") for m in ("cca", "permute") for p in ("none", "BN reset")}
    assert all(r["accuracy"]["n"] == 2 for r in payload["rows"])
    assert "| last | cca | BN reset |" in (tmp_path / "residual_sites.md").read_text()


def test_bn_fold_benchmark(tmp_path):
    from benchmarks import bn_fold

    bn_fold.main(["--seeds", "2", "--steps", "3", "--splits", "skew", "--max-train", "1200", "--max-test", "200",
                  "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bn_fold.json").read_text())
    assert [(r["split"], r["seed"]) for r in payload["runs"]] == [("skew", 0), ("skew", 1)]
    assert len(payload["runs"][0]["merges"]) == 8
    md = (tmp_path / "bn_fold.md").read_text()
    assert "| skew | cca, BN folded + REPAIR |" in md and "±" in md
    with pytest.raises(SystemExit):
        bn_fold.main(["--splits", "dirichlet", "--out", str(tmp_path)])


def test_scale_helpers():
    """benchmarks.scale: the least-squares slope of exact data, and the memory of a process tree from /proc
    (this process: resident >= private > 0; a child it starts is in its tree)."""
    import os
    import subprocess
    import sys

    from benchmarks.scale import TreeMemory, _memory, fit_line, tree

    f = fit_line([10, 25, 50, 100], [3 + 0.5 * n for n in (10, 25, 50, 100)])
    assert abs(f["slope"] - 0.5) < 1e-12 and abs(f["intercept"] - 3) < 1e-9 and abs(f["r2"] - 1) < 1e-12
    rss, pss, private = _memory(os.getpid())
    assert rss >= pss >= private > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in tree(os.getpid())
        mem = TreeMemory({"me": os.getpid()})
        mem.sample()
        assert mem.peak["me"] >= rss and mem.peak_pss["me"] >= mem.peak_private["me"] > 0
        assert any("time.sleep" in cmd for cmd, _, _ in mem.at_peak["me"])
    finally:
        child.kill()
        child.wait()


def test_merge_quality_benchmark(tmp_path):
    """The issue-20 candidates run on a pair and land in the table (a smoke run: tiny models, a subset of rows)."""
    from benchmarks import merge_quality

    with pytest.raises(SystemExit):
        merge_quality.main(TINY + ["--rows", "no such row", "--out", str(tmp_path)])
    rows = ["CCA", "CCA + REPAIR + distill", "NP Merge after REPAIR", "CCA, mean basis + REPAIR",
            "sequential CCA + REPAIR", "sequential CCA (REPAIRed prefix) + REPAIR"]
    merge_quality.main(TINY + ["--split", "80/20", "--probe-size", "100", "--pairs", "1", "--rows", ";".join(rows),
                               "--out", str(tmp_path)])
    res = json.loads((tmp_path / "merge_quality.json").read_text())
    got = [r["row"] for r in res["pairs"][0]["rows"]]
    assert set(got) == set(rows) | {"CCA + REPAIR (average target)"}   # the custom rows use its gamma
    by = {r["row"]: r for r in res["pairs"][0]["rows"]}
    assert by["CCA + REPAIR + distill"]["distill"]["steps"] >= 1 and by["NP Merge after REPAIR"]["np_merge"][
        "after_repair"]
    assert all(c >= 1 for c in by["CCA, mean basis + REPAIR"]["cond_G"].values())
    md = (tmp_path / "merge_quality.md").read_text()
    assert "| sequential CCA + REPAIR | label-free |" in md and "| NP Merge after REPAIR | labels |" in md
    assert is_png(tmp_path / "merge_quality.png")


def test_merge_variants_on_identical_models_change_nothing():
    """Two copies of one model: the mean basis is the identity (cond 1) and sequential CCA maps every unit onto
    itself, so both merges return the model."""
    from benchmarks.merge_variants import mean_basis, merge_alignment, sequential_cca
    from fedmerge.common.engine.graph import derive_spec
    from fedmerge.common.engine.matching import MatchInputs, match_cca
    from fedmerge.common.engine.stats import collect_statistics
    from fedmerge.common.wire.probe import as_batches

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=4, width=0.125, in_channels=1, image_size=8).eval()
    x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    probe = as_batches(x, 100)
    spec = derive_spec(model, probe.example())
    stats = collect_statistics([model, model], probe, reference=0, pairs="reference", spec=spec)
    alignment, cond = mean_basis(match_cca(MatchInputs(stats), spec, 0, gamma=0.1))
    assert all(abs(c - 1) < 1e-6 for c in cond.values())
    for aln in (alignment, sequential_cca([model, model], probe, spec, gamma=0.1),
                sequential_cca([model, model], probe, spec, gamma=0.1, repair_prefix=True)):
        merged = merge_alignment([model, model], spec, aln, [0.5, 0.5], probe, repair=False)
        with torch.no_grad():
            assert torch.allclose(merged(x), model(x), atol=1e-4)
