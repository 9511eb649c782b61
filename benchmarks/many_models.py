"""Many models (paper Fig. 4): accuracy of the merge of the first n of N client models, n = 2..N, per method.

    python -m benchmarks.many_models --scale cpu --data-root ../shared/data                  # VGG11 x0.25, 5 clients
    python -m benchmarks.many_models --scale cpu --data-root ../shared/data --arch resnet20  # ResNet20 x0.5, 10
    python -m benchmarks.many_models --scale paper --arch resnet20                          # ResNet20 x8, 20 (GPU)

By default every client trains on all non-probe training images (``--split same``, the regime of the paper's
Fig. 4: models trained on the same data from different seeds), each from its own seed, init and data order;
``--split iid`` (each client 1/N of the data) or another split of common/task/splits.py instead. With ``same`` the
training costs N times the IID split's. The first n clients are merged, all-to-one onto client 0, with and
without the post-processing (REPAIR for nets without BatchNorm, BatchNorm reset for nets with it), gamma (and
ZipIt!'s alpha, beta) chosen on a held-out slice of the probe. Defaults per architecture and scale (each
overridable with --clients/--width/--epochs):

    vgg11    cpu: 5 clients, width 0.25, 12 epochs     paper: 5 clients, width 1, 200 epochs
    resnet20 cpu: 10 clients, width 0.5, 5 epochs      paper: 20 clients, width 8, 200 epochs

Methods (--methods, comma-separated, default avg,permute,cca): any merge_models method, e.g. zipit,
merge_many, gcca. Probe statistics are collected once for all N models (see benchmarks.common.MergeCache);
merges give exactly what merge_models gives.

``--sets N`` trains N independent sets of clients (set r at seed --seed + r: its own client seeds, training
subset, probe and split; checkpoints cached per seed); every cell is the mean ± sample std over the N sets.
"""
from __future__ import annotations

import time

from fedmerge.common.engine.merge import has_batchnorm

from .common import (
    MergeCache,
    Setup,
    acc_pct,
    add_replicates_arg,
    add_split_arg,
    apply_arch_defaults,
    base_parser,
    checkpoint_tag,
    command_line,
    data_note,
    environment,
    fmt_mean_std,
    md_table,
    mean_std,
    method_list,
    pct,
    replicate_args,
    replicates_record,
    resolve,
    summarise,
    test_logits,
    train_clients,
    training_record,
    write_results,
)
from .plots import line_plot

ARCH_DEFAULTS = {
    ("resnet20", "cpu"): {"clients": 10, "width": 0.5, "epochs": 5},
    ("resnet20", "paper"): {"clients": 20, "width": 8.0},
}
DEFAULT_CLIENTS = 5


def variants(bn: bool, distill: bool) -> list[tuple[str, dict]]:
    """(post-processing label, merge options) of every merge: none, the net's post-processing, and with
    ``distill`` the post-processing followed by distillation into the ensemble (label-free)."""
    post = "BN reset" if bn else "REPAIR"
    kw = (lambda on: {"bn_reset": on, "repair": False}) if bn else (lambda on: {"bn_reset": False, "repair": on})
    out = [("none", kw(False)), (post, kw(True))]
    return out + [(f"{post} + distill", {**kw(True), "distill": True})] if distill else out


