"""Data splits (paper Table 3): 8 clients under three non-IID splits, base models, ensemble and merges.

These are the Table 3 analogues (the paper: ResNet20 x8 on CIFAR-100, 8 clients). The paper's Table 1 and Fig. 4
train every model on the same full training set (``--split same`` of benchmarks.two_models / many_models), a
different regime: 80/20 results are not like-for-like with Table 1.

    python -m benchmarks.splits --scale cpu --data-root ../shared/data     # ResNet20 x0.5, 3 epochs, CPU
    python -m benchmarks.splits --scale paper                              # ResNet20 x8, 200 epochs (GPU)

Splits (of the training data left after the probe is held out; common/task/splits.py):

* ``80/20``: the paper's two-party split generalised to N clients: the classes are cut into N groups, every
  client gets 80% of the images of its own group and 20% of every other group's images is shared by the
  other clients;
* ``dirichlet``: per-class client proportions from Dirichlet(alpha = 0.5);
* ``disjoint``: every client gets all images of its own classes only (with 10 classes and 8 clients: 1-2 each).
  All clients (and the merged model) use one fixed class-embedding head (seeded orthonormal class vectors,
  cosine logits), so they share a label space; accuracy is the nearest class embedding, i.e. the model's own
  forward pass.

Rows: base (mean and best of the clients on the whole test set, and the mean on the test images of each
client's own classes), the logit ensemble of all clients, and the merge of all 8 (all-to-one onto client 0,
gamma chosen on a held-out probe slice) by permute (activation matching), ZipIt! (all pairwise statistics)
and CCA, each with its post-processing (BatchNorm reset for ResNet20, REPAIR for nets without BatchNorm).
Each client trains from its own seed (different inits). CPU defaults: ResNet20 x0.5, 3 epochs, all training
data (no per-client cap; a client's cost is proportional to its share). Paper: ResNet20 x8, 200 epochs.

``--sets N`` trains N independent sets of clients per split (set r at seed --seed + r: its own client seeds,
probe, split and class-embedding head; checkpoints cached per seed); every cell is the mean ± sample std over
the N sets.
"""
from __future__ import annotations

import numpy as np
import torch

from fedmerge.common.engine.merge import has_batchnorm
from fedmerge.common.task.models import ClassEmbeddingHead
from fedmerge.common.task.splits import split_summary

