"""The client side of the fedmerge protocol, for your own model and data.

A ClientApp that works with :class:`fedmerge.server.CCAMerge` answers two messages (see ``client/app.py`` for
their records):

* ``train``: train, then reply with :func:`train_reply` -- the weights, ``metrics`` (``num-examples``,
  ``partition-id``, anything else you report) and, when the server asks (``want-stats``), the statistics of
  the model on the shared probe (:func:`own_stats_records`);
* ``query.cross_stats``: reply with :func:`cross_reply` -- the cross statistics between the reference the
  server sent and the model this client trained (:func:`cross_stats_records`).

The probe contract: give the server (``CCAMerge(probe=...)``) and every client the same probe inputs, in the
same order. The server splits it into a fitting part and a held-out part (``held_out``, ``seed``, sent to the
clients in the train config as ``probe-held-out`` / ``probe-seed``); statistics are computed on the fitting
part, which :func:`statistics_probe` rebuilds on the client. The reply echoes a digest of the inputs it used,
and statistics computed on any other probe are rejected by the server.

:func:`make_client_app` builds a complete ClientApp from three functions of yours::

    app = make_client_app(model_fn=MyNet, train_fn=my_train, probe_fn=lambda context: probe_images)

where ``my_train(model, context, config) -> (num_examples, metrics)`` trains ``model`` in place on this
node's data.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch.nn as nn
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedmerge.common import progress
from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.stats import (
    GroupMoments,
    collect_statistics,
    cross_statistics,
    own_statistics,
)
from fedmerge.common.wire import keys
from fedmerge.common.wire.compress import decode_moments, encode_cross, encode_moments
from fedmerge.common.wire.probe import Batches, as_batches, probe_digest
from fedmerge.common.wire.records import (
    arrays_to_record,
    record_to_arrays,
    weights_digest,
)

__all__ = ["LOCAL_KEY", "OWN_KEY", "statistics_probe", "own_stats_records", "cross_stats_records", "train_reply",
           "cross_reply", "make_client_app", "node_partition", "remember_training", "trained_model"]

LOCAL_KEY = "fedmerge.local-model"   # where a client keeps the weights it trained (context.state)
OWN_KEY = "fedmerge.own-stats"       # ... and the own statistics it uploaded with them, as sent


def statistics_probe(probe: Any, config: ConfigRecord | dict | None = None) -> Batches:
    """The probe slice statistics are computed on: the server's fitting part. ``probe`` is what the server was
    given (inputs, an (inputs, labels) pair, batches, or an already split ``(fit, held_out)`` pair of Batches);
    the split uses the ``probe-held-out`` and ``probe-seed`` the server sends (defaults: CCAMerge's)."""
    if isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(b, Batches) for b in probe):
        return probe[0]
    cfg = dict(config or {})
    return as_batches(probe).split(float(cfg.get(keys.PROBE_HELD_OUT, 0.2)), int(cfg.get(keys.PROBE_SEED, 0)))[0]


def own_stats_records(model: nn.Module, probe: Batches, *, dtype: str = "float64", rank: int = 0, device=None,
                      own: GroupMoments | None = None) -> dict[str, Any]:
    """``{"own-stats": ..., "fedmerge": ...}``: the model's statistics on the probe slice (``own`` if already
    computed) in the ``dtype``/``rank`` wire encoding, and the probe digest the server checks."""
    if own is None:
        own = own_statistics(model.eval(), probe, derive_spec(model, probe.example()), device=device)
    return {keys.OWN_STATS: arrays_to_record(encode_moments(own, dtype, rank)),
            keys.FEDMERGE: ConfigRecord({keys.PROBE_DIGEST: probe_digest(probe)})}


