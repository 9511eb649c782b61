"""Compressed statistics (issue 8): bytes each client uploads vs CCA Merge accuracy, per encoding.

    python -m benchmarks.compression --scale cpu --data-root ../shared/data --epochs 16   # reuse two_models' pair
    python -m benchmarks.compression --max-train 600 --max-test 500 --epochs 1 --probe-size 300 \
        --out results/smoke/compression

The two client models are those of ``benchmarks.two_models`` (same ``--split``, default ``same``, seeds and
checkpoint tag,
``results/<scale>/two_models/checkpoints`` unless ``--checkpoints`` names another folder; trained there when
missing; smoke runs (``--max-train``) and other data sets keep theirs under ``<out>/checkpoints``).

Statistics are collected once, exactly (float64), on the fitting 80% of the probe; each setting then encodes
them as the clients would (:mod:`fedmerge.common.wire.compress`: client A is the reference and uploads its own
block, client B its own block and the cross block with A), decodes them as the server does, and merges with
CCA (gamma chosen on the held-out 20% of the probe, as ``gamma="auto"``; weights 1/2; BatchNorm reset for nets
with BatchNorm, nothing else unless ``--repair``). Settings: every ``--dtypes`` at full rank, and every
``--ranks`` x ``--bases`` (cross-block directions: ``svd`` of the raw cross-covariance, ``whitened``: the
top canonical pairs, what the ClientApp sends) x ``--low-rank-dtypes``.

Bytes are what the Flower server counts (``ArrayRecord.count_bytes``: data + per-array headers), per client
and round, relative to the model's float32 weights (``model`` = sum of numel x 4). The issue's goal: an
upload of at most 1.5x the model size per client and round (weights + statistics: statistics <= 0.5x) with
at most 0.5 points of accuracy lost against the float64 full-rank merge. ``goal`` marks the settings that
meet both.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.merge import (
    GAMMA_GRID,
    has_batchnorm,
    merge_from_statistics,
)
from fedmerge.common.engine.stats import Statistics, collect_statistics
from fedmerge.common.wire.compress import (
    DTYPES,
    decode_cross,
    decode_moments,
    encode_cross,
    encode_moments,
)
from fedmerge.common.wire.probe import as_batches
from fedmerge.common.wire.records import arrays_to_record

from .common import (
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
    training_record,
    write_results,
)

GOAL_UPLOAD = 1.5   # x model size per client and round, weights included
GOAL_LOSS = 0.5     # accuracy points


def _rel_fro(blocks, exact, attr: str) -> float:
    """Mean over groups of ||decoded - exact||_F / ||exact||_F."""
    errs = []
    for g, m in exact.items():
        ref = getattr(m, attr)
        errs.append(float((getattr(blocks[g], attr) - ref).norm() / ref.norm().clamp_min(1e-300)))
    return float(np.mean(errs))


def encode_round(st: Statistics, spec, dtype: str, rank: int, basis: str) -> tuple[Statistics, dict]:
    """What the server decodes from the two clients' uploads in this encoding, and their sizes."""
    t = time.perf_counter()
    own_arrays = [encode_moments(o, dtype, rank) for o in st.own]
    own = [decode_moments(a, spec) for a in own_arrays]
    whiten = (own[0], own[1]) if basis == "whitened" and rank > 0 else None
    cross_arrays = encode_cross(st.cross[(0, 1)], dtype, rank, whiten=whiten)
    cross = decode_cross(cross_arrays, spec)
    seconds = time.perf_counter() - t
    sizes = {"own_a": arrays_to_record(own_arrays[0]).count_bytes(),
             "own_b": arrays_to_record(own_arrays[1]).count_bytes(),
             "cross_b": arrays_to_record(cross_arrays).count_bytes(),
             "own_err": _rel_fro(own[1], st.own[1], "m2"), "cross_err": _rel_fro(cross, st.cross[(0, 1)], "c"),
             "encode_decode_s": seconds}
    return Statistics(own=own, cross={(0, 1): cross}, reference=0), sizes


