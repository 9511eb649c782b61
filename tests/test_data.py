"""Data loading from every source, the embedded subset, loaders, augmentation, probe selection."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.common.task import data as D

SHARED = Path(os.environ.get("FEDMERGE_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
has_shared = pytest.mark.skipif(not (SHARED / "cifar10_jpeg.npz").exists(), reason="no ../shared/data here")


def test_embedded_subset_is_real_balanced_cifar10():
    tr = D.load_dataset("cifar10-mini", "train")
    te = D.load_dataset("cifar10-mini", "test")
    assert tr.x.shape == (8000, 32, 32, 3) and tr.x.dtype == np.uint8
    assert te.x.shape == (2000, 32, 32, 3)
    assert np.bincount(tr.y).tolist() == [800] * 10
    assert tr.source.startswith("embedded")
    # real photos: per-channel statistics close to CIFAR-10's
    mean = tr.x.reshape(-1, 3).mean(0) / 255
    assert np.allclose(mean, [0.491, 0.482, 0.447], atol=0.02)
    assert tr.classes[0] == "airplane" and len(tr.classes) == 10
    assert D.EMBEDDED.stat().st_size < 4_000_000


@has_shared
def test_shared_npz_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path / "cache"))
    te = D.load_dataset("cifar10", "test", data_root=str(SHARED))
    assert te.x.shape == (10000, 32, 32, 3) and np.bincount(te.y).tolist() == [1000] * 10
    assert te.source.startswith("npz:")
    mn = D.load_dataset("mnist", "test", data_root=str(SHARED))
    assert mn.x.shape == (10000, 28, 28, 1) and mn.y.max() == 9
    fm = D.load_dataset("fashion_mnist", "train", data_root=str(SHARED))
    assert fm.x.shape == (60000, 28, 28, 1)


@has_shared
def test_env_variable_points_at_data(monkeypatch):
    monkeypatch.setenv("FEDMERGE_DATA", str(SHARED))
    assert D.load_dataset("mnist", "test").source.startswith("npz:")


def test_torchvision_layout_source(tmp_path, monkeypatch):
    # write a tiny data set in torchvision's own CIFAR-10 layout and load it from there
    root = tmp_path / "tv"
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)],
                "batch_label": "x", "filenames": ["f"] * n}

    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(4), f)  # writing torchvision's format; fedmerge itself never unpickles its own data
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch(3), f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(D._CIFAR10_CLASSES)}, f)
    # torchvision checks the md5s of the official files; accept this synthetic copy
    import torchvision.datasets.cifar as tvc
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    ds = D.load_dataset("cifar10", "train", data_root=str(root))
    assert ds.x.shape == (20, 32, 32, 3) and ds.source.startswith("torchvision:")


def test_missing_dataset_error_lists_places(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMERGE_DATA", raising=False)
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("cifar100", "train", data_root=str(tmp_path / "nothing"))
    msg = str(e.value)
    assert "nothing" in msg and "cifar-100-python" in msg and "FEDMERGE_DATA" in msg
    with pytest.raises(ValueError, match="unknown data set"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("cifar10-mini", "validation")


def test_loader_normalises_augments_and_is_seeded():
    ds = D.load_dataset("cifar10-mini", "test")
    plain = D.make_loader(ds, np.arange(256), batch_size=100, train=False)
    x, y = next(iter(plain))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32
    allx = torch.cat([b[0] for b in plain])
    assert abs(allx.mean().item()) < 0.3 and 0.7 < allx.std().item() < 1.3
    a = D.make_loader(ds, np.arange(256), batch_size=64, train=True, seed=3)
    b = D.make_loader(ds, np.arange(256), batch_size=64, train=True, seed=3)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(a) == 4  # drop_last when training
    # augmentation changes images but keeps the label/image pairing (crop + flip of the same image)
    xa2, _ = next(iter(a))  # epoch 2: reshuffled
    assert not torch.equal(xa, xa2)
    aug = D._augment(x[:8], torch.Generator().manual_seed(0), flip=True)
    assert aug.shape == x[:8].shape and not torch.equal(aug, x[:8])


def test_augment_crop_is_a_shift():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = D._augment(x, torch.Generator().manual_seed(1), flip=False, pad=2)
    for i in range(2):
        # every output row is a contiguous window of an input row (or padding zeros)
        nz = out[i, 0][out[i, 0] != 0]
        assert set(nz.tolist()) <= set(x[i, 0].flatten().tolist())


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_loader_on_a_device_gives_the_same_seeded_batches(device):
    """``TensorLoader.to`` (used by training on a GPU) keeps shuffles, crops and flips: the random numbers
    come from the same CPU generator wherever the images live."""
    ds = D.load_dataset("cifar10-mini", "test")
    here = D.make_loader(ds, np.arange(200), batch_size=64, train=True, seed=5)
    there = D.make_loader(ds, np.arange(200), batch_size=64, train=True, seed=5)
    assert there.to(device) is there and there.x.device.type == device
    for _ in range(2):  # two epochs: the per-epoch reshuffle too
        for (xa, ya), (xb, yb) in zip(here, there):
            assert xb.device.type == device
            assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())


def test_probe_pool_split():
    probe, pool = D.split_probe_pool(1000, 100, seed=0)
    assert len(probe) == 100 and len(pool) == 900 and not set(probe) & set(pool)
    assert np.array_equal(probe, D.split_probe_pool(1000, 100, seed=0)[0])
    assert not np.array_equal(probe, D.split_probe_pool(1000, 100, seed=1)[0])
    probe_u, pool_u = D.split_probe_pool(1000, 100, seed=0, from_union=True)
    assert len(pool_u) == 1000 and set(probe_u) <= set(pool_u)
    with pytest.raises(ValueError, match="probe_size"):
        D.split_probe_pool(10, 10)


def test_bad_indices_and_empty():
    ds = D.load_dataset("cifar10-mini", "test")
    with pytest.raises(ValueError, match="out of range"):
        D.make_loader(ds, [0, 5000])
    with pytest.raises(ValueError, match="empty"):
        D.make_loader(ds, np.array([], dtype=np.int64))


def test_set_seed_is_deterministic():
    D.set_seed(5)
    a = torch.randn(3), np.random.rand()
    D.set_seed(5)
    b = torch.randn(3), np.random.rand()
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_test_subset_is_a_seeded_random_sample_of_every_class():
    """max_test takes a random subset (stored test sets can be sorted by class), the same for every party."""
    from fedmerge.common.task.config import FedConfig
    from fedmerge.common.task.loaders import test_loader

    cfg = FedConfig(dataset="cifar10-mini", max_test=300)
    ys = [torch.cat([y for _, y in test_loader(cfg)]) for _ in range(2)]
    assert len(ys[0]) == 300 and torch.equal(ys[0], ys[1])
    assert len(torch.unique(ys[0])) == 10
