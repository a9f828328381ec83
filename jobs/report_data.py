"""The report's data: the output dataset and its run records read, and the report dict built from them.

Reads the Hive-partitioned result dataset (`OUTPUT/task=<task>/*.parquet`) and the run records
(`OUTPUT/_runs/<run_id>.json`), and builds one JSON-friendly dict (`build_report`): rows per task and
status, error reasons grouped across inputs, GPU throughput per run, tokens, latency percentiles and
quality scores (`jobs.scoring`) where the manifest carried references.

Reading goes through the pyarrow filesystem the jobs use (`pipeline.io.storage.pyarrow_filesystem`, or the
one passed in), and only the columns a report needs: never `segments`, and `text`/`reference` only for
rows that carry a reference, so a report over millions of rows stays small in memory.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from jobs import scoring
from pipeline.io.storage import StorageOptions, pyarrow_filesystem
from schemas.results import KEY_COLUMNS, STATUS_OK
from schemas.tasks import AUDIO_TASKS, TASKS

RUNS_DIR = "_runs"
TABLE_SCHEME = "iceberg://"  # `phi4mm report iceberg://CATALOG/NAMESPACE.TABLE`: the table, not a folder
# Columns every report reads for every row (`text`, `reference*` only for rows that are scored).
LIGHT_COLUMNS = ["id", "task", "page", "status", "error", "language", "target_language", "duration_s",
                 "pages", "input_tokens", "output_tokens", "latency_s", "model", "run_id", "processed_at",
                 "uri"]
PERCENTILES = (50, 90, 95, 99)
WORST_N = 10
ERROR_GROUP_MAX_CHARS = 300


# ---------------------------------------------------------------------------------------------------
# Reading

def resolve_filesystem(output: str, filesystem: pafs.FileSystem | None = None,
                       options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for OUTPUT: a given filesystem wins; else the one the jobs write
    through (`pipeline.io.storage.pyarrow_filesystem`, with the same `StorageOptions`: endpoint, region,
    profile, retries)."""
    if filesystem is not None:
        return filesystem, re.sub(r"^[a-zA-Z][\w+.-]*://", "", output).rstrip("/")
    fs, path = pyarrow_filesystem(output, options)
    return fs, path.rstrip("/") or path


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


def _from_table(uri: str, options: StorageOptions | None) -> tuple[ds.Dataset | None, list[dict], list[str]]:
    """An Iceberg table (`--table`) as the report reads it: the rows of its current snapshot (the
    columns a report uses: never `segments`), and the run records of the outputs its snapshots name."""
    from pipeline.io.lakehouse import SUMMARY_OUTPUT, load_table

    table = load_table(uri, options)
    records: list[dict] = []
    warnings: list[str] = []
    outputs = sorted({s.summary[SUMMARY_OUTPUT] for s in table.snapshots() if s.summary and
                      s.summary.get(SUMMARY_OUTPUT)})
    for output in outputs:
        try:
            found, problems = read_runs(*resolve_filesystem(output, None, options))
        except OSError as exc:
            found, problems = [], [f"{output}: run records unreadable ({exc})"]
        records += found
        warnings += problems
    if table.current_snapshot() is None:
        return None, records, warnings
    names = table.schema().column_names
    wanted = [n for n in names if n in LIGHT_COLUMNS or n == "text" or n == "reference" or n.startswith("reference_")]
    return ds.dataset(table.scan(selected_fields=tuple(wanted)).to_arrow()), records, warnings


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
    return dict(sorted(out.items(), key=lambda kv: task_order(kv[0])))


def task_order(task: str) -> tuple[int, str]:
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

def parse_time(value: Any) -> datetime | None:
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
    if "status" in ocr.columns:  # pages read, as the run record counts them: error rows are not pages
        ocr = ocr[ocr["status"] == "ok"]
    pages = float(len(ocr.drop_duplicates(["id", "page"]))) if len(ocr) else None
    return audio_s, pages


def run_summary(record: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    """One run's sizes, GPU hours (wall_s * gpus) and throughput per GPU hour; any key may be missing."""
    started, finished = parse_time(record.get("started_at")), parse_time(record.get("finished_at"))
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
    for task, group in sorted(rows.groupby("task"), key=lambda kv: task_order(str(kv[0]))):
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
    groups = sorted(timed.groupby("task"), key=lambda kv: task_order(str(kv[0])))
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


def build_report(output: str, filesystem: pafs.FileSystem | None = None,
                 options: StorageOptions | None = None) -> dict[str, Any]:
    """Everything the report shows, as a JSON-friendly dict (see the module docstring).

    `filesystem`: read through this one (OUTPUT's path taken without its scheme); else OUTPUT is
    resolved with `options` as the jobs resolve it (`resolve_filesystem`).
    """
    if output.lower().startswith(TABLE_SCHEME):
        dataset, records, warnings = _from_table(output, options)
    else:
        fs, root = resolve_filesystem(output, filesystem, options)
        dataset = _dataset(fs, root)
        records, warnings = read_runs(fs, root)
    rows = read_rows(dataset)
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
