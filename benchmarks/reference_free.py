"""Reference-free merging: all-to-one CCA Merge with every choice of reference vs. multi-view CCA (``gcca``).

    python -m benchmarks.reference_free --scale cpu --data-root ../shared/data     # 5 VGG11 x0.25 IID clients

For the merge of the first n of N client models (n = 2..N): all-to-one CCA with each of the n models as
reference (best, worst and mean accuracy over the references, and which reference was best), gcca with
the reference-free consensus basis (``basis="mean"``), and gcca mapped back to client 0's units
(``basis="reference"``); every merge with gamma chosen on the held-out 20% of the probe (``gamma="auto"``),
without and with post-processing (BatchNorm reset for nets with BN, REPAIR otherwise). Statistics of every
pair are collected once on the fitting part of the probe and shared by all merges; the time of computing
the transforms (all gammas of the grid) is reported per merge.

The client models are those of ``benchmarks.many_models`` (same data set-up, same checkpoint tag), from
``results/<scale>/many_models/checkpoints`` or the folder ``--checkpoints`` names (trained there if missing);
smoke runs (``--max-train``/``--max-test``, other data sets) keep theirs under ``<out>/checkpoints``.
"""
from __future__ import annotations

import time

from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.merge import (
    GAMMA_GRID,
    has_batchnorm,
    merge_from_statistics,
)
from fedmerge.common.engine.stats import collect_statistics
from fedmerge.common.task.evaluate import ensemble_evaluate
from fedmerge.common.wire.probe import as_batches

from .common import (
    add_checkpoints_arg,
    add_split_arg,
    base_parser,
    comma_list,
    environment,
    first_models,
    md_table,
    pct,
    resolve,
    reuse_clients,
    training_record,
    write_results,
)


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--clients", type=int, default=5)
    add_split_arg(p, "many_models")
    add_checkpoints_arg(p, "many_models")
    p.add_argument("--post", default="none,post", help="comma list of none | post (BN reset or REPAIR)")
    p.add_argument("--sumcor", action="store_true", help="also gcca variant='sumcor' (basis mean)")
    p.add_argument("--held-out", type=float, default=0.2, help="probe fraction held out to choose gamma")
    args = p.parse_args(argv)
    posts = comma_list(args.post)
    if not posts or any(s not in ("none", "post") for s in posts):
        raise SystemExit(f"--post must be a comma list of none, post; got {args.post!r}")
    if args.clients < 2:
        raise SystemExit("--clients must be >= 2")
    sc = resolve(args, "reference_free")
    setup, models, ckpt, tag, _ = reuse_clients(args, sc, "many_models", args.clients)
    bases = [pct(m, setup.test_loader, args.device) for m in models]
    fit, held = as_batches(setup.probe_loader).split(args.held_out, args.seed)
    spec = derive_spec(models[0], fit.example())
    t = time.perf_counter()
    stats = collect_statistics(models, fit, reference=0, pairs="all", spec=spec, device=args.device)
    stats_seconds = time.perf_counter() - t
    print(f"statistics of all {args.clients * (args.clients - 1) // 2} pairs: {stats_seconds:.1f} s", flush=True)
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    bn = has_batchnorm(models[0])
    post_name = "BN reset" if bn else "REPAIR"

    configs = [("gcca_mean", {"basis": "mean"}), ("gcca_ref0", {"basis": "reference"})]
    if args.sumcor:
        configs.append(("gcca_sumcor_mean", {"basis": "mean", "variant": "sumcor"}))

    raw, tables = [], {}
    ensembles = {}
    for n in range(2, args.clients + 1):
        ensembles[n] = 100.0 * ensemble_evaluate(models[:n], setup.test_loader, device=args.device)["accuracy"]
        sub = first_models(stats, n)
        for post in posts:
            use = post == "post"

            def run(method, reference, **kw):
                t0 = time.perf_counter()
                merged, info = merge_from_statistics(
                    models[reference], states[:n], spec, sub, method=method, reference=reference, gamma="auto",
                    bn_reset=bn and use, repair=use and not bn, reset_batches=fit, eval_batches=held,
                    gamma_grid=GAMMA_GRID, device=args.device, repair_models=models[:n] if use and not bn else None,
                    **kw)
                rec = {"n": n, "post": post_name if use else "none", "method": method, "reference": reference,
                       **kw, "accuracy": pct(merged, setup.test_loader, args.device), "gamma": info.gamma,
                       "transforms_seconds": info.timings.get("transforms", 0.0),
                       "seconds": time.perf_counter() - t0}
                raw.append(rec)
                print(rec, flush=True)
                return rec

            cca = [run("cca", r) for r in range(n)]
            accs = [c["accuracy"] for c in cca]
            best = max(range(n), key=lambda r: accs[r])
            worst = min(range(n), key=lambda r: accs[r])
            row = [n, sum(bases[:n]) / n, ensembles[n], accs[best], best, accs[worst], worst, sum(accs) / n]
            g_recs = [run("gcca", 0, **kw) for _, kw in configs]
            row += [r["accuracy"] for r in g_recs]
            row += [sum(c["transforms_seconds"] for c in cca) / n] + [r["transforms_seconds"] for r in g_recs]
            tables.setdefault(post, []).append(row)

    names = [name for name, _ in configs]
    headers = (["models", "mean base %", "ensemble %", "CCA best ref %", "best ref", "CCA worst ref %", "worst ref",
                "CCA mean over refs %"] + [f"{nm} %" for nm in names]
               + ["CCA transforms s (per ref)"] + [f"{nm} transforms s" for nm in names])
    md = (f"# Reference-free merging — {args.arch} x{sc['width']} on {setup.train.name}, {args.split} split over "
          f"{args.clients} clients, {sc['epochs']} epochs, probe {sc['probe_size']} ({1 - args.held_out:.0%} fit, "
          f"{args.held_out:.0%} to choose gamma), gamma auto over {list(GAMMA_GRID)}; seed {args.seed}\n\n"
          "All-to-one CCA with every client as the reference vs. multi-view CCA (gcca, MAXVAR) mapped back to the "
          "consensus of the clients' units (gcca_mean) or to client 0's units (gcca_ref0). Transform times: all "
          f"gammas of the grid, statistics excluded (all pairs once: {stats_seconds:.1f} s).\n\nBase accuracies: "
          + ", ".join(f"{b:.2f}" for b in bases) + "\n")
    for post in posts:
        md += f"\n## Post-processing: {post_name if post == 'post' else 'none'}\n\n" + md_table(headers, tables[post])
    write_results(sc["out"], "reference_free",
                  {"bases": bases, "ensembles": ensembles, "results": raw, "statistics_seconds": stats_seconds,
                   "data": setup.describe(), "checkpoints": str(ckpt), "tag": tag,
                   "training": training_record(args, sc, args.clients), "args": vars(args),
                   "config": {k: str(v) for k, v in sc.items()}, "environment": environment()}, md)


if __name__ == "__main__":
    main()
