"""Training recipe, evaluation, ensemble and checkpoints (safetensors + JSON, no pickle)."""
import json

import numpy as np
import pytest
import torch

from fedmerge.client.train import TrainConfig, lr_at, train
from fedmerge.common.task.checkpoint import load_checkpoint, save_checkpoint
from fedmerge.common.task.data import load_dataset, make_loader, set_seed
from fedmerge.common.task.evaluate import ensemble_evaluate, evaluate
from fedmerge.common.task.models import ClassEmbeddingHead, build_model


def test_one_epoch_on_real_data_beats_chance():
    set_seed(0)
    tr = load_dataset("cifar10-mini", "train")
    te = load_dataset("cifar10-mini", "test")
    model = build_model("cnn", num_classes=10, width=0.5)
    hist = train(model, make_loader(tr, np.arange(3000), batch_size=64, train=True, seed=0),
                 TrainConfig(epochs=1, lr=0.05, seed=0))
    acc = evaluate(model, make_loader(te, None, batch_size=500))["accuracy"]
    assert hist["steps"] == 3000 // 64 and np.isfinite(hist["train_loss"])
    assert acc > 0.2, acc  # chance is 0.1


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(epochs=1, lr=0.4, warmup=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_bad_config():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))


def test_ensemble_and_checkpoint_round_trip(tmp_path):
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    a, b = build_model("cnn", width=0.25), build_model("cnn", width=0.25)
    ens = ensemble_evaluate([a, b], loader)
    la, lb = a(x), b(x)
    assert ens["accuracy"] == pytest.approx(((la + lb) / 2).argmax(1).eq(y).float().mean().item())
    st, js = save_checkpoint(a, tmp_path / "m", {"note": "x"})
    assert st.suffix == ".safetensors" and json.loads(js.read_text())["note"] == "x"
    b2, meta = load_checkpoint(tmp_path / "m")
    assert torch.allclose(b2(x), la.detach(), atol=1e-6)
    # a fixed class-embedding head survives the round trip too
    head = ClassEmbeddingHead.orthonormal(10, 16, seed=1)
    c = build_model("resnet20", width=0.25, head=head)
    save_checkpoint(c, tmp_path / "c")
    c2, _ = load_checkpoint(tmp_path / "c")
    c.eval()
    assert torch.allclose(c2(x[:4]), c(x[:4]), atol=1e-5)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")
