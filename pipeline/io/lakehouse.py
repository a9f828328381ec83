"""The Iceberg output: each run's result files committed to a table in one snapshot, once (`--table`).

Ray Data writes the Parquet output as without a table (jobs/dataset_write.py: files per GPU call under
`task=<task>/`). When the run has finished, `commit_output` makes the table list exactly the output's
live files (pipeline/io/resume.py: `live_files`) in one snapshot: the files it lacks are added, the ones
the output no longer has (rows a resume replaced) are removed, both in the same commit, so a reader of
the table sees all of a run or none of it. The files are added as they are (nothing is rewritten):

- the table is partitioned by identity(task) and the files do not hold `task` (it is in their folder name,
  the Hive layout every Parquet reader of the output relies on; Spark refuses a folder whose files repeat
  their partition column). pyiceberg's `add_files` reads partition values from the files' column
  statistics, so it cannot add them; the data files are described here instead, with the partition
  value taken from the folder. The Iceberg spec lets a file omit a column its partition holds by
  identity, and has readers fill it from the partition value (pyiceberg and Polars do: tests);
- the files carry no Iceberg field ids, so the table keeps a name mapping (`schema.name-mapping.default`),
  which readers use to find columns by name.

Idempotent: the commit compares the table with the output's files, so a commit retried after a crash
(the snapshot written, the run record not) adds nothing, and a `--resume` commits the whole run (the
files of the killed run and its own) once. Each snapshot's summary names the run (`phi4mm.run-id`), the
output, and a hash of the file list it made the table hold. A commit that removes files (rows a resume
replaced, deleted right after it) expires in the same commit the older snapshots that list them, so
every snapshot the table keeps can be read.

The table is created on first use with the run's result schema (the manifest's pass-through columns
and a --schema's typed columns included, every column optional); a run with new columns adds them in
the same commit. A column whose type the run would change is refused before Ray starts
(`prepare_table`), naming the column.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.output import first_line
from pipeline.io.resume import live_files
from pipeline.io.storage import Location, StorageOptions, protocol_of
from schemas.table_uri import TableUri, parse_table_uri

log = logging.getLogger(__name__)

PARTITION_COLUMN = "task"
SUMMARY_RUN_ID = "phi4mm.run-id"
SUMMARY_OUTPUT = "phi4mm.output"
SUMMARY_FILES = "phi4mm.files-sha256"
# the name a SQLite catalog records its tables under (its `catalog_name` column): the name to give the
# catalog in another engine that opens the same file (Spark's JDBC catalog: spark.sql.catalog.phi4mm)
SQLITE_CATALOG_NAME = "phi4mm"
TABLE_FOLDER = "_iceberg"  # a new table's metadata, inside the output ("_": skipped by Parquet readers)
FOOTER_READERS = 16
COMMIT_ATTEMPTS = 5  # another writer committed first: reload, compare again, retry


class TableError(ValueError):
    """The table cannot take this run (catalog unreachable, a column's type changed, another partitioning)."""


# -- the catalog --------------------------------------------------------------------------------------

def catalog_properties(ref: TableUri, storage: StorageOptions, extra: dict[str, str] | None = None) -> dict:
    """pyiceberg properties of the table's catalog: its kind, and the run's S3 settings for the FileIO
    that writes the table's metadata next to the output; `extra` (JobConfig.table_catalog) wins."""
    props: dict[str, str] = {"s3.connect-timeout": str(storage.connect_timeout_s),
                             "s3.request-timeout": str(storage.read_timeout_s)}
    if storage.endpoint_url:
        props["s3.endpoint"] = storage.endpoint_url
    # without a region pyiceberg asks AWS where the bucket lives, which an S3-compatible endpoint is not
    region = storage.region or ("us-east-1" if storage.endpoint_url else None)
    if region:
        props["s3.region"] = region
    if storage.anon:
        props["s3.anonymous"] = "true"
    if ref.kind == "sqlite":
        props.update(type="sql", uri=f"sqlite:///{ref.sqlite_path()}")
    elif ref.kind == "glue":
        props["type"] = "glue"
        if storage.region:
            props["glue.region"] = storage.region
    props.update(extra or {})
    return props


def open_catalog(ref: TableUri, storage: StorageOptions, extra: dict[str, str] | None = None):
    from pyiceberg.catalog import load_catalog

    props = catalog_properties(ref, storage, extra)
    try:
        if ref.kind == "sqlite":
            os.makedirs(os.path.dirname(ref.sqlite_path()), exist_ok=True)
            from pyiceberg.catalog.sql import SqlCatalog

            return SqlCatalog(SQLITE_CATALOG_NAME, **{k: v for k, v in props.items() if k != "type"})
        return load_catalog(ref.catalog, **props)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the catalog is one line for the user
        raise TableError(f"table {ref}: cannot open its catalog ({first_line(exc)})") from exc


def load_table(uri: str, storage: StorageOptions | None = None, extra: dict[str, str] | None = None):
    """The existing table at `uri` (readers: the report, tests)."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    ref = parse_table_uri(uri)
    catalog = open_catalog(ref, storage or StorageOptions(), extra)
    try:
        return catalog.load_table(ref.identifier)
    except (NoSuchTableError, NoSuchNamespaceError) as exc:
        raise FileNotFoundError(f"table {ref}: no such table in its catalog") from exc


def reader_storage_options(table) -> dict[str, str]:
    """The S3 settings of `table`'s files, for readers that take their own (Polars' `scan_iceberg`
    reads S3 with its own client and uses only the `storage_options` it is given)."""
    options = {k: v for k, v in table.io.properties.items() if k.startswith("s3.")}
    if options.get("s3.endpoint", "").startswith("http://"):
        options["aws_allow_http"] = "true"
    return options


# -- the schema ---------------------------------------------------------------------------------------

def iceberg_ready(schema: pa.Schema) -> pa.Schema:
    """`schema` with the manifest columns Iceberg (format 2) cannot hold as they are given a type it
    can: a column empty in every row (pyarrow reads it as the null type) becomes a string column, a
    nanosecond timestamp (pandas writes them) a microsecond one."""
    def ready(field: pa.Field) -> pa.Field:
        if pa.types.is_null(field.type):
            return field.with_type(pa.string())
        if pa.types.is_timestamp(field.type) and field.type.unit == "ns":
            return field.with_type(pa.timestamp("us", tz=field.type.tz))
        return field

    return pa.schema([ready(f) for f in schema], metadata=schema.metadata)


def _iceberg_columns(schema: pa.Schema):
    """The Iceberg schema of an Arrow schema (no field ids: only names and types are compared)."""
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids

    return _pyarrow_to_schema_without_ids(schema)


def _fits(new, old) -> bool:
    """Whether values of Iceberg type `new` can be read as the table's type `old` (the same type, an
    allowed promotion such as int -> long, or nested types whose shared fields fit)."""
    from pyiceberg.exceptions import ResolveError
    from pyiceberg.schema import promote
    from pyiceberg.types import ListType, MapType, StructType

    if isinstance(old, StructType) or isinstance(new, StructType):
        if not (isinstance(old, StructType) and isinstance(new, StructType)):
            return False
        olds = {f.name: f.field_type for f in old.fields}
        return all(_fits(f.field_type, olds[f.name]) for f in new.fields if f.name in olds)
    if isinstance(old, ListType) or isinstance(new, ListType):
        return isinstance(old, ListType) and isinstance(new, ListType) and _fits(new.element_type, old.element_type)
    if isinstance(old, MapType) or isinstance(new, MapType):
        return (isinstance(old, MapType) and isinstance(new, MapType) and _fits(new.key_type, old.key_type)
                and _fits(new.value_type, old.value_type))
    if new == old:
        return True
    try:
        promote(new, old)
        return True
    except ResolveError:
        return False


def schema_conflicts(table_schema, arrow_schema: pa.Schema) -> list[str]:
    """One line per column of `arrow_schema` whose type the table cannot take."""
    nulls = [f.name for f in arrow_schema if pa.types.is_null(f.type)]
    if nulls:
        return [f"column {name!r} has no type (empty in every row), which Iceberg cannot hold" for name in nulls]
    table_types = {f.name: f.field_type for f in table_schema.fields}
    return [f"column {f.name!r} is {table_types[f.name]} in the table but {f.field_type} in this run"
            for f in _iceberg_columns(arrow_schema).fields
            if f.name in table_types and not _fits(f.field_type, table_types[f.name])]


def _is_task_partitioned(table) -> bool:
    from pyiceberg.transforms import IdentityTransform

    fields = table.spec().fields
    return (len(fields) == 1 and isinstance(fields[0].transform, IdentityTransform)
            and table.schema().find_column_name(fields[0].source_id) == PARTITION_COLUMN)


# -- before the run -----------------------------------------------------------------------------------

def prepare_table(ref: TableUri, catalog, run_schema: pa.Schema, output: Location):
    """The table this run commits to, created when missing (with `run_schema`, partitioned by task,
    its metadata under OUTPUT/_iceberg unless the catalog has a warehouse of its own); TableError when
    the table cannot take the run's rows. Called before Ray starts."""
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    run_schema = iceberg_ready(run_schema)
    try:
        try:
            table = catalog.load_table(ref.identifier)
        except NoSuchTableError:
            try:
                table = _create(ref, catalog, run_schema, output)
                log.info("table %s created", ref)
            except TableAlreadyExistsError:  # another run made it first
                table = catalog.load_table(ref.identifier)
    except TableError:
        raise
    except Exception as exc:  # noqa: BLE001 - the catalog's failures, each as one line
        raise TableError(f"table {ref}: cannot load or create it ({first_line(exc)})") from exc
    if not _is_task_partitioned(table):
        raise TableError(f"table {ref} is partitioned by {table.spec()}, not by identity(task) as the output's "
                         "task= folders are; commit to a new table")
    try:
        conflicts = schema_conflicts(table.schema(), run_schema)
    except ValueError as exc:  # a column type Iceberg has none for (uint64, ...)
        raise TableError(f"table {ref}: the run's columns cannot all be typed in Iceberg ({first_line(exc)})") from exc
    if conflicts:
        raise TableError(f"table {ref}: {'; '.join(conflicts)}; write to another table, or rename the column")
    return table


