"""NP Merge (issue 8): learned per-parameter merge coefficients after alignment vs plain averaging.

    python -m benchmarks.np_merge --scale cpu --data-root ../shared/data --epochs 16   # reuse two_models' pair

The two client models of ``benchmarks.two_models`` (same ``--split``, default ``same``; same tag and checkpoint
folder, trained when missing). For each alignment (``--methods``, default permute and CCA; gamma auto) the plain
weighted average and NP Merge (coefficients learned with Adam on the fitting 80% of the labelled probe, early
stopping on the held-out 20%, the slice that also chooses gamma), each evaluated on the test set. REPAIR rows
(nets without BatchNorm) are given for comparison: REPAIR and NP Merge are alternatives in ``merge_models``.
"""
from __future__ import annotations

import time

from fedmerge.common.engine.merge import has_batchnorm, merge_models
from fedmerge.common.wire.probe import as_batches

from .common import (
    add_checkpoints_arg,
    add_split_arg,
    base_parser,
    command_line,
    data_note,
    environment,
    md_table,
    method_list,
    pct,
    resolve,
    reuse_clients,
    training_record,
    write_results,
)
from .plots import bar_chart


def main(argv=None):
    p = base_parser(__doc__)
    add_split_arg(p, "two_models")
    add_checkpoints_arg(p, "two_models")
    p.add_argument("--methods", default="permute,cca")
    p.add_argument("--steps", type=int, default=200, help="NP Merge optimiser steps (at most)")
    p.add_argument("--np-lr", type=float, default=0.05, help="NP Merge learning rate")
    p.add_argument("--granularity", default="element", choices=["element", "unit", "tensor"],
                   help="NP Merge coefficients per entry (default here: as published and as docs/results.md measured "
                        "this benchmark), per output unit (the engine's default) or per tensor")
    args = p.parse_args(argv)
    methods = method_list(args.methods, p)
    sc = resolve(args, "np_merge")
    setup, models, _, _, _ = reuse_clients(args, sc, "two_models")
    bases = [pct(m, setup.test_loader, args.device) for m in models]
    probe = as_batches(setup.probe_loader)
    bn = has_batchnorm(models[0])
    raw, rows = [], []
    variants = [("average", {}), ("NP Merge", {"np_merge": {"steps": args.steps, "lr": args.np_lr,
                                                            "granularity": args.granularity}})]
    if not bn:
        variants.append(("REPAIR", {"repair": True}))
    for method in methods:
        for label, kw in variants:
            t = time.perf_counter()
            merged, info = merge_models(models, probe, method=method, reference=0, gamma="auto", return_info=True,
                                        device=args.device, **kw)
            acc = pct(merged, setup.test_loader, args.device)
            rec = {"method": method, "variant": label, "accuracy": acc, "gamma": info.gamma,
                   "seconds": time.perf_counter() - t, "np_merge": info.np_merge}
            raw.append(rec)
            nm = info.np_merge or {}
            rows.append([method, label, acc, "" if info.gamma is None else f"{info.gamma:g}",
                         nm.get("steps", ""), rec["seconds"]])
            print(rec, flush=True)
    header = (f"# NP Merge vs plain averaging — {args.arch} x{sc['width']}, two clients, {args.split} split\n\n"
              f"{data_note(setup.train)}; {sc['epochs']} epochs per client; probe {sc['probe_size']} held-out "
              f"training images (80% to fit statistics and NP coefficients, 20% for gamma and early stopping); "
              f"NP Merge: Adam, at most {args.steps} steps, lr {args.np_lr}, per {args.granularity}; seed "
              f"{args.seed}; device {environment()['device']}. Base A {bases[0]:.2f}%, base B {bases[1]:.2f}%.\n\n")
    write_results(sc["out"], "np_merge", {"bases": bases, "results": raw, "data": setup.describe(),
                                          "training": training_record(args, sc, 2), "args": vars(args),
                                          "environment": environment(),
                                          "command": command_line("np_merge", argv)},
                  header + md_table(["alignment", "merge", "test acc %", "gamma", "NP steps", "seconds"], rows))
    plot(sc["out"] / "np_merge.png", raw, bases, title=f"NP Merge vs averaging: {args.arch} x{sc['width']}, "
                                                       f"{args.split}, {sc['epochs']} epochs")


def plot(path, raw: list[dict], bases: list[float], title: str = ""):
    methods = list(dict.fromkeys(r["method"] for r in raw))
    variants = list(dict.fromkeys(r["variant"] for r in raw))
    series = {v: [next((r["accuracy"] for r in raw if r["method"] == m and r["variant"] == v), None)
                  for m in methods] for v in variants}
    return bar_chart(path, methods, series, title=title, xlabel="alignment (merge: colour)",
                     hlines={"base A": bases[0], "base B": bases[1]})


if __name__ == "__main__":
    main()
