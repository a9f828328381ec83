"""Output: the Hive-partitioned result dataset and the run record.

Files are named `part-<run_id>-<write uuid>-<task index>.parquet` inside `task=<task>/`: deterministic per write
task, so a retried write task replaces its own file instead of adding a duplicate.
`_runs/<run_id>.json` (its content: jobs/run_record.py) is written last; its presence means the run finished.
"""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from ray.data.datasource import FilenameProvider

from pipeline.core.errors import OutputError

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
PROBE_PREFIX = "_phi4mm-probe-"  # hidden from readers ("_"), like _runs/


class RunFilenames(FilenameProvider):
    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Ray insists on the write's uuid in partitioned names; it is fixed for the whole write, so a
        # retried write task still produces (and replaces) the same file
        return f"part-{self.run_id}-{write_uuid}-{task_index:06d}.parquet"


def probe_output(uri: str, filesystem: pafs.FileSystem, path: str, run_id: str) -> None:
    """Create, write, read back and delete a marker file under the output, through the filesystem the
    write will use, so an unwritable output (no such bucket, no permission, a file in the way, a
    read-only disk) fails before any actor starts, as OutputError naming the path and the cause."""
    marker = f"{path.rstrip('/')}/{PROBE_PREFIX}{run_id}"
    step = "create the output folder"
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):  # object stores have no folders to create
            filesystem.create_dir(path, recursive=True)
        step = "write a file"
        with filesystem.open_output_stream(marker) as f:
            f.write(b"phi4mm output probe\n")
        step = "read a file back"
        with filesystem.open_input_stream(marker) as f:
            if f.read() != b"phi4mm output probe\n":
                raise OSError("the file read back differs from the one written")
        step = "delete a file"
        filesystem.delete_file(marker)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"output {uri}: cannot {step} there ({_first_line(exc)})") from exc


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


def write_results(ds, output: str, run_id: str, filesystem=None, uri: str | None = None) -> list[dict]:
    """Execute the graph into Parquet; returns where the time went, per stage (see `stage_times`).

    On object stores no directories are created (Ray and pyarrow would leave zero-byte `dir/` objects
    that s3fs-based readers trip over). A write that fails (the disk fills up, permissions change
    mid-run) raises OutputError naming the output and the cause."""
    local = filesystem is None or isinstance(filesystem, pafs.LocalFileSystem) or \
        (isinstance(filesystem, pafs.PyFileSystem) and isinstance(filesystem.handler, SlowWrites))
    try:
        ds.write_parquet(output, partition_cols=["task"], filename_provider=RunFilenames(run_id),
                         filesystem=filesystem, try_create_dir=local)
    except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised as it is
        cause = io_cause(exc)
        if cause is None:
            raise
        raise OutputError(f"output {uri or output}: writing the results failed ({_first_line(cause)})") from exc
    return stage_times(ds)


def io_cause(exc: BaseException) -> BaseException | None:
    """The deepest I/O error (OSError, pyarrow's I/O errors) in an exception's chain, through Ray's
    wrappers (`cause`, `__cause__`, `__context__`); None when there is none."""
    found, seen, todo = None, set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and not type(e).__module__.startswith("ray"):
            found = e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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
