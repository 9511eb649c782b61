"""The public merging API: ``merge_models`` and ``collect_statistics``.

    merged = merge_models(models, probe, method="cca", reference=0, gamma="auto",
                          bn_reset=None, repair=False, weights=None)

Steps: derive the merge spec from ``torch.fx``; split the probe into a fitting part and a held-out part
when something must be selected (``gamma="auto"``, ZipIt!'s ``alpha``/``beta`` when not given,
``reference="best"``); collect statistics; compute the alignment with the chosen method; align and average;
reset BatchNorm statistics (default for nets with BN) or apply REPAIR (nets without BN).
:func:`merge_from_statistics` does the same from statistics computed elsewhere (the Flower server, with
statistics uploaded by clients).

The pieces: the matching methods and their registry (:mod:`~fedmerge.common.engine.methods`: ``METHODS``,
``compute_alignment``, ``selection_candidates``), the held-out scoring (:mod:`~fedmerge.common.engine.selection`),
BatchNorm reset and REPAIR (:mod:`~fedmerge.common.engine.repair`) and the align/average step
(:mod:`~fedmerge.common.engine.align`); their public names are re-exported here.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from fedmerge.common.engine.align import (
    accumulate,
    aligned_row,
    finish_average,
    fold_batchnorm,
    unit_batchnorm,
)
from fedmerge.common.engine.graph import MergeSpec, derive_spec
from fedmerge.common.engine.linalg import default_device, single_threaded
from fedmerge.common.engine.methods import (
    GAMMA_GRID,
    METHODS,
    ZIPIT_GRID,
    compute_alignment,
    selection_candidates,
)
from fedmerge.common.engine.refine import check_refine, enabled, refine
from fedmerge.common.engine.repair import (
    REPAIR_TARGETS,
    add_repair_targets,
    check_repair_target,
    has_batchnorm,
    output_moments,
    repair_layers,
    repair_target_weights,
    repair_to,
    reset_bn_stats,
)
from fedmerge.common.engine.selection import (
    check_gamma_clients,
    probe_logits,
    probe_score,
    resolve_probe,
    selection_subset,
)
from fedmerge.common.engine.stats import Moments, Statistics, collect_statistics
from fedmerge.common.wire.probe import Batches

__all__ = ["merge_models", "collect_statistics", "merge_from_statistics", "reset_bn_stats", "has_batchnorm",
           "METHODS", "MergeInfo", "GAMMA_GRID", "ZIPIT_GRID", "REPAIR_TARGETS", "probe_logits", "probe_score",
           "selection_candidates", "repair_target_weights", "compute_alignment", "check_gamma_clients"]


@dataclass
class MergeInfo:
    method: str
    reference: int
    gamma: float | None = None
    gamma_scores: dict[float, tuple[float, float]] = field(default_factory=dict)
    # what was chosen on the held-out probe slice ({"gamma": g}, or ZipIt!'s {"alpha": a, "beta": b}; empty when
    # nothing was), and every candidate tried with its (primary, secondary) held-out score
    params: dict[str, float] = field(default_factory=dict)
    param_scores: list[tuple[dict[str, float], tuple[float, float]]] = field(default_factory=list)
    reference_scores: list[float] = field(default_factory=list)
    bn_reset: bool = False
    repair: bool = False
    repair_target: str | None = None  # "average" | "reference" when repair is on
    bn_fold: bool = False  # BatchNorms folded into their producers before aligning
    timings: dict[str, float] = field(default_factory=dict)
    np_merge: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    selected_on: list[int] | None = None  # gamma_clients: the models whose merge chose gamma (None: all)


def _validate(models: Sequence[nn.Module], weights) -> list[float]:
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ValueError("merge_models needs a list of at least 2 models")
    cls = type(models[0])
    ref = models[0].state_dict()
    for i, m in enumerate(models[1:], 1):
        if type(m) is not cls:
            raise ValueError(f"model {i} is a {type(m).__name__}, model 0 a {cls.__name__}: one architecture only")
        sd = m.state_dict()
        if sd.keys() != ref.keys():
            raise ValueError(f"model {i} has different parameter names than model 0: "
                             f"{sorted(set(sd) ^ set(ref))[:5]}")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise ValueError(f"model {i} parameter '{k}' has shape {tuple(v.shape)}, model 0 {tuple(ref[k].shape)}")
    for i, m in enumerate(models):
        for k, v in m.state_dict().items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"model {i} parameter '{k}' has non-finite values")
    if weights is None:
        return [1.0 / len(models)] * len(models)
    w = [float(x) for x in weights]
    if len(w) != len(models) or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {weights}")
    return [x / sum(w) for x in w]


def merge_models(models: Sequence[nn.Module], probe: Any, method: str = "cca", reference: int | str = 0,
                 gamma: float | str = "auto", bn_reset: bool | None = None, repair: bool = False,
                 weights: Sequence[float] | None = None, *, repair_target: str = "average", device=None,
                 held_out: float = 0.2, seed: int = 0,
                 gamma_grid: Sequence[float] = GAMMA_GRID, return_info: bool = False, np_merge: bool | dict = False,
                 residual_sites: str = "all", bn_fold: bool = False, gamma_clients: int | None = None,
                 distill: bool | dict = False, **method_kwargs):
    """Merge ``models`` (one architecture, any traceable model of supported layers) into one.

    method: ``avg``, ``permute``, ``weight_matching``, ``ot``, ``zipit``, ``merge_many``, ``cca``, ``gcca``.
    reference: index of the model all others are aligned to, or ``"best"`` (best on a held-out probe slice).
    gamma: CCA regularisation relative to the unit scale, or ``"auto"`` (chosen on a held-out probe slice).
    probe: inputs (a tensor, an ``(x, y)`` pair, a DataLoader or Batches), split here into a fitting part and a
        held-out part (``held_out``, ``seed``) where something is chosen; or a ``(fit, held_out)`` pair of Batches
        already split (e.g. ``fedmerge.common.task.loaders.probe_batches``, the slices a federation uses).
    Method options go in ``method_kwargs`` (e.g. OT's ``cost``/``reg``, ZipIt!'s ``alpha``/``beta``); ZipIt!'s
    ``alpha`` and ``beta`` left out are chosen on the held-out probe slice over :data:`ZIPIT_GRID`, as gamma is
    (see :func:`selection_candidates`; the choice is in ``MergeInfo.params``).
    bn_reset: re-estimate BatchNorm statistics on the probe (default: when the model has BatchNorm).
    repair: REPAIR (give each merged unit a target pre-activation mean and std; for nets without BN).
    repair_target: what REPAIR restores (:data:`REPAIR_TARGETS`): ``"average"`` (default) the merge-weighted
        average of the aligned models' per-unit mean and variance; ``"reference"`` the (aligned) reference
        model's own, as the paper's App. D. Checked even when ``repair`` is off.
    weights: per-model averaging weights (e.g. client sample counts), normalised.
    np_merge: after alignment, learn per-parameter merge coefficients on the labelled probe (NP Merge;
        True or a dict of options for :func:`fedmerge.common.engine.npmerge.np_merge`). With ``repair`` it runs
        after REPAIR, starting at the repaired merge. Uses labels.
    distill: last, fit the merged model to the models' logit ensemble on the unlabelled probe (label-free; True
        or a dict of options for :func:`fedmerge.common.engine.distill.distill`).
    bn_fold: fold every BatchNorm into the conv/linear that feeds it before aligning (exact for any transform;
        without it BatchNorm vectors are transformed like units, exact only for permutations and rescalings),
        and no BatchNorm reset afterwards (the merged model is the average of the aligned folded models; with
        ``repair`` the folded BatchNorms are set to the REPAIR targets). For nets with BatchNorm.
    residual_sites: where residual streams are measured (:func:`fedmerge.common.engine.graph.derive_spec`): ``"all"``
        their states after every block, pooled, or ``"last"`` the stream's end only.
    gamma_clients: CCA with ``gamma="auto"`` only: choose gamma by merging the reference with ``gamma_clients - 1``
        of the other models (evenly spaced in index order, weights renormalised) instead of all of them, then
        merge every model with the chosen gamma. The grid costs one SVD per model, group and gamma: with
        ``k < N`` the choice costs ``k`` models' worth of them instead of ``N`` (a different choice is possible:
        it is made on fewer models). ``None`` (default): all models; an integer below 2 is an error.
    Returns the merged model (same class as ``models[0]``), and a :class:`MergeInfo` if ``return_info``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    check_repair_target(repair_target)
    w = _validate(models, weights)
    if not (reference == "best" or (isinstance(reference, int) and 0 <= reference < len(models))):
        raise ValueError(f"reference must be a model index in [0, {len(models)}) or 'best', got {reference!r}")
    auto_gamma = gamma == "auto" and METHODS[method].tunable_gamma
    if isinstance(gamma, str) and gamma != "auto":
        raise ValueError(f"gamma must be a number >= 0 or 'auto', got {gamma!r}")
    if not isinstance(gamma, str) and (not math.isfinite(float(gamma)) or float(gamma) < 0):
        raise ValueError(f"gamma must be a number >= 0 or 'auto', got {gamma!r}")
    dev = default_device(device)
    t0 = time.perf_counter()
    select = bool(selection_candidates(method, gamma, method_kwargs, gamma_grid))
    fit, held = resolve_probe(probe, select or reference == "best" or enabled(np_merge) or enabled(distill),
                              held_out, seed)
    spec = derive_spec(models[0], fit.example(), residual_sites=residual_sites)
    timings = {"spec": time.perf_counter() - t0}

    ensemble = None
    if held is not None and not held.has_labels:
        ensemble = torch.stack([probe_logits(m, held, dev) for m in models]).mean(0)
    ref_scores = []
    if reference == "best":
        t = time.perf_counter()
        ref_scores = [probe_score(probe_logits(m, held, dev), held, ensemble)[0] for m in models]
        reference = max(range(len(models)), key=lambda i: ref_scores[i])
        timings["select_reference"] = time.perf_counter() - t

    stats = None
    pairs = METHODS[method].pairs
    if pairs is not None:
        t = time.perf_counter()
        stats = collect_statistics(models, fit, reference=reference, pairs=pairs, spec=spec, device=dev)
        timings["statistics"] = time.perf_counter() - t
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    merged, info = merge_from_statistics(
        models[reference], states, spec, stats, method=method, reference=reference,
        gamma=("auto" if auto_gamma else (None if isinstance(gamma, str) else gamma)), weights=w, bn_reset=bn_reset,
        repair=repair, repair_target=repair_target, reset_batches=fit, eval_batches=held, eval_target=ensemble,
        gamma_grid=gamma_grid, device=dev,
        repair_models=models, np_merge=np_merge, bn_fold=bn_fold, gamma_clients=gamma_clients, distill=distill,
        **method_kwargs)
    info.reference_scores = ref_scores
    info.timings = {**timings, **info.timings, "total": time.perf_counter() - t0}
    return (merged, info) if return_info else merged


