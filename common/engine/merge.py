"""The public merging API: ``merge_models`` and ``collect_statistics``.

    merged = merge_models(models, probe, method="cca", reference=0, gamma="auto",
                          bn_reset=None, repair=False, weights=None)

Steps: derive the merge spec from ``torch.fx``; split the probe into a fitting part and a held-out part
when something must be selected (``gamma="auto"``, ZipIt!'s ``alpha``/``beta`` when not given,
``reference="best"``); collect statistics; compute the alignment with the chosen method; align and average;
reset BatchNorm statistics (default for nets with BN) or apply REPAIR (nets without BN).
:func:`merge_from_statistics` does the same from statistics computed elsewhere (the Flower server, with
statistics uploaded by clients).
"""
from __future__ import annotations

import copy
import importlib
import itertools
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmerge.common.engine.align import align_state, fold_batchnorm, unit_batchnorm
from fedmerge.common.engine.graph import FIXED, MergeSpec, derive_spec
from fedmerge.common.engine.stats import Moments, Statistics, collect_statistics
from fedmerge.common.wire.probe import Batches, as_batches

from . import matching

__all__ = ["merge_models", "collect_statistics", "merge_from_statistics", "reset_bn_stats", "METHODS",
           "MergeInfo", "GAMMA_GRID", "ZIPIT_GRID", "REPAIR_TARGETS", "probe_logits", "probe_score",
           "selection_candidates", "repair_target_weights"]

GAMMA_GRID = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0)
#: ZipIt!'s (alpha, beta) candidates, chosen on the held-out probe slice as gamma is for CCA. A 4 x 4 subset of
#: upstream's search grid (ZipIt! ``hyperparameter_testing.py``: a in {1e-4, .01, .1, .3, .5, 1}, b in {0, .0375,
#: .075, .125, .25, 1}; our alpha = 0 stands for their 1e-4), so that the tuning costs at most ~3x CCA's six
#: gammas. It holds upstream's default (0.3, 0.125), a pure cross-model matching (0, 0) and this project's
#: former fixed setting (0, 1). ``beta`` is upstream's b (see :func:`fedmerge.common.engine.baselines.zipit_group`).
ZIPIT_GRID = (("alpha", (0.0, 0.1, 0.3, 1.0)), ("beta", (0.0, 0.125, 0.25, 1.0)))
#: What REPAIR gives every merged unit (``repair_target``): ``"average"`` the (merge-weighted) average of the
#: aligned models' pre-activation mean and variance (REPAIR as Jordan et al. 2023 define it for interpolation;
#: this project's behaviour since REPAIR was added); ``"reference"`` the aligned reference model's own mean and
#: variance (CCA Merge, App. D: the merged model's statistics are repaired to the reference's).
REPAIR_TARGETS = ("average", "reference")


@dataclass(frozen=True)
class Method:
    needs: str  # "none" | "stats" (reference pairs) | "stats_all" (all pairs) | "weights"
    target: str  # "module:function"
    tunable_gamma: bool = False
    # method options chosen on the held-out probe slice when the caller leaves them out: (name, candidates)
    tuned: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def fn(self) -> Callable:
        mod, name = self.target.split(":")
        return getattr(importlib.import_module(mod, __package__), name)


