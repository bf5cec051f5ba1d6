"""Training curves (``python visualize.py curves``): ``read_stats`` reads the ``stats.txt`` that
``main_vicregl.py`` writes, skipping lines that are not a flat JSON object (huge or deeply nested values
are refused, not parsed); ``curves_figure`` plots every metric against the step with matplotlib,
which is imported only when a figure is drawn (``_matplotlib``), so importing this module never needs it.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from utils import UserError

from .draw import LABEL_H, PAD, _panel_xy, figure_size

__all__ = ["RunStats", "read_stats", "curves_figure", "render_curves"]

DEFAULT_KEYS = ("l", "inv_l", "var_l", "cov_l", "minv_l", "mvar_l", "mcov_l", "cls_l", "top1", "top1_val")
KEY_NAMES = {
    "l": "total loss", "inv_l": "global invariance", "var_l": "global variance", "cov_l": "global covariance",
    "minv_l": "local invariance", "mvar_l": "local variance", "mcov_l": "local covariance",
    "cls_l": "online probe cross-entropy", "top1": "online probe top-1 % (train)",
    "top5": "online probe top-5 % (train)", "top1_val": "online probe top-1 % (val)",
    "top5_val": "online probe top-5 % (val)", "clsl_val": "online probe cross-entropy (val)",
    "lr": "learning rate", "stdr": "std of normalised representations", "corr": "mean correlation (repr.)",
    "stde": "std of normalised embeddings", "core": "mean correlation (embeddings)",
}


@dataclass
class RunStats:
    """One stats.txt: ``series[key]`` = (steps, values), steps increasing; validation keys
    (``*_val``) are placed at the step that ended their epoch."""
    path: str
    label: str
    commands: List[str] = field(default_factory=list)  # one per start (resumed runs add one)
    series: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)
    skipped: int = 0  # lines that were neither a command line nor valid JSON (e.g. cut off by a crash)
    first_skipped: int = 0  # the line number (from 1) of the first of them


def _stats_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "stats.txt"
    if not p.is_file():
        raise UserError(f"stats file not found: {p}")
    return p


def read_stats(path: str, label: Optional[str] = None) -> RunStats:
    """Read a ``main_vicregl.py`` stats.txt (or an experiment folder holding one).

    Lines: command lines (one per start), JSON objects with ``ep``, ``st`` and the metrics, and
    ``Val: {...}`` objects with ``ep`` and the validation metrics. A step logged twice (a resumed
    run redoing steps) keeps its last value. A ``Val:`` line of epoch e sits at the last step
    logged in epoch e (else the last step logged before it).
    """
    p = _stats_path(path)
    run = RunStats(str(p), label or (p.parent.name if p.name == "stats.txt" else p.name) or str(p))
    points: Dict[str, Dict[int, float]] = {}
    val_lines, epoch_end, last_step = [], {}, 0
    for number, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        text = line.strip()
        is_val = text.startswith("Val:")
        body = text[len("Val:"):].strip() if is_val else text
        if not body.startswith("{"):
            if body:
                run.commands.append(body)
            continue
        row = _stats_row(body)
        if row is None:
            run.skipped += 1
            run.first_skipped = run.first_skipped or number
            continue
        if is_val:
            val_lines.append((row, last_step))
            continue
        if not isinstance(row.get("st"), int):
            run.skipped += 1
            run.first_skipped = run.first_skipped or number
            continue
        last_step = row["st"]
        epoch_end[row.get("ep")] = max(epoch_end.get(row.get("ep"), last_step), last_step)
        _add_points(points, row, last_step)
    for row, before in val_lines:
        _add_points(points, row, epoch_end.get(row.get("ep"), before))
    for key, by_step in points.items():
        steps = sorted(by_step)
        run.series[key] = (steps, [by_step[s] for s in steps])
    return run


def _bounded_int(text: str) -> int:
    if len(text) > 19:  # steps and metrics fit in 64 bits; longer would overflow float() or take long to parse
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # a literal such as 1e999 (a diverged loss is written NaN or Infinity)
        raise ValueError(f"number {text[:20]} out of range")
    return value


def _stats_row(body: str) -> Optional[dict]:
    """The JSON object of one stats line, or None when the line is not a flat object of numbers, strings,
    booleans and nulls (cut off by a crash, or not written by main_vicregl.py: huge or deeply nested values
    are refused, not parsed)."""
    try:
        row = json.loads(body, parse_int=_bounded_int, parse_float=_finite_float)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        return None
    if not isinstance(row, dict) or not all(v is None or isinstance(v, (int, float, str)) for v in row.values()):
        return None
    return row


def _add_points(points: Dict[str, Dict[int, float]], row: dict, step: int) -> None:
    for key, value in row.items():
        if key not in ("ep", "st") and isinstance(value, (int, float)) and not isinstance(value, bool):
            points.setdefault(key, {})[step] = float(value)


CURVES_DPI = 100  # --panel-size is in pixels; the text sizes below are points at this resolution


def _matplotlib():
    """matplotlib's Figure, Agg canvas and Line2D, imported only here: ``curves`` is the one subcommand that
    needs matplotlib. The object-oriented API (no pyplot) leaves the global backend and state alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise UserError("visualize.py curves needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg, Line2D


def curves_size(num_panels: int, cols: int, panel_w: int, panel_h: int, legend_lines: int = 1) -> Tuple[int, int]:
    """(width, height) of a curves figure: ``figure_size`` plus one extra band per legend line after the first."""
    rows = math.ceil(num_panels / cols)
    w, h = figure_size(rows, min(cols, num_panels), panel_w, panel_h)
    return w, h + (legend_lines - 1) * LABEL_H


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:max(chars - 3, 1)] + "..."


