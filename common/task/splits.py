"""Seeded data splits: which training images each client gets.

Every split is a pure function of a label array (1-D integer ``np.ndarray`` of length ``n``), a number of
clients and a seed. It returns a list with one index array per client: ``np.int64``, sorted ascending, indices
into the label array. For every split except ``same`` clients never share an index and the union of the
clients' indices is ``0 .. n-1`` (every image goes to exactly one client); ``same`` is the one split where
clients share indices: every client gets all of ``0 .. n-1``. The same arguments always give the same split;
nothing global is touched (each call builds its own ``np.random.default_rng(seed)``).

Splits (names for :func:`make_split`, listed in :data:`SPLITS`):

``iid``
    A seeded shuffle cut into ``num_clients`` near-equal parts (sizes differ by at most one).
``80/20`` (alias ``eighty_twenty``)
    The CCA-Merge paper's two-party split, generalised to N clients; see :func:`eighty_twenty`.
``dirichlet``
    Per-class Dirichlet(alpha) proportions over clients (label skew); see :func:`dirichlet`.
``disjoint``
    Every client gets a disjoint set of whole classes; see :func:`disjoint`.
``same``
    Every client gets every image (the CCA-Merge paper's Table 1 and Fig. 4 regime: models trained on the
    same full training set); see :func:`same`. Clients then differ only in what they derive from their
    partition id: their seed, initialisation and data order.

The ``iid`` and ``dirichlet`` splits follow the semantics of flwr-datasets' ``IidPartitioner`` and
``DirichletPartitioner`` (per-class proportions drawn from ``Dir(alpha)``, redrawn until every partition has
a minimum size), but they operate on in-memory label arrays, so they need no HuggingFace ``datasets`` object
(``flwr_datasets`` and the ``datasets`` stack are not dependencies of this project). They are not
bit-for-bit the same draws as flwr-datasets, and flwr-datasets' optional "self balancing" is not applied.

:func:`split_summary` turns a split into a small JSON-serialisable dict (per-client sizes and class
histograms) for logs and ``result.json``.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

__all__ = ["SPLITS", "ALIASES", "iid", "eighty_twenty", "dirichlet", "disjoint", "same", "make_split",
           "split_summary"]

#: Canonical split names accepted by :func:`make_split`.
SPLITS: tuple[str, ...] = ("iid", "80/20", "dirichlet", "disjoint", "same")
#: Other spellings accepted by :func:`make_split`, mapped to their canonical name.
ALIASES: dict[str, str] = {"eighty_twenty": "80/20"}

#: Upper bound on the default ``min_size`` of :func:`dirichlet`.
DIRICHLET_MIN_SIZE = 10
#: Default number of Dirichlet draws before :func:`dirichlet` gives up.
DIRICHLET_MAX_TRIES = 1000


# ---------------------------------------------------------------------------------------------- validation

def _check_labels(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of integer class labels, got an array of shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float64: treat as empty int array
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"labels must be a 1-D array of integer class labels, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got minimum {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _check_num_clients(num_clients, n: int, shared: bool = False) -> int:
    """``shared``: every client gets every image (``same``), so only an empty label array empties a client."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral):
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}")
    k = int(num_clients)
    if k < 1:
        raise ValueError(f"num_clients must be >= 1, got {k}")
    if shared:
        if n == 0:
            raise ValueError("labels are empty: every client would be empty")
    elif k > n:
        raise ValueError(f"num_clients ({k}) is larger than the number of images ({n}): some client would be empty")
    return k


def _check_seed(seed):
    if seed is None or isinstance(seed, (bool, str, bytes)) or not isinstance(seed, (numbers.Integral, Sequence, np.ndarray)):
        raise ValueError(f"seed must be an integer (or a sequence of integers), got {seed!r}")
    return seed


def _prepare(labels, num_clients, seed, shared: bool = False) -> tuple[np.ndarray, int, np.random.Generator]:
    y = _check_labels(labels)
    k = _check_num_clients(num_clients, len(y), shared)
    return y, k, np.random.default_rng(_check_seed(seed))


def _finish(parts: list) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# ------------------------------------------------------------------------------------------------- splits

