"""Federated: a simulated Flower federation merged with CCA, and the very same client models merged offline
with avg / permute / CCA (the federated merge must equal the offline one on the same seeds).

    python -m benchmarks.federated --scale cpu --data-root ../shared/data
"""
from __future__ import annotations

import json
from pathlib import Path

from fedmerge.common.task import FedConfig
from fedmerge.demo import run_demo

from .common import SCALES


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--data-root", default="")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--split", default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--backend", default="inline", choices=["inline", "ray"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=7200.0, help="per-client reply timeout (s)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    sc = SCALES[a.scale]
    out = Path(a.out or Path("results") / a.scale / "federated")
    cfg = FedConfig(dataset=a.dataset, data_root=a.data_root, split=a.split, alpha=a.alpha, num_clients=a.clients,
                    arch=a.arch, width=a.width if a.width is not None else (0.5 if a.scale == "cpu" else 1.0),
                    epochs=a.epochs if a.epochs is not None else (4 if a.scale == "cpu" else sc["epochs"]),
                    lr=sc["lr"], batch_size=sc["batch_size"], probe_size=sc["probe_size"], method="cca",
                    seed=a.seed, out=str(out), max_train=a.max_train, min_clients=2, timeout=a.timeout)
    summary = run_demo(cfg, backend=a.backend, baselines=("avg", "permute", "cca"))
    (out / "federated.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
