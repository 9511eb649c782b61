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
from fedmerge.common.engine.distill import check_distill_options
from fedmerge.common.engine.distill import distill as distill_into_ensemble
from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.methods import compute_alignment
from fedmerge.common.engine.npmerge import check_np_merge_options
from fedmerge.common.engine.npmerge import np_merge as learn_np_merge
from fedmerge.common.engine.repair import reset_bn_stats
from fedmerge.common.engine.selection import probe_logits, probe_score
from fedmerge.common.engine.stats import Statistics
from fedmerge.common.wire.probe import Batches

__all__ = ["refine", "check_refine", "enabled", "refine_options"]


def enabled(opt) -> bool:
    """Whether a refinement option asks for the step: ``True`` or a dict of options (an empty one: defaults)."""
    return opt is True or isinstance(opt, dict)


def refine_options(np_merge, distill) -> tuple[dict | None, dict | None]:
    """(NP Merge options, distillation options), each ``None`` (off) for ``False``/``None`` and the checked
    options dict for ``True`` (``{}``) or a dict; anything else, an unknown option or a bad value is a ValueError
    naming it."""
    out = []
    for name, opt, check in (("np_merge", np_merge, check_np_merge_options),
                             ("distill", distill, check_distill_options)):
        if opt is None or opt is False:
            out.append(None)
        elif opt is True:
            out.append({})
        elif isinstance(opt, dict):
            out.append(check(opt))
        else:
            raise ValueError(f"{name} must be True/False or a dict of options, got {type(opt).__name__}")
    return out[0], out[1]


def check_refine(np_merge, distill, bn_fold: bool, fit: Batches | None, held: Batches | None,
                 teachers) -> tuple[dict | None, dict | None]:
    """The refinements' options, checked (unknown names and bad values are ValueErrors naming them), and whether
    they can run here (ValueError naming what is missing); returns (NP Merge options, distillation options), each
    None when off."""
    np_opts, distill_opts = refine_options(np_merge, distill)
    if bn_fold and np_opts is not None:
        raise ValueError("bn_fold and np_merge cannot be combined (NP Merge learns the BatchNorm parameters)")
    if (np_opts is not None or distill_opts is not None) and (fit is None or held is None):
        raise ValueError("np_merge and distill need a probe with a held-out slice on the server")
    if np_opts is not None and not (fit.has_labels and held.has_labels):
        raise ValueError("np_merge needs a labelled probe (inputs and labels)")
    if distill_opts is not None and teachers is None:
        raise ValueError("distill needs the merged models themselves (the teachers)")
    return np_opts, distill_opts


def _held_loss(model: nn.Module, held: Batches, device) -> float:
    """Cross-entropy of ``model`` on the labelled held-out slice (``probe_score``'s secondary score, negated)."""
    return -probe_score(probe_logits(model, held, device), held)[1]


def refine(merged: nn.Module, info, *, template: nn.Module, states, spec: MergeSpec, stats: Statistics | None,
           method: str, reference: int, setting: dict, weights: Sequence[float], bn_eps: dict, fit: Batches,
           held: Batches, teachers, repair_affine: dict, np_merge: dict | None, distill: dict | None,
           bn_reset: bool, device, timings: dict) -> nn.Module:
    """NP Merge (options ``np_merge``, None: off) and then distillation (``distill``) of ``merged``; each one's record
    goes to ``info.np_merge`` / ``info.distill``, its seconds to ``timings["np_merge"]`` / ``timings["distill"]``.
    ``setting``: the method options the merge used (its chosen gamma). NP Merge's result replaces ``merged`` only
    when its held-out loss is lower (after the BatchNorm reset, for nets with BatchNorm: NP Merge's own early
    stopping sees averaged BatchNorm statistics); distillation starts from ``merged`` as it is and keeps it unless
    the KL to the ensemble on the held-out slice falls."""
    if np_merge is not None:
        t = time.perf_counter()
        alignment = compute_alignment(method, spec, stats, states, reference, **setting)
        aligned = aligned_states(states, spec, alignment, bn_eps)
        del alignment
        learned, info.np_merge = learn_np_merge(template, aligned, weights, fit, held, device=device,
                                                affine=repair_affine or None, **np_merge)
        del aligned
        if bn_reset:
            reset_bn_stats(learned, fit, device)
        before, after = _held_loss(merged, held, device), _held_loss(learned, held, device)
        info.np_merge.update({"held_loss_merge": before, "held_loss_np_merge": after, "kept": after < before})
        if after < before:
            merged = learned
        timings["np_merge"] = time.perf_counter() - t
    if distill is not None:
        t = time.perf_counter()
        merged, info.distill = distill_into_ensemble(merged, teachers, fit, held, weights=weights, device=device,
                                                     **distill)
        timings["distill"] = time.perf_counter() - t
    return merged
