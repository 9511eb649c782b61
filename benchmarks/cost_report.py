"""The report of :mod:`benchmarks.cost`: the markdown tables and the figure (drawn with :mod:`benchmarks.plots`)."""
from __future__ import annotations

from pathlib import Path

from .common import md_table
from .cost_bytes import round_bytes
from .plots import line_panels

__all__ = ["build_markdown", "plot"]


def _mb(b) -> str:
    return f"{b / 2 ** 20:.3f}" if b is not None else ""


def _fmt_s(v) -> str:
    return "" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def build_markdown(payload: dict) -> str:
    c = payload["config"]
    target = c["target_ratio"]
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
    lines.append(f"Target: own statistics <= {target:g}x one forward pass.\n")
    rows = []
    for p in payload["points"]:
        rows.append([p["arch"], f"x{p['width']:g}", _fmt_s(p["forward_s"]), _fmt_s(p["own_statistics_s"]),
                     f"{p['own_over_forward']:.2f}x", "yes" if p["meets_target"] else "**no**",
                     _fmt_s(p["cross_statistics_s"]), f"{p['cross_over_two_forwards']:.2f}x",
                     _fmt_s(p["derive_spec_s"])])
    lines.append(md_table(["arch", "width", "forward s", "own stats s", "own / forward", f"<= {target:g}x",
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
                     _mb(b["cross"]), "yes" if ok else "no",
                     f"{(b['model'] + b['own'] + b['cross']) / b['model']:.2f}x",
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
    """Statistics vs a forward pass over the width, each arch's transforms vs N, and the upload per client."""
    c = payload["config"]
    archs, ns = c["archs"], c["ns"]
    mib = 2 ** 20
    widths = sorted({p["width"] for p in payload["points"]})

    def by_width(arch: str, value) -> list:
        pts = {p["width"]: p for p in payload["points"] if p["arch"] == arch}
        return [value(pts[w]) if w in pts else None for w in widths]

    def arch_styles(suffixes: dict[str, dict]) -> dict:
        return {f"{arch}: {name}": {"color": f"C{i}", **style} for i, arch in enumerate(archs)
                for name, style in suffixes.items()}

    ratio = {"own / forward": {"marker": "o", "linestyle": "-"},
             "cross / 2 forwards": {"marker": "s", "linestyle": "--"}}
    panels = [{"x": widths, "logx": 2, "title": "statistics vs plain forward pass", "xlabel": "width multiplier",
               "ylabel": "time ratio", "hlines": {f"target {c['target_ratio']:g}x": c["target_ratio"]},
               "styles": arch_styles(ratio),
               "series": {f"{arch}: {name}": by_width(arch, lambda p, k=key: p[k]) for arch in archs
                          for name, key in zip(ratio, ("own_over_forward", "cross_over_two_forwards"))}}]
    for arch in archs:
        rows = [t for t in payload["transforms"] if t["arch"] == arch and t["seconds"] is not None]
        series, styles = {}, {}
        for i, method in enumerate(c["methods"] + ["apply (merge_states)"]):
            mine = [t for t in rows if t["method"] == method]
            wide = sorted({t["width"] for t in mine if sum(u["width"] == t["width"] for u in mine) >= 2},
                          reverse=True)
            w = wide[0] if wide else (max(t["width"] for t in mine) if mine else None)
            secs = {t["n"]: max(t["seconds"], 1e-5) for t in mine if t["width"] == w}
            if secs:
                series[f"{method} (x{w:g})"] = [secs.get(n) for n in ns]
                styles[f"{method} (x{w:g})"] = ({"linestyle": "-", "color": f"C{i}"} if i < len(c["methods"])
                                                else {"linestyle": "--", "color": "k"})
        panels.append({"x": ns, "series": series, "styles": styles, "logx": 2, "logy": True, "xticks": ns,
                       "title": f"{arch}: server transforms", "xlabel": "number of models N",
                       "ylabel": "transforms s"})
    upload = {"model": ({"marker": "o", "linestyle": "-"}, lambda b: b["model"]),
              "own stats": ({"marker": "s", "linestyle": "--"}, lambda b: b["own"]),
              "own + cross": ({"marker": "^", "linestyle": ":"}, lambda b: b["own"] + b["cross"])}
    panels.append({"x": widths, "logx": 2, "logy": True, "title": "upload per client", "xlabel": "width multiplier",
                   "ylabel": "MiB per client per round", "styles": arch_styles({k: v[0] for k, v in upload.items()}),
                   "series": {f"{arch}: {name}": by_width(arch, lambda p, f=f: f(p["bytes"]) / mib) for arch in archs
                              for name, (_, f) in upload.items()}})
    line_panels(path, panels)
