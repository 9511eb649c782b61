"""``CCAMerge``: a Flower strategy that merges client models with CCA Merge (or any fedmerge method).

One round:

1. ``configure_train`` sends the global weights (empty in round 1 unless ``common_init``) with each node's
   partition (when the node has none of its own) and whether to upload probe statistics.
2. ``aggregate_train`` validates every reply (keys, shapes, dtypes, finite values, statistics blocks in any
   :mod:`fedmerge.common.compress` encoding, sample counts, size cap), picks the reference (an index or the
   best on the probe), and, in the default two-phase protocol, sends the reference weights to every other
   client in a ``query.cross_stats`` message inside the same round; clients answer with the cross
   statistics. In ``stats_on_server`` mode
   (the server holds the probe) the server computes all statistics from the uploaded weights instead.
3. It aligns every model to the reference, averages (weighted by sample counts), resets BatchNorm or
   applies REPAIR, and returns the merged weights, which ``Strategy.start`` redistributes next round.

A bad or missing reply never stops the round: the client is dropped with a reason (``history`` and
the log), and the merge goes on if at least ``min_clients`` remain; otherwise the round fails and the
previous global model is kept.

    strategy = CCAMerge(model_fn=lambda: MyNet(), probe=probe_images, method="cca")
    result = strategy.start(grid, ArrayRecord(), num_rounds=1)
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmerge.common.graph import MergeSpec, derive_spec
from fedmerge.common.merge import GAMMA_GRID, METHODS, merge_from_statistics
from fedmerge.common.probe import Batches, as_batches
from fedmerge.common.records import record_to_arrays
from fedmerge.common.compress import decode_cross, decode_moments
from fedmerge.common.stats import Statistics, collect_statistics

__all__ = ["CCAMerge", "RoundRecord", "ReplyRejected"]

QUERY_CROSS = "query.cross_stats"


class ReplyRejected(ValueError):
    """A client reply failed a check; the message names the check."""


@dataclass
class RoundRecord:
    """What happened in one round (kept in ``CCAMerge.history`` and written to result.json)."""

    round: int
    ok: bool = False
    error: str | None = None
    clients_merged: list[int] = field(default_factory=list)       # partition ids
    clients_rejected: list[dict] = field(default_factory=list)    # {node, partition, phase, reason}
    reference: int | None = None                                  # partition id of the reference
    gamma: float | None = None
    client_metrics: dict[int, dict] = field(default_factory=dict)  # partition id -> reported metrics
    bytes_uploaded: dict[int, int] = field(default_factory=dict)   # partition id -> bytes (both phases)
    bytes_weights: dict[int, int] = field(default_factory=dict)    # partition id -> bytes of the weights record
    bytes_statistics: dict[int, int] = field(default_factory=dict)  # partition id -> own + cross statistics bytes
    timings: dict[str, float] = field(default_factory=dict)
    merge_info: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "RoundRecord":
        return cls(round=int(d["round"]), ok=bool(d["ok"]), error=d.get("error"),
                   clients_merged=list(d.get("clients_merged", [])),
                   clients_rejected=list(d.get("clients_rejected", [])), reference=d.get("reference"),
                   gamma=d.get("gamma"), client_metrics={int(k): v for k, v in d.get("client_metrics", {}).items()},
                   bytes_uploaded={int(k): v for k, v in d.get("bytes_uploaded", {}).items()},
                   bytes_weights={int(k): v for k, v in d.get("bytes_weights", {}).items()},
                   bytes_statistics={int(k): v for k, v in d.get("bytes_statistics", {}).items()},
                   timings=dict(d.get("timings", {})), merge_info=dict(d.get("merge_info", {})))

    def to_dict(self) -> dict:
        return {"round": self.round, "ok": self.ok, "error": self.error, "clients_merged": self.clients_merged,
                "clients_rejected": self.clients_rejected, "reference": self.reference, "gamma": self.gamma,
                "client_metrics": {str(k): v for k, v in self.client_metrics.items()},
                "bytes_uploaded": {str(k): v for k, v in self.bytes_uploaded.items()},
                "bytes_weights": {str(k): v for k, v in self.bytes_weights.items()},
                "bytes_statistics": {str(k): v for k, v in self.bytes_statistics.items()},
                "timings": self.timings, "merge_info": self.merge_info}


def _record_bytes(rd: RecordDict) -> int:
    total = 0
    for rec in list(rd.array_records.values()) + list(rd.metric_records.values()) + list(
            rd.config_records.values()):
        total += rec.count_bytes()
    return total


class CCAMerge(FedAvg):
    """Merge client models by aligning them to one reference (CCA Merge by default) and averaging.

    model_fn: builds the architecture (a zero-argument callable, or a module used as template).
    probe: the shared probe set on the server (tensor, (x, y) pair, DataLoader or Batches, split here into a
        fitting part and a held-out part; or a ``(fit, held_out)`` pair of Batches). Needed for
        ``gamma="auto"``, BatchNorm reset, REPAIR, ``stats_on_server`` and methods that need all pairs
        (ZipIt!); with labels, ``reference="best"`` and γ are chosen by accuracy on its held-out slice.
    method: any of ``fedmerge.common.merge.METHODS`` (``avg`` gives plain FedAvg for comparison).
    reference: a client position (in partition order) or ``"best"``.
    """

    def __init__(self, model_fn: Callable[[], nn.Module] | nn.Module, probe: Any = None, *, method: str = "cca",
                 reference: int | str = "best", gamma: float | str = "auto", bn_reset: bool | None = None,
                 repair: bool = False, weighted: bool = True, num_clients: int | None = None,
                 min_clients: int = 2, stats_on_server: bool = False, query_timeout: float = 600.0,
                 wait_for_clients: float = 120.0, held_out: float = 0.2, seed: int = 0, device=None,
                 gamma_grid: Sequence[float] = GAMMA_GRID, max_upload_bytes: int | None = None,
                 example_input: torch.Tensor | None = None, train_config: dict | None = None,
                 **method_kwargs) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        if min_clients < 1:
            raise ValueError("min_clients must be >= 1")
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_clients,
                         min_evaluate_nodes=0, min_available_nodes=min_clients)
        self.model_fn = model_fn if callable(model_fn) and not isinstance(model_fn, nn.Module) else (
            lambda m=model_fn: copy.deepcopy(m))
        self.method, self.reference, self.gamma = method, reference, gamma
        self.bn_reset, self.repair, self.weighted = bn_reset, repair, weighted
        self.num_clients, self.min_clients = num_clients, min_clients
        self.stats_on_server, self.query_timeout = stats_on_server, query_timeout
        self.wait_for_clients = wait_for_clients
        self.device, self.gamma_grid, self.seed = device, tuple(gamma_grid), seed
        self.method_kwargs = method_kwargs
        self.train_config = dict(train_config or {})
        self.needs = METHODS[method].needs
        if self.needs == "stats_all" or (stats_on_server and self.needs == "stats"):
            self.stats_where = "server"
        elif self.needs == "stats":
            self.stats_where = "clients"
        else:
            self.stats_where = "none"

        self.template = self.model_fn().cpu().eval()
        self.fit: Batches | None = None
        self.held: Batches | None = None
        if isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(b, Batches) for b in probe):
            self.fit, self.held = probe  # already split (the clients compute statistics on the same ``fit``)
        elif probe is not None:
            batches = as_batches(probe)
            self.fit, self.held = batches.split(held_out, seed)
        example = example_input if example_input is not None else (self.fit.example() if self.fit else None)
        if example is None:
            raise ValueError("CCAMerge needs a probe or an example_input to derive the merge spec")
        self.spec: MergeSpec = derive_spec(self.template, example)
        self._check_needs_probe()
        self.keys = {k: (tuple(v.shape), v.dtype) for k, v in self.template.state_dict().items()}
        self.model_bytes = sum(v.numel() * v.element_size() for v in self.template.state_dict().values())
        self.max_upload_bytes = max_upload_bytes or int(8 * self.model_bytes + self._stats_bytes_bound() + 2 ** 20)
        self.history: list[RoundRecord] = []
        self.partitions: dict[int, int] = {}      # node id -> partition id (assigned when first seen)
        self.last_states: dict[int, dict[str, torch.Tensor]] = {}  # partition -> weights of the last round
        self._grid: Grid | None = None
        self.round_offset = 0  # rounds finished before a resume: Strategy.start counts from 1 again

    # --- set-up checks ----------------------------------------------------------------------------------
    def _check_needs_probe(self) -> None:
        if self.fit is not None:
            return
        from fedmerge.common.merge import has_batchnorm

        problems = []
        if self.gamma == "auto" and METHODS[self.method].tunable_gamma:
            problems.append("gamma='auto' (pass a number)")
        # reference="best" is allowed: without a probe it is chosen from client-reported probe accuracy
        if self.bn_reset or (self.bn_reset is None and has_batchnorm(self.template)):
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
        log(INFO, "\t├──> CCAMerge: method=%s reference=%s gamma=%s statistics=%s", self.method, self.reference,
            self.gamma, self.stats_where)
        log(INFO, "\t└──> merge spec: %d groups, %d layers; min clients %d", len(self.spec.groups),
            len(self.spec.layers), self.min_clients)

    # --- phase 1 ------------------------------------------------------------------------------------------
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
        if not self.partitions:
            self.partitions = {n: i for i, n in enumerate(nodes)}
            self._num_partitions = len(nodes)
        unknown = [n for n in nodes if n not in self.partitions]
        if unknown:
            log(WARNING, "nodes %s joined after round 1 and have no partition; not sampled", unknown)
        return [n for n in nodes if n in self.partitions]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._grid = grid
        self._round_start = time.time()
        nodes = self._sample(grid)
        messages = []
        for node in nodes:
            cfg = ConfigRecord({**dict(config), **self.train_config, "server-round": server_round,
                                "partition-id": self.partitions[node], "num-partitions": self._num_partitions,
                                "want-stats": self.stats_where == "clients"})
            messages.append(Message(RecordDict({"arrays": arrays, "config": cfg}), message_type="train",
                                    dst_node_id=node))
        log(INFO, "configure_train: round %d, %d clients", server_round, len(messages))
        return messages

    # --- validation -------------------------------------------------------------------------------------------
    def _validate_train_reply(self, msg: Message) -> tuple[dict[str, torch.Tensor], dict, Any]:
        rd = msg.content
        self._check_size(rd)
        if "arrays" not in rd.array_records:
            raise ReplyRejected("reply has no 'arrays' record (model weights)")
        if "metrics" not in rd.metric_records:
            raise ReplyRejected("reply has no 'metrics' record")
        arrays = rd.array_records["arrays"]
        got, want = set(arrays.keys()), set(self.keys)
        if got != want:
            missing, extra = sorted(want - got)[:5], sorted(got - want)[:5]
            raise ReplyRejected(f"weights keys differ from the global model (missing {missing}, unexpected {extra})")
        state = {}
        for k, (shape, dtype) in self.keys.items():
            a = arrays[k]
            if tuple(a.shape) != shape:
                raise ReplyRejected(f"weight '{k}' has shape {tuple(a.shape)}, expected {shape}")
            t = torch.from_numpy(np.array(a.numpy(), copy=True))
            if t.dtype.is_floating_point != dtype.is_floating_point:
                raise ReplyRejected(f"weight '{k}' has dtype {t.dtype}, expected {dtype}")
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                raise ReplyRejected(f"weight '{k}' contains NaN or Inf")
            state[k] = t.to(dtype)
        metrics = dict(rd.metric_records["metrics"])
        n = metrics.get("num-examples")
        if not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
            raise ReplyRejected(f"num-examples must be a positive number, got {n!r}")
        own = None
        if self.stats_where == "clients":
            if "own-stats" not in rd.array_records:
                raise ReplyRejected("reply has no 'own-stats' record (probe statistics)")
            try:
                own = decode_moments(record_to_arrays(rd.array_records["own-stats"]), self.spec)
            except (KeyError, ValueError) as exc:
                raise ReplyRejected(f"own statistics: {exc}") from None
            self._check_count(own, "own statistics")
        return state, metrics, own

    def _check_size(self, rd: RecordDict) -> int:
        size = _record_bytes(rd)
        if size > self.max_upload_bytes:
            raise ReplyRejected(f"upload of {size} bytes exceeds the cap of {self.max_upload_bytes} bytes")
        return size

    def _check_count(self, blocks: dict, what: str) -> None:
        expected = self.fit.num_samples if self.fit is not None else None
        for g, m in blocks.items():
            if m.n <= 1:
                raise ReplyRejected(f"{what}: group {g} has {m.n} samples")
            if expected is not None:
                # each probe image gives >= 1 sample (convs: one per spatial position)
                if m.n < expected:
                    raise ReplyRejected(f"{what}: group {g} has {m.n} samples, fewer than the {expected} "
                                        "probe images: computed on a different probe?")

    # --- phase 2 and merge ------------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        rec = RoundRecord(round=server_round)
        self.history.append(rec)
        t_round = time.time()
        replies = list(replies)
        accepted: list[tuple[int, int, dict, dict, Any]] = []  # (node, partition, state, metrics, own)
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            part = self.partitions.get(node, -1)
            if msg.has_error():
                self._reject(rec, node, part, "train", f"client error: {msg.error.reason}")
                continue
            try:
                state, metrics, own = self._validate_train_reply(msg)
            except ReplyRejected as exc:
                self._reject(rec, node, part, "train", str(exc))
                continue
            part = int(metrics.get("partition-id", part))
            rec.bytes_uploaded[part] = rec.bytes_uploaded.get(part, 0) + _record_bytes(msg.content)
            ars = msg.content.array_records
            rec.bytes_weights[part] = rec.bytes_weights.get(part, 0) + ars["arrays"].count_bytes()
            if "own-stats" in ars:
                rec.bytes_statistics[part] = rec.bytes_statistics.get(part, 0) + ars["own-stats"].count_bytes()
            rec.client_metrics[part] = {k: (float(v) if isinstance(v, (int, float)) else v)
                                        for k, v in metrics.items()}
            accepted.append((node, part, state, metrics, own))
        missing = set(self.partitions) - {int(m.metadata.src_node_id) for m in replies}
        for node in sorted(missing):
            if self.partitions[node] < getattr(self, "_num_partitions", 0):
                self._reject(rec, node, self.partitions[node], "train", "no reply (timed out)")
        accepted.sort(key=lambda a: a[1])
        rec.timings["phase1_wait"] = t_round - getattr(self, "_round_start", t_round)
        try:
            return self._merge_round(server_round, rec, accepted)
        except _RoundFailed as exc:
            rec.ok, rec.error = False, str(exc)
            log(ERROR, "round %d failed: %s; keeping the previous global model", server_round, exc)
            return None, None

    def _reject(self, rec: RoundRecord, node: int, part: int, phase: str, reason: str) -> None:
        rec.clients_rejected.append({"node": node, "partition": part, "phase": phase, "reason": reason})
        log(WARNING, "round %d: rejected client %s (node %d) in %s: %s", rec.round, part, node, phase, reason)

    def _choose_reference(self, accepted) -> tuple[int, list[float]]:
        if self.reference != "best":
            r = int(self.reference)
            parts = [a[1] for a in accepted]
            if r in parts:
                return parts.index(r), []
            log(WARNING, "reference client %d is not among the merged clients; using the best instead", r)
        if self.held is not None:
            from fedmerge.common.merge import probe_logits, probe_score

            ens = None
            if not self.held.has_labels:
                ens = torch.stack([probe_logits(self._model(a[2]), self.held, self._dev()) for a in accepted]).mean(0)
            scores = [probe_score(probe_logits(self._model(a[2]), self.held, self._dev()), self.held, ens)[0]
                      for a in accepted]
        else:
            scores = [float(a[3].get("probe-accuracy", 0.0)) for a in accepted]
        return int(np.argmax(scores)), [float(s) for s in scores]

    def _model(self, state) -> nn.Module:
        m = self.model_fn()
        m.load_state_dict(state)
        return m.eval()

    def _dev(self):
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _merge_round(self, server_round: int, rec: RoundRecord, accepted):
        if len(accepted) < self.min_clients:
            raise _RoundFailed(f"only {len(accepted)} valid client replies, fewer than min_clients="
                               f"{self.min_clients}")
        t = time.time()
        ref, scores = self._choose_reference(accepted)
        rec.timings["select_reference"] = time.time() - t
        stats = None
        if self.stats_where == "clients":
            accepted, ref, stats = self._phase_two(server_round, rec, accepted, ref)
        elif self.stats_where == "server":
            t = time.time()
            models = [self._model(a[2]) for a in accepted]
            stats = collect_statistics(models, self.fit, reference=ref,
                                       pairs="all" if self.needs == "stats_all" else "reference", spec=self.spec,
                                       device=self._dev())
            rec.timings["server_statistics"] = time.time() - t
        if len(accepted) < self.min_clients:
            raise _RoundFailed(f"only {len(accepted)} clients left after the statistics phase, fewer than "
                               f"min_clients={self.min_clients}")
        states = [a[2] for a in accepted]
        counts = [float(a[3]["num-examples"]) for a in accepted]
        weights = [c / sum(counts) for c in counts] if self.weighted else None
        t = time.time()
        merged, info = merge_from_statistics(
            self.template, states, self.spec, stats, method=self.method, reference=ref,
            gamma=self.gamma if METHODS[self.method].tunable_gamma else None, weights=weights,
            bn_reset=self.bn_reset, repair=self.repair, reset_batches=self.fit, eval_batches=self.held,
            gamma_grid=self.gamma_grid, device=self._dev(),
            repair_models=[self._model(s) for s in states] if self.repair else None, **self.method_kwargs)
        rec.timings["merge"] = time.time() - t
        rec.timings.update({f"merge_{k}": v for k, v in info.timings.items()})
        for a in accepted:
            self.last_states[a[1]] = a[2]
        rec.ok = True
        rec.clients_merged = [a[1] for a in accepted]
        rec.reference = accepted[ref][1]
        rec.gamma = info.gamma
        rec.merge_info = {"reference_scores": scores, "gamma_scores": {str(k): v for k, v in info.gamma_scores.items()},
                          "bn_reset": info.bn_reset, "repair": info.repair, "weights": weights}
        log(INFO, "round %d: merged %d clients with %s (reference client %d, gamma %s)", server_round,
            len(accepted), self.method, rec.reference, info.gamma)
        sd = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
        metrics = MetricRecord({"clients-merged": len(accepted), "clients-rejected": len(rec.clients_rejected),
                                "num-examples": int(sum(counts))})
        return ArrayRecord(sd), metrics

    def _phase_two(self, server_round: int, rec: RoundRecord, accepted, ref: int):
        """Send the reference weights to every other client; collect and validate cross statistics."""
        grid = self._grid
        if grid is None:
            raise _RoundFailed("no grid: configure_train was not called")
        # the reference is not queried, so it cannot drop out of this phase
        ref_part, ref_state = accepted[ref][1], accepted[ref][2]
        t = time.time()
        ref_record = ArrayRecord({k: v for k, v in ref_state.items()})
        messages = [Message(RecordDict({"reference": ref_record,
                                        "config": ConfigRecord({"server-round": server_round,
                                                                "reference-partition": ref_part,
                                                                "partition-id": a[1],
                                                                "num-partitions": self._num_partitions})}),
                            message_type=QUERY_CROSS, dst_node_id=a[0])
                    for i, a in enumerate(accepted) if i != ref]
        replies = {int(m.metadata.src_node_id): m for m in grid.send_and_receive(messages,
                                                                                 timeout=self.query_timeout)}
        rec.timings["phase2"] = rec.timings.get("phase2", 0.0) + time.time() - t
        kept, cross = [accepted[ref]], {}
        for i, a in enumerate(accepted):
            if i == ref:
                continue
            node, part = a[0], a[1]
            msg = replies.get(node)
            try:
                if msg is None:
                    raise ReplyRejected("no reply to the cross-statistics query (timed out)")
                if msg.has_error():
                    raise ReplyRejected(f"client error: {msg.error.reason}")
                if "cross-stats" not in msg.content.array_records:
                    raise ReplyRejected("reply has no 'cross-stats' record")
                size = _record_bytes(msg.content)
                if size > self.max_upload_bytes:
                    raise ReplyRejected(f"upload of {size} bytes exceeds the cap of {self.max_upload_bytes}")
                try:
                    c = decode_cross(record_to_arrays(msg.content.array_records["cross-stats"]), self.spec)
                except (KeyError, ValueError) as exc:
                    raise ReplyRejected(f"cross statistics: {exc}") from None
                self._check_count(c, "cross statistics")
            except ReplyRejected as exc:
                self._reject(rec, node, part, "cross-statistics", str(exc))
                continue
            rec.bytes_uploaded[part] = rec.bytes_uploaded.get(part, 0) + size
            rec.bytes_statistics[part] = (rec.bytes_statistics.get(part, 0)
                                          + msg.content.array_records["cross-stats"].count_bytes())
            t_c = msg.content.metric_records.get("metrics", {}).get("seconds-cross-stats", 0.0)
            rec.client_metrics[part]["seconds-cross-stats"] = float(t_c)
            kept.append(a)
            cross[part] = c
        kept.sort(key=lambda a: a[1])
        new_ref = [a[1] for a in kept].index(ref_part)
        own = [a[4] for a in kept]
        stats = Statistics(own=own, cross={(new_ref, i): cross[a[1]] for i, a in enumerate(kept)
                                           if i != new_ref}, reference=new_ref)
        return kept, new_ref, stats


class _RoundFailed(RuntimeError):
    pass
