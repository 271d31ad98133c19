"""PNG plots for :mod:`mmfl.experiment.report` (matplotlib, the ``plot`` extra).

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas, never through pyplot,
so writing a report changes no global matplotlib state (backend, open figures) of the caller.
Every function takes plain numpy data prepared by the report and writes one PNG.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmfl.errors import MmflError

DPI = 100


def require_matplotlib() -> None:
    """Raise MmflError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MmflError("plots need matplotlib, which is not installed; install the plot extra: "
                        "pip install 'mmfl[plot]'") from None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _grid(fig, panels: int, ncols: int = 3):
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return axes[:panels]


#: inches per character of a legend entry at fontsize "small", and per entry for its handle
LEGEND_CHAR_IN, LEGEND_HANDLE_IN = 0.075, 0.5


def _legend_columns(fig, names: Sequence[str]) -> int:
    """Columns (at most 4) of a legend that fits the figure's width with its longest name."""
    longest = max((len(str(n)) for n in names), default=1)
    fit = int(fig.get_figwidth() // (longest * LEGEND_CHAR_IN + LEGEND_HANDLE_IN))
    return max(1, min(len(names), 4, fit))


def _legend(fig, axes, labels: Sequence[str]) -> None:
    for ax in axes:
        handles, names = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, names, loc="outside lower center",
                       ncols=_legend_columns(fig, names), fontsize="small")
            return


def _color(i: int) -> str:
    return f"C{i % 10}"