METHODS: dict[str, Method] = {
    "avg": Method("none", ".matching:identity_alignment"),
    "permute": Method("stats", ".matching:match_permute"),
    "cca": Method("stats", ".matching:match_cca", tunable_gamma=True),
    "ot": Method("stats", ".baselines:match_ot"),
    "zipit": Method("stats_all", ".baselines:match_zipit", tuned=ZIPIT_GRID),
    "gcca": Method("stats_all", ".gcca:match_gcca", tunable_gamma=True),
    "weight_matching": Method("weights", ".baselines:match_weights"),
    "merge_many": Method("weights", ".baselines:match_merge_many"),
}


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


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Batches, device=None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average)."""
    dev = _device(device)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    orig_device = next(iter(model.parameters())).device
    model.eval().to(dev)
    saved = []
    for bn in bns:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for x, _ in batches:
        model(x.to(dev))
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    return model.eval().to(orig_device)


@torch.no_grad()
def probe_logits(model: nn.Module, batches: Batches, device=None) -> torch.Tensor:
    """Logits of ``model`` on every probe batch (eval mode), on the CPU."""
    device = _device(device)
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


def selection_candidates(method: str, gamma: float | str | None = "auto", method_kwargs: dict | None = None,
                         gamma_grid: Sequence[float] = GAMMA_GRID) -> list[dict[str, float]]:
    """The settings a merge chooses among on the held-out probe slice, each a dict of keyword arguments for
    the method; ``[]`` when nothing is chosen. Methods with a tunable gamma: ``{"gamma": g}`` over
    ``gamma_grid`` when ``gamma="auto"``. Methods with tuned options (:attr:`Method.tuned`: ZipIt!'s ``alpha``
    and ``beta``): every combination of the grid values of the options absent from ``method_kwargs`` (an
    option the caller sets is used as given)."""
    m = METHODS[method]
    if m.tunable_gamma:
        return [{"gamma": float(g)} for g in gamma_grid] if gamma == "auto" else []
    free = [(k, values) for k, values in m.tuned if k not in (method_kwargs or {})]
    if not free:
        return []
    names = [k for k, _ in free]
    return [dict(zip(names, map(float, combo))) for combo in itertools.product(*(v for _, v in free))]


def _resolve_probe(probe, need_held: bool, held_out: float, seed: int) -> tuple[Batches, Batches | None]:
    if isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(p, Batches) for p in probe):
        return probe[0], (probe[1] if need_held else None)   # already split (fitting, held-out), as the strategy's
    batches = as_batches(probe)
    if not need_held:
        return batches, None
    return batches.split(held_out, seed)


def merge_models(models: Sequence[nn.Module], probe: Any, method: str = "cca", reference: int | str = 0,
                 gamma: float | str = "auto", bn_reset: bool | None = None, repair: bool = False,
                 weights: Sequence[float] | None = None, *, repair_target: str = "average", device=None,
                 held_out: float = 0.2, seed: int = 0,
                 gamma_grid: Sequence[float] = GAMMA_GRID, return_info: bool = False, np_merge: bool | dict = False,
                 residual_sites: str = "all", bn_fold: bool = False, gamma_clients: int | None = None,
                 **method_kwargs):
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
        True or a dict of options for :func:`fedmerge.common.engine.npmerge.np_merge`).
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
    _check_repair_target(repair_target)
    w = _validate(models, weights)
    if not (reference == "best" or (isinstance(reference, int) and 0 <= reference < len(models))):
        raise ValueError(f"reference must be a model index in [0, {len(models)}) or 'best', got {reference!r}")
    auto_gamma = gamma == "auto" and METHODS[method].tunable_gamma
    if isinstance(gamma, str) and gamma != "auto":
        raise ValueError(f"gamma must be a number >= 0 or 'auto', got {gamma!r}")
    if not isinstance(gamma, str) and (not math.isfinite(float(gamma)) or float(gamma) < 0):
        raise ValueError(f"gamma must be a number >= 0 or 'auto', got {gamma!r}")
    dev = _device(device)
    t0 = time.perf_counter()
    select = bool(selection_candidates(method, gamma, method_kwargs, gamma_grid))
    fit, held = _resolve_probe(probe, select or reference == "best" or bool(np_merge), held_out, seed)
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
    needs = METHODS[method].needs
    if needs in ("stats", "stats_all"):
        t = time.perf_counter()
        stats = collect_statistics(models, fit, reference=reference,
                                   pairs="all" if needs == "stats_all" else "reference", spec=spec, device=dev)
        timings["statistics"] = time.perf_counter() - t
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    merged, info = merge_from_statistics(
        models[reference], states, spec, stats, method=method, reference=reference,
        gamma=("auto" if auto_gamma else (None if isinstance(gamma, str) else gamma)), weights=w, bn_reset=bn_reset,
        repair=repair, repair_target=repair_target, reset_batches=fit, eval_batches=held, eval_target=ensemble, gamma_grid=gamma_grid, device=dev,
        repair_models=models, np_merge=np_merge, bn_fold=bn_fold, gamma_clients=gamma_clients, **method_kwargs)
    info.reference_scores = ref_scores
    info.timings = {**timings, **info.timings, "total": time.perf_counter() - t0}
    return (merged, info) if return_info else merged


def compute_alignment(method: str, spec: MergeSpec, stats: Statistics | None, states, reference: int,
                      gamma: float | None = None, **kw) -> matching.Alignment:
    m = METHODS[method]
    fn = m.fn()
    if m.needs == "none":
        return fn(spec, len(states))
    if m.needs == "weights":
        return fn(states, spec, reference=reference, **kw)
    if stats is None:
        raise ValueError(f"method {method!r} needs activation statistics")
    if m.needs == "stats_all" and not m.tunable_gamma:
        return fn(stats, spec, **kw)
    if m.tunable_gamma:
        return fn(stats, spec, reference=reference, gamma=gamma, **kw)
    return fn(stats, spec, reference=reference, **kw)


def merge_from_statistics(template: nn.Module, states, spec: MergeSpec, stats: Statistics | None, *,
                          method: str = "cca", reference: int = 0, gamma: float | str = 0.1,
                          weights: Sequence[float] | None = None, bn_reset: bool | None = None,
                          repair: bool = False, repair_target: str = "average",
                          reset_batches: Batches | None = None,
                          eval_batches: Batches | None = None, eval_target: torch.Tensor | None = None,
                          gamma_grid: Sequence[float] = GAMMA_GRID, device=None, repair_models=None,
                          np_merge: bool | dict = False, bn_fold: bool = False, gamma_clients: int | None = None,
                          **method_kwargs) -> tuple[nn.Module, MergeInfo]:
    """Merge given parameter dicts from precomputed statistics; ``template`` gives the architecture.
    ``repair_target`` as in :func:`merge_models` (REPAIR to the average, or to the reference's statistics).
    ``gamma_clients``: see :func:`merge_models`."""
    _check_repair_target(repair_target)
    dev = _device(device)
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
    if fold and np_merge:
        raise ValueError("bn_fold and np_merge cannot be combined (NP Merge learns the BatchNorm parameters)")
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
    plan = METHODS[method].target == ".matching:match_cca" and stats is not None
    subset = _selection_subset(n, reference, gamma_clients, method, plan)
    subset = subset if candidates else None
    repair_names = _producers_for_repair(spec, folded_bn=fold) if repair else []
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
            moments[i] = _output_moments(m, repair_names, reset_batches, dev)
            m.to(orig)
        _add_repair_targets(targets, spec, repair_names, row, moments[i], weight)
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
            with matching.single_threaded():
                rows = matching.CCARows(stats, spec, reference, [p["gamma"] for p in settings], **method_kwargs)
            timings["transforms"] += time.perf_counter() - t

            def one(i: int):   # model i's transforms and its aligned parameters for every setting (a worker)
                t0 = time.perf_counter()
                row = rows.row(i)
                t1 = time.perf_counter()
                aligned = [_aligned(states[i], spec, r, bn_eps) for r in row]
                return row, aligned, t1 - t0, time.perf_counter() - t1

            sums: list = [None] * len(settings)
            targets: list[dict] = [{} for _ in settings]
            with matching.single_threaded(), ThreadPoolExecutor(workers) as pool:
                for i, (row, aligned, dt_transforms, dt_apply) in zip(models, _in_order(pool, one, models, workers)):
                    timings["transforms"] += dt_transforms   # summed over the workers
                    timings["apply"] += dt_apply
                    t = time.perf_counter()
                    for c in range(len(settings)):   # in model order, whichever worker finished first
                        sums[c] = _accumulate(sums[c], aligned[c], wts[i])
                    timings["apply"] += time.perf_counter() - t
                    for c in range(len(settings)):
                        add_targets(targets[c], i, row[c], tw[i])
                    del row, aligned
            for c, params in enumerate(settings):
                total, sums[c] = sums[c], None
                yield params, _finish_average(total, states[reference]), targets[c]
            return
        for params in settings:
            t = time.perf_counter()
            alignment = compute_alignment(method, spec, stats, states, reference, **method_kwargs, **params)
            timings["transforms"] += time.perf_counter() - t
            total, targets = None, {}
            for i in models:
                row = {g: pairs[i] for g, pairs in alignment.items()}
                t = time.perf_counter()
                total = _accumulate(total, _aligned(states[i], spec, row, bn_eps), wts[i])
                timings["apply"] += time.perf_counter() - t
                add_targets(targets, i, row, tw[i])
            del alignment
            yield params, _finish_average(total, states[reference]), targets

    def build(merged_sd, targets) -> nn.Module:
        t = time.perf_counter()
        if fold:
            merged_sd = unit_batchnorm(merged_sd, spec, bn_eps)
        model = copy.deepcopy(template).cpu()
        model.load_state_dict(merged_sd)
        timings["apply"] += time.perf_counter() - t
        if repair:
            t = time.perf_counter()
            _repair_to(model, repair_names, targets, reset_batches, dev)
            timings["repair"] += time.perf_counter() - t
        if bn:
            t = time.perf_counter()
            reset_bn_stats(model, reset_batches, dev)
            timings["bn_reset"] += time.perf_counter() - t
        return model

    t0 = time.perf_counter()
    best = None
    everyone = list(range(n))
    for params, merged_sd, targets in merged_states(subset or everyone, settings):
        model = build(merged_sd, targets)
        del merged_sd
        if not candidates:
            best = (None, params, model)
            continue
        t = time.perf_counter()
        score = probe_score(probe_logits(model, eval_batches, dev), eval_batches, eval_target)
        timings["evaluate"] += time.perf_counter() - t
        info.param_scores.append((params, score))
        if best is None or score > best[0]:
            best = (score, params, model)
    merged, used = best[2], best[1]
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
        merged = build(merged_sd, targets)
        timings["merge_all"] = time.perf_counter() - t
    if np_merge:
        if repair:
            raise ValueError("np_merge and repair are alternatives: choose one")
        if reset_batches is None or eval_batches is None:
            raise ValueError("np_merge needs a probe with a held-out slice (labels) on the server")
        from fedmerge.common.engine.align import aligned_states
        from fedmerge.common.engine.npmerge import np_merge as _np_merge

        t = time.perf_counter()
        alignment = compute_alignment(method, spec, stats, states, reference, **method_kwargs, **used)
        aligned = aligned_states(states, spec, alignment, bn_eps)
        opts = np_merge if isinstance(np_merge, dict) else {}
        merged, info.np_merge = _np_merge(template, aligned, w, reset_batches, eval_batches, device=dev, **opts)
        if bn:
            reset_bn_stats(merged, reset_batches, dev)
        timings["np_merge"] = time.perf_counter() - t
    for k, v in merged.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FloatingPointError(f"merge produced non-finite values in '{k}'")
    info.timings = timings
    return merged.cpu().eval(), info


# --- REPAIR -------------------------------------------------------------------------------------------------
def check_gamma_clients(k, method: str) -> None:
    """``gamma_clients`` must be None or an integer >= 2, with method ``cca`` (ValueError otherwise)."""
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"gamma_clients must be an integer >= 2 or None (all models), got {k!r}")
    if method != "cca":
        raise ValueError(f"gamma_clients applies to method 'cca' (all-to-one, from statistics), not {method!r}")


def _selection_subset(n: int, reference: int, k, method: str, plan: bool) -> list[int] | None:
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


def _check_repair_target(target) -> None:
    if target not in REPAIR_TARGETS:
        raise ValueError(f"unknown repair_target {target!r}; choose one of {list(REPAIR_TARGETS)}")


def repair_target_weights(weights: Sequence[float], target: str = "average", reference: int = 0) -> list[float]:
    """The weight of each model's aligned statistics in REPAIR's target: the merge weights for ``"average"``,
    all of it on ``reference`` for ``"reference"``."""
    _check_repair_target(target)
    if not 0 <= reference < len(weights):
        raise ValueError(f"reference {reference} is not a model index in [0, {len(weights)})")
    if target == "average":
        return [float(x) for x in weights]
    return [1.0 if i == reference else 0.0 for i in range(len(weights))]


class _Repaired(nn.Module):
    def __init__(self, layer: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.layer = layer
        bn_cls = nn.BatchNorm2d if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)) else nn.BatchNorm1d
        self.bn = bn_cls(mean.numel(), momentum=None).to(layer.weight.device)
        self.bn.weight.data.copy_(std.float())
        self.bn.bias.data.copy_(mean.float())

    def forward(self, x):
        return self.bn(self.layer(x))


def _producers_for_repair(spec: MergeSpec, folded_bn: bool = False) -> list[str]:
    """The layers whose outputs REPAIR restores: conv/linear without a BatchNorm; with ``folded_bn`` also the
    folded BatchNorms (pure shifts after :func:`~fedmerge.common.engine.align.fold_batchnorm`), whose outputs are
    their producers' folded outputs."""
    return [l.norm if l.norm is not None else l.name for l in spec.layers.values()
            if l.kind in ("conv", "linear") and l.out[0].group != FIXED and (l.norm is None or folded_bn)]


@torch.no_grad()
def _output_moments(model: nn.Module, names: list[str], batches: Batches, device) -> dict[str, Moments]:
    mods = dict(model.named_modules())
    acc = {n: Moments(0, None, None) for n in names}
    hooks = []

    def hook(name):
        def fn(_m, _i, out):
            x = out if out.dim() == 2 else out.transpose(0, 1).reshape(out.shape[1], -1).T
            acc[name] = acc[name].combine(Moments.of(x))
        return fn

    for n in names:
        hooks.append(mods[n].register_forward_hook(hook(n)))
    try:
        model.eval().to(device)
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: Moments(m.n, m.mean.cpu(), m.m2.cpu()) for n, m in acc.items()}


