"""The fedmerge ServerApp: runs :class:`CCAMerge` for the configured rounds, evaluates the merged model, the
clients and their ensemble on the test set, and writes ``result.json``, a plot and the global model to the
run's output folder (after every round, atomically, so that a crash loses no finished round)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmerge.common import progress
from fedmerge.common.task.checkpoint import save_state
from fedmerge.common.task.config import FedConfig
from fedmerge.common.task.evaluate import ensemble_evaluate, evaluate
from fedmerge.common.task.loaders import (
    build_global_model,
    client_partition,
    probe_batches,
    test_loader,
)

from .strategy import CCAMerge, RoundRecord

__all__ = ["make_server_app", "app", "run_federation", "write_json_atomic", "ResumeError"]


def write_json_atomic(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """glibc only: allocations of at least ``nbytes`` are always mmapped, so that a freed statistics block or
    weight copy goes back to the system at once. glibc's default raises the threshold to the largest block freed
    so far (up to 32 MiB): the server's many 1-8 MiB blocks (d x d statistics, weights, transforms) then stay in
    the heap after use. Measured with 25 MNIST MLP clients inline: peak RSS 1,905 MiB with the default, 1,413 MiB
    with this (1,270 MiB when the strategy also releases each reply's arrays once decoded; docs/results.md,
    section 7). False where it does not apply."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def run_federation(grid: Grid, cfg: FedConfig) -> dict:
    """Run the whole federation on ``grid`` and return (and write) the result dictionary."""
    _fixed_mmap_threshold()
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    template = build_global_model(cfg, seed=cfg.seed)
    fit, held = probe_batches(cfg)
    strategy = CCAMerge.from_config(cfg, probe=(fit, held),
                                    max_examples=lambda part: _partition_size(cfg, part, strategy))
    test = test_loader(cfg)
    evals: dict[int, dict] = {}
    initial = ArrayRecord(template.state_dict()) if cfg.common_init else ArrayRecord()
    done = 0
    if cfg.resume:
        done, initial = _restore(cfg, out, strategy, evals, initial)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += done
        if len(arrays) == 0 or (server_round == done and done > 0):
            return None
        model = build_global_model(cfg)
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        m = evaluate(model, test, device=cfg.device or None)
        evals[server_round] = m
        progress.info("round %d: global model test accuracy %.2f%% (%d images)", server_round, 100 * m["accuracy"], m["n"])
        if server_round > 0:
            _checkpoint(cfg, out, strategy, evals, model, server_round)
            write_json_atomic(out / "result.json", _result(cfg, strategy, evals, None, t0, partial=True))
        return MetricRecord({"accuracy": m["accuracy"], "loss": m["loss"]})

    error = None
    if done < cfg.num_server_rounds:
        try:
            strategy.start(grid, initial, num_rounds=cfg.num_server_rounds - done, timeout=cfg.timeout,
                           train_config=ConfigRecord({}), evaluate_fn=evaluate_fn)
        except Exception as exc:  # noqa: BLE001 - result.json is always written, with the error
            error = f"{type(exc).__name__}: {exc}"
            log(40, "the federation stopped: %s", error)
    ensemble = None
    if len(strategy.last_states) >= 1:
        models = []
        for part in sorted(strategy.last_states):
            m = build_global_model(cfg)
            m.load_state_dict(strategy.last_states[part])
            models.append(m)
        ensemble = ensemble_evaluate(models, test, device=cfg.device or None)
        progress.info("logit ensemble of the last merged clients (upper bound): test accuracy %.2f%%",
                      100 * ensemble["accuracy"])
        for part, m in zip(sorted(strategy.last_states), models):  # for offline comparisons (benchmarks, demo)
            save_state(m.state_dict(), out / "clients" / f"client_{part}.safetensors")
    result = _result(cfg, strategy, evals, ensemble, t0, partial=error is not None)
    result["error"] = error
    write_json_atomic(out / "result.json", result)
    try:
        plot_result(result, out / "accuracy.png")
    except Exception as exc:  # noqa: BLE001 - a plot is never worth losing the run
        log(30, "could not draw the plot: %s", exc)
    if error is not None:
        raise RuntimeError(f"the federation stopped: {error} (results so far in {out / 'result.json'})")
    return result


_PARTITION_SIZES: dict[tuple, int] = {}


def _partition_size(cfg: FedConfig, part: int, strategy: CCAMerge) -> int:
    """The bound on a client's num-examples: the size of its partition, which the server can rebuild
    (computed once per configuration and partition count)."""
    key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), part, strategy.num_partitions or cfg.num_clients)
    if key not in _PARTITION_SIZES:
        _PARTITION_SIZES[key] = len(client_partition(cfg, part, key[2]))
    return _PARTITION_SIZES[key]


_RESUME_IGNORED = {"num_server_rounds", "resume", "out", "faults", "timeout", "device", "min_clients"}
# config keys added after runs were saved: a state.json without one ran with this value
_RESUME_LEGACY = {"method_schedule": "", "augment": True}


