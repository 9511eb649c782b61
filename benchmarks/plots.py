"""Plots of benchmark results: PNG files written with matplotlib's Agg renderer (no display, no pyplot state).

    bar_chart(path, categories, {"series": [values per category], ...}, hlines={"ensemble": 75.4})
    line_plot(path, x, {"series": [y per x], ...}, logx=True, vlines={"auto": 0.3})
    line_panels(path, [{"x": x, "series": {...}, "title": ...}, ...])   # several line plots in one figure

Values that are ``None`` or NaN are left out (a missing bar, a gap in a line).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

__all__ = ["bar_chart", "line_plot", "line_panels"]

_REF_STYLES = ({"color": "black", "linestyle": "--"}, {"color": "dimgray", "linestyle": ":"},
               {"color": "gray", "linestyle": "-."}, {"color": "darkgray", "linestyle": (0, (5, 2, 1, 2))})


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def _decorate(ax, title: str, xlabel: str, ylabel: str, hlines, vlines, legend_out: bool) -> None:
    for i, (name, v) in enumerate((hlines or {}).items()):
        if _ok(v):
            ax.axhline(float(v), linewidth=1.2, label=f"{name} ({float(v):.1f})", **_REF_STYLES[i % len(_REF_STYLES)])
    for i, (name, v) in enumerate((vlines or {}).items()):
        if _ok(v):
            ax.axvline(float(v), linewidth=1.2, label=name, color=f"C{(i + 6) % 10}", linestyle=":")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        if legend_out:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=7)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _finish(fig: Figure, ax, path, title: str, xlabel: str, ylabel: str, hlines, vlines, legend_out: bool) -> Path:
    _decorate(ax, title, xlabel, ylabel, hlines, vlines, legend_out)
    return _save(fig, path)


def bar_chart(path, categories: Sequence[str], series: Mapping[str, Sequence], *, title: str = "",
              xlabel: str = "", ylabel: str = "test accuracy %", hlines: Mapping[str, float] | None = None,
              annotate: bool = True, ylim: tuple[float, float] | None = (0, 100)) -> Path:
    """Grouped bars: one group per category, one bar (colour) per series; reference values as
    horizontal lines (``hlines``: name -> value)."""
    cats = list(categories)
    k = max(1, len(series))
    width = 0.8 / k
    fig = Figure(figsize=(max(6.0, 0.9 * len(cats) * max(1, k) * 0.6 + 2), 4.2))
    ax = fig.subplots()
    for j, (name, vals) in enumerate(series.items()):
        vals = list(vals)
        if len(vals) != len(cats):
            raise ValueError(f"series {name!r} has {len(vals)} values for {len(cats)} categories")
        xs = [i - 0.4 + width * (j + 0.5) for i, v in enumerate(vals) if _ok(v)]
        ys = [float(v) for v in vals if _ok(v)]
        bars = ax.bar(xs, ys, width=width * 0.95, label=name, color=f"C{j % 10}")
        if annotate:
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.1f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=6, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=20 if max((len(c) for c in cats), default=0) > 10 else 0, ha="right"
                       if max((len(c) for c in cats), default=0) > 10 else "center")
    if ylim is not None:
        ax.set_ylim(*ylim)
    return _finish(fig, ax, path, title, xlabel, ylabel, hlines, None, legend_out=True)


def line_plot(path, x: Sequence[float], series: Mapping[str, Sequence], *, title: str = "", xlabel: str = "",
              ylabel: str = "test accuracy %", hlines: Mapping[str, float] | None = None,
              vlines: Mapping[str, float] | None = None, logx: bool | float = False, logy: bool | float = False,
              styles: Mapping[str, dict] | None = None, xticks: Sequence[float] | None = None,
              ylim: tuple[float, float] | None = None,
              points: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """One line per series over ``x`` (markers at the points); ``styles`` gives per-series matplotlib keyword
    arguments (e.g. ``{"linestyle": "--"}``); ``hlines``/``vlines``: name -> reference value; ``points``:
    name -> (x, y) single highlighted points (stars); ``logx``/``logy``: True (base 10) or the log base."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    _lines(ax, x, series, logx=logx, logy=logy, styles=styles, xticks=xticks, ylim=ylim, points=points)
    return _finish(fig, ax, path, title, xlabel, ylabel, hlines, vlines, legend_out=True)


def line_panels(path, panels: Sequence[Mapping], *, ncols: int = 2) -> Path:
    """Several line plots in one figure, ``ncols`` a row: each panel a mapping of :func:`line_plot`'s keyword
    arguments, ``x`` and ``series`` included (legends inside the panels)."""
    rows = max(1, -(-len(panels) // ncols))
    fig = Figure(figsize=(5.5 * ncols, 4.2 * rows), layout="constrained")
    axes = list(fig.subplots(rows, ncols, squeeze=False).flat)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        kw = dict(panel)
        decor = {k: kw.pop(k, d) for k, d in (("title", ""), ("xlabel", ""), ("ylabel", "test accuracy %"),
                                              ("hlines", None), ("vlines", None))}
        _lines(ax, kw.pop("x"), kw.pop("series"), **kw)
        _decorate(ax, **decor, legend_out=False)
    return _save(fig, path)


def _lines(ax, x: Sequence[float], series: Mapping[str, Sequence], *, logx: bool | float = False,
           logy: bool | float = False, styles: Mapping[str, dict] | None = None,
           xticks: Sequence[float] | None = None, ylim: tuple[float, float] | None = None,
           points: Mapping[str, tuple[float, float]] | None = None) -> None:
    xs = list(x)
    for j, (name, vals) in enumerate(series.items()):
        vals = list(vals)
        if len(vals) != len(xs):
            raise ValueError(f"series {name!r} has {len(vals)} values for {len(xs)} x values")
        pts = [(float(a), float(v)) for a, v in zip(xs, vals) if _ok(v)]
        if not pts:
            continue
        kw = {"marker": "o", "markersize": 4, "color": f"C{j % 10}", **((styles or {}).get(name, {}))}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **kw)
    for j, (name, (px, py)) in enumerate((points or {}).items()):
        if _ok(px) and _ok(py):
            ax.plot([float(px)], [float(py)], linestyle="none", marker="*", markersize=13, label=name,
                    color=f"C{j % 10}", markeredgecolor="black", zorder=5)
    if logx:
        ax.set_xscale("log", base=10 if logx is True else float(logx))
    if logy:
        ax.set_yscale("log", base=10 if logy is True else float(logy))
    if xticks is not None:
        ax.set_xticks(list(xticks))
        ax.set_xticklabels([f"{t:g}" for t in xticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    if ylim is not None:
        ax.set_ylim(*ylim)
