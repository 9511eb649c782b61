"""Merge quality beyond the paper (issue 20): candidates that close the gap to the ensemble, on two-model pairs.

    python -m benchmarks.merge_quality --split 80/20 --epochs 28 --pairs 3     # VGG11 x0.25, CPU, ~6 min a model

Pair r (seed --seed + r) is ``benchmarks.two_models``' pair at that seed (same split, checkpoints shared; trained
when missing). Every merge is CCA onto client 0 with gamma chosen on the held-out 20% of the 2,000-image probe
(the images no client trained on), unless the row says otherwise; the rows:

- label-free: CCA; CCA + REPAIR to the average / to the reference's statistics (App. D); CCA in the mean basis
  (a symmetric merge) + REPAIR; sequential CCA (statistics on the merged prefix) + REPAIR; distillation into the
  clients' logit ensemble on the unlabelled probe after CCA and after CCA + REPAIR; Permute + REPAIR.
- labelled (the probe's labels): NP Merge as published (per entry, Adam 0.05, <= 200 steps), NP Merge after
  REPAIR, per unit after REPAIR, and with more steps after REPAIR.

Each pair's rows are kept in ``<out>/pairs/`` with their options; a later run measures only the rows (and pairs)
missing there or whose options changed (clear the folder after changing an engine default a row relies on).
Each row: test accuracy (full test set) as mean ± std over the pairs, its ratio to the pair's mean base accuracy,
the held-out probe slice's accuracy (labels) and the seconds the merge took.
"""
from __future__ import annotations

import json
import time

import torch

from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.matching import MatchInputs, match_cca
from fedmerge.common.engine.merge import merge_models
from fedmerge.common.engine.selection import probe_logits, probe_score
from fedmerge.common.engine.stats import collect_statistics
from fedmerge.common.task.evaluate import ensemble_evaluate
from fedmerge.common.wire.probe import as_batches

from .common import (
    add_checkpoints_arg,
    add_split_arg,
    base_parser,
    checkpoint_tag,
    command_line,
    environment,
    fmt_mean_std,
    md_table,
    mean_std,
    pct,
    resolve,
    reuse_clients,
    training_record,
    write_results,
)
from .merge_variants import mean_basis, merge_alignment, sequential_cca
from .plots import bar_chart

NP = {"steps": 200, "lr": 0.05, "granularity": "element"}   # as published; rows say where they differ
#: (row name, label use, merge_models options); gamma "auto" everywhere. Custom rows are built in ``custom_rows``.
ROWS = [
    ("CCA", "label-free", {}),
    ("CCA + REPAIR (average target)", "label-free", {"repair": True}),
    ("CCA + REPAIR (reference target, App. D)", "label-free", {"repair": True, "repair_target": "reference"}),
    ("Permute + REPAIR", "label-free", {"method": "permute", "repair": True}),
    ("CCA + distill", "label-free", {"distill": {"steps": 1000}}),
    ("CCA + REPAIR + distill", "label-free", {"repair": True, "distill": {"steps": 1000}}),
    ("NP Merge (published: per entry, Adam 0.05, <= 200 steps)", "labels", {"np_merge": dict(NP)}),
    ("NP Merge after REPAIR", "labels", {"repair": True, "np_merge": dict(NP)}),
    ("NP Merge after REPAIR, per unit", "labels", {"repair": True, "np_merge": {**NP, "granularity": "unit"}}),
    ("NP Merge after REPAIR, <= 1000 steps, patience 6", "labels",
     {"repair": True, "np_merge": {**NP, "steps": 1000, "patience": 6}}),
    ("NP Merge after REPAIR, then distill", "labels", {"repair": True, "np_merge": dict(NP), "distill": {"steps": 1000}}),
    ("NP Merge after REPAIR, lr 0.01", "labels", {"repair": True, "np_merge": {**NP, "lr": 0.01}}),
    ("NP Merge after REPAIR, per unit, lr 0.01", "labels",
     {"repair": True, "np_merge": {**NP, "lr": 0.01, "granularity": "unit"}}),
    ("NP Merge per unit (no REPAIR)", "labels", {"np_merge": {**NP, "granularity": "unit"}}),
    ("CCA + REPAIR + distill without augmentation (1 view)", "label-free",
     {"repair": True, "distill": {"steps": 1000, "views": 1}}),
    ("NP Merge after REPAIR, per unit, then distill", "labels",
     {"repair": True, "np_merge": {**NP, "granularity": "unit"}, "distill": {"steps": 1000}}),
]
CUSTOM = ["CCA, mean basis + REPAIR", "sequential CCA + REPAIR", "sequential CCA (REPAIRed prefix) + REPAIR"]


