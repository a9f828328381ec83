"""The manifest contract and local manifest reading: every refusal names its column or ids; Parquet
(file, folder, glob), CSV, JSON Lines; relative uris; pass-through columns keep their types."""
from __future__ import annotations

import gzip
import json
import os
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.io.manifest import manifest_format, read_manifest
from schemas.manifest import (KNOWN_COLUMNS, KNOWN_FIELDS, PASSTHROUGH_EXCLUDE, ManifestError,
                              passthrough_columns, validate_manifest)

WHEN = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)


def _table(**columns) -> pa.Table:
    return pa.table(columns)


# -- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("table, words", [
    (_table(uri=["a.wav"]), ["'id' column", "uri"]),
    (_table(id=["a"], language=["en"]), ["neither a 'uri' nor a 'data' column"]),
    (pa.table({"id": pa.array([], pa.string()), "uri": pa.array([], pa.string())}), ["no rows"]),
    (_table(id=["a", None, "  "], uri=["x", "y", "z"]), ["'id' is null or empty in 2 row(s)", "1, 2"]),
    (_table(id=["a", "b", "c"], uri=["x.wav", None, " "]), ["neither a 'uri' nor 'data'", "'b', 'c'"]),
    (_table(id=["a", "b"], uri=["x", "y"], kind=["audio", "video"]),
     ["column 'kind'", "'video'", "ids 'b'"]),
    (_table(id=["a"], data=pa.array([[1, 2]])), ["column 'data'", "list<item: int64>"]),
])
def test_refusals_name_the_column_or_ids(table, words):
    with pytest.raises(ManifestError) as err:
        validate_manifest(table)
    for word in words:
        assert word in str(err.value)


def test_duplicate_ids_lists_ten_and_counts():
    ids = [f"call-{i:02d}" for i in range(15)] * 2 + ["unique"]
    with pytest.raises(ManifestError) as err:
        validate_manifest(_table(id=ids, uri=["x.wav"] * len(ids)))
    message = str(err.value)
    assert "15 duplicate id(s) in column 'id'" in message
    assert "'call-00'" in message and "'call-09'" in message and "'call-10'" not in message
    assert "and 5 more" in message and "unique" not in message


def test_all_row_problems_reported_together():
    with pytest.raises(ManifestError) as err:
        validate_manifest(_table(id=["a", "a", "b"], uri=["x", "y", None], kind=["audio", "image", "tape"]))
    message = str(err.value)
    assert "duplicate" in message and "neither" in message and "'tape'" in message


# -- normalisation -----------------------------------------------------------------------------------

def test_types_normalised_known_columns_added_passthrough_untouched():
    table = pa.table({
        "id": pa.array([101, 102], pa.int64()),
        "uri": pa.array(["a.wav", ""], pa.large_string()),
        "data": pa.array([None, b"RIFF"], pa.large_binary()),
        "kind": pa.array(["Audio", None]).dictionary_encode(),
        "agent_id": pa.array([7, 8], pa.int64()),
        "call_start": pa.array([WHEN, WHEN], pa.timestamp("ms", tz="UTC")),
    })
    out = validate_manifest(table)
    assert out.column_names[:len(KNOWN_COLUMNS)] == list(KNOWN_COLUMNS)
    for name, typ in KNOWN_FIELDS.items():
        assert out.schema.field(name).type == typ, name
    assert out.column("id").to_pylist() == ["101", "102"]
    assert out.column("uri").to_pylist() == ["a.wav", None]  # blank cell -> null
    assert out.column("kind").to_pylist() == ["audio", None]
    assert out.column("language").null_count == 2
    assert out.schema.field("agent_id").type == pa.int64()
    assert out.schema.field("call_start").type == pa.timestamp("ms", tz="UTC")
    assert out.column("call_start").to_pylist() == [WHEN, WHEN]


def test_passthrough_columns_exclude_payload_and_result_names():
    schema = pa.schema([(name, typ) for name, typ in KNOWN_FIELDS.items()] + [("agent_id", pa.int64()),
                                                                              ("status", pa.string())])
    kept = passthrough_columns(schema)
    assert "data" not in kept and "id" not in kept and "language" not in kept
    assert "status" not in kept  # would collide with the result row's own status
    assert kept == ["uri", "kind", "reference", "agent_id"]
    assert "data" in PASSTHROUGH_EXCLUDE


