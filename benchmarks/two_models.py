"""Two models (paper Table 1): base models, ensemble, and every merging method.

    python -m benchmarks.two_models --scale cpu                  # VGG11 x0.25 on CIFAR-10, CPU
    python -m benchmarks.two_models --scale paper                # VGG11 x1, 200 epochs: for a GPU
    python -m benchmarks.two_models --scale cpu --split 80/20    # the two-party 80/20 split (Table 3-style)

By default both models train on the same full training set (every non-probe image, ``--split same``), each
from its own seed, init and data order: the regime of the paper's Table 1. At CPU scale that is about twice
the training of the 80/20 pair (each model sees all 48,000 non-probe images instead of ~24,000). Each merge is
timed (statistics on the probe, transforms, total); with and without the method's post-processing (REPAIR
for nets without BatchNorm, BatchNorm reset for nets with it). Choices made on the held-out probe slice (CCA's
gamma, ZipIt!'s alpha and beta) are recorded per merge.

Every method merges onto client 0 (``reference=0``). The methods of ``--extra-rows`` (default CCA) get two more
kinds of rows: ``reference="best"`` as :func:`merge_models` chooses it (the client with the higher accuracy on
the held-out probe slice, not on the test set), and, for nets without BatchNorm, REPAIR to the reference's
statistics (``repair_target="reference"``, the paper's App. D) next to REPAIR to the average (the default).

``--pairs N`` trains N independent pairs (pair r at seed --seed + r: its own client seeds, training subset and
probe; checkpoints cached per seed) and reports every row as the mean ± sample std over the N pairs.
"""
from __future__ import annotations

import time

import torch

from fedmerge.common.engine.merge import has_batchnorm, merge_models
from fedmerge.common.task.evaluate import ensemble_evaluate
from fedmerge.common.wire.probe import as_batches

from .common import (
    Setup,
    add_replicates_arg,
    add_split_arg,
    base_parser,
    checkpoint_tag,
    client_seed,
    command_line,
    data_note,
    environment,
    fmt_mean_std,
    forward_pass,
    md_table,
    mean_std,
    method_list,
    pct,
    replicate_args,
    replicates_record,
    resolve,
    summarise,
    sync,
    train_clients,
    training_record,
    write_results,
)
from .plots import bar_chart

METHODS = ["avg", "permute", "weight_matching", "ot", "zipit", "cca"]


def forward_time(models, batches, device=None) -> float:
    dev = torch.device(device) if device is not None else next(models[0].parameters()).device
    for m in models:
        m.to(dev).eval()
    sync(dev)
    t = time.perf_counter()
    for m in models:
        forward_pass(m, batches, dev)
    sync(dev)
    return time.perf_counter() - t


def merge_variants(methods, extra, bn: bool) -> list[dict]:
    """The merges of one pair, in table order: every method without and with its post-processing onto client 0;
    then, for each method in ``extra``, ``reference="best"`` without and with post-processing and (nets without
    BatchNorm) REPAIR to the reference's statistics onto client 0."""
    out = []
    for m in methods:
        out += [{"method": m, "reference": 0, "post": p, "repair_target": "average"} for p in (False, True)]
    for m in extra:
        out += [{"method": m, "reference": "best", "post": p, "repair_target": "average"} for p in (False, True)]
        if not bn:
            out.append({"method": m, "reference": 0, "post": True, "repair_target": "reference"})
    return out


def post_label(v: dict, bn: bool) -> str:
    if not v["post"]:
        return "none"
    if bn:
        return "BN reset"
    return "REPAIR" if v["repair_target"] == "average" else "REPAIR to reference"


KEYS = ("method", "post", "reference")


def run_pair(args, sc, methods, extra) -> dict:
    """Train (or load) one pair at ``args.seed`` and merge it every way of :func:`merge_variants`."""
    setup = Setup(args, sc, args.split, 2)
    print(f"data (seed {args.seed}): {setup.describe()}", flush=True)
    t0 = time.perf_counter()
    models = train_clients(args, sc, setup, 2, checkpoint_tag(args, sc, args.split))
    probe = as_batches(setup.probe_loader)
    bases = [pct(m, setup.test_loader, args.device) for m in models]
    ens = 100.0 * ensemble_evaluate(models, setup.test_loader, device=args.device)["accuracy"]
    fwd = forward_time(models, probe)
    bn = has_batchnorm(models[0])
    raw = []
    for v in merge_variants(methods, extra, bn):
        kw = ({"bn_reset": v["post"], "repair": False} if bn
              else {"bn_reset": False, "repair": v["post"], "repair_target": v["repair_target"]})
        t = time.perf_counter()
        merged, info = merge_models(models, probe, method=v["method"], reference=v["reference"], gamma="auto",
                                    return_info=True, device=args.device, **kw)
        total = time.perf_counter() - t
        tm = info.timings
        rec = {"seed": args.seed, "method": v["method"], "post": post_label(v, bn), "reference": str(v["reference"]),
               "chosen_reference": info.reference, "reference_scores": info.reference_scores,
               "repair_target": info.repair_target, "accuracy": pct(merged, setup.test_loader, args.device),
               "gamma": info.gamma, "params": info.params, "statistics_s": tm.get("statistics", 0.0),
               "transforms_s": tm.get("transforms", 0.0), "total_s": total}
        raw.append(rec)
        print(f"[{time.perf_counter() - t0:.0f} s]", rec, flush=True)
    return {"seed": args.seed, "training": training_record(args, sc, 2), "data": setup.describe(),
            "data_note": data_note(setup.train), "dataset": setup.train.name, "test_images": len(setup.test),
            "train_images": len(setup.train), "bases": bases, "ensemble": ens, "forward_pass_s": fwd,
            "post_name": "BN reset" if bn else "REPAIR", "results": raw}


