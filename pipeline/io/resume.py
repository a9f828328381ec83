"""Resume: rerun into the same output, redo only what is missing or failed, leave every key once.

Before the run, `rows_to_redo` keeps the manifest rows that lack an `ok` row for some task of this job
(and removes files that a killed run left half-written). After the run, `drop_superseded` removes the
older rows whose key this run wrote again (retried errors, or tasks redone with their input), so the
dataset holds each (id, task, target_language, page) once.

An older file that loses rows is never changed in place: its kept rows go to a new file beside it,
`<name>.rewritten-by-<run_id>.parquet` (written whole under a hidden name, then moved), and the old file
is removed after that. An Iceberg table that lists the old file (pipeline/io/lakehouse.py) can so swap
the two in one commit while its readers still find the old file; until then (`keep_replaced=True`)
both lie in the folder, and everything here reads only the live files (`live_files`: a replaced file is
skipped), so a crash between the two steps changes no answer. `remove_replaced` ends the swap.
"""
from __future__ import annotations

import logging
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.storage import Location
from schemas.config import JobConfig
from schemas.results import KEY_COLUMNS as KEY, STATUS_OK
from schemas.tasks import output_keys

log = logging.getLogger(__name__)


REWRITTEN_BY = ".rewritten-by-"
PARQUET = ".parquet"


def _files(output: str, fs) -> list[str]:
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = fs.get_file_info(FileSelector(output, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.path for i in infos if i.type == FileType.File and i.path.endswith(PARQUET)
                  and "/_" not in i.path[len(output):] and "/." not in i.path[len(output):])


def replacement_path(path: str, run_id: str) -> str:
    """Where run `run_id` puts the rows it keeps of the older file `path`."""
    return f"{path[:-len(PARQUET)]}{REWRITTEN_BY}{run_id}{PARQUET}"


def replaced_files(files: list[str]) -> set[str]:
    """The files among `files` that a replacement beside them supersedes (every `.rewritten-by-` in a
    name is tried, so a run id that itself contains the marker is no trouble)."""
    present = set(files)
    replaced = set()
    for path in files:
        stem = path[:-len(PARQUET)]
        start = stem.rfind("/") + 1
        while (at := stem.find(REWRITTEN_BY, start)) != -1:
            if (origin := stem[:at] + PARQUET) in present:
                replaced.add(origin)
            start = at + 1
    return replaced


def live_files(output: str, fs) -> list[str]:
    """The result files a reader should see: every Parquet file of the output but those replaced."""
    files = _files(output, fs)
    replaced = replaced_files(files)
    return [p for p in files if p not in replaced]


def remove_replaced(output: str, fs) -> list[str]:
    """Delete the files that a replacement supersedes, then the replacements with no rows left (they
    only marked a file as gone); returns what was deleted."""
    files = _files(output, fs)
    replaced = sorted(replaced_files(files))
    for path in replaced:
        fs.delete_file(path)
    empty = [p for p in files if REWRITTEN_BY in p.rsplit("/", 1)[-1] and p not in replaced
             and _num_rows(p, fs) == 0]
    for path in empty:
        fs.delete_file(path)
    return replaced + empty


def _num_rows(path: str, fs) -> int | None:
    try:
        with fs.open_input_file(path) as f:
            return pq.read_metadata(f).num_rows
    except (pa.ArrowInvalid, OSError):
        return None


def _written_by(path: str, run_id: str) -> bool:
    """Whether `path` is a file of run `run_id`: `part-<run_id>-<write uuid, 32 hex>-...` (pipeline.io.output).
    A plain prefix test would also claim the files of a run named `<run_id>-2` as this run's."""
    name = path.rsplit("/", 1)[-1]
    prefix = f"part-{run_id}-"
    return name.startswith(prefix) and re.match(r"[0-9a-f]{32}-", name[len(prefix):]) is not None


def _task_of(path: str) -> str | None:
    for part in path.split("/"):
        if part.startswith("task="):
            return part[len("task="):]
    return None


def _read(path: str, fs, columns: list[str] | None = None) -> pa.Table | None:
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        log.warning("resume: %s is unreadable (%s), a killed write: removing it", path, exc)
        fs.delete_file(path)
        return None
    return table.append_column("task", pa.array([_task_of(path)] * table.num_rows, pa.string()))


def existing_keys(output: str, fs) -> pa.Table:
    tables = [t for p in live_files(output, fs) if (t := _read(p, fs, ["id", "target_language", "page",
                                                                    "status", "run_id"])) is not None]
    if not tables:
        return pa.table({"id": pa.array([], pa.string()), "task": pa.array([], pa.string()),
                         "status": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="permissive")


def rows_to_redo(manifest: pa.Table, config: JobConfig, output: Location) -> pa.Table:
    """The manifest rows that lack an `ok` row for one of their output keys (schemas/tasks.py), or
    have an error row: those are redone whole (their ok rows are replaced, never duplicated)."""
    done = existing_keys(output.path, output.fs)
    if done.num_rows == 0:
        return manifest
    if "target_language" not in done.column_names:
        done = done.append_column("target_language", pa.nulls(done.num_rows, pa.string()))
    ok = done.filter(pc.equal(done["status"], STATUS_OK))
    have = set(zip(ok["id"].to_pylist(), ok["task"].to_pylist(), ok["target_language"].to_pylist()))
    failed_ids = set(done.filter(pc.not_equal(done["status"], STATUS_OK))["id"].to_pylist())
    targets = manifest["target_language"].to_pylist() if "target_language" in manifest.column_names \
        else [None] * manifest.num_rows
    redo = [rid in failed_ids or any((rid, *key) not in have
                                     for key in output_keys(config.tasks, config.translate_to, target))
            for rid, target in zip(manifest["id"].to_pylist(), targets)]
    return manifest.filter(pa.array(redo, pa.bool_()))


def drop_superseded(output: str, fs, run_id: str, keep_replaced: bool = False) -> int:
    """Remove rows of earlier runs whose key this run wrote again. Returns how many were removed.

    `keep_replaced`: leave the older files that lost rows beside their replacements (an Iceberg
    table still lists them until its commit); `remove_replaced` deletes them afterwards."""
    files = live_files(output, fs)
    new_keys: set[tuple] = set()
    for p in files:
        if _written_by(p, run_id):
            t = _read(p, fs, ["id", "target_language", "page"])
            if t is not None:
                new_keys.update(zip(*(t[c].to_pylist() for c in KEY)))
    removed = 0
    for p in files:
        if _written_by(p, run_id) or not new_keys:
            continue
        with fs.open_input_file(p) as f:
            table = pq.read_table(f)
        task = _task_of(p)
        stale = [(rid, task, tl, pg) in new_keys for rid, tl, pg in zip(
            table["id"].to_pylist(), table["target_language"].to_pylist(), table["page"].to_pylist())]
        if not any(stale):
            continue
        kept = table.filter(pa.array([not s for s in stale]))
        removed += table.num_rows - kept.num_rows
        if kept.num_rows or keep_replaced:  # an empty replacement marks a file that is gone whole
            # a hidden name first: readers (pyarrow, DuckDB's *.parquet, Spark) skip it if a kill leaves it
            target = replacement_path(p, run_id)
            folder, name = target.rsplit("/", 1)
            tmp = f"{folder}/.{name}.rewrite"
            with fs.open_output_stream(tmp) as f:
                pq.write_table(kept, f)
            fs.move(tmp, target)
        if not keep_replaced:
            fs.delete_file(p)
    return removed
