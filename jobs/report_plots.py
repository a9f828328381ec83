"""The report's plots: matplotlib figures of a report dict's parts, each as a base64 PNG (None: nothing to plot).

matplotlib's Agg canvas, no pyplot: no global state, safe in any process. matplotlib itself is imported
on the first figure, so the report's text and JSON never pay for it.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from jobs.report_data import parse_time, task_order

OK_COLOUR, ERROR_COLOUR, OTHER_COLOUR = "#2e7d32", "#c62828", "#9e9e9e"
TASK_COLOURS = ["#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#827717", "#4e342e"]


def _figure(width: float = 6.4, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finish(fig, ax) -> str:
    """The plots' common frame (legend without a box, no top/right spines), as an embeddable PNG."""
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png_base64(fig)


def plot_status(counts: dict[str, dict[str, int]]) -> str | None:
    """Stacked bars: ok / error / other rows per task."""
    if not counts:
        return None
    tasks = list(counts)
    ok = np.array([counts[t].get("ok", 0) for t in tasks])
    err = np.array([counts[t].get("error", 0) for t in tasks])
    other = np.array([counts[t]["total"] for t in tasks]) - ok - err
    fig = _figure()
    ax = fig.subplots()
    ax.bar(tasks, ok, color=OK_COLOUR, label="ok")
    ax.bar(tasks, err, bottom=ok, color=ERROR_COLOUR, label="error")
    if other.any():
        ax.bar(tasks, other, bottom=ok + err, color=OTHER_COLOUR, label="other")
    ax.set_ylabel("rows")
    ax.set_title("Rows per task and status")
    return _finish(fig, ax)


def plot_latency(hist: dict[str, Any]) -> str | None:
    """Latency histogram, tasks stacked on shared bins."""
    if not hist or not hist.get("counts"):
        return None
    edges = np.asarray(hist["edges"], dtype=float)
    widths, lefts = np.diff(edges), edges[:-1]
    bottom = np.zeros(len(lefts))
    fig = _figure()
    ax = fig.subplots()
    for i, (task, counts) in enumerate(sorted(hist["counts"].items(), key=lambda kv: task_order(kv[0]))):
        counts = np.asarray(counts, dtype=float)
        ax.bar(lefts, counts, width=widths, bottom=bottom, align="edge", label=task,
               color=TASK_COLOURS[i % len(TASK_COLOURS)], edgecolor="white", linewidth=0.5)
        bottom += counts
    ax.set_xlabel("latency per row (s)")
    ax.set_ylabel("rows")
    ax.set_title("Latency")
    return _finish(fig, ax)


def plot_error_rates(scores: dict[str, Any]) -> str | None:
    """WER and CER per language of the asr rows (grouped bars, percent)."""
    by_lang = (scores.get("asr") or {}).get("by_language") or {}
    langs = [lang for lang, s in by_lang.items() if s.get("wer") is not None]
    if not langs:
        return None
    x = np.arange(len(langs))
    fig = _figure()
    ax = fig.subplots()
    for offset, metric, colour in ((-0.2, "wer", "#1565c0"), (0.2, "cer", "#90caf9")):
        values = [100 * (by_lang[lang].get(metric) or 0) for lang in langs]
        bars = ax.bar(x + offset, values, width=0.4, label=metric.upper(), color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, [f"{lang}\n(n={by_lang[lang].get('n', 0)})" for lang in langs])
    ax.set_ylabel("%")
    ax.set_title("ASR word / character error rate per language")
    return _finish(fig, ax)


def plot_throughput(runs: list[dict[str, Any]]) -> str | None:
    """Audio hours and pages per GPU hour of each run over time (only with two runs or more)."""
    points = [(parse_time(r["finished_at"] or r["started_at"]), r) for r in runs]
    points = [(t, r) for t, r in points if t is not None]
    series = [("audio_hours_per_gpu_hour", "audio h / GPU h", "#1565c0"),
              ("pages_per_gpu_hour", "pages / GPU h", "#ef6c00")]
    series = [s for s in series if sum(r[s[0]] is not None for _, r in points) >= 1]
    if len(points) < 2 or not series:
        return None
    fig = _figure()
    ax = fig.subplots()
    axes = [ax, ax.twinx()] if len(series) == 2 else [ax]
    for axis, (key, label, colour) in zip(axes, series):
        pts = [(t, r[key]) for t, r in points if r[key] is not None]
        axis.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour, label=label)
        axis.set_ylabel(label, color=colour)
        axis.set_ylim(bottom=0)
    ax.set_title("Throughput per run")
    fig.autofmt_xdate()
    return _png_base64(fig)
