"""`--table iceberg://...`: each run's files committed to an Iceberg table in one snapshot, once.

Every test counts the rows a reader of the *table* sees (pyiceberg, Polars' scan_iceberg), after:
a plain run (and its commit retried), a resume that retries error rows (replaced in the same commit),
a killed run resumed, a run with a new column (the table evolves), a run whose column changed type
(refused before Ray), and a run whose output is on S3 (the moto server).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.lakehouse import (SUMMARY_OUTPUT, SUMMARY_RUN_ID, commit_output, iceberg_ready, load_table,
                                   reader_storage_options)
from pipeline.io.resume import REWRITTEN_BY
from pipeline.io.storage import locate
from schemas.manifest import validate_manifest
from schemas.results import KEY_COLUMNS, result_schema
from tests.conftest import read_output

MAX_NEW = "6"
KEY = list(KEY_COLUMNS)


def _table_uri(tmp_path: Path, name: str = "calls.results") -> str:
    return f"iceberg://{tmp_path / 'lake' / 'catalog.db'}/{name}"


def _keys_once(rows: pd.DataFrame) -> None:
    dupes = rows[rows.duplicated(KEY, keep=False)]
    assert dupes.empty, dupes[KEY + ["run_id"]]


def _table_rows(uri: str, snapshot_id: int | None = None, options=None) -> pd.DataFrame:
    table = load_table(uri, options)
    return table.scan(snapshot_id=snapshot_id).to_arrow().to_pandas()


def _folder(path: str, fs=None) -> pa.Table:
    """The Parquet dataset with the schema of all its files (pyarrow takes the first file's by default,
    which lacks the columns a later run added), as the report reads it."""
    import pyarrow.dataset as pads

    found = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive", ignore_prefixes=["_", "."])
    schema = pa.unify_schemas([f.physical_schema for f in found.get_fragments()] + [found.partitioning.schema])
    return pads.dataset(path, schema=schema, filesystem=fs, format="parquet", partitioning="hive",
                        ignore_prefixes=["_", "."]).to_table()


def _same_as_parquet(uri: str, out, fs=None, options=None) -> None:
    """The table read by Polars has the Parquet dataset's rows, columns and types."""
    table = load_table(uri, options)
    from_table = pl.scan_iceberg(table, storage_options=reader_storage_options(table)).collect()
    from_files = pl.from_arrow(_folder(str(out), fs))
    assert sorted(from_table.columns) == sorted(from_files.columns)
    assert dict(from_table.schema) == {c: from_files.schema[c] for c in from_table.columns}
    order = KEY + ["run_id"]
    assert from_table.sort(order, nulls_last=True).equals(from_files.select(from_table.columns)
                                                          .sort(order, nulls_last=True))


def _manifest(samples: Path, n: int, late: bool = False, **extra) -> Path:
    calls = pd.read_csv(samples / "transcribe.csv").head(n)
    if late:
        calls = pd.concat([calls, pd.DataFrame([{"id": "late_call", "uri": "audio/late_call.wav", "language": "en",
                                                 "customer_segment": "business"}])], ignore_index=True)
    for name, value in extra.items():
        calls[name] = value
    path = samples / f"calls_{n}_{late}_{'_'.join(extra)}.csv"
    calls.to_csv(path, index=False)
    return path