def custom_rows(models, fit, held, gamma: float, device) -> list[tuple[str, torch.nn.Module, dict, float]]:
    """The variants of :mod:`benchmarks.merge_variants`, at the gamma CCA + REPAIR chose."""
    spec = derive_spec(models[0], fit.example())
    out = []
    t = time.perf_counter()
    stats = collect_statistics(models, fit, reference=0, pairs="reference", spec=spec, device=device)
    alignment, cond = mean_basis(match_cca(MatchInputs(stats), spec, 0, gamma=gamma))
    out.append((CUSTOM[0], merge_alignment(models, spec, alignment, [0.5, 0.5], fit, True, device),
                {"cond_G": cond}, time.perf_counter() - t))
    t = time.perf_counter()
    alignment = sequential_cca(models, fit, spec, gamma, device=device)
    out.append((CUSTOM[1], merge_alignment(models, spec, alignment, [0.5, 0.5], fit, True, device), {},
                time.perf_counter() - t))
    t = time.perf_counter()
    alignment = sequential_cca(models, fit, spec, gamma, device=device, repair_prefix=True)
    out.append((CUSTOM[2], merge_alignment(models, spec, alignment, [0.5, 0.5], fit, True, device), {},
                time.perf_counter() - t))
    return out


def record(name: str, labels: str, merged, seconds: float, test_loader, held, device, **extra) -> dict:
    """One row of a pair: test and held-out probe accuracy of ``merged`` (printed as it is measured)."""
    r = {"row": name, "labels": labels, "accuracy": pct(merged, test_loader, device),
         "held_accuracy": 100.0 * probe_score(probe_logits(merged, held, device), held)[0], "seconds": seconds,
         **extra}
    print({k: r[k] for k in ("row", "accuracy", "held_accuracy", "seconds")}, flush=True)
    return r


def run_pair(args, sc, rows, custom: bool, done: dict | None = None) -> dict:
    """One pair's record: every row of ``rows`` (and the custom rows), those in ``done`` (row name -> record, from an
    earlier run on the same pair) reused."""
    done = dict(done or {})
    setup, models, _, _, _ = reuse_clients(args, sc, "two_models")
    bases = [pct(m, setup.test_loader, args.device) for m in models]
    ens = 100.0 * ensemble_evaluate(models, setup.test_loader, device=args.device)["accuracy"]
    fit, held = as_batches(setup.probe_loader).split(0.2, args.seed)
    for name, labels, opts in rows:
        key = options_key(opts)
        if name in done and done[name].get("options") == key:
            continue
        opts = dict(opts)
        t = time.perf_counter()
        merged, info = merge_models(models, (fit, held), method=opts.pop("method", "cca"), reference=0,
                                    gamma="auto", return_info=True, device=args.device, **opts)
        done[name] = record(name, labels, merged, time.perf_counter() - t, setup.test_loader, held, args.device,
                            gamma=info.gamma, np_merge=info.np_merge, distill=info.distill, timings=info.timings,
                            options=key)
    names = [r[0] for r in rows]
    if custom and any(c not in done for c in CUSTOM):
        gamma = done[ROWS[1][0]]["gamma"]   # the gamma CCA + REPAIR chose
        for name, merged, extra, sec in custom_rows(models, fit, held, gamma, args.device):
            done[name] = record(name, "label-free", merged, sec, setup.test_loader, held, args.device, gamma=gamma,
                                **extra)
    names += CUSTOM if custom else []
    return {"seed": args.seed, "bases": bases, "ensemble": ens, "rows": [done[n] for n in names]}


def options_key(opts: dict) -> str:
    """A row's merge options as the text its cached record must carry to be reused."""
    return json.dumps(opts, sort_keys=True)