def run_set(args, sc, methods) -> dict:
    """Train (or load) one set of ``args.clients`` clients at ``args.seed`` and merge the first n, n = 2..N."""
    t0 = time.perf_counter()
    setup = Setup(args, sc, args.split, args.clients)
    print(f"data (seed {args.seed}): {setup.describe()}", flush=True)
    models = train_clients(args, sc, setup, args.clients, checkpoint_tag(args, sc, args.split, args.clients))
    print(f"[{time.perf_counter() - t0:.0f} s] {len(models)} client models ready", flush=True)
    logits, y = test_logits(models, setup.test_loader, args.device)
    bases = [acc_pct(lg, y) for lg in logits]
    bn = has_batchnorm(models[0])
    post = "BN reset" if bn else "REPAIR"
    cache = MergeCache(models, setup.probe_loader, device=args.device)
    raw, ensembles, mean_bases = [], [], []
    for n in range(2, args.clients + 1):
        # the logit ensemble (as common.task.evaluate.ensemble_evaluate)
        ensembles.append(acc_pct(sum(logits[:n]) / n, y))
        mean_bases.append(sum(bases[:n]) / n)
        for method in methods:
            for label, kw in variants(bn, args.distill):
                merged, info, secs = cache.merge(n, method, gamma="auto", **kw)
                acc = pct(merged, setup.test_loader, args.device)
                raw.append({"seed": args.seed, "n": n, "method": method, "post": label,
                            "accuracy": acc, "gamma": info.gamma, "params": info.params, "seconds": secs})
                print(f"[{time.perf_counter() - t0:.0f} s, statistics {cache.statistics_s:.1f} s]", raw[-1], flush=True)
    return {"seed": args.seed, "training": training_record(args, sc, args.clients), "data": setup.describe(),
            "data_note": data_note(setup.train), "dataset": setup.train.name, "train_images": len(setup.train),
            "test_images": len(setup.test), "bases": bases, "mean_bases": mean_bases, "ensembles": ensembles,
            "statistics_s": cache.statistics_s, "post_name": post, "results": raw}


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--clients", type=int, default=None,
                   help=f"number of client models N (default {DEFAULT_CLIENTS}; resnet20: 10 cpu, 20 paper)")
    add_split_arg(p)
    p.add_argument("--methods", default="avg,permute,cca",
                   help="comma-separated merge_models methods (also zipit, merge_many, gcca, ...)")
    add_replicates_arg(p, "--sets", "sets of client models")
    p.add_argument("--distill", action="store_true",
                   help="also the post-processed merge distilled into the ensemble on the probe (label-free)")
    args = p.parse_args(argv)
    apply_arch_defaults(args, ARCH_DEFAULTS)
    if args.clients is None:
        args.clients = DEFAULT_CLIENTS
    if args.clients < 2:
        p.error("--clients must be at least 2")
    if args.replicates < 1:
        p.error("--sets must be at least 1")
    methods = method_list(args.methods, p)
    sc = resolve(args, "many_models")
    reps = replicate_args(args)
    runs = [run_set(a, sc, methods) for a in reps]
    nrep = len(runs)
    summary = summarise([r["results"] for r in runs], ("n", "method", "post"))
    ns = list(range(2, args.clients + 1))
    ensembles = [mean_std([r["ensembles"][j] for r in runs]) for j in range(len(ns))]
    mean_bases = [mean_std([r["mean_bases"][j] for r in runs]) for j in range(len(ns))]
    first, post = runs[0], runs[0]["post_name"]

    def cell(n, method, p):
        return next(r["accuracy"] for r in summary if (r["n"], r["method"], r["post"]) == (n, method, p))

    labels = [v[0] for v in variants(post == "BN reset", args.distill)]
    rows = [[n, fmt_mean_std(mean_bases[j]), fmt_mean_std(ensembles[j])]
            + [fmt_mean_std(cell(n, m, v)) for m in methods for v in labels]
            for j, n in enumerate(ns)]
    headers = ["models", "mean base %", "ensemble %"] + [f"{m}{'' if v == 'none' else ' + ' + v} %"
                                                         for m in methods for v in labels]
    gammas = sorted({r["gamma"] for run in runs for r in run["results"] if r["gamma"] is not None})
    sizes = [q for r in runs for q in r["data"]["client_sizes"]]
    stats_s = [r["statistics_s"] for r in runs]
    header = (f"# Many models — {args.arch} x{sc['width']} on {first['dataset']}, {args.split} split over "
              f"{args.clients} clients, {sc['epochs']} epochs (lr {sc['lr']:g}, batch {sc['batch_size']}), probe "
              f"{sc['probe_size']}, gamma auto, reference client 0; "
              f"n = {nrep} set{'s' if nrep > 1 else ''} of clients, "
              f"seeds {', '.join(str(a.seed) for a in reps)} (client i of the set at seed s: seed "
              f"1000 s + i)\n\n"
              f"Data: {first['data_note']}; {first['train_images']} train / {first['test_images']} test images; "
              f"clients of {min(sizes)}–{max(sizes)} images; "
              f"probe {sc['probe_size']} images held out from client data (20% of it held out again to choose "
              f"gamma; gammas chosen: {', '.join(f'{g:g}' for g in gammas) or '-'}); merge of the first n "
              f"clients; post-processing: {post}; device {environment()['device']}. Statistics collection "
              f"(once for all N models, per set): {', '.join(f'{st:.1f}' for st in stats_s)} s.\n\n"
              f"Test accuracy %: mean ± sample std over the n = {nrep} sets (one value when n = 1). Base "
              f"accuracies per set: " + "; ".join(f"seed {r['seed']}: " + ", ".join(f"{b:.2f}" for b in r["bases"])
                                                  for r in runs) + "\n\n")
    write_results(sc["out"], "many_models", {"bases": [r["bases"] for r in runs], "mean_bases": mean_bases,
                                             "ensembles": ensembles, "summary": summary,
                                             "results": [x for r in runs for x in r["results"]], "runs": runs,
                                             "replicates": replicates_record(reps),
                                             "training": training_record(args, sc, args.clients),
                                             "data": first["data"], "statistics_s": stats_s,
                                             "config": {k: str(v) for k, v in sc.items()}, "args": vars(args),
                                             "environment": environment(), "command": command_line(
                                                 "many_models", argv)},
                  header + md_table(headers, rows))
    series = {"ensemble": [e["mean"] for e in ensembles], "mean base": [b["mean"] for b in mean_bases]}
    styles = {"ensemble": {"color": "black", "linestyle": "--", "marker": None},
              "mean base": {"color": "gray", "linestyle": ":", "marker": None}}
    for j, method in enumerate(methods):
        for k, v in enumerate(labels):
            name = method if v == "none" else f"{method} + {v}"
            series[name] = [cell(n, method, v)["mean"] for n in ns]
            styles[name] = {"color": f"C{j % 10}", "linestyle": ("--", "-", ":")[k % 3],
                            "marker": ("x", "o", "s")[k % 3]}
    line_plot(sc["out"] / "many_models.png", ns, series, styles=styles, xticks=ns, ylim=(0, 100),
              title=f"Merging n of {args.clients} {args.arch} x{sc['width']} models ({args.split}, "
                    f"{sc['epochs']} epochs, probe {sc['probe_size']}, gamma auto, mean of {nrep})",
              xlabel="number of merged models n")


if __name__ == "__main__":
    main()
