"""Run one paper-scale benchmark on a GPU inside a wall-clock training budget.

    python scripts/gpu_paper.py --experiment two_models --arch vgg11 --train-budget 300 -- --out results/paper/x

Times a few real training steps of the architecture at the scale's width and batch size (after warm-up),
then runs ``python -m benchmarks.<experiment> --scale paper --epochs E ...`` with the largest E <= 200 (the
paper's) whose training of all clients fits in ``--train-budget`` seconds. Every client split used here
covers the non-probe training pool once, so one epoch over all clients is ``pool / batch`` steps. The
chosen E, the measured step time and the GPU are printed and written to ``<out>/gpu_plan.json`` so the
tables say how far from the paper's 200 epochs a run had to stay.
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

from benchmarks.common import SCALES  # noqa: E402
from fedmerge.client.train import TrainConfig, train  # noqa: E402
from fedmerge.common.data import TensorLoader  # noqa: E402
from fedmerge.common.models import build_model  # noqa: E402


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
    t_step = step_seconds(args.arch, width, batch)
    per_epoch = math.ceil(args.pool / batch) * t_step
    epochs = max(1, min(args.max_epochs, int(args.train_budget // per_epoch)))
    rest = [a for a in args.rest if a != "--"]
    cmd = [sys.executable, "-m", f"benchmarks.{args.experiment}", "--scale", "paper", "--arch", args.arch,
           "--width", str(width), "--epochs", str(epochs)] + rest
    plan = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "arch": args.arch, "width": width,
            "batch_size": batch, "step_seconds": t_step, "epoch_seconds_all_clients": per_epoch,
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
