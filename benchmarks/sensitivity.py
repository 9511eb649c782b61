"""Sensitivity of CCA Merge to its regularisation gamma and to the probe size (the two models of two_models).

    python -m benchmarks.sensitivity --scale cpu --data-root ../shared/data               # VGG11 x0.25, 12 epochs
    python -m benchmarks.sensitivity --scale cpu --data-root ../shared/data --epochs 16   # reuse 16-epoch models
    python -m benchmarks.sensitivity --scale paper                                        # VGG11 x1 (GPU)

The two client models are the ones of ``benchmarks.two_models`` (same ``--split``, default ``same``, seeds, tag
and checkpoint folder,
``results/<scale>/two_models/checkpoints`` unless ``--checkpoints`` says otherwise; trained there, exactly as
two_models trains them, when missing). Smoke runs (``--max-train``) and other data sets keep their checkpoints
under ``<out>/checkpoints`` so they never mix with the real ones.

(a) gamma: CCA Merge with gamma fixed at each value of a wide grid (``--gammas``, default 1e-4 ... 100), with and
    without the post-processing (REPAIR; BatchNorm reset for nets with BatchNorm). Statistics come from the
    fitting part of the probe, the same 80% that ``gamma="auto"`` fits on, so each point is exactly the model
    auto would build for that gamma; the held-out 20% of the probe scores every point as auto does (accuracy,
    then cross-entropy). Reported: test accuracy per gamma, the gamma ``gamma="auto"`` chooses on its default
    grid (merge.GAMMA_GRID, run for real) and its test accuracy, the gamma auto would choose over this wider
    grid, and the best gamma on the test set (an oracle, for reference only).
(b) probe size: permute and CCA (gamma auto) with probes of ``--probe-sizes`` images (default 100 ... 10000).
    Probes are nested: a probe of k images is the first k of one seeded permutation of the training set, whose
    first ``probe_size`` images (2,000 at CPU scale) are the held-out probe pool no client trained on. Larger
    probes also contain client training images (the paper draws its probe from the training set too); the
    table says how many.
"""
from __future__ import annotations

import time

import numpy as np
import torch.nn.functional as F

from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.merge import (
    GAMMA_GRID,
    has_batchnorm,
    merge_from_statistics,
    merge_models,
)
from fedmerge.common.engine.stats import collect_statistics
from fedmerge.common.task.data import make_loader, split_probe_pool
from fedmerge.common.task.evaluate import predict_logits
from fedmerge.common.wire.probe import as_batches

from .common import (
    acc_pct,
    add_checkpoints_arg,
    add_split_arg,
    base_parser,
    comma_list,
    command_line,
    data_note,
    environment,
    md_table,
    pct,
    resolve,
    reuse_clients,
    test_logits,
    training_record,
    write_results,
)
from .plots import line_plot

