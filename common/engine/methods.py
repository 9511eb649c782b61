"""The registry of matching methods: one record per method name, holding the method's function and what the
merge must know about it -- which inputs it reads and which hyper-parameters are chosen on the held-out probe
slice. Every method has the one signature of :mod:`fedmerge.common.engine.matching`,

    fn(inputs: MatchInputs, spec: MergeSpec, reference: int = 0, **hyper) -> Alignment

so a new method is one such function plus one :func:`register` line; :func:`compute_alignment` calls any of them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from fedmerge.common.engine.gcca import match_gcca
from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.matching import (
    Alignment,
    CCARows,
    MatchInputs,
    identity_alignment,
    match_cca,
    match_permute,
)
from fedmerge.common.engine.ot import match_ot
from fedmerge.common.engine.stats import Statistics
from fedmerge.common.engine.weight_matching import match_merge_many, match_weights
from fedmerge.common.engine.zipit import match_zipit

__all__ = ["Method", "METHODS", "NEEDS", "GAMMA_GRID", "ZIPIT_GRID", "register", "compute_alignment",
           "selection_candidates"]

GAMMA_GRID = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0)
#: ZipIt!'s (alpha, beta) candidates, chosen on the held-out probe slice as gamma is for CCA. A 4 x 4 subset of
#: upstream's search grid (ZipIt! ``hyperparameter_testing.py``: a in {1e-4, .01, .1, .3, .5, 1}, b in {0, .0375,
#: .075, .125, .25, 1}; our alpha = 0 stands for their 1e-4), so that the tuning costs at most ~3x CCA's six
#: gammas. It holds upstream's default (0.3, 0.125), a pure cross-model matching (0, 0) and this project's
#: former fixed setting (0, 1). ``beta`` is upstream's b (see :func:`fedmerge.common.engine.zipit.zipit_group`).
ZIPIT_GRID = (("alpha", (0.0, 0.1, 0.3, 1.0)), ("beta", (0.0, 0.125, 0.25, 1.0)))
#: What a method reads: ``"none"`` (nothing: plain averaging), ``"stats"`` (statistics of the reference pairs),
#: ``"stats_all"`` (statistics of all pairs), ``"weights"`` (the models' parameters).
NEEDS = ("none", "stats", "stats_all", "weights")


@dataclass(frozen=True)
class Method:
    """A registered matching method.

    fn: the method, ``fn(inputs, spec, reference, **hyper) -> Alignment``.
    needs: which inputs it reads (:data:`NEEDS`).
    tunable_gamma: it takes a ridge ``gamma``, fixed or chosen over the gamma grid with ``gamma="auto"``.
    tuned: options chosen on the held-out probe slice when the caller leaves them out, ``(name, candidates)``.
    rows: optional, for a method with a tunable gamma: a factory ``rows(stats, spec, reference, gammas, **hyper)``
        whose ``row(i)`` gives model i's ``{group: (T, T^-1)}`` for every gamma at once (one decomposition of each
        covariance for the whole grid, model by model: :class:`~fedmerge.common.engine.matching.CCARows`).
    """
    fn: Callable[..., Alignment]
    needs: str
    tunable_gamma: bool = False
    tuned: tuple[tuple[str, tuple[float, ...]], ...] = ()
    rows: Callable | None = None

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"needs must be one of {NEEDS}, got {self.needs!r}")

    @property
    def pairs(self) -> str | None:
        """The ``pairs`` argument of ``collect_statistics`` for this method (None: it reads no statistics)."""
        return {"stats": "reference", "stats_all": "all"}.get(self.needs)


METHODS: dict[str, Method] = {}


def register(name: str, fn: Callable[..., Alignment], needs: str, **options) -> Method:
    """Register matching method ``fn`` under ``name`` (``options``: the other fields of :class:`Method`)."""
    METHODS[name] = method = Method(fn, needs, **options)
    return method


register("avg", identity_alignment, "none")
register("permute", match_permute, "stats")
register("cca", match_cca, "stats", tunable_gamma=True, rows=CCARows)
register("ot", match_ot, "stats")
register("zipit", match_zipit, "stats_all", tuned=ZIPIT_GRID)
register("gcca", match_gcca, "stats_all", tunable_gamma=True)
register("weight_matching", match_weights, "weights")
register("merge_many", match_merge_many, "weights")


def compute_alignment(method: str, spec: MergeSpec, stats: Statistics | None, states, reference: int,
                      gamma: float | None = None, **hyper) -> Alignment:
    """The alignment of the models (``stats`` and/or their parameter dicts ``states``) by ``method`` around
    ``reference``; ``gamma`` goes to the methods with a tunable gamma only, ``hyper`` to the method."""
    m = METHODS[method]
    if m.pairs is not None and stats is None:
        raise ValueError(f"method {method!r} needs activation statistics")
    if m.tunable_gamma:
        hyper["gamma"] = gamma
    return m.fn(MatchInputs(stats, states), spec, reference, **hyper)


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


