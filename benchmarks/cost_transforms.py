"""The server's transforms per method vs the number of models (:mod:`benchmarks.cost` (d)), and the predictors
that skip a cell whose time would exceed the budget (ZipIt!: calibrated, cubic in N d; the weight-based methods:
from their closest smaller measured cell)."""
from __future__ import annotations

import time

import torch

from .cost_probe import batches_of, make_model

__all__ = ["zipit_predicted_s", "predicted_s", "time_transforms"]


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