def _in_order(pool: ThreadPoolExecutor, fn, items, window: int):
    """``fn`` over ``items`` on ``pool``, results yielded in the items' order, at most ``window`` + 1 in flight (so
    that at most that many models' results are held at once)."""
    items = iter(items)
    running = deque(pool.submit(fn, x) for x in itertools.islice(items, max(1, window)))
    while running:
        done = running.popleft()
        running.extend(pool.submit(fn, x) for x in itertools.islice(items, 1))
        yield done.result()


def _aligned(state, spec: MergeSpec, row: dict, bn_eps) -> dict:
    """One model's parameters in the shared basis, from its ``{group: (T, T^-1)}``."""
    return align_state(state, spec, {g: p[0] for g, p in row.items()}, {g: p[1] for g, p in row.items()}, bn_eps)


def _accumulate(total: dict | None, state: dict, weight: float) -> dict:
    """Running weighted sum of the floating-point entries in float64, in model order (the sum
    :func:`~fedmerge.common.engine.align.average_states` forms, without holding the summands)."""
    if total is None:
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items() if v.is_floating_point()}
    for k, acc in total.items():
        acc += weight * state[k].to(torch.float64)
    return total


def _finish_average(total: dict, reference_state: dict) -> dict:
    """The averaged parameters in the reference's dtypes; integer buffers (BN counters) from the reference."""
    return {k: total[k].to(v.dtype) if v.is_floating_point() else v.clone() for k, v in reference_state.items()}


