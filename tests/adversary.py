"""Tools for the untrusted-client tests: honest replies recorded once from the real ClientApp, replayed with
one client's reply mutated, and the mutations an adversarial client would try (crafted npy bytes, metrics,
statistics)."""
from __future__ import annotations

import copy
import functools
import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedmerge.client.app import task_client_app
from fedmerge.common.engine.stats import Moments
from fedmerge.common.task.config import FedConfig
from fedmerge.common.task.loaders import build_global_model, probe_batches
from fedmerge.common.wire.compress import (
    decode_cross,
    decode_moments,
    encode_cross,
    encode_moments,
)
from fedmerge.common.wire.records import arrays_to_record, record_to_arrays
from fedmerge.server.inline import InlineGrid
from fedmerge.server.strategy import QUERY_CROSS, CCAMerge

TINY = dict(dataset="cifar10-mini", arch="mlp", width=0.25, epochs=1, max_train=64, probe_size=60, max_test=100,
            batch_size=32, num_clients=3, min_clients=2, gamma="0.1")
ATTACKER = 2   # the partition whose reply is mutated (its node id is the largest, so it registers last)

Mutation = Callable[[RecordDict], None]


def tiny(**kw) -> FedConfig:
    return FedConfig(**{**TINY, **kw})


# --- raw npy bytes -----------------------------------------------------------------------------------------------
def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_with_header(header: str, payload: bytes = b"") -> bytes:
    h = header.encode("latin1")
    h = h + b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + payload


