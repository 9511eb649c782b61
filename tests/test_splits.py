"""Data splits: disjointness, coverage, determinism, the paper's 80/20 split, Dirichlet skew, validation."""
import json

import numpy as np
import pytest
import torch

from fedmerge.common.task.splits import (
    ALIASES,
    SPLITS,
    dirichlet,
    disjoint,
    eighty_twenty,
    iid,
    make_split,
    same,
    split_summary,
)

NUM_CLASSES = 10
BALANCED = np.repeat(np.arange(NUM_CLASSES), 500)              # 5000 images, 500 per class, sorted
SHUFFLED = np.random.default_rng(123).permutation(BALANCED)     # same multiset, labels in random order
KINDS = ["iid", "80/20", "dirichlet", "disjoint"]                # the partitioning splits (no shared index)


def class_counts(parts, labels, num_classes=NUM_CLASSES):
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def mean_tv(parts, labels, num_classes=NUM_CLASSES):
    """Mean over clients of the total-variation distance between the client's and the global class mix."""
    h = class_counts(parts, labels, num_classes).astype(float)
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(np.mean(0.5 * np.abs(h / h.sum(1, keepdims=True) - glob).sum(1)))


def test_splits_names():
    assert set(SPLITS) == set(KINDS) | {"same"}
    assert ALIASES["eighty_twenty"] == "80/20"


@pytest.mark.parametrize("labels", [BALANCED, SHUFFLED], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("num_clients", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_disjoint_and_covering(kind, num_clients, labels):
    parts = make_split(kind, labels, num_clients, seed=7, alpha=0.5)
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique"
        assert len(p) > 0, "no client may be empty"
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)), "an index is in two clients"
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed(kind):
    a = make_split(kind, SHUFFLED, 4, seed=3, alpha=0.5)
    b = make_split(kind, SHUFFLED, 4, seed=3, alpha=0.5)
    c = make_split(kind, SHUFFLED, 4, seed=4, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c)), "another seed must give another split"


