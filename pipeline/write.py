"""Output: the Hive-partitioned result dataset and the run record.

Files are named `part-<run_id>-<write uuid>-<task index>.parquet` inside `task=<task>/`: deterministic per write
task, so a retried write task replaces its own file instead of adding a duplicate.
`_runs/<run_id>.json` is written last; its presence means the run finished.
"""
from __future__ import annotations

import json
from datetime import datetime

import pyarrow as pa
import pyarrow.dataset as pads
from ray.data.datasource import FilenameProvider

RUNS_DIR = "_runs"


class RunFilenames(FilenameProvider):
    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Ray insists on the write's uuid in partitioned names; it is fixed for the whole write, so a
        # retried write task still produces (and replaces) the same file
        return f"part-{self.run_id}-{write_uuid}-{task_index:06d}.parquet"


def write_results(ds, output: str, run_id: str, filesystem=None) -> list[dict]:
    """Execute the graph into Parquet; returns where the time went, per stage (see `stage_times`)."""
    ds.write_parquet(output, partition_cols=["task"], filename_provider=RunFilenames(run_id),
                     filesystem=filesystem)
    return stage_times(ds)


def stage_times(ds) -> list[dict]:
    """Per Ray Data operator: its span (`wall_s`, first start to last end), the time its tasks or
    actor calls ran (`busy_s`, summed over workers) and the rows it put out. busy_s / (workers x
    wall_s) is how busy a pool was: a GPU pool well under 1 was starved by the stages before it.
    Diagnostics only: an empty list if this Ray version reports differently."""
    try:
        summary = ds.get_stats_summary()
        ops = []

        def walk(node):
            for parent in node.parents:
                walk(parent)
            ops.extend(node.operators_stats)

        walk(summary)
        return [{"stage": op.operator_name,
                 "wall_s": round((op.latest_end_time or 0) - (op.earliest_start_time or 0), 3),
                 "busy_s": round(op.wall_time.sum, 3) if op.wall_time else None,
                 "calls": op.wall_time.count if op.wall_time else None,
                 "rows_out": op.output_num_rows.sum if op.output_num_rows else None}
                for op in ops]
    except Exception:  # noqa: BLE001 - never fail a finished run over its statistics
        return []


def read_results(output: str, filesystem=None, run_id: str | None = None) -> pa.Table:
    """The output dataset as one table (task back as a column); optionally one run's rows only."""
    dataset = pads.dataset(output, format="parquet", partitioning="hive", filesystem=filesystem,
                           exclude_invalid_files=True, ignore_prefixes=["_", "."])
    flt = pads.field("run_id") == run_id if run_id else None
    return dataset.to_table(filter=flt)


def run_record(config_json: dict, rows: pa.Table, started_at: datetime, finished_at: datetime,
               gpus: float) -> dict:
    """Counts, sizes, tokens, wall time, throughput and (with references) scores of one run, from the
    rows it wrote."""
    counts: dict[str, dict[str, int]] = {}
    for task, status in zip(rows["task"].to_pylist(), rows["status"].to_pylist()):
        counts.setdefault(task, {"ok": 0, "error": 0})[status] += 1
    table = rows.to_pandas() if rows.num_rows else None
    wall = (finished_at - started_at).total_seconds()
    audio_s = pages = input_tokens = output_tokens = 0.0
    if table is not None:
        asr = table[table["task"] == "asr"]
        audio_s = float(asr["duration_s"].fillna(0).sum())
        pages = int((table["task"] == "ocr").sum())
        input_tokens = int(table["input_tokens"].fillna(0).sum())
        output_tokens = int(table["output_tokens"].fillna(0).sum())
    scores = {}
    if table is not None:
        from jobs.scoring import score_all

        scores = score_all(table).summary  # only tasks whose rows carry reference texts
    return {
        "run_id": config_json["run_id"], "job": config_json["job"], "config": config_json,
        "started_at": started_at.isoformat(), "finished_at": finished_at.isoformat(), "wall_s": wall,
        "gpus": gpus, "rows": rows.num_rows, "counts": counts, "audio_s": audio_s,
        "audio_hours": audio_s / 3600, "pages": pages, "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "throughput": {"audio_s_per_s": audio_s / wall if wall else None,
                       "pages_per_s": pages / wall if wall else None,
                       "output_tokens_per_s": output_tokens / wall if wall else None},
        "scores": scores,
    }


def write_run_record(output: str, record: dict, fs=None) -> str:
    import fsspec

    path = f"{output.rstrip('/')}/{RUNS_DIR}/{record['run_id']}.json"
    fs = fs or fsspec.core.url_to_fs(path)[0]
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return path
