"""The output side under faults: an unwritable output, a write that fails, S3 that throttles or errs,
and readers of the lake (pandas, pyarrow over s3fs, pyarrow's own S3 client, Polars; DuckDB and
Spark locally) that must read what a run wrote, with the same rows and types.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import OutputError
from jobs.dataset_write import write_results
from pipeline.io.output import probe_output
from pipeline.io.storage import locate, pyarrow_filesystem, remove_directory_markers
from tests.conftest import SAMPLES, read_output
from tests.s3server import FaultProxy

MAX_NEW = "6"
KEY = ["id", "task", "target_language", "page"]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line and " rows read" not in line]  # the manifest's row count is printed first
    assert len(err) == 1 and err[0].startswith("phi4mm: "), err
    return err[0]


# -- an unwritable output is found before Ray starts any actor -----------------------------------------

def test_probe_names_the_path_and_the_cause(tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    out = tmp_path / "a_file" / "out"
    with pytest.raises(OutputError) as err:
        probe_output(locate(str(out)), "r1")
    assert str(out) in str(err.value) and "cannot create the output folder" in str(err.value)
    probe_output(locate(str(tmp_path / "ok")), "r1")
    assert [p.name for p in (tmp_path / "ok").iterdir()] == []  # the marker is gone again


def test_unwritable_outputs_fail_before_ray_with_one_line(run_job, samples_copy, s3, capsys):
    (samples_copy / "a_file").write_text("in the way")
    manifest = samples_copy / "transcribe.csv"
    assert run_job("transcribe", manifest, samples_copy / "a_file" / "out") == 2
    line = _one_error_line(capsys)
    assert str(samples_copy / "a_file" / "out") in line and ("NotADirectory" in line or "Not a directory" in line)
    # S3: a bucket that does not exist
    assert run_job("transcribe", manifest, "s3://no-such-bucket/out", "--s3-endpoint", s3.endpoint_url) == 2
    line = _one_error_line(capsys)
    assert "s3://no-such-bucket/out" in line and "cannot write a file" in line


def test_a_write_that_fails_mid_run_is_one_output_error(ray_session, tmp_path):
    import ray

    out = tmp_path / "out"
    out.mkdir()
    (out / "task=asr").write_text("a file where the partition folder goes")
    ds = ray.data.from_items([{"id": "a", "task": "asr", "text": "x"}])
    with pytest.raises(OutputError) as err:
        write_results(ds, locate(str(out)), "r1")
    assert str(out) in str(err.value) and "writing the results failed" in str(err.value)


# -- S3: no directory markers, throttling retried, persistent 5xx an error row -------------------------

def test_markers_are_removed_and_objects_kept(s3):
    s3.put("calls", "out/", b"")
    s3.put("calls", "out/task=asr/", b"")
    s3.put("calls", "out/task=asr/part-1.parquet", b"PAR1")
    s3.put("calls", "outside/", b"")
    removed = remove_directory_markers(locate("s3://calls/out", s3.options))
    assert sorted(removed) == ["out/", "out/task=asr/"]
    assert s3.keys("calls") == ["out/task=asr/part-1.parquet", "outside/"]
    assert remove_directory_markers(locate(str(Path("/tmp")), s3.options)) == []


@pytest.mark.realsize
def test_s3_run_keeps_every_row_and_reads_in_every_reader(run_job, s3, tmp_path, caplog):
    """A run to s3://calls/out through a proxy that throttles the result writes and one recording's
    reads (retried: nothing lost) and fails another recording's reads with 500s every time (retried,
    then an error row for that one). The manifest also carries pass-through columns named like
    work-row columns (`modality` as int, `chunk_text`) and one row with an unknown target_language:
    they come back unchanged / cost only that translation. Read back with pandas, pyarrow over s3fs,
    pyarrow's S3 client and Polars: the same rows in each."""
    clips = sorted((SAMPLES / "audio").glob("call_000*"))[:4]
    for clip in clips:
        s3.put("calls", f"in/{clip.name}", clip.read_bytes())
    manifest = tmp_path / "calls.csv"
    ids = [c.stem for c in clips]
    flaky, broken, odd_target = clips[0], clips[3], ids[1]  # the broken one last: its retries overlap
    pd.DataFrame({"id": ids, "uri": [f"s3://calls/in/{c.name}" for c in clips], "language": "en",
                  "agent": [f"agent-{i}" for i in range(len(clips))],
                  "modality": [7, 8, 9, 10], "chunk_text": ["c1", "c2", "c3", "c4"],
                  "target_language": [None, "../../etc", None, None]}).to_csv(manifest, index=False)
    config = tmp_path / "job.yaml"
    config.write_text("batching:\n  rows_per_call: 2\n")
    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.fail_next(2, status=503, code="SlowDown", method="PUT", path_contains="task%3Dasr")
        proxy.fail_next(2, status=503, code="SlowDown", method="PUT", path_contains="task=asr")
        proxy.fail_next(2, status=503, code="SlowDown", method="GET", path_contains=flaky.name)
        proxy.fail_always(status=500, code="InternalError", message="We encountered an internal error.",
                          method="GET", path_contains=broken.name)
        with caplog.at_level(logging.WARNING, logger="jobs.runner"):
            rc = run_job("transcribe", manifest, "s3://calls/out", "--s3-endpoint", proxy.endpoint_url,
                         "--translate-to", "fr", "--max-new-tokens", MAX_NEW,
                         "--run-id", "s3-readers", "--config", str(config))
        result_puts = [r for r in proxy.requests if r[0] == "PUT" and "task" in r[1]]
        flaky_gets = [r for r in proxy.requests if r[0] == "GET" and flaky.name in r[1]]
    assert rc == 0
    assert result_puts and len(flaky_gets) >= 3  # both went through the throttling proxy, and were retried
    assert "'../../etc'" in caplog.text and odd_target in caplog.text  # said on the driver, before Ray

    keys = s3.keys("calls", "out/")
    assert not [k for k in keys if k.endswith("/")], keys  # no zero-byte directory objects
    files = [k for k in keys if k.endswith(".parquet")]
    # written in units of one GPU call (rows_per_call=2), not gathered into one file
    assert len(files) >= math.ceil(len(ids) / 2) * 2

    opts = {"client_kwargs": {"endpoint_url": s3.endpoint_url}}
    frames = {
        "pandas": pd.read_parquet("s3://calls/out", storage_options=opts),
        "pyarrow+s3fs": _pyarrow_s3fs(s3.endpoint_url),
        "pyarrow S3FileSystem": _pyarrow_native(s3),
        "polars": _polars(s3.endpoint_url),
    }
    tasks = {"asr": 4, "translate": 4}  # (summaries of a bad-target row: tests/test_bad_values.py)
    for name, frame in frames.items():
        frame = frame.assign(task=frame["task"].astype(str))
        # asr + translate for each input: every row, once, in every reader
        assert frame.groupby("task").size().to_dict() == tasks, name
        assert not frame.duplicated(["id", "task"]).any(), name
        by_key = frame.set_index(["id", "task"])
        for task in tasks:
            bad = by_key.loc[(broken.stem, task)]
            assert bad["status"] == "error" and broken.name in bad["error"], (name, task, bad["error"])
        assert "after 4 attempts" in by_key.loc[(broken.stem, "asr"), "error"], name
        odd = by_key.loc[(odd_target, "translate")]
        assert odd["status"] == "error" and "'../../etc'" in odd["error"], name
        rest = frame[(frame.id != broken.stem) & ~((frame.id == odd_target) & (frame.task == "translate"))]
        assert len(rest) == 5 and (rest["status"] == "ok").all(), (name, rest[rest.status != "ok"].error.tolist())
        # the pass-through columns come back unchanged, with their own types, on every row
        want = dict(zip(ids, range(len(ids))))
        assert [int(v) for v in frame["modality"]] == [7 + want[i] for i in frame["id"]], name
        assert list(frame["chunk_text"]) == [f"c{want[i] + 1}" for i in frame["id"]], name
        assert list(frame["agent"]) == [f"agent-{want[i]}" for i in frame["id"]], name
    assert frames["pandas"]["modality"].dtype.kind == "i"
    record = json.loads(s3.get("calls", "out/_runs/s3-readers.json"))
    assert record["counts"] == {"asr": {"ok": 3, "error": 1}, "translate": {"ok": 2, "error": 2}}
    for file in files:  # at most one GPU call's rows per file
        assert pq.read_metadata(pa.BufferReader(s3.get("calls", file))).num_rows <= 2


