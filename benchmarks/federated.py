"""Federated: simulated Flower federations (the real ServerApp strategy and ClientApp, inline grid), with

(a) an equality check: the federated CCA merge vs the offline ``merge_models`` of the very same client models
    with the very same inputs (the probe's fitting / held-out slices as every party derives them, gamma and
    reference chosen the same way on the held-out slice, averaging weights = client sample counts, BatchNorm
    reset on the fitting slice). Both test accuracies and their difference are reported (target <= 0.1 pt),
    with the largest logit difference on the probe; the same round-1 client models are also merged offline
    with avg and permute (one-shot baselines);
(b) multi-round federations, all with one protocol: R communication rounds; round 1 trains ``--first-epochs``
    local epochs, every later round ``--round-epochs`` local epochs starting from the merged model of the
    round before; so every arm has the same number of rounds, the same local epochs per round and per client,
    the same data, the same probe (used by every arm for BatchNorm reset) and the same test set. Arms:
      * ``cca``: CCA Merge, round 1 from each client's own init (the paper's setting);
      * ``fedavg``: FedAvg (method ``avg``, weighted by sample counts), round 1 from one shared init;
      * ``cca-common``: CCA Merge, round 1 from the shared init (paper scale; at CPU scale with
        ``--arms cca,fedavg,cca-common``, ~3.5 min more).
    Reported per round: the merged (global) model's test accuracy, the clients' average before merging, and
    the bytes uploaded (CCA clients also upload probe statistics).

    python -m benchmarks.federated --scale cpu --data-root ../shared/data     # ~8 min on 2 cores
    python -m benchmarks.federated --scale paper --data-root /path/to/data       # for a GPU

The client app reads its epochs from its config on every message; the benchmark's grid sets it per round
(``ScheduledGrid``), which is how round 1 and the later rounds get different local epochs. Server and client
code are the project's own (``run_federation``, ``CCAMerge``, ``task_client_app``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from fedmerge.common.task.config import FedConfig
from fedmerge.server.inline import InlineGrid

from .common import SCALES, comma_list, data_note, method_list
from .plots import line_plot

ARMS = {  # name -> (method, common_init, label)
    "cca": ("cca", False, "CCA Merge, own inits"),
    "fedavg": ("avg", True, "FedAvg, shared init"),
    "cca-common": ("cca", True, "CCA Merge, shared init"),
}

DEFAULTS = {
    # CPU: ~9 min on 2 cores for the three arms and the equality checks.
    # CPU: ~8 min on 2 cores for the two default arms and the equality checks (+ ~3.5 min for cca-common).
    # Batches of 64 so that 2,000 images give 31 steps per epoch.
    "cpu": {"width": 0.5, "first_epochs": 2.0, "round_epochs": 1.0, "rounds": 3, "max_train": 2000,
            "max_test": 2000, "probe_size": 1000, "batch_size": 64, "lr": 0.05, "arms": "cca,fedavg"},
    "paper": {"width": 1.0, "first_epochs": float(SCALES["paper"]["epochs"]), "round_epochs": 1.0, "rounds": 5,
              "max_train": 0, "max_test": 0, "probe_size": SCALES["paper"]["probe_size"],
              "batch_size": SCALES["paper"]["batch_size"], "lr": SCALES["paper"]["lr"],
              "arms": "cca,fedavg,cca-common"},
}


class ScheduledGrid(InlineGrid):
    """An inline grid that (1) sets the clients' local epochs per round and (2) keeps what it carries: every
    round's client weights and sample counts (train replies) and the global weights sent in each round."""

    def __init__(self, overrides: dict, epochs_of_round, num_nodes: int):
        from fedmerge.client.app import task_client_app

        self.overrides = overrides  # the dict the client app rebuilds its FedConfig from, on every message
        self.epochs_of_round = epochs_of_round
        self.rounds: dict[int, dict] = {}
        super().__init__(task_client_app(overrides), num_nodes)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        trains = [m for m in messages if m.metadata.message_type == "train"]
        rnd = None
        if trains:
            rnd = int(trains[0].content.config_records["config"]["server-round"])
            self.overrides["epochs"] = float(self.epochs_of_round(rnd))
            arrays = trains[0].content.array_records["arrays"]
            self.rounds[rnd] = {"global_in": ({k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
                                              if len(arrays) else None),
                                "clients": {}, "counts": {}, "epochs": self.overrides["epochs"]}
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if rnd is not None:
            for r in replies:
                if r.has_error() or "arrays" not in r.content.array_records:
                    continue
                m = r.content.metric_records["metrics"]
                pid = int(m["partition-id"])
                self.rounds[rnd]["clients"][pid] = r.content.array_records["arrays"].to_torch_state_dict()
                self.rounds[rnd]["counts"][pid] = float(m["num-examples"])
        return replies


# --- the pieces every party derives ------------------------------------------------------------------------------
def unsplit_probe(cfg: FedConfig):
    """The probe (images, labels) in batches of 250, before the fit / held-out split: ``Batches.split`` with the
    config's ``held_out`` and ``seed`` gives exactly ``probe_batches(cfg)``."""
    from fedmerge.common.task.data import load_dataset, split_probe_pool, to_tensor
    from fedmerge.common.wire.probe import as_batches

    train = load_dataset(cfg.dataset, "train", data_root=cfg.data_root or None)
    probe_idx, _ = split_probe_pool(len(train), cfg.probe_size, cfg.seed, from_union=cfg.probe_from_union)
    x = to_tensor(train.x[probe_idx], train.name)
    y = torch.from_numpy(train.y[probe_idx].copy())
    return as_batches((x, y), 250)


def _same_batches(a, b) -> bool:
    xa, ya = a.tensors()
    xb, yb = b.tensors()
    return xa.shape == xb.shape and bool(torch.equal(xa, xb)) and bool(torch.equal(ya, yb))


def offline_merge(cfg: FedConfig, states: dict[int, dict], counts: dict[int, float], method: str, test) -> dict:
    """``merge_models`` on the given client weights with the server's inputs; returns accuracy, gamma,
    reference (as a partition id) and the merged model."""
    from fedmerge.common.engine.merge import merge_models
    from fedmerge.common.task.evaluate import evaluate
    from fedmerge.common.task.loaders import build_global_model, probe_batches

    parts = sorted(states)
    models = []
    for p in parts:
        m = build_global_model(cfg)
        m.load_state_dict(states[p])
        models.append(m.eval())
    fit, held = probe_batches(cfg)
    unsplit = unsplit_probe(cfg)
    f2, h2 = unsplit.split(cfg.held_out, cfg.seed, 250)
    same_split = _same_batches(fit, f2) and _same_batches(held, h2)
    # merge_models splits its probe only when it must choose gamma or the reference; the server's statistics
    # and BatchNorm reset always use the fitting slice
    needs_held = (cfg.gamma == "auto" and method == "cca") or cfg.reference == "best"
    t = time.perf_counter()
    merged, info = merge_models(models, unsplit if needs_held else fit, method=method,
                                reference=cfg.reference_value, gamma=cfg.gamma_value if method == "cca" else "auto",
                                bn_reset=cfg.bn_reset_value, repair=cfg.repair, weights=[counts[p] for p in parts],
                                held_out=cfg.held_out, seed=cfg.seed, device=cfg.device or None, return_info=True)
    secs = time.perf_counter() - t
    acc = evaluate(merged, test, device=cfg.device or None)["accuracy"]
    return {"method": method, "accuracy": acc, "gamma": info.gamma, "reference": parts[info.reference],
            "seconds": secs, "same_probe_split": same_split, "model": merged}


@torch.no_grad()
def max_logit_diff(a, b, batches) -> float:
    a.eval().cpu()
    b.eval().cpu()
    return max(float((a(x) - b(x)).abs().max()) for x, _ in batches)


# --- one arm --------------------------------------------------------------------------------------------------------
def run_arm(name: str, base: dict, args, out: Path, log) -> tuple[dict, ScheduledGrid, FedConfig]:
    from fedmerge.server.app import run_federation

    method, common_init, _ = ARMS[name]
    arm_out = out / name
    if arm_out.exists():
        shutil.rmtree(arm_out)
    # method_schedule "": the arm's method in every round (the service's default "auto" averages after round 1)
    cfg = FedConfig(**base, method=method, method_schedule="", common_init=common_init,
                    num_server_rounds=args.rounds, epochs=args.first_epochs, out=str(arm_out))
    grid = ScheduledGrid(cfg.to_run_config(),
                         lambda r: args.first_epochs if r == 1 else args.round_epochs, cfg.num_clients)
    t = time.time()
    result = run_federation(grid, cfg)
    result["wall_seconds"] = time.time() - t
    per_round = result["accuracy"]["per_round"]
    log(f"[{name}] {args.rounds} rounds in {result['wall_seconds']:.0f} s; global accuracy per round: "
        + ", ".join(f"{r}: {100 * v:.2f}" for r, v in per_round.items()))
    return result, grid, cfg


def round_rows(name: str, result: dict, grid: ScheduledGrid) -> list[dict]:
    rows = []
    cum = 0.0
    for h in result["rounds"]:
        r = int(h["round"])
        cum += grid.rounds.get(r, {}).get("epochs", 0.0)
        accs = [m.get("test-accuracy") for m in h["client_metrics"].values() if m.get("test-accuracy") is not None]
        rows.append({"arm": name, "round": r, "ok": h["ok"],
                     "global_accuracy": result["accuracy"]["per_round"].get(str(r)),
                     "clients_mean_accuracy": sum(accs) / len(accs) if accs else None,
                     "clients_accuracy": {p: m.get("test-accuracy") for p, m in h["client_metrics"].items()},
                     "local_epochs": grid.rounds.get(r, {}).get("epochs"), "cumulative_local_epochs": cum,
                     "upload_bytes": int(sum(h["bytes_uploaded"].values())), "gamma": h["gamma"],
                     "reference": h["reference"], "seconds_merge": h["timings"].get("merge")})
    return rows


# --- equality check ----------------------------------------------------------------------------------------------
def equality_checks(result: dict, grid: ScheduledGrid, cfg: FedConfig, rounds: list[int], test, log) -> list[dict]:
    from fedmerge.common.task.checkpoint import load_state
    from fedmerge.common.task.loaders import build_global_model, probe_batches

    fit, held = probe_batches(cfg)
    out = []
    for r in rounds:
        if r not in grid.rounds or not grid.rounds[r]["clients"]:
            continue
        nxt = grid.rounds.get(r + 1, {}).get("global_in")
        if nxt is None and r == max(grid.rounds):
            nxt = load_state(Path(cfg.out) / "global_model.safetensors")
        hist = next(h for h in result["rounds"] if int(h["round"]) == r)
        merged_parts = hist["clients_merged"]
        states = {p: s for p, s in grid.rounds[r]["clients"].items() if p in merged_parts}
        counts = {p: grid.rounds[r]["counts"][p] for p in states}
        off = offline_merge(cfg, states, counts, "cca", test)
        fed_acc = result["accuracy"]["per_round"].get(str(r))
        rec = {"round": r, "federated_accuracy": fed_acc, "offline_accuracy": off["accuracy"],
               "abs_diff_pt": None if fed_acc is None else 100 * abs(fed_acc - off["accuracy"]),
               "federated_gamma": hist["gamma"], "offline_gamma": off["gamma"],
               "federated_reference": hist["reference"], "offline_reference": off["reference"],
               "same_probe_split": off["same_probe_split"], "offline_seconds": off["seconds"],
               "max_logit_diff": None, "clients": sorted(states)}
        if nxt is not None:
            fed = build_global_model(cfg)
            fed.load_state_dict(nxt)
            rec["max_logit_diff"] = max_logit_diff(fed, off["model"], list(fit) + list(held))
        out.append(rec)
        log(f"[equality] round {r}: federated {_p(fed_acc)}%, offline {_p(off['accuracy'])}%, |diff| "
            f"{rec['abs_diff_pt']} pt, gamma {hist['gamma']} / {off['gamma']}, reference "
            f"{hist['reference']} / {off['reference']}, max |logit diff| {rec['max_logit_diff']}")
    return out


def one_shot_baselines(grid: ScheduledGrid, cfg: FedConfig, test, methods, log) -> list[dict]:
    """The round-1 client models (own inits) merged offline with the server's inputs, and their ensemble."""
    from fedmerge.common.task.evaluate import ensemble_evaluate, evaluate
    from fedmerge.common.task.loaders import build_global_model

    r1 = grid.rounds.get(1)
    if not r1 or len(r1["clients"]) < 2:
        return []
    rows = []
    models = []
    for p in sorted(r1["clients"]):
        m = build_global_model(cfg)
        m.load_state_dict(r1["clients"][p])
        models.append(m.eval())
        rows.append({"model": f"client {p}", "accuracy": evaluate(m, test, device=cfg.device or None)["accuracy"]})
    rows.append({"model": "ensemble (upper bound)",
                 "accuracy": ensemble_evaluate(models, test, device=cfg.device or None)["accuracy"]})
    for method in methods:
        off = offline_merge(cfg, r1["clients"], r1["counts"], method, test)
        rows.append({"model": f"offline {method}", "accuracy": off["accuracy"], "gamma": off["gamma"],
                     "reference": off["reference"], "seconds": off["seconds"]})
        log(f"[one-shot] offline {method}: {100 * off['accuracy']:.2f}%")
    return rows


# --- output ---------------------------------------------------------------------------------------------------------
def _p(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def build_markdown(payload: dict) -> str:
    from .common import md_table

    c = payload["config"]
    d = payload["data"]
    lines = [f"# Federated CCA Merge: equality with the offline merge, and multi-round vs FedAvg "
             f"({c['scale']} scale)\n",
             f"Data: {payload['data_note']}; {d['train_images']} train / {d['test_images_used']} test images used; "
             f"{c['clients']} clients, split {c['split']} (alpha {c['alpha']:g}), at most "
             f"{c['max_train'] or 'all'} training images per client (sizes in round 1: {d['client_sizes']}); "
             f"probe {c['probe_size']} images held out from client data ({100 * c['held_out']:.0f}% of it held out "
             f"again to choose gamma and the reference). Model: {c['arch']} x{c['width']:g}. Epochs: round 1 "
             f"{c['first_epochs']:g} local epochs, each later round {c['round_epochs']:g} (from the merged model); "
             f"{c['rounds']} rounds. Gamma: {c['gamma']} (chosen per round on the held-out probe slice), reference: "
             f"{c['reference']}. Batch {c['batch_size']}, lr {c['lr']:g}. BatchNorm statistics of every merged model "
             f"(FedAvg included) re-estimated on the probe's fitting slice. Seed {c['seed']}; device "
             f"{payload['environment']['device']}, {payload['environment']['threads']} threads.\n"]
    if d.get("test_note"):
        lines.append(f"Note: {d['test_note']}.\n")
    if payload.get("equality"):
        lines.append("## (a) Federated CCA merge vs offline `merge_models` on the same client models and inputs\n")
        lines.append("Target: |difference| <= 0.1 pt.\n")
        rows = [[e["round"], _p(e["federated_accuracy"]), _p(e["offline_accuracy"]),
                 "" if e["abs_diff_pt"] is None else f"{e['abs_diff_pt']:.3f}",
                 "yes" if e["abs_diff_pt"] is not None and e["abs_diff_pt"] <= 0.1 else "**no**",
                 f"{e['federated_gamma']} / {e['offline_gamma']}",
                 f"{e['federated_reference']} / {e['offline_reference']}",
                 "" if e["max_logit_diff"] is None else f"{e['max_logit_diff']:.2e}",
                 "yes" if e["same_probe_split"] else "no"] for e in payload["equality"]]
        lines.append(md_table(["round", "federated acc %", "offline acc %", "|diff| pt", "<= 0.1 pt",
                               "gamma fed / off", "reference fed / off", "max abs logit diff (probe)",
                               "same probe slices"], rows))
    if payload.get("one_shot"):
        lines.append("\n### One-shot merges of the round-1 client models (own inits), offline, same inputs\n")
        rows = [[o["model"], _p(o["accuracy"]), "" if o.get("gamma") is None else f"{o['gamma']:g}",
                 "" if o.get("seconds") is None else f"{o['seconds']:.1f}"] for o in payload["one_shot"]]
        cca = payload["arms"].get("cca")
        if cca and cca["rounds"]:
            rows.append(["federated cca (Flower), round 1", _p(cca["rounds"][0]["global_accuracy"]),
                         str(cca["rounds"][0]["gamma"]), ""])
        lines.append(md_table(["model", "test acc %", "gamma", "merge s"], rows))
    lines.append("\n## (b) Multi-round: global test accuracy per round\n")
    lines.append("Same rounds, same local epochs per round for every arm (cumulative epochs per client in the "
                 "second column). Clients = mean test accuracy of the client models before that round's merge. "
                 "Upload = all clients, both phases, per round.\n")
    arms = list(payload["arms"])
    headers = ["round", "local epochs (cum.)"]
    for a in arms:
        headers += [f"{a} global %", f"{a} clients %", f"{a} upload MiB"]
    rows = []
    for i in range(c["rounds"]):
        row = None
        for a in arms:
            rr = payload["arms"][a]["rounds"]
            r = rr[i] if i < len(rr) else None
            if row is None:
                row = [i + 1, "" if r is None else f"{r['local_epochs']:g} ({r['cumulative_local_epochs']:g})"]
            row += ["", "", ""] if r is None else [_p(r["global_accuracy"]), _p(r["clients_mean_accuracy"]),
                                                   f"{r['upload_bytes'] / 2 ** 20:.2f}"]
        rows.append(row)
    lines.append(md_table(headers, rows))
    lines.append("\nArms: " + "; ".join(f"`{a}` = {ARMS[a][2]} (wall {payload['arms'][a]['wall_seconds']:.0f} s)"
                                        for a in arms) + ".\n")
    lines.append(f"\nCommand: `{payload['command']}`; total {payload['seconds']:.0f} s.\n")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    """Accuracy per round of every arm: the merged model and the clients before the merge, with the offline
    merges of the equality check as crosses."""
    c = payload["config"]
    rounds = list(range(1, c["rounds"] + 1))
    series, styles = {}, {}
    for i, (a, arm) in enumerate(payload["arms"].items()):
        for key, what, style in (("global_accuracy", "merged", {"marker": "o", "linestyle": "-"}),
                                 ("clients_mean_accuracy", "clients before merge",
                                  {"marker": None, "linestyle": ":", "alpha": 0.7})):
            acc = {r["round"]: r[key] for r in arm["rounds"] if r[key] is not None}
            name = f"{ARMS[a][2]}: {what}"
            series[name] = [100 * acc[r] if r in acc else None for r in rounds]
            styles[name] = {"color": f"C{i}", **style}
    eq = {e["round"]: e["offline_accuracy"] for e in payload.get("equality") or []}
    if eq:
        name = "offline merge_models (same inputs)"
        series[name] = [100 * eq[r] if r in eq else None for r in rounds]
        styles[name] = {"color": "k", "marker": "x", "markersize": 9, "linestyle": "none"}
    line_plot(path, rounds, series, styles=styles, xticks=rounds, xlabel="communication round",
              title=f"{c['arch']} x{c['width']:g}, {c['clients']} clients, {c['split']}({c['alpha']:g})")


# --- main -----------------------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--data-root", default="")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--split", default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--epochs", "--first-epochs", dest="first_epochs", type=float, default=None,
                   help="local epochs in round 1")
    p.add_argument("--round-epochs", type=float, default=None, help="local epochs in every later round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--arms", default=None, help=f"comma-separated, of {', '.join(ARMS)} (default: cpu "
                                                 f"{DEFAULTS['cpu']['arms']}, paper all)")
    p.add_argument("--equality-rounds", default="all", help="rounds of the cca arm to check offline: all, none, "
                                                            "or a comma-separated list")
    p.add_argument("--one-shot", default="avg,permute", help="offline baselines on the round-1 models ('' = none)")
    p.add_argument("--gamma", default="auto")
    p.add_argument("--reference", default="best")
    p.add_argument("--max-train", type=int, default=None, help="cap on each client's training images (0 = all)")
    p.add_argument("--max-test", type=int, default=None, help="cap on test images (0 = all)")
    p.add_argument("--probe-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=7200.0, help="per-client reply timeout (s)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    d = DEFAULTS[a.scale]
    for k in ("width", "first_epochs", "round_epochs", "rounds", "max_train", "max_test", "probe_size",
              "batch_size", "lr", "arms"):
        if getattr(a, k) is None:
            setattr(a, k, d[k])
    a.arms = comma_list(a.arms)
    bad = [s for s in a.arms if s not in ARMS]
    if bad:
        p.error(f"unknown arms {bad}; choose from {', '.join(ARMS)}")
    return a


def main(argv=None):
    import numpy as np

    from fedmerge.common.task.data import dataset_info, load_dataset
    from fedmerge.common.task.loaders import client_partition, test_loader

    from .common import environment

    args = parse(argv)
    out = Path(args.out or Path("results") / args.scale / "federated")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(msg, flush=True)

    base = dict(dataset=args.dataset, data_root=args.data_root, split=args.split, alpha=args.alpha,
                num_clients=args.clients, arch=args.arch, width=args.width, lr=args.lr, batch_size=args.batch_size,
                probe_size=args.probe_size, seed=args.seed, max_train=args.max_train, max_test=args.max_test,
                gamma=args.gamma, reference=args.reference, min_clients=2, timeout=args.timeout, device=args.device)
    test_note = None
    if args.max_test:
        # test_loader takes the *first* max_test test images: fine for a shuffled test set, not for one stored
        # class by class (the offline CIFAR-10 copy); then the whole test set is used instead
        y = test_loader(FedConfig(**base)).y.numpy()
        k = dataset_info(args.dataset)["num_classes"]
        counts = np.bincount(y, minlength=k)
        if counts.min() < 0.5 * len(y) / k:
            test_note = (f"the first {args.max_test} test images (what test_loader takes for max_test) hold classes "
                         f"{counts.tolist()}: not a fair test set, so the whole test set is used (slower)")
            log(f"WARNING: {test_note}")
            args.max_test = base["max_test"] = 0
    probe_cfg = FedConfig(**base)
    train = load_dataset(args.dataset, "train", data_root=args.data_root or None)
    test_set = load_dataset(args.dataset, "test", data_root=args.data_root or None)
    test = test_loader(probe_cfg)
    sizes = [int(len(client_partition(probe_cfg, i, args.clients))) for i in range(args.clients)]
    note = data_note(train)
    log(f"federated: {note}; {args.arch} x{args.width:g}; {args.clients} clients {args.split}({args.alpha:g}), "
        f"sizes {sizes}; {args.rounds} rounds ({args.first_epochs:g} then {args.round_epochs:g} epochs); "
        f"arms {args.arms}")

    arms, equality, one_shot = {}, [], []
    for name in args.arms:
        result, grid, cfg = run_arm(name, base, args, out, log)
        arms[name] = {"method": ARMS[name][0], "common_init": ARMS[name][1], "label": ARMS[name][2],
                      "wall_seconds": result["wall_seconds"], "rounds": round_rows(name, result, grid),
                      "final_ensemble": result["accuracy"]["ensemble"],
                      "result_json": str(Path(cfg.out) / "result.json")}
        if name == "cca":
            if args.equality_rounds != "none":
                rounds = (sorted(grid.rounds) if args.equality_rounds == "all"
                          else comma_list(args.equality_rounds, int))
                equality = equality_checks(result, grid, cfg, rounds, test, log)
            methods = method_list(args.one_shot)
            if methods:
                one_shot = one_shot_baselines(grid, cfg, test, methods, log)
        del grid

    env = environment()
    cmd = "python -m benchmarks.federated " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"config": {"scale": args.scale, "dataset": args.dataset, "clients": args.clients, "split": args.split,
                          "alpha": args.alpha, "arch": args.arch, "width": args.width,
                          "first_epochs": args.first_epochs, "round_epochs": args.round_epochs, "rounds": args.rounds,
                          "max_train": args.max_train, "max_test": args.max_test, "probe_size": args.probe_size,
                          "held_out": probe_cfg.held_out, "gamma": args.gamma, "reference": args.reference,
                          "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "arms": args.arms},
               "protocol": ("every arm: the same number of rounds; round 1 = first_epochs local epochs (cca: from "
                            "own inits; fedavg and cca-common: from one shared init), each later round = "
                            "round_epochs local epochs from the previous round's merged model; so the same total "
                            "local epochs per client for every arm"),
               "data_note": note,
               "data": {"source": train.source, "train_images": len(train),
                        "test_images_used": min(len(test_set), args.max_test or len(test_set)), "client_sizes": sizes,
                        "test_note": test_note},
               "equality": equality, "one_shot": one_shot, "arms": arms, "environment": env,
               "command": cmd.strip(), "seconds": time.time() - t0}
    md = build_markdown(payload)
    (out / "federated.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "federated.md").write_text(md)
    try:
        plot(payload, out / "federated.png")
    except Exception as exc:  # noqa: BLE001
        log(f"could not draw the plot: {exc}")
    print(md)
    log(f"federated: done in {time.time() - t0:.0f} s; results in {out}/ (federated.json, federated.md, "
        "federated.png; one folder per arm with result.json and accuracy.png)")
    return payload


if __name__ == "__main__":
    main()
