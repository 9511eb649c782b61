"""Cost of CCA Merge in a federation (paper App. F): client-side statistics vs a plain forward pass, server-side
transforms per method vs the number of models, peak memory, and bytes per client per round.

    python -m benchmarks.cost --scale cpu --data-root ../shared/data     # widths 0.25, 0.5, 1; ~4 min, 2 cores
    python -m benchmarks.cost --scale paper --data-root /path/to/data       # widths 1, 2, 4, 8; for a GPU

Models are untrained (seeded random inits): the costs measured here do not depend on the weights' values,
only on the shapes (the iterative weight-based methods, weight matching and MergeMany, may iterate longer
or shorter on trained weights). The probe is real: the first images of the seeded probe set of the data set.

What is measured, for VGG11 (no BN) and ResNet20 at each width:

(a) one plain forward pass of one model over the probe (eval, no_grad, batches of 250 moved to the device);
(b) ``own_statistics`` of one model on the same probe (what a client computes after training), and its
    ratio to (a) -- the target is <= 1.5x;
(c) ``cross_statistics`` (reference + own model, what a client computes in phase 2), and its ratio to
    two forward passes;
(d) the transforms of every method (``compute_alignment``, fixed gamma for CCA) for N = 2, 4, 8 models,
    from statistics of N seeded models on a probe slice (the transforms' cost depends on the widths, not on
    the probe size), and the apply step (``merge_states``);
(e) peak memory of (a)-(c), on one batch of 250 probe images (statistics stream over batches, so the peak
    is that of one batch whatever the probe size): on CPU, the growth of the process's peak resident set size (VmHWM, reset through
    /proc/self/clear_refs, after malloc_trim) above its resident size before the call, in a child process
    per (arch, width) that holds only the model(s) and the probe; this counts activations, temporaries,
    statistics accumulators and allocator overhead, and does not count the weights and the probe already
    resident. On CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before the call;
(f) bytes per client per round: the model's state dict vs the statistics arrays the client app uploads
    (``moments_to_arrays`` / ``cross_to_arrays`` of the real statistics), with the d^2 + d per group
    formula as a check, and the whole round's upload for N clients.

Timings: one warm-up call on one batch, then best of ``--repeats`` (3) calls, the calls of (a), (b) and (c)
interleaved so that load from other processes hits them alike; slow transforms (one call over 2 s) are timed
once. A transform that takes longer than ``--transform-budget`` seconds is not run for more
models or wider nets; ZipIt!, weight matching and MergeMany are not run where their predicted time exceeds
the budget (ZipIt!: calibrated, cubic in N d; the weight-based ones: from their closest smaller measured cell,
cubic in the width, linear (weight matching) or quadratic (MergeMany) in N - 1). Skipped cells are blank in
the table, with the reason in the JSON.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedmerge.common.engine.methods import METHODS as MERGE_METHODS

from .common import data_note, forward_pass, sync

ROOT = Path(__file__).resolve().parent.parent

SCALES = {
    "cpu": {"widths": [0.25, 0.5, 1.0], "probe_size": 500, "transform_probe": 128, "transform_budget": 8.0},
    "paper": {"widths": [1.0, 2.0, 4.0, 8.0], "probe_size": 5000, "transform_probe": 1000,
              "transform_budget": 300.0},
}
ARCHS = ["vgg11", "resnet20"]
NS = [2, 4, 8]
METHODS = [m for m in MERGE_METHODS if m != "gcca"]  # every registered method but gcca
TARGET = 1.5
MEMORY_BATCH = 250  # statistics stream over batches of 250: the peak is that of one batch, whatever the probe size


# --- data -----------------------------------------------------------------------------------------------
def load_probe(dataset: str, data_root: str | None, size: int, seed: int):
    """The first ``size`` images of the seeded probe set (as every party derives it), as a float tensor."""
    from fedmerge.common.task.data import load_dataset, split_probe_pool, to_tensor

    train = load_dataset(dataset, "train", data_root=data_root or None)
    probe_idx, _ = split_probe_pool(len(train), max(size, 10), seed)
    idx = probe_idx[:size]
    return to_tensor(train.x[idx], train.name), train


def batches_of(x: torch.Tensor, bs: int = 250):
    from fedmerge.common.wire.probe import as_batches

    return as_batches(x, bs)


def make_model(arch: str, width: float, seed: int):
    from fedmerge.common.task.data import set_seed
    from fedmerge.common.task.models import build_model

    set_seed(seed)
    return build_model(arch, num_classes=10, width=width).eval()


# --- memory (CPU: child process, VmHWM; CUDA: allocator peak) ----------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_peak(fn) -> dict:
    """Peak resident-memory growth of ``fn()`` above the resident size before it, in bytes."""
    _trim()
    reset = _reset_peak()
    before = _status_kb("VmRSS")
    if reset and before is not None:
        fn()
        peak = _status_kb("VmHWM")
        return {"bytes": (peak - before) * 1024, "how": "VmHWM growth (clear_refs reset)",
                "rss_before": before * 1024}
    import resource  # fallback: ru_maxrss is a high-water mark since start; growth only if fn() exceeds it

    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": (r1 - r0) * 1024, "how": "ru_maxrss growth (lower bound)", "rss_before": r0 * 1024}


def cuda_peak(fn, dev) -> dict:
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return {"bytes": torch.cuda.max_memory_allocated(dev) - before, "how": "torch.cuda.max_memory_allocated",
            "allocated_before": before}


def memory_measurements(arch: str, width: float, probe: torch.Tensor, seed: int, dev: torch.device) -> dict:
    """Peak memory of forward / own statistics / cross statistics (runs in the current process)."""
    from fedmerge.common.engine.graph import derive_spec
    from fedmerge.common.engine.stats import cross_statistics, own_statistics

    batches = batches_of(probe)
    model = make_model(arch, width, seed).to(dev)
    ref = make_model(arch, width, seed + 1).to(dev)
    spec = derive_spec(model, batches.example())
    # warm every code path once (lazy initialisation must not count as the call's memory)
    one = batches_of(probe[:8], 8)
    forward_pass(model, one, dev)
    own_statistics(model, one, spec, device=dev)
    cross_statistics(ref, model, one, spec, device=dev)
    peak = (lambda f: cuda_peak(f, dev)) if dev.type == "cuda" else cpu_peak
    return {"forward": peak(lambda: forward_pass(model, batches, dev)),
            "own_statistics": peak(lambda: own_statistics(model, batches, spec, device=dev)),
            "cross_statistics": peak(lambda: cross_statistics(ref, model, batches, spec, device=dev))}


def memory_in_child(arch: str, width: float, probe_path: str, seed: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.cost", "--_memory-child",
           json.dumps({"arch": arch, "width": width, "probe": probe_path, "seed": seed, "threads": threads})]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        return {"error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _memory_child(spec_json: str) -> None:
    s = json.loads(spec_json)
    torch.set_num_threads(int(s["threads"]))
    probe = torch.load(s["probe"])
    out = memory_measurements(s["arch"], float(s["width"]), probe, int(s["seed"]), torch.device("cpu"))
    print(json.dumps(out))


# --- bytes ----------------------------------------------------------------------------------------------------
def upload_bytes(model, own, cross, spec) -> dict:
    from flwr.app import ArrayRecord

    from fedmerge.common.wire.records import arrays_to_record

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    own_arrays, cross_arrays, encoder = client_arrays(own, cross)
    own_b = sum(a.nbytes for a in own_arrays.values())
    cross_b = sum(a.nbytes for a in cross_arrays.values())
    dims = [g.dim for g in spec.groups.values()]
    formula_own = sum(8 * (d * d + d + 1) for d in dims)
    formula_cross = sum(8 * (d * d + 2 * d + 1) for d in dims)
    return {"model": model_bytes, "own": own_b, "cross": cross_b, "formula_own": formula_own,
            "formula_cross": formula_cross,
            "record_model": ArrayRecord(state).count_bytes(),
            "record_own": arrays_to_record(own_arrays).count_bytes(),
            "record_cross": arrays_to_record(cross_arrays).count_bytes(),
            "parameters": sum(p.numel() for p in model.parameters()), "group_dims": dims, "encoder": encoder}


def client_arrays(own, cross) -> tuple[dict, dict, str]:
    """The arrays the client app uploads with its default options (full float64 blocks)."""
    try:  # the wire encoder, where the project has one (options: dtype, rank)
        from fedmerge.common.wire.compress import encode_cross, encode_moments

        return (encode_moments(own, "float64", 0), encode_cross(cross, "float64", 0),
                "compress.encode_moments / encode_cross (float64, full rank)")
    except Exception:  # noqa: BLE001 - no encoder (or another signature): the plain arrays
        from fedmerge.common.engine.stats import cross_to_arrays, moments_to_arrays

        return moments_to_arrays(own), cross_to_arrays(cross), "stats.moments_to_arrays / cross_to_arrays"


def round_bytes(b: dict, n: int) -> dict:
    """Upload of one round with n clients: all send weights + own statistics, all but the reference send
    cross statistics; the server also sends the reference's weights to the n - 1 others (download)."""
    cca_up = n * (b["model"] + b["own"]) + (n - 1) * b["cross"]
    return {"n": n, "cca_upload": cca_up, "fedavg_upload": n * b["model"], "ratio": cca_up / (n * b["model"]),
            "cca_extra_download": (n - 1) * b["model"]}