def summarise(pairs: list[dict]) -> list[dict]:
    names = list(dict.fromkeys(r["row"] for p in pairs for r in p["rows"]))
    out = []
    for name in names:
        got = [(p, next(r for r in p["rows"] if r["row"] == name)) for p in pairs
               if any(r["row"] == name for r in p["rows"])]
        out.append({"row": name, "labels": got[0][1]["labels"],
                    "accuracy": mean_std([r["accuracy"] for _, r in got]),
                    "ratio": mean_std([r["accuracy"] / (sum(p["bases"]) / 2) for p, r in got]),
                    "held_accuracy": mean_std([r["held_accuracy"] for _, r in got]),
                    "seconds": mean_std([r["seconds"] for _, r in got])})
    return out


def main(argv=None):
    p = base_parser(__doc__)
    add_split_arg(p, "two_models")
    add_checkpoints_arg(p, "two_models")
    p.add_argument("--pairs", type=int, default=3, help="independent pairs (pair r at seed --seed + r)")
    p.add_argument("--rows", default="", help="row names to run, separated by ';' (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [w.strip() for w in args.rows.split(";") if w.strip()]
    unknown = [w for w in wanted if w not in [r[0] for r in ROWS] + CUSTOM]
    if unknown:
        p.error(f"unknown row(s) {unknown}; available: {[r[0] for r in ROWS] + CUSTOM}")
    rows = [r for r in ROWS if not wanted or r[0] in wanted]
    if any(w in CUSTOM for w in wanted) and not any(r[0] == "CCA + REPAIR (average target)" for r in rows):
        rows.insert(0, ROWS[1])   # the custom rows use its gamma
    custom = not wanted or any(w in CUSTOM for w in wanted)
    sc = resolve(args, "merge_quality")
    first_seed, pairs = args.seed, []
    cache = sc["out"] / "pairs"
    cache.mkdir(exist_ok=True)
    for r in range(args.pairs):
        args.seed = first_seed + r
        path = cache / f"{checkpoint_tag(args, sc, args.split)}.json"   # a pair measured before with these rows
        old = {x["row"]: x for x in json.loads(path.read_text())["rows"]} if path.exists() else {}
        rec = run_pair(args, sc, rows, custom, old)
        path.write_text(json.dumps({**rec, "rows": list({**old, **{x["row"]: x for x in rec["rows"]}}.values())},
                                   indent=1, default=float))
        pairs.append(rec)
    args.seed = first_seed
    summary = summarise(pairs)
    base = mean_std([sum(p["bases"]) / 2 for p in pairs])
    ens = mean_std([p["ensemble"] for p in pairs])
    table = [["mean base", "", fmt_mean_std(base), "1", "", ""], ["logit ensemble", "", fmt_mean_std(ens), "", "", ""]]
    table += [[s["row"], s["labels"], fmt_mean_std(s["accuracy"]), fmt_mean_std(s["ratio"]),
               fmt_mean_std(s["held_accuracy"]), fmt_mean_std(s["seconds"])] for s in summary]
    header = (f"# Merge quality (issue 20) — {args.arch} x{sc['width']}, two clients, {args.split} split, n = "
              f"{len(pairs)} pairs\n\n{sc['epochs']} epochs per client; probe {sc['probe_size']} images no client "
              f"trained on, 80% to fit, 20% held out (gamma, early stopping); full test set; device "
              f"{environment()['device']}. Bases per pair: "
              + "; ".join(f"{p['bases'][0]:.2f} / {p['bases'][1]:.2f} (ensemble {p['ensemble']:.2f})" for p in pairs)
              + "\n\n")
    write_results(sc["out"], "merge_quality", {"pairs": pairs, "summary": summary, "args": vars(args),
                                               "training": training_record(args, sc, 2),
                                               "environment": environment(),
                                               "command": command_line("merge_quality", argv)},
                  header + md_table(["merge", "labels", "test acc %", "/ mean base", "held-out probe acc %",
                                     "seconds"], table))
    names = [x["row"] for x in summary]
    bar_chart(sc["out"] / "merge_quality.png", names,
              {kind: [x["accuracy"]["mean"] if x["labels"] == kind else None for x in summary]
               for kind in ("label-free", "labels")},
              title=f"Merge quality: {args.arch} x{sc['width']}, {args.split}, mean of {len(pairs)} pairs",
              hlines={"mean base": base["mean"], "ensemble": ens["mean"]}, ylim=(0, 100))


if __name__ == "__main__":
    main()
