"""Data sets, normalisation, augmentation, loaders and the probe set.

Data sets: ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist`` and the embedded ``cifar10-mini``.

Where a data set is looked for, in this order (the first that has it wins):

1. every *data root*: the ``data_root`` argument, then the ``FEDMERGE_DATA`` environment variable
   (``os.pathsep``-separated list), then ``~/.cache/fedmerge/data``. In each root:
   a. torchvision's own layout (``cifar-10-batches-py/``, ``cifar-100-python/``, ``MNIST/raw``,
      ``FashionMNIST/raw``), downloaded there by torchvision when ``download=True`` and the network allows;
   b. the ``.npz`` files of the offline data folder (``cifar10_jpeg.npz``, ``mnist.npz``,
      ``fashion_mnist.npz``; the CIFAR-10 one holds JPEG bytes, decoded with Pillow and cached decoded
      under ``FEDMERGE_CACHE`` or ``~/.cache/fedmerge``).
2. ``cifar10-mini`` only: a real subset vendored in this package (``common/embedded/cifar10_mini.npz``,
   5,000 train / 1,000 test CIFAR-10 images as JPEG bytes, balanced classes), so the demo and the tests
   work with no network and no data folder. It is a separate name on purpose: asking for ``cifar10``
   never silently gives you the small subset.

When nothing is found the error lists every place that was tried. CIFAR-100 has no offline copy here;
it loads only from a torchvision root (or a download).

The probe set (:func:`split_probe_pool`) is a seeded sample of the training set that, by default, no client
trains on. It is the only data the server ever sees (in the default protocol it does not even see it:
clients compute statistics on it locally).
"""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["DATASETS", "ArrayDataset", "DatasetNotFoundError", "load_dataset", "dataset_info", "to_tensor",
           "make_loader", "TensorLoader", "split_probe_pool", "set_seed", "data_roots", "EMBEDDED"]

EMBEDDED = Path(__file__).resolve().parents[1] / "embedded" / "cifar10_mini.npz"

_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASETS: dict[str, dict] = {
    "cifar10": {"num_classes": 10, "in_channels": 3, "image_size": 32, "npz": "cifar10_jpeg.npz",
                "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "cifar10-mini": {"num_classes": 10, "in_channels": 3, "image_size": 32, "npz": None,
                     "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "cifar100": {"num_classes": 100, "in_channels": 3, "image_size": 32, "npz": None,
                 "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)},
    "mnist": {"num_classes": 10, "in_channels": 1, "image_size": 28, "npz": "mnist.npz",
              "mean": (0.1307,), "std": (0.3081,)},
    "fashion_mnist": {"num_classes": 10, "in_channels": 1, "image_size": 28, "npz": "fashion_mnist.npz",
                      "mean": (0.2860,), "std": (0.3530,)},
}
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashion-mnist": "fashion_mnist",
            "fmnist": "fashion_mnist", "cifar10_mini": "cifar10-mini", "embedded": "cifar10-mini"}


class DatasetNotFoundError(FileNotFoundError):
    """No source holds the requested data set; the message lists every place tried."""


@dataclass
class ArrayDataset:
    """Images as uint8 ``N×H×W×C`` (RGB or one channel) and int64 labels, plus where they came from."""

    x: np.ndarray
    y: np.ndarray
    name: str
    split: str
    source: str
    classes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.x.ndim == 3:
            self.x = self.x[..., None]
        if self.x.ndim != 4 or self.x.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be uint8 N×H×W(×C), got {self.x.dtype} {self.x.shape}")
        self.y = np.asarray(self.y, dtype=np.int64)
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"{self.name}: {self.x.shape[0]} images but labels of shape {self.y.shape}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx) -> "ArrayDataset":
        idx = np.asarray(idx, dtype=np.int64)
        return ArrayDataset(self.x[idx], self.y[idx], self.name, self.split, self.source, self.classes)

    @property
    def info(self) -> dict:
        return dataset_info(self.name)


def canonical_name(name: str) -> str:
    key = str(name).lower().strip()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return key


def dataset_info(name: str) -> dict:
    """Static facts: ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std``."""
    return dict(DATASETS[canonical_name(name)], name=canonical_name(name))


def data_roots(data_root: str | os.PathLike | Sequence | None = None) -> list[Path]:
    roots: list[Path] = []
    if data_root:
        roots += [Path(p) for p in ([data_root] if isinstance(data_root, (str, os.PathLike)) else data_root)]
    env = os.environ.get("FEDMERGE_DATA")
    if env:
        roots += [Path(p) for p in env.split(os.pathsep) if p]
    roots.append(Path.home() / ".cache" / "fedmerge" / "data")
    out: list[Path] = []
    for r in roots:
        r = r.expanduser()
        if r not in out:
            out.append(r)
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDMERGE_CACHE", Path.home() / ".cache" / "fedmerge")).expanduser()