def cross_stats_records(reference: nn.Module, model: nn.Module, probe: Batches, *, reference_digest: str,
                        dtype: str = "float64", rank: int = 0, device=None,
                        own: ArrayRecord | None = None) -> dict[str, Any]:
    """``{"cross-stats": ..., "fedmerge": ...}``: cross statistics between ``reference`` (loaded with the weights
    the server sent) and ``model``, and the digest of those weights. With ``rank > 0`` the kept directions are
    the most correlated canonical pairs, whitened with both own blocks as the server will decode them: ``own``
    is the ``own-stats`` record this client uploaded with ``model`` (:func:`remember_training` keeps it), decoded
    as the server decoded it; without it the model's own blocks are encoded here again."""
    reference, model = reference.eval(), model.eval()
    spec = derive_spec(model, probe.example())
    whiten = None
    if rank > 0:
        st = collect_statistics([reference, model], probe, reference=0, spec=spec, device=device,
                                own_of=[0] if own is not None else None)   # the model's own block: as uploaded
        cross = st.cross[(0, 1)]
        ref_own = decode_moments(encode_moments(st.own[0], dtype, rank), spec)
        whiten = (ref_own, decode_moments(record_to_arrays(own), spec) if own is not None else
                  decode_moments(encode_moments(st.own[1], dtype, rank), spec))
    else:
        cross = cross_statistics(reference, model, probe, spec, device=device)
    return {keys.CROSS_STATS: arrays_to_record(encode_cross(cross, dtype, rank, whiten=whiten)),
            keys.FEDMERGE: ConfigRecord({keys.REFERENCE_DIGEST: reference_digest})}


def node_partition(context: Context, config: ConfigRecord | dict) -> tuple[int, int]:
    """(partition id, number of partitions): the node's own ``--node-config`` if it has one, else the server's."""
    nc = context.node_config
    if keys.PARTITION_ID in nc and keys.NUM_PARTITIONS in nc:
        return int(nc[keys.PARTITION_ID]), int(nc[keys.NUM_PARTITIONS])
    if keys.PARTITION_ID in config and keys.NUM_PARTITIONS in config:
        return int(config[keys.PARTITION_ID]), int(config[keys.NUM_PARTITIONS])
    raise ValueError("this node has no partition: start the supernode with --node-config "
                     "'partition-id=I num-partitions=N' or let the server assign one")


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(keys.CONFIG, ConfigRecord())


def remember_training(context: Context, model: nn.Module, reply: Message, rank: int = 0) -> None:
    """Keep what the query phase needs in ``context.state``: the weights this client trained and uploaded and,
    with a low-rank encoding (``rank > 0``) and when the reply carries them, the own statistics as sent (reused,
    not recomputed, for the low-rank cross block; without one the query does not need them, and a simulation
    would hold every client's copy in its driver)."""
    context.state[LOCAL_KEY] = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if rank > 0 and keys.OWN_STATS in reply.content.array_records:
        context.state[OWN_KEY] = reply.content.array_records[keys.OWN_STATS]
    elif OWN_KEY in context.state.array_records:
        del context.state[OWN_KEY]   # statistics of an earlier round's model


def trained_model(context: Context, model_fn: Callable[[], nn.Module]) -> nn.Module:
    """The model this client trained (:func:`remember_training`); a query before training is an error."""
    if LOCAL_KEY not in context.state.array_records:
        raise RuntimeError("cross-statistics query before training: this node holds no local model")
    model = model_fn()
    model.load_state_dict(context.state.array_records[LOCAL_KEY].to_torch_state_dict(), strict=True)
    return model