def raw(dtype: str, shape, data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


# --- mutations of a reply's content ------------------------------------------------------------------------------
def first_weight(rd: RecordDict) -> str:
    arrays = rd.array_records["arrays"]
    return next(k for k in arrays.keys() if len(arrays[k].shape) == 2)


def set_weight(rd: RecordDict, fn) -> None:
    arrays = rd.array_records["arrays"]
    for k in list(arrays.keys()):
        a = arrays[k].numpy()
        if a.dtype.kind == "f":
            arrays[k] = Array(np.ascontiguousarray(fn(a.astype(np.float64)).astype(a.dtype)))


def set_metric(key: str, value) -> Mutation:
    def m(rd: RecordDict) -> None:
        rd.metric_records["metrics"][key] = value
    return m


def set_array(record: str, key_fn, make: Callable[[Array], Array]) -> Mutation:
    def m(rd: RecordDict) -> None:
        rec = rd.array_records[record]
        key = key_fn(rd) if callable(key_fn) else key_fn
        rec[key] = make(rec[key])
    return m


@functools.lru_cache(maxsize=1)
def tiny_spec():
    from fedmerge.common.engine.graph import derive_spec
    cfg = tiny()
    return derive_spec(build_global_model(cfg), probe_batches(cfg)[0].example())


def own_blocks(fn: Callable[[Moments], Moments], dtype: str = "float64") -> Mutation:
    """Rewrite the own statistics: decode, change every block with ``fn``, encode again."""
    def m(rd: RecordDict) -> None:
        spec = tiny_spec()
        own = decode_moments(record_to_arrays(rd.array_records["own-stats"]), spec)
        rd.array_records["own-stats"] = arrays_to_record(encode_moments({g: fn(b) for g, b in own.items()}, dtype))
    return m


def cross_blocks(fn: Callable) -> Mutation:
    """Rewrite the cross statistics: decode, change every block with ``fn``, encode again (float64)."""
    def m(rd: RecordDict) -> None:
        c = decode_cross(record_to_arrays(rd.array_records["cross-stats"]), tiny_spec())
        rd.array_records["cross-stats"] = arrays_to_record(encode_cross({g: fn(b) for g, b in c.items()}))
    return m


def scales_near_limit(rd: RecordDict) -> None:
    """float16 own blocks whose unit scales sit at float32's maximum (variances ~1e77)."""
    own_blocks(lambda b: b, "float16")(rd)
    rec = rd.array_records["own-stats"]
    for k in list(rec.keys()):
        if k.endswith(".m2.scale"):
            rec[k] = Array(np.full(rec[k].shape, 3.0e38, dtype=np.float32))


def echo(key: str, value: str) -> Mutation:
    def m(rd: RecordDict) -> None:
        rd.config_records["fedmerge"] = ConfigRecord({key: value})
    return m


# --- recorded honest replies, replayed --------------------------------------------------------------------------
@dataclass
class Kit:
    cfg: FedConfig
    train: dict[int, RecordDict] = field(default_factory=dict)            # partition -> content
    cross: dict[tuple[int, int], RecordDict] = field(default_factory=dict)  # (reference, partition) -> content


def make_strategy(cfg: FedConfig, **kw) -> CCAMerge:
    opts = dict(model_fn=lambda: build_global_model(cfg, seed=cfg.seed), probe=probe_batches(cfg), method="cca",
                gamma=0.1, num_clients=3, min_clients=2)
    opts.update(kw)
    return CCAMerge(**opts)


def record_honest(cfg: FedConfig | None = None) -> Kit:
    """Train the three tiny clients once (the real ClientApp) and record their replies to every message of
    a round, for every possible reference."""
    cfg = cfg or tiny()
    kit = Kit(cfg)
    app = task_client_app(cfg.to_run_config())

    def recorder(msg: Message, ctx):
        reply = app(msg, ctx)
        part = int(ctx.node_config["partition-id"])
        if msg.metadata.message_type == "train":
            kit.train.setdefault(part, copy.deepcopy(reply.content))
        else:
            ref = int(msg.content.config_records["config"]["reference-partition"])
            kit.cross.setdefault((ref, part), copy.deepcopy(reply.content))
        return reply

    for ref in range(3):
        strategy = make_strategy(cfg, reference=ref)
        strategy.start(InlineGrid(recorder, 3), ArrayRecord(), num_rounds=1)
    return kit


def mutating_app(app, mutations: dict[tuple[str, int], Mutation]):
    """The real ClientApp, with the replies named in ``mutations`` changed before they leave the client."""
    def client(msg: Message, ctx) -> Message:
        reply = app(msg, ctx)
        fn = mutations.get((msg.metadata.message_type, int(ctx.node_config["partition-id"])))
        if fn is not None and not reply.has_error():
            fn(reply.content)
        return reply
    return client


def replay_app(kit: Kit, mutations: dict[tuple[str, int], Mutation]):
    """A client app that answers with the recorded honest replies, mutated where ``mutations`` says:
    (message type, partition) -> mutation of that reply's content."""
    def app(msg: Message, ctx) -> Message:
        part = int(ctx.node_config["partition-id"])
        mtype = msg.metadata.message_type
        if mtype == "train":
            content = copy.deepcopy(kit.train[part])
        else:
            ref = int(msg.content.config_records["config"]["reference-partition"])
            content = copy.deepcopy(kit.cross[(ref, part)])
        fn = mutations.get((mtype, part))
        if fn is not None:
            fn(content)
        return Message(content, reply_to=msg)
    return app


class ExtraReplyGrid(InlineGrid):
    """An InlineGrid that also delivers a second copy of one node's training reply, or one from a stranger."""

    def __init__(self, *a, duplicate_of: int | None = None, stranger: int | None = None, **kw):
        super().__init__(*a, **kw)
        self.duplicate_of, self.stranger = duplicate_of, stranger

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        out = list(super().send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == "train":
            src = next(m for m in out if int(m.metadata.src_node_id) == self.node_ids[self.duplicate_of or 0])
            extra = Message(copy.deepcopy(src.content), reply_to=messages[0])
            node = self.node_ids[self.duplicate_of] if self.duplicate_of is not None else self.stranger
            extra.metadata.__dict__["_src_node_id"] = node
            out.append(extra)
        return out


def run_round(kit: Kit, mutations: dict, grid_cls=InlineGrid, grid_kw=None, **strategy_kw):
    """One round of a fresh strategy against the replayed clients; returns (strategy, round record, arrays)."""
    strategy = make_strategy(kit.cfg, **strategy_kw)
    grid = grid_cls(replay_app(kit, mutations), 3, **(grid_kw or {}))
    result = strategy.start(grid, ArrayRecord(), num_rounds=1)
    return strategy, strategy.history[-1], result.arrays


def partition_sizes(kit: Kit) -> dict[int, int]:
    """The partition sizes the server knows (what the ServerApp passes as max_examples)."""
    from fedmerge.common.task.loaders import client_partition
    return {p: len(client_partition(kit.cfg, p, 3)) for p in range(3)}


def finite_state(arrays: ArrayRecord) -> bool:
    return all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values() if v.is_floating_point())


__all__ = ["ATTACKER", "QUERY_CROSS", "Kit", "record_honest", "replay_app", "run_round", "tiny", "npy",
           "npy_with_header", "raw", "set_metric", "set_array", "set_weight", "own_blocks", "scales_near_limit",
           "echo", "cross_blocks", "first_weight", "finite_state", "partition_sizes", "mutating_app", "tiny_spec", "ExtraReplyGrid", "make_strategy"]