def _checkpoint(cfg: FedConfig, out: Path, strategy: CCAMerge, evals: dict, model, server_round: int) -> None:
    """After every round: the global model (a new file per round), then state.json naming it, each written
    atomically, so that a kill at any instant leaves a consistent last finished round."""
    ckpt = out / "checkpoints"
    name = f"global_round{server_round:04d}.safetensors"
    save_state(model.state_dict(), ckpt / name)
    tmp = out / f"global_model.safetensors.tmp{os.getpid()}"  # the same bytes: copy, don't serialise twice
    shutil.copyfile(ckpt / name, tmp)
    os.replace(tmp, out / "global_model.safetensors")
    write_json_atomic(out / "state.json", {
        "round": server_round, "model": name, "model_sha256": _sha256(ckpt / name), "config": cfg.to_dict(),
        "history": [h.to_dict() for h in strategy.history],
        "evals": {str(k): v for k, v in evals.items()}, "partitions": {str(k): v for k, v in strategy.partitions.items()}})
    for old in ckpt.glob("global_round*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_MODEL_NAME = re.compile(r"global_round\d{4,}\.safetensors")


class ResumeError(ValueError):
    """A file of a run to resume is malformed; the message names the file and the field."""


def _read_state(path: Path, cfg: FedConfig) -> dict:
    """state.json, checked field by field (a resume trusts nothing it reads back)."""
    def bad(field, why):
        raise ResumeError(f"resume: {path}: field '{field}' {why}")

    try:
        st = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ResumeError(f"resume: {path} is not readable JSON ({exc})") from None
    if not isinstance(st, dict):
        raise ResumeError(f"resume: {path} must hold a JSON object")
    for key, typ in (("round", int), ("model", str), ("model_sha256", str), ("config", dict), ("history", list),
                     ("evals", dict), ("partitions", dict)):
        if key not in st:
            bad(key, "is missing")
        if not isinstance(st[key], typ) or isinstance(st[key], bool):
            bad(key, f"must be a {typ.__name__}")
    saved = st["config"]
    saved = {**{k: v for k, v in _RESUME_LEGACY.items() if k not in saved}, **saved}
    diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in _RESUME_IGNORED and saved.get(k) != v}
    if diff:
        raise ValueError(f"resume: the run in {path.parent} was made with a different configuration: "
                         + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    if not 1 <= st["round"] <= cfg.num_server_rounds:
        bad("round", f"is {st['round']}, outside [1, {cfg.num_server_rounds}]")
    if not _MODEL_NAME.fullmatch(st["model"]):
        bad("model", f"{st['model'][:80]!r} is not a checkpoint name of this run (global_roundNNNN.safetensors)")
    try:
        st["history"] = [RoundRecord.from_dict(h) for h in st["history"]]
        st["evals"] = {int(k): dict(v) for k, v in st["evals"].items()}
        if any(not re.fullmatch(r"0|[1-9][0-9]*", k) or isinstance(v, bool) or not isinstance(v, int)
               for k, v in st["partitions"].items()):
            raise ValueError("partitions must map decimal node ids to integers")
        st["partitions"] = {int(k): v for k, v in st["partitions"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        bad("history/evals/partitions", f"is malformed ({type(exc).__name__}: {exc})")
    if [h.round for h in st["history"]] != list(range(1, len(st["history"]) + 1)) or len(st["history"]) < st["round"]:
        bad("history", f"must list rounds 1..{st['round']} or more, in order")
    if any(not (isinstance(v.get("accuracy"), float) and math.isfinite(v["accuracy"])) for v in st["evals"].values()):
        bad("evals", "must hold a finite accuracy per round")
    parts = st["partitions"]
    if (len(set(parts.values())) != len(parts) or len(parts) > cfg.num_clients
            or any(not 0 <= p < cfg.num_clients for p in parts.values()) or any(n < 0 for n in parts)):
        bad("partitions", f"must map node ids >= 0 to distinct partitions in [0, {cfg.num_clients})")
    if any(not 0 <= r <= st["round"] for r in st["evals"]):   # round 0: the common initial model
        bad("evals", f"must be keyed by rounds in [0, {st['round']}]")
    return st


def _read_checkpoint(path: Path, sha256: str, template: dict) -> dict:
    if not path.is_file():
        raise ResumeError(f"resume: checkpoint {path} named by state.json does not exist")
    if _sha256(path) != sha256:
        raise ResumeError(f"resume: checkpoint {path} does not match the checksum in state.json (changed or corrupt)")
    from fedmerge.common.task.checkpoint import load_state

    try:
        state = load_state(path)
    except Exception as exc:  # noqa: BLE001 - any reader error is a malformed file
        raise ResumeError(f"resume: checkpoint {path} is not a readable safetensors file ({exc})") from None
    if set(state) != set(template):
        raise ResumeError(f"resume: checkpoint {path} has other tensors than the model "
                          f"(missing {sorted(set(template) - set(state))[:5]}, extra {sorted(set(state) - set(template))[:5]})")
    for k, v in template.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            raise ResumeError(f"resume: checkpoint {path}: tensor '{k}' is {state[k].dtype} {tuple(state[k].shape)}, "
                              f"the model has {v.dtype} {tuple(v.shape)}")
        if v.is_floating_point() and not torch.isfinite(state[k]).all():
            raise ResumeError(f"resume: checkpoint {path}: tensor '{k}' has non-finite values")
    return state


def _restore(cfg: FedConfig, out: Path, strategy: CCAMerge, evals: dict, initial: ArrayRecord):
    path = out / "state.json"
    if not path.exists():
        log(30, "resume: no %s yet; starting from round 1", path)
        return 0, initial
    st = _read_state(path, cfg)
    ckpt_dir = (out / "checkpoints").resolve()
    model_path = (ckpt_dir / st["model"]).resolve()
    if model_path.parent != ckpt_dir:
        raise ResumeError(f"resume: {path}: field 'model' points outside {ckpt_dir}")
    state = _read_checkpoint(model_path, st["model_sha256"], strategy.template.state_dict())
    done = st["round"]
    strategy.round_offset = done
    strategy.history = st["history"]
    if st["partitions"]:
        strategy.partitions = dict(st["partitions"])
        strategy.num_partitions = max(cfg.num_clients, max(st["partitions"].values()) + 1)
    evals.update(st["evals"])
    log(20, "resume: %d rounds finished in %s; continuing with round %d", done, out, done + 1)
    return done, ArrayRecord(state)


def _result(cfg: FedConfig, strategy: CCAMerge, evals: dict, ensemble, t0: float, partial: bool) -> dict:
    hist = strategy.history
    done = [h for h in hist if h.ok]
    last = done[-1] if done else (hist[-1] if hist else None)
    clients = {}
    if last is not None:
        clients = {p: m.get("test-accuracy") for p, m in sorted(last.client_metrics.items())}
    merged_acc = evals[max(evals)]["accuracy"] if evals else None
    bytes_up: dict[str, int] = {}
    for h in hist:
        for p, b in h.bytes_uploaded.items():
            bytes_up[str(p)] = bytes_up.get(str(p), 0) + int(b)

    def per_round_max(key):
        return float(sum(max([m.get(key, 0.0) for m in h.client_metrics.values()] or [0.0]) for h in hist))

    training = per_round_max("seconds-train")
    statistics = per_round_max("seconds-stats") + per_round_max("seconds-cross-stats") + float(
        sum(h.timings.get("server_statistics", 0.0) for h in hist))
    transforms = float(sum(h.timings.get("merge_transforms", 0.0) for h in hist))
    total = time.time() - t0
    client_list = [v for v in clients.values() if v is not None]
    return {
        "method": cfg.method,
        "method_schedule": cfg.method_schedule,
        "methods_per_round": {str(h.round): h.method for h in hist},
        "num_clients": cfg.num_clients,
        "rounds_completed": len(done),
        "partial": partial,
        "clients_merged": last.clients_merged if last else [],
        "clients_rejected": [dict(r, round=h.round) for h in hist for r in h.clients_rejected],
        "reference": last.reference if last else None,
        "gamma": last.gamma if last else None,
        "accuracy": {
            "merged": merged_acc,
            "clients": client_list,
            "clients_by_partition": {str(k): v for k, v in clients.items()},
            "ensemble": ensemble["accuracy"] if ensemble else None,
            "average_of_clients": float(np.mean(client_list)) if client_list else None,
            "per_round": {str(r): e["accuracy"] for r, e in sorted(evals.items())},
        },
        "timings": {"training": training, "statistics": statistics, "transforms": transforms, "total": total,
                    "training_sum_over_clients": float(sum(m.get("seconds-train", 0.0) for h in hist
                                                           for m in h.client_metrics.values())),
                    "protocol_overhead": max(0.0, total - training),
                    # every phase the strategy timed (server checks, reference, statistics exchange, merge and its
                    # parts: transforms, apply, evaluate...), summed over the rounds
                    "per_phase": {k: float(sum(h.timings.get(k, 0.0) for h in hist))
                                  for k in sorted({k for h in hist for k in h.timings})}},
        "bytes_uploaded": bytes_up,
        "model_bytes": strategy.model_bytes,
        "upload_over_model_size": {p: b / strategy.model_bytes / max(1, len(hist)) for p, b in bytes_up.items()},
        "rounds": [h.to_dict() for h in hist],
        "config": cfg.to_dict(),
        "environment": {"torch": torch.__version__, "cuda": torch.cuda.is_available()},
    }


def plot_result(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["accuracy"]
    labels = [f"client {p}" for p in acc["clients_by_partition"]] + ["merged", "ensemble"]
    values = [100 * (v or 0) for v in acc["clients_by_partition"].values()] + [
        100 * (acc["merged"] or 0), 100 * (acc["ensemble"] or 0)]
    colors = ["#9aa5b1"] * len(acc["clients_by_partition"]) + ["#d1495b", "#2e86ab"]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 3.5))
    ax.bar(labels, values, color=colors)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result['method']} merge of {len(acc['clients'])} clients")
    for i, v in enumerate(values):
        ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylim(0, 100)
    plt.xticks(rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """A ServerApp whose task config is the run config (``flwr run``) updated with ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FedConfig.from_run_config(context.run_config, **(overrides or {}))
        run_federation(grid, cfg)

    return app


app = make_server_app()