def _create(ref: TableUri, catalog, run_schema: pa.Schema, output: Location):
    from pyiceberg.table import TableProperties

    schema = pa.schema([f.with_nullable(True) for f in run_schema])  # a later run may leave any column null
    catalog.create_namespace_if_not_exists(ref.namespace)
    location = None if catalog.properties.get("warehouse") else file_uri(output, f"{output.path.rstrip('/')}/"
                                                                                  f"{TABLE_FOLDER}")
    with catalog.create_table_transaction(ref.identifier, schema=schema, location=location) as tx:
        with tx.update_spec() as spec:
            spec.add_identity(PARTITION_COLUMN)
        tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                             tx.table_metadata.schema().name_mapping.model_dump_json()})
    return catalog.load_table(ref.identifier)


# -- after the run ------------------------------------------------------------------------------------

def file_uri(output: Location, path: str) -> str:
    """The uri a table records for `path` (a path inside the output's filesystem)."""
    protocol = protocol_of(output.uri)
    return f"file://{path}" if protocol == "file" else f"{protocol}://{path}"


@dataclass(frozen=True)
class _Found:
    path: str  # inside the output's filesystem
    uri: str
    task: str
    size: int
    metadata: pq.FileMetaData


def _task_of(path: str) -> str | None:
    return next((part[len("task="):] for part in path.split("/") if part.startswith("task=")), None)