def _add_repair_targets(targets: dict, spec: MergeSpec, names: list[str], row: dict, moms: dict[str, Moments],
                        weight: float) -> None:
    """Add one model's output statistics, seen through its transforms ``row`` (mean ``T mu``, variance
    ``diag(T C T^T)``), with ``weight`` to REPAIR's per-layer targets."""
    for n in names:
        t = row[spec.layers[n].out[0].group][0]
        mean = t @ moms[n].mean
        var = torch.clamp(torch.einsum("ij,jk,ik->i", t, moms[n].cov, t), min=0)
        pm, pv = targets.get(n, (torch.zeros(0), torch.zeros(0)))
        targets[n] = (mean * weight + (pm if pm.numel() else 0), var * weight + (pv if pv.numel() else 0))


@torch.no_grad()
def apply_repair(merged: nn.Module, models: Sequence[nn.Module], spec: MergeSpec, alignment, weights,
                 batches: Batches, device, target: str = "average", reference: int = 0,
                 folded_bn: bool = False) -> nn.Module:
    """REPAIR (Jordan et al., 2023): give every merged unit a target pre-activation mean and variance, by a
    temporary BatchNorm re-estimated on the probe and folded into the layer.

    The target (:func:`repair_target_weights`): ``"average"`` the ``weights``-weighted average of the aligned
    endpoint models' per-unit means and variances (unit j of model i seen through its alignment ``T_i``: mean
    ``T_i mu_i``, variance ``diag(T_i C_i T_i^T)``); ``"reference"`` those of model ``reference`` alone (the paper's
    App. D; with CCA and permutations the reference's transform is the identity, so these are its own units'
    statistics). All BatchNorms are estimated in one pass (train mode, batch statistics), as upstream REPAIR
    does: a unit's input in that pass is normalised with its batch's statistics, not the folded ones, so units
    after the first repaired layer match their target up to that difference."""
    names = _producers_for_repair(spec, folded_bn)
    if not names:
        return merged
    tw = repair_target_weights(weights, target, reference)
    targets: dict = {}
    for i, m in enumerate(models):
        if tw[i] == 0:
            continue  # no share in the target: no forward pass
        orig = next(iter(m.parameters())).device
        moms = _output_moments(m, names, batches, device)
        m.to(orig)
        _add_repair_targets(targets, spec, names, {g: pairs[i] for g, pairs in alignment.items()}, moms, tw[i])
    return _repair_to(merged, names, targets, batches, device)


@torch.no_grad()
def _repair_to(merged: nn.Module, names: list[str], targets: dict, batches: Batches, device) -> nn.Module:
    """Fold REPAIR's per-layer (mean, variance) ``targets`` into ``merged`` (see :func:`apply_repair`)."""
    if not names:
        return merged
    mods = dict(merged.named_modules())
    wrapped = {}
    for n in names:
        layer = mods[n]
        if layer.bias is None:
            continue  # nowhere to put the shift without changing the architecture
        parent_name, _, attr = n.rpartition(".")
        parent = mods[parent_name] if parent_name else merged
        mean, var = targets[n]
        wrapper = _Repaired(layer, mean, torch.sqrt(var + 1e-5))
        setattr(parent, attr, wrapper)
        wrapped[n] = (parent, attr, wrapper)
    try:
        merged.eval().to(device)
        for _, _, wr in wrapped.values():
            wr.bn.train()
        for x, _ in batches:
            merged(x.to(device))
    finally:
        for n, (parent, attr, wr) in wrapped.items():
            bn, layer = wr.bn, wr.layer
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(scale.view(shape))
            layer.bias.copy_((layer.bias - bn.running_mean) * scale + bn.bias)
            setattr(parent, attr, layer)
    return merged.cpu()
