"""`phi4mm report OUTPUT`: what a finished output dataset holds, how fast it was made, how good it is.

    python -m jobs.report OUTPUT [--html FILE] [--json FILE]

Reads the Hive-partitioned result dataset (`OUTPUT/task=<task>/*.parquet`) and the run records
(`OUTPUT/_runs/<run_id>.json`), and builds one JSON-friendly dict: rows per task and status, error
reasons grouped across inputs, GPU throughput per run, tokens, latency percentiles and quality scores
(`jobs.scoring`) where the manifest carried references. `write_html` renders it as one self-contained
page (inline CSS, plots as base64 PNGs) that can be mailed or attached to a ticket as is.

Reading goes through a pyarrow filesystem (local by default, `s3://` resolved by pyarrow, or the one
passed in), and only the columns a report needs: never `segments`, and `text`/`reference` only for rows
that carry a reference, so a report over millions of rows stays small in memory.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import sys
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from jobs import scoring
from schemas.results import KEY_COLUMNS, STATUS_OK, TASKS

RUNS_DIR = "_runs"
# Columns every report reads for every row (`text`, `reference*` only for rows that are scored).
LIGHT_COLUMNS = ["id", "task", "page", "status", "error", "language", "target_language", "duration_s",
                 "pages", "input_tokens", "output_tokens", "latency_s", "model", "run_id", "processed_at",
                 "uri"]
AUDIO_TASKS = ("asr", "translate", "summarize")
PERCENTILES = (50, 90, 95, 99)
WORST_N = 10
ERROR_GROUP_MAX_CHARS = 300


# ---------------------------------------------------------------------------------------------------
# Reading

def resolve_filesystem(output: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for OUTPUT: a given filesystem wins; else local or from the URI."""
    if filesystem is not None:
        return filesystem, re.sub(r"^[a-zA-Z][\w+.-]*://", "", output).rstrip("/")
    if "://" in output and not output.startswith("file://"):
        return pafs.FileSystem.from_uri(output)
    local = output[len("file://"):] if output.startswith("file://") else output
    return pafs.LocalFileSystem(), os.path.abspath(local)


def _dataset(fs: pafs.FileSystem, root: str) -> ds.Dataset | None:
    """The result dataset with one schema unified over all files (files may differ in extra columns).

    pyarrow takes the schema of the first file by default, which would drop a pass-through column
    present only in later runs, so every footer is read and the schemas are unified.
    """
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"output dataset not found: {root}")
    found = ds.dataset(root, format="parquet", partitioning="hive", filesystem=fs,
                       ignore_prefixes=["_", "."], exclude_invalid_files=True)
    schemas = [frag.physical_schema for frag in found.get_fragments()]
    if not schemas:
        return None
    part = found.partitioning.schema if found.partitioning is not None else pa.schema([])
    files = [pa.schema([f for f in s if f.name not in part.names], metadata=s.metadata) for s in schemas]
    schema = pa.unify_schemas([*files, part], promote_options="permissive")
    return ds.dataset(root, schema=schema, format="parquet", partitioning=found.partitioning,
                      filesystem=fs, ignore_prefixes=["_", "."], exclude_invalid_files=True)


def read_rows(dataset: ds.Dataset | None) -> pd.DataFrame:
    """Every row, light columns only (no text, no segments)."""
    if dataset is None:
        return pd.DataFrame(columns=LIGHT_COLUMNS)
    columns = [c for c in LIGHT_COLUMNS if c in dataset.schema.names]
    return dataset.to_table(columns=columns).to_pandas()


def read_scored_rows(dataset: ds.Dataset | None) -> pd.DataFrame:
    """Rows that carry a reference, with the columns scoring needs (text and references)."""
    if dataset is None:
        return pd.DataFrame()
    refs = [n for n in dataset.schema.names if n == "reference" or n.startswith("reference_")]
    if not refs:
        return pd.DataFrame()
    flt = None
    for name in refs:
        cond = ds.field(name).is_valid()
        flt = cond if flt is None else (flt | cond)
    wanted = ["id", "task", "page", "status", "text", "language", "target_language", *refs]
    return dataset.to_table(columns=[c for c in wanted if c in dataset.schema.names], filter=flt).to_pandas()


