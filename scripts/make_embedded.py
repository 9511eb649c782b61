"""Build the embedded CIFAR-10 subset (common/embedded/cifar10_mini.npz) from the offline data folder.

    python scripts/make_embedded.py [--data-root ../shared/data] [--train-per-class 800] [--test-per-class 200]

The subset keeps the original JPEG bytes (shared header + per-image scan, as in cifar10_jpeg.npz), so it is
real CIFAR-10 data (JPEG q75 decodes, labels exact), balanced over classes, seeded, a few MB.
"""
import argparse
import os
from pathlib import Path

import numpy as np


def take(d, split, per_class, rng):
    y = d[f"y_{split}"]
    offs = d[f"x_{split}_offsets"]
    scan = d[f"x_{split}_scan"]
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                  for c in range(10)]))
    idx = idx[rng.permutation(len(idx))]  # shuffled order (the source is class-major)
    parts = [scan[offs[i]:offs[i + 1]] for i in idx]
    new_offs = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return np.concatenate(parts), new_offs, y[idx].astype(np.int64)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=os.environ.get("FEDMERGE_DATA", "../shared/data"))
    p.add_argument("--train-per-class", type=int, default=800)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "common" / "embedded" / "cifar10_mini.npz"))
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    with np.load(Path(a.data_root) / "cifar10_jpeg.npz") as d:
        tr_scan, tr_offs, y_tr = take(d, "train", a.train_per_class, rng)
        te_scan, te_offs, y_te = take(d, "test", a.test_per_class, rng)
        np.savez(a.out, jpeg_header=d["jpeg_header"], classes=d["classes"],
                 x_train_scan=tr_scan, x_train_offsets=tr_offs, y_train=y_tr,
                 x_test_scan=te_scan, x_test_offsets=te_offs, y_test=y_te)
    print(f"wrote {a.out}: {len(y_tr)} train, {len(y_te)} test, {os.path.getsize(a.out) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
