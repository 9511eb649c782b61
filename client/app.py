"""The fedmerge ClientApp: train on the local partition, upload weights + own probe statistics, and answer
the server's cross-statistics query with the reference model it is sent.

Messages (all records are Flower records; nothing is pickled):

* ``train`` in: ``arrays`` (global weights; empty in round 1 when clients start from their own seeds),
  ``config`` (``server-round``, ``partition-id``/``num-partitions`` when the node has none of its own,
  ``want-stats``, ``probe-digest``). out: ``arrays`` (local weights), ``metrics`` (``num-examples``,
  ``partition-id``, train/test/probe metrics, seconds), and, when asked, ``own-stats`` (probe statistics of
  the local model) with ``fedmerge`` (a config record echoing ``probe-digest`` of the probe they were
  computed on).
* ``query.cross_stats`` in: ``reference`` (the reference model's weights; the reference client gets its own),
  ``config`` (``reference-digest``). out: ``cross-stats`` (cross statistics between the reference and the
  local model kept in ``context.state``), ``metrics``, and ``fedmerge`` echoing ``reference-digest`` of the
  weights the statistics were computed against.

Statistics are sent in the run config's ``stats-dtype`` / ``stats-rank`` encoding
(:mod:`fedmerge.common.wire.compress`; self-describing, the server needs no setting to decode them).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.common import progress
from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.stats import Moments, own_statistics
from fedmerge.common.task.config import FedConfig
from fedmerge.common.task.evaluate import evaluate
from fedmerge.common.task.loaders import (
    build_global_model,
    probe_batches,
    test_loader,
    train_loader,
)
from fedmerge.common.wire import keys
from fedmerge.common.wire.records import weights_digest

from .protocol import (
    LOCAL_KEY,
    OWN_KEY,
    cross_stats_records,
    node_partition,
    remember_training,
    train_reply,
)
from .train import TrainConfig, train

__all__ = ["task_client_app", "app", "LOCAL_KEY"]


def _faults(cfg: FedConfig, pid: int, config: ConfigRecord) -> list[str]:
    faults = cfg.fault_for(pid)
    rnd = int(config.get(keys.SERVER_ROUND, 1))
    # a fault may be limited to one round: KIND@ROUND (e.g. nan@2)
    out = []
    for f in faults:
        kind, _, r = f.partition("@")
        if not r or int(r) == rnd:
            out.append(kind)
    return out


def task_client_app(overrides: dict | None = None) -> ClientApp:
    """The built-in task's ClientApp: model, data, probe and training from the run config (``flwr run``)
    updated with ``overrides``, with fault injection. For your own model use
    :func:`fedmerge.client.make_client_app`; both send the same records (:mod:`fedmerge.client.protocol`)."""
    app = ClientApp()

    def config_of(context: Context) -> FedConfig:
        return FedConfig.from_run_config(context.run_config, **(overrides or {}))

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        config = msg.content.config_records.get(keys.CONFIG, ConfigRecord())
        pid, nparts = node_partition(context, config)
        rnd = int(config.get(keys.SERVER_ROUND, 1))
        faults = _faults(cfg, pid, config)
        if "drop-train" in faults:
            raise RuntimeError(f"injected fault: client {pid} drops out of training")
        device = cfg.device or None
        t0 = time.perf_counter()
        model = build_global_model(cfg, seed=cfg.seed * 1000 + pid)  # own init unless weights are sent
        arrays = msg.content.array_records.get(keys.ARRAYS)
        if arrays is not None and len(arrays) > 0:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loader = train_loader(cfg, pid, nparts, seed=cfg.seed * 1000 + pid + 7919 * rnd)
        hist = train(model, loader, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                                device=device, seed=cfg.seed * 1000 + pid + rnd, progress=True,
                                                desc=f"client {pid} round {rnd}: train"))
        model.cpu().eval()
        t_train = time.perf_counter() - t0
        t = time.perf_counter()
        test = evaluate(model, test_loader(cfg), device=device)
        fit, held = probe_batches(cfg)
        held_m = evaluate(model, held, device=device)
        t_eval = time.perf_counter() - t

        own, t_stats = None, 0.0
        if bool(config.get(keys.WANT_STATS, True)):
            t = time.perf_counter()
            own = own_statistics(model, fit, derive_spec(model, fit.example()), device=device)
            if "nonpsd" in faults:
                own = {g: _not_psd(m) for g, m in own.items()}
            t_stats = time.perf_counter() - t
        reply = train_reply(msg, model, num_examples=int(loader.dataset_size), partition_id=pid, probe=(fit, held),
                            metrics={"train-loss": hist["train_loss"], "test-accuracy": test["accuracy"],
                                     "test-loss": test["loss"], "probe-accuracy": held_m["accuracy"],
                                     "seconds-train": t_train, "seconds-eval": t_eval},
                            dtype=cfg.stats_dtype, rank=cfg.stats_rank, own=own)
        reply.content[keys.METRICS][keys.SECONDS_STATS] += t_stats   # computing ``own`` here, encoding it there
        # before the faults: they corrupt the upload, not the client
        remember_training(context, model, reply, cfg.stats_rank)
        _inject(reply.content, faults, cfg, pid, nparts)
        progress.info("client %d round %d: test accuracy %.2f%% after %.1f s of training; statistics %.1f s", pid, rnd,
                      100 * test["accuracy"], t_train, reply.content[keys.METRICS][keys.SECONDS_STATS])
        return reply

    @app.query("cross_stats")
    def cross_handler(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        config = msg.content.config_records.get(keys.CONFIG, ConfigRecord())
        pid, _ = node_partition(context, config)
        faults = _faults(cfg, pid, config)
        if "drop-query" in faults:
            raise RuntimeError(f"injected fault: client {pid} drops out of the statistics query")
        if LOCAL_KEY not in context.state.array_records:
            raise RuntimeError("cross-statistics query before training: this node holds no local model")
        t = time.perf_counter()
        own_model = build_global_model(cfg)
        own_model.load_state_dict(context.state.array_records[LOCAL_KEY].to_torch_state_dict())
        ref_model = build_global_model(cfg)
        ref_state = msg.content.array_records[keys.REFERENCE].to_torch_state_dict()
        if "stale-ref" in faults:  # computes against another reference (its own weights) and says so
            ref_state = context.state.array_records[LOCAL_KEY].to_torch_state_dict()
        ref_model.load_state_dict(ref_state, strict=True)
        fit, _ = probe_batches(cfg)
        content = RecordDict(cross_stats_records(ref_model, own_model, fit, reference_digest=weights_digest(ref_state),
                                                 dtype=cfg.stats_dtype, rank=cfg.stats_rank,
                                                 device=cfg.device or None,
                                                 own=context.state.array_records.get(OWN_KEY)))
        if "nan-query" in faults:
            key = next(k for k in content[keys.CROSS_STATS].keys() if k.endswith((".c", ".c.left")))
            bad = content[keys.CROSS_STATS][key].numpy().copy()
            bad.reshape(-1)[0] = 0x7FC0 if bad.dtype == np.uint16 else np.nan  # bfloat16 travels as its bits
            content[keys.CROSS_STATS][key] = Array(bad)
        content[keys.METRICS] = MetricRecord({keys.SECONDS_CROSS_STATS: time.perf_counter() - t,
                                              keys.PARTITION_ID: pid})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        model = build_global_model(cfg)
        model.load_state_dict(msg.content.array_records[keys.ARRAYS].to_torch_state_dict(), strict=True)
        m = evaluate(model, test_loader(cfg), device=cfg.device or None)
        return Message(RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: m["n"], "accuracy": m["accuracy"],
                                                               "loss": m["loss"]})}), reply_to=msg)

    return app


def _not_psd(m: Moments) -> Moments:
    """Fault ``nonpsd``: the two largest-variance units get a covariance of 4x what Cauchy-Schwarz allows, so
    every variance stays positive but the matrix has a negative eigenvalue of at least -3x their variance."""
    m2 = m.m2.clone()
    i, j = torch.topk(torch.diagonal(m2), 2).indices.tolist()
    m2[i, j] = m2[j, i] = 4 * torch.sqrt(m2[i, i] * m2[j, j])
    return Moments(m.n, m.mean, m2)


def _inject(content: RecordDict, faults: list[str], cfg: FedConfig, pid: int, nparts: int) -> None:
    """Fault injection for tests and demos (``--inject-fault KIND:CLIENT``): corrupt this client's upload.
    Kinds: :data:`fedmerge.common.task.config.FAULT_KINDS`."""
    if not faults:
        return
    arrays = content[keys.ARRAYS]
    if "bytes" in faults:  # the payload holds another shape than the Array declares
        key = next(k for k in arrays.keys() if len(arrays[k].shape) > 0)
        a = arrays[key]
        arrays[key] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype,
                            data=Array(np.zeros(3, dtype=np.float32)).data)
    if "scale" in faults:  # weights x 1e6
        for k in list(arrays.keys()):
            v = arrays[k].numpy()
            if v.dtype.kind == "f":
                arrays[k] = Array(v * np.float32(1e6))
    if "count" in faults:  # inflated sample count
        content[keys.METRICS][keys.NUM_EXAMPLES] = 10 ** 12
    if "partition" in faults:  # claims the next client's partition
        content[keys.METRICS][keys.PARTITION_ID] = (pid + 1) % max(nparts, 2)
    if "nan" in faults:
        key = next(k for k in arrays.keys() if arrays[k].numpy().dtype.kind == "f")
        bad = arrays[key].numpy().copy()
        bad.reshape(-1)[0] = np.nan
        arrays[key] = Array(bad)
    if "shape" in faults:
        key = next(iter(arrays.keys()))
        arrays[key] = Array(np.zeros((3, 1, 7), dtype=np.float32))
    if "huge" in faults:
        arrays["padding.huge"] = Array(np.zeros(64 * 1024 * 1024 // 4, dtype=np.float32))
    if "slow" in faults:
        time.sleep(float(cfg.timeout) + 5.0)


app = task_client_app()
