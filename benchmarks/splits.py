"""Data splits (paper Table 3): 8 clients under three non-IID splits, base models, ensemble and merges.

These are the Table 3 analogues (the paper: ResNet20 x8 on CIFAR-100, 8 clients). The paper's Table 1 and Fig. 4
train every model on the same full training set (``--split same`` of benchmarks.two_models / many_models), a
different regime: 80/20 results are not like-for-like with Table 1.

    python -m benchmarks.splits --scale cpu --data-root ../shared/data     # ResNet20 x0.5, 3 epochs, CPU
    python -m benchmarks.splits --scale paper                              # ResNet20 x8, 200 epochs (GPU)

Splits (of the training data left after the probe is held out; common/splits.py):

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
"""
from __future__ import annotations

import numpy as np
import torch

from fedmerge.common.merge import METHODS, has_batchnorm
from fedmerge.common.models import ClassEmbeddingHead
from fedmerge.common.splits import split_summary

from .common import (MergeCache, Setup, acc_pct, apply_arch_defaults, base_parser, checkpoint_tag, command_line,
                     data_note, environment, md_table, pct, resolve, test_logits, train_clients, training_record,
                     write_results)
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


def main(argv=None):
    p = base_parser(__doc__)
    p.set_defaults(arch="resnet20")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated, from {', '.join(SPLITS)}")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--methods", default="permute,zipit,cca", help="comma-separated merge_models methods")
    p.add_argument("--embedding-dim", type=int, default=0,
                   help="class-embedding size for the disjoint split (0: the number of classes)")
    args = p.parse_args(argv)
    apply_arch_defaults(args, ARCH_DEFAULTS)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        p.error(f"unknown split(s) {bad}; choose from {', '.join(SPLITS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; available: {', '.join(sorted(METHODS))}")
    sc = resolve(args, "splits")
    n = args.clients
    per_split, raw = {}, []
    bn = post = None
    for split in splits:
        setup = Setup(args, sc, split, n, alpha=args.alpha)
        print(f"data ({split}): {setup.describe()}", flush=True)
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
            raw.append({"split": split, "method": method, "post": post, "accuracy": merged_acc[method],
                        "gamma": info.gamma, "params": info.params, "seconds": secs})
            print(raw[-1], flush=True)
        per_split[split] = {"bases": bases, "base_own_classes": own, "ensemble": ens, "merged": merged_acc,
                            "gamma": gammas, "statistics_s": cache.statistics_s, "data": setup.describe(),
                            "classes_per_client": summary["classes_per_client"],
                            "class_counts": summary["class_counts"]}
        data_line = f"{data_note(setup.train)}; {len(setup.train)} train / {len(setup.test)} test images"
    cols = [split_label(s, args.alpha) for s in splits]
    rows = [["base (mean of clients)"] + [float(np.mean(per_split[s]["bases"])) for s in splits],
            ["base (best client)"] + [float(np.max(per_split[s]["bases"])) for s in splits],
            ["base, own classes only (mean)"] + [float(np.nanmean(per_split[s]["base_own_classes"]))
                                                 for s in splits],
            ["ensemble (mean logits)"] + [per_split[s]["ensemble"] for s in splits]]
    for m in methods:
        g = [per_split[s]["gamma"][m] for s in splits]
        gtxt = "" if all(x is None for x in g) else " (gamma " + "/".join(f"{x:g}" for x in g) + ")"
        rows.append([f"{METHOD_NAMES.get(m, m)} + {post}{gtxt}"] + [per_split[s]["merged"][m] for s in splits])
    sizes = "; ".join(f"{split_label(s, args.alpha)}: {min(per_split[s]['data']['client_sizes'])}–"
                      f"{max(per_split[s]['data']['client_sizes'])} images, "
                      f"{min(per_split[s]['classes_per_client'])}–{max(per_split[s]['classes_per_client'])} "
                      f"classes per client" for s in splits)
    header = (f"# Data splits — {n} clients, {args.arch} x{sc['width']}, {sc['epochs']} epochs, probe "
              f"{sc['probe_size']}, gamma auto\n\n"
              f"Data: {data_line}; probe {sc['probe_size']} training images held out from client data (20% of "
              f"it held out again to choose gamma from the default grid); clients: {sizes} (all non-probe "
              f"training images, no per-client cap). Every client trains from its own seed; merges of all {n} "
              f"clients onto client 0 with {post}. The disjoint split uses a fixed orthonormal class-embedding "
              f"head shared by all clients (accuracy = nearest class embedding). 'Own classes only': each client on "
              f"the test images of the classes it holds (trivially 100% for a one-class client). Test accuracy %, seed "
              f"{args.seed}, device {environment()['device']}.\n\n")
    write_results(sc["out"], "splits", {"splits": per_split, "results": raw, "training": training_record(args, sc, n),
                                        "config": {k: str(v) for k, v in sc.items()}, "args": vars(args),
                                        "environment": environment(), "command": command_line("splits", argv)},
                  header + md_table(["", *cols], rows))
    series = {"base (mean)": [float(np.mean(per_split[s]["bases"])) for s in splits],
              "ensemble": [per_split[s]["ensemble"] for s in splits]}
    for m in methods:
        series[f"{METHOD_NAMES.get(m, m)} + {post}"] = [per_split[s]["merged"][m] for s in splits]
    bar_chart(sc["out"] / "splits.png", cols, series, xlabel="split",
              title=f"{n} clients, {args.arch} x{sc['width']}, {sc['epochs']} epochs, probe {sc['probe_size']}")



if __name__ == "__main__":
    main()