def _output_files(output: Location) -> list[str]:
    return [p for p in live_files(output.path, output.fs) if _task_of(p[len(output.path):])]


def _describe(output: Location, path: str) -> _Found | None:
    """A live file's footer and size; None (and a warning) for one that cannot be read (a write that a
    kill cut off, which a `--resume` removes)."""
    try:
        size = output.fs.get_file_info(path).size
        with output.fs.open_input_file(path) as f:
            metadata = pq.read_metadata(f)
    except (pa.ArrowInvalid, OSError) as exc:
        log.warning("table: %s is unreadable (%s), left out of the commit; --resume removes it", path, exc)
        return None
    return _Found(path, file_uri(output, path), _task_of(path[len(output.path):]), size, metadata)


def _data_file(metadata, found: _Found):
    """The table's description of one result file: its partition (task, from the folder), size and
    column statistics (from the footer), as pyiceberg's add_files would make it."""
    from pyiceberg.io.pyarrow import (compute_statistics_plan, data_file_statistics_from_parquet_metadata,
                                      parquet_path_to_id_mapping)
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
    from pyiceberg.typedef import Record

    schema = metadata.schema()
    stats = data_file_statistics_from_parquet_metadata(
        parquet_metadata=found.metadata, stats_columns=compute_statistics_plan(schema, metadata.properties),
        parquet_column_mapping=parquet_path_to_id_mapping(schema))
    return DataFile.from_args(content=DataFileContent.DATA, file_path=found.uri, file_format=FileFormat.PARQUET,
                              partition=Record(found.task), file_size_in_bytes=found.size, sort_order_id=None,
                              spec_id=metadata.default_spec_id, equality_ids=None, key_metadata=None,
                              **stats.to_serialized_dict())


def files_in_table(table, prefix: str) -> dict:
    """{file uri: (DataFile, id of the snapshot that added it)} of the table's current files under
    `prefix` (one output's files)."""
    from pyiceberg.manifest import ManifestContent

    snapshot = table.current_snapshot()
    if snapshot is None:
        return {}
    found = {}
    for manifest in snapshot.manifests(table.io):
        if manifest.content != ManifestContent.DATA:
            continue
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            if entry.data_file.file_path.startswith(prefix):
                found[entry.data_file.file_path] = (entry.data_file, entry.snapshot_id)
    return found


def snapshots_listing(table, added_in: set[int]) -> list[int]:
    """The snapshots that still list a file added in one of `added_in`: the current one and its
    ancestors back to the oldest of those (a file, once added, stays listed until it is removed)."""
    from pyiceberg.table.snapshots import ancestors_of

    chain = [s.snapshot_id for s in ancestors_of(table.current_snapshot(), table.metadata)]
    oldest = max((chain.index(i) for i in added_in if i in chain), default=-1)
    return chain[:oldest + 1]


