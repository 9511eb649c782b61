"""Evaluation shared by the server, the clients and the offline runs: test accuracy and loss of a model, of
the logit ensemble (the upper bound for merging). ``default_device`` (the one device rule: CUDA when present)
is :func:`fedmerge.common.engine.linalg.default_device`, re-exported here."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmerge.common.engine.linalg import default_device

__all__ = ["default_device", "predict_logits", "evaluate", "ensemble_evaluate"]


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    dev = default_device(device)
    was = model.training
    model.to(dev).eval()
    outs, ys = [], []
    for x, y in loader:
        outs.append(model(x.to(dev)).float().cpu())
        ys.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(ys)


def _metrics(logits: torch.Tensor, y: torch.Tensor) -> dict:
    return {"accuracy": (logits.argmax(1) == y).float().mean().item(),
            "loss": F.cross_entropy(logits, y).item(), "n": int(y.numel())}


def evaluate(model: nn.Module, loader, device=None) -> dict:
    """Accuracy (fraction), mean cross-entropy and sample count."""
    return _metrics(*predict_logits(model, loader, device))


def ensemble_evaluate(models: Sequence[nn.Module], loader, device=None) -> dict:
    """The logit ensemble (mean of the models' logits): the upper bound for merging."""
    preds = [predict_logits(m, loader, device) for m in models]
    return _metrics(torch.stack([p[0] for p in preds]).mean(0), preds[0][1])
