"""``fedmerge`` command line: ``simulate`` (a simulated federation) and ``demo`` (the newcomer's first run)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import Field, fields
from pathlib import Path

__all__ = ["main", "add_config_args", "config_from_args", "config_to_args"]


_TYPES = {"int": int, "float": float, "str": str}


def add_config_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One option per :class:`FedConfig` field, generated from the dataclass (its field metadata gives the help
    text, the choices and, where it differs from the field's dashed name, the option's name); ``defaults`` maps
    field names to this command's defaults (else the dataclass's); plus ``--backend`` and ``--verbose``."""
    from fedmerge.common.task.config import FedConfig

    defaults = defaults or {}
    for f in fields(FedConfig):
        m = f.metadata
        default = defaults.get(f.name, f.default)
        flag = option_flag(f)
        kw = {"dest": f.name, "help": m.get("help") or None}
        if f.type == "bool":
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kw["metavar"] = m.get("metavar") or flag[2:].upper().replace("-", "_")
            if m.get("repeat"):
                kw.update(action="append", default=[v for v in str(default).split(",") if v])
            else:
                kw.update(type=_TYPES[f.type], default=default, choices=m.get("choices"))
        p.add_argument(flag, **kw)
    p.add_argument("--backend", default=defaults.get("backend", "ray"), choices=["ray", "inline"])
    p.add_argument("--ray-workers", type=_positive_int, default=None, metavar="K",
                   help="Ray backend: clients run at once, each in a worker process (default: one per CPU); "
                        "fewer hold less memory")
    p.add_argument("--verbose", action="store_true",
                   help="also show Flower's own log lines (or set FEDMERGE_VERBOSE=1); FEDMERGE_PROGRESS="
                        "auto|bar|lines|off chooses how training progress is shown")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def option_flag(f: Field) -> str:
    """A FedConfig field's option: its ``flag`` metadata, else its dashed name (``--batch-size``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def config_from_args(a: argparse.Namespace):
    """The :class:`FedConfig` of parsed :func:`add_config_args` options: every field from its option (a repeated
    option's values joined with commas); ``min_clients`` is at most ``num_clients``, so ``--clients 1`` runs."""
    from fedmerge.common.task.config import FedConfig

    values = {f.name: ",".join(getattr(a, f.name)) if f.metadata.get("repeat") else getattr(a, f.name)
              for f in fields(FedConfig)}
    values["min_clients"] = min(values["min_clients"], values["num_clients"])
    return FedConfig(**values)


def config_to_args(cfg) -> list[str]:
    """The command-line options that give ``cfg`` back through :func:`config_from_args` (every field)."""
    argv = []
    for f in fields(cfg):
        flag, v = option_flag(f), getattr(cfg, f.name)
        if f.metadata.get("repeat"):
            argv += [a for item in str(v).split(",") if item for a in (flag, item)]
        elif f.type == "bool":
            argv.append(flag if v else "--no-" + flag[2:])
        else:
            argv.append(f"{flag}={v}")
    return argv


def cmd_simulate(a: argparse.Namespace) -> int:
    from fedmerge.simulate import format_result, simulate

    cfg = config_from_args(a)
    if a.ray_workers is not None and a.backend != "ray":
        print(f"fedmerge: --ray-workers applies to --backend ray, not {a.backend}", file=sys.stderr)
        return 2
    result = simulate(cfg, backend=a.backend, verbose=a.verbose, ray_workers=a.ray_workers)
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

    run_demo(config_from_args(a), backend=a.backend)
    return 0


#: each command's defaults where they are not FedConfig's (field names; ``backend`` is the run option)
SIMULATE_DEFAULTS = {"out": "runs/simulate"}
DEMO_DEFAULTS = {"dataset": "cifar10-mini", "split": "80/20", "num_clients": 2, "arch": "vgg11", "width": 0.25,
                 "epochs": 30, "lr": 0.05, "batch_size": 64, "probe_size": 1000, "method": "cca",
                 "backend": "inline", "out": "runs/demo"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fedmerge", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="run a simulated federation")
    add_config_args(s, SIMULATE_DEFAULTS)
    s.set_defaults(fn=cmd_simulate)
    d = sub.add_parser("demo", help="the demo: 2 clients (CIFAR-10 80/20, embedded subset), CCA vs baselines")
    add_config_args(d, DEMO_DEFAULTS)
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