# -- reading local manifests -------------------------------------------------------------------------

def _manifest_rows() -> pa.Table:
    return pa.table({
        "id": ["00123", "00124"],
        "uri": ["audio/a.wav", "/abs/b.wav"],
        "language": ["en", "fr"],
        "agent_id": pa.array([7, 8], pa.int64()),
        "call_start": pa.array([WHEN, WHEN + timedelta(hours=1)], pa.timestamp("us", tz="UTC")),
    })


def test_parquet_file_relative_uris_resolved_from_any_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "samples"
    folder.mkdir()
    pq.write_table(_manifest_rows(), folder / "m.parquet")
    monkeypatch.chdir(tmp_path.parent)  # somewhere else entirely
    out = read_manifest(str(folder / "m.parquet"))
    assert out.column("id").to_pylist() == ["00123", "00124"]
    assert out.column("uri").to_pylist() == [str(folder / "audio" / "a.wav"), "/abs/b.wav"]
    assert out.schema.field("agent_id").type == pa.int64()
    assert out.schema.field("call_start").type == pa.timestamp("us", tz="UTC")
    monkeypatch.chdir(tmp_path)  # a relative manifest path works too
    assert read_manifest("samples/m.parquet").column("uri")[0].as_py() == str(folder / "audio" / "a.wav")


def test_parquet_folder_glob_and_hive_keys(tmp_path):
    rows = _manifest_rows()
    (tmp_path / "ds" / "day=2024-05-01").mkdir(parents=True)
    (tmp_path / "ds" / "day=2024-05-02").mkdir(parents=True)
    pq.write_table(rows.slice(0, 1), tmp_path / "ds" / "day=2024-05-01" / "part-0.parquet")
    extra = rows.slice(1, 1).append_column("channel", pa.array(["stereo"]))
    pq.write_table(extra, tmp_path / "ds" / "day=2024-05-02" / "part-0.parquet")
    (tmp_path / "ds" / "_SUCCESS").write_bytes(b"")
    (tmp_path / "ds" / ".part-0.parquet.crc").write_bytes(b"junk")

    out = read_manifest(str(tmp_path / "ds"))
    assert sorted(out.column("id").to_pylist()) == ["00123", "00124"]
    assert out.schema.field("channel").type == pa.string()  # columns unified across files
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert by_id["00123"]["day"] == "2024-05-01" and by_id["00124"]["channel"] == "stereo"
    assert by_id["00123"]["uri"] == str(tmp_path / "ds" / "day=2024-05-01" / "audio" / "a.wav")

    globbed = read_manifest(str(tmp_path / "ds" / "*" / "*.parquet"))
    assert sorted(globbed.column("id").to_pylist()) == ["00123", "00124"]
    with pytest.raises(ManifestError, match="no files match"):
        read_manifest(str(tmp_path / "ds" / "*.csv"))


def test_csv_keeps_leading_zeros_and_infers_passthrough(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,uri,kind,language,agent_id,call_start\n"
                    "00123,audio/a.wav,audio,en,7,2024-05-01T12:30:00Z\n"
                    "00124,audio/b.wav,,no,8,2024-05-01T13:30:00Z\n")
    out = read_manifest(f"file://{path}")
    assert out.column("id").to_pylist() == ["00123", "00124"]
    assert out.column("language").to_pylist() == ["en", "no"]
    assert out.column("kind").to_pylist() == ["audio", None]
    assert out.column("uri").to_pylist() == [str(tmp_path / "audio" / "a.wav"), str(tmp_path / "audio" / "b.wav")]
    assert out.schema.field("agent_id").type == pa.int64()
    assert pa.types.is_timestamp(out.schema.field("call_start").type)

    gz = tmp_path / "m2.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_manifest(str(gz)).column("id").to_pylist() == ["00123", "00124"]