def read_runs(fs: pafs.FileSystem, root: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The run records under OUTPUT/_runs, and a warning per file that could not be read."""
    runs_dir = f"{root}/{RUNS_DIR}"
    if fs.get_file_info(runs_dir).type != pafs.FileType.Directory:
        return [], []
    runs, warnings = [], []
    for info in sorted(fs.get_file_info(pafs.FileSelector(runs_dir)), key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json") or info.base_name[0] in "._":
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                record = json.loads(f.read().decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            record.setdefault("run_id", info.base_name[: -len(".json")])
            runs.append(record)
        except (OSError, ValueError) as exc:
            warnings.append(f"{RUNS_DIR}/{info.base_name}: unreadable run record ({exc})")
    return runs, warnings


# ---------------------------------------------------------------------------------------------------
# Counts and errors

def status_counts(rows: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{task: {"ok": n, "error": n, "total": n}} (other statuses, if any, under their own names)."""
    out: dict[str, dict[str, int]] = {}
    if rows.empty:
        return out
    for (task, status), n in rows.groupby(["task", "status"], dropna=False).size().items():
        entry = out.setdefault(str(task), {"ok": 0, "error": 0, "total": 0})
        entry[str(status)] = entry.get(str(status), 0) + int(n)
        entry["total"] += int(n)
    return dict(sorted(out.items(), key=lambda kv: _task_order(kv[0])))


def _task_order(task: str) -> tuple[int, str]:
    """Contract tasks in contract order, then any others (qa, caption, ...) alphabetically."""
    return (TASKS.index(task) if task in TASKS else len(TASKS), task)


def _status_totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for entry in counts.values():
        totals.update({k: v for k, v in entry.items() if k != "total"})
    return {"ok": totals.get("ok", 0), "error": totals.get("error", 0), **totals, "total": sum(totals.values())}


_URI = re.compile(r"\b[a-zA-Z][\w+.-]*://[^\s'\"),;]*[^\s'\"),;:.]")
_PATH = re.compile(r"(?<![\w:/<>])/[^\s'\"),;]*[^\s'\"),;:.]")
_FILE = re.compile(r"\b[\w.-]+\.(?:wav|flac|mp3|ogg|opus|m4a|mp4|webm|aac|pdf|tiff?|png|jpe?g|webp|bmp|gif|"
                   r"json|jsonl|csv|parquet)\b", re.IGNORECASE)
_HEX = re.compile(r"\b(?=[0-9a-f-]*\d)[0-9a-f]{8,}(?:-[0-9a-f]{4,})*\b", re.IGNORECASE)
_DIMS = re.compile(r"\b\d+x\d+\b")
_NUMBER = re.compile(r"(?<![\w.<-])\d+(?:\.\d+)?(?!\w)")
_INPUT_RUN = re.compile(r"<input>(?:[/\\]?<input>)+")


def normalize_error(message: str | None, names: Iterable[str | None] = ()) -> str:
    """An error message with what names the input removed, so one cause groups across inputs.

    The row's own id and uri, URIs, paths and media file names become `<input>`; hashes become
    `<hex>`, numbers `<n>` (sizes, durations, page numbers), so "a.wav: cannot decode audio" and
    "b.wav: cannot decode audio" land in the same group.
    """
    if not message:
        return "(no message)"
    msg = str(message)
    for name in sorted({str(n) for n in names if n and len(str(n)) >= 2}, key=len, reverse=True):
        msg = re.sub(rf"(?<![\w]){re.escape(name)}(?![\w])", "<input>", msg)
    for pattern, repl in ((_URI, "<input>"), (_PATH, "<input>"), (_FILE, "<input>"), (_HEX, "<hex>"),
                          (_DIMS, "<n>x<n>"), (_NUMBER, "<n>")):
        msg = pattern.sub(repl, msg)
    msg = _INPUT_RUN.sub("<input>", re.sub(r"\s+", " ", msg).strip())
    return msg if len(msg) <= ERROR_GROUP_MAX_CHARS else msg[: ERROR_GROUP_MAX_CHARS - 1] + "…"


def _objects(df: pd.DataFrame, name: str) -> list[Any]:
    """A column as Python objects with None for missing; all None when the dataset lacks it."""
    if name not in df.columns:
        return [None] * len(df)
    return df[name].astype(object).where(df[name].notna(), None).to_list()


def error_groups(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Non-ok rows grouped by normalised reason, most frequent first, with one example input each."""
    if rows.empty:
        return []
    bad = rows[rows["status"].astype(str) != STATUS_OK]
    groups: dict[str, dict[str, Any]] = {}
    for id_, task, error, uri in zip(*(_objects(bad, c) for c in ("id", "task", "error", "uri"))):
        error = None if error is None else str(error)
        reason = normalize_error(error, [id_, uri])
        group = groups.setdefault(reason, {"reason": reason, "count": 0, "tasks": Counter(),
                                           "example_id": str(id_), "example_error": error})
        group["count"] += 1
        group["tasks"][str(task)] += 1
    out = sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))
    for g in out:
        g["tasks"] = dict(g["tasks"].most_common())
    return out


# ---------------------------------------------------------------------------------------------------
# Runs and throughput

def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _run_sizes_from_rows(rows: pd.DataFrame, run_id: str) -> tuple[float | None, float | None]:
    """(audio seconds, pages) a run wrote, for run records that lack them: each input counted once."""
    if rows.empty or "run_id" not in rows.columns:
        return None, None
    mine = rows[rows["run_id"] == run_id]
    if mine.empty:
        return None, None
    audio = mine[mine["task"].isin(AUDIO_TASKS)]
    audio_s = float(audio.groupby("id")["duration_s"].max().sum()) if "duration_s" in audio.columns and len(audio) else None
    ocr = mine[mine["task"] == "ocr"]
    pages = float(len(ocr.drop_duplicates(["id", "page"]))) if len(ocr) else None
    return audio_s, pages


def run_summary(record: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    """One run's sizes, GPU hours (wall_s * gpus) and throughput per GPU hour; any key may be missing."""
    started, finished = _parse_time(record.get("started_at")), _parse_time(record.get("finished_at"))
    wall = _number(record.get("wall_s"))
    if wall is None and started and finished:
        wall = (finished - started).total_seconds()
    gpus = _number(record.get("gpus"))
    audio_s, pages = _number(record.get("audio_s")), _number(record.get("pages"))
    sizes_from = "run record"
    if audio_s is None and pages is None:
        audio_s, pages = _run_sizes_from_rows(rows, str(record.get("run_id")))
        sizes_from = "dataset"
    gpu_hours = wall * gpus / 3600 if wall is not None and gpus is not None else None
    audio_h = audio_s / 3600 if audio_s is not None else None
    return {
        "run_id": str(record.get("run_id")), "job": record.get("job"),
        "started_at": started.isoformat() if started else None,
        "finished_at": finished.isoformat() if finished else None,
        "wall_s": wall, "gpus": gpus, "gpu_hours": gpu_hours,
        "audio_hours": audio_h, "pages": pages, "sizes_from": sizes_from,
        "input_tokens": _number(record.get("input_tokens")), "output_tokens": _number(record.get("output_tokens")),
        "counts": record.get("counts") if isinstance(record.get("counts"), dict) else None,
        "audio_hours_per_gpu_hour": _ratio(audio_h, gpu_hours) if audio_h else None,
        "pages_per_gpu_hour": _ratio(pages, gpu_hours) if pages else None,
        "audio_s_per_s": _ratio(audio_s, wall) if audio_s else None,
        "pages_per_s": _ratio(pages, wall) if pages else None,
    }


def throughput_totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over runs. Each rate divides by the GPU hours of the runs that processed that modality,
    so an OCR run does not dilute the audio rate."""
    audio_runs = [r for r in runs if r["audio_hours"] and r["gpu_hours"]]
    page_runs = [r for r in runs if r["pages"] and r["gpu_hours"]]
    audio_h = sum(r["audio_hours"] or 0 for r in runs)
    pages = sum(r["pages"] or 0 for r in runs)
    return {
        "runs": len(runs),
        "gpu_hours": sum(r["gpu_hours"] or 0 for r in runs),
        "wall_s": sum(r["wall_s"] or 0 for r in runs),
        "audio_hours": audio_h, "pages": pages,
        "audio_hours_per_gpu_hour": _ratio(sum(r["audio_hours"] for r in audio_runs),
                                           sum(r["gpu_hours"] for r in audio_runs)),
        "pages_per_gpu_hour": _ratio(sum(r["pages"] for r in page_runs), sum(r["gpu_hours"] for r in page_runs)),
        "input_tokens": sum(r["input_tokens"] or 0 for r in runs),
        "output_tokens": sum(r["output_tokens"] or 0 for r in runs),
    }


# ---------------------------------------------------------------------------------------------------
# Tokens and latency

def token_counts(rows: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Input/output tokens per task and in total, from the rows (what the runs actually cost)."""
    out: dict[str, dict[str, int]] = {}
    cols = [c for c in ("input_tokens", "output_tokens") if c in rows.columns]
    if rows.empty or not cols:
        return out
    for task, group in sorted(rows.groupby("task"), key=lambda kv: _task_order(str(kv[0]))):
        out[str(task)] = {c.split("_")[0]: int(group[c].fillna(0).sum()) for c in cols}
    out["total"] = {c.split("_")[0]: int(rows[c].fillna(0).sum()) for c in cols}
    return out


def _latency_stats(values: np.ndarray) -> dict[str, Any]:
    stats: dict[str, Any] = {"n": int(values.size), "mean": float(values.mean()), "max": float(values.max())}
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        stats[f"p{p}"] = float(v)
    return stats


def latency(rows: pd.DataFrame) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Latency percentiles per task and overall, and a shared-bin histogram per task for the plot."""
    if rows.empty or "latency_s" not in rows.columns:
        return {}, {}
    timed = rows[rows["latency_s"].notna()]
    if timed.empty:
        return {}, {}
    groups = sorted(timed.groupby("task"), key=lambda kv: _task_order(str(kv[0])))
    stats = {str(t): _latency_stats(g["latency_s"].to_numpy(float)) for t, g in groups}
    stats["all"] = _latency_stats(timed["latency_s"].to_numpy(float))
    top = float(timed["latency_s"].max()) or 1.0
    edges = np.linspace(0.0, top, 31)
    hist = {"edges": edges.tolist(),
            "counts": {str(t): np.histogram(g["latency_s"].to_numpy(float), bins=edges)[0].tolist() for t, g in groups}}
    return stats, hist


# ---------------------------------------------------------------------------------------------------
# The report

def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf as None, timestamps as ISO strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if value is pd.NaT or value is pd.NA:
        return None
    return value


def build_report(output: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Everything the report shows, as a JSON-friendly dict (see the module docstring)."""
    fs, root = resolve_filesystem(output, filesystem)
    dataset = _dataset(fs, root)
    rows = read_rows(dataset)
    records, warnings = read_runs(fs, root)
    runs = sorted((run_summary(r, rows) for r in records),  # runs without a time last
                  key=lambda r: (not (r["started_at"] or r["finished_at"]), r["started_at"] or r["finished_at"] or "",
                                 r["run_id"]))
    scores = scoring.score_all(read_scored_rows(dataset))
    counts = status_counts(rows)
    key = [c for c in KEY_COLUMNS if c in rows.columns]
    latency_stats, latency_hist = latency(rows)
    report = {
        "output": output,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": int(len(rows)),
        "status_totals": _status_totals(counts),
        "counts": counts,
        "duplicate_keys": int(rows.duplicated(key).sum()) if len(rows) and key else 0,
        "errors": error_groups(rows),
        "runs": runs,
        "throughput": throughput_totals(runs),
        "tokens": token_counts(rows),
        "latency": latency_stats,
        "latency_histogram": latency_hist,
        "scores": scores.summary,
        "worst": scoring.worst_rows(scores.rows, WORST_N) if len(scores.rows) else {},
        "warnings": warnings,
    }
    return _jsonable(report)


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib Agg, no pyplot: no global state, safe in any process)

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
    for i, (task, counts) in enumerate(sorted(hist["counts"].items(), key=lambda kv: _task_order(kv[0]))):
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
    points = [(_parse_time(r["finished_at"] or r["started_at"]), r) for r in runs]
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


# ---------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212121;background:#fafafa;margin:0}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#616161;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 14px;min-width:112px}
.card b{display:block;font-size:20px}.card span{color:#616161;font-size:12px}
.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px;align-items:start}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0 8px}
th,td{border:1px solid #e0e0e0;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f1f1f1}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.t{max-width:360px;word-break:break-word}
.err{color:#c62828}.ok{color:#2e7d32}.warn{background:#fff3e0;border:1px solid #ffb74d;padding:8px 12px;border-radius:4px;margin:12px 0}
img{max-width:100%;background:#fff;border:1px solid #e0e0e0;border-radius:4px}.muted{color:#757575}
code{font-size:12px}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer() or digits:
        return f"{value:,.{digits}f}"
    return f"{int(value):,}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _cut(text: Any, limit: int = 160) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(headers: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """A table; each cell is (html, css class) so numbers align right and long text wraps."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for v, c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(b64: str | None, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{_esc(alt)}">' if b64 else ""


def _cards(report: dict[str, Any]) -> str:
    totals, tp = report["status_totals"], report["throughput"]
    err_rate = totals["error"] / totals["total"] if totals.get("total") else None
    cards = [("rows", _num(report["rows"])), ("ok", _num(totals["ok"])),
             ("errors", f'{_num(totals["error"])} ({_pct(err_rate)})'), ("runs", _num(tp["runs"])),
             ("GPU hours", _num(tp["gpu_hours"], 2)), ("audio h / GPU h", _num(tp["audio_hours_per_gpu_hour"], 1)),
             ("pages / GPU h", _num(tp["pages_per_gpu_hour"], 0))]
    return '<section class="cards">' + "".join(
        f"<div class=card><b>{v}</b><span>{_esc(k)}</span></div>" for k, v in cards) + "</section>"


def _counts_html(report: dict[str, Any]) -> str:
    rows = [[(_esc(t), ""), (_num(c.get("ok", 0)), "n ok"), (_num(c.get("error", 0)), "n err"),
             (_num(c["total"]), "n"), (_pct(c.get("error", 0) / c["total"] if c["total"] else None), "n")]
            for t, c in report["counts"].items()]
    table = _table(["task", "ok", "error", "total", "error rate"], rows) if rows else "<p class=muted>No rows.</p>"
    return f"<h2>Rows per task</h2><div class=grid><div>{table}</div><div>{_img(plot_status(report['counts']), 'rows per task and status')}</div></div>"


def _errors_html(report: dict[str, Any]) -> str:
    if not report["errors"]:
        return "<h2>Errors</h2><p class=muted>No error rows.</p>"
    rows = [[(_esc(g["reason"]), "t"), (_num(g["count"]), "n"),
             (_esc(", ".join(f"{t} {n}" for t, n in g["tasks"].items())), ""),
             (f"<code>{_esc(g['example_id'])}</code>", ""), (_esc(_cut(g["example_error"], 200)), "t muted")]
            for g in report["errors"]]
    return "<h2>Errors</h2>" + _table(["reason (input names removed)", "rows", "tasks", "example input", "example message"], rows)


def _throughput_html(report: dict[str, Any]) -> str:
    runs = report["runs"]
    if not runs:
        return "<h2>Throughput</h2><p class=muted>No run records under <code>_runs/</code>.</p>"
    rows = [[(f"<code>{_esc(r['run_id'])}</code>", ""), (_esc(r["job"] or "—"), ""), (_esc(r["finished_at"] or "—"), ""),
             (_num(r["wall_s"], 1), "n"), (_num(r["gpus"]), "n"), (_num(r["gpu_hours"], 3), "n"),
             (_num(r["audio_hours"], 2), "n"), (_num(r["pages"]), "n"),
             (_num(r["audio_hours_per_gpu_hour"], 1), "n"), (_num(r["pages_per_gpu_hour"], 0), "n")]
            for r in runs]
    tp = report["throughput"]
    rows.append([("<b>total</b>", ""), ("", ""), ("", ""), (_num(tp["wall_s"], 1), "n"), ("", ""),
                 (_num(tp["gpu_hours"], 3), "n"), (_num(tp["audio_hours"], 2), "n"), (_num(tp["pages"]), "n"),
                 (_num(tp["audio_hours_per_gpu_hour"], 1), "n"), (_num(tp["pages_per_gpu_hour"], 0), "n")])
    table = _table(["run", "job", "finished", "wall s", "GPUs", "GPU h", "audio h", "pages",
                    "audio h / GPU h", "pages / GPU h"], rows)
    note = ("<p class=muted>GPU hours = wall time × GPUs. Each total rate divides by the GPU hours of the runs "
            "that processed that modality.</p>")
    return f"<h2>Throughput</h2>{table}{note}{_img(plot_throughput(runs), 'throughput per run')}"


def _cost_html(report: dict[str, Any]) -> str:
    tok = report["tokens"]
    tok_rows = [[(_esc(t), ""), (_num(v.get("input")), "n"), (_num(v.get("output")), "n")] for t, v in tok.items()]
    lat_rows = [[(_esc(t), ""), (_num(s["n"]), "n"), (_num(s["mean"], 2), "n")]
                + [(_num(s[f"p{p}"], 2), "n") for p in PERCENTILES] + [(_num(s["max"], 2), "n")]
                for t, s in report["latency"].items()]
    tables = (("<h3>Tokens</h3>" + _table(["task", "input", "output"], tok_rows) if tok_rows else "")
              + ("<h3>Latency per row (s)</h3>" + _table(["task", "rows", "mean", *[f"p{p}" for p in PERCENTILES], "max"],
                                                         lat_rows) if lat_rows else ""))
    if not tables:
        return ""
    return f"<h2>Tokens and latency</h2><div class=grid><div>{tables}</div><div>{_img(plot_latency(report['latency_histogram']), 'latency histogram')}</div></div>"


_SCORE_METRICS = {"asr": [("wer", "WER", _pct), ("cer", "CER", _pct)],
                  "ocr": [("cer", "CER", _pct), ("wer", "WER", _pct)],
                  "translate": [("bleu", "BLEU", lambda v: _num(v, 1)), ("chrf", "chrF", lambda v: _num(v, 1))],
                  "summarize": [("rouge1", "ROUGE-1", lambda v: _num(v, 3)), ("rouge2", "ROUGE-2", lambda v: _num(v, 3)),
                                ("rougeL", "ROUGE-L", lambda v: _num(v, 3))]}


def _scores_html(report: dict[str, Any]) -> str:
    scores = report["scores"]
    if not scores:
        return "<h2>Scores</h2><p class=muted>No rows carry a reference, so nothing was scored.</p>"
    parts = ["<h2>Scores</h2>"]
    for task, s in scores.items():
        metrics = _SCORE_METRICS.get(task, [])
        groups = [("overall", s["overall"])] + [(f"language {k}", v) for k, v in s.get("by_language", {}).items()]
        groups += [(f"target {k}", v) for k, v in s.get("by_target_language", {}).items()]
        rows = [[(_esc(name), ""), (_num(g.get("n")), "n")] + [(fmt(g.get(key)), "n") for key, _, fmt in metrics]
                for name, g in groups]
        skipped = {k: v for k, v in s.items() if k.startswith("skipped_") and v}
        note = (f"{_num(s['with_reference'])} rows with a reference; {_num(s['errors'])} of them errors (not scored)"
                + "".join(f"; {_num(v)} {k.replace('_', ' ')}" for k, v in skipped.items()))
        parts.append(f"<h3>{_esc(task)}</h3>" + _table(["group", "n", *[m[1] for m in metrics]], rows)
                     + f"<p class=muted>{_esc(note)}</p>")
    parts.append(_img(plot_error_rates(scores), "ASR error rate per language"))
    parts.append("<p class=muted>WER/CER on lowercased text without punctuation; BLEU/chrF: sacrebleu corpus "
                 "scores; ROUGE: mean F1.</p>")
    return "".join(parts)


def _worst_html(report: dict[str, Any]) -> str:
    if not report["worst"]:
        return ""
    parts = [f"<h2>Worst rows (up to {WORST_N} per task)</h2>"]
    for task, rows in report["worst"].items():
        metric = scoring.RANK_METRIC[task][0]
        fmt = next((f for key, _, f in _SCORE_METRICS[task] if key == metric), lambda v: _num(v, 3))
        cells = [[(f"<code>{_esc(r['id'])}</code>", ""), (_esc("all" if r.get("page") is None else r["page"]), "n"),
                  (_esc(r.get("target_language") or r.get("language") or ""), ""), (fmt(r["score"]), "n"),
                  (_esc(_cut(r["text"])), "t"), (_esc(_cut(r["reference"])), "t muted")] for r in rows]
        parts.append(f"<h3>{_esc(task)} by {_esc(metric)}</h3>"
                     + _table(["id", "page", "lang", metric, "text", "reference"], cells))
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, plots as data: URIs)."""
    notes = list(report.get("warnings") or [])
    if report.get("duplicate_keys"):
        notes.insert(0, f"{report['duplicate_keys']} rows repeat an (id, task, target_language, page) key")
    warn = "".join(f'<div class="warn">{_esc(n)}</div>' for n in notes)
    body = "".join([_cards(report), warn, _counts_html(report), _errors_html(report), _throughput_html(report),
                    _cost_html(report), _scores_html(report), _worst_html(report)])
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>phi4mm report: {_esc(report['output'])}</title><style>{CSS}</style></head><body><main>"
            f"<h1>phi4mm-batch report</h1><p class=meta><code>{_esc(report['output'])}</code> · generated "
            f"{_esc(report['generated_at'])}</p>{body}</main></body></html>")


def write_html(report: dict[str, Any], path: str) -> None:
    """Write `render_html(report)` to a local file (parent folders created)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))


