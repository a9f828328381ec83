"""Output: the Hive-partitioned result dataset and the run record.

Files are named `part-<run_id>-<write uuid>-<task index>.parquet` inside `task=<task>/`: deterministic per write
task, so a retried write task replaces its own file instead of adding a duplicate.
`_runs/<run_id>.json` (its content: jobs/run_record.py) is written last; its presence means the run finished.
"""
from __future__ import annotations

import json

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


def write_run_record(output: str, record: dict, fs=None) -> str:
    import fsspec

    path = f"{output.rstrip('/')}/{RUNS_DIR}/{record['run_id']}.json"
    fs = fs or fsspec.core.url_to_fs(path)[0]
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return path