def merge_from_statistics(template: nn.Module, states, spec: MergeSpec, stats: Statistics | None, *,
                          method: str = "cca", reference: int = 0, gamma: float | str = 0.1,
                          weights: Sequence[float] | None = None, bn_reset: bool | None = None,
                          repair: bool = False, repair_target: str = "average",
                          reset_batches: Batches | None = None,
                          eval_batches: Batches | None = None, eval_target: torch.Tensor | None = None,
                          gamma_grid: Sequence[float] = GAMMA_GRID, device=None, repair_models=None,
                          np_merge: bool | dict = False, bn_fold: bool = False, gamma_clients: int | None = None,
                          distill: bool | dict = False, **method_kwargs) -> tuple[nn.Module, MergeInfo]:
    """Merge given parameter dicts from precomputed statistics; ``template`` gives the architecture.
    ``repair_target``, ``gamma_clients``, ``np_merge`` and ``distill`` as in :func:`merge_models`; ``repair_models``
    (the models themselves, read one at a time) serve REPAIR and are distillation's teachers."""
    check_repair_target(repair_target)
    dev = default_device(device)
    n = len(states)
    w = weights or [1.0 / n] * n
    fold = bool(bn_fold) and has_batchnorm(template)
    bn = (has_batchnorm(template) if bn_reset is None else bool(bn_reset)) and not fold
    if bn and reset_batches is None:
        raise ValueError("bn_reset needs probe batches to re-estimate BatchNorm statistics")
    bn_eps = {name: m.eps for name, m in template.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if fold:
        states = [fold_batchnorm(s, spec, bn_eps) for s in states]
    info = MergeInfo(method=method, reference=reference, bn_reset=bn, repair=repair,
                     repair_target=repair_target if repair else None, bn_fold=fold)
    np_opts, distill_opts = check_refine(np_merge, distill, fold, reset_batches, eval_batches, repair_models)
    timings = {"transforms": 0.0, "apply": 0.0, "bn_reset": 0.0, "repair": 0.0, "evaluate": 0.0}
    if repair and (repair_models is None or reset_batches is None):
        raise ValueError("repair needs the endpoint models and probe batches")

    candidates = selection_candidates(method, gamma, method_kwargs, gamma_grid)
    if candidates:
        if eval_batches is None:
            raise ValueError(f"choosing {' and '.join(candidates[0])} (gamma='auto', or ZipIt!'s alpha/beta left "
                             "out) needs a held-out probe slice; pass the values to fix them")
        settings = candidates
    else:
        info.gamma = float(gamma) if METHODS[method].tunable_gamma else None
        settings = [{"gamma": info.gamma} if METHODS[method].tunable_gamma else {}]
    plan = METHODS[method].rows is not None and stats is not None
    subset = selection_subset(n, reference, gamma_clients, method, plan)
    subset = subset if candidates else None
    repair_names = repair_layers(spec, folded_bn=fold) if repair else []
    moments: dict[int, dict[str, Moments]] = {}

    def add_targets(targets: dict, i: int, row: dict, weight: float) -> None:
        """Model i's aligned output statistics into REPAIR's targets; its moments do not depend on the setting,
        so each model runs over the probe once whatever the number of settings."""
        if not repair or weight == 0:
            return
        t = time.perf_counter()
        if i not in moments:
            m = repair_models[i]
            orig = next(iter(m.parameters())).device
            moments[i] = output_moments(m, repair_names, reset_batches, dev)
            m.to(orig)
        add_repair_targets(targets, spec, repair_names, row, moments[i], weight)
        timings["repair"] += time.perf_counter() - t

    def merged_states(models: list[int], settings: list[dict]):
        """(setting, merged parameters, REPAIR targets) of ``models`` (indices; the reference among them, their
        weights renormalised) for every setting, in order. Models are aligned and averaged one at a time into a
        running sum (never N aligned copies). CCA: model by model, every setting from one decomposition of each
        covariance (:func:`~fedmerge.common.engine.matching.cca_rows`); other methods: setting by setting, one
        alignment at a time."""
        total_w = sum(w[i] for i in models) if len(models) < n else 1.0   # all: the weights as given
        wts = {i: w[i] / total_w for i in models}
        tw = dict(zip(models, repair_target_weights([wts[i] for i in models], repair_target,
                                                    models.index(reference))))
        if plan:
            t = time.perf_counter()
            workers = torch.get_num_threads()
            with single_threaded():
                rows = METHODS[method].rows(stats, spec, reference, [p["gamma"] for p in settings], **method_kwargs)
            timings["transforms"] += time.perf_counter() - t

            def one(i: int):   # model i's transforms and its aligned parameters for every setting (a worker)
                t0 = time.perf_counter()
                row = rows.row(i)
                t1 = time.perf_counter()
                aligned = [aligned_row(states[i], spec, r, bn_eps) for r in row]
                return row, aligned, t1 - t0, time.perf_counter() - t1

            sums: list = [None] * len(settings)
            targets: list[dict] = [{} for _ in settings]
            with single_threaded(), ThreadPoolExecutor(workers) as pool:
                for i, (row, aligned, dt_transforms, dt_apply) in zip(models, _in_order(pool, one, models, workers)):
                    timings["transforms"] += dt_transforms   # summed over the workers
                    timings["apply"] += dt_apply
                    t = time.perf_counter()
                    for c in range(len(settings)):   # in model order, whichever worker finished first
                        sums[c] = accumulate(sums[c], aligned[c], wts[i])
                    timings["apply"] += time.perf_counter() - t
                    for c in range(len(settings)):
                        add_targets(targets[c], i, row[c], tw[i])
                    del row, aligned
            for c, params in enumerate(settings):
                total, sums[c] = sums[c], None
                yield params, finish_average(total, states[reference]), targets[c]
            return
        for params in settings:
            t = time.perf_counter()
            alignment = compute_alignment(method, spec, stats, states, reference, **method_kwargs, **params)
            timings["transforms"] += time.perf_counter() - t
            total, targets = None, {}
            for i in models:
                row = {g: pairs[i] for g, pairs in alignment.items()}
                t = time.perf_counter()
                total = accumulate(total, aligned_row(states[i], spec, row, bn_eps), wts[i])
                timings["apply"] += time.perf_counter() - t
                add_targets(targets, i, row, tw[i])
            del alignment
            yield params, finish_average(total, states[reference]), targets

    def build(merged_sd, targets) -> tuple[nn.Module, dict]:
        """The merged model from averaged parameters, REPAIRed (its per-unit maps returned) or BN-reset."""
        t = time.perf_counter()
        if fold:
            merged_sd = unit_batchnorm(merged_sd, spec, bn_eps)
        model = copy.deepcopy(template).cpu()
        model.load_state_dict(merged_sd)
        timings["apply"] += time.perf_counter() - t
        affine: dict = {}
        if repair:
            t = time.perf_counter()
            repair_to(model, repair_names, targets, reset_batches, dev, affine=affine)
            timings["repair"] += time.perf_counter() - t
        if bn:
            t = time.perf_counter()
            reset_bn_stats(model, reset_batches, dev)
            timings["bn_reset"] += time.perf_counter() - t
        return model, affine

    t0 = time.perf_counter()
    best = None
    everyone = list(range(n))
    for params, merged_sd, targets in merged_states(subset or everyone, settings):
        model, affine = build(merged_sd, targets)
        del merged_sd
        if not candidates:
            best = (None, params, model, affine)
            continue
        t = time.perf_counter()
        score = probe_score(probe_logits(model, eval_batches, dev), eval_batches, eval_target)
        timings["evaluate"] += time.perf_counter() - t
        info.param_scores.append((params, score))
        if best is None or score > best[0]:
            best = (score, params, model, affine)
    merged, used, affine = best[2], best[1], best[3]
    if candidates:
        info.params = used
        if METHODS[method].tunable_gamma:
            info.gamma = used["gamma"]
            info.gamma_scores = {p["gamma"]: sc for p, sc in info.param_scores}
        timings["select_gamma" if METHODS[method].tunable_gamma else "select_params"] = time.perf_counter() - t0
    if subset is not None:   # chosen on a subset: now every model with the chosen setting
        info.selected_on = subset
        del merged, best
        t = time.perf_counter()
        (_, merged_sd, targets), = merged_states(everyone, [used])
        merged, affine = build(merged_sd, targets)
        timings["merge_all"] = time.perf_counter() - t
    if np_opts is not None or distill_opts is not None:
        merged = refine(merged, info, template=template, states=states, spec=spec, stats=stats, method=method,
                        reference=reference, setting={**method_kwargs, **used}, weights=w, bn_eps=bn_eps,
                        fit=reset_batches, held=eval_batches, teachers=repair_models, repair_affine=affine,
                        np_merge=np_opts, distill=distill_opts, bn_reset=bn, device=dev, timings=timings)
    for k, v in merged.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FloatingPointError(f"merge produced non-finite values in '{k}'")
    info.timings = timings
    return merged.cpu().eval(), info



def _in_order(pool: ThreadPoolExecutor, fn, items, window: int):
    """``fn`` over ``items`` on ``pool``, results yielded in the items' order, at most ``window`` + 1 in flight (so
    that at most that many models' results are held at once)."""
    items = iter(items)
    running = deque(pool.submit(fn, x) for x in itertools.islice(items, max(1, window)))
    while running:
        done = running.popleft()
        running.extend(pool.submit(fn, x) for x in itertools.islice(items, 1))
        yield done.result()
