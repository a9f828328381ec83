"""Output, outside Ray: the probe before a run, reading the result dataset back, the run record.

The dataset itself is written by Ray Data (jobs/dataset_write.py): `OUTPUT/task=<task>/part-<run_id>-...
.parquet`. `_runs/<run_id>.json` (its content: jobs/run_record.py) is written last; its presence means
the run finished. Every function takes the output's `Location` (pipeline/io/storage.py), resolved once.
"""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.core.errors import OutputError
from pipeline.io.storage import Location

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
PROBE_PREFIX = "_phi4mm-probe-"  # hidden from readers ("_"), like _runs/


def probe_output(location: Location, run_id: str) -> None:
    """Create, write, read back and delete a marker file under the output, through the filesystem the
    write will use, so an unwritable output (no such bucket, no permission, a file in the way, a
    read-only disk) fails before any actor starts, as OutputError naming the path and the cause."""
    uri, filesystem, path = location.uri, location.fs, location.path
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
        raise OutputError(f"output {uri}: cannot {step} there ({first_line(exc)})") from exc


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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_results(output: str, filesystem=None, run_id: str | None = None) -> pa.Table:
    """The output dataset as one table (task back as a column); optionally one run's rows only."""
    dataset = pads.dataset(output, format="parquet", partitioning="hive", filesystem=filesystem,
                           exclude_invalid_files=True, ignore_prefixes=["_", "."])
    flt = pads.field("run_id") == run_id if run_id else None
    return dataset.to_table(filter=flt)


def write_run_record(location: Location, record: dict) -> str:
    fs = location.fsspec_fs
    path = f"{location.fsspec_path.rstrip('/')}/{RUNS_DIR}/{record['run_id']}.json"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return path
