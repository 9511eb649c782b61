"""The deterministic pieces every party rebuilds identically from a :class:`FedConfig`: the model, the client
partitions, the probe set and the test set. Every party derives the probe from the same seed, so clients and
server agree on it without sending it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn

from fedmerge.common.task.config import FedConfig
from fedmerge.common.task.data import (
    dataset_info,
    load_dataset,
    make_loader,
    set_seed,
    split_probe_pool,
    to_tensor,
)
from fedmerge.common.task.splits import make_split
from fedmerge.common.wire.probe import Batches, as_batches


# --- deterministic pieces -----------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _train_set(dataset: str, data_root: str):
    return load_dataset(dataset, "train", data_root=data_root or None)


@lru_cache(maxsize=8)
def _test_set(dataset: str, data_root: str):
    return load_dataset(dataset, "test", data_root=data_root or None)


def _probe_pool(cfg: FedConfig) -> tuple[np.ndarray, np.ndarray]:
    n = len(_train_set(cfg.dataset, cfg.data_root))
    return split_probe_pool(n, cfg.probe_size, cfg.seed, from_union=cfg.probe_from_union)


def build_global_model(cfg: FedConfig, seed: int | None = None) -> nn.Module:
    """The architecture (seeded init). For ``split=disjoint`` a fixed class-embedding head shared by all."""
    from fedmerge.common.task.models import ClassEmbeddingHead, build_model

    info = dataset_info(cfg.dataset)
    head = None
    if cfg.split == "disjoint":
        dim = cfg.embedding_dim or info["num_classes"]
        head = ClassEmbeddingHead.orthonormal(info["num_classes"], dim, seed=cfg.seed)
    set_seed(cfg.seed if seed is None else seed)
    return build_model(cfg.arch, num_classes=info["num_classes"], width=cfg.width,
                       in_channels=info["in_channels"], image_size=info["image_size"], head=head)


def client_partition(cfg: FedConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """Indices (into the training set) of one client's data."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    train = _train_set(cfg.dataset, cfg.data_root)
    _, pool = _probe_pool(cfg)
    parts = make_split(cfg.split, train.y[pool], num_partitions, seed=cfg.seed, alpha=cfg.alpha)
    idx = pool[parts[partition_id]]
    if cfg.max_train and len(idx) > cfg.max_train:
        # split=same: every client has the same images, so the same capped subset (they differ by seed only)
        rng = np.random.default_rng([cfg.seed, 0 if cfg.split == "same" else partition_id, 11])
        idx = np.sort(rng.choice(idx, cfg.max_train, replace=False))
    return idx


def train_loader(cfg: FedConfig, partition_id: int, num_partitions: int, seed: int = 0):
    idx = client_partition(cfg, partition_id, num_partitions)
    return make_loader(_train_set(cfg.dataset, cfg.data_root), idx, batch_size=cfg.batch_size, train=True,
                       seed=seed, augment=cfg.augment)


def probe_batches(cfg: FedConfig, batch_size: int = 250) -> tuple[Batches, Batches]:
    """(fit, held_out) probe batches with labels, un-augmented. Statistics use ``fit``; the server picks γ,
    the reference and checks the merge on ``held_out``. Built once per probe definition and process (a
    client answers several messages per round); the batches are read, never modified."""
    return _probe_batches(cfg.dataset, cfg.data_root, cfg.probe_size, cfg.probe_from_union, cfg.seed,
                          cfg.held_out, batch_size)


@lru_cache(maxsize=4)
def _probe_batches(dataset: str, data_root: str, probe_size: int, from_union: bool, seed: int, held_out: float,
                   batch_size: int) -> tuple[Batches, Batches]:
    train = _train_set(dataset, data_root)
    probe_idx, _ = split_probe_pool(len(train), probe_size, seed, from_union=from_union)
    x = to_tensor(train.x[probe_idx], train.name)
    y = torch.from_numpy(train.y[probe_idx].copy())
    return as_batches((x, y), batch_size).split(held_out, seed, batch_size)


def test_loader(cfg: FedConfig, batch_size: int = 500):
    test = _test_set(cfg.dataset, cfg.data_root)
    idx = None
    if cfg.max_test and cfg.max_test < len(test):  # a seeded random subset: stored test sets may be class-sorted
        idx = np.sort(np.random.default_rng([cfg.seed, 13]).choice(len(test), cfg.max_test, replace=False))
    return make_loader(test, idx, batch_size=batch_size, train=False)
