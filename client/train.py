"""Local training (the paper's recipe as defaults); evaluation is in :mod:`fedmerge.common.task.evaluate`.

SGD with momentum 0.9 and weight decay 5e-4, learning rate warmed up linearly over the first
``warmup`` fraction of steps and then decayed linearly to zero, cross-entropy. CUDA when available.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmerge.common.progress import bar as progress_bar
from fedmerge.common.task.evaluate import default_device

__all__ = ["TrainConfig", "train", "lr_at"]


@dataclass
class TrainConfig:
    epochs: float = 1
    lr: float = 0.1
    batch_size: int = 128          # informative: the loader decides (paper: 500 on GPU)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.1            # fraction of all steps spent warming up
    label_smoothing: float = 0.0
    device: str | None = None
    seed: int = 0
    progress: bool = False         # a bar / progress lines (fedmerge.common.progress)
    desc: str = "train"            # the progress line's label
    max_steps: int | None = None   # cap (smoke runs)

    def __post_init__(self):
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay must be >= 0 and momentum in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def train(model: nn.Module, loader, cfg: TrainConfig) -> dict:
    """Train ``model`` in place on ``loader`` (yields (x, y)); returns a history dict."""
    dev = default_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(dev).train()
    if dev.type == "cuda" and callable(getattr(loader, "to", None)):
        loader.to(dev)  # an in-memory loader: batches and augmentation on the GPU, no host copies per step
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=False)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("training loader is empty")
    total = max(1, int(math.ceil(cfg.epochs * per_epoch)))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    bar = progress_bar(total, cfg.desc, "steps", enabled=cfg.progress)
    step, seen, loss_sum, correct, t0 = 0, 0, 0.0, 0, time.perf_counter()
    losses = []
    ep_seen, ep_loss, ep_hits = 0, 0.0, 0   # this epoch's, for the progress line
    while step < total:
        for x, y in loader:
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step}: loss {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv, hits, k = loss.item(), (out.argmax(1) == y).sum().item(), y.numel()
            seen, loss_sum, correct = seen + k, loss_sum + lv * k, correct + hits
            ep_seen, ep_loss, ep_hits = ep_seen + k, ep_loss + lv * k, ep_hits + hits
            bar.update(1)
            if step % max(1, per_epoch) == 0 or step == total:
                losses.append(loss_sum / max(1, seen))
                bar.set_postfix_str(f"epoch {step / per_epoch:.3g}/{cfg.epochs:g}: loss {ep_loss / ep_seen:.3f}, "
                                    f"train acc {100 * ep_hits / ep_seen:.1f}%")
                ep_seen, ep_loss, ep_hits = 0, 0.0, 0
    bar.close()
    model.eval()
    return {"steps": step, "samples": seen, "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen), "loss_curve": losses,
            "seconds": time.perf_counter() - t0}