GAMMAS = (1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
PROBE_SIZES = (100, 300, 1000, 3000, 10000)


def held_score(model, held, device=None) -> tuple[float, float]:
    """(accuracy %, cross-entropy) on the held-out probe slice: the criterion of gamma='auto'."""
    logits, y = predict_logits(model, held, device)
    return acc_pct(logits, y), float(F.cross_entropy(logits, y))


def main(argv=None):
    p = base_parser(__doc__)
    add_checkpoints_arg(p, "two_models")
    add_split_arg(p, "two_models")
    p.add_argument("--gammas", default=",".join(f"{g:g}" for g in GAMMAS), help="gamma grid of part (a)")
    p.add_argument("--probe-sizes", default=",".join(str(k) for k in PROBE_SIZES), help="probe sizes of part (b)")
    p.add_argument("--parts", default="gamma,probe", help="which parts to run: gamma, probe or both")
    args = p.parse_args(argv)
    parts = set(comma_list(args.parts))
    if not parts or parts - {"gamma", "probe"}:
        p.error("--parts takes gamma, probe or gamma,probe")
    gammas = sorted(comma_list(args.gammas, float))
    sizes = sorted(int(v) for v in comma_list(args.probe_sizes, float))
    if any(g < 0 for g in gammas) or any(k < 10 for k in sizes):
        p.error("gammas must be >= 0 and probe sizes >= 10")
    sc = resolve(args, "sensitivity")
    setup, models, ckpt, _, cached = reuse_clients(args, sc, "two_models")
    logits, y = test_logits(models, setup.test_loader, args.device)
    bases = [acc_pct(lg, y) for lg in logits]
    ens = acc_pct(sum(logits) / 2, y)
    bn = has_batchnorm(models[0])
    post = "BN reset" if bn else "REPAIR"
    refs = {"base A": bases[0], "base B": bases[1], "ensemble": ens}
    payload = {"bases": bases, "ensemble": ens, "data": setup.describe(), "checkpoints": str(ckpt),
               "checkpoints_cached": cached, "config": {k: str(v) for k, v in sc.items()}, "args": vars(args),
               "training": training_record(args, sc, 2),
               "environment": environment(), "command": command_line("sensitivity", argv)}
    md = [f"# Sensitivity of CCA Merge — {args.arch} x{sc['width']}, 2 clients, {args.split} split, "
          f"{sc['epochs']} epochs, "
          f"probe {sc['probe_size']}\n\n"
          f"Data: {data_note(setup.train)}; {len(setup.train)} train / {len(setup.test)} test images; client "
          f"models of benchmarks.two_models ({'loaded from' if cached else 'trained into'} {ckpt}); seed "
          f"{args.seed}; device {environment()['device']}. Base A {bases[0]:.2f}%, base B {bases[1]:.2f}%, "
          f"ensemble {ens:.2f}%. Merges all-to-one onto client A.\n"]
    plots = []

    if "gamma" in parts:
        probe = as_batches(setup.probe_loader)
        fit, held = probe.split(0.2, 0)  # merge_models' split for gamma="auto" (held_out=0.2, seed=0)
        spec = derive_spec(models[0], probe.example())
        t = time.perf_counter()
        stats = collect_statistics(models, fit, reference=0, spec=spec, device=args.device)
        stats_s = time.perf_counter() - t
        states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]

        def build(g, use_post):
            return merge_from_statistics(models[0], states, spec, stats, method="cca", reference=0, gamma=g,
                                         bn_reset=bn and use_post, repair=(not bn) and use_post, reset_batches=fit,
                                         eval_batches=held, repair_models=models, device=args.device)

        sweep = []
        for g in gammas:
            for use_post in (False, True):
                t = time.perf_counter()
                merged, _ = build(g, use_post)
                secs = time.perf_counter() - t
                h_acc, h_loss = held_score(merged, held, args.device)
                rec = {"gamma": g, "post": post if use_post else "none", "test_accuracy":
                       pct(merged, setup.test_loader, args.device), "held_accuracy": h_acc, "held_loss": h_loss,
                       "seconds": secs}
                sweep.append(rec)
                print(rec, flush=True)
        summary = {}
        for use_post in (False, True):
            name = post if use_post else "none"
            t = time.perf_counter()
            merged, info = build("auto", use_post)  # the real thing, on the default grid
            secs = time.perf_counter() - t
            recs = [r for r in sweep if r["post"] == name]
            # sanity: where both grids meet, the sweep's held-out scores and test accuracy are auto's
            consistent = all(abs(r["held_accuracy"] / 100 - info.gamma_scores[r["gamma"]][0]) < 1e-6
                             and abs(r["held_loss"] + info.gamma_scores[r["gamma"]][1]) < 1e-3
                             for r in recs if r["gamma"] in info.gamma_scores)
            wide = max(recs, key=lambda r: (r["held_accuracy"], -r["held_loss"], -r["gamma"]))
            best = max(recs, key=lambda r: r["test_accuracy"])
            summary[name] = {
                "auto_grid": list(GAMMA_GRID), "auto_gamma": info.gamma,
                "auto_test_accuracy": pct(merged, setup.test_loader, args.device), "auto_seconds": secs,
                "auto_held_scores": {f"{g:g}": list(s) for g, s in info.gamma_scores.items()},
                "wide_grid_auto_gamma": wide["gamma"], "wide_grid_auto_test_accuracy": wide["test_accuracy"],
                "best_test_gamma": best["gamma"], "best_test_accuracy": best["test_accuracy"],
                "best_above_auto_grid": best["gamma"] > max(GAMMA_GRID),
                "sweep_matches_auto_scores": consistent}
            print(name, summary[name], flush=True)
        payload["gamma"] = {"grid": gammas, "sweep": sweep, "summary": summary, "statistics_s": stats_s,
                            "fit_images": fit.num_samples, "held_images": held.num_samples}

        def mark(g, name):
            s = summary[name]
            return ("A" if g == s["auto_gamma"] else "") + ("W" if g == s["wide_grid_auto_gamma"] else "") + (
                "*" if g == s["best_test_gamma"] else "")

        rows = []
        for g in gammas:
            r0 = next(r for r in sweep if r["gamma"] == g and r["post"] == "none")
            r1 = next(r for r in sweep if r["gamma"] == g and r["post"] == post)
            rows.append([f"{g:g}", r0["test_accuracy"], r0["held_accuracy"], mark(g, "none"),
                         r1["test_accuracy"], r1["held_accuracy"], mark(g, post)])
        lines = []
        for name, label in (("none", "CCA"), (post, f"CCA + {post}")):
            s = summary[name]
            lines.append(f"* {label}: `gamma=\"auto\"` (grid {', '.join(f'{g:g}' for g in GAMMA_GRID)}) chose "
                         f"**{s['auto_gamma']:g}** -> {s['auto_test_accuracy']:.2f}% test; over this wider grid the "
                         f"same criterion would choose {s['wide_grid_auto_gamma']:g} -> "
                         f"{s['wide_grid_auto_test_accuracy']:.2f}%; best on the test set: "
                         f"{s['best_test_gamma']:g} -> {s['best_test_accuracy']:.2f}%"
                         + (" (**above the auto grid's maximum "
                            f"{max(GAMMA_GRID):g}**)" if s["best_above_auto_grid"] else "") + ".")
        md.append(f"\n## (a) Test accuracy vs gamma\n\nProbe: the {sc['probe_size']} held-out images; statistics "
                  f"on its fitting part ({fit.num_samples} images, collected once in {stats_s:.1f} s), the other "
                  f"{held.num_samples} images score each gamma (the `gamma=\"auto\"` criterion: held-out accuracy, "
                  f"then cross-entropy). A: chosen by auto on its grid; W: what auto would choose over this grid; "
                  f"*: best test accuracy.\n\n"
                  + md_table(["gamma", "CCA test %", "CCA held-out %", "", f"CCA + {post} test %",
                              f"CCA + {post} held-out %", ""], rows) + "\n" + "\n".join(lines) + "\n")
        series, styles = {}, {}
        for j, (name, label) in enumerate((("none", "CCA"), (post, f"CCA + {post}"))):
            recs = {r["gamma"]: r for r in sweep if r["post"] == name}
            series[f"{label}: test"] = [recs[g]["test_accuracy"] for g in gammas]
            series[f"{label}: held-out probe"] = [recs[g]["held_accuracy"] for g in gammas]
            styles[f"{label}: test"] = {"color": f"C{j}", "linestyle": "-", "marker": "o"}
            styles[f"{label}: held-out probe"] = {"color": f"C{j}", "linestyle": ":", "marker": "x"}
        points = {f"auto ({label}): gamma {summary[name]['auto_gamma']:g}":
                  (summary[name]["auto_gamma"], summary[name]["auto_test_accuracy"])
                  for name, label in (("none", "CCA"), (post, f"CCA + {post}"))}
        plots.append(line_plot(sc["out"] / "sensitivity_gamma.png", gammas, series, styles=styles, logx=True,
                               xticks=gammas, hlines=refs, vlines={f"auto grid max {max(GAMMA_GRID):g}":
                                                                   max(GAMMA_GRID)},
                               points=points, ylim=(0, 100), xlabel="gamma",
                               title=f"CCA Merge vs gamma: {args.arch} x{sc['width']}, {args.split}, {sc['epochs']} "
                                     f"epochs, probe {sc['probe_size']}"))

    if "probe" in parts:
        n_train = len(setup.train)
        client_idx = np.concatenate(setup.parts)
        res = []
        for k in sizes:
            if k > n_train:
                print(f"probe size {k} > {n_train} training images: skipped", flush=True)
                continue
            idx = split_probe_pool(n_train, k, args.seed, from_union=True)[0]  # first k of the seeded permutation
            overlap = int(np.isin(idx, client_idx).sum())
            loader = make_loader(setup.train, idx, batch_size=250, train=False)
            for method in ("permute", "cca"):
                t = time.perf_counter()
                merged, info = merge_models(models, loader, method=method, reference=0, gamma="auto",
                                            bn_reset=bn, repair=False, return_info=True, device=args.device)
                secs = time.perf_counter() - t
                rec = {"probe_size": k, "from_clients": overlap, "method": method,
                       "accuracy": pct(merged, setup.test_loader, args.device), "gamma": info.gamma,
                       "seconds": secs}
                res.append(rec)
                print(rec, flush=True)
        payload["probe"] = res
        done = sorted({r["probe_size"] for r in res})
        rows = []
        for k in done:
            rp = next(r for r in res if r["probe_size"] == k and r["method"] == "permute")
            rc = next(r for r in res if r["probe_size"] == k and r["method"] == "cca")
            rows.append([k, rp["from_clients"], rp["accuracy"], rc["accuracy"], f"{rc['gamma']:g}",
                         rp["seconds"], rc["seconds"]])
        pp = " + BN reset" if bn else ""
        md.append(f"\n## (b) Test accuracy vs probe size\n\nNested probes drawn from the training set: the first "
                  f"{sc['probe_size']} are the held-out pool no client trained on, larger probes add client "
                  f"training images (column 'from clients'). CCA: gamma auto (80/20 fit/held-out split of the "
                  f"probe, default grid); permute uses the whole probe; "
                  f"{'BatchNorm reset on the probe' if bn else 'no REPAIR'}.\n\n"
                  + md_table(["probe images", "from clients", f"permute{pp} %", f"CCA{pp} %", "CCA gamma",
                              "permute s", "CCA s"], rows))
        series = {f"permute{pp}": [next(r["accuracy"] for r in res if r["probe_size"] == k and
                                        r["method"] == "permute") for k in done],
                  f"CCA{pp} (gamma auto)": [next(r["accuracy"] for r in res if r["probe_size"] == k and
                                                 r["method"] == "cca") for k in done]}
        plots.append(line_plot(sc["out"] / "sensitivity_probe.png", done, series, logx=True, xticks=done,
                               hlines=refs, vlines={f"held-out pool ({sc['probe_size']})": sc["probe_size"]},
                               ylim=(0, 100), xlabel="probe images",
                               title=f"Merging vs probe size: {args.arch} x{sc['width']}, {args.split}, "
                                     f"{sc['epochs']} epochs"))
    payload["plots"] = [str(q) for q in plots]
    write_results(sc["out"], "sensitivity", payload, "\n".join(md))


if __name__ == "__main__":
    main()