@pytest.mark.realsize  # two whole runs (44 s); the fast tier keeps the commit, refusal and reader tests on hand-made runs
def test_runs_commit_once_each_and_a_resume_replaces_error_rows_in_the_same_commit(run_job, samples_copy, tmp_path):
    manifest = _manifest(samples_copy, 2, late=True)
    out, uri = tmp_path / "out", _table_uri(tmp_path)
    args = ("--translate-to", "fr", "--max-new-tokens", MAX_NEW, "--table", uri)

    # a plain run: its files, all in one snapshot naming the run
    assert run_job("transcribe", manifest, out, *args, "--run-id", "first") == 0
    table = load_table(uri)
    assert len(table.snapshots()) == 1
    first = table.current_snapshot()
    assert first.summary[SUMMARY_RUN_ID] == "first" and first.summary[SUMMARY_OUTPUT] == str(out)
    rows = _table_rows(uri)
    assert len(rows) == 3 * 2 == len(read_output(out))  # asr + translate per input
    assert (rows[rows.id == "late_call"].status == "error").all() and (rows[rows.id != "late_call"].status == "ok").all()
    _same_as_parquet(uri, out)
    record = json.loads((out / "_runs" / "first.json").read_text())
    assert record["table"]["snapshot_id"] == first.snapshot_id and record["table"]["committed"]

    # the commit retried, as after a crash between the snapshot and the run record: nothing is added twice
    again = commit_output(load_table(uri), locate(str(out)), "first")
    assert not again["committed"] and again["snapshot_id"] == first.snapshot_id
    assert len(load_table(uri).snapshots()) == 1 and len(_table_rows(uri)) == 6

    # the recording arrives; the resume retries the error rows and the table swaps them in one snapshot
    shutil.copy(samples_copy / "audio" / "call_0001.wav", samples_copy / "audio" / "late_call.wav")
    assert run_job("transcribe", manifest, out, *args, "--run-id", "second", "--resume") == 0
    table = load_table(uri)
    second = table.current_snapshot()
    assert second.summary[SUMMARY_RUN_ID] == "second" and second.summary.operation.value == "overwrite"
    rows = _table_rows(uri)
    _keys_once(rows)
    assert len(rows) == 6 and (rows.status == "ok").all(), rows[["id", "task", "status"]]
    assert set(rows[rows.id == "late_call"].run_id) == {"second"} and set(rows[rows.id != "late_call"].run_id) == {"first"}
    # the first snapshot listed the files whose rows were replaced, which are deleted now: it was expired
    # in the same commit, so every snapshot the table keeps can be read
    record = json.loads((out / "_runs" / "second.json").read_text())["table"]
    assert record["files_removed"] >= 1 and record["snapshots_expired"] == 1
    assert [s.snapshot_id for s in table.snapshots()] == [second.snapshot_id]
    _same_as_parquet(uri, out)
    assert not [p for p in out.rglob(f"*{REWRITTEN_BY}*") if pq.read_metadata(p).num_rows == 0]


def test_a_changed_column_type_is_refused_before_ray_naming_the_column(run_job, samples_copy, tmp_path, capsys):
    """A table whose `customer_segment` is a string refuses a run whose manifest has numbers there."""
    from pipeline.io.lakehouse import open_catalog, prepare_table
    from pipeline.io.storage import StorageOptions
    from schemas.table_uri import parse_table_uri

    uri = _table_uri(tmp_path)
    ref = parse_table_uri(uri)
    out = locate(str(tmp_path / "out"))
    prepare_table(ref, open_catalog(ref, StorageOptions()), result_schema(pa.schema([("customer_segment", pa.string())])),
                  out)
    manifest = _manifest(samples_copy, 1, customer_segment=7)
    capsys.readouterr()
    assert run_job("transcribe", manifest, out.path, "--max-new-tokens", MAX_NEW, "--table", uri) == 2
    err = capsys.readouterr().err.strip().splitlines()
    refusal = [line for line in err if line.startswith("phi4mm: table")]
    assert len(refusal) == 1 and "'customer_segment' is string in the table but long in this run" in refusal[0]
    assert not list(Path(out.path).rglob("*.parquet")) and not load_table(uri).snapshots()


# -- the commit on hand-made outputs (no Ray): files as the pipeline names and lays them out -----------

PASSTHROUGH = pa.schema([("uri", pa.string()), ("customer_segment", pa.string())])


