"""``CCAMerge``: a Flower strategy that merges client models with CCA Merge (or any fedmerge method).

One round:

1. ``configure_train`` sends the global weights (empty in round 1 unless ``common_init``) with each node's
   partition, whether to upload probe statistics and the probe's fingerprint.
2. ``aggregate_train`` reads every reply as untrusted input (:mod:`fedmerge.server.checks`: identity,
   metrics, weights decoded before allocation, statistics bounds), applies the weight-norm bound, recomputes
   each client's own statistics from its weights when the server holds the probe (and merges with those),
   picks the reference (an index or the best on the probe) and, in the default two-phase protocol, sends the reference
   weights to every client -- the reference included -- in a ``query.cross_stats`` message inside the same
   round; clients answer with cross statistics and echo the digest of the reference they used. When the
   reference fails in this phase, the next best client becomes the reference and the phase is redone. In
   ``stats_on_server`` mode (the server holds the probe) the server computes all statistics instead.
3. It aligns every model to the reference, averages (weighted by sample counts), resets BatchNorm or
   applies REPAIR, and returns the merged weights, which ``Strategy.start`` redistributes next round.

Identity: the server's node -> partition map is the only identity. A node's partition is fixed by its first
reply (the partition the server proposed, or the one the node has of its own, if no other node holds it)
or given up front (``node_partitions``); afterwards a reply that reports another partition, a second reply
from one node in a phase, and a reply from a node that was not asked are rejected.

A bad or missing reply never stops the round: the client is dropped with a reason (``history``, the log and
result.json), and the merge goes on if at least ``min_clients`` remain. A merge that fails (non-finite
transforms, or a merged model beyond the norm bound) is diagnosed by merging the reference with each client
alone; the clients whose pair fails are named, dropped, and the others merged. Otherwise the round fails: the
previous global model is kept and the error is recorded.

    strategy = CCAMerge(model_fn=lambda: MyNet(), probe=probe_images, method="cca")
    result = strategy.start(grid, ArrayRecord(), num_rounds=1)
"""
from __future__ import annotations

import copy
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmerge.common import progress
from fedmerge.common.engine.graph import MergeSpec, derive_spec
from fedmerge.common.engine.merge import (
    GAMMA_GRID,
    METHODS,
    REPAIR_TARGETS,
    check_gamma_clients,
    has_batchnorm,
    merge_from_statistics,
    probe_logits,
    probe_score,
    selection_candidates,
)
from fedmerge.common.engine.stats import (
    ReferenceActivations,
    Statistics,
    collect_statistics,
    cross_statistics,
    own_statistics,
    samples_per_input,
)
from fedmerge.common.task.config import SCHEDULE_AUTO, parse_method_schedule
from fedmerge.common.wire.compress import decode_cross, decode_moments
from fedmerge.common.wire.probe import Batches, as_batches, probe_digest
from fedmerge.common.wire.records import weights_digest

from .checks import (
    MAX_EXAMPLES,
    ClientMetrics,
    CrossCheckFailed,
    ReplyRejected,
    check_cross,
    check_cross_matches,
    check_echo,
    check_moments,
    check_own_matches,
    check_size,
    decode_statistics,
    decode_weights,
    norm_outliers,
    psd_tolerance,
    read_metrics,
    record_bytes,
    transport,
    weight_norm,
)

__all__ = ["CCAMerge", "RoundRecord", "ReplyRejected", "RoundFailedError", "ClientUpdate", "QUERY_CROSS"]

QUERY_CROSS = "query.cross_stats"
REASON_CHARS = 500   # a client's error text is untrusted: it is cut to this length in logs and result.json
NORM_ACTIONS = ("reject", "clip")
ON_FAILED_ROUND = ("keep", "raise")


@dataclass
class RoundRecord:
    """What happened in one round (kept in ``CCAMerge.history`` and written to result.json)."""

    round: int
    ok: bool = False
    method: str | None = None                                     # the method this round merged with
    error: str | None = None
    clients_merged: list[int] = field(default_factory=list)       # partition ids
    clients_rejected: list[dict] = field(default_factory=list)    # {node, partition, phase, reason}
    clients_clipped: dict[int, float] = field(default_factory=dict)  # partition -> scale applied (norm bound)
    blamed: list[int] = field(default_factory=list)               # partitions whose data alone fail the merge
    reference: int | None = None                                  # partition id of the reference
    gamma: float | None = None
    client_metrics: dict[int, dict] = field(default_factory=dict)  # partition id -> reported metrics
    bytes_uploaded: dict[int, int] = field(default_factory=dict)   # partition id -> bytes (both phases)
    bytes_weights: dict[int, int] = field(default_factory=dict)    # partition id -> bytes of the weights record
    bytes_statistics: dict[int, int] = field(default_factory=dict)  # partition id -> own + cross statistics bytes
    timings: dict[str, float] = field(default_factory=dict)
    merge_info: dict = field(default_factory=dict)

    _INT_KEYED = ("clients_clipped", "client_metrics", "bytes_uploaded", "bytes_weights", "bytes_statistics")

    @classmethod
    def from_dict(cls, d: dict) -> "RoundRecord":
        """From ``to_dict``'s output (a resumed run's state.json), every field's type checked (ValueError)."""
        _check_record(d)
        kw = {k: d[k] for k in ("error", "reference", "gamma", "method") if k in d}
        kw.update({k: {int(p): v for p, v in dict(d.get(k, {})).items()} for k in cls._INT_KEYED})
        return cls(round=int(d["round"]), ok=bool(d["ok"]), clients_merged=[int(p) for p in d.get("clients_merged", [])],
                   clients_rejected=[dict(r) for r in d.get("clients_rejected", [])],
                   blamed=[int(p) for p in d.get("blamed", [])], timings=dict(d.get("timings", {})),
                   merge_info=dict(d.get("merge_info", {})), **kw)

    def to_dict(self) -> dict:
        out = {"round": self.round, "ok": self.ok, "method": self.method, "error": self.error,
               "clients_merged": self.clients_merged,
               "clients_rejected": self.clients_rejected, "blamed": self.blamed, "reference": self.reference,
               "gamma": self.gamma, "timings": self.timings, "merge_info": self.merge_info}
        out.update({k: {str(p): v for p, v in getattr(self, k).items()} for k in self._INT_KEYED})
        return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_record(d) -> None:
    """The types a RoundRecord's fields must have when read back from JSON."""
    def need(ok: bool, field_: str, what: str) -> None:
        if not ok:
            raise ValueError(f"round record field '{field_}' must be {what}")

    need(isinstance(d, dict), "(record)", "an object")
    need(isinstance(d.get("round"), int) and not isinstance(d.get("round"), bool), "round", "an integer")
    need(isinstance(d.get("ok"), bool), "ok", "true or false")
    need(d.get("error") is None or isinstance(d.get("error"), str), "error", "a string or null")
    need(d.get("method") is None or d.get("method") in METHODS, "method", "a known method or null")
    for k in ("reference", "gamma"):
        need(d.get(k) is None or _number(d.get(k)), k, "a number or null")
    for k in ("clients_merged", "blamed"):
        need(isinstance(d.get(k, []), list) and all(isinstance(p, int) for p in d.get(k, [])), k, "a list of integers")
    need(isinstance(d.get("clients_rejected", []), list) and all(isinstance(r, dict) for r in d.get(
        "clients_rejected", [])), "clients_rejected", "a list of objects")
    for k in ("timings", "clients_clipped", "bytes_uploaded", "bytes_weights", "bytes_statistics"):
        need(isinstance(d.get(k, {}), dict) and all(_number(v) for v in d.get(k, {}).values()), k,
             "an object of finite numbers")
    need(isinstance(d.get("client_metrics", {}), dict) and all(
        isinstance(m, dict) and all(_number(v) for v in m.values()) for m in d.get("client_metrics", {}).values()),
        "client_metrics", "an object of objects of finite numbers")
    need(isinstance(d.get("merge_info", {}), dict), "merge_info", "an object")


