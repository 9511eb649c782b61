"""Where to measure a residual stream (issue 16, item 8): every block's output pooled vs the stream's end.

    python -m benchmarks.residual_sites --arch resnet20 --width 1 --epochs 8 --max-train 10000 --pairs 3

A residual stream is one basis that several blocks add into (ResNet20: one per stage). fedmerge measures its
statistics at every state of the stream (after each block's add + ReLU) and pools them (``residual_sites="all"``);
upstream CCA Merge / ZipIt! measure ResNets once per stage end (``"last"``). For each of ``--pairs`` independent
pairs (pair r at seed --seed + r, default regime ``same``: both clients train on every non-probe image, each from
its own seed), both choices merge the same two models onto client 0 with CCA (γ chosen on the held-out 20% of
the probe) and with Permute, with BatchNorm reset (the ResNet's post-processing) and without. Rows are the mean
± sample std over the pairs; the bases and the ensemble are listed per pair.
"""
from __future__ import annotations

import sys
import time

from fedmerge.common.engine.graph import RESIDUAL_SITES, derive_spec
from fedmerge.common.engine.merge import (
    GAMMA_GRID,
    has_batchnorm,
    merge_from_statistics,
)
from fedmerge.common.engine.stats import collect_statistics
from fedmerge.common.task.evaluate import ensemble_evaluate
from fedmerge.common.wire.probe import as_batches

from .common import (
    Setup,
    add_replicates_arg,
    add_split_arg,
    base_parser,
    checkpoint_tag,
    command_line,
    environment,
    fmt_mean_std,
    md_table,
    mean_std,
    pct,
    replicate_args,
    replicates_record,
    resolve,
    summarise,
    train_clients,
    training_record,
    write_results,
)

METHODS = ("cca", "permute")


def run_pair(args, sc: dict) -> tuple[dict, list[dict]]:
    setup = Setup(args, sc, args.split, 2)
    print(f"pair at seed {args.seed}: {setup.describe()}", flush=True)
    models = train_clients(args, sc, setup, 2, checkpoint_tag(args, sc, args.split))
    bases = [pct(m, setup.test_loader, args.device) for m in models]
    ens = 100.0 * ensemble_evaluate(models, setup.test_loader, device=args.device)["accuracy"]
    fit, held = as_batches(setup.probe_loader).split(0.2, args.seed)
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    bn = has_batchnorm(models[0])
    recs = []
    for sites in RESIDUAL_SITES:
        spec = derive_spec(models[0], fit.example(), residual_sites=sites)
        t = time.perf_counter()
        stats = collect_statistics(models, fit, reference=0, spec=spec, device=args.device)
        t_stats = time.perf_counter() - t
        for method in METHODS:
            for post in (False, True):
                t = time.perf_counter()
                merged, info = merge_from_statistics(
                    models[0], states, spec, stats, method=method, reference=0,
                    gamma="auto" if method == "cca" else None, bn_reset=post and bn, repair=post and not bn,
                    reset_batches=fit, eval_batches=held, gamma_grid=GAMMA_GRID, device=args.device,
                    repair_models=models if post and not bn else None)
                rec = {"sites": sites, "method": method, "post": ("BN reset" if bn else "REPAIR") if post else "none",
                       "accuracy": pct(merged, setup.test_loader, args.device), "gamma": info.gamma,
                       "statistics_seconds": t_stats, "merge_seconds": time.perf_counter() - t}
                print(rec, flush=True)
                recs.append(rec)
    return {"seed": args.seed, "bases": bases, "ensemble": ens, "data": setup.describe()}, recs


def main(argv=None):
    p = base_parser(__doc__)
    add_split_arg(p)
    add_replicates_arg(p, "--pairs", "pairs of models")
    p.set_defaults(arch="resnet20")
    args = p.parse_args(argv)
    sc = resolve(args, "residual_sites")
    reps = replicate_args(args)
    pairs, runs = [], []
    t0 = time.time()
    for a in reps:
        info, recs = run_pair(a, sc)
        pairs.append(info)
        runs.append(recs)
    rows = summarise(runs, ("sites", "method", "post"))
    base = mean_std([sum(p["bases"]) / 2 for p in pairs])
    ens = mean_std([p["ensemble"] for p in pairs])
    table = md_table(["residual sites", "method", "post-processing", f"test acc % (n = {len(reps)})"],
                     [[r["sites"], r["method"], r["post"], fmt_mean_std(r["accuracy"])] for r in rows])
    md = (f"# Residual-stream sites — {args.arch} x{sc['width']}, {args.split} split, {sc['epochs']} epochs, "
          f"probe {sc['probe_size']} (20% held out for gamma), n = {len(reps)} pairs\n\n"
          f"`{command_line('residual_sites', sys.argv[1:] if argv is None else argv)}`\n\n"
          f"Mean base accuracy {fmt_mean_std(base)}, logit ensemble {fmt_mean_std(ens)}; per pair (seed: bases, "
          "ensemble): " + "; ".join(f"{p['seed']}: {p['bases'][0]:.2f} / {p['bases'][1]:.2f}, {p['ensemble']:.2f}"
                                   for p in pairs) + "\n\n" + table + "\n")
    write_results(sc["out"], "residual_sites",
                  {"pairs": pairs, "runs": runs, "rows": rows, "replicates": replicates_record(reps),
                   "training": training_record(args, sc, 2), "args": vars(args), "seconds": time.time() - t0,
                   "config": {k: str(v) for k, v in sc.items()}, "environment": environment()}, md)


if __name__ == "__main__":
    main()