def _write_rows(out: Path, task: str, run_id: str, rows: list[dict], index: int = 0,
                passthrough: pa.Schema = PASSTHROUGH, fs=None) -> str:
    """A result file of run `run_id` (the `task` only in the folder name); `out` may be an S3 path with `fs`."""
    schema = result_schema(passthrough)
    schema = schema.remove(schema.get_field_index("task"))
    full = [{"page": 1, "status": "ok", "run_id": run_id, "processed_at": pd.Timestamp("2024-05-01", tz="UTC"),
             **r} for r in rows]
    path = f"{out}/task={task}/part-{run_id}-{'ab' * 16}-{index:06d}-0.parquet"
    table = pa.Table.from_pylist(full, schema=schema)
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    else:
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f)
    return path


def _prepared(uri: str, out, passthrough: pa.Schema = PASSTHROUGH, options=None):
    from pipeline.io.lakehouse import open_catalog, prepare_table
    from pipeline.io.storage import StorageOptions
    from schemas.table_uri import parse_table_uri

    ref = parse_table_uri(uri)
    location = locate(str(out), options)
    return prepare_table(ref, open_catalog(ref, options or StorageOptions()), result_schema(passthrough), location), location


def test_a_killed_runs_files_are_committed_whole_by_the_resume_and_a_torn_one_never(tmp_path):
    """What a kill leaves (a whole file, and one cut off mid-write) is not in the table until a run
    commits; that run's commit holds every live file once, and a torn one is left out."""
    from pipeline.io.resume import rows_to_redo
    from schemas.config import JobConfig

    out, uri = tmp_path / "out", _table_uri(tmp_path)
    table, location = _prepared(uri, out)
    _write_rows(out, "asr", "killed", [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}])
    torn = Path(_write_rows(out, "asr", "killed", [{"id": "c", "text": "three"}], index=1))
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    assert not table.snapshots()  # nothing of the killed run is visible through the table

    # the resume's bookkeeping removes the torn file; the resumed run writes what was missing
    manifest = validate_manifest(pa.table({"id": ["a", "b", "c"], "uri": ["a.wav", "b.wav", "c.wav"]}))
    config = JobConfig(job="transcribe", input="m.csv", output=str(out), resume=True)
    assert rows_to_redo(manifest, config, location)["id"].to_pylist() == ["c"] and not torn.exists()
    _write_rows(out, "asr", "resumed", [{"id": "c", "text": "three"}])
    first = commit_output(table, location, "resumed")
    again = commit_output(load_table(uri), location, "resumed")  # a crash before the run record: retried
    assert first["committed"] and first["files_added"] == 2 and not again["committed"]
    table = load_table(uri)
    assert len(table.snapshots()) == 1 and table.current_snapshot().summary[SUMMARY_RUN_ID] == "resumed"
    rows = _table_rows(uri)
    _keys_once(rows)
    assert sorted(rows.id) == ["a", "b", "c"] and set(rows.task) == {"asr"}
    _same_as_parquet(uri, out)


def test_a_crash_between_the_replacement_and_the_commit_changes_no_answer(tmp_path):
    """A resume that replaced rows is cut off before its commit: the table still shows the earlier
    run whole, the folder's readers of live files see every key once, and the next commit swaps."""
    from pipeline.io.resume import drop_superseded, live_files, remove_replaced

    out, uri = tmp_path / "out", _table_uri(tmp_path)
    table, location = _prepared(uri, out)
    _write_rows(out, "asr", "first", [{"id": "a", "text": "one"}, {"id": "b", "status": "error", "error": "nf"}])
    _write_rows(out, "asr", "first", [{"id": "c", "status": "error", "error": "nf"}], index=1)
    commit_output(table, location, "first")
    _write_rows(out, "asr", "second", [{"id": "b", "text": "two"}, {"id": "c", "text": "three"}])
    assert drop_superseded(location.path, location.fs, "second", keep_replaced=True) == 2
    # killed here: the replaced files are still there, the table still lists them and reads them
    assert len(list(out.rglob("*.parquet"))) == 5 and len(live_files(location.path, location.fs)) == 3
    assert sorted(_table_rows(uri).status) == ["error", "error", "ok"]

    outcome = commit_output(load_table(uri), location, "second")
    assert outcome["committed"] and outcome["files_removed"] == 2 and outcome["files_added"] == 2  # c's is empty
    assert outcome["snapshots_expired"] == 1  # the first run's snapshot lists the files about to go
    assert len(remove_replaced(location.path, location.fs)) == 3  # 2 replaced, 1 empty marker
    for snapshot in load_table(uri).snapshots():  # every snapshot kept can be read
        assert len(_table_rows(uri, snapshot.snapshot_id)) == 3
    rows = _table_rows(uri).set_index("id")
    assert rows.status.to_dict() == {"a": "ok", "b": "ok", "c": "ok"} and rows.run_id["a"] == "first"
    assert len(list(out.rglob("*.parquet"))) == 2 and not commit_output(load_table(uri), location, "second")["committed"]
    _same_as_parquet(uri, out)