def describe_choice(recs: list[dict]) -> str:
    """What the held-out probe slice chose in each replicate of one row (``/`` between replicates)."""
    parts = []
    if recs[0]["reference"] == "best":
        parts.append("reference " + "/".join(str(r["chosen_reference"]) for r in recs))
    for k in recs[0]["params"]:
        parts.append(f"{k} " + "/".join(f"{r['params'][k]:g}" for r in recs))
    return ", ".join(parts)


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--extra-rows", default="cca",
                   help="comma-separated methods that also get reference='best' rows and (no BatchNorm) REPAIR to "
                        "the reference's statistics (default cca; '' for none)")
    add_split_arg(p)
    add_replicates_arg(p, "--pairs", "pairs of client models")
    args = p.parse_args(argv)
    methods, extra = method_list(args.methods, p), method_list(args.extra_rows, p)
    if args.replicates < 1:
        p.error("--pairs must be at least 1")
    sc = resolve(args, "two_models")
    reps = replicate_args(args)
    runs = [run_pair(a, sc, methods, extra) for a in reps]
    n = len(runs)
    summary = summarise([r["results"] for r in runs], KEYS)
    for row in summary:  # per-row timing means and the per-replicate choices
        recs = [next(x for x in r["results"] if all(x[k] == row[k] for k in KEYS)) for r in runs]
        row["repair_target"] = recs[0]["repair_target"]
        row["chosen"] = describe_choice(recs)
        for k in ("statistics_s", "transforms_s", "total_s"):
            row[k] = float(sum(x[k] for x in recs) / n)
    base = [mean_std([r["bases"][i] for r in runs]) for i in range(2)]
    ens = mean_std([r["ensemble"] for r in runs])
    better = mean_std([max(r["bases"]) for r in runs])
    first, post_name = runs[0], runs[0]["post_name"]
    rows = [["base A (client 0)", "", "", fmt_mean_std(base[0]), "", "", "", ""],
            ["base B (client 1)", "", "", fmt_mean_std(base[1]), "", "", "", ""],
            ["better base of the pair", "", "", fmt_mean_std(better), "", "", "", ""],
            ["ensemble (mean logits)", "", "", fmt_mean_std(ens), "", "", "", ""]]
    rows += [[r["method"], r["post"], r["reference"], fmt_mean_std(r["accuracy"]), r["chosen"], r["statistics_s"],
              r["transforms_s"], r["total_s"]] for r in summary]
    seeds = ", ".join(f"{a.seed} (clients {client_seed(a, 0)}, {client_seed(a, 1)})" for a in reps)
    header = (f"# Two models, {args.split} split — {args.arch} x{sc['width']} on {first['dataset']}, n = {n} "
              f"pair{'s' if n > 1 else ''}\n\n"
              f"Data: {first['data_note']}; {first['train_images']} train / {first['test_images']} test images; "
              f"clients of {', '.join(str(q) for q in first['data']['client_sizes'])} images; probe "
              f"{sc['probe_size']} images held out from client data (20% of it held out again to choose CCA's "
              f"gamma, ZipIt!'s alpha, beta and reference='best'); {sc['epochs']} epochs per model, lr "
              f"{sc['lr']:g}, batch {sc['batch_size']}; seeds {seeds}; device {environment()['device']}.\n\n"
              f"Test accuracy %: mean ± sample std over the n = {n} pairs (one value when n = 1); reference 0 is "
              f"client A; 'best': chosen per pair on the held-out probe slice; 'REPAIR to reference': REPAIR "
              f"to client A's statistics instead of the pair's average; chosen settings per pair separated by /; "
              f"times are means. Per pair: "
              + "; ".join(f"seed {r['seed']}: bases {r['bases'][0]:.2f}/{r['bases'][1]:.2f}, ensemble "
                          f"{r['ensemble']:.2f}" for r in runs)
              + f". One plain forward pass of both models over the probe: {first['forward_pass_s']:.2f} s.\n\n")
    table = md_table(["method", "post-processing", "reference", f"test acc % (n = {n})",
                      "chosen on held-out probe", "statistics s", "transforms s", "total s"], rows)
    write_results(sc["out"], "two_models", {"config": {**vars(args), **{k: str(v) for k, v in sc.items()}},
                                            "training": training_record(args, sc, 2),
                                            "replicates": replicates_record(reps), "data": first["data"],
                                            "bases": base, "ensemble": ens, "summary": summary,
                                            "results": [x for r in runs for x in r["results"]], "runs": runs,
                                            "environment": environment(), "command": command_line("two_models", argv)},
                  header + table)
    methods = list(dict.fromkeys(r["method"] for r in summary))

    def bar(m, post):
        return next((r["accuracy"]["mean"] for r in summary
                     if r["method"] == m and r["post"] == post and r["reference"] == "0"), None)

    bar_chart(sc["out"] / "two_models.png", methods, {q: [bar(m, q) for m in methods] for q in ("none", post_name)},
              title=f"Two models, {args.split} split: {args.arch} x{sc['width']}, {sc['epochs']} epochs, "
                    f"probe {sc['probe_size']}, mean of {n} pair{'s' if n > 1 else ''}",
              xlabel="method (post-processing: colour)",
              hlines={"base A": base[0]["mean"], "base B": base[1]["mean"], "ensemble": ens["mean"]})


if __name__ == "__main__":
    main()