def main(argv=None):
    p = base_parser(__doc__)
    add_split_arg(p, "two_models")
    add_checkpoints_arg(p, "two_models")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="full-rank settings")
    p.add_argument("--ranks", default="8,16,32", help="low-rank settings (0 = none)")
    p.add_argument("--bases", default="whitened,svd", help="cross-block directions for low rank: whitened, svd")
    p.add_argument("--low-rank-dtypes", default="float16", help="dtypes of the low-rank settings")
    p.add_argument("--repair", action="store_true", help="REPAIR after each merge (nets without BatchNorm)")
    p.add_argument("--held-out", type=float, default=0.2, help="probe fraction held out to choose gamma")
    args = p.parse_args(argv)
    dtypes, ranks, bases, lr_dtypes = (comma_list(args.dtypes), [r for r in comma_list(args.ranks, int) if r > 0],
                                       comma_list(args.bases), comma_list(args.low_rank_dtypes))
    if set(dtypes + lr_dtypes) - set(DTYPES) or set(bases) - {"whitened", "svd"}:
        p.error(f"dtypes must be among {DTYPES}, bases among whitened, svd")
    sc = resolve(args, "compression")
    setup, models, ckpt, _, cached = reuse_clients(args, sc, "two_models")
    bases_acc = [pct(m, setup.test_loader, args.device) for m in models]

    probe = as_batches(setup.probe_loader)
    fit, held = probe.split(args.held_out, args.seed)  # as merge_models splits it for gamma="auto"
    spec = derive_spec(models[0], fit.example())
    t = time.perf_counter()
    st = collect_statistics(models, fit, reference=0, spec=spec, device=args.device)
    stats_s = time.perf_counter() - t
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    model_bytes = sum(v.numel() * 4 for v in states[0].values() if v.is_floating_point())
    weights_record = ArrayRecord(states[1]).count_bytes()
    bn = has_batchnorm(models[0])
    dims = [g.dim for g in spec.groups.values()]

    settings = [(d, 0, "-") for d in dtypes] + [(d, r, b) for d in lr_dtypes for r in ranks for b in bases]
    if ("float64", 0, "-") not in settings:
        settings.insert(0, ("float64", 0, "-"))
    raw = []
    for dtype, rank, basis in settings:
        stats, sizes = encode_round(st, spec, dtype, rank, basis if rank else "-")
        t = time.perf_counter()
        merged, info = merge_from_statistics(
            models[0], states, spec, stats, method="cca", reference=0, gamma="auto", weights=[0.5, 0.5],
            bn_reset=bn, repair=args.repair, reset_batches=fit, eval_batches=held, gamma_grid=GAMMA_GRID,
            device=args.device, repair_models=models if args.repair else None)
        merge_s = time.perf_counter() - t
        acc = pct(merged, setup.test_loader, args.device)
        stats_b = sizes["own_b"] + sizes["cross_b"]
        rec = {"dtype": dtype, "rank": rank, "basis": basis, **sizes, "stats_bytes": stats_b,
               "stats_over_model": stats_b / model_bytes,
               "upload_over_model": (weights_record + stats_b) / model_bytes,
               "accuracy": acc, "gamma": info.gamma, "merge_s": merge_s}
        raw.append(rec)
        print(f"{dtype:9s} rank {rank:3d} {basis:8s} stats {stats_b / 1024:9.1f} KiB "
              f"({rec['stats_over_model']:.3f}x model) acc {acc:.2f} gamma {info.gamma:g} "
              f"cross err {sizes['cross_err']:.2e}", flush=True)
    base = next(r for r in raw if r["dtype"] == "float64" and r["rank"] == 0)
    for r in raw:
        r["delta"] = r["accuracy"] - base["accuracy"]
        r["goal"] = bool(r["upload_over_model"] <= GOAL_UPLOAD and r["delta"] >= -GOAL_LOSS)

    rows = [[r["dtype"], r["rank"] or "full", r["basis"], f"{r['own_b'] / 1024:.1f}", f"{r['cross_b'] / 1024:.1f}",
             f"{r['stats_over_model']:.3f}", f"{r['upload_over_model']:.3f}", f"{r['own_err']:.1e}",
             f"{r['cross_err']:.1e}", r["accuracy"], f"{r['delta']:+.2f}", f"{r['gamma']:g}",
             "yes" if r["goal"] else "no"] for r in raw]
    table = md_table(["dtype", "rank", "cross basis", "own KiB", "cross KiB", "stats / model", "upload / model",
                      "own err", "cross err", "CCA test acc %", "delta pts", "gamma", "goal"], rows)
    met = [r for r in raw if r["goal"]]
    smallest = min(met, key=lambda r: r["upload_over_model"]) if met else None
    header = (f"# Compressed statistics — {args.arch} x{sc['width']} on {setup.train.name}, 2 clients, "
              f"{args.split} split\n\n"
              f"Data: {data_note(setup.train)}; {len(setup.train)} train / {len(setup.test)} test images; probe "
              f"{sc['probe_size']} images ({1 - args.held_out:.0%} for statistics, {args.held_out:.0%} to choose "
              f"gamma); client models of benchmarks.two_models ({'loaded from' if cached else 'trained into'} "
              f"{ckpt}, {sc['epochs']} epochs); seed {args.seed}; device {environment()['device']}.\n\n"
              f"Base A {bases_acc[0]:.2f}%, base B {bases_acc[1]:.2f}%. Merge groups: {len(dims)}, widths {dims}. "
              f"Model: {model_bytes / 2 ** 20:.2f} MiB of float32 weights (weights record "
              f"{weights_record / 2 ** 20:.2f} MiB). Statistics collected once in {stats_s:.1f} s.\n\n"
              f"Per round client B (not the reference) uploads weights, its own block and the cross block "
              f"(client A: weights and own block only). `stats / model`: client B's statistics bytes over the "
              f"float32 model size; `upload / model`: with its weights. `own err` / `cross err`: mean relative "
              f"Frobenius error of the decoded blocks. CCA Merge with gamma auto"
              f"{' and REPAIR' if args.repair else ''}{' and BatchNorm reset' if bn else ''}; `delta`: points "
              f"against float64 full rank. Goal (issue 8): upload <= {GOAL_UPLOAD}x model, loss <= {GOAL_LOSS} "
              f"points.\n\n")
    names = ", ".join(f"{r['dtype']}/{r['rank'] or 'full'}{'/' + r['basis'] if r['rank'] else ''}" for r in met)
    footer = ("\n" + (f"Meeting the goal: {names}. Smallest upload among them: {smallest['dtype']} rank "
                      f"{smallest['rank'] or 'full'} ({smallest['upload_over_model']:.3f}x model, "
                      f"{smallest['delta']:+.2f} points).\n" if met else "No setting meets the goal.\n"))
    write_results(sc["out"], "compression",
                  {"results": raw, "bases": bases_acc, "model_bytes": model_bytes, "weights_record_bytes":
                   weights_record, "group_dims": dims, "statistics_s": stats_s, "checkpoints": str(ckpt),
                   "checkpoints_cached": cached, "data": setup.describe(),
                   "config": {k: str(v) for k, v in sc.items()}, "args": vars(args),
                   "training": training_record(args, sc, 2), "goal": {
                       "upload_over_model": GOAL_UPLOAD, "loss_points": GOAL_LOSS},
                   "environment": environment(), "command": command_line("compression", argv)},
                  header + table + footer)
    plot_tradeoff(sc["out"] / "compression.png", raw, title=f"Compressed statistics: {args.arch} x{sc['width']}, "
                                                             f"CCA Merge of two clients")
    return raw


def plot_tradeoff(path, raw: list[dict], title: str = "") -> Path:
    """Merged accuracy against the client's upload (x model size), one point per encoding, goal region shaded."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot(111)
    for r in raw:
        label = f"{r['dtype']}" + (f" r{r['rank']} {r['basis']}" if r["rank"] else "")
        marker = "o" if not r["rank"] else ("^" if r["basis"] == "whitened" else "s")
        ax.plot(r["upload_over_model"], r["accuracy"], marker, ms=7, label=label)
    ref = next(r["accuracy"] for r in raw if r["dtype"] == "float64" and not r["rank"])
    ax.axvspan(1.0, GOAL_UPLOAD, color="green", alpha=0.07, label=f"upload <= {GOAL_UPLOAD}x")
    ax.axhline(ref - GOAL_LOSS, color="green", linestyle=":", label=f"float64 - {GOAL_LOSS} pt")
    ax.set_xlabel("upload per client per round / float32 model size")
    ax.set_ylabel("CCA merged test accuracy %")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


if __name__ == "__main__":
    main()