def band_panels(path: Path, panels: Sequence[dict[str, Any]], labels: Sequence[str], *,
                ylabel: str, xlabel: str = "round") -> Path:
    """One panel per entry of ``panels`` (``title``, ``series``: per group ``(x (R,), mean (R,),
    low (R,), high (R,))`` or None, optional ``hline``: (y, text), optional ``clip_first``:
    True to keep a first-x spike from squashing the axis, see :func:`_clip_first`); a mean line
    and a shaded low..high band per group."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.2 * min(len(panels), 3), 3.2 * math.ceil(len(panels) / 3) + 0.6)
    axes = _grid(fig, len(panels))
    for ax, panel in zip(axes, panels):
        for g, series in enumerate(panel["series"]):
            if series is None:
                continue
            x, mean, low, high = series
            ax.plot(x, mean, color=_color(g), label=labels[g], lw=1.6)
            if np.any(high > low):
                ax.fill_between(x, low, high, color=_color(g), alpha=0.18, lw=0)
        if panel.get("hline") is not None:
            y, text = panel["hline"]
            ax.axhline(y, color="0.3", ls="--", lw=1)
            ax.annotate(text, (0.01, y), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize="x-small",
                        color="0.3")
        title = panel["title"]
        if panel.get("clip_first"):
            note = _clip_first(ax, panel["series"], labels, xlabel)
            title += f"\n{note}" if note else ""
        ax.set_title(title, fontsize="medium")
        if xlabel == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend(fig, axes, labels)
    return _save(fig, path)


def _clip_first(ax, series: Sequence[Any], labels: Sequence[str], xlabel: str) -> str:
    """Limit the y axis to the data after the first x; mark the first-x means above it.

    A sampler whose first round trains every pair (StaleVRE's ``init = "full"``, round 1 in
    metrics.csv) has a first value many times its later ones, which would squash the rest of
    the curve. When some group's first-x mean lies so far above the low..high bands of the later
    x (every x after the panel's first) that showing it would more than double the axis height,
    the axis spans those later bands only, with a margin of 8% of their span; each such group is
    drawn as a triangle on the top edge in its colour, and the returned text (the panel title's
    second line) names the groups and their first-x means, e.g. ``round 1 off scale (▲): stalevre
    30``. Otherwise returns "" and changes nothing.
    """
    usable = [s for s in series if s is not None and len(s[0])]
    if not usable:
        return ""
    first = min(float(s[0][0]) for s in usable)
    later = [(s[2][s[0] > first], s[3][s[0] > first]) for s in usable]
    later = [(lo, hi) for lo, hi in later if lo.size and not np.all(np.isnan(hi))]
    if not later:
        return ""
    lo_v = float(np.nanmin(np.concatenate([lo for lo, _ in later])))
    hi_v = float(np.nanmax(np.concatenate([hi for _, hi in later])))
    pad = 0.08 * (hi_v - lo_v) if hi_v > lo_v else max(0.5, 0.08 * abs(hi_v))
    bottom, top = lo_v - pad, hi_v + pad
    spikes = [(g, float(s[1][0])) for g, s in enumerate(series)
              if s is not None and len(s[0]) and float(s[0][0]) == first
              and s[1][0] > top + (top - bottom)]
    if not spikes:
        return ""
    all_low = np.concatenate([s[2] for s in usable])
    if bottom < 0 <= np.nanmin(all_low):  # counts: the axis does not go below 0 needlessly
        bottom = 0.0
    ax.set_ylim(bottom, top)
    for g, _ in spikes:  # on the top edge, drawn outside the clipped area
        ax.plot([first], [top], marker="^", ms=8, color=_color(g), clip_on=False, zorder=5)
    where = f"round {first:g}" if xlabel == "round" else f"{xlabel} {first:g}"
    text = f"{where} off scale (▲): " + ", ".join(f"{labels[g]} {v:.3g}" for g, v in spikes)
    return textwrap.fill(textwrap.shorten(text, width=100, placeholder=" ..."), width=52)


def grouped_bars(path: Path, categories: Sequence[str], labels: Sequence[str],
                 mean: np.ndarray, std: np.ndarray, *, ylabel: str) -> Path:
    """Bars of ``mean`` (G, C) with ``std`` error bars: a cluster per category, a bar per group."""
    g_count, c_count = mean.shape
    fig = _figure(max(5.0, 1.0 + 0.9 * c_count * max(g_count, 2) / 2), 3.6)
    ax = fig.subplots()
    width = 0.8 / max(g_count, 1)
    x = np.arange(c_count)
    for g in range(g_count):
        ax.bar(x + (g - (g_count - 1) / 2) * width, np.nan_to_num(mean[g]), width,
               yerr=np.nan_to_num(std[g]), color=_color(g), label=labels[g], capsize=2)
    ax.set_xticks(x, list(categories))
    ax.set_ylabel(ylabel)
    # the axis spans the data, not 0..max: a 2-point difference between bars stays visible
    lo_v = float(np.nanmin(mean - std)) if mean.size and np.isfinite(mean).any() else 0.0
    hi_v = float(np.nanmax(mean + std)) if mean.size and np.isfinite(mean).any() else 1.0
    pad = max(0.15 * (hi_v - lo_v), 0.01)
    ax.set_ylim(max(0.0, lo_v - pad), hi_v + pad)
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, [ax], labels)
    return _save(fig, path)


def cost_scatter(path: Path, labels: Sequence[str], accuracy: np.ndarray,
                 accuracy_std: np.ndarray, costs: Sequence[tuple[str, np.ndarray, np.ndarray]]
                 ) -> Path:
    """One panel per cost (name, mean (G,), std (G,)): final mean accuracy (y) against it."""
    fig = _figure(4.4 * len(costs), 3.6)
    axes = _grid(fig, len(costs), ncols=len(costs))
    for ax, (name, cost, cost_std) in zip(axes, costs):
        for g, label in enumerate(labels):
            # colours name the groups (the legend); no per-point labels, which overlapped
            ax.errorbar(cost[g], accuracy[g], xerr=cost_std[g], yerr=accuracy_std[g], fmt="o",
                        color=_color(g), label=label, capsize=2)
        ax.set_xlabel(f"{name} (total per run)")
        ax.set_ylabel("final mean accuracy")
        ax.grid(alpha=0.3)
    _legend(fig, axes, labels)
    return _save(fig, path)
