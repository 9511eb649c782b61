"""Learned refinements after the merge, on the server's probe: NP Merge (labelled) and distillation into the
ensemble (label-free). :func:`refine` runs them in that order on the model ``merge_from_statistics`` built.

- NP Merge (:mod:`~fedmerge.common.engine.npmerge`) learns per-parameter merge coefficients over the aligned
  models on the **labelled** probe. After REPAIR it starts at the repaired merge: REPAIR's per-unit maps are kept
  fixed around the learned combination.
- Distillation (:mod:`~fedmerge.common.engine.distill`) fits the merged model to the clients' logit ensemble on
  the **unlabelled** probe.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch.nn as nn

from fedmerge.common.engine.align import aligned_states
from fedmerge.common.engine.distill import distill as distill_into_ensemble
from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.methods import compute_alignment
from fedmerge.common.engine.npmerge import np_merge as learn_np_merge
from fedmerge.common.engine.repair import reset_bn_stats
from fedmerge.common.engine.stats import Statistics
from fedmerge.common.wire.probe import Batches

__all__ = ["refine", "check_refine"]


def check_refine(np_merge, distill, bn_fold: bool, fit: Batches | None, held: Batches | None,
                 teachers) -> None:
    """The refinements asked for can run (ValueError naming what is missing otherwise)."""
    for name, opt in (("np_merge", np_merge), ("distill", distill)):
        if not isinstance(opt, (bool, dict)):
            raise ValueError(f"{name} must be True/False or a dict of options, got {type(opt).__name__}")
    if bn_fold and np_merge:
        raise ValueError("bn_fold and np_merge cannot be combined (NP Merge learns the BatchNorm parameters)")
    if (np_merge or distill) and (fit is None or held is None):
        raise ValueError("np_merge and distill need a probe with a held-out slice on the server")
    if np_merge and not (fit.has_labels and held.has_labels):
        raise ValueError("np_merge needs a labelled probe (inputs and labels)")
    if distill and teachers is None:
        raise ValueError("distill needs the merged models themselves (the teachers)")


def refine(merged: nn.Module, info, *, template: nn.Module, states, spec: MergeSpec, stats: Statistics | None,
           method: str, reference: int, setting: dict, weights: Sequence[float], bn_eps: dict, fit: Batches,
           held: Batches, teachers, repair_affine: dict, np_merge: bool | dict, distill: bool | dict,
           bn_reset: bool, device, timings: dict) -> nn.Module:
    """NP Merge (when ``np_merge``) and then distillation (when ``distill``) of ``merged``; each one's record goes to
    ``info.np_merge`` / ``info.distill``, its seconds to ``timings["np_merge"]`` / ``timings["distill"]``.
    ``setting``: the method options the merge used (its chosen gamma)."""
    if np_merge:
        t = time.perf_counter()
        alignment = compute_alignment(method, spec, stats, states, reference, **setting)
        aligned = aligned_states(states, spec, alignment, bn_eps)
        del alignment
        opts = np_merge if isinstance(np_merge, dict) else {}
        merged, info.np_merge = learn_np_merge(template, aligned, weights, fit, held, device=device,
                                               affine=repair_affine or None, **opts)
        del aligned
        if bn_reset:
            reset_bn_stats(merged, fit, device)
        timings["np_merge"] = time.perf_counter() - t
    if distill:
        t = time.perf_counter()
        opts = distill if isinstance(distill, dict) else {}
        merged, info.distill = distill_into_ensemble(merged, teachers, fit, held, weights=weights, device=device,
                                                     **opts)
        timings["distill"] = time.perf_counter() - t
    return merged
