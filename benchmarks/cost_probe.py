"""Inputs of :mod:`benchmarks.cost`: the probe (the first images of the seeded probe set) and seeded untrained
models."""
from __future__ import annotations

import torch

__all__ = ["load_probe", "batches_of", "make_model"]


def load_probe(dataset: str, data_root: str | None, size: int, seed: int):
    """The first ``size`` images of the seeded probe set (as every party derives it), as a float tensor."""
    from fedmerge.common.task.data import load_dataset, split_probe_pool, to_tensor

    train = load_dataset(dataset, "train", data_root=data_root or None)
    probe_idx, _ = split_probe_pool(len(train), max(size, 10), seed)
    idx = probe_idx[:size]
    return to_tensor(train.x[idx], train.name), train


def batches_of(x: torch.Tensor, bs: int = 250):
    from fedmerge.common.wire.probe import as_batches

    return as_batches(x, bs)


def make_model(arch: str, width: float, seed: int):
    from fedmerge.common.task.data import set_seed
    from fedmerge.common.task.models import build_model

    set_seed(seed)
    return build_model(arch, num_classes=10, width=width).eval()
