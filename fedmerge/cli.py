"""``fedmerge`` command line: ``simulate`` (a simulated federation) and ``demo`` (the newcomer's first run)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _add_federation_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    from fedmerge.common.task.splits import SPLITS  # numpy only: the CLI still starts without torch

    d = defaults.get
    p.add_argument("--dataset", default=d("dataset", "cifar10-mini"),
                   help="cifar10 | cifar10-mini (embedded) | mnist | fashion_mnist | cifar100")
    p.add_argument("--data-root", default="", help="folder with the data sets (or set FEDMERGE_DATA)")
    p.add_argument("--split", default=d("split", "iid"),
                   help=" | ".join(SPLITS) + " (same: every client trains on all non-probe images, with its own seed, "
                        "init and data order)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--clients", type=int, default=d("clients", 2))
    p.add_argument("--arch", default=d("arch", "cnn"))
    p.add_argument("--width", type=float, default=d("width", 1.0))
    p.add_argument("--epochs", type=float, default=d("epochs", 1.0))
    p.add_argument("--lr", type=float, default=d("lr", 0.05))
    p.add_argument("--batch-size", type=int, default=d("batch_size", 64))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--method", default=d("method", "cca"),
                   help="cca | gcca | avg | permute | weight_matching | ot | zipit | merge_many")
    p.add_argument("--method-schedule", default=d("method_schedule", "auto"), metavar="auto|M1,M2,...|''",
                   help="method per round. auto (default): --method while clients start from their own "
                        "initialisations (round 1 without --common-init), plain averaging once they all start from "
                        "the merged model; M1,M2,...: one per round, the last repeating (e.g. cca,avg); '': --method "
                        "in every round")
    p.add_argument("--reference", default="best", help="'best' or a client index")
    p.add_argument("--gamma", default="auto", help="'auto' or a number (CCA regularisation)")
    p.add_argument("--gamma-clients", type=int, default=0,
                   help="CCA, --gamma auto: choose gamma by merging the reference with this many - 1 clients, then "
                        "merge all with it (0 = choose on all clients)")
    p.add_argument("--bn-reset", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--bn-fold", action="store_true",
                   help="fold BatchNorm into its conv/linear before aligning (exact for CCA; no BatchNorm reset)")
    p.add_argument("--repair", action="store_true", help="REPAIR the merged model's unit statistics")
    p.add_argument("--repair-target", default="average", choices=["average", "reference"],
                   help="REPAIR to the clients' average statistics or the reference's (the paper's App. D)")
    p.add_argument("--np-merge", action="store_true",
                   help="NP Merge: learn per-parameter merge coefficients on the labelled probe after alignment")
    p.add_argument("--probe-size", type=int, default=d("probe_size", 500))
    p.add_argument("--probe-from-union", action="store_true", help="draw the probe from all training data")
    p.add_argument("--stats-on-server", action="store_true",
                   help="the server holds the probe and computes all statistics (one phase)")
    p.add_argument("--stats-dtype", default="float64", choices=["float64", "float32", "float16", "bfloat16"],
                   help="dtype the clients send their probe statistics in (accumulated in float64 anyway)")
    p.add_argument("--norm-bound", type=float, default=10.0,
                   help="reject (or clip) a client whose weight norm is beyond this factor of the median (0 = off)")
    p.add_argument("--norm-action", default="reject", choices=["reject", "clip"])
    p.add_argument("--stats-rank", type=int, default=0,
                   help="send statistics blocks in low-rank form of this rank (0 = full blocks)")
    p.add_argument("--common-init", action="store_true", help="round 1 from one shared initialisation")
    p.add_argument("--min-clients", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--max-train", type=int, default=0, help="cap each client's training images (smoke runs)")
    p.add_argument("--max-test", type=int, default=0, help="cap test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--inject-fault", action="append", default=[], metavar="KIND[@ROUND]:CLIENT",
                   help="make a client fail or attack (the server must reject it): "
                        "nan | shape | bytes | huge | scale | count | partition | nonpsd | slow | drop-train | "
                        "drop-query | nan-query | stale-ref, e.g. nan:1 or scale@2:0")
    p.add_argument("--backend", default=d("backend", "ray"), choices=["ray", "inline"])
    p.add_argument("--out", default=d("out", "runs/simulate"))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished round (same configuration)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Flower's own log lines (or set FEDMERGE_VERBOSE=1); FEDMERGE_PROGRESS="
                        "auto|bar|lines|off chooses how training progress is shown")


def _config(a: argparse.Namespace):
    from fedmerge.common.task.config import FedConfig

    return FedConfig(dataset=a.dataset, data_root=a.data_root, split=a.split, alpha=a.alpha,
                     num_clients=a.clients, arch=a.arch, width=a.width, epochs=a.epochs, lr=a.lr,
                     batch_size=a.batch_size, num_server_rounds=a.rounds, method=a.method,
                     method_schedule=a.method_schedule, reference=a.reference, gamma=a.gamma,
                     gamma_clients=a.gamma_clients, bn_reset=a.bn_reset, bn_fold=a.bn_fold, repair=a.repair,
                     repair_target=a.repair_target, np_merge=a.np_merge, probe_size=a.probe_size,
                     probe_from_union=a.probe_from_union, stats_on_server=a.stats_on_server,
                     stats_dtype=a.stats_dtype, stats_rank=a.stats_rank, norm_bound=a.norm_bound,
                     norm_action=a.norm_action,
                     common_init=a.common_init, min_clients=min(a.min_clients, a.clients), timeout=a.timeout,
                     max_train=a.max_train, max_test=a.max_test, seed=a.seed, device=a.device, out=a.out,
                     faults=",".join(a.inject_fault), resume=a.resume)


def cmd_simulate(a: argparse.Namespace) -> int:
    from fedmerge.simulate import format_result, simulate

    cfg = _config(a)
    result = simulate(cfg, backend=a.backend, verbose=a.verbose)
    print(format_result(result))
    print(f"\nwrote {Path(cfg.out) / 'result.json'} and {Path(cfg.out) / 'accuracy.png'}")
    last = result["rounds"][-1] if result.get("rounds") else None
    if last is None or not last["ok"]:
        why = last["error"] if last else "no round ran"
        print(f"fedmerge: the last round failed: {why}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Simulated federation with CCA Merge on the embedded CIFAR-10 subset, then the same client models
    merged offline with plain averaging and Permute for comparison."""
    from fedmerge.demo import run_demo

    run_demo(_config(a), backend=a.backend)
    return 0


DEMO_DEFAULTS = {"dataset": "cifar10-mini", "split": "80/20", "clients": 2, "arch": "vgg11", "width": 0.25,
                 "epochs": 30, "lr": 0.05, "batch_size": 64, "probe_size": 1000, "method": "cca",
                 "backend": "inline", "out": "runs/demo"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fedmerge", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="run a simulated federation")
    _add_federation_args(s, {})
    s.set_defaults(fn=cmd_simulate)
    d = sub.add_parser("demo", help="the demo: 2 clients (CIFAR-10 80/20, embedded subset), CCA vs baselines")
    _add_federation_args(d, DEMO_DEFAULTS)
    d.set_defaults(fn=cmd_demo)
    a = p.parse_args(argv)
    try:
        from fedmerge.common import progress

        progress.mode()   # a bad FEDMERGE_PROGRESS fails here, not in the middle of a run
        progress.quiet_flower(a.verbose or progress.verbose_from_env())
        return a.fn(a)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"fedmerge {a.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