@dataclass(eq=False)
class ClientUpdate:
    """One client's checked training reply."""

    node: int
    partition: int
    state: dict[str, torch.Tensor]
    metrics: ClientMetrics
    own: dict | None = None   # decoded own statistics (two-phase protocol)
    own_encoding: dict = field(default_factory=dict)  # group -> how the own block was sent (dtype, form)
    clipped: bool = False     # weights scaled by the norm bound: its statistics are the server's


def _subset(stats: Statistics, keep: list[int]) -> Statistics:
    """The statistics of the models ``keep`` (indices, the reference among them), re-indexed."""
    ref = keep.index(stats.reference)
    return Statistics(own=[stats.own[i] for i in keep],
                      cross={(ref, j): stats.cross[(stats.reference, i)] for j, i in enumerate(keep) if j != ref},
                      reference=ref)


class _Models(Sequence):
    """The clients' models, each built from its weights when it is read (REPAIR reads each once): not N more
    model copies at once."""

    def __init__(self, states: list, build: Callable[[dict], nn.Module]):
        self.states, self.build = states, build

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.build(s) for s in self.states[i]]
        return self.build(self.states[i])


class RoundFailedError(RuntimeError):
    """A round could not merge (too few valid clients, a failed merge); raised with ``on_failed_round='raise'``."""


