"""Run one paper-scale benchmark on a GPU inside a wall-clock training budget.

    python scripts/gpu_paper.py --experiment two_models --arch vgg11 --train-budget 300 -- --out results/paper/x

Times a few real training steps of the architecture at the scale's width and batch size (after warm-up),
then runs ``python -m benchmarks.<experiment> --scale paper --epochs E ...`` with the largest E <= 200 (the
paper's) whose training of all clients fits in ``--train-budget`` seconds. One epoch of all clients is
``passes * pool / batch`` steps: with the ``same`` split (the default of two_models, many_models and the
studies reusing their models: the paper's Table 1 / Fig. 4 regime) every client goes over the whole
non-probe pool, so ``passes`` is the number of clients; a partitioning split covers the pool once (the splits
experiment once per split). The chosen E, the measured step time and the GPU are printed and written to
``<out>/gpu_plan.json`` so the tables say how far from the paper's 200 epochs a run had to stay.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SAME_DATA, SCALES  # noqa: E402
from fedmerge.client.train import TrainConfig, train  # noqa: E402
from fedmerge.common.task.data import TensorLoader  # noqa: E402
from fedmerge.common.task.models import build_model  # noqa: E402


def step_seconds(arch: str, width: float, batch: int, steps: int = 30) -> float:
    model = build_model(arch, num_classes=10, width=width)
    x = torch.randn(batch * 4, 3, 32, 32)
    y = torch.randint(0, 10, (batch * 4,))
    loader = TensorLoader(x, y, batch_size=batch, train=True)
    train(model, loader, TrainConfig(epochs=1, lr=0.01, max_steps=5))  # warm-up: cuDNN plans, allocator
    torch.cuda.synchronize()
    t = time.perf_counter()
    train(model, loader, TrainConfig(epochs=100, lr=0.01, max_steps=steps))
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def pool_passes(experiment: str, arch: str, rest: list[str]) -> int:
    """How often one epoch of all the benchmark's clients goes over the non-probe pool (see the docstring)."""
    def opt(name: str, default):
        return rest[rest.index(name) + 1] if name in rest[:-1] else default

    if experiment == "splits":
        from benchmarks.splits import SPLITS

        return len([s for s in str(opt("--splits", ",".join(SPLITS))).split(",") if s.strip()])
    if opt("--split", SAME_DATA) != SAME_DATA:
        return 1
    if experiment == "many_models":
        from benchmarks.many_models import ARCH_DEFAULTS, DEFAULT_CLIENTS

        return int(opt("--clients", ARCH_DEFAULTS.get((arch, "paper"), {}).get("clients", DEFAULT_CLIENTS)))
    if experiment == "reference_free":
        return int(opt("--clients", 5))
    return 2  # two_models and the studies reusing its pair


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="benchmarks module, e.g. two_models, many_models")
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--width", type=float, default=None, help="default: the paper scale's width")
    p.add_argument("--train-budget", type=float, required=True, help="seconds for training all clients")
    p.add_argument("--pool", type=int, default=45000, help="non-probe training images (all clients together)")
    p.add_argument("--max-epochs", type=int, default=SCALES["paper"]["epochs"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then arguments for the benchmark")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device: this script sizes paper-scale runs for a GPU")
    width = args.width if args.width is not None else SCALES["paper"]["width"]
    batch = SCALES["paper"]["batch_size"]
    rest = [a for a in args.rest if a != "--"]
    passes = pool_passes(args.experiment, args.arch, rest)
    t_step = step_seconds(args.arch, width, batch)
    per_epoch = passes * math.ceil(args.pool / batch) * t_step
    epochs = max(1, min(args.max_epochs, int(args.train_budget // per_epoch)))
    cmd = [sys.executable, "-m", f"benchmarks.{args.experiment}", "--scale", "paper", "--arch", args.arch,
           "--width", str(width), "--epochs", str(epochs)] + rest
    plan = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "arch": args.arch, "width": width,
            "batch_size": batch, "step_seconds": t_step, "pool_passes_per_epoch": passes,
            "epoch_seconds_all_clients": per_epoch,
            "train_budget_s": args.train_budget, "epochs": epochs, "paper_epochs": args.max_epochs,
            "command": ["python"] + cmd[1:]}  # the interpreter's own path says nothing portable
    print(json.dumps(plan, indent=1), flush=True)
    if "--out" in rest:
        out = Path(rest[rest.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_plan.json").write_text(json.dumps(plan, indent=1))
    t = time.perf_counter()
    rc = subprocess.call(cmd)
    print(f"benchmark finished rc={rc} in {time.perf_counter() - t:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