def decode_jpegs(header: bytes, scan: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Rebuild JPEG files as ``header + scan[a:b] + EOI`` and decode them with Pillow (RGB uint8)."""
    from PIL import Image

    buf = scan.tobytes()
    n = len(offsets) - 1
    out = None
    for i in range(n):
        a, b = int(offsets[i]), int(offsets[i + 1])
        im = np.asarray(Image.open(io.BytesIO(header + buf[a:b] + b"\xff\xd9")).convert("RGB"))
        if out is None:
            out = np.empty((n,) + im.shape, np.uint8)
        out[i] = im
    if out is None:
        raise ValueError("no JPEG images to decode")
    return out


def _load_jpeg_npz(path: Path, split: str, cache: bool = True) -> tuple[np.ndarray, np.ndarray, tuple]:
    with np.load(path) as d:
        y = d[f"y_{split}"].astype(np.int64)
        classes = tuple(str(c) for c in d["classes"]) if "classes" in d.files else _CIFAR10_CLASSES
        st = path.stat()
        cpath = _cache_dir() / f"{path.stem}.{split}.{st.st_size}.{int(st.st_mtime)}.decoded.npy"
        if cache and cpath.exists():
            x = np.load(cpath)
            if x.shape[0] == y.shape[0]:
                return x, y, classes
        x = decode_jpegs(d["jpeg_header"].tobytes(), d[f"x_{split}_scan"], d[f"x_{split}_offsets"])
    if cache:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, x)
            os.replace(tmp, cpath)
        except OSError:
            pass  # a read-only cache only costs decode time
    return x, y, classes


def _from_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    with np.load(path) as d:
        if f"x_{split}" in d.files:
            classes = tuple(str(c) for c in d["classes"]) if "classes" in d.files else ()
            return d[f"x_{split}"], d[f"y_{split}"].astype(np.int64), classes
        if f"x_{split}_scan" not in d.files:
            raise ValueError(f"{path} has neither x_{split} nor x_{split}_scan")
    return _load_jpeg_npz(path, split)


def _from_torchvision(name: str, root: Path, train: bool, download: bool):
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
           "fashion_mnist": tvd.FashionMNIST}[name]
    ds = cls(str(root), train=train, download=download)
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    y = np.asarray(ds.targets, dtype=np.int64)
    return x.astype(np.uint8), y, tuple(ds.classes)


def _embedded_candidates(roots: list[Path]) -> list[Path]:
    """The vendored subset: next to this module, in a data root, or in the installed distribution (a Flower
    app bundle (FAB) carries only source files, so code run from one finds the data in the installed copy)."""
    out = [EMBEDDED] + [r / EMBEDDED.name for r in roots]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        for f in distribution("fedmerge").files or []:
            if f.name == EMBEDDED.name:
                out.append(Path(f.locate()))
            elif f.name == "__init__.py" and f.parent.name == "common":
                out.append(Path(f.locate()).parent / "embedded" / EMBEDDED.name)
        # an editable install points at the source tree
        import json

        raw = distribution("fedmerge").read_text("direct_url.json")
        if raw:
            url = json.loads(raw).get("url", "")
            if url.startswith("file://"):
                out.append(Path(url[len("file://"):]) / "common" / "embedded" / EMBEDDED.name)
    except (ImportError, OSError, ValueError, PackageNotFoundError):
        pass
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


_MEMO: dict[tuple, ArrayDataset] = {}


def load_dataset(name: str, split: str = "train", data_root=None, download: bool = False) -> ArrayDataset:
    """Load ``split`` ("train" | "test") of a data set as an :class:`ArrayDataset` (see module docstring)."""
    key = canonical_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    roots = data_roots(data_root)
    memo_key = (key, split, tuple(map(str, roots)), bool(download))
    if memo_key in _MEMO:
        d = _MEMO[memo_key]
        return ArrayDataset(d.x, d.y, d.name, d.split, d.source, d.classes)
    tried: list[str] = []
    errors: list[str] = []
    result = None
    if key == "cifar10-mini":
        for path in _embedded_candidates(roots):
            tried.append(str(path))
            if path.exists():
                x, y, classes = _load_jpeg_npz(path, split)
                result = ArrayDataset(x, y, key, split, f"embedded:{path}", classes)
                break
    else:
        npz = DATASETS[key]["npz"]
        for root in roots:
            tv_dir = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "mnist": "MNIST",
                      "fashion_mnist": "FashionMNIST"}[key]
            if (root / tv_dir).exists() or download:
                tried.append(f"torchvision layout {root / tv_dir}" + (" (download)" if download else ""))
                try:
                    x, y, classes = _from_torchvision(key, root, split == "train", download)
                    result = ArrayDataset(x, y, key, split, f"torchvision:{root}", classes)
                    break
                except Exception as exc:  # noqa: BLE001 - recorded and reported below
                    errors.append(f"{root / tv_dir}: {type(exc).__name__}: {exc}")
            else:
                tried.append(f"torchvision layout {root / tv_dir}")
            if npz:
                tried.append(str(root / npz))
                if (root / npz).exists():
                    try:
                        x, y, classes = _from_npz(root / npz, split)
                        result = ArrayDataset(x, y, key, split, f"npz:{root / npz}", classes)
                        break
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{root / npz}: {type(exc).__name__}: {exc}")
    if result is None:
        hint = ("Set FEDMERGE_DATA (or --data-root) to a folder holding the data set, pass download=True "
                "where the network allows")
        if key == "cifar100":
            hint += "; no offline copy of CIFAR-100 exists in the shared data folder"
        if key == "cifar10":
            hint += "; or use the embedded subset 'cifar10-mini'"
        detail = ("\n  errors:\n    " + "\n    ".join(errors)) if errors else ""
        raise DatasetNotFoundError(f"data set {key!r} ({split}) not found. Tried:\n    " + "\n    ".join(tried)
                                   + detail + f"\n  {hint}.")
    _MEMO[memo_key] = result
    return ArrayDataset(result.x, result.y, result.name, result.split, result.source, result.classes)


def to_tensor(x: np.ndarray, name: str) -> torch.Tensor:
    """uint8 ``N×H×W×C`` → normalised float32 ``N×C×H×W`` (the data set's mean/std)."""
    info = dataset_info(name)
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(info["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (t - mean) / std


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding (in normalised space, i.e. mean-padding) and horizontal flip."""
    n, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    # random numbers come from the CPU generator wherever the images live: same crops on CPU and GPU
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    rows = (dy.view(n, 1) + torch.arange(h, device=dev).view(1, h))  # n×h
    cols = (dx.view(n, 1) + torch.arange(w, device=dev).view(1, w))  # n×w
    out = padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
                 rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(dev)
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(3), out)
    return out


class TensorLoader:
    """A seeded in-memory batch iterator over (normalised images, labels); no worker processes.

    ``train=True``: reshuffles every epoch (seeded by ``seed`` and the epoch number) and augments with
    random crop (padding 4) and, for RGB images, horizontal flip. ``train=False``: fixed order, no
    augmentation (probe statistics and evaluation always use un-augmented images).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, train: bool = False,
                 seed: int = 0, augment: bool | None = None, drop_last: bool = False):
        if x.shape[0] != y.shape[0]:
            raise ValueError("images and labels differ in length")
        if x.shape[0] == 0:
            raise ValueError("empty data set: nothing to load")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.augment = self.train if augment is None else bool(augment)
        self.flip = x.shape[1] == 3
        self.drop_last = drop_last and x.shape[0] >= batch_size
        self.epoch = 0

    def to(self, device) -> "TensorLoader":
        """Keep the images and labels on ``device`` (in place; returns self): on a GPU, batches and their
        augmentation are then made there, with the same seeded shuffles and crops as on the CPU."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    @property
    def dataset_size(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        n = self.dataset_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        n = self.dataset_size
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        order = order.to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self.x[idx]
            if self.augment:
                xb = _augment(xb, gen, self.flip)
            yield xb, self.y[idx]


def make_loader(dataset: ArrayDataset, indices=None, batch_size: int = 128, train: bool = False,
                seed: int = 0, augment: bool | None = None) -> TensorLoader:
    """A :class:`TensorLoader` over ``dataset[indices]`` (all images when ``indices`` is None)."""
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError("indices must be 1-D")
        if indices.size and (indices.min() < 0 or indices.max() >= len(dataset)):
            raise ValueError(f"indices out of range for a data set of {len(dataset)} images")
        x, y = dataset.x[indices], dataset.y[indices]
    else:
        x, y = dataset.x, dataset.y
    return TensorLoader(to_tensor(x, dataset.name), torch.from_numpy(y.copy()), batch_size, train, seed,
                        augment=augment, drop_last=train)


def split_probe_pool(n: int, probe_size: int, seed: int = 0, from_union: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(probe_indices, pool_indices)`` over ``n`` training images.

    Default: the probe is held out, clients split the remaining pool. ``from_union=True`` (the paper's
    setting): the probe is drawn from the whole set and the pool is everything (clients may have seen it).
    """
    if n < 2:
        raise ValueError("need at least 2 training images")
    if not 2 <= probe_size <= (n if from_union else n - 1):
        raise ValueError(f"probe_size must be in [2, {n if from_union else n - 1}] for {n} images, "
                         f"got {probe_size}")
    perm = np.random.default_rng(np.random.SeedSequence([seed, 7919])).permutation(n)
    probe = np.sort(perm[:probe_size])
    pool = np.arange(n, dtype=np.int64) if from_union else np.sort(perm[probe_size:])
    return probe.astype(np.int64), pool.astype(np.int64)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