def test_pure_no_global_state():
    np.random.seed(0)
    a = iid(SHUFFLED, 3, seed=1)
    np.random.seed(99)
    b = iid(SHUFFLED, 3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_iid_near_equal():
    parts = iid(BALANCED[:4999], 4, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 4999
    assert mean_tv(parts, BALANCED[:4999]) < 0.05


@pytest.mark.parametrize("labels", [BALANCED, SHUFFLED], ids=["sorted", "shuffled"])
def test_eighty_twenty_paper_two_clients(labels):
    a, b = eighty_twenty(labels, 2, seed=0)
    ha, hb = class_counts([a, b], labels)
    # 500 images per class: exactly 400/100, allow +-1 for rounding as the contract says
    assert np.all(np.abs(ha[:5] - 400) <= 1) and np.all(np.abs(ha[5:] - 100) <= 1)
    np.testing.assert_array_equal(ha + hb, 500)                 # B is the complement
    assert np.all(np.abs(hb[:5] - 100) <= 1) and np.all(np.abs(hb[5:] - 400) <= 1)
    # alias and make_split give the same thing
    for name in ("80/20", "eighty_twenty", "Eighty_Twenty"):
        same = make_split(name, labels, 2, seed=0, alpha=123.0)
        assert np.array_equal(same[0], a) and np.array_equal(same[1], b)


def test_eighty_twenty_odd_counts_and_major():
    labels = np.repeat(np.arange(4), [7, 11, 13, 3])
    a, b = eighty_twenty(labels, 2, seed=1, major=0.9)
    ha, hb = class_counts([a, b], labels, 4)
    exact = np.array([0.9 * 7, 0.9 * 11, 0.1 * 13, 0.1 * 3])
    assert np.all(np.abs(ha - exact) <= 1)
    np.testing.assert_array_equal(ha + hb, [7, 11, 13, 3])
    # major=1: each client gets exactly its own half of the classes
    a, b = eighty_twenty(BALANCED, 2, major=1.0)
    assert set(BALANCED[a]) == {0, 1, 2, 3, 4} and set(BALANCED[b]) == {5, 6, 7, 8, 9}


def test_eighty_twenty_n4_generalisation():
    parts = eighty_twenty(SHUFFLED, 4, seed=2)
    h = class_counts(parts, SHUFFLED)
    groups = np.array_split(np.arange(10), 4)                   # [0,1,2] [3,4,5] [6,7] [8,9]
    for i, g in enumerate(groups):
        others = [j for j in range(4) if j != i]
        for c in g:
            assert abs(h[i, c] - 400) <= 1                      # owner gets 80%
            share = h[others, c]
            assert share.sum() == 500 - h[i, c]                 # the rest goes to the others ...
            assert share.max() - share.min() <= 1               # ... shared equally (+-1)
            assert np.all(np.abs(share - 100 / 3) <= 1)
    np.testing.assert_array_equal(h.sum(0), 500)
    # with N clients every client's majority classes are exactly its own group
    for i, g in enumerate(groups):
        assert set(np.flatnonzero(h[i] > 250)) == set(g)


def test_eighty_twenty_uneven_classes_n3():
    labels = np.repeat(np.arange(5), 200)
    parts = eighty_twenty(labels, 3, seed=0, major=0.6)
    h = class_counts(parts, labels, 5)
    owner = [0, 0, 1, 1, 2]                                     # array_split(5 classes, 3) = [2, 2, 1]
    for c, i in enumerate(owner):
        assert h[i, c] == 120
        assert sorted(np.delete(h[:, c], i)) == [40, 40]


def test_dirichlet_skew_depends_on_alpha():
    skewed = dirichlet(SHUFFLED, 5, alpha=0.1, seed=0)
    flat = dirichlet(SHUFFLED, 5, alpha=100.0, seed=0)
    tv_skewed, tv_flat = mean_tv(skewed, SHUFFLED), mean_tv(flat, SHUFFLED)
    assert tv_skewed > 0.4, tv_skewed
    assert tv_flat < 0.1, tv_flat
    assert tv_skewed > 5 * tv_flat
    for parts in (skewed, flat):
        assert min(len(p) for p in parts) >= 10


def test_dirichlet_min_size_and_tiny_input():
    for seed in range(5):
        parts = dirichlet(SHUFFLED, 10, alpha=0.05, seed=seed, min_size=50)
        assert min(len(p) for p in parts) >= 50
    tiny = np.array([0, 0, 1, 1, 2, 2, 0, 1])                   # default min_size shrinks to 1 here
    parts = dirichlet(tiny, 4, alpha=1.0, seed=0)
    assert all(len(p) >= 1 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(tiny)))


def test_dirichlet_gives_up_with_clear_error():
    with pytest.raises(ValueError, match=r"no draw in 5 tries.*at least 400 images.*alpha"):
        dirichlet(SHUFFLED, 10, alpha=0.01, seed=0, min_size=400, max_tries=5)
    with pytest.raises(ValueError, match=r"min_size \(600\) x num_clients \(10\) exceeds"):
        dirichlet(SHUFFLED, 10, min_size=600)
    with pytest.raises(ValueError, match=r"min_size must be an integer >= 1"):
        dirichlet(SHUFFLED, 2, min_size=0)


def test_disjoint_class_sets():
    for n in (1, 3, 4, 10):
        parts = disjoint(SHUFFLED, n, seed=5)
        sets = [set(SHUFFLED[p].tolist()) for p in parts]
        assert all(sets), "each client needs at least one class"
        assert sum(len(s) for s in sets) == NUM_CLASSES         # pairwise disjoint and covering
        assert set().union(*sets) == set(range(NUM_CLASSES))
        sizes = [len(s) for s in sets]
        assert max(sizes) - min(sizes) <= 1
    # the seed decides which classes go together
    groups = {tuple(sorted(set(SHUFFLED[p].tolist()))) for s in range(5) for p in disjoint(SHUFFLED, 2, seed=s)}
    assert len(groups) > 2


def test_split_summary_json():
    parts = make_split("dirichlet", SHUFFLED, 3, seed=0)
    s = split_summary(parts, SHUFFLED)
    text = json.dumps(s)
    assert json.loads(text) == s
    assert s["num_clients"] == 3 and s["num_images"] == s["num_assigned"] == 5000
    assert s["num_classes"] == 10 and sum(s["sizes"]) == 5000
    np.testing.assert_array_equal(np.array(s["class_counts"]), class_counts(parts, SHUFFLED))
    assert s["classes_per_client"] == [int((np.array(r) > 0).sum()) for r in s["class_counts"]]
    s = split_summary(iid(SHUFFLED, 2), SHUFFLED, num_classes=12)
    assert len(s["class_counts"][0]) == 12 and all(isinstance(v, int) for v in s["class_counts"][0])
    with pytest.raises(ValueError, match="num_classes is 5"):
        split_summary(parts, SHUFFLED, num_classes=5)


@pytest.mark.parametrize("kind,labels,num_clients,kw,match", [
    ("iid", BALANCED, 0, {}, r"num_clients must be >= 1, got 0"),
    ("iid", BALANCED, -2, {}, r"num_clients must be >= 1"),
    ("iid", BALANCED[:5], 6, {}, r"num_clients \(6\) is larger than the number of images \(5\)"),
    ("iid", BALANCED, 2.0, {}, r"num_clients must be an integer"),
    ("dirichlet", BALANCED, 2, {"alpha": 0.0}, r"alpha must be a finite number > 0"),
    ("dirichlet", BALANCED, 2, {"alpha": -1.0}, r"alpha must be a finite number > 0.*got -1.0"),
    ("iid", BALANCED.reshape(50, 100), 2, {}, r"1-D array.*shape \(50, 100\)"),
    ("iid", BALANCED.astype(float), 2, {}, r"integer class labels, got dtype float64"),
    ("80/20", np.array(["a", "b", "a"]), 2, {}, r"integer class labels"),
    ("disjoint", BALANCED - 1, 2, {}, r"non-negative"),
    ("80/20", BALANCED, 2, {"major": 0.5}, r"major must be in \(0.5, 1\]"),
    ("80/20", BALANCED, 2, {"major": 1.2}, r"major must be in \(0.5, 1\].*1.2"),
    ("80/20", BALANCED, 11, {}, r"num_clients \(11\) is larger than the number of classes \(10\)"),
    ("disjoint", BALANCED, 11, {}, r"num_clients \(11\) is larger than the number of classes \(10\)"),
    ("iid", BALANCED, 2, {"seed": "x"}, r"seed must be an integer"),
])
def test_bad_inputs(kind, labels, num_clients, kw, match):
    with pytest.raises(ValueError, match=match):
        make_split(kind, labels, num_clients, **kw)


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown split kind 'pathological'.*iid, 80/20, dirichlet, disjoint"):
        make_split("pathological", BALANCED, 2)
    with pytest.raises(ValueError, match=r"split kind must be a string"):
        make_split(None, BALANCED, 2)


def test_alpha_ignored_by_other_kinds():
    # callers pass their configured alpha for every kind; only dirichlet validates/uses it
    a = make_split("iid", BALANCED, 2, seed=0, alpha=-1)
    assert all(np.array_equal(x, y) for x, y in zip(a, iid(BALANCED, 2, seed=0)))


# --- same: every client trains on every non-probe image (the paper's Table 1 / Fig. 4 regime) -----------------

@pytest.mark.parametrize("num_clients", [1, 2, 5])
def test_same_gives_every_client_every_index(num_clients):
    parts = make_split("same", SHUFFLED, num_clients, seed=3, alpha=-1)   # alpha ignored, as for the others
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        np.testing.assert_array_equal(p, np.arange(len(SHUFFLED)))
    assert parts[0] is not parts[-1] or num_clients == 1                 # independent arrays, not one aliased
    # the split draws nothing: another seed gives the same split; more clients than images is fine
    assert all(np.array_equal(a, b) for a, b in zip(parts, same(SHUFFLED, num_clients, seed=4)))
    assert [len(p) for p in same(np.array([2, 0]), 3)] == [2, 2, 2]
    s = split_summary(parts, SHUFFLED)
    assert s["sizes"] == [5000] * num_clients and s["num_distinct"] == 5000
    assert s["num_assigned"] == 5000 * num_clients and s["shared"] == (num_clients > 1)
    assert split_summary(iid(SHUFFLED, 3), SHUFFLED)["shared"] is False
    with pytest.raises(ValueError, match="labels are empty"):
        same(np.array([], dtype=np.int64), 2)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        same(SHUFFLED, 0)


def test_same_split_clients_differ_only_in_seed_init_and_order():
    """Through the federated task: each client's partition is every non-probe training image, and the seeds
    the ClientApp derives from its partition id (client/app.py: init ``seed * 1000 + pid``, data order
    ``seed * 1000 + pid + 7919 * round``) give different initialisations and different first batches."""
    from fedmerge.common.task.config import FedConfig
    from fedmerge.common.task.data import split_probe_pool
    from fedmerge.common.task.loaders import (
        build_global_model,
        client_partition,
        train_loader,
    )

    cfg = FedConfig(dataset="cifar10-mini", split="same", num_clients=2, probe_size=500, arch="cnn", width=0.25,
                    batch_size=32, seed=5)
    probe, pool = split_probe_pool(8000, cfg.probe_size, cfg.seed)
    parts = [client_partition(cfg, pid, 2) for pid in range(2)]
    for idx in parts:
        np.testing.assert_array_equal(idx, pool)                           # all 7,500 non-probe images
    assert len(np.intersect1d(parts[0], probe)) == 0
    rnd = 1
    first = [next(iter(train_loader(cfg, pid, 2, seed=cfg.seed * 1000 + pid + 7919 * rnd))) for pid in range(2)]
    assert not torch.equal(first[0][0], first[1][0])
    inits = [build_global_model(cfg, seed=cfg.seed * 1000 + pid).state_dict() for pid in range(2)]
    assert inits[0].keys() == inits[1].keys()
    assert any(not torch.equal(inits[0][k], inits[1][k]) for k in inits[0] if inits[0][k].is_floating_point())
    # the same seed gives the same first batch and init (so the difference comes from the seed alone)
    again = next(iter(train_loader(cfg, 0, 2, seed=cfg.seed * 1000 + 7919 * rnd)))
    assert torch.equal(again[0], first[0][0]) and torch.equal(again[1], first[0][1])
    assert all(torch.equal(v, build_global_model(cfg, seed=cfg.seed * 1000).state_dict()[k])
               for k, v in inits[0].items())


def test_same_split_with_a_training_cap_gives_every_client_the_same_images():
    from fedmerge.common.task.config import FedConfig
    from fedmerge.common.task.loaders import client_partition

    cfg = FedConfig(dataset="cifar10-mini", split="same", num_clients=3, probe_size=500, max_train=300, seed=2)
    parts = [client_partition(cfg, pid, 3) for pid in range(3)]
    assert len(parts[0]) == 300 and all(np.array_equal(parts[0], p) for p in parts[1:])
    other = FedConfig(dataset="cifar10-mini", split="iid", num_clients=3, probe_size=500, max_train=300, seed=2)
    assert len({tuple(client_partition(other, pid, 3)) for pid in range(3)}) == 3  # disjoint splits still differ
