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

The parts: reply checks (:mod:`~fedmerge.server.checks`, :mod:`~fedmerge.server.replies`), node identity
(:mod:`~fedmerge.server.identity`), round-level screening (:mod:`~fedmerge.server.screening`), the cross-statistics
phase (:mod:`~fedmerge.server.phase2`), the merge (:mod:`~fedmerge.server.merging`) and the round record
(:mod:`~fedmerge.server.history`). A second reply from one node in a phase, and a reply from a node that was not
asked, are rejected.

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
import time
from logging import ERROR, INFO, WARNING
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmerge.common import progress
from fedmerge.common.engine.graph import MergeSpec, derive_spec
from fedmerge.common.engine.linalg import default_device
from fedmerge.common.engine.merge import (
    GAMMA_GRID,
    METHODS,
    REPAIR_TARGETS,
    check_gamma_clients,
    has_batchnorm,
)
from fedmerge.common.engine.refine import check_refine, refine_options
from fedmerge.common.engine.stats import samples_per_input
from fedmerge.common.task.config import FedConfig, parse_method_schedule
from fedmerge.common.wire import keys
from fedmerge.common.wire.probe import Batches, as_batches, probe_digest

from .checks import MAX_EXAMPLES, ReplyRejected, read_metrics, record_bytes, weight_norm
from .history import RoundFailedError, RoundRecord
from .identity import Identities
from .merging import Merging
from .phase2 import PhaseTwo
from .replies import ClientUpdate, OwnExpectation, read_train_reply, reply_content
from .schedule import MethodSchedule
from .screening import Screening

__all__ = ["CCAMerge", "RoundRecord", "ReplyRejected", "RoundFailedError", "ClientUpdate", "QUERY_CROSS"]

QUERY_CROSS = keys.QUERY_CROSS
NORM_ACTIONS = ("reject", "clip")
ON_FAILED_ROUND = ("keep", "raise")