def iid(labels, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle all ``n`` indices with ``seed`` and cut them into ``num_clients`` near-equal parts.

    Sizes differ by at most one (the first ``n % num_clients`` clients get one more). Labels are ignored apart
    from validation; class proportions match the global ones only up to sampling noise.
    """
    y, k, rng = _prepare(labels, num_clients, seed)
    return _finish(np.array_split(rng.permutation(len(y)), k))


def eighty_twenty(labels, num_clients: int = 2, seed: int = 0, major: float = 0.8) -> list[np.ndarray]:
    """The CCA-Merge paper's 80/20 split, and its generalisation to ``num_clients`` clients.

    **Two clients (the paper's split).** The distinct classes, sorted, are divided into two halves (with an
    odd number of classes the first half has one class more). Client 0 gets ``major`` (80%) of the images of
    every class in the first half and ``1 - major`` (20%) of every class in the second half; client 1 gets the
    complement. Which images of a class go where is a seeded random choice.

    **N clients (this project's generalisation).** The sorted classes are divided into ``N`` near-equal
    contiguous groups (``np.array_split``: group sizes differ by at most one, larger groups first); group ``i``
    is client ``i``'s *own* group. For every class, client ``i`` whose group holds it gets ``major`` of its
    images, and the remaining ``1 - major`` is shared as equally as possible among the other ``N - 1``
    clients. For ``N = 2`` this is exactly the paper's split. For ``N = 1`` the single client gets everything.

    Rounding: a class with ``m`` images gives ``round(major * m)`` (halves rounded up) to its owner; the rest
    is dealt to the others in near-equal shares, the extra single images going to different clients from
    class to class (round robin), so counts are within one image of the exact fractions.

    Every image goes to exactly one client. Because ``major > 0.5`` every class present gives its owner at
    least one image, so no client is empty.

    Raises ``ValueError`` if ``major`` is not in ``(0.5, 1]`` or if ``num_clients`` exceeds the number of
    distinct classes (a client would own no class group).
    """
    y, k, rng = _prepare(labels, num_clients, seed)
    if isinstance(major, bool) or not isinstance(major, numbers.Real) or not (0.5 < float(major) <= 1.0):
        raise ValueError(f"major must be in (0.5, 1] (the share of its own classes a client gets), got {major!r}")
    major = float(major)
    classes = np.unique(y)
    if k > len(classes):
        raise ValueError(f"80/20 split: num_clients ({k}) is larger than the number of classes ({len(classes)}); "
                         "every client needs at least one class of its own")
    groups = np.array_split(classes, k)
    owner = {int(c): i for i, g in enumerate(groups) for c in g}
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for ci, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        m = len(idx)
        own = owner[int(c)]
        n_major = m if k == 1 else min(m, int(np.floor(major * m + 0.5)))
        parts[own].append(idx[:n_major])
        others = [j for j in range(k) if j != own]
        if not others:  # a single client gets everything
            continue
        # rotate which of the other clients receives the leftover single images from class to class
        r = ci % len(others)
        others = others[r:] + others[:r]
        for j, chunk in zip(others, np.array_split(idx[n_major:], len(others))):
            parts[j].append(chunk)
    return _finish([np.concatenate(p) if p else np.empty(0, np.int64) for p in parts])


def _default_min_size(n: int, k: int) -> int:
    return max(1, min(DIRICHLET_MIN_SIZE, n // (2 * k)))


def dirichlet(labels, num_clients: int, alpha: float = 0.5, seed: int = 0, min_size: int | None = None,
              max_tries: int = DIRICHLET_MAX_TRIES) -> list[np.ndarray]:
    """Label-skewed split: for every class, client proportions are drawn from ``Dir(alpha, ..., alpha)``.

    For each class (in sorted order) its images are shuffled and cut at the cumulative proportions of a fresh
    ``Dirichlet(alpha * ones(num_clients))`` draw. Small ``alpha`` (e.g. 0.1) gives very skewed clients (few
    classes each), large ``alpha`` (e.g. 100) approaches the IID class mix.

    If some client ends up with fewer than ``min_size`` images, all proportions are drawn again (from the same
    seeded generator, so the result stays deterministic), at most ``max_tries`` times in total; then a
    ``ValueError`` explains what to change. No client is ever empty: ``min_size`` is at least 1.

    ``min_size`` defaults to ``max(1, min(10, n // (2 * num_clients)))``: 10 images (as flwr-datasets'
    ``DirichletPartitioner``) for any realistic data set, fewer for tiny label arrays so that the constraint
    stays satisfiable (at most half the average client size).
    """
    y, k, rng = _prepare(labels, num_clients, seed)
    n = len(y)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0 (Dirichlet concentration), got {alpha!r}")
    if min_size is None:
        min_size = _default_min_size(n, k)
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1, got {min_size!r}")
    if min_size * k > n:
        raise ValueError(f"min_size ({min_size}) x num_clients ({k}) exceeds the number of images ({n})")
    if isinstance(max_tries, bool) or not isinstance(max_tries, numbers.Integral) or max_tries < 1:
        raise ValueError(f"max_tries must be an integer >= 1, got {max_tries!r}")

    classes = np.unique(y)
    # shuffle each class once; every try only redraws the proportions (cheap: sizes are checked first)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    counts = np.array([len(ix) for ix in per_class])
    for _ in range(int(max_tries)):
        props = rng.dirichlet(np.full(k, float(alpha)), size=len(classes))      # (C, k)
        cuts = np.floor(np.cumsum(props, axis=1) * counts[:, None]).astype(np.int64)
        cuts[:, -1] = counts                                                    # guard against float round-off
        cuts = np.maximum.accumulate(cuts, axis=1)
        sizes = np.diff(np.concatenate([np.zeros((len(classes), 1), np.int64), cuts], axis=1), axis=1).sum(0)
        if sizes.min() >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet split: no draw in {max_tries} tries gave every one of the {k} clients at least "
            f"{min_size} images (n={n}, {len(classes)} classes, alpha={alpha}); in the last draw the smallest had "
            f"{int(sizes.min())}. Raise alpha, lower min_size, use fewer clients or raise max_tries.")
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for ix, row in zip(per_class, cuts):
        for j, chunk in enumerate(np.split(ix, row[:-1])):
            parts[j].append(chunk)
    return _finish([np.concatenate(p) for p in parts])


def disjoint(labels, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Every client gets all images of a disjoint set of classes.

    The distinct classes are shuffled with ``seed`` and dealt into ``num_clients`` near-equal groups (the
    numbers of classes differ by at most one); client ``i`` gets every image whose label is in group ``i``.
    Raises ``ValueError`` if ``num_clients`` exceeds the number of distinct classes.
    """
    y, k, rng = _prepare(labels, num_clients, seed)
    classes = np.unique(y)
    if k > len(classes):
        raise ValueError(f"disjoint split: num_clients ({k}) is larger than the number of classes "
                         f"({len(classes)}); each client needs at least one class")
    groups = np.array_split(rng.permutation(classes), k)
    return _finish([np.flatnonzero(np.isin(y, g)) for g in groups])


def same(labels, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Every client gets every image: ``num_clients`` copies of ``0 .. n-1``.

    The regime of the CCA-Merge paper's Table 1 and Fig. 4 (models trained on the same full training set from
    different seeds). The split itself draws nothing (``seed`` is validated and otherwise unused): clients
    differ only in their own seed, initialisation and data order, which the client code derives from its
    partition id. This is the one split where clients share indices.
    """
    y, k, _ = _prepare(labels, num_clients, seed, shared=True)
    return _finish([np.arange(len(y))] * k)


# ------------------------------------------------------------------------------------------------- front end

def _canonical(kind) -> str:
    if not isinstance(kind, str):
        raise ValueError(f"split kind must be a string, one of {SPLITS} (aliases: {sorted(ALIASES)}), got {kind!r}")
    key = kind.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SPLITS:
        raise ValueError(f"unknown split kind {kind!r}; valid kinds: {', '.join(SPLITS)} "
                         f"(aliases: {', '.join(f'{a} = {c}' for a, c in ALIASES.items())})")
    return key


def make_split(kind: str, labels, num_clients: int, seed: int = 0, alpha: float = 0.5, **kw) -> list[np.ndarray]:
    """Split by name: ``kind`` in :data:`SPLITS` (or an alias from :data:`ALIASES`, case-insensitive).

    ``alpha`` is used by ``dirichlet`` only (and ignored, unvalidated, by the others, so callers can always
    pass their configured value). Extra keyword arguments go to the split function: ``major`` for ``80/20``,
    ``min_size`` / ``max_tries`` for ``dirichlet``.
    """
    key = _canonical(kind)
    if key == "same":
        return same(labels, num_clients, seed=seed, **kw)
    if key == "iid":
        return iid(labels, num_clients, seed=seed, **kw)
    if key == "80/20":
        return eighty_twenty(labels, num_clients, seed=seed, **kw)
    if key == "dirichlet":
        return dirichlet(labels, num_clients, alpha=alpha, seed=seed, **kw)
    return disjoint(labels, num_clients, seed=seed, **kw)


def split_summary(parts: Sequence[np.ndarray], labels, num_classes: int | None = None) -> dict:
    """Per-client sizes and class histograms of a split, as plain Python ints (JSON-serialisable).

    Returns ``{"num_clients", "num_images", "num_assigned", "num_distinct", "shared", "num_classes", "sizes",
    "class_counts", "classes_per_client"}``: ``class_counts[i][c]`` is the number of images of class ``c``
    client ``i`` holds, ``classes_per_client[i]`` the number of classes with at least one image there.
    ``num_assigned`` counts an image once per client holding it, ``num_distinct`` once; ``shared`` says
    whether some image is held by more than one client (only the ``same`` split does that, where
    ``num_assigned = num_clients * num_distinct``). ``num_classes`` defaults to ``max(labels) + 1``.
    """
    y = _check_labels(labels)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    elif isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if y.size and int(y.max()) >= num_classes:
        raise ValueError(f"labels go up to {int(y.max())} but num_classes is {num_classes}")
    hists = []
    held = np.zeros(len(y), dtype=np.int64)  # how many clients hold each image
    for i, p in enumerate(parts):
        p = np.asarray(p)
        if p.size and (not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= len(y)):
            raise ValueError(f"client {i}: indices must be integers in [0, {len(y)})")
        hists.append(np.bincount(y[p.astype(np.int64)], minlength=num_classes))
        np.add.at(held, p.astype(np.int64), 1)
    return {
        "num_clients": len(hists),
        "num_images": int(len(y)),
        "num_assigned": int(sum(int(h.sum()) for h in hists)),
        "num_distinct": int((held > 0).sum()),
        "shared": bool((held > 1).any()),
        "num_classes": num_classes,
        "sizes": [int(h.sum()) for h in hists],
        "class_counts": [[int(v) for v in h] for h in hists],
        "classes_per_client": [int((h > 0).sum()) for h in hists],
    }