def _cut(text: str) -> str:
    text = str(text)
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + "…"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def client_error(reason: str) -> str:
    """A client's error reply in one line: the runtime's traceback (Ray's included) cut to its last line."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(reason)).splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if not ln.startswith(("^", "File ", "'>", ">"))), "")
    last = last.strip("'<> ") or "no reason given"
    return f"client error: {_cut(last)}"


class CCAMerge(FedAvg):
    """Merge client models by aligning them to one reference (CCA Merge by default) and averaging.

    model_fn: builds the architecture (a zero-argument callable, or a module used as template).
    probe: the shared probe set on the server (tensor, (x, y) pair, DataLoader or Batches, split here into a
        fitting part and a held-out part; or a ``(fit, held_out)`` pair of Batches). Needed for
        ``gamma="auto"``, BatchNorm reset, REPAIR, ``stats_on_server`` and methods that need all pairs
        (ZipIt!); with labels, ``reference="best"`` and γ are chosen by accuracy on its held-out slice,
        without labels by agreement with the clients' ensemble.
    method: any of ``fedmerge.common.engine.merge.METHODS`` (``avg`` is plain FedAvg: it needs a common
        initialisation to be meaningful).
    reference: a client position (in partition order) or ``"best"``.
    bn_fold: fold each BatchNorm into its producer before aligning (exact for CCA's general transforms; no
        BatchNorm reset afterwards; see :func:`fedmerge.common.engine.merge.merge_models`).
    repair / repair_target: REPAIR after the merge, restoring each merged unit's statistics to the
        ``"average"`` of the aligned clients' (default) or to the ``"reference"`` client's (the paper's App. D).
    max_examples: bound on each client's ``num-examples``: an int, a ``{partition: size}`` mapping or a
        callable ``partition -> size`` (the partition sizes the server knows). Default: 10^9, with a warning.
    norm_bound: a client's weight norm must lie within this factor of the median over the round's clients and
        the server's global model (``None``: off). norm_action: ``"reject"`` the client or ``"clip"`` its update.
    node_partitions: a fixed ``{node id: partition}`` map (otherwise fixed by each node's first reply).
    on_failed_round: ``"keep"`` the previous global model and go on (Flower's behaviour), or ``"raise"``
        :class:`RoundFailedError` out of ``start`` (a script then fails loudly; the round is in ``history``).
    method_schedule: the method of each round. ``None`` (default): ``method`` in every round. ``"auto"``:
        ``method`` in a round whose clients start from their own initialisations (no global weights sent, as
        in round 1 without a common initial model), plain averaging (``avg``) once they all start from the
        global model. A sequence (or ``"cca,avg"``): entry r-1 in round r, the last entry repeating; an
        unknown name is a ValueError. An ``avg`` round asks clients for no statistics (weights only); every
        reply check applies in every round. ``method_kwargs`` go to every scheduled method.
    """

    def __init__(self, model_fn: Callable[[], nn.Module] | nn.Module, probe: Any = None, *, method: str = "cca",
                 reference: int | str = "best", gamma: float | str = "auto", bn_reset: bool | None = None,
                 repair: bool = False, repair_target: str = "average", bn_fold: bool = False,
                 weighted: bool = True,
                 num_clients: int | None = None,
                 min_clients: int = 2, stats_on_server: bool = False, query_timeout: float = 600.0,
                 wait_for_clients: float = 120.0, held_out: float = 0.2, seed: int = 0, device=None,
                 gamma_grid: Sequence[float] = GAMMA_GRID, max_upload_bytes: int | None = None,
                 example_input: torch.Tensor | None = None, train_config: dict | None = None,
                 max_examples: int | Mapping[int, int] | Callable[[int], int] | None = None,
                 norm_bound: float | None = 10.0, norm_action: str = "reject",
                 node_partitions: Mapping[int, int] | None = None, max_reference_retries: int = 2,
                 on_failed_round: str = "keep", method_schedule: Sequence[str] | str | None = None,
                 **method_kwargs) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        self.method_schedule = parse_method_schedule(method_schedule, tuple(METHODS))
        if min_clients < 1:
            raise ValueError("min_clients must be >= 1")
        if norm_action not in NORM_ACTIONS:
            raise ValueError(f"norm_action must be one of {NORM_ACTIONS}, got {norm_action!r}")
        if on_failed_round not in ON_FAILED_ROUND:
            raise ValueError(f"on_failed_round must be one of {ON_FAILED_ROUND}, got {on_failed_round!r}")
        if repair_target not in REPAIR_TARGETS:
            raise ValueError(f"repair_target must be one of {REPAIR_TARGETS}, got {repair_target!r}")
        if norm_bound is not None and not norm_bound > 1:
            raise ValueError(f"norm_bound must be a factor > 1 or None, got {norm_bound!r}")
        # the server evaluates the merged model itself: FedAvg's warning that federated evaluation is skipped
        # would be noise on every run
        with progress.dropped("fraction_evaluate is set to 0.0"):
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_clients,
                             min_evaluate_nodes=0, min_available_nodes=min_clients)
        self.model_fn = model_fn if callable(model_fn) and not isinstance(model_fn, nn.Module) else (
            lambda m=model_fn: copy.deepcopy(m))
        self.method, self.reference, self.gamma = method, reference, gamma
        self.bn_reset, self.repair, self.repair_target, self.weighted = bn_reset, repair, repair_target, weighted
        self.bn_fold = bool(bn_fold)
        if self.bn_fold and method_kwargs.get("np_merge"):
            raise ValueError("bn_fold and np_merge cannot be combined (NP Merge learns the BatchNorm parameters)")
        self.num_clients, self.min_clients = num_clients, min_clients
        self.stats_on_server, self.query_timeout = stats_on_server, query_timeout
        self.wait_for_clients = wait_for_clients
        self.device, self.gamma_grid, self.seed = device, tuple(gamma_grid), seed
        self.max_examples, self.norm_bound, self.norm_action = max_examples, norm_bound, norm_action
        self.max_reference_retries, self.on_failed_round = max_reference_retries, on_failed_round
        self.method_kwargs = method_kwargs
        self.train_config = dict(train_config or {})
        self.base_method = method
        self._use_method(method)

        self.template = self.model_fn().cpu().eval()
        self.fit: Batches | None = None
        self.held: Batches | None = None
        self.probe_split: dict = {}   # how the server split the probe, sent to clients (statistics_probe)
        if isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(b, Batches) for b in probe):
            self.fit, self.held = probe  # already split (the clients compute statistics on the same ``fit``)
        elif probe is not None:
            batches = as_batches(probe)
            self.fit, self.held = batches.split(held_out, seed)
            self.probe_split = {"probe-held-out": float(held_out), "probe-seed": int(seed)}
        example = example_input if example_input is not None else (self.fit.example() if self.fit else None)
        if example is None:
            raise ValueError("CCAMerge needs a probe or an example_input to derive the merge spec")
        self.spec: MergeSpec = derive_spec(self.template, example)
        for m in self.scheduled_methods():   # every method the schedule may use must be possible
            self._use_method(m)
            self._check_needs_probe()
            if norm_action == "clip" and self.fit is None and self.stats_where == "clients":
                raise ValueError("norm_action='clip' needs a server probe: a clipped client's statistics are "
                                 "recomputed by the server from the clipped weights")
        self._use_method(self.scheduled_methods()[0])
        # gamma_clients: CCA's gamma chosen on a subset of the clients, in the rounds that merge with CCA
        self.gamma_clients = method_kwargs.pop("gamma_clients", None)
        if self.gamma_clients is not None:
            check_gamma_clients(self.gamma_clients, "cca")
            if "cca" not in self.scheduled_methods():
                raise ValueError(f"gamma_clients applies to method 'cca', which no round uses "
                                 f"(methods {self.scheduled_methods()})")
        self.keys = {k: (tuple(v.shape), v.dtype) for k, v in self.template.state_dict().items()}
        self.model_bytes = sum(v.numel() * v.element_size() for v in self.template.state_dict().values())
        self.max_upload_bytes = max_upload_bytes or int(8 * self.model_bytes + self._stats_bytes_bound() + 2 ** 20)
        self.template_norm = weight_norm(self.template.state_dict())
        # what an honest client's statistics must look like: the probe's sample counts and fingerprint
        self.probe_digest: str | None = probe_digest(self.fit) if self.fit is not None else None
        self.expected_counts: dict[int, int] | None = None
        if self.fit is not None:
            per = samples_per_input(self.template, self.spec, self.fit.example())
            self.expected_counts = {g: per[g] * self.fit.num_samples for g in self.spec.groups}

        if weighted and max_examples is None:
            log(WARNING, "CCAMerge: the average is weighted by client-reported num-examples, bounded only by %d; "
                "pass max_examples (the partition sizes the server knows) or weighted=False", MAX_EXAMPLES)
        self.history: list[RoundRecord] = []
        self.partitions: dict[int, int] = {int(n): int(p) for n, p in (node_partitions or {}).items()}
        self.num_partitions: int | None = (max(self.partitions.values()) + 1) if self.partitions else None
        self.last_states: dict[int, dict[str, torch.Tensor]] = {}  # partition -> weights of the last round
        self.round_offset = 0  # rounds finished before a resume: Strategy.start counts from 1 again
        self._proposed: dict[int, int] = {}      # node -> partition proposed this round (not yet confirmed)
        self._claimed: dict[int, int] = {}       # node -> valid partition it claims this round (for names)
        self._sampled: set[int] = set()
        self._global: dict[str, torch.Tensor] | None = None
        self._grid: Grid | None = None
        self._round_start = 0.0

    # --- the method of each round -------------------------------------------------------------------------
    def scheduled_methods(self) -> tuple[str, ...]:
        """Every method a round may use (the configured one first, unless an explicit schedule replaces it)."""
        s = self.method_schedule
        if s is None:
            return (self.base_method,)
        if s == SCHEDULE_AUTO:
            return (self.base_method, "avg")
        return tuple(dict.fromkeys(s))

    def method_for_round(self, server_round: int, from_global: bool) -> str:
        """The method of round ``server_round`` (1-based, resumed rounds included): the configured method
        without a schedule; with ``"auto"`` the configured method when the clients start from their own
        initialisations (``from_global`` false: no global weights sent) and plain averaging when they all start
        from the global model; with an explicit schedule its entry ``min(round, len) - 1``."""
        s = self.method_schedule
        if s is None:
            return self.base_method
        if s == SCHEDULE_AUTO:
            return "avg" if from_global else self.base_method
        return s[min(max(server_round, 1), len(s)) - 1]

    def _schedule_text(self) -> str:
        s = self.method_schedule
        return "none" if s is None else s if isinstance(s, str) else ",".join(s)

    def _use_method(self, method: str) -> None:
        """Make ``method`` this round's: what it needs and where its statistics are computed."""
        self.method = method
        self.needs = METHODS[method].needs
        if self.needs == "stats_all" or (self.stats_on_server and self.needs == "stats"):
            self.stats_where = "server"
        elif self.needs == "stats":
            self.stats_where = "clients"
        else:
            self.stats_where = "none"

    # --- set-up checks ----------------------------------------------------------------------------------
    def _check_needs_probe(self) -> None:
        if self.fit is not None:
            return
        problems = []
        if self.gamma == "auto" and METHODS[self.method].tunable_gamma:
            problems.append("gamma='auto' (pass a number)")
        # reference="best" is allowed: without a probe it is chosen from client-reported probe accuracy
        if not self.bn_fold and (self.bn_reset or (self.bn_reset is None and has_batchnorm(self.template))):
            problems.append("BatchNorm reset (pass bn_reset=False)")
        if self.repair:
            problems.append("REPAIR")
        if self.stats_where == "server":
            problems.append(f"statistics on the server (method {self.method!r}, stats_on_server)")
        if problems:
            raise ValueError("CCAMerge without a server probe cannot do: " + "; ".join(problems))

    def _stats_bytes_bound(self) -> int:
        # own block: n + mean + m2 per group; cross block: n + 2 means + c (float64)
        return sum(8 * (2 * g.dim * g.dim + 3 * g.dim + 2) for g in self.spec.groups.values())

    def summary(self) -> None:
        log(INFO, "\t├──> CCAMerge: method=%s reference=%s gamma=%s statistics=%s%s", self.method, self.reference,
            self.gamma, self.stats_where, "" if self.method_schedule is None else f" schedule={self._schedule_text()}")
        log(INFO, "\t└──> merge spec: %d groups, %d layers; min clients %d; norm bound %s (%s)", len(self.spec.groups),
            len(self.spec.layers), self.min_clients, self.norm_bound, self.norm_action)

    # --- identity -----------------------------------------------------------------------------------------
    def _sample(self, grid: Grid) -> list[int]:
        want = self.num_clients or self.min_clients
        t0 = time.time()
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= want:
                break
            if time.time() - t0 > self.wait_for_clients and len(nodes) >= self.min_clients:
                log(WARNING, "only %d of %d expected clients connected; going on", len(nodes), want)
                break
            time.sleep(0.5)
        if self.num_partitions is None:
            self.num_partitions = len(nodes)
        self._proposed, self._claimed = {}, {}
        taken = set(self.partitions.values())
        free = [p for p in range(self.num_partitions) if p not in taken]
        sampled = []
        for n in nodes:
            if n in self.partitions:
                sampled.append(n)
            elif free:
                self._proposed[n] = free.pop(0)
                sampled.append(n)
        left = [n for n in nodes if n not in sampled]
        if left:
            log(WARNING, "nodes %s have no free partition (of %d); not sampled", left, self.num_partitions)
        return sampled

    def _label(self, node: int) -> int:
        """How logs and result.json name a node: its registered partition, else the valid partition it claims
        this round (its own --node-config, e.g. under Ray), else the one the server proposed."""
        if node in self.partitions:
            return self.partitions[node]
        return self._claimed.get(node, self._proposed.get(node, -1))

    def _identify(self, node: int, claimed: int | None) -> int:
        """The node's partition: the registered one (a different claim is rejected), else its claim (or the
        server's proposal) if no other node holds it. Registered by :meth:`_register` only once the client is
        merged, so a rejected reply never takes a partition; clashes within a round: :meth:`_settle_claims`."""
        registered = self.partitions.get(node)
        if registered is not None:
            if claimed is not None and claimed != registered:
                raise ReplyRejected(f"reports partition {claimed}, but node {node} is partition {registered}")
            return registered
        part = claimed if claimed is not None else self._proposed.get(node)
        if part is None:
            raise ReplyRejected("reports no partition-id and none was assigned")
        owner = next((n for n, p in self.partitions.items() if p == part), None)
        if owner is not None:
            raise ReplyRejected(f"claims partition {part}, which belongs to node {owner}")
        return part

    def _register(self, node: int, part: int) -> None:
        if node not in self.partitions:
            self.partitions[node] = part
            self._proposed.pop(node, None)

    def _examples_cap(self, part: int) -> int:
        cap = self.max_examples
        if cap is None:
            return MAX_EXAMPLES
        if callable(cap):
            return int(cap(part))
        if isinstance(cap, Mapping):
            return int(cap.get(part, MAX_EXAMPLES))
        return int(cap)

    # --- phase 1 ------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._grid = grid
        self._round_start = time.time()
        self._global = {k: v.detach().cpu() for k, v in arrays.to_torch_state_dict().items()} if len(arrays) else None
        self._use_method(self.method_for_round(server_round, self._global is not None))
        if self.method_schedule is not None:
            log(INFO, "round %d: method %s (schedule %s)", server_round, self.method, self._schedule_text())
        nodes = self._sample(grid)
        self._sampled = set(nodes)
        if self.method == "avg" and self._global is None:
            log(WARNING, "method='avg' on clients that start from their own initialisations: plain averaging of "
                "independently initialised models is near chance; pass a common initial ArrayRecord")
        messages = []
        extra = {**self.probe_split, **({"probe-digest": self.probe_digest} if self.probe_digest else {})}
        for node in nodes:
            cfg = ConfigRecord({**dict(config), **self.train_config, **extra, "server-round": server_round,
                                "partition-id": self._label(node), "num-partitions": self.num_partitions,
                                "want-stats": self.stats_where == "clients"})
            messages.append(Message(RecordDict({"arrays": arrays, "config": cfg}), message_type="train",
                                    dst_node_id=node))
        progress.info("round %d: %d clients training", server_round, len(messages))
        return messages

    def _read_train_reply(self, node: int, msg: Message) -> ClientUpdate:
        """Every check of one training reply (raises ReplyRejected naming the failed check)."""
        rd = msg.content
        metrics = read_metrics(rd, num_partitions=self.num_partitions)
        part = self._identify(node, metrics.partition)
        self._claimed[node] = part
        cap = self._examples_cap(part)
        if metrics.num_examples > cap:
            raise ReplyRejected(f"num-examples {metrics.num_examples} exceeds partition {part}'s bound of {cap}")
        check_size(rd, self.max_upload_bytes)
        if "arrays" not in rd.array_records:
            raise ReplyRejected("reply has no 'arrays' record (model weights)")
        state = decode_weights(rd.array_records["arrays"], self.keys)
        own = None
        if self.stats_where == "clients":
            if self.probe_digest is not None:
                check_echo(rd, "probe-digest", self.probe_digest,
                           "statistics computed on a different probe (probe digest differs; the server's probe is "
                           f"{self.fit.num_samples + self.held.num_samples} inputs, of which the clients' statistics "
                           f"use {self.fit.num_samples}: every client needs the same probe inputs in the same order)")
            own, enc = decode_statistics(rd, "own-stats", decode_moments, self.spec, "own", "own statistics")
            check_moments(own, self.expected_counts, {g: psd_tolerance(e["dtype"]) for g, e in enc.items()})
            return ClientUpdate(node, part, state, metrics, own, enc)
        return ClientUpdate(node, part, state, metrics, own)

    def _agree_on_counts(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """Without a server probe the expected sample counts are unknown: the most common counts win and
        clients with other counts are rejected (statistics on another probe)."""
        if self.expected_counts is not None or self.stats_where != "clients" or not accepted:
            return accepted
        keys = [tuple(sorted((g, m.n) for g, m in u.own.items())) for u in accepted]
        common, votes = Counter(keys).most_common(1)[0]
        if 2 * votes <= len(keys):
            raise RoundFailedError(f"the clients' statistics disagree on the probe's sample counts and no counts "
                                   f"have a majority ({votes} of {len(keys)}); nobody is rejected")
        for u, k in zip(accepted, keys):
            if k != common:
                self._reject(rec, u.node, "train", f"statistics sample counts {dict(k)} differ from the other "
                             f"clients' {dict(common)}: computed on a different probe?")
        return [u for u, k in zip(accepted, keys) if k == common]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        rec = RoundRecord(round=server_round, method=self.method)
        self.history.append(rec)
        t_round = time.time()
        accepted: list[ClientUpdate] = []
        seen: set[int] = set()
        for msg in sorted(replies, key=lambda m: int(m.metadata.src_node_id)):
            node = int(msg.metadata.src_node_id)
            if node not in self._sampled:
                self._reject(rec, node, "train", "reply from a node that was not sampled this round")
                continue
            if node in seen:
                self._reject(rec, node, "train", "a second reply from this node in this phase")
                continue
            seen.add(node)
            try:
                if msg.has_error():
                    raise ReplyRejected(client_error(msg.error.reason))
                upd = self._read_train_reply(node, msg)
            except ReplyRejected as exc:
                self._reject(rec, node, "train", str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - any failure reading a reply rejects that client only
                self._reject(rec, node, "train", f"unreadable reply ({type(exc).__name__}: {exc})")
                continue
            self._account(rec, upd.partition, msg.content, "arrays", "own-stats")
            rec.client_metrics[upd.partition] = dict(upd.metrics.values)
            accepted.append(upd)
            for key in ("arrays", "own-stats"):   # decoded above: the reply's copy of the arrays is released
                if key in msg.content.array_records:
                    del msg.content[key]
        for node in sorted(self._sampled - seen):
            self._reject(rec, node, "train", "no reply (timed out)")
        rec.timings["phase1_wait"] = t_round - self._round_start
        progress.info("round %d: %d of %d training replies pass the reply checks (after %.1f s)", server_round, len(accepted),
                      len(self._sampled), rec.timings["phase1_wait"])
        try:
            accepted = self._settle_claims(rec, self._verify_own(
                rec, self._bound_norms(rec, self._agree_on_counts(rec, accepted))))
            accepted.sort(key=lambda u: u.partition)
            return self._merge_round(server_round, rec, accepted)
        except RoundFailedError as exc:
            rec.ok, rec.error = False, str(exc)
            log(ERROR, "round %d failed: %s; keeping the previous global model", server_round, exc)
            if self.on_failed_round == "raise":
                raise
            return None, None
        finally:   # configure_train to the merged model (or the failure): what the round cost, clients included
            rec.timings["round"] = time.time() - self._round_start

    def _account(self, rec: RoundRecord, part: int, rd: RecordDict, weights_key: str | None, stats_key: str) -> None:
        ars = rd.array_records
        rec.bytes_uploaded[part] = rec.bytes_uploaded.get(part, 0) + record_bytes(rd)
        if weights_key and weights_key in ars:
            rec.bytes_weights[part] = rec.bytes_weights.get(part, 0) + ars[weights_key].count_bytes()
        if stats_key in ars:
            rec.bytes_statistics[part] = rec.bytes_statistics.get(part, 0) + ars[stats_key].count_bytes()

    def _reject(self, rec: RoundRecord, node: int, phase: str, reason: str) -> None:
        part = self._label(node)
        rec.clients_rejected.append({"node": node, "partition": part, "phase": phase, "reason": _cut(reason)})
        log(WARNING, "round %d: rejected client %s (node %d) in %s: %s", rec.round, part, node, phase, _cut(reason))

    def _bound_norms(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """The weight-norm bound: clients outside [anchor / f, anchor * f] are rejected, or clipped."""
        if self.norm_bound is None or not accepted:
            return accepted
        norms = [weight_norm(u.state) for u in accepted]
        trusted = weight_norm(self._global) if self._global is not None else self.template_norm
        anchor, outliers = norm_outliers(norms, trusted, self.norm_bound)
        rec.merge_info["norm_anchor"] = anchor
        kept = []
        for i, u in enumerate(accepted):
            if i not in outliers:
                kept.append(u)
                continue
            ratio = norms[i] / anchor
            if self.norm_action == "clip" and ratio > 1:
                scale = self._clip(u, anchor * self.norm_bound, norms[i])
                u.clipped = True
                rec.clients_clipped[u.partition] = scale
                log(WARNING, "round %d: client %d's weights clipped (norm %.3g = %.3g x the anchor; scale %.3g)",
                    rec.round, u.partition, norms[i], ratio, scale)
                kept.append(u)
            else:
                self._reject(rec, u.node, "train", f"weight norm {norms[i]:.4g} is {ratio:.3g} x the median anchor "
                             f"{anchor:.4g} (allowed factor {self.norm_bound:g})")
        return kept

    def _settle_claims(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """Unregistered nodes that passed every check so far and claim the same partition: the node the server
        proposed it to keeps it; if none of them was, none keeps it (no order decides)."""
        by_part: dict[int, list[ClientUpdate]] = {}
        for u in accepted:
            by_part.setdefault(u.partition, []).append(u)
        kept = []
        for part, us in by_part.items():
            if len(us) == 1:
                kept.extend(us)
                continue
            owner = next((u for u in us if self._proposed.get(u.node) == part), None)
            for u in us:
                if u is owner:
                    kept.append(u)
                else:
                    who = f"the server proposed it to node {owner.node}" if owner else \
                        f"nodes {sorted(v.node for v in us)} claim it and the server proposed it to none of them"
                    self._claimed.pop(u.node, None)   # named by its proposal, not by the claim it lost
                    self._reject(rec, u.node, "train", f"claims partition {part}: {who}")
        return kept

    def _verify_own(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """With a server probe, every client's own statistics are recomputed from its uploaded weights (one
        forward pass over the probe), the client's are checked against them, and the merge uses the server's:
        own blocks decide the scale of every transform, so they are never taken on trust."""
        if self.fit is None or self.stats_where != "clients":
            return accepted
        t = time.time()
        kept = []
        for u in accepted:
            try:
                computed = own_statistics(self._model(u.state), self.fit, self.spec, device=self._dev())
                if not u.clipped:   # a clipped client's upload describes weights that are no longer merged
                    check_own_matches(u.own, computed, u.own_encoding)
            except ReplyRejected as exc:
                self._reject(rec, u.node, "train", str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - weights whose activations are not finite, for example
                self._reject(rec, u.node, "train", f"own statistics could not be recomputed ({type(exc).__name__}: "
                             f"{exc})")
                continue
            u.own = computed
            u.own_encoding = {g: {"dtype": "float64", "form": "dense"} for g in computed}
            kept.append(u)
        rec.timings["verify_statistics"] = time.time() - t
        return kept

    def _within_bound(self, rec: RoundRecord, state: Mapping[str, torch.Tensor]) -> bool:
        anchor = rec.merge_info.get("norm_anchor")
        return self.norm_bound is None or not anchor or weight_norm(state) <= self.norm_bound * anchor

    def _clip(self, u: ClientUpdate, bound: float, norm: float) -> float:
        """Scale the client's update (its weights minus the global model; the weights themselves in a round
        without one) so that the weight norm is at most ``bound``; returns the factor applied."""
        g = self._global
        if g is None:
            scale = bound / norm
            u.state = {k: v * scale if v.is_floating_point() else v for k, v in u.state.items()}
            return scale
        delta = {k: u.state[k].double() - g[k].double() for k in u.state if u.state[k].is_floating_point()}
        dn = float(np.sqrt(sum(float(d.pow(2).sum()) for d in delta.values())))
        scale = max(0.0, min(1.0, (bound - weight_norm(g)) / dn)) if dn > 0 else 1.0
        u.state = {k: ((g[k].double() + scale * delta[k]).to(v.dtype) if k in delta else v)
                   for k, v in u.state.items()}
        return scale

    # --- reference ------------------------------------------------------------------------------------------
    def _model(self, state) -> nn.Module:
        m = self.model_fn()
        m.load_state_dict(state)
        return m.eval()

    def _dev(self):
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _ensemble_target(self, updates: Sequence[ClientUpdate]) -> torch.Tensor | None:
        """Without probe labels, the clients' mean logits on the held-out slice are the target for γ and the
        reference (agreement with the ensemble)."""
        if self.held is None or self.held.has_labels:
            return None
        return torch.stack([probe_logits(self._model(u.state), self.held, self._dev()) for u in updates]).mean(0)

    def _rank_references(self, accepted: list[ClientUpdate]) -> tuple[list[int], list[float], str]:
        """Candidate references, best first, with the scores and the rule that ranked them."""
        if self.held is not None:
            target = self._ensemble_target(accepted)
            scores = []
            for u in accepted:
                try:
                    scores.append(probe_score(probe_logits(self._model(u.state), self.held, self._dev()),
                                              self.held, target)[0])
                except Exception:  # noqa: BLE001 - a model that cannot be scored is never the reference
                    scores.append(float("-inf"))
            rule = "held-out probe accuracy" if self.held.has_labels else "agreement with the ensemble (no labels)"
        else:
            scores = [u.metrics.probe_accuracy if u.metrics.probe_accuracy is not None else 0.0 for u in accepted]
            rule = "client-reported probe accuracy (no server probe)"
        order = sorted(range(len(accepted)), key=lambda i: (-scores[i], accepted[i].partition))
        if self.reference != "best":
            parts = [u.partition for u in accepted]
            r = int(self.reference)
            if r in parts:
                order.remove(parts.index(r))
                order.insert(0, parts.index(r))
                rule = "fixed"
            else:
                log(WARNING, "reference client %d is not among the merged clients; using the best instead", r)
        return order, [float(s) for s in scores], rule

    # --- phase 2 and merge ------------------------------------------------------------------------------------
    def _merge_round(self, server_round: int, rec: RoundRecord, accepted: list[ClientUpdate]):
        if len(accepted) < self.min_clients:
            raise RoundFailedError(f"only {len(accepted)} valid client replies, fewer than min_clients="
                               f"{self.min_clients}")
        t = time.time()
        order, scores, rule = self._rank_references(accepted)
        rec.timings["select_reference"] = time.time() - t
        rec.merge_info.update({"reference_scores": scores, "reference_rule": rule})
        ranking = [accepted[i] for i in order]
        for attempt in range(self.max_reference_retries + 1):
            stats = None
            if self.stats_where == "clients":
                accepted, ref_u, stats = self._phase_two(server_round, rec, accepted, ranking)
            else:
                ref_u = next(u for u in ranking if u in accepted)
            if len(accepted) < self.min_clients:
                raise RoundFailedError(f"only {len(accepted)} clients left after the statistics phase, fewer than "
                                       f"min_clients={self.min_clients}")
            try:
                merged, info, t = self._merge(rec, accepted, stats, accepted.index(ref_u))
                break
            except Exception as exc:  # noqa: BLE001 - a merge that fails fails this round, not the federation
                error = f"{type(exc).__name__}: {_cut(exc)}"
                rec.blamed = self._blame(rec, accepted, stats, accepted.index(ref_u))
            left = [u for u in accepted if u.partition not in rec.blamed]
            if rec.blamed == [ref_u.partition] and len(left) >= self.min_clients and attempt < self.max_reference_retries:
                self._reject(rec, ref_u.node, "merge", f"as reference: the merge with every other client fails ({error})")
                accepted = left   # another reference, and its statistics phase
                continue
            if not rec.blamed or ref_u.partition in rec.blamed or len(left) < self.min_clients:
                who = f"; it fails on the data of client(s) {rec.blamed}" if rec.blamed else \
                    "; which client's data it fails on cannot be told apart"
                raise RoundFailedError(f"merge failed ({error}){who}")
            for u in accepted:   # the merge fails on these clients' data alone: merge the others
                if u.partition in rec.blamed:
                    self._reject(rec, u.node, "merge", f"the merge with the reference fails on this client's data "
                                 f"({error})")
            keep = [i for i, u in enumerate(accepted) if u.partition not in rec.blamed]
            stats = None if stats is None or self.stats_where != "clients" else _subset(stats, keep)
            accepted = left
            try:
                merged, info, t = self._merge(rec, accepted, stats, accepted.index(ref_u))
            except Exception as again:  # noqa: BLE001
                raise RoundFailedError(f"merge failed ({type(again).__name__}: {_cut(again)}) after dropping "
                                       f"client(s) {rec.blamed}") from None
            break
        counts = [float(u.metrics.num_examples) for u in accepted]
        weights = [c / sum(counts) for c in counts] if self.weighted else None
        rec.timings["merge"] = time.time() - t
        rec.timings.update({f"merge_{k}": v for k, v in info.timings.items()})
        for u in accepted:
            self.last_states[u.partition] = u.state
            self._register(u.node, u.partition)   # a partition is fixed by a node's first merged reply
        rec.ok = True
        rec.clients_merged = [u.partition for u in accepted]
        rec.reference = ref_u.partition
        rec.gamma = info.gamma
        rec.merge_info.update({"gamma_scores": {str(k): v for k, v in info.gamma_scores.items()},
                               "params": info.params, "gamma_selected_on": None if info.selected_on is None else
                               [accepted[i].partition for i in info.selected_on],
                               "bn_reset": info.bn_reset, "repair": info.repair,
                               "repair_target": info.repair_target, "bn_fold": info.bn_fold, "weights": weights})
        progress.info("round %d: merged %d clients with %s in %.1f s (reference client %d by %s, gamma %s)",
                      server_round, len(accepted), self.method, rec.timings["merge"], rec.reference, rule, info.gamma)
        sd = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
        metrics = MetricRecord({"clients-merged": len(accepted), "clients-rejected": len(rec.clients_rejected),
                                "num-examples": int(sum(counts))})
        return ArrayRecord(sd), metrics

    def _merge(self, rec: RoundRecord, accepted: list[ClientUpdate], stats: Statistics | None, ref: int):
        """(merged model, MergeInfo, start time of the merge) of ``accepted`` around ``accepted[ref]``; raises
        when the merge fails or leaves the norm bound."""
        states = [u.state for u in accepted]
        counts = [float(u.metrics.num_examples) for u in accepted]
        weights = [c / sum(counts) for c in counts] if self.weighted else None
        t = time.time()
        if self.stats_where == "server":
            stats = collect_statistics([self._model(s) for s in states], self.fit, reference=ref,
                                       pairs="all" if self.needs == "stats_all" else "reference", spec=self.spec,
                                       device=self._dev())
            rec.timings["server_statistics"] = time.time() - t
            t = time.time()
        merged, info = merge_from_statistics(
            self.template, states, self.spec, stats, method=self.method, reference=ref,
            gamma=self.gamma if METHODS[self.method].tunable_gamma else None, weights=weights,
            bn_reset=self.bn_reset, bn_fold=self.bn_fold, repair=self.repair, repair_target=self.repair_target,
            reset_batches=self.fit,
            eval_batches=self.held,
            eval_target=self._ensemble_target(accepted), gamma_grid=self.gamma_grid, device=self._dev(),
            repair_models=_Models(states, self._model) if self.repair else None,
            gamma_clients=self.gamma_clients if self.method == "cca" else None, **self.method_kwargs)
        if not self._within_bound(rec, merged.state_dict()):
            raise FloatingPointError(f"the merged weight norm {weight_norm(merged.state_dict()):.4g} exceeds "
                                     f"{self.norm_bound:g} x the anchor {rec.merge_info['norm_anchor']:.4g}")
        return merged, info, t

    def _blame(self, rec: RoundRecord, accepted: list[ClientUpdate], stats: Statistics | None, ref: int
               ) -> list[int]:
        """After a failed merge: merge the reference with each other client alone, with the round's statistics;
        the clients whose pair fails (or leaves the norm bound) are named. When every pair fails (two or more),
        the reference is named; with a single pair nobody is (the two cannot be told apart)."""
        cands = selection_candidates(self.method, self.gamma, self.method_kwargs, self.gamma_grid)
        fixed = dict(cands[len(cands) // 2]) if cands else {}   # one setting: a diagnosis, not a selection
        gamma = fixed.pop("gamma", self.gamma if METHODS[self.method].tunable_gamma else None)

        def fails(i: int, j: int) -> bool:
            states = [accepted[i].state, accepted[j].state]
            try:
                pair = None
                if self.stats_where == "clients" and stats is not None:
                    pair = Statistics(own=[stats.own[i], stats.own[j]], cross={(0, 1): stats.cross[(i, j)]},
                                      reference=0)
                elif self.stats_where == "server":
                    pair = collect_statistics([self._model(s) for s in states], self.fit, reference=0,
                                              pairs="all" if self.needs == "stats_all" else "reference",
                                              spec=self.spec, device=self._dev())
                merged, _ = merge_from_statistics(self.template, states, self.spec, pair, method=self.method,
                                                  reference=0, gamma=gamma, bn_reset=self.bn_reset,
                                                  bn_fold=self.bn_fold,
                                                  reset_batches=self.fit, device=self._dev(),
                                                  **{**self.method_kwargs, **fixed})
                return not self._within_bound(rec, merged.state_dict())
            except Exception:  # noqa: BLE001 - this is the diagnosis
                return True

        others = [i for i in range(len(accepted)) if i != ref]
        failing = [i for i in others if fails(ref, i)]
        if not failing:
            return []
        if len(others) >= 2 and len(failing) == len(others):
            return [accepted[ref].partition]
        if len(others) == 1:   # one pair: which of the two it fails on cannot be told apart
            return []
        return sorted(accepted[i].partition for i in failing)

    def _phase_two(self, server_round: int, rec: RoundRecord, accepted: list[ClientUpdate],
                   ranking: list[ClientUpdate]):
        """Send the reference weights to every client (the reference included); collect and check cross
        statistics. A reference that fails, or whose own statistics every other client contradicts, is
        replaced by the next best client and the phase is redone."""
        if self._grid is None:
            raise RoundFailedError("no grid: configure_train was not called")
        kept = list(accepted)
        for attempt in range(self.max_reference_retries + 1):
            ref = next(u for u in ranking if u in kept)
            cross, failed, ref_problem, cross_check_failed = self._query(server_round, rec, kept, ref)
            others = [u for u in kept if u is not ref]
            disagree = [u for u in others if u.partition in cross_check_failed]
            if ref_problem is None and len(others) >= 2 and len(disagree) == len(others):
                ref_problem = (f"the cross statistics of all {len(others)} other clients fail the checks against "
                               "its own statistics (reference mismatch)")
            if ref_problem is None:
                break
            unanswered = ("client error", "no reply")   # the query failed on the client, not a check of its reply
            if not cross and others and all(failed.get(u.partition, "").startswith(unanswered) for u in others) \
                    and ref_problem.startswith(unanswered):
                why = {failed[u.partition] for u in others} | {ref_problem}
                raise RoundFailedError(
                    f"no client answered the cross-statistics query ({'; '.join(sorted(why))}); every ClientApp must "
                    f"answer '{QUERY_CROSS}' (fedmerge.client.make_client_app does, or @app.query() with "
                    "fedmerge.client.cross_reply)")
            self._reject(rec, ref.node, "cross-statistics", f"as reference: {ref_problem}")
            kept.remove(ref)
            if len(kept) < self.min_clients:
                raise RoundFailedError(f"the reference failed and only {len(kept)} clients are left, fewer than "
                                   f"min_clients={self.min_clients}")
            if attempt == self.max_reference_retries:
                raise RoundFailedError(f"{attempt + 1} references failed in the statistics phase")
            log(WARNING, "round %d: reference client %d failed; redoing the statistics phase with another reference",
                rec.round, ref.partition)
        for u in others:
            if u.partition in failed:
                self._reject(rec, u.node, "cross-statistics", failed[u.partition])
        kept = sorted([ref] + [u for u in others if u.partition in cross], key=lambda u: u.partition)
        r = kept.index(ref)
        stats = Statistics(own=[u.own for u in kept],
                           cross={(r, i): cross[u.partition] for i, u in enumerate(kept) if i != r}, reference=r)
        return kept, ref, stats

    def _query(self, server_round: int, rec: RoundRecord, kept: list[ClientUpdate], ref: ClientUpdate):
        """One cross-statistics exchange: (cross blocks by partition, rejection reasons by partition, the
        reference's own problem or None, the partitions whose cross block failed a check against the own blocks)."""
        digest = weights_digest(ref.state)
        ref_record = ArrayRecord({k: v for k, v in ref.state.items()})
        messages = [Message(RecordDict({"reference": ref_record, "config": ConfigRecord({
            "server-round": server_round, "reference-partition": ref.partition, "reference-digest": digest,
            "partition-id": u.partition, "num-partitions": self.num_partitions})}),
            message_type=QUERY_CROSS, dst_node_id=u.node) for u in kept if not u.clipped]
        t = time.time()
        replies = list(self._grid.send_and_receive(messages, timeout=self.query_timeout))
        rec.timings["phase2"] = rec.timings.get("phase2", 0.0) + time.time() - t
        progress.info("round %d: cross statistics against reference client %d: %d replies in %.1f s", server_round,
                      ref.partition, len(replies), time.time() - t)
        by_node = {u.node: u for u in kept}
        got: dict[int, Message] = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if node not in by_node:
                self._reject(rec, node, "cross-statistics", "reply from a node that was not queried")
            elif node in got:
                self._reject(rec, node, "cross-statistics", "a second reply from this node in this phase")
            else:
                got[node] = msg
        del replies   # each reply is dropped once read (got.pop below): statistics are not held twice
        cross, failed, ref_problem, cross_check_failed = {}, {}, None, set()
        t = time.time()
        ref_model = self._model(ref.state) if self.fit is not None else None   # the server's own cross blocks
        ref_acts, whiteners = None, {}
        if ref_model is not None:
            try:   # its activations once for every client's block (recomputed per client, as before, if this fails)
                ref_acts = ReferenceActivations(ref_model, self.fit, self.spec, device=self._dev())
            except Exception:  # noqa: BLE001 - each client's recomputation then reports the problem as before
                ref_acts = None
        for u in kept:
            if u.clipped:   # its upload describes other weights: the server computes its cross block itself
                if u is not ref:
                    try:
                        cross[u.partition] = cross_statistics(ref_model, self._model(u.state), self.fit, self.spec,
                                                              device=self._dev(), cache=ref_acts)
                    except Exception as exc:  # noqa: BLE001 - e.g. non-finite activations of the clipped weights
                        failed[u.partition] = f"cross statistics of the clipped weights ({type(exc).__name__}: {exc})"
                continue
            try:
                c = self._read_cross_reply(rec, got.get(u.node), u, ref, digest, ref_model, ref_acts, whiteners)
            except Exception as exc:  # noqa: BLE001 - ReplyRejected or anything else: this client only
                reason = str(exc) if isinstance(exc, ReplyRejected) else f"unreadable reply ({type(exc).__name__}: {exc})"
                if u is ref:
                    ref_problem = reason
                else:
                    failed[u.partition] = reason
                    if isinstance(exc, CrossCheckFailed):
                        cross_check_failed.add(u.partition)
                continue
            self._account(rec, u.partition, got.pop(u.node).content, None, "cross-stats")
            if u is not ref:
                cross[u.partition] = c
        rec.timings["verify_cross_statistics"] = rec.timings.get("verify_cross_statistics", 0.0) + time.time() - t
        return cross, failed, ref_problem, cross_check_failed

    def _read_cross_reply(self, rec: RoundRecord, msg: Message | None, u: ClientUpdate, ref: ClientUpdate, digest: str,
                          ref_model: nn.Module | None, ref_acts: ReferenceActivations | None = None,
                          whiteners: dict | None = None):
        if msg is None:
            raise ReplyRejected("no reply to the cross-statistics query (timed out)")
        if msg.has_error():
            raise ReplyRejected(client_error(msg.error.reason))
        rd = msg.content
        metrics = read_metrics(rd, need_examples=False, num_partitions=self.num_partitions)
        if metrics.partition is not None and metrics.partition != u.partition:
            raise ReplyRejected(f"reports partition {metrics.partition}, but node {u.node} is partition {u.partition}")
        check_size(rd, self.max_upload_bytes)
        check_echo(rd, "reference-digest", digest,
                   "cross statistics computed against another reference (reference digest differs)")
        c, enc = decode_statistics(rd, "cross-stats", decode_cross, self.spec, "cross", "cross statistics")
        wire = transport([enc, ref.own_encoding, u.own_encoding])
        check_cross(c, ref.own, u.own, self.expected_counts, wire=wire, whiteners=whiteners)
        if ref_model is not None and u is not ref:
            # with a server probe the cross block is recomputed from the two uploaded models, checked and used:
            # it decides CCA's rotation, which no consistency check can pin down
            computed = cross_statistics(ref_model, self._model(u.state), self.fit, self.spec, device=self._dev(),
                                        cache=ref_acts)
            check_cross_matches(c, computed, wire)
            c = computed
        if "seconds-cross-stats" in metrics.values and u.partition in rec.client_metrics:
            rec.client_metrics[u.partition]["seconds-cross-stats"] = metrics.values["seconds-cross-stats"]
        return c
