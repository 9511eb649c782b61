"""The demo behind ``make demo``: a simulated federation merged with CCA Merge, then the very same client
models merged offline with the baselines, one table."""
from __future__ import annotations

import json
import time
from pathlib import Path

from fedmerge.common import progress
from fedmerge.common.task.config import FedConfig

__all__ = ["run_demo"]


def run_demo(cfg: FedConfig, backend: str = "inline", baselines=("avg", "permute", "cca"), repair: bool | None = None
             ) -> dict:
    """``repair``: also merge with REPAIR (default: when the model has no BatchNorm)."""
    from fedmerge.common.engine.merge import merge_models
    from fedmerge.common.task.checkpoint import load_state
    from fedmerge.common.task.evaluate import evaluate
    from fedmerge.common.task.loaders import (
        build_global_model,
        probe_batches,
        test_loader,
    )
    from fedmerge.simulate import format_result, simulate

    print(f"fedmerge demo: {cfg.num_clients} clients, {cfg.dataset} split {cfg.split}, {cfg.arch} x{cfg.width}, "
          f"{cfg.epochs:g} epochs, probe {cfg.probe_size} images, federated merge with {cfg.method!r}", flush=True)
    t0 = time.time()
    result = simulate(cfg, backend=backend)
    print("\n== federated run ==")
    print(format_result(result))

    out = Path(cfg.out)
    models, parts = [], sorted(int(p) for p in result["accuracy"]["clients_by_partition"])
    for part in parts:
        m = build_global_model(cfg)
        m.load_state_dict(load_state(out / "clients" / f"client_{part}.safetensors"))
        models.append(m.eval())
    probe = probe_batches(cfg)   # the federation's own fitting / held-out slices, so the offline CCA is its merge
    weights = [float(result["rounds"][-1]["client_metrics"][str(p)]["num-examples"]) for p in parts]
    test = test_loader(cfg)
    from fedmerge.common.engine.merge import has_batchnorm

    if repair is None:
        repair = not has_batchnorm(models[0])
    rows = []
    for method in baselines:
        for rep in ((False, True) if repair else (False,)):
            t = time.time()
            merged, info = merge_models(models, probe, method=method, reference=cfg.reference_value,
                                        gamma=cfg.gamma_value, return_info=True, seed=cfg.seed,
                                        held_out=cfg.held_out, repair=rep, weights=weights)
            acc = evaluate(merged, test)["accuracy"]
            progress.info("offline %s%s: test accuracy %.2f%% (%.1f s)", method, " + REPAIR" if rep else "",
                          100 * acc, time.time() - t)
            rows.append((f"offline {method}{' + REPAIR' if rep else ''}", acc, time.time() - t, info.gamma))
    acc = result["accuracy"]
    print("\n== same client models, merged offline (fedmerge.merge_models) ==")
    lines = ["| model | test acc % | merge time s |", "|---|---|---|"]
    for p, v in acc["clients_by_partition"].items():
        lines.append(f"| client {p} | {100 * v:.2f} | |")
    lines.append(f"| ensemble (upper bound) | {100 * acc['ensemble']:.2f} | |")
    for name, a, secs, g in rows:
        lines.append(f"| {name}{'' if g is None else f' (gamma {g:g})'} | {100 * a:.2f} | {secs:.1f} |")
    fed = f"federated {result['method']}" + "".join(f" + {name}" for on, name in (
        (cfg.repair, "REPAIR"), (cfg.np_merge, "NP Merge"), (cfg.distill, "distill")) if on)
    merge_s = result["rounds"][-1]["timings"].get("merge", result["timings"]["transforms"]) if result.get(
        "rounds") else result["timings"]["transforms"]
    lines.append(f"| {fed} (Flower) | {100 * acc['merged']:.2f} | {merge_s:.1f} |")
    table = "\n".join(lines)
    print(table)
    summary = {"federated": result, "offline": [{"method": r[0], "accuracy": r[1], "seconds": r[2], "gamma": r[3]}
                                                for r in rows], "total_seconds": time.time() - t0}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "demo.md").write_text(table + "\n")
    bars = ([(f"client {p}", v) for p, v in acc["clients_by_partition"].items()]
            + [(name.replace("offline ", ""), a) for name, a, _, _ in rows]
            + [(fed, acc["merged"]), ("ensemble", acc["ensemble"])])
    try:
        plot_demo(bars, out / "demo.png", f"{cfg.num_clients} clients, {cfg.dataset} {cfg.split}, "
                                          f"{cfg.arch} x{cfg.width:g}")
    except Exception as exc:  # noqa: BLE001 - a plot is never worth losing the run
        print(f"could not draw demo.png: {exc}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; results in {out}/ (result.json, demo.md, demo.png)")
    return summary


def plot_demo(bars: list[tuple[str, float]], path: Path, title: str) -> None:
    """Clients, every merge of the same clients (plain averaging, Permute, CCA, with REPAIR where it applies,
    and the federated run) and the ensemble, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [b[0] for b in bars]
    values = [100 * (b[1] or 0.0) for b in bars]
    colors = ["#9aa5b1" if lab.startswith("client") else "#2e86ab" if lab == "ensemble" else
              "#d1495b" if "cca" in lab else "#edae49" for lab in labels]
    fig, ax = plt.subplots(figsize=(max(5, 0.75 * len(bars) + 2), 3.8))
    ax.bar(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.text(i, v + 0.8, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"fedmerge demo: {title}")
    plt.xticks(rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