from .common import (
    MergeCache,
    Setup,
    acc_pct,
    add_replicates_arg,
    apply_arch_defaults,
    base_parser,
    checkpoint_tag,
    comma_list,
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
from .plots import bar_chart

ARCH_DEFAULTS = {
    ("resnet20", "cpu"): {"width": 0.5, "epochs": 3},
    ("resnet20", "paper"): {"width": 8.0},
}
SPLITS = ("80/20", "dirichlet", "disjoint")
METHOD_NAMES = {"permute": "permute", "zipit": "ZipIt!", "cca": "CCA", "avg": "average", "ot": "OT",
                "weight_matching": "weight matching", "merge_many": "MergeMany", "gcca": "GCCA"}


def split_label(split: str, alpha: float) -> str:
    return f"dirichlet(alpha={alpha:g})" if split == "dirichlet" else split


def run_set(args, sc, splits, methods) -> dict:
    """One set of ``args.clients`` clients per split at ``args.seed``: bases, ensemble and the merges of all."""
    n = args.clients
    per_split, raw = {}, []
    post = None
    for split in splits:
        setup = Setup(args, sc, split, n, alpha=args.alpha)
        print(f"data ({split}, seed {args.seed}): {setup.describe()}", flush=True)
        head, extra = None, ""
        if split == "dirichlet":
            extra = f"_a{args.alpha:g}"
        if split == "disjoint":
            head = ClassEmbeddingHead.orthonormal(setup.info["num_classes"], args.embedding_dim or None,
                                                  seed=args.seed)
            extra = f"_emb{head.dim}"
        models = train_clients(args, sc, setup, n, checkpoint_tag(args, sc, split, n, extra), head=head)
        logits, y = test_logits(models, setup.test_loader, args.device)
        bases = [acc_pct(lg, y) for lg in logits]
        summary = split_summary(setup.parts, setup.train.y, setup.info["num_classes"])
        own = []
        for i, lg in enumerate(logits):  # accuracy on the test images of the classes client i trained on
            classes = torch.tensor([c for c, k in enumerate(summary["class_counts"][i]) if k > 0])
            mask = torch.isin(y, classes)
            own.append(acc_pct(lg[mask], y[mask]) if mask.any() else float("nan"))
        ens = acc_pct(sum(logits) / n, y)
        bn = has_batchnorm(models[0])
        post = "BN reset" if bn else "REPAIR"
        cache = MergeCache(models, setup.probe_loader, device=args.device)
        merged_acc, gammas = {}, {}
        for method in methods:
            merged, info, secs = cache.merge(n, method, gamma="auto", bn_reset=bn, repair=not bn)
            merged_acc[method] = pct(merged, setup.test_loader, args.device)
            gammas[method] = info.gamma
            raw.append({"seed": args.seed, "split": split, "method": method, "post": post,
                        "accuracy": merged_acc[method], "gamma": info.gamma, "params": info.params, "seconds": secs})
            print(raw[-1], flush=True)
        per_split[split] = {"bases": bases, "base_own_classes": own, "ensemble": ens, "merged": merged_acc,
                            "gamma": gammas, "statistics_s": cache.statistics_s, "data": setup.describe(),
                            "classes_per_client": summary["classes_per_client"],
                            "class_counts": summary["class_counts"]}
        data_line = f"{data_note(setup.train)}; {len(setup.train)} train / {len(setup.test)} test images"
    return {"seed": args.seed, "training": training_record(args, sc, n), "splits": per_split, "results": raw,
            "post_name": post, "data_line": data_line}


def summary_rows(runs: list[dict], splits: list[str]) -> list[dict]:
    """The table's rows per split, each cell :func:`benchmarks.common.mean_std` over the sets: base
    (mean and best client, mean on own classes), ensemble, then each merge (:func:`summarise`)."""
    def over(f):
        return {s: mean_std([f(r["splits"][s]) for r in runs]) for s in splits}

    rows = [{"row": "base (mean of clients)", "cells": over(lambda d: float(np.mean(d["bases"])))},
            {"row": "base (best client)", "cells": over(lambda d: float(np.max(d["bases"])))},
            {"row": "base, own classes only (mean)", "cells": over(lambda d: float(np.nanmean(d["base_own_classes"])))},
            {"row": "ensemble (mean logits)", "cells": over(lambda d: d["ensemble"])}]
    merged = summarise([r["results"] for r in runs], ("split", "method", "post"))
    for m in dict.fromkeys(r["method"] for r in merged):
        rows.append({"row": m, "method": m, "cells": {r["split"]: r["accuracy"] for r in merged if r["method"] == m}})
    return rows


def main(argv=None):
    p = base_parser(__doc__)
    p.set_defaults(arch="resnet20")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated, from {', '.join(SPLITS)}")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--methods", default="permute,zipit,cca", help="comma-separated merge_models methods")
    p.add_argument("--embedding-dim", type=int, default=0,
                   help="class-embedding size for the disjoint split (0: the number of classes)")
    add_replicates_arg(p, "--sets", "sets of clients per split")
    args = p.parse_args(argv)
    apply_arch_defaults(args, ARCH_DEFAULTS)
    splits = comma_list(args.splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        p.error(f"unknown split(s) {bad}; choose from {', '.join(SPLITS)}")
    methods = method_list(args.methods, p)
    if args.replicates < 1:
        p.error("--sets must be at least 1")
    sc = resolve(args, "splits")
    n = args.clients
    reps = replicate_args(args)
    runs = [run_set(a, sc, splits, methods) for a in reps]
    nrep, post, first = len(runs), runs[0]["post_name"], runs[0]
    table = summary_rows(runs, splits)
    cols = [split_label(s, args.alpha) for s in splits]
    rows = []
    for r in table:
        label = r["row"]
        if "method" in r:
            g = ["/".join("-" if run["splits"][s]["gamma"][r["method"]] is None
                          else f"{run['splits'][s]['gamma'][r['method']]:g}" for run in runs) for s in splits]
            gtxt = "" if all(set(x) <= {"-", "/"} for x in g) else " (gamma " + "; ".join(g) + ")"
            label = f"{METHOD_NAMES.get(r['method'], r['method'])} + {post}{gtxt}"
        rows.append([label] + [fmt_mean_std(r["cells"][s]) for s in splits])
    per0 = first["splits"]
    sizes = "; ".join(f"{split_label(s, args.alpha)}: {min(per0[s]['data']['client_sizes'])}–"
                      f"{max(per0[s]['data']['client_sizes'])} images, "
                      f"{min(per0[s]['classes_per_client'])}–{max(per0[s]['classes_per_client'])} "
                      f"classes per client" for s in splits)
    header = (f"# Data splits — {n} clients, {args.arch} x{sc['width']}, {sc['epochs']} epochs, probe "
              f"{sc['probe_size']}, gamma auto; n = {nrep} set{'s' if nrep > 1 else ''} of clients per split\n\n"
              f"Data: {first['data_line']}; probe {sc['probe_size']} training images held out from client data (20% of "
              f"it held out again to choose gamma from the default grid); clients (seed {args.seed}): {sizes} (all "
              f"non-probe training images, no per-client cap). Every client trains from its own seed; merges of all "
              f"{n} clients onto client 0 with {post}. The disjoint split uses a fixed orthonormal class-embedding "
              f"head shared by all clients (accuracy = nearest class embedding). 'Own classes only': each client on "
              f"the test images of the classes it holds (trivially 100% for a one-class client). Test accuracy %: "
              f"mean ± sample std over the n = {nrep} sets (one value when n = 1; gammas per set separated by /), "
              f"seeds {', '.join(str(a.seed) for a in reps)}, device {environment()['device']}.\n\n")
    write_results(sc["out"], "splits", {"split_names": splits, "summary": table, "runs": runs,
                                        "results": [x for r in runs for x in r["results"]],
                                        "replicates": replicates_record(reps), "training": training_record(args, sc, n),
                                        "config": {k: str(v) for k, v in sc.items()}, "args": vars(args),
                                        "environment": environment(), "command": command_line("splits", argv)},
                  header + md_table(["", *cols], rows))
    series = {"base (mean)": [table[0]["cells"][s]["mean"] for s in splits],
              "ensemble": [table[3]["cells"][s]["mean"] for s in splits]}
    for r in table[4:]:
        series[f"{METHOD_NAMES.get(r['method'], r['method'])} + {post}"] = [r["cells"][s]["mean"] for s in splits]
    bar_chart(sc["out"] / "splits.png", cols, series, xlabel="split",
              title=f"{n} clients, {args.arch} x{sc['width']}, {sc['epochs']} epochs, probe {sc['probe_size']}"
                    + (f", mean of {nrep} sets" if nrep > 1 else ""))


if __name__ == "__main__":
    main()