def test_a_run_with_new_columns_evolves_the_table(tmp_path):
    out, uri = tmp_path / "out", _table_uri(tmp_path)
    table, location = _prepared(uri, out)
    _write_rows(out, "asr", "first", [{"id": "a", "text": "one", "customer_segment": "business"}])
    commit_output(table, location, "first")

    # new columns are welcome: a manifest column empty in every row (no type) and a pandas timestamp (ns)
    # as the run writes them with a table (jobs/table_output.py: table_passthrough)
    wider = pa.schema([*PASSTHROUGH, ("priority", pa.int64()), ("empty_in_every_row", pa.null()),
                       ("called_at", pa.timestamp("ns", tz="UTC"))])
    table, _ = _prepared(uri, out, wider)
    written = iceberg_ready(wider)
    assert written.field("empty_in_every_row").type == pa.string() and written.field("called_at").type.unit == "us"
    _write_rows(out, "asr", "second", [{"id": "b", "text": "two", "priority": 3, "empty_in_every_row": None,
                                        "called_at": pd.Timestamp("2024-05-02 10:00", tz="UTC")}], passthrough=written)
    assert len(load_table(uri).schema().fields) == len(result_schema(PASSTHROUGH))  # changed at the commit only
    commit_output(table, location, "second")
    table = load_table(uri)
    assert str(table.schema().find_field("priority").field_type) == "long"
    assert str(table.schema().find_field("empty_in_every_row").field_type) == "string"
    assert str(table.schema().find_field("called_at").field_type) == "timestamptz"
    rows = _table_rows(uri).set_index("id")
    assert rows.priority.isna()["a"] and rows.priority["b"] == 3 and len(rows) == 2
    _same_as_parquet(uri, out)


def test_committed_and_read_back_from_s3(s3, tmp_path):
    """Output and table metadata on the moto endpoint, the catalog a local SQLite file: pyiceberg and
    Polars read the same rows and types as the Parquet dataset read from S3."""
    from pipeline.io.storage import pyarrow_filesystem

    s3.create_bucket("lake")
    out = "s3://lake/calls-out"
    uri = _table_uri(tmp_path)
    fs, path = pyarrow_filesystem(out, s3.options)
    _write_rows(path, "asr", "first", [{"id": "a", "text": "one"}, {"id": "b", "status": "error", "error": "nf"}], fs=fs)
    _write_rows(path, "translate", "first", [{"id": "a", "text": "un", "target_language": "fr"}], fs=fs)
    table, location = _prepared(uri, out, options=s3.options)
    assert table.location().startswith("s3://lake/calls-out/_iceberg")
    outcome = commit_output(table, location, "first")
    assert outcome["committed"] and outcome["metadata_location"].startswith("s3://lake/calls-out/_iceberg/metadata/")

    _same_as_parquet(uri, path, fs, s3.options)
    assert _table_rows(uri, options=s3.options).shape[0] == 3