def train_reply(msg: Message, model: nn.Module, *, num_examples: int, partition_id: int, probe: Any = None,
                metrics: dict | None = None, dtype: str = "float64", rank: int = 0, device=None,
                own: GroupMoments | None = None) -> Message:
    """The reply to a ``train`` message: weights, metrics and, when the server asks, probe statistics (on
    :func:`statistics_probe` of ``probe``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    content = RecordDict({keys.ARRAYS: ArrayRecord(state)})
    config = _config(msg)
    seconds = 0.0
    if bool(config.get(keys.WANT_STATS, True)):
        if probe is None:
            raise ValueError("the server asks for probe statistics (want-stats): pass the shared probe")
        t = time.perf_counter()
        for name, rec in own_stats_records(model.cpu(), statistics_probe(probe, config), dtype=dtype, rank=rank,
                                           device=device, own=own).items():
            content[name] = rec
        seconds = time.perf_counter() - t
    content[keys.METRICS] = MetricRecord({keys.SECONDS_STATS: seconds, **(metrics or {}),
                                          keys.NUM_EXAMPLES: int(num_examples), keys.PARTITION_ID: int(partition_id)})
    return Message(content, reply_to=msg)


def cross_reply(msg: Message, model: nn.Module, model_fn: Callable[[], nn.Module], probe: Any, *,
                partition_id: int, dtype: str = "float64", rank: int = 0, device=None,
                own: ArrayRecord | None = None) -> Message:
    """The reply to a ``query.cross_stats`` message: cross statistics between the reference it carries and
    ``model`` (the one this client trained and uploaded, with its ``own`` statistics record as sent)."""
    t = time.perf_counter()
    ref_state = msg.content.array_records[keys.REFERENCE].to_torch_state_dict()
    reference = model_fn()
    reference.load_state_dict(ref_state, strict=True)
    content = RecordDict(cross_stats_records(reference, model, statistics_probe(probe, _config(msg)),
                                             reference_digest=weights_digest(ref_state), dtype=dtype, rank=rank,
                                             device=device, own=own))
    content[keys.METRICS] = MetricRecord({keys.SECONDS_CROSS_STATS: time.perf_counter() - t,
                                          keys.PARTITION_ID: partition_id})
    return Message(content, reply_to=msg)


def make_client_app(model_fn: Callable[[], nn.Module], train_fn: Callable, probe_fn: Callable[[Context], Any], *,
                    stats_dtype: str = "float64", stats_rank: int = 0, device=None) -> ClientApp:
    """A complete fedmerge ClientApp for your own model.

    model_fn: ``() -> nn.Module``, the architecture the server was given (each call a fresh model; round 1
        starts from it unless the server sends weights).
    train_fn: ``(model, context, config) -> (num_examples, metrics)``: train ``model`` in place on this node's
        data (``config``: the server's train config, e.g. ``server-round``, ``partition-id``); ``metrics`` a
        dict of numbers to report.
    probe_fn: ``(context) -> probe``: the shared probe, exactly as given to ``CCAMerge(probe=...)``.
    """
    app = ClientApp()

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        config = _config(msg)
        pid, _ = node_partition(context, config)
        model = model_fn()
        arrays = msg.content.array_records.get(keys.ARRAYS)
        if arrays is not None and len(arrays) > 0:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        t = time.perf_counter()
        num_examples, metrics = train_fn(model, context, config)
        metrics = {keys.SECONDS_TRAIN: time.perf_counter() - t, **(metrics or {})}
        model = model.cpu().eval()
        reply = train_reply(msg, model, num_examples=num_examples, partition_id=pid, probe=probe_fn(context),
                            metrics=metrics, dtype=stats_dtype, rank=stats_rank, device=device)
        remember_training(context, model, reply, stats_rank)
        progress.info("client %d round %s: trained in %.1f s on %d examples; statistics %.1f s", pid,
                      config.get(keys.SERVER_ROUND, "?"), metrics[keys.SECONDS_TRAIN], int(num_examples),
                      reply.content[keys.METRICS][keys.SECONDS_STATS])
        return reply

    @app.query("cross_stats")
    def cross_handler(msg: Message, context: Context) -> Message:
        pid, _ = node_partition(context, _config(msg))
        model = trained_model(context, model_fn)
        return cross_reply(msg, model, model_fn, probe_fn(context), partition_id=pid, dtype=stats_dtype,
                           rank=stats_rank, device=device, own=context.state.array_records.get(OWN_KEY))

    return app