def test_jsonl_and_json_array(tmp_path):
    rows = [{"id": 1, "uri": "x/a.wav", "target_language": "de", "meta": {"queue": "billing"}},
            {"id": 2, "uri": "s3://bkt/b.wav", "target_language": None, "meta": {"queue": "sales"}}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = read_manifest(str(tmp_path / "m.jsonl"))
    assert out.column("id").to_pylist() == ["1", "2"]
    assert out.column("uri").to_pylist() == [str(tmp_path / "x" / "a.wav"), "s3://bkt/b.wav"]
    assert pa.types.is_struct(out.schema.field("meta").type)

    dated = [{"id": "2024-05-01", "uri": "a.wav"}, {"id": "2024-05-02", "uri": "b.wav"}]
    (tmp_path / "dated.json").write_text(json.dumps(dated))  # one JSON array, ids that look like dates
    assert read_manifest(str(tmp_path / "dated.json")).column("id").to_pylist() == ["2024-05-01", "2024-05-02"]
    (tmp_path / "dated.jsonl").write_text("\n".join(json.dumps(r) for r in dated))
    assert read_manifest(str(tmp_path / "dated.jsonl")).column("id").to_pylist() == ["2024-05-01", "2024-05-02"]


def test_missing_and_unreadable_manifests(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="broken.parquet: cannot be read as parquet"):
        read_manifest(str(tmp_path / "broken.parquet"))
    (tmp_path / "noid.csv").write_text("uri\na.wav\n")
    with pytest.raises(ManifestError, match="no 'id' column"):
        read_manifest(str(tmp_path / "noid.csv"))


def test_local_media_folder_is_a_manifest(tmp_path):
    (tmp_path / "calls" / "day1").mkdir(parents=True)
    (tmp_path / "calls" / "day1" / "a.wav").write_bytes(b"RIFFa")
    (tmp_path / "calls" / "b.WAV").write_bytes(b"RIFFbb")
    (tmp_path / "calls" / "scan.png").write_bytes(b"\x89PNG")
    (tmp_path / "calls" / "notes.csv").write_text("id,uri\nx,y\n")  # a manifest beside the media
    (tmp_path / "calls" / ".DS_Store").write_bytes(b"")
    out = read_manifest(str(tmp_path / "calls"))
    assert out.column("id").to_pylist() == ["b.WAV", "day1/a.wav", "scan.png"]
    assert out.column("uri").to_pylist()[1] == str(tmp_path / "calls" / "day1" / "a.wav")
    assert out.column("size_bytes").to_pylist() == [6, 5, 4]
    assert out.schema.field("modified_at").type == pa.timestamp("us", tz="UTC")

    wavs = read_manifest(str(tmp_path / "calls"), suffixes=["wav"])
    assert wavs.column("id").to_pylist() == ["b.WAV", "day1/a.wav"]
    old = datetime.now(timezone.utc) - timedelta(days=1)
    os.utime(tmp_path / "calls" / "b.WAV", (old.timestamp() - 60, old.timestamp() - 60))
    recent = read_manifest(str(tmp_path / "calls"), suffixes=[".wav"], modified_since=old)
    assert recent.column("id").to_pylist() == ["day1/a.wav"]
    with pytest.raises(ManifestError, match="no media files found.*suffixes .mp3"):
        read_manifest(str(tmp_path / "calls"), suffixes=[".mp3"])
    single = read_manifest(str(tmp_path / "calls" / "scan.png"))
    assert single.column("id").to_pylist() == ["scan.png"]


def test_manifest_format_from_name():
    assert manifest_format("a/b.PARQUET") == "parquet"
    assert manifest_format("m.csv.gz") == "csv"
    assert manifest_format("m.ndjson") == "json"
    assert manifest_format("call.wav") is None
    assert manifest_format("weights.parquet.gz") is None


def test_validate_is_idempotent_on_read_output(tmp_path):
    pacsv.write_csv(pa.table({"id": ["a"], "uri": ["a.wav"]}), tmp_path / "m.csv")
    once = read_manifest(str(tmp_path / "m.csv"))
    assert validate_manifest(once).equals(once)


def test_pandas_index_column_is_not_passed_through(tmp_path):
    import pandas as pd

    frame = pd.concat([pd.DataFrame({"id": ["a"], "uri": ["a.wav"]}), pd.DataFrame({"id": ["b"], "uri": ["b.wav"]})])
    frame.to_parquet(tmp_path / "m.parquet")  # a non-range index: stored as __index_level_0__
    assert pq.read_schema(tmp_path / "m.parquet").names[-1] == "__index_level_0__"
    assert not [c for c in read_manifest(str(tmp_path / "m.parquet")).column_names if c.startswith("__")]