def _curve_keys(runs: Sequence[RunStats], keys: Optional[Sequence[str]]) -> List[str]:
    present = {k for r in runs for k in r.series}
    if keys is None:
        keys = [k for k in DEFAULT_KEYS if k in present]
    else:
        missing = [k for k in keys if k not in present]
        if missing:
            raise UserError(f"no run logged {', '.join(missing)}; logged keys: {', '.join(sorted(present))}")
    if not keys:
        raise UserError(f"none of {', '.join(DEFAULT_KEYS)} is in {', '.join(r.path for r in runs)}")
    return list(keys)


def _plot_series(ax, steps: List[int], values: List[float], colour: str, label: str, markers: bool) -> None:
    """One run's line; NaN and infinite values (a diverged loss) leave a gap. Validation series get a marker
    on every point, the others only on points with no finite neighbour (no line segment to show them)."""
    y = np.asarray(values, dtype=np.float64)
    y[~np.isfinite(y)] = np.nan
    finite = np.isfinite(y)
    alone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
    ax.plot(steps, y, color=colour, linewidth=1.5, label=label, marker="o", markersize=3,
            markevery=list(finite if markers else alone), clip_on=False)  # whole markers at the x limits


def curves_figure(runs: Sequence[RunStats], keys: Optional[Sequence[str]] = None, cols: int = 4,
                  panel_size: Tuple[int, int] = (240, 170)):
    """A matplotlib Figure: a grid of small line plots, one per metric, x = training step (the same range in
    every plot), one colour per run (matplotlib's C0, C1, ...).

    keys: the metrics to show (default: ``DEFAULT_KEYS`` that any run has, in that order; asked-for keys
    that no run has raise UserError). Each plot's left-aligned title is "key: description"; each line's
    label is its run's label. The legend (one column per plot column, "label (last step N)") and, for one
    run, its first command line fill the band at the top. Size at ``CURVES_DPI``:
    ``curves_size(len(keys), cols, *panel_size, legend lines)`` pixels, panels placed as ``_panel_xy``.
    """
    Figure, FigureCanvasAgg, Line2D = _matplotlib()
    if not runs:
        raise UserError("no stats file to plot")
    keys = _curve_keys(runs, keys)
    cols = max(1, min(cols, len(keys)))
    pw, ph = panel_size
    legend_lines = math.ceil(len(runs) / cols)
    width, height = curves_size(len(keys), cols, pw, ph, legend_lines)
    # +0.01: some matplotlib versions' Agg canvas truncates width * dpi to whole pixels (113 / 100 * 100 is
    # 112.99999...), which would make the picture a pixel smaller than curves_size
    fig = Figure(figsize=((width + 0.01) / CURVES_DPI, (height + 0.01) / CURVES_DPI), dpi=CURVES_DPI)
    FigureCanvasAgg(fig)
    steps = [s for r in runs for k in keys if k in r.series for s in r.series[k][0]]
    xlo, xhi = (min(steps), max(steps)) if steps else (0, 1)
    shift = (legend_lines - 1) * LABEL_H
    for n, key in enumerate(keys):
        x, y = _panel_xy(n // cols, n % cols, pw, ph)
        y += shift  # plot area: 46 px left for the y tick labels, 26 below for the x ticks and "step"
        ax = fig.add_axes([(x + 46) / width, 1 - (y + ph - 26) / height, (pw - 54) / width, (ph - 30) / height])
        ax.set_title(_shorten(f"{key}: {KEY_NAMES.get(key, key)}", pw // 6), loc="left", fontsize=8, pad=4,
                     x=-46 / (pw - 54))  # from the panel's left edge, as wide as the panel (~6 px a character)
        for r, run in enumerate(runs):
            if key in run.series:
                _plot_series(ax, *run.series[key], f"C{r}", run.label, key.endswith("_val"))
        if not any(np.isfinite(v) for r in runs if key in r.series for v in r.series[key][1]):
            ax.text(0.04, 0.94, "no finite values", transform=ax.transAxes, fontsize=7, color="0.5", va="top")
        ax.set_xlim(xlo, xhi if xhi > xlo else xlo + 1)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 10000 else f"{v:g}")
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.4g}")  # no offset text to collide with the title
        ax.tick_params(labelsize=7, length=3, pad=2)
        ax.set_xlabel("step", fontsize=7, color="0.5", labelpad=1)
        ax.grid(axis="y", color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
    suffixes = [f" (last step {max((s for v in run.series.values() for s in v[0]), default=0)})" for run in runs]
    legend = fig.legend([Line2D([], [], color=f"C{r}", linewidth=2.5) for r in range(len(runs))],
                        [_shorten(run.label, (pw - 31) // 6 - len(end)) + end for run, end in zip(runs, suffixes)],
                        loc="upper left", bbox_to_anchor=(PAD / width, 1 - 3 / height), ncol=cols, frameon=False,
                        fontsize=8, borderpad=0, borderaxespad=0, handlelength=1.5, labelspacing=0.6)
    if len(runs) == 1 and runs[0].commands:  # one run: room for how it was started
        right = legend.get_window_extent(fig.canvas.get_renderer()).x1 + 16
        fig.text(right / width, 1 - 5 / height, _shorten(runs[0].commands[0], int((width - PAD - right) / 5.5)),
                 fontsize=7, color="0.5", va="top")
    return fig


def render_curves(runs: Sequence[RunStats], keys: Optional[Sequence[str]] = None, cols: int = 4,
                  panel_size: Tuple[int, int] = (240, 170)) -> Image.Image:
    """``curves_figure`` drawn into an RGB image (at ``CURVES_DPI``)."""
    fig = curves_figure(runs, keys, cols, panel_size)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
