"""``fedmerge simulate``: one command that runs a simulated federation and prints a results table.

Backends: ``ray`` (Flower's simulation engine: every client is a real ClientApp on a virtual SuperNode)
and ``inline`` (the same ClientApp and ServerApp code, clients run one after the other in this process;
starts in a second, handy on small machines and in tests).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from fedmerge.common.task.config import FedConfig

__all__ = ["simulate", "format_result", "ray_backend_config"]


def ray_backend_config(cfg: FedConfig, ray_workers: int | None, cpus: int, verbose: bool = False) -> dict:
    """Flower's ``backend_config`` for Ray: ``cpus`` CPUs shared by ``ray_workers`` concurrent clients (default one
    per CPU, at most one per client), each client asking for its share of them (and of a GPU when present)."""
    gpus = 1.0 / cfg.num_clients if torch.cuda.is_available() and cfg.device != "cpu" else 0.0
    workers = max(1, min(ray_workers or cfg.num_clients, cfg.num_clients, cpus))
    per = cpus // workers
    # Ray gets exactly workers * per CPUs, so that no more than ``workers`` clients fit at once
    return {"client_resources": {"num_cpus": per, "num_gpus": gpus},
            "init_args": {"num_cpus": per * workers, "include_dashboard": False,
                          "logging_level": logging.WARNING if not verbose else logging.INFO}}


def simulate(cfg: FedConfig, backend: str = "ray", verbose: bool = False, ray_workers: int | None = None) -> dict:
    """Run the federation described by ``cfg``; returns the result dict (also in ``cfg.out/result.json``).
    ``ray_workers``: how many clients Ray runs at once (each a worker process holding torch, ~1.2 GiB resident
    for the MNIST MLP; default: one per CPU, at most one per client); fewer bound memory, more are faster."""
    if ray_workers is not None and (isinstance(ray_workers, bool) or not isinstance(ray_workers, int)
                                    or ray_workers < 1):
        raise ValueError(f"ray_workers must be a positive integer, got {ray_workers!r}")
    if ray_workers is not None and backend != "ray":
        raise ValueError(f"ray_workers applies to the ray backend, not {backend!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / "result.json"
    if stale.exists():
        stale.unlink()
    overrides = cfg.to_run_config()
    if backend == "inline":
        from fedmerge.client.app import task_client_app
        from fedmerge.server.app import run_federation
        from fedmerge.server.inline import InlineGrid

        grid = InlineGrid(task_client_app(overrides), cfg.num_clients)
        return run_federation(grid, cfg)
    if backend != "ray":
        raise ValueError(f"backend must be 'ray' or 'inline', got {backend!r}")
    from flwr.simulation import run_simulation

    from fedmerge.client.app import task_client_app
    from fedmerge.server.app import make_server_app

    backend_config = ray_backend_config(cfg, ray_workers, os.cpu_count() or 1, verbose)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray starts its workers at nice 15; here the workers are the clients, the federation's main work: on a
    # machine busy with anything else they would starve (measured: a 1-minute run not done in 15 minutes)
    os.environ.setdefault("RAY_worker_niceness", "0")
    t0 = time.time()
    from fedmerge.common.progress import dropped

    # we run Flower's simulation engine in-process on purpose (`flwr run .` is the other way in)
    with dropped(*(() if verbose else ("The `run_simulation` function is deprecated",))):
        run_simulation(make_server_app(overrides), task_client_app(overrides), num_supernodes=cfg.num_clients,
                       backend_config=backend_config, verbose_logging=verbose)
    path = out / "result.json"
    if not path.exists():
        raise RuntimeError(f"the simulation ended after {time.time() - t0:.0f} s without writing {path}: "
                           "see the log above for the server's error")
    result = json.loads(path.read_text())
    if result.get("partial"):
        raise RuntimeError(f"the simulation stopped early; partial results in {path}")
    return result


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_result(result: dict) -> str:
    """A plain-text table of a result dict."""
    acc = result["accuracy"]
    rows = [(f"client {p}", _pct(v)) for p, v in acc["clients_by_partition"].items()]
    rows += [("average of clients", _pct(acc["average_of_clients"])),
             (f"merged ({result['method']})", _pct(acc["merged"])),
             ("ensemble (upper bound)", _pct(acc["ensemble"]))]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'model'.ljust(w)}  test acc %", f"{'-' * w}  ----------"]
    lines += [f"{a.ljust(w)}  {b:>10}" for a, b in rows]
    t = result["timings"]
    lines.append("")
    lines.append(f"rounds {result['rounds_completed']}, clients merged {result['clients_merged']}, "
                 f"rejected {len(result['clients_rejected'])}, reference {result['reference']}, "
                 f"gamma {result['gamma']}")
    lines.append(f"time: training {t['training']:.1f}s (the slowest client of each round; all clients together "
                 f"{t.get('training_sum_over_clients', t['training']):.1f}s), statistics {t['statistics']:.1f}s, "
                 f"transforms {t['transforms']:.2f}s, total {t['total']:.1f}s")
    ups = result.get("upload_over_model_size", {})
    if ups:
        lines.append("upload per client per round / model size: " +
                     ", ".join(f"{p}: {v:.2f}x" for p, v in ups.items()))
    for r in result["clients_rejected"]:
        lines.append(f"rejected: round {r['round']} client {r['partition']} ({r['phase']}): {r['reason']}")
    return "\n".join(lines)
