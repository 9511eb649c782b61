"""Phase 2 of the two-phase protocol (methods of :class:`~fedmerge.server.strategy.CCAMerge`): the reference
weights go to every client -- the reference included -- in a ``query.cross_stats`` message inside the same round;
clients answer with cross statistics and echo the digest of the reference they used. When the reference fails in
this phase, the next best client becomes the reference and the phase is redone."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from fedmerge.common import progress
from fedmerge.common.engine.stats import (
    GroupCross,
    ReferenceActivations,
    Statistics,
    cross_statistics,
)
from fedmerge.common.wire import keys
from fedmerge.common.wire.records import weights_digest

from .checks import CrossCheckFailed, ReplyRejected
from .history import RoundFailedError, RoundRecord
from .replies import ClientUpdate, read_cross_reply, reference_record

__all__ = ["PhaseTwo", "CrossExchange"]


@dataclass
class CrossExchange:
    """What one cross-statistics exchange gave."""

    cross: dict[int, GroupCross] = field(default_factory=dict)   # partition -> checked cross block
    failed: dict[int, str] = field(default_factory=dict)         # partition -> why its block was rejected
    ref_problem: str | None = None                               # why the reference's own answer failed
    cross_check_failed: set[int] = field(default_factory=set)    # partitions whose block contradicts own blocks


class PhaseTwo:
    """The cross-statistics query and the retries with another reference."""

    def _phase_two(self, server_round: int, rec: RoundRecord, accepted: list[ClientUpdate],
                   ranking: list[ClientUpdate]):
        """Send the reference weights to every client (the reference included); collect and check cross
        statistics. A reference that fails, or whose own statistics every other client contradicts, is
        replaced by the next best client and the phase is redone."""
        if self.grid is None:
            raise RoundFailedError("no grid: call start(grid, ...) or attach(grid) first")
        kept = list(accepted)
        for attempt in range(self.max_reference_retries + 1):
            ref = next(u for u in ranking if u in kept)
            ex = self._query(server_round, rec, kept, ref)
            cross, failed, ref_problem = ex.cross, ex.failed, ex.ref_problem
            others = [u for u in kept if u is not ref]
            disagree = [u for u in others if u.partition in ex.cross_check_failed]
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
                    f"answer '{keys.QUERY_CROSS}' (fedmerge.client.make_client_app does, or @app.query() with "
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
        """One cross-statistics exchange against ``ref``, every reply read with :func:`read_cross_reply`."""
        digest = weights_digest(ref.state)
        ref_record = reference_record(ref)
        messages = [Message(RecordDict({keys.REFERENCE: ref_record, keys.CONFIG: ConfigRecord({
            keys.SERVER_ROUND: server_round, keys.REFERENCE_PARTITION: ref.partition, keys.REFERENCE_DIGEST: digest,
            keys.PARTITION_ID: u.partition, keys.NUM_PARTITIONS: self.num_partitions})}),
            message_type=keys.QUERY_CROSS, dst_node_id=u.node) for u in kept if not u.clipped]
        t = time.time()
        replies = list(self.grid.send_and_receive(messages, timeout=self.query_timeout))
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
        ex = CrossExchange()
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
                        ex.cross[u.partition] = cross_statistics(ref_model, self._model(u.state), self.fit, self.spec,
                                                              device=self._dev(), cache=ref_acts)
                    except Exception as exc:  # noqa: BLE001 - e.g. non-finite activations of the clipped weights
                        ex.failed[u.partition] = (f"cross statistics of the clipped weights "
                                                  f"({type(exc).__name__}: {exc})")
                continue
            try:
                recompute = None if ref_model is None or u is ref else (
                    lambda u=u: cross_statistics(ref_model, self._model(u.state), self.fit, self.spec,
                                                 device=self._dev(), cache=ref_acts))
                c, metrics = read_cross_reply(got.get(u.node), u, ref, digest, spec=self.spec,
                                              counts=self.expected_counts, num_partitions=self.num_partitions,
                                              max_upload_bytes=self.max_upload_bytes, recompute=recompute,
                                              whiteners=whiteners)
            except Exception as exc:  # noqa: BLE001 - ReplyRejected or anything else: this client only
                reason = str(exc) if isinstance(exc, ReplyRejected) else \
                    f"unreadable reply ({type(exc).__name__}: {exc})"
                if u is ref:
                    ex.ref_problem = reason
                else:
                    ex.failed[u.partition] = reason
                    if isinstance(exc, CrossCheckFailed):
                        ex.cross_check_failed.add(u.partition)
                continue
            if keys.SECONDS_CROSS_STATS in metrics.values and u.partition in rec.client_metrics:
                rec.client_metrics[u.partition][keys.SECONDS_CROSS_STATS] = metrics.values[keys.SECONDS_CROSS_STATS]
            self._account(rec, u.partition, got.pop(u.node).content, None, keys.CROSS_STATS)
            if u is not ref:
                ex.cross[u.partition] = c
        rec.timings["verify_cross_statistics"] = rec.timings.get("verify_cross_statistics", 0.0) + time.time() - t
        return ex