# --- transforms -------------------------------------------------------------------------------------------------
def zipit_predicted_s(n: int, dims: list[int]) -> float:
    """A rough prediction of ZipIt!'s matching time (greedy agglomeration over N d features per group),
    calibrated on one core: 0.5 s at N d = 512 for N = 2, 2 s for N = 4, 4 s for N = 8; cubic in N d."""
    k = {2: 3.5e-9}.get(n, 1.6e-8 if n <= 4 else 3e-8)
    return float(sum(k * (n * d) ** 3 for d in dims))


# weight-based methods: measured growth with the number of models (exponent on (N' - 1) / (N - 1)); every
# method's cost grows about as d^3 with the width (eigendecompositions, linear assignments of d x d)
_GROWTH_N = {"weight_matching": 1.0, "merge_many": 2.0}


def predicted_s(method: str, width: float, n: int, dims: list[int], measured: dict) -> float | None:
    """Predicted seconds of a transform (None: no prediction, always run): ZipIt! from its calibration, the
    weight-based methods from their closest smaller measured cell (same arch)."""
    if method == "zipit":
        return zipit_predicted_s(n, dims)
    if method not in _GROWTH_N:
        return None
    cells = [(w, m, t) for (w, m), t in measured.items() if w <= width and m <= n and (w, m) != (width, n)]
    if not cells:
        return None
    w, m, t = max(cells, key=lambda c: (c[0] * c[1], c[0]))
    return t * ((n - 1) / (m - 1)) ** _GROWTH_N[method] * (width / w) ** 3