# ---------------------------------------------------------------------------------------------------
# Command line

def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, top errors, throughput, headline scores."""
    lines = [f"{report['output']}: {report['rows']:,} rows, {report['throughput']['runs']} runs"]
    lines += [f"  {task:<10} ok {c.get('ok', 0):>8,}  error {c.get('error', 0):>6,}  total {c['total']:>8,}"
              for task, c in report["counts"].items()]
    if report.get("duplicate_keys"):
        lines.append(f"  WARNING: {report['duplicate_keys']} duplicate keys")
    for g in report["errors"][:5]:
        lines.append(f"  error x{g['count']}: {_cut(g['reason'], 100)} (e.g. {g['example_id']})")
    tp = report["throughput"]
    if tp["runs"]:
        lines.append(f"  throughput: {_num(tp['audio_hours_per_gpu_hour'], 1)} audio h/GPU h, "
                     f"{_num(tp['pages_per_gpu_hour'], 0)} pages/GPU h over {_num(tp['gpu_hours'], 2)} GPU h")
    s = report["scores"]
    heads = []
    if "asr" in s:
        heads.append(f"asr WER {_pct(s['asr']['overall']['wer'])} CER {_pct(s['asr']['overall']['cer'])}")
    if "translate" in s:
        heads.append(f"translate BLEU {_num(s['translate']['overall']['bleu'], 1)} chrF {_num(s['translate']['overall']['chrf'], 1)}")
    if "ocr" in s:
        heads.append(f"ocr CER {_pct(s['ocr']['overall']['cer'])}")
    if "summarize" in s:
        heads.append(f"summarize ROUGE-L {_num(s['summarize']['overall']['rougeL'], 3)}")
    if heads:
        lines.append("  scores: " + "; ".join(heads))
    lines += [f"  warning: {w}" for w in report.get("warnings") or []]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.report OUTPUT [--html FILE] [--json FILE]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="phi4mm report", description="Counts, throughput, errors and scores "
                                     "of an output dataset, as text, HTML and JSON.")
    parser.add_argument("output", help="the output dataset (local path or s3://...)")
    parser.add_argument("--html", metavar="FILE", help="write a self-contained HTML page here")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON here")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (MinIO, Ceph, R2)")
    args = parser.parse_args(argv)
    filesystem = None
    if args.output.startswith("s3://"):  # the same settings as the jobs: endpoint, region, profile
        from pipeline.storage import StorageOptions, pyarrow_filesystem

        filesystem = pyarrow_filesystem(args.output, StorageOptions(endpoint_url=args.s3_endpoint))[0]
    try:
        report = build_report(args.output, filesystem)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    if args.html:
        write_html(report, args.html)
        print(f"wrote {args.html}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, allow_nan=False)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
