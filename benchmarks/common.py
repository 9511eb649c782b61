"""Shared pieces of the benchmark commands: data, client training with checkpoint caching, result files."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedmerge.client.train import TrainConfig, evaluate, train
from fedmerge.common.checkpoint import load_checkpoint, save_checkpoint
from fedmerge.common.data import dataset_info, load_dataset, make_loader, set_seed, split_probe_pool
from fedmerge.common.models import build_model
from fedmerge.common.splits import make_split

SCALES = {
    # CPU: narrow models, few epochs, batch 128. Paper: the paper's widths and 200 epochs, batch 500, for a GPU.
    "cpu": {"width": 0.25, "epochs": 12, "batch_size": 128, "lr": 0.1, "probe_size": 2000},
    "paper": {"width": 1.0, "epochs": 200, "batch_size": 500, "lr": 0.4, "probe_size": 5000},
}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: by scale)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per client (default: by scale)")
    p.add_argument("--probe-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default: results/<scale>/<experiment>)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-train", type=int, default=None, help="cap training images (smoke runs)")
    p.add_argument("--max-test", type=int, default=None, help="cap test images (smoke runs)")
    return p


def resolve(args, name: str) -> dict:
    sc = dict(SCALES[args.scale])
    for k in ("width", "epochs", "probe_size"):
        if getattr(args, k, None) is not None:
            sc[k] = getattr(args, k)
    sc["out"] = Path(args.out or Path("results") / args.scale / name)
    sc["out"].mkdir(parents=True, exist_ok=True)
    return sc


class Setup:
    """Data, probe and split for one experiment, all seeded."""

    def __init__(self, args, sc: dict, split: str, num_clients: int, alpha: float = 0.5):
        set_seed(args.seed)
        self.train = load_dataset(args.dataset, "train", data_root=args.data_root)
        self.test = load_dataset(args.dataset, "test", data_root=args.data_root)
        rng = np.random.default_rng(args.seed)
        if args.max_train:
            self.train = self.train.subset(np.sort(rng.permutation(len(self.train))[: args.max_train]))
        if args.max_test:
            self.test = self.test.subset(np.sort(rng.permutation(len(self.test))[: args.max_test]))
        self.info = dataset_info(args.dataset)
        self.probe_idx, pool = split_probe_pool(len(self.train), sc["probe_size"], args.seed)
        parts = make_split(split, self.train.y[pool], num_clients, seed=args.seed, alpha=alpha)
        self.parts = [pool[p] for p in parts]
        self.probe_loader = make_loader(self.train, self.probe_idx, batch_size=250, train=False)
        self.test_loader = make_loader(self.test, None, batch_size=500, train=False)
        self.split, self.alpha = split, alpha

    def describe(self) -> dict:
        return {"dataset": self.train.name, "source": self.train.source, "train_images": len(self.train),
                "test_images": len(self.test), "probe_size": int(len(self.probe_idx)),
                "client_sizes": [int(len(p)) for p in self.parts], "split": self.split}


def train_clients(args, sc: dict, setup: Setup, num_clients: int, tag: str, head=None) -> list[torch.nn.Module]:
    """Train (or load cached) client models, each from its own seed (different inits, as in the paper)."""
    models = []
    ckpt_dir = sc["out"] / "checkpoints"
    for i in range(num_clients):
        path = ckpt_dir / f"{tag}_client{i}"
        cfg_model = {"arch": args.arch, "num_classes": setup.info["num_classes"], "width": sc["width"],
                     "in_channels": setup.info["in_channels"], "image_size": setup.info["image_size"]}
        if Path(str(path) + ".json").exists():
            model, cfg = load_checkpoint(path)
            models.append(model)
            continue
        set_seed(args.seed * 1000 + i)
        model = build_model(**cfg_model, head=head)
        loader = make_loader(setup.train, setup.parts[i], batch_size=sc["batch_size"], train=True,
                             seed=args.seed * 1000 + i)
        t = time.perf_counter()
        train(model, loader, TrainConfig(epochs=sc["epochs"], lr=sc["lr"], batch_size=sc["batch_size"],
                                         device=args.device, seed=args.seed * 1000 + i, progress=True))
        model.cpu().eval()
        save_checkpoint(model, path, {**cfg_model, "epochs": sc["epochs"], "seconds": time.perf_counter() - t,
                                      "client": i, "tag": tag})
        models.append(model)
    return models


def environment() -> dict:
    return {"torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "cpus": os.cpu_count()}


def write_results(out: Path, name: str, payload: dict, table_md: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))
    (out / f"{name}.md").write_text(table_md)
    print(table_md)


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pct(model, loader, device=None) -> float:
    return 100.0 * evaluate(model, loader, device=device)["accuracy"]