class CCAMerge(MethodSchedule, Identities, Screening, PhaseTwo, Merging, FedAvg):
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
    np_merge: NP Merge after the merge (after REPAIR when ``repair``): merge coefficients learned on the
        server's **labelled** probe (True or a dict of options). distill: last, fit the merged model to the
        clients' logit ensemble on the server's probe, label-free (True or a dict of options); see
        :func:`fedmerge.common.engine.merge.merge_models`.
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
                 np_merge: bool | dict = False, distill: bool | dict = False,
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
        # the refinements' options checked now (names, values), and again with the probe below
        self.np_merge, self.distill = refine_options(np_merge, distill)
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
        if self.fit is not None:   # without a probe, _check_needs_probe named them above
            check_refine(self.np_merge, self.distill, self.bn_fold, self.fit, self.held, teachers=True)
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
        mismatch = "" if self.fit is None else (
            "statistics computed on a different probe (probe digest differs; the server's probe is "
            f"{self.fit.num_samples + self.held.num_samples} inputs, of which the clients' statistics "
            f"use {self.fit.num_samples}: every client needs the same probe inputs in the same order)")
        self.own_expectation = OwnExpectation(self.spec, self.expected_counts, self.probe_digest, mismatch)

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
        self._global: dict[str, torch.Tensor] | None = None   # this round's global weights (None: own inits)
        self.grid: Grid | None = None   # where phase 2 queries: attached by start (or attach)
        self._round_start = 0.0

    @classmethod
    def from_config(cls, cfg: FedConfig, *, probe: Any = None, model_fn: Callable[[], nn.Module] | None = None,
                    max_examples: int | Mapping[int, int] | Callable[[int], int] | None = None,
                    **overrides) -> "CCAMerge":
        """The strategy a :class:`~fedmerge.common.task.config.FedConfig` describes (what ``fedmerge simulate`` and
        the ServerApp run): the config's model (``model_fn``) and probe split (``probe``, default
        ``probe_batches(cfg)``); ``overrides`` replace any keyword argument."""
        from fedmerge.common.task.loaders import build_global_model, probe_batches

        kw = dict(
            model_fn=model_fn or (lambda: build_global_model(cfg, seed=cfg.seed)),
            probe=probe if probe is not None else probe_batches(cfg), method=cfg.method,
            reference=cfg.reference_value, gamma=cfg.gamma_value, bn_reset=cfg.bn_reset_value, repair=cfg.repair,
            repair_target=cfg.repair_target, bn_fold=cfg.bn_fold, weighted=cfg.weighted,
            num_clients=cfg.num_clients, min_clients=cfg.min_clients, stats_on_server=cfg.stats_on_server,
            query_timeout=cfg.timeout, held_out=cfg.held_out, seed=cfg.seed,
            device=cfg.device or None, max_examples=max_examples,
            norm_bound=cfg.norm_bound or None, norm_action=cfg.norm_action,
            method_schedule=cfg.method_schedule or None,
            np_merge=cfg.np_merge, distill=cfg.distill,
            **({"gamma_clients": cfg.gamma_clients} if cfg.gamma_clients else {}))
        return cls(**{**kw, **overrides})

    # --- the grid ---------------------------------------------------------------------------------------------
    def attach(self, grid: Grid) -> None:
        """Hold the grid that phase 2 queries (Flower hands a grid only to ``configure_*``); ``start`` does this."""
        self.grid = grid

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args, **kwargs):
        self.attach(grid)
        return super().start(grid, initial_arrays, *args, **kwargs)

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
        if self.np_merge is not None or self.distill is not None:
            problems.append("NP Merge / distillation (they learn on the server's probe)")
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

    # --- phase 1 ------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
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
        messages = [self._train_message(server_round, node, arrays, config) for node in nodes]
        progress.info("round %d: %d clients training", server_round, len(messages))
        return messages

    def _train_message(self, server_round: int, node: int, arrays: ArrayRecord, config: ConfigRecord) -> Message:
        extra = {**self.probe_split, **({keys.PROBE_DIGEST: self.probe_digest} if self.probe_digest else {})}
        cfg = ConfigRecord({**dict(config), **self.train_config, **extra, keys.SERVER_ROUND: server_round,
                            keys.PARTITION_ID: self._label(node), keys.NUM_PARTITIONS: self.num_partitions,
                            keys.WANT_STATS: self.stats_where == "clients"})
        return Message(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: cfg}), message_type="train", dst_node_id=node)

    def _read_train_reply(self, node: int, msg: Message) -> ClientUpdate:
        """Every check of one training reply (raises ReplyRejected naming the failed check)."""
        rd = reply_content(msg)
        metrics = read_metrics(rd, num_partitions=self.num_partitions)
        part = self._identify(node, metrics.partition)
        self._claimed[node] = part
        return read_train_reply(rd, node, part, metrics, max_examples=self._examples_cap(part),
                                max_upload_bytes=self.max_upload_bytes, weights=self.keys,
                                own=self.own_expectation if self.stats_where == "clients" else None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        rec = RoundRecord(round=server_round, method=self.method)
        self.history.append(rec)
        t_round = time.time()
        accepted = self._read_train_replies(rec, replies)
        rec.timings["phase1_wait"] = t_round - self._round_start
        progress.info("round %d: %d of %d training replies pass the reply checks (after %.1f s)", server_round,
                      len(accepted), len(self._sampled), rec.timings["phase1_wait"])
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

    def _read_train_replies(self, rec: RoundRecord, replies: Iterable[Message]) -> list[ClientUpdate]:
        """The replies that pass every check, one per sampled node; every other node is rejected with a reason."""
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
                upd = self._read_train_reply(node, msg)
            except ReplyRejected as exc:
                self._reject(rec, node, "train", str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - any failure reading a reply rejects that client only
                self._reject(rec, node, "train", f"unreadable reply ({type(exc).__name__}: {exc})")
                continue
            self._account(rec, upd.partition, msg.content, keys.ARRAYS, keys.OWN_STATS)
            rec.client_metrics[upd.partition] = dict(upd.metrics.values)
            accepted.append(upd)
            for key in (keys.ARRAYS, keys.OWN_STATS):   # decoded above: the reply's copy is released
                if key in msg.content.array_records:
                    del msg.content[key]
        for node in sorted(self._sampled - seen):
            self._reject(rec, node, "train", "no reply (timed out)")
        return accepted

    def _account(self, rec: RoundRecord, part: int, rd: RecordDict, weights_key: str | None, stats_key: str) -> None:
        ars = rd.array_records
        rec.bytes_uploaded[part] = rec.bytes_uploaded.get(part, 0) + record_bytes(rd)
        if weights_key and weights_key in ars:
            rec.bytes_weights[part] = rec.bytes_weights.get(part, 0) + ars[weights_key].count_bytes()
        if stats_key in ars:
            rec.bytes_statistics[part] = rec.bytes_statistics.get(part, 0) + ars[stats_key].count_bytes()

    # --- helpers -------------------------------------------------------------------------------------------
    def _model(self, state) -> nn.Module:
        m = self.model_fn()
        m.load_state_dict(state)
        return m.eval()

    def _dev(self) -> torch.device:
        return default_device(self.device)