def test_the_report_reads_the_table(tmp_path, capsys):
    from jobs.report import main as report_main

    out, uri = tmp_path / "out", _table_uri(tmp_path)
    table, location = _prepared(uri, out)
    _write_rows(out, "asr", "first", [{"id": "a", "text": "one"}, {"id": "b", "status": "error", "error": "nf"}])
    commit_output(table, location, "first")
    (out / "_runs").mkdir()
    (out / "_runs" / "first.json").write_text(json.dumps({"run_id": "first", "wall_s": 2.0, "gpus": 1}))
    _write_rows(out, "asr", "not-committed", [{"id": "c", "text": "three"}])  # in the folder, not the table
    assert report_main([uri, "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows"] == 2 and (report["counts"]["asr"]["ok"], report["counts"]["asr"]["error"]) == (1, 1)
    assert [r["run_id"] for r in report["runs"]] == ["first"]
    assert report_main([str(out), "--json", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["rows"] == 3
    capsys.readouterr()
    assert report_main([_table_uri(tmp_path, "calls.nothing_here")]) == 2
    assert "no such table" in capsys.readouterr().err


def test_table_uris_are_parsed_and_bad_ones_refused_with_an_example():
    from pydantic import ValidationError

    from schemas.config import JobConfig
    from schemas.table_uri import parse_table_uri

    local = parse_table_uri("iceberg://./lake/catalog.db/calls.results")
    assert (local.kind, local.catalog, local.identifier) == ("sqlite", "./lake/catalog.db", ("calls", "results"))
    assert parse_table_uri("iceberg:///srv/catalog.db/a.b.t").identifier == ("a", "b", "t")
    assert parse_table_uri("iceberg://glue/calls.results").kind == "glue"
    assert parse_table_uri("iceberg://prod/calls.results").kind == "named"
    for bad in ("s3://bucket/table", "iceberg://catalog.db/results", "iceberg://calls.results", "iceberg://x/.t"):
        with pytest.raises(ValueError, match="iceberg://CATALOG/NAMESPACE.TABLE"):
            parse_table_uri(bad)
    with pytest.raises(ValidationError, match="e.g. iceberg://./catalog.db/calls.results"):
        JobConfig(job="ocr", input="m.csv", output="out", table="iceberg://catalog.db/results")
    config = JobConfig(job="ocr", input="m.csv", output="out", table="iceberg://prod/a.t",
                       table_catalog={"credential": "secret"})
    assert "credential" not in json.dumps(config.model_dump(mode="json"))  # never in a run record


def test_a_named_catalog_takes_the_configs_catalog_properties(tmp_path):
    """`iceberg://lake/...`: the catalog named `lake`, as pyiceberg's configuration and `table_catalog`
    (JobConfig) describe it (here a SQL catalog; a REST one is {type: rest, uri: https://...}), plus the
    run's S3 settings for its files."""
    from pipeline.io.lakehouse import catalog_properties, open_catalog, prepare_table
    from pipeline.io.storage import StorageOptions
    from schemas.table_uri import parse_table_uri

    ref = parse_table_uri("iceberg://lake/calls.results")
    extra = {"type": "sql", "uri": f"sqlite:///{tmp_path / 'named.db'}"}
    out = tmp_path / "out"
    location = locate(str(out))
    table = prepare_table(ref, open_catalog(ref, StorageOptions(), extra), result_schema(PASSTHROUGH), location)
    _write_rows(out, "asr", "first", [{"id": "a", "text": "one"}])
    commit_output(table, location, "first")
    assert load_table(ref.uri, extra=extra).scan().to_arrow().num_rows == 1 and (tmp_path / "named.db").exists()
    props = catalog_properties(ref, StorageOptions(endpoint_url="http://127.0.0.1:9"), {"warehouse": "w"})
    assert props["s3.endpoint"] == "http://127.0.0.1:9" and props["s3.region"] == "us-east-1"
    assert props["warehouse"] == "w" and "type" not in props  # the kind comes from pyiceberg's configuration
    with pytest.raises(ValueError, match=r"table iceberg:///proc/no/catalog.db/a.t: cannot open its catalog"):
        open_catalog(parse_table_uri("iceberg:///proc/no/catalog.db/a.t"), StorageOptions())
