"""Choosing on the held-out probe slice: the score of a merged model (accuracy, or agreement with the ensemble
without labels), the probe's split, and the subset of models that chooses gamma (``gamma_clients``)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmerge.common.engine.linalg import default_device
from fedmerge.common.wire.probe import Batches, as_batches

__all__ = ["probe_logits", "probe_score", "resolve_probe", "check_gamma_clients", "selection_subset"]


@torch.no_grad()
def probe_logits(model: nn.Module, batches: Batches, device=None) -> torch.Tensor:
    """Logits of ``model`` on every probe batch (eval mode), on the CPU."""
    device = default_device(device)
    model.eval().to(device)
    out = torch.cat([model(x.to(device)).float().cpu() for x, _ in batches])
    return out


def probe_score(logits: torch.Tensor, batches: Batches, target_logits: torch.Tensor | None = None
                ) -> tuple[float, float]:
    """(primary, secondary) -- higher is better. Labels: (accuracy, -loss); no labels: agreement with the
    ensemble's predictions and -KL to its distribution."""
    if not torch.isfinite(logits).all():
        return (-math.inf, -math.inf)
    _, y = batches.tensors()
    if y is not None:
        return (float((logits.argmax(1) == y).float().mean()), -float(F.cross_entropy(logits, y)))
    p = F.softmax(target_logits, 1)
    return (float((logits.argmax(1) == p.argmax(1)).float().mean()),
            -float(F.kl_div(F.log_softmax(logits, 1), p, reduction="batchmean")))



def resolve_probe(probe, need_held: bool, held_out: float, seed: int) -> tuple[Batches, Batches | None]:
    if isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(p, Batches) for p in probe):
        return probe[0], (probe[1] if need_held else None)   # already split (fitting, held-out), as the strategy's
    batches = as_batches(probe)
    if not need_held:
        return batches, None
    return batches.split(held_out, seed)



def check_gamma_clients(k, method: str) -> None:
    """``gamma_clients`` must be None or an integer >= 2, with method ``cca`` (ValueError otherwise)."""
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"gamma_clients must be an integer >= 2 or None (all models), got {k!r}")
    if method != "cca":
        raise ValueError(f"gamma_clients applies to method 'cca' (all-to-one, from statistics), not {method!r}")


def selection_subset(n: int, reference: int, k, method: str, plan: bool) -> list[int] | None:
    """The models whose merge chooses gamma when ``gamma_clients=k``: the reference and k - 1 others evenly
    spaced over the rest in index order (None: all of them)."""
    if k is None:
        return None
    check_gamma_clients(k, method)
    if not plan:
        raise ValueError("gamma_clients needs CCA statistics")
    if k >= n:
        return None
    others = [i for i in range(n) if i != reference]
    return sorted([reference] + [others[(j * len(others)) // (k - 1)] for j in range(k - 1)])
