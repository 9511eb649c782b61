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
    is that of one batch whatever the probe size): on CPU, the growth of the process's peak resident set
    size (VmHWM, reset through /proc/self/clear_refs, after malloc_trim) above its resident size before the
    call, in a child process
    per (arch, width) that holds only the model(s) and the probe; this counts activations, temporaries,
    statistics accumulators and allocator overhead, and does not count the weights and the probe already
    resident. On CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before the call;
(f) bytes per client per round: the model's state dict vs the statistics arrays the client app uploads
    (``compress.encode_moments`` / ``encode_cross`` of the real statistics), with the d^2 + d per group
    formula as a check, and the whole round's upload for N clients.

Timings: one warm-up call on one batch, then best of ``--repeats`` (3) calls, the calls of (a), (b) and (c)
interleaved so that load from other processes hits them alike; slow transforms (one call over 2 s) are timed
once. A transform that takes longer than ``--transform-budget`` seconds is not run for more
models or wider nets; ZipIt!, weight matching and MergeMany are not run where their predicted time exceeds
the budget (ZipIt!: calibrated, cubic in N d; the weight-based ones: from their closest smaller measured cell,
cubic in the width, linear (weight matching) or quadratic (MergeMany) in N - 1). Skipped cells are blank in
the table, with the reason in the JSON.

Modules: :mod:`benchmarks.cost_probe` (probe, models), :mod:`benchmarks.cost_memory` (e),
:mod:`benchmarks.cost_bytes` (f), :mod:`benchmarks.cost_transforms` (d) and :mod:`benchmarks.cost_report` (the
markdown and the figure); this one measures (a)-(c) and runs the whole.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedmerge.common.engine.linalg import default_device
from fedmerge.common.engine.methods import METHODS as MERGE_METHODS

from .common import comma_list, data_note, forward_pass, method_list, sync
from .cost_bytes import round_bytes, upload_bytes
from .cost_memory import memory_child, memory_in_child, memory_measurements
from .cost_probe import batches_of, load_probe, make_model
from .cost_report import build_markdown, plot
from .cost_transforms import time_transforms

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
    a.archs = comma_list(a.archs)
    a.widths = comma_list(a.widths, float) if a.widths else list(sc["widths"])
    a.ns = comma_list(a.ns, int)
    if min(a.ns) < 2:
        p.error("--ns: numbers of models must be >= 2")
    a.methods = method_list(a.methods, p)
    a.probe_size = a.probe_size or sc["probe_size"]
    a.transform_probe = a.transform_probe or min(sc["transform_probe"], a.probe_size)
    a.transform_budget = a.transform_budget if a.transform_budget is not None else sc["transform_budget"]
    return a


def main(argv=None):
    args = parse(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    from .common import environment

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dev = default_device(args.device or None)
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
