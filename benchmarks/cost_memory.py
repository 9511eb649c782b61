"""Peak memory of a forward pass and of the client's statistics (:mod:`benchmarks.cost` (e)): on CPU the growth of
the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs, after malloc_trim), in a child
process per (arch, width); on CUDA ``torch.cuda.max_memory_allocated``."""
from __future__ import annotations

import ctypes
import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from .common import forward_pass
from .cost_probe import batches_of, make_model

__all__ = ["cpu_peak", "cuda_peak", "memory_measurements", "memory_in_child", "memory_child"]

ROOT = Path(__file__).resolve().parent.parent


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


def memory_child(spec_json: str) -> None:
    """The child process of :func:`memory_in_child`: measure, print the result as one JSON line."""
    s = json.loads(spec_json)
    torch.set_num_threads(int(s["threads"]))
    probe = torch.load(s["probe"])
    out = memory_measurements(s["arch"], float(s["width"]), probe, int(s["seed"]), torch.device("cpu"))
    print(json.dumps(out))