def time_transforms(arch: str, width: float, tprobe: torch.Tensor, args, dev, skip: dict, measured: dict,
                    log) -> list[dict]:
    from fedmerge.common.engine.align import merge_states
    from fedmerge.common.engine.graph import derive_spec
    from fedmerge.common.engine.merge import compute_alignment
    from fedmerge.common.engine.stats import Statistics, collect_statistics

    batches = batches_of(tprobe)
    ns = sorted(args.ns)
    nmax = max(ns)
    models = [make_model(arch, width, args.seed + i) for i in range(nmax)]
    spec = derive_spec(models[0], batches.example())
    dims = [g.dim for g in spec.groups.values()]
    t = time.perf_counter()
    # all-to-one methods need (reference, i) pairs only; ZipIt! needs every pair, for the Ns it will run
    ref_stats = collect_statistics(models, batches, reference=0, pairs="reference", spec=spec, device=dev)
    n_all = max([n for n in ns if zipit_predicted_s(n, dims) <= args.transform_budget] or [0])
    all_stats = None
    if "zipit" in args.methods and n_all >= 2:
        all_stats = collect_statistics(models[:n_all], batches, reference=0, pairs="all", spec=spec, device=dev)
    log(f"  statistics of {nmax} models on {tprobe.shape[0]} images (all pairs for N <= {n_all}): "
        f"{time.perf_counter() - t:.1f} s")
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    bn_eps = {name: m.eps for name, m in models[0].named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    rows, apply_s = [], {}
    for method in args.methods:
        for n in ns:
            key = (arch, method)
            rec = {"arch": arch, "width": width, "method": method, "n": n, "seconds": None, "runs": 0,
                   "skipped": None}
            blocked = [b for b in skip.get(key, []) if width >= b[0] and n >= b[1]]
            if blocked:  # a cell at least as wide with at least as many models was over budget
                rec["skipped"] = f"over budget at x{blocked[0][0]:g}, N={blocked[0][1]}"
                rows.append(rec)
                continue
            pred = predicted_s(method, width, n, dims, measured.setdefault(key, {}))
            if pred is not None and pred > args.transform_budget:
                rec["skipped"] = f"predicted {pred:.0f} s > budget"
                rows.append(rec)
                continue
            full = all_stats if method == "zipit" else ref_stats
            stats = Statistics(own=full.own[:n], cross={k: v for k, v in full.cross.items() if max(k) < n},
                               reference=0)
            sts = states[:n]
            fn = lambda: compute_alignment(method, spec, stats, sts, 0, gamma=args.gamma)  # noqa: E731
            t = time.perf_counter()
            alignment = fn()
            first = time.perf_counter() - t
            times = [first]
            if first < 2.0:
                for _ in range(args.repeats - 1):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
            if n not in apply_s and method != "avg":  # the apply step costs the same for every method
                t = time.perf_counter()
                merge_states(sts, spec, alignment, [1.0 / n] * n, 0, bn_eps)
                apply_s[n] = time.perf_counter() - t
            rec.update(seconds=min(times), runs=len(times))
            measured[key][(width, n)] = rec["seconds"]
            if first > args.transform_budget:
                skip.setdefault(key, []).append((width, n))
            rows.append(rec)
            log(f"  {arch} x{width:g} {method:>15} N={n}: {rec['seconds']:.3f} s")
    for n, v in sorted(apply_s.items()):
        rows.append({"arch": arch, "width": width, "method": "apply (merge_states)", "n": n, "seconds": v,
                     "runs": 1, "skipped": None})
    return rows


# --- per (arch, width) -------------------------------------------------------------------------------------------
def measure_point(arch: str, width: float, probe: torch.Tensor, args, dev) -> dict:
    from fedmerge.common.engine.graph import derive_spec
    from fedmerge.common.engine.stats import cross_statistics, own_statistics

    batches = batches_of(probe)
    one = batches_of(probe[:250])  # one batch, for the warm-up calls
    model = make_model(arch, width, args.seed).to(dev)
    ref = make_model(arch, width, args.seed + 1).to(dev)
    t = time.perf_counter()
    spec = derive_spec(model, batches.example())
    spec_s = time.perf_counter() - t
    calls = {"forward": lambda b: forward_pass(model, b, dev),
             "own": lambda b: own_statistics(model, b, spec, device=dev),
             "cross": lambda b: cross_statistics(ref, model, b, spec, device=dev)}
    for fn in calls.values():  # warm-up: one batch each
        fn(one)
    times = {k: [] for k in calls}
    for _ in range(max(1, args.repeats)):  # interleaved, so that load from elsewhere hits all three alike
        for k, fn in calls.items():
            sync(dev)
            t = time.perf_counter()
            fn(batches)
            sync(dev)
            times[k].append(time.perf_counter() - t)
    fwd, own_s, cross_s = (min(times[k]) for k in ("forward", "own", "cross"))
    fwd_all, own_all, cross_all = times["forward"], times["own"], times["cross"]
    own = own_statistics(model, one, spec, device=dev)
    cross = cross_statistics(ref, model, one, spec, device=dev)
    return {"arch": arch, "width": width, "probe_images": int(probe.shape[0]), "derive_spec_s": spec_s,
            "forward_s": fwd, "own_statistics_s": own_s, "cross_statistics_s": cross_s,
            "own_over_forward": own_s / fwd, "cross_over_two_forwards": cross_s / (2 * fwd),
            "meets_target": own_s / fwd <= TARGET, "all_times": {"forward": fwd_all, "own": own_all,
                                                                 "cross": cross_all},
            "bytes": upload_bytes(model.cpu(), own, cross, spec)}


# --- output --------------------------------------------------------------------------------------------------------
def _mb(b) -> str:
    return f"{b / 2 ** 20:.3f}" if b is not None else ""


def _fmt_s(v) -> str:
    return "" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def build_markdown(payload: dict) -> str:
    from .common import md_table

    c = payload["config"]
    env = payload["environment"]
    lines = [f"# Cost of statistics, transforms and communication (paper App. F) -- {c['scale']} scale\n",
             f"Data: {payload['data_note']}. Models: {', '.join(c['archs'])} (VGG11 without BatchNorm), widths "
             f"{', '.join(f'x{w:g}' for w in c['widths'])}, untrained (seeded random inits; 0 epochs: costs depend "
             f"on shapes, not on weights). Probe: {c['probe_size']} images for (a)-(c) and (e), batches of 250; "
             f"{c['transform_probe']} images for the statistics behind (d). gamma = {c['gamma']:g} (fixed) for CCA. "
             f"Device {env['device']}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, torch {env['torch']}, "
             f"{c['threads']} CPU threads (torch.set_num_threads), {env['cpus']} CPUs visible. Timings: warm-up on "
             f"one batch, best of {c['repeats']} (interleaved).\n"]
    lines.append("## (a)-(c) Client-side statistics vs a plain forward pass\n")
    lines.append(f"Target: own statistics <= {TARGET:g}x one forward pass.\n")
    rows = []
    for p in payload["points"]:
        rows.append([p["arch"], f"x{p['width']:g}", _fmt_s(p["forward_s"]), _fmt_s(p["own_statistics_s"]),
                     f"{p['own_over_forward']:.2f}x", "yes" if p["meets_target"] else "**no**",
                     _fmt_s(p["cross_statistics_s"]), f"{p['cross_over_two_forwards']:.2f}x",
                     _fmt_s(p["derive_spec_s"])])
    lines.append(md_table(["arch", "width", "forward s", "own stats s", "own / forward", f"<= {TARGET:g}x",
                           "cross stats s", "cross / 2 forwards", "derive_spec s (once)"], rows))
    lines.append("\n## (e) Peak memory (MiB)\n")
    mem_how = {m.get("how") for p in payload["points"] for m in (p.get("memory") or {}).values()
               if isinstance(m, dict) and "how" in m}
    lines.append(f"How: {', '.join(sorted(mem_how)) or 'not measured'} -- see the module docstring for what it "
                 "counts.\n")
    rows = []
    for p in payload["points"]:
        m = p.get("memory") or {}
        if "error" in m or not m:
            rows.append([p["arch"], f"x{p['width']:g}", "", "", "", m.get("error", "not measured")[:80]])
            continue
        f, o, cr = (m[k]["bytes"] for k in ("forward", "own_statistics", "cross_statistics"))
        rows.append([p["arch"], f"x{p['width']:g}", _mb(f), _mb(o), _mb(cr),
                     f"{o / f:.2f}x" if f > 0 else ""])
    lines.append(md_table(["arch", "width", "forward", "own stats", "cross stats", "own / forward"], rows))
    lines.append("\n## (f) Bytes per client per round\n")
    enc = sorted({p["bytes"].get("encoder", "") for p in payload["points"]})
    lines.append("Model = the state dict the client uploads (float32 weights and BN buffers); own / cross = the "
                 f"statistics arrays the client app uploads by default ({', '.join(enc)}) of the real statistics; "
                 "formula = 8 (d^2 + d + 1) per group (own), 8 (d^2 + 2d + 1) (cross). A non-reference client "
                 "uploads model + own + cross, the reference model + own.\n")
    rows = []
    for p in payload["points"]:
        b = p["bytes"]
        ok = b["own"] == b["formula_own"] and b["cross"] == b["formula_cross"]
        rows.append([p["arch"], f"x{p['width']:g}", f"{b['parameters']:,}", _mb(b["model"]), _mb(b["own"]),
                     _mb(b["cross"]), "yes" if ok else "no", f"{(b['model'] + b['own'] + b['cross']) / b['model']:.2f}x",
                     *[f"{round_bytes(b, n)['ratio']:.2f}x" for n in c["ns"]]])
    lines.append(md_table(["arch", "width", "parameters", "model MiB", "own MiB", "cross MiB", "= formula",
                           "client upload / model"] + [f"round upload / FedAvg, N={n}" for n in c["ns"]], rows))
    lines.append("\n## (d) Transforms (server), seconds\n")
    lines.append("`compute_alignment` (the transforms), and the apply step `merge_states` (align and average "
                 "the weights; the same for every method, timed once per N). skipped: over the time budget, "
                 "measured or predicted (reason in the JSON).\n")
    by = {}
    for t in payload["transforms"]:
        by.setdefault((t["arch"], t["width"], t["method"]), {})[t["n"]] = t
    rows = []
    for (arch, w, method), cells in by.items():
        row = [arch, f"x{w:g}", method]
        for n in c["ns"]:
            t = cells.get(n)
            row.append("" if t is None else ("skipped" if t["seconds"] is None else _fmt_s(t["seconds"])))
        rows.append(row)
    lines.append(md_table(["arch", "width", "method"] + [f"N={n}" for n in c["ns"]], rows))
    lines.append(f"\nCommand: `{payload['command']}`; total {payload['seconds']:.0f} s.\n")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = payload["config"]
    archs = c["archs"]
    panels = 2 + len(archs)
    rows = (panels + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    axes = list(axes.flat)
    for extra in axes[panels:]:
        extra.set_visible(False)
    axes = axes[:panels]
    ax = axes[0]
    for arch, col in zip(archs, ["C0", "C1", "C2", "C3"]):
        pts = [p for p in payload["points"] if p["arch"] == arch]
        ws = [p["width"] for p in pts]
        ax.plot(ws, [p["own_over_forward"] for p in pts], "o-", color=col, label=f"{arch}: own / forward")
        ax.plot(ws, [p["cross_over_two_forwards"] for p in pts], "s--", color=col,
                label=f"{arch}: cross / 2 forwards")
    ax.axhline(TARGET, color="k", lw=0.8, ls=":", label=f"target {TARGET:g}x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width multiplier")
    ax.set_ylabel("time ratio")
    ax.set_title("statistics vs plain forward pass")
    ax.legend(fontsize=7)
    for ax, arch in zip(axes[1:1 + len(archs)], archs):
        rows = [t for t in payload["transforms"] if t["arch"] == arch and t["seconds"] is not None]
        for i, method in enumerate(c["methods"] + ["apply (merge_states)"]):
            mine = [t for t in rows if t["method"] == method]
            widths = sorted({t["width"] for t in mine if sum(u["width"] == t["width"] for u in mine) >= 2},
                            reverse=True)
            w = widths[0] if widths else (max(t["width"] for t in mine) if mine else None)
            pts = sorted((t["n"], t["seconds"]) for t in mine if t["width"] == w)
            if pts:
                style = {"ls": "-", "color": f"C{i}"} if i < len(c["methods"]) else {"ls": "--", "color": "k"}
                ax.plot([a for a, _ in pts], [max(b, 1e-5) for _, b in pts], marker="o", label=f"{method} (x{w:g})",
                        **style)
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(c["ns"])
        ax.set_xticklabels([str(n) for n in c["ns"]])
        ax.set_xlabel("number of models N")
        ax.set_ylabel("transforms s")
        ax.set_title(f"{arch}: server transforms")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for arch, col in zip(archs, ["C0", "C1", "C2", "C3"]):
        pts = [p for p in payload["points"] if p["arch"] == arch]
        ws = [p["width"] for p in pts]
        ax.plot(ws, [p["bytes"]["model"] / 2 ** 20 for p in pts], "o-", color=col, label=f"{arch}: model")
        ax.plot(ws, [p["bytes"]["own"] / 2 ** 20 for p in pts], "s--", color=col, label=f"{arch}: own stats")
        ax.plot(ws, [(p["bytes"]["own"] + p["bytes"]["cross"]) / 2 ** 20 for p in pts], "^:", color=col,
                label=f"{arch}: own + cross")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width multiplier")
    ax.set_ylabel("MiB per client per round")
    ax.set_title("upload per client")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--widths", default=None, help="comma-separated width multipliers (default: by scale)")
    p.add_argument("--ns", default=",".join(map(str, NS)), help="numbers of models for the transforms")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--probe-size", type=int, default=None)
    p.add_argument("--transform-probe", type=int, default=None, help="probe images behind the statistics for (d)")
    p.add_argument("--transform-budget", type=float, default=None,
                   help="seconds; a transform slower than this is not run for more models or wider nets")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: what torch is given)")
    p.add_argument("--memory", choices=["auto", "none"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sc = SCALES[a.scale]
    a.archs = [s for s in a.archs.split(",") if s]
    a.widths = [float(w) for w in a.widths.split(",")] if a.widths else list(sc["widths"])
    a.ns = [int(n) for n in a.ns.split(",")]
    if min(a.ns) < 2:
        p.error("--ns: numbers of models must be >= 2")
    a.methods = [m for m in a.methods.split(",") if m]
    a.probe_size = a.probe_size or sc["probe_size"]
    a.transform_probe = a.transform_probe or min(sc["transform_probe"], a.probe_size)
    a.transform_budget = a.transform_budget if a.transform_budget is not None else sc["transform_budget"]
    return a


def main(argv=None):
    args = parse(argv)
    if args.memory_child:
        return _memory_child(args.memory_child)
    from .common import environment

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out or Path("results") / args.scale / "cost")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(msg, flush=True)

    probe, train = load_probe(args.dataset, args.data_root, args.probe_size, args.seed)
    note = data_note(train)
    log(f"cost: {note}; probe {probe.shape[0]} images; device {dev}; {threads} threads")
    points, transforms, skip, measured = [], [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = str(Path(tmp) / "probe.pt")
        torch.save(probe[:MEMORY_BATCH].clone(), probe_path)
        for arch in args.archs:
            for width in sorted(args.widths):
                pt = measure_point(arch, width, probe, args, dev)
                log(f"{arch} x{width:g}: forward {pt['forward_s']:.3f} s, own stats {pt['own_statistics_s']:.3f} s "
                    f"({pt['own_over_forward']:.2f}x), cross {pt['cross_statistics_s']:.3f} s "
                    f"({pt['cross_over_two_forwards']:.2f}x of 2 forwards)")
                if args.memory == "none":
                    pt["memory"] = {}
                elif dev.type == "cuda":
                    pt["memory"] = memory_measurements(arch, width, probe[:MEMORY_BATCH], args.seed, dev)
                else:
                    pt["memory"] = memory_in_child(arch, width, probe_path, args.seed, threads)
                points.append(pt)
                transforms += time_transforms(arch, width, probe[:args.transform_probe], args, dev, skip, measured,
                                              log)
    env = environment()
    env["threads"] = threads
    cmd = "python -m benchmarks.cost " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"config": {"scale": args.scale, "dataset": args.dataset, "archs": args.archs, "widths": args.widths,
                          "ns": args.ns, "methods": args.methods, "probe_size": int(probe.shape[0]),
                          "transform_probe": args.transform_probe, "transform_budget": args.transform_budget,
                          "gamma": args.gamma, "repeats": args.repeats, "threads": threads, "seed": args.seed,
                          "device": str(dev), "epochs": 0, "lr": None,  # untrained seeded models: no training
                          "target_ratio": TARGET},
               "data_note": note, "data_source": train.source, "points": points,
               "round_bytes": {f"{p['arch']}_x{p['width']:g}": [round_bytes(p["bytes"], n) for n in args.ns]
                               for p in points},
               "transforms": transforms, "environment": env, "command": cmd.strip(),
               "seconds": time.time() - t0}
    md = build_markdown(payload)
    (out / "cost.json").write_text(json.dumps(payload, indent=2, default=float))
    (out / "cost.md").write_text(md)
    try:
        plot(payload, out / "cost.png")
    except Exception as exc:  # noqa: BLE001 - the numbers are worth more than the figure
        log(f"could not draw the plot: {exc}")
    print(md)
    log(f"cost: done in {time.time() - t0:.0f} s; results in {out}/ (cost.json, cost.md, cost.png)")
    return payload


if __name__ == "__main__":
    main()
