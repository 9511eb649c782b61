"""Reading one client reply: every check of :mod:`fedmerge.server.checks` in the order the protocol needs them.

Pure functions: each takes a reply and what the server knows, and returns the checked content or raises
:class:`~fedmerge.server.checks.ReplyRejected` naming the failed check. :class:`ClientUpdate` is what a checked
training reply becomes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.stats import GroupCross, GroupMoments
from fedmerge.common.wire import keys
from fedmerge.common.wire.compress import decode_cross, decode_moments

from .checks import (
    ClientMetrics,
    ReplyRejected,
    check_cross,
    check_cross_matches,
    check_echo,
    check_moments,
    check_size,
    decode_statistics,
    decode_weights,
    psd_tolerance,
    read_metrics,
    transport,
)
from .history import client_error

__all__ = ["ClientUpdate", "OwnExpectation", "read_train_reply", "read_cross_reply", "reference_record"]


@dataclass(eq=False)
class ClientUpdate:
    """One client's checked training reply."""

    node: int
    partition: int
    state: dict[str, torch.Tensor]
    metrics: ClientMetrics
    own: GroupMoments | None = None   # decoded own statistics (two-phase protocol)
    own_encoding: dict = field(default_factory=dict)  # group -> how the own block was sent (dtype, form)
    clipped: bool = False     # weights scaled by the norm bound: its statistics are the server's


@dataclass(frozen=True)
class OwnExpectation:
    """What an honest client's own statistics must look like: the server's merge spec, the probe's sample counts
    (None without a server probe) and digest (None without one), and the mismatch message."""

    spec: MergeSpec
    counts: Mapping[int, int] | None
    probe_digest: str | None
    digest_mismatch: str = ""


def reply_content(msg: Message) -> RecordDict:
    """The reply's records, or ReplyRejected with the client's error in one line."""
    if msg.has_error():
        raise ReplyRejected(client_error(msg.error.reason))
    return msg.content


def read_train_reply(rd: RecordDict, node: int, part: int, metrics: ClientMetrics, *, max_examples: int,
                     max_upload_bytes: int, weights: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                     own: OwnExpectation | None) -> ClientUpdate:
    """Every check of a training reply after its metrics were read and its partition identified: the example
    count, the upload size, the weights and, when ``own`` says what to expect, the own statistics."""
    if metrics.num_examples > max_examples:
        raise ReplyRejected(f"num-examples {metrics.num_examples} exceeds partition {part}'s bound of {max_examples}")
    check_size(rd, max_upload_bytes)
    if keys.ARRAYS not in rd.array_records:
        raise ReplyRejected(f"reply has no '{keys.ARRAYS}' record (model weights)")
    record = rd.array_records[keys.ARRAYS]
    state = decode_weights(record, weights)
    if own is None:
        return ClientUpdate(node, part, state, metrics)
    if own.probe_digest is not None:
        check_echo(rd, keys.PROBE_DIGEST, own.probe_digest, own.digest_mismatch)
    blocks, enc = decode_statistics(rd, keys.OWN_STATS, decode_moments, own.spec, "own", "own statistics")
    check_moments(blocks, own.counts, {g: psd_tolerance(e["dtype"]) for g, e in enc.items()})
    return ClientUpdate(node, part, state, metrics, blocks, enc)


def read_cross_reply(msg: Message | None, u: ClientUpdate, ref: ClientUpdate, digest: str, *, spec: MergeSpec,
                     counts: Mapping[int, int] | None, num_partitions: int | None, max_upload_bytes: int,
                     recompute: Callable[[], GroupCross] | None = None, whiteners: dict | None = None
                     ) -> tuple[GroupCross, ClientMetrics]:
    """(cross block, metrics) of client ``u``'s answer to the query against ``ref`` (weights ``digest``).
    ``recompute``: the server's own computation of the block (with a server probe), which the claimed block
    must match and which replaces it."""
    if msg is None:
        raise ReplyRejected("no reply to the cross-statistics query (timed out)")
    rd = reply_content(msg)
    metrics = read_metrics(rd, need_examples=False, num_partitions=num_partitions)
    if metrics.partition is not None and metrics.partition != u.partition:
        raise ReplyRejected(f"reports partition {metrics.partition}, but node {u.node} is partition {u.partition}")
    check_size(rd, max_upload_bytes)
    check_echo(rd, keys.REFERENCE_DIGEST, digest,
               "cross statistics computed against another reference (reference digest differs)")
    c, enc = decode_statistics(rd, keys.CROSS_STATS, decode_cross, spec, "cross", "cross statistics")
    wire = transport([enc, ref.own_encoding, u.own_encoding])
    check_cross(c, ref.own, u.own, counts, wire=wire, whiteners=whiteners)
    if recompute is not None:
        # with a server probe the cross block is recomputed from the two uploaded models, checked and used:
        # it decides CCA's rotation, which no consistency check can pin down
        computed = recompute()
        check_cross_matches(c, computed, wire)
        c = computed
    return c, metrics


def reference_record(ref: ClientUpdate) -> ArrayRecord:
    """The reference weights for the query, encoded from the weights the server merges (decoded, possibly
    clipped): one copy of one model, while no client's received record is held after its reply is read."""
    return ArrayRecord({k: v for k, v in ref.state.items()})
