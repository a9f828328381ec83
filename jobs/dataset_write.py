"""The Ray Data write of a job's result rows: Hive-partitioned Parquet under the output `Location`.

Files are named `part-<run_id>-<write uuid>-<task index>.parquet` inside `task=<task>/`: deterministic per
write task, so a retried write task replaces its own file instead of adding a duplicate. On object
stores no directories are created (Ray and pyarrow would leave zero-byte `dir/` objects that s3fs-based
readers trip over).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.datasource import FilenameProvider

from pipeline.core.errors import OutputError
from pipeline.io.output import first_line, io_cause
from pipeline.io.storage import Location


class RunFilenames(FilenameProvider):
    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Ray insists on the write's uuid in partitioned names; it is fixed for the whole write, so a
        # retried write task still produces (and replaces) the same file
        return f"part-{self.run_id}-{write_uuid}-{task_index:06d}.parquet"


class _Slowly:
    """A binary file whose every write sleeps first (and lands on disk at once)."""

    def __init__(self, raw, delay_s: float):
        self.raw, self.delay_s, self.closed = raw, delay_s, False

    def write(self, data) -> int:
        import time

        time.sleep(self.delay_s)
        n = self.raw.write(data)
        self.raw.flush()
        return n

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()
        self.closed = True

    def writable(self) -> bool:
        return True


class SlowWrites(pafs.FSSpecHandler):
    """A local filesystem whose output streams write slowly: BenchmarkConfig.write_delay_s, for the
    test that kills a run while a result file is half written (tests/test_resume.py)."""

    def __init__(self, delay_s: float):
        import fsspec.implementations.local

        super().__init__(fsspec.implementations.local.LocalFileSystem())
        self.delay_s = delay_s

    def __reduce__(self):
        return SlowWrites, (self.delay_s,)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Slowly(self.fs.open(path, "wb"), self.delay_s), mode="w")


def slow_local_filesystem(delay_s: float) -> pafs.FileSystem:
    return pafs.PyFileSystem(SlowWrites(delay_s))


def write_results(ds, location: Location, run_id: str, write_delay_s: float = 0.0) -> list[dict]:
    """Execute the graph into Parquet; returns where the time went, per stage (see `stage_times`).

    On object stores no directories are created (Ray and pyarrow would leave zero-byte `dir/` objects
    that s3fs-based readers trip over). A write that fails (the disk fills up, permissions change
    mid-run) raises OutputError naming the output and the cause."""
    filesystem = location.fs
    local = isinstance(filesystem, pafs.LocalFileSystem)
    if write_delay_s and local:  # fault tests only (BenchmarkConfig.write_delay_s)
        filesystem = slow_local_filesystem(write_delay_s)
    try:
        ds.write_parquet(location.path, partition_cols=["task"], filename_provider=RunFilenames(run_id),
                         filesystem=filesystem, try_create_dir=local)
    except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised as it is
        cause = io_cause(exc)
        if cause is None:
            raise
        raise OutputError(f"output {location.uri}: writing the results failed ({first_line(cause)})") from exc
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
