"""What CCA Merge buys a federation over FedAvg: one-shot and few-round (issue 19).

Every number comes from the project's own federation: ``run_federation`` with ``CCAMerge`` and the built-in
ClientApp on an in-process grid (``ScheduledGrid`` of :mod:`benchmarks.federated`, which also sets each round's
local epochs and keeps the client weights). Offline baselines merge the very client models the federation
received, with the server's inputs (``benchmarks.federated.offline_merge``, i.e. ``merge_models``).

(1) **One-shot** (the communication-minimal regime): every client trains once, ``--epochs`` local epochs from
    its own initialisation (seed ``1000 seed + client``); one merge; no further rounds. N in ``--clients``,
    splits in ``--splits``. Reported per (split, N), mean ± sample std over ``--seeds`` seeds: the clients (mean
    and best, test accuracy), their logit ensemble, plain averaging (one-shot FedAvg, sample-weighted),
    Permute, and the federated CCA merge; gamma and the reference are chosen on the held-out probe slice
    (never on test).
(2) **Few-round** (N = ``--few-clients``, settings ``--few-settings``): arms at **equal total local epochs**
    per client (``--rounds`` each):
      * ``fedavg``: FedAvg from one shared initialisation, ``--rounds`` rounds of 1 local epoch;
      * ``fedavg-long``: FedAvg from one shared initialisation, round 1 = ``--epochs`` local epochs, then
        1-epoch rounds (the same schedule as the two CCA arms: separates CCA from the long first round);
      * ``cca-avg``: every client trains ``--epochs`` epochs from its own initialisation, CCA merge
        (``method_schedule="cca,avg"``), then 1-epoch FedAvg rounds from the merged model;
      * ``cca``: the same, CCA in every round.
    Reported per round: global test accuracy, bytes uploaded (all clients, both phases); and the number of
    rounds (and MiB) each arm needs to reach the ``fedavg`` arm's final accuracy (per seed).

    python -m benchmarks.federated_value --data-root ../shared/data                 # both parts, ~1 h on 2 cores
    python -m benchmarks.federated_value --part one-shot --seeds 3
    python -m benchmarks.federated_value --part report                              # tables/plots from saved runs

Each run is saved as JSON under ``<out>/runs/`` as soon as it finishes and reused by a later invocation with the
same settings (so an interrupted benchmark resumes); ``federated_value.json`` / ``.md`` and the plots are
rebuilt from every saved run that matches the current settings.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .common import comma_list, environment, fmt_mean_std, md_table, mean_std

ARMS = {  # name -> (method, method_schedule, common_init, long first round, label)
    "fedavg": ("avg", "", True, False, "FedAvg (shared init, 1 epoch/round)"),
    "fedavg-long": ("avg", "", True, True, "FedAvg (shared init, long round 1)"),
    "cca-avg": ("cca", "cca,avg", False, True, "CCA round 1 (own inits), then FedAvg"),
    "cca": ("cca", "", False, True, "CCA every round (own inits)"),
}
SPLIT_LABEL = {"iid": "IID", "80/20": "80/20 (generalised)", "disjoint": "class-disjoint (embedding head)"}


def split_spec(text: str) -> tuple[str, float]:
    """``dirichlet:0.5`` -> ("dirichlet", 0.5); ``iid`` -> ("iid", 0.5)."""
    name, _, a = text.partition(":")
    return name, float(a) if a else 0.5


def split_label(split: str, alpha: float) -> str:
    return f"Dirichlet({alpha:g})" if split == "dirichlet" else SPLIT_LABEL.get(split, split)


def base_config(args, split: str, alpha: float, clients: int, seed: int) -> dict:
    return dict(dataset=args.dataset, data_root=args.data_root, split=split, alpha=alpha, num_clients=clients,
                arch=args.arch, width=args.width, lr=args.lr, batch_size=args.batch_size,
                probe_size=args.probe_size, seed=seed, max_train=args.max_train, max_test=args.max_test,
                gamma="auto", reference="best", min_clients=2, timeout=7200.0, device=args.device,
                augment=args.augment)


def _key(kind: str, cfg: dict, extra: dict) -> str:
    blob = json.dumps({"kind": kind, **{k: v for k, v in cfg.items() if k not in ("data_root", "device", "timeout")},
                       **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(path: Path):
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _federate(cfg_kw: dict, out: Path, epochs_of_round, rounds: int, method: str, schedule: str,
              common_init: bool):
    from fedmerge.common.task.config import FedConfig
    from fedmerge.server.app import run_federation

    from .federated import ScheduledGrid

    cfg = FedConfig(**cfg_kw, method=method, method_schedule=schedule, common_init=common_init,
                    num_server_rounds=rounds, epochs=float(epochs_of_round(1)), out=str(out))
    grid = ScheduledGrid(cfg.to_run_config(), epochs_of_round, cfg.num_clients)
    t = time.time()
    result = run_federation(grid, cfg)
    return cfg, grid, result, time.time() - t


# --- (1) one-shot ---------------------------------------------------------------------------------------------
def one_shot_run(args, split: str, alpha: float, clients: int, seed: int, log) -> dict:
    from fedmerge.common.task.evaluate import evaluate
    from fedmerge.common.task.loaders import build_global_model, test_loader

    from .federated import offline_merge

    kw = base_config(args, split, alpha, clients, seed)
    key = _key("one-shot", kw, {"epochs": args.epochs})
    path = args.out / "runs" / f"one_shot_{split.replace('/', '-')}{alpha:g}_n{clients}_s{seed}_{key}.json"
    rec = _cached(path)
    if rec is not None:
        return rec
    fed_out = args.work / f"one_shot_{key}"
    cfg, grid, result, wall = _federate(kw, fed_out, lambda r: args.epochs, 1, "cca", "", False)
    test = test_loader(cfg)
    r1 = grid.rounds[1]
    states, counts = r1["clients"], r1["counts"]
    clients_acc = {}
    for p in sorted(states):
        m = build_global_model(cfg)
        m.load_state_dict(states[p])
        clients_acc[p] = evaluate(m.eval(), test)["accuracy"]
    hist = result["rounds"][0]
    rec = {"kind": "one-shot", "split": split, "alpha": alpha, "clients": clients, "seed": seed,
           "config": cfg.to_dict(), "client_sizes": {str(p): counts[p] for p in sorted(counts)},
           "client_accuracy": {str(p): a for p, a in clients_acc.items()},
           "clients_mean": float(np.mean(list(clients_acc.values()))),
           "clients_best": float(max(clients_acc.values())),
           "ensemble": result["accuracy"]["ensemble"], "cca": result["accuracy"]["merged"],
           "cca_gamma": hist["gamma"], "cca_reference": hist["reference"], "clients_merged": hist["clients_merged"],
           "clients_rejected": result["clients_rejected"], "wall_seconds": wall,
           "upload_bytes": int(sum(hist["bytes_uploaded"].values())), "model_bytes": result["model_bytes"]}
    for method in ("avg", "permute"):
        off = offline_merge(cfg, states, counts, method, test)
        rec[method] = off["accuracy"]
        rec[f"{method}_reference"] = off["reference"]
    rec["cca_over_ensemble"] = rec["cca"] / rec["ensemble"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2))
    log(f"[one-shot] {split_label(split, alpha)} N={clients} seed {seed}: clients "
        f"{100 * rec['clients_mean']:.1f} (best {100 * rec['clients_best']:.1f}), "
        f"ensemble {100 * rec['ensemble']:.1f}, "
        f"avg {100 * rec['avg']:.1f}, permute {100 * rec['permute']:.1f}, CCA {100 * rec['cca']:.1f} ({wall:.0f} s)")
    return rec


# --- (2) few-round --------------------------------------------------------------------------------------------
def few_round_run(args, split: str, alpha: float, arm: str, seed: int, log) -> dict:
    method, schedule, common_init, long_first, _ = ARMS[arm]
    kw = base_config(args, split, alpha, args.few_clients, seed)
    first = args.epochs if long_first else 1.0
    rounds = int(round(args.rounds - first + 1))   # equal total local epochs: first + (rounds - 1) x 1
    key = _key("few-round", kw, {"arm": arm, "first": first, "rounds": rounds, "method": method,
                                 "schedule": schedule, "common_init": common_init})
    path = args.out / "runs" / f"few_{split.replace('/', '-')}{alpha:g}_{arm}_s{seed}_{key}.json"
    rec = _cached(path)
    if rec is not None:
        return rec
    cfg, grid, result, wall = _federate(kw, args.work / f"few_{key}", lambda r: first if r == 1 else 1.0, rounds,
                                        method, schedule, common_init)
    per_round = result["accuracy"]["per_round"]
    rows, cum_epochs, cum_bytes = [], 0.0, 0
    for h in result["rounds"]:
        r = int(h["round"])
        cum_epochs += grid.rounds.get(r, {}).get("epochs", 0.0)
        up = int(sum(h["bytes_uploaded"].values()))
        cum_bytes += up
        accs = [m.get("test-accuracy") for m in h["client_metrics"].values() if m.get("test-accuracy") is not None]
        rows.append({"round": r, "ok": h["ok"], "method": h.get("method"), "global_accuracy": per_round.get(str(r)),
                     "clients_mean_accuracy": float(np.mean(accs)) if accs else None,
                     "local_epochs": grid.rounds.get(r, {}).get("epochs"), "cumulative_local_epochs": cum_epochs,
                     "upload_bytes": up, "cumulative_upload_bytes": cum_bytes, "gamma": h["gamma"]})
    rec = {"kind": "few-round", "split": split, "alpha": alpha, "arm": arm, "seed": seed, "config": cfg.to_dict(),
           "first_round_epochs": first, "rounds": rows, "initial_accuracy": per_round.get("0"),
           "final_accuracy": rows[-1]["global_accuracy"] if rows else None,
           "final_ensemble": result["accuracy"]["ensemble"], "clients_rejected": result["clients_rejected"],
           "model_bytes": result["model_bytes"], "wall_seconds": wall}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2))
    log(f"[few-round] {split_label(split, alpha)} {arm} seed {seed}: " + ", ".join(
        f"{x['round']}: {100 * x['global_accuracy']:.1f}" for x in rows if x["global_accuracy"] is not None)
        + f" ({wall:.0f} s)")
    return rec


def rounds_to(rec: dict, target: float) -> tuple[int | None, int | None]:
    """(first round whose global accuracy >= target, cumulative upload bytes by then), or (None, None)."""
    for x in rec["rounds"]:
        if x["global_accuracy"] is not None and x["global_accuracy"] >= target - 1e-12:
            return x["round"], x["cumulative_upload_bytes"]
    return None, None


# --- report ---------------------------------------------------------------------------------------------------
def summarise_one_shot(recs: list[dict], splits, clients) -> list[dict]:
    rows = []
    for split, alpha in splits:
        for n in clients:
            rs = [r for r in recs if r["split"] == split and r["alpha"] == alpha and r["clients"] == n]
            if not rs:
                continue
            row = {"split": split, "alpha": alpha, "clients": n, "seeds": sorted(r["seed"] for r in rs)}
            for k in ("clients_mean", "clients_best", "ensemble", "avg", "permute", "cca", "cca_over_ensemble"):
                row[k] = mean_std([100 * r[k] if k != "cca_over_ensemble" else r[k] for r in rs])
            row["client_accuracy_range"] = [100 * min(min(r["client_accuracy"].values()) for r in rs),
                                            100 * max(max(r["client_accuracy"].values()) for r in rs)]
            rows.append(row)
    return rows


def summarise_few_round(recs: list[dict], settings, arms) -> list[dict]:
    out = []
    for split, alpha in settings:
        rs = [r for r in recs if r["split"] == split and r["alpha"] == alpha]
        seeds = sorted({r["seed"] for r in rs if r["arm"] == "fedavg"})
        if not seeds:   # no target without the fedavg arm
            continue
        setting = {"split": split, "alpha": alpha, "seeds": seeds, "arms": {}}
        fedavg = {s: next(r for r in rs if r["arm"] == "fedavg" and r["seed"] == s) for s in seeds}
        targets = {s: fedavg[s]["final_accuracy"] for s in seeds}
        setting["target"] = mean_std([100 * t for t in targets.values()]) if targets else None
        bests = {s: max(x["global_accuracy"] or 0.0 for x in fedavg[s]["rounds"]) for s in seeds}
        setting["target_best"] = mean_std([100 * t for t in bests.values()]) if bests else None
        for arm in arms:
            ar = sorted([r for r in rs if r["arm"] == arm and r["seed"] in targets], key=lambda r: r["seed"])
            if not ar:
                continue
            nr = len(ar[0]["rounds"])
            # a failed round keeps the previous global model (its accuracy is that model's); a failed round 1 has
            # none: that seed is left out of the round's mean (n in the curve)
            curve = [_mean_std_or_none([100 * r["rounds"][i]["global_accuracy"] for r in ar
                                        if r["rounds"][i]["global_accuracy"] is not None]) for i in range(nr)]
            mib = [float(np.mean([r["rounds"][i]["cumulative_upload_bytes"] for r in ar])) / 2 ** 20 for i in range(nr)]
            hits = [rounds_to(r, targets[r["seed"]]) for r in ar]
            setting["arms"][arm] = {
                "seeds": [r["seed"] for r in ar], "rounds": nr,
                "epochs": [r["rounds"][i]["local_epochs"] for i in range(nr) for r in ar[:1]],
                "methods": [r["rounds"][i]["method"] for i in range(nr) for r in ar[:1]],
                "curve": curve, "cumulative_mib": mib,
                "clients_round1": mean_std([100 * r["rounds"][0]["clients_mean_accuracy"] for r in ar]),
                "final": mean_std([100 * r["final_accuracy"] for r in ar]),
                "best": mean_std([100 * max(x["global_accuracy"] or 0.0 for x in r["rounds"]) for r in ar]),
                "failed_rounds": [[x["round"] for x in r["rounds"] if not x["ok"]] for r in ar],
                "rounds_to_target": [h[0] for h in hits],
                "rounds_to_fedavg_best": [rounds_to(r, bests[r["seed"]])[0] for r in ar],
                "mib_to_target": [None if h[1] is None else h[1] / 2 ** 20 for h in hits],
                "total_mib": mib[-1]}
        out.append(setting)
    return out


def _mean_std_or_none(values):
    return mean_std(values) if values else None


def _ms(s) -> str:
    """mean ± std, with n when some seeds are missing (a failed first round has no global model)."""
    return "–" if s is None else fmt_mean_std(s)


def _rt(v: list) -> str:
    return ", ".join("–" if x is None else str(x) for x in v)


def build_markdown(payload: dict) -> str:
    a = payload["settings"]
    lines = [f"# Federated value of CCA Merge: one-shot and few-round ({a['dataset']}, {a['arch']} x{a['width']:g})\n",
             f"Data: {payload.get('data_note', a['dataset'])}; "
             + (f"every client at most {a['max_train']} training images (a seeded subset of its partition)"
                if a['max_train'] else "every client trains on its whole partition")
             + f", probe {a['probe_size']} images held out from all clients (20% held "
             f"out again to choose gamma and the reference, never the test set), test: {a['max_test'] or 'all'} "
             f"seeded test images. Training: SGD lr {a['lr']:g} (warm-up + linear decay per round), batch "
             f"{a['batch_size']}, augmentation {'on' if a['augment'] else 'off'}. Seeds {a['seed_list']} "
             f"(client seeds 1000 seed + i); mean ± sample std over seeds. "
             f"Threads {payload['environment']['threads']}.\n"]
    if payload.get("one_shot"):
        lines.append(f"## One-shot federation: each client trains {a['epochs']:g} epochs once from its own "
                     "initialisation, one merge, no further rounds\n")
        lines.append("Client accuracies are the clients' own test accuracies (mean, and the best client chosen on "
                     "test: an oracle). avg = one-shot FedAvg (sample-weighted plain average); permute and avg "
                     "merged offline from the same client models with the server's inputs; CCA = the federated "
                     "merge (CCAMerge, two-phase protocol).\n")
        rows = []
        for r in payload["one_shot"]:
            rows.append([split_label(r["split"], r["alpha"]), r["clients"], len(r["seeds"]),
                         fmt_mean_std(r["clients_mean"]), fmt_mean_std(r["clients_best"]), fmt_mean_std(r["ensemble"]),
                         fmt_mean_std(r["avg"]), fmt_mean_std(r["permute"]), f"**{fmt_mean_std(r['cca'])}**",
                         f"{r['cca_over_ensemble']['mean']:.2f}"])
        lines.append(md_table(["split", "N", "seeds", "clients mean %", "best client %", "ensemble %", "avg %",
                               "permute %", "CCA %", "CCA / ensemble"], rows))
    if payload.get("few_round"):
        lines.append(f"\n## Few-round federation: {a['few_clients']} clients, {a['rounds']:g} local epochs per "
                     "client in total for every arm\n")
        lines.append("Arms: " + "; ".join(f"`{k}` = {v[4]}" for k, v in ARMS.items() if k in a["arms"])
                     + f". Long round 1 = {a['epochs']:g} local epochs, then 1 per round. Target = the `fedavg` arm's "
                     "final accuracy of the same seed; rounds / MiB to target per seed (– = not reached). MiB = all "
                     "clients' uploads, both phases, cumulative.\n")
        for s in payload["few_round"]:
            if s["target"] is None:
                continue
            lines.append(f"\n### {split_label(s['split'], s['alpha'])} (target = FedAvg's final "
                         f"{fmt_mean_std(s['target'])}%; FedAvg's best round {fmt_mean_std(s['target_best'])}%)\n")
            rows = []
            for arm, v in s["arms"].items():
                rows.append([f"`{arm}`", v["rounds"], fmt_mean_std(v["clients_round1"]), _ms(v["curve"][0]),
                             fmt_mean_std(v["final"]), fmt_mean_std(v["best"]), _rt(v["rounds_to_target"]),
                             _rt([None if m is None else f"{m:.1f}" for m in v["mib_to_target"]]),
                             _rt(v["rounds_to_fedavg_best"]), _rt([",".join(map(str, f)) or "0" for f in
                                                                   v["failed_rounds"]]).replace(", ", " / "),
                             f"{v['total_mib']:.1f}"])
            lines.append(md_table(["arm", "rounds", "round-1 clients %", "round 1 global %", "final %",
                                   "best round %", "rounds to target", "MiB to target", "rounds to FedAvg's best",
                                   "failed rounds per seed", "total MiB"], rows))
            nmax = max(v["rounds"] for v in s["arms"].values())
            hdr = ["round"] + [f"`{arm}`" for arm in s["arms"]]
            rows = [[i + 1] + [(_ms(v["curve"][i])
                                + ("" if v["curve"][i] is None or v["curve"][i]["n"] == len(v["seeds"])
                                   else f" (n={v['curve'][i]['n']})")) if i < v["rounds"] else ""
                               for v in s["arms"].values()]
                    for i in range(nmax)]
            lines.append("\nGlobal test accuracy % per round:\n")
            lines.append(md_table(hdr, rows))
    lines.append(f"\nCommand: `{payload['command']}`.\n")
    return "\n".join(lines)


def plot_one_shot(rows: list[dict], path: Path) -> None:
    """Grouped bars (mean ± std over seeds) per (split, N): clients' mean, one-shot FedAvg, Permute, CCA, ensemble."""
    from matplotlib.figure import Figure

    keys = [("clients_mean", "clients (mean)"), ("avg", "avg = one-shot FedAvg"), ("permute", "permute"),
            ("cca", "CCA (federated)"), ("ensemble", "ensemble")]
    fig = Figure(figsize=(max(8.0, 1.05 * len(rows) + 2), 4.4))
    ax = fig.subplots()
    w = 0.8 / len(keys)
    for j, (k, name) in enumerate(keys):
        xs = [i - 0.4 + w * (j + 0.5) for i in range(len(rows))]
        ax.bar(xs, [r[k]["mean"] for r in rows], width=w * 0.95, yerr=[r[k]["std"] or 0.0 for r in rows],
               capsize=1.5, error_kw={"lw": 0.7}, label=name, color=f"C{j}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{split_label(r['split'], r['alpha']).replace(' (generalised)', '')}\nN={r['clients']}"
                        for r in rows], fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy %")
    ax.grid(True, axis="y", alpha=0.3)
    n = sorted({len(r["seeds"]) for r in rows})
    ax.set_title(f"One-shot federation: one merge of independently trained clients (mean ± std, n = "
                 f"{'/'.join(map(str, n))} seeds)", fontsize=9)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_few_round(settings: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    ss = [s for s in settings if s["arms"]]
    if not ss:
        return
    fig = Figure(figsize=(4.2 * len(ss), 7.2))
    axes = fig.subplots(2, len(ss), squeeze=False)
    for j, s in enumerate(ss):
        for i, (arm, v) in enumerate(s["arms"].items()):
            m = np.array([np.nan if c is None else c["mean"] for c in v["curve"]])
            sd = np.array([0.0 if c is None else (c["std"] or 0.0) for c in v["curve"]])
            x = np.arange(1, len(m) + 1)
            for ax, xs in ((axes[0][j], x), (axes[1][j], np.array(v["cumulative_mib"]))):
                ax.plot(xs, m, "o-", ms=3, color=f"C{i}", label=ARMS[arm][4])
                ax.fill_between(xs, m - sd, m + sd, color=f"C{i}", alpha=0.15)
        for ax in axes[:, j]:
            if s["target"] is not None:
                ax.axhline(s["target"]["mean"], color="black", ls="--", lw=1, label="FedAvg final (target)")
            ax.grid(alpha=0.3)
        axes[0][j].set_title(split_label(s["split"], s["alpha"]), fontsize=10)
        axes[0][j].set_xlabel("communication round")
        axes[1][j].set_xlabel("MiB uploaded (all clients, cumulative)")
        axes[0][j].set_ylabel("global test accuracy %")
        axes[1][j].set_ylabel("global test accuracy %")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --- main -----------------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "one-shot", "few-round", "report"], default="all")
    p.add_argument("--data-root", default="")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--arch", default="cnn")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=float, default=5.0,
                   help="one-shot local epochs, and round 1 of the long-first-round arms")
    p.add_argument("--rounds", type=float, default=10.0,
                   help="total local epochs per client in the few-round arms (= FedAvg's rounds of 1 epoch)")
    p.add_argument("--clients", default="2,4,8", help="one-shot federation sizes")
    p.add_argument("--splits", default="iid,dirichlet:0.5,dirichlet:0.1,80/20", help="one-shot splits")
    p.add_argument("--few-clients", type=int, default=4)
    p.add_argument("--few-settings", default="dirichlet:0.5,dirichlet:0.1,disjoint")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--max-train", type=int, default=2000, help="cap on each client's training images")
    p.add_argument("--max-test", type=int, default=2000)
    p.add_argument("--probe-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="random-crop augmentation in local training (default off: a few epochs on a few thousand "
                        "grayscale images train better without it)")
    p.add_argument("--device", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/cpu/federated_value")
    p.add_argument("--img", default="", help="also copy the plots to this folder (e.g. docs/img)")
    a = p.parse_args(argv)
    a.out = Path(a.out)
    a.work = a.out / "federations"
    a.clients = comma_list(a.clients, int)
    a.splits = comma_list(a.splits, split_spec)
    a.few_settings = comma_list(a.few_settings, split_spec)
    a.arms = comma_list(a.arms)
    bad = [x for x in a.arms if x not in ARMS]
    if bad:
        p.error(f"unknown arms {bad}; choose from {', '.join(ARMS)}")
    if "fedavg" not in a.arms and a.part in ("all", "few-round"):
        p.error("the few-round part needs the fedavg arm (its final accuracy is the target)")
    if not a.epochs <= a.rounds:
        p.error("--epochs (long first round) must not exceed --rounds (total local epochs)")
    return a


def main(argv=None):
    import logging

    args = parse(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))

    def log(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    one, few = [], []
    if args.part in ("all", "one-shot", "report"):
        for seed in seeds:
            for split, alpha in args.splits:
                for n in args.clients:
                    if args.part == "report":
                        continue
                    one.append(one_shot_run(args, split, alpha, n, seed, log))
    if args.part in ("all", "few-round", "report"):
        for split, alpha in args.few_settings:   # one setting's seeds before the next setting
            for seed in seeds:
                for arm in args.arms:
                    if args.part == "report":
                        continue
                    few.append(few_round_run(args, split, alpha, arm, seed, log))
    # the report covers every saved run of the current settings (also those made by another invocation)
    one = _saved(args, "one_shot", seeds)
    few = _saved(args, "few", seeds)
    from fedmerge.common.task.data import load_dataset

    from .common import data_note

    settings = {"dataset": args.dataset, "arch": args.arch, "width": args.width, "epochs": args.epochs,
                "rounds": args.rounds, "clients": args.clients, "splits": args.splits, "few_clients": args.few_clients,
                "few_settings": args.few_settings, "arms": args.arms, "seed_list": seeds, "max_train": args.max_train,
                "max_test": args.max_test, "probe_size": args.probe_size, "batch_size": args.batch_size, "lr": args.lr,
                "augment": args.augment}
    payload = {"settings": settings, "environment": environment(),
               "data_note": data_note(load_dataset(args.dataset, "train", data_root=args.data_root or None)),
               "one_shot": summarise_one_shot(one, args.splits, args.clients),
               "few_round": summarise_few_round(few, args.few_settings, args.arms),
               "runs": {"one_shot": one, "few_round": few},
               "command": "python -m benchmarks.federated_value "
                          + " ".join(argv if argv is not None else sys.argv[1:]),
               "seconds": time.time() - t0}
    md = build_markdown(payload)
    (args.out / "federated_value.json").write_text(json.dumps(payload, indent=2, default=float))
    (args.out / "federated_value.md").write_text(md)
    pngs = []
    if payload["one_shot"]:
        plot_one_shot(payload["one_shot"], args.out / "federated_value_one_shot.png")
        pngs.append(args.out / "federated_value_one_shot.png")
    if payload["few_round"]:
        plot_few_round(payload["few_round"], args.out / "federated_value_rounds.png")
        pngs.append(args.out / "federated_value_rounds.png")
    if args.img:
        import shutil

        for f in pngs:
            if f.exists():
                shutil.copy(f, Path(args.img) / f.name)
    print(md)
    log(f"federated_value: done; results in {args.out}/")
    return payload


def _saved(args, prefix: str, seeds) -> list[dict]:
    """Every saved run of this kind whose settings match the current ones."""
    out = []
    for f in sorted((args.out / "runs").glob(f"{prefix}_*.json")):
        rec = _cached(f)
        if rec is None or rec["seed"] not in seeds:
            continue
        c = rec["config"]
        same = (c["dataset"] == args.dataset and c["arch"] == args.arch and c["width"] == args.width
                and c["lr"] == args.lr and c["batch_size"] == args.batch_size and c["max_train"] == args.max_train
                and c["max_test"] == args.max_test and c["probe_size"] == args.probe_size
                and c["augment"] == args.augment)
        if prefix == "one_shot":
            same = same and c["epochs"] == args.epochs and (rec["split"], rec["alpha"]) in args.splits \
                and rec["clients"] in args.clients
        else:
            same = same and c["num_clients"] == args.few_clients and (rec["split"], rec["alpha"]) in args.few_settings \
                and rec["arm"] in args.arms and sum(x["local_epochs"] for x in rec["rounds"]) == args.rounds \
                and rec["first_round_epochs"] in (1.0, args.epochs)
        if same:
            out.append(rec)
    return out


if __name__ == "__main__":
    main()