def run_snapshot(table, run_id: str):
    """The latest snapshot whose summary names run `run_id`, or None."""
    found = [s for s in table.snapshots() if s.summary is not None and s.summary.get(SUMMARY_RUN_ID) == run_id]
    return max(found, key=lambda s: s.timestamp_ms) if found else None


def commit_output(table, output: Location, run_id: str) -> dict:
    """Make `table` hold exactly the output's live files, in one snapshot named after `run_id`; a no-op
    when it already does (a retried commit). Returns what the run record keeps of it."""
    from pyiceberg.exceptions import CommitFailedException

    prefix = file_uri(output, output.path.rstrip("/")) + "/"
    for attempt in range(COMMIT_ATTEMPTS):
        table.refresh()
        live = {file_uri(output, p): p for p in _output_files(output)}
        current = files_in_table(table, prefix)
        new = [live[uri] for uri in sorted(set(live) - set(current))]
        with ThreadPoolExecutor(FOOTER_READERS) as pool:  # one footer read per new file (S3: a round trip)
            added = [f for f in pool.map(lambda path: _describe(output, path), new) if f is not None]
        added = [f for f in added if f.metadata.num_rows]  # an empty replacement only marks a file as gone
        gone = sorted(set(current) - set(live))
        if not added and not gone:
            snapshot = run_snapshot(table, run_id) or table.current_snapshot()
            return _outcome(table, snapshot, committed=False, added=0, removed=0, expired=0)
        # the snapshots that list a file the output no longer keeps could not be read once it is deleted:
        # they are expired in the same commit, so the table never lists a missing file
        expire = snapshots_listing(table, {current[uri][1] for uri in gone}) if gone else []
        holds = sorted((set(current) - set(gone)) | {f.uri for f in added})
        try:
            snapshot = _commit(table, output, run_id, added, [current[uri][0] for uri in gone], expire, holds)
        except CommitFailedException as exc:
            log.warning("table: another writer committed first (%s); comparing again (attempt %d of %d)",
                        exc, attempt + 1, COMMIT_ATTEMPTS)
            continue
        return _outcome(table, snapshot, committed=True, added=len(added), removed=len(gone), expired=len(expire))
    raise TableError(f"table {'.'.join(table.name())}: the commit of run {run_id} kept losing to other "
                     f"writers ({COMMIT_ATTEMPTS} attempts); rerun with --resume to commit it")


def _commit(table, output: Location, run_id: str, added: list[_Found], removed: list, expire: list[int],
            holds: list[str]):
    from pyiceberg.table import TableProperties
    from pyiceberg.table.update.snapshot import ExpireSnapshots

    tx = table.transaction()
    for found in added:  # the run's new columns join the table in the same commit
        file_schema = found.metadata.schema.to_arrow_schema()
        conflicts = schema_conflicts(tx.table_metadata.schema(), file_schema)
        if conflicts:
            raise TableError(f"table {'.'.join(table.name())}: {found.path}: {'; '.join(conflicts)}")
        names = set(tx.table_metadata.schema().column_names)
        new = [f.with_nullable(True) for f in file_schema if f.name not in names]
        if new:
            with tx.update_schema() as update:
                update.union_by_name(pa.schema(new))
    mapping = tx.table_metadata.schema().name_mapping.model_dump_json()
    if tx.table_metadata.properties.get(TableProperties.DEFAULT_NAME_MAPPING) != mapping:
        tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING: mapping})
    summary = {SUMMARY_RUN_ID: run_id, SUMMARY_OUTPUT: output.uri,
               SUMMARY_FILES: hashlib.sha256("\n".join(holds).encode()).hexdigest()}
    with tx.update_snapshot(snapshot_properties=summary).overwrite() as snapshot:
        for data_file in removed:
            snapshot.delete_data_file(data_file)
        for found in added:
            snapshot.append_data_file(_data_file(tx.table_metadata, found))
    if expire:  # after the new snapshot, which heads the branch now: the older ones are free to go
        ExpireSnapshots(tx).by_ids(expire).commit()
    tx.commit_transaction()
    return table.current_snapshot()


def _outcome(table, snapshot, committed: bool, added: int, removed: int, expired: int) -> dict:
    return {"table": ".".join(table.name()), "snapshot_id": snapshot.snapshot_id if snapshot else None,
            "committed": committed, "files_added": added, "files_removed": removed, "snapshots_expired": expired,
            # what a reader without the catalog opens (DuckDB's iceberg_scan): the table's current metadata
            "metadata_location": table.metadata_location,
            "run_id_of_snapshot": (snapshot.summary or {}).get(SUMMARY_RUN_ID) if snapshot else None}