def _pyarrow_s3fs(endpoint: str) -> pd.DataFrame:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    return pads.dataset("calls/out", filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()


def _pyarrow_native(s3) -> pd.DataFrame:
    fs, path = pyarrow_filesystem("s3://calls/out", s3.options)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()


def _polars(endpoint: str) -> pd.DataFrame:
    import polars as pl

    options = {"aws_endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
               "aws_region": "us-east-1", "aws_allow_http": "true"}
    # Polars takes a glob for a partitioned folder (it refuses a folder that also holds _runs/*.json)
    frame = pl.read_parquet("s3://calls/out/**/*.parquet", hive_partitioning=True, storage_options=options)
    return frame.select(["id", "task", "status", "error", "agent", "modality", "chunk_text"]).to_pandas()


# -- the local output: DuckDB and Spark read the same rows and types as pyarrow -------------------------

@pytest.mark.realsize
def test_local_output_reads_the_same_in_duckdb_and_spark(transcribe_run):
    _, _, _, out = transcribe_run
    want = read_output(out).to_pandas()
    key = sorted(zip(want.id, want.task, want.target_language.fillna(""), want.page, want.status))

    db = duckdb.sql(f"select * from read_parquet('{out}/**/*.parquet', hive_partitioning=true)")
    types = dict(zip(db.columns, [str(t) for t in db.types]))
    got = db.df()
    assert sorted(zip(got.id, got.task, got.target_language.fillna(""), got.page, got.status)) == key
    assert types["page"] == "INTEGER" and types["processed_at"].startswith("TIMESTAMP WITH TIME ZONE")
    assert types["segments"].startswith("STRUCT(start_s DOUBLE, end_s DOUBLE, \"text\" VARCHAR)[]")
    assert types["task"] == "VARCHAR" and types["output_tokens"] == "BIGINT"

    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[1]").appName("phi4mm-readers")
             .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC")
             .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    try:
        frame = spark.read.parquet(str(out))
        spark_types = {f.name: f.dataType.simpleString() for f in frame.schema.fields}
        rows = frame.select("id", "task", "target_language", "page", "status").collect()
    finally:
        spark.stop()
    assert sorted((r.id, r.task, r.target_language or "", r.page, r.status) for r in rows) == key
    assert spark_types["page"] == "int" and spark_types["processed_at"] == "timestamp"
    assert spark_types["segments"] == "array<struct<start_s:double,end_s:double,text:string>>"
    assert spark_types["task"] == "string" and spark_types["output_tokens"] == "bigint"
    assert spark_types["customer_segment"] == "string"
