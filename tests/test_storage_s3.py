"""S3 through a local moto server: manifests, prefix listings, fetches with retries, model copies."""
from __future__ import annotations

import io
import json
import os
import pickle
import time
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipeline.model.source as model_source
from pipeline.model.source import COMPLETE_MARKER, DEFAULT_MODEL, DEFAULT_REVISION, resolve_model
from pipeline.core.errors import InputError
from pipeline.io.fetch import fetch_bytes
from pipeline.io.manifest import read_manifest
from pipeline.io.storage import StorageOptions, fsspec_filesystem, pyarrow_filesystem
from schemas.manifest import ManifestError
from tests.conftest import run_concurrently
from tests.s3server import FaultProxy, free_port

BUCKET = "calls-bkt"


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


ROWS = pa.table({"id": ["c1", "c2"], "uri": ["audio/c1.wav", "s3://other-bkt/c2.wav"],
                 "queue": pa.array([3, 4], pa.int64())})


# -- options and filesystems -------------------------------------------------------------------------

def test_options_endpoint_from_env_pickles_and_validates(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9/")
    opts = StorageOptions(endpoint_url=None)
    assert opts.endpoint_url == "http://127.0.0.1:9"
    assert StorageOptions(endpoint_url="https://minio.local").endpoint_url == "https://minio.local"
    assert pickle.loads(pickle.dumps(opts)) == opts
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        StorageOptions(endpoint_url="127.0.0.1:9000")


def test_filesystems_for_each_kind_of_uri(s3, tmp_path):
    fs, path = fsspec_filesystem(f"s3://{BUCKET}/a/b.wav", s3.options)
    assert type(fs).__name__ == "S3FileSystem" and path == f"{BUCKET}/a/b.wav"
    assert fs.client_kwargs["endpoint_url"] == s3.endpoint_url
    fs, path = fsspec_filesystem(f"file://{tmp_path}/x.wav")
    assert fs.protocol[0] == "file" and path == f"{tmp_path}/x.wav"
    pfs, path = pyarrow_filesystem(f"s3://{BUCKET}/m", s3.options)
    assert isinstance(pfs, pafs.S3FileSystem) and path == f"{BUCKET}/m"
    wrapped, _ = pyarrow_filesystem(f"s3://{BUCKET}/m", StorageOptions(profile="nightly", endpoint_url=s3.endpoint_url))
    assert isinstance(wrapped, pafs.PyFileSystem)  # the C++ client takes no named profile
    assert isinstance(pickle.loads(pickle.dumps(pfs)), pafs.S3FileSystem)


def test_pyarrow_native_s3_writes_and_reads_on_moto(s3):
    s3.create_bucket(BUCKET)
    pfs, path = pyarrow_filesystem(f"s3://{BUCKET}/manifests/m.parquet", s3.options)
    pq.write_table(ROWS, path, filesystem=pfs)
    assert pq.read_table(path, filesystem=pfs).equals(ROWS)
    out = read_manifest(f"s3://{BUCKET}/manifests/m.parquet", s3.options)
    assert out.column("uri").to_pylist() == [f"s3://{BUCKET}/manifests/audio/c1.wav", "s3://other-bkt/c2.wav"]


# -- manifests on S3 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["m/part-0.parquet", "m/", "m/*.parquet"])
def test_parquet_manifest_file_folder_glob(s3, source):
    s3.put(BUCKET, "m/part-0.parquet", _parquet_bytes(ROWS.slice(0, 1)))
    s3.put(BUCKET, "m/part-1.parquet", _parquet_bytes(ROWS.slice(1, 1)))
    s3.put(BUCKET, "m/_SUCCESS", b"")
    out = read_manifest(f"s3://{BUCKET}/{source}", s3.options)
    expected = ["c1"] if source.endswith("part-0.parquet") else ["c1", "c2"]
    assert sorted(out.column("id").to_pylist()) == expected
    assert out.schema.field("queue").type == pa.int64()
    assert out.column("uri")[0].as_py() == f"s3://{BUCKET}/m/audio/c1.wav"


def test_csv_and_jsonl_manifests(s3):
    s3.put(BUCKET, "in/m.csv", b"id,uri,language,queue\n007,audio/a.wav,en,3\n008,/mnt/b.wav,fr,4\n")
    lines = [{"id": "j1", "uri": "a.wav", "queue": 1}, {"id": "j2", "uri": "https://h/b.wav", "queue": 2}]
    s3.put(BUCKET, "in/m.jsonl", "\n".join(json.dumps(r) for r in lines).encode())
    csv = read_manifest(f"s3://{BUCKET}/in/m.csv", s3.options)
    assert csv.column("id").to_pylist() == ["007", "008"]
    assert csv.column("uri").to_pylist() == [f"s3://{BUCKET}/in/audio/a.wav", "/mnt/b.wav"]
    jsonl = read_manifest(f"s3://{BUCKET}/in/m.jsonl", s3.options)
    assert jsonl.column("uri").to_pylist() == [f"s3://{BUCKET}/in/a.wav", "https://h/b.wav"]
    assert jsonl.schema.field("queue").type == pa.int64()


def test_missing_s3_manifest(s3):
    s3.create_bucket(BUCKET)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(f"s3://{BUCKET}/nope/m.parquet", s3.options)


def test_prefix_of_media_is_a_manifest_with_filters(s3):
    s3.put(BUCKET, "incoming/2024-05-01/a.wav", b"RIFFa")
    s3.put(BUCKET, "incoming/2024-05-01/scan.PDF", b"%PDF")
    s3.put(BUCKET, "incoming/_tmp/partial.wav", b"x")  # hidden by its "_" folder
    s3.put(BUCKET, "incoming/manifest.csv", b"id,uri\n")  # never a media file
    s3.put(BUCKET, "incoming/2024-05-01/", b"")  # a "folder" made in the S3 console: not a file
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    cutoff = datetime.now(timezone.utc).replace(microsecond=0)
    time.sleep(0.1)
    s3.put(BUCKET, "incoming/2024-05-02/b.wav", b"RIFFbb")

    out = read_manifest(f"s3://{BUCKET}/incoming/", s3.options)
    assert out.column("id").to_pylist() == ["incoming/2024-05-01/a.wav", "incoming/2024-05-01/scan.PDF",
                                            "incoming/2024-05-02/b.wav"]
    assert out.column("uri")[0].as_py() == f"s3://{BUCKET}/incoming/2024-05-01/a.wav"
    assert out.column("size_bytes").to_pylist() == [5, 4, 6]
    assert out.schema.field("modified_at").type == pa.timestamp("us", tz="UTC")

    wavs = read_manifest(f"s3://{BUCKET}/incoming", s3.options, suffixes=[".wav"])
    assert wavs.column("id").to_pylist() == ["incoming/2024-05-01/a.wav", "incoming/2024-05-02/b.wav"]
    pdfs = read_manifest(f"s3://{BUCKET}/incoming/", s3.options, suffixes=["pdf"])
    assert pdfs.column("id").to_pylist() == ["incoming/2024-05-01/scan.PDF"]
    new = read_manifest(f"s3://{BUCKET}/incoming/", s3.options, suffixes=[".wav"], modified_since=cutoff)
    assert new.column("id").to_pylist() == ["incoming/2024-05-02/b.wav"]
    naive_future = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(hours=1)  # naive = UTC
    with pytest.raises(ManifestError, match="no media files found.*modified since"):
        read_manifest(f"s3://{BUCKET}/incoming/", s3.options, modified_since=naive_future)


# -- fetching ----------------------------------------------------------------------------------------

def test_fetch_bytes_from_s3_and_local(s3, tmp_path):
    uri = s3.put(BUCKET, "audio/a.wav", b"RIFF-data")
    assert fetch_bytes(uri, s3.options) == b"RIFF-data"
    (tmp_path / "b.wav").write_bytes(b"local")
    assert fetch_bytes(str(tmp_path / "b.wav"), s3.options) == b"local"
    assert fetch_bytes(f"file://{tmp_path}/b.wav", s3.options) == b"local"
    with pytest.raises(InputError, match=r"b2\.wav: not found"):
        fetch_bytes(str(tmp_path / "b2.wav"), s3.options)


def test_fetch_not_found_is_not_retried(s3):
    s3.create_bucket(BUCKET)
    with FaultProxy(s3.endpoint_url) as proxy:
        with pytest.raises(InputError) as err:
            fetch_bytes(f"s3://{BUCKET}/audio/missing.wav", proxy.options, attempts=4, base_delay_s=0.01)
        assert str(err.value) == f"s3://{BUCKET}/audio/missing.wav: not found"
        assert proxy.count("GET") + proxy.count("HEAD") <= 2  # one look, no retries
    with pytest.raises(InputError, match=r"s3://no-such-bkt/k\.wav: not found"):
        fetch_bytes("s3://no-such-bkt/k.wav", s3.options)


def test_fetch_retries_throttling_then_succeeds(s3):
    uri = s3.put(BUCKET, "audio/a.wav", b"RIFF-data")
    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.fail_next(2, status=503, code="SlowDown")
        assert fetch_bytes(uri, proxy.options, attempts=4, base_delay_s=0.01) == b"RIFF-data"
        assert proxy.count("GET") == 3


def test_fetch_gives_up_with_the_cause(s3):
    uri = s3.put(BUCKET, "audio/a.wav", b"RIFF-data")
    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.fail_always(status=503, code="SlowDown")
        with pytest.raises(InputError) as err:
            fetch_bytes(uri, proxy.options, attempts=3, base_delay_s=0.01)
        assert str(err.value) == f"{uri}: still failing after 3 attempts (SlowDown)"
        assert proxy.count("GET") == 3


def test_fetch_permission_denied_is_not_retried(s3):
    uri = s3.put(BUCKET, "audio/a.wav", b"RIFF-data")
    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.fail_always(status=403, code="AccessDenied", message="Access Denied", method=None)
        with pytest.raises(InputError) as err:
            fetch_bytes(uri, proxy.options, attempts=4, base_delay_s=0.01)
        assert str(err.value) == f"{uri}: permission denied"
        assert len(proxy.requests) == 1


def test_fetch_client_level_retries_come_from_options(s3):
    """`StorageOptions.retries` reaches botocore: one fetch attempt survives two throttled requests."""
    uri = s3.put(BUCKET, "audio/a.wav", b"RIFF-data")
    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.fail_next(2, status=503, code="SlowDown")
        options = proxy.options.model_copy(update={"retries": 2})
        assert fetch_bytes(uri, options, attempts=1) == b"RIFF-data"
        assert proxy.count("GET") == 3


def test_fetch_unreachable_endpoint_is_transient():
    options = StorageOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", retries=0,
                             connect_timeout_s=1)
    with pytest.raises(InputError, match=r"s3://bkt-x/a\.wav: still failing after 2 attempts"):
        fetch_bytes("s3://bkt-x/a.wav", options, attempts=2, base_delay_s=0.01)


# -- model copies ------------------------------------------------------------------------------------

def test_resolve_model_copies_s3_prefix_once(s3, tmp_path, monkeypatch):
    s3.put(BUCKET, "models/tiny/config.json", b'{"a": 1}')
    s3.put(BUCKET, "models/tiny/weights/model.safetensors", b"\0" * 1000)
    s3.put(BUCKET, "models/tiny/weights/", b"")  # a directory marker
    s3.put(BUCKET, "models/tiny-v2/config.json", b"{}")  # a sibling prefix, not part of the model
    calls = []
    real_download = model_source._download

    def counting_download(uri, dest, options, processor_only=False):
        calls.append(uri)
        time.sleep(0.3)  # both callers are inside resolve_model at once
        return real_download(uri, dest, options, processor_only)

    monkeypatch.setattr(model_source, "_download", counting_download)
    cache = tmp_path / "cache"
    cache.mkdir()
    results, errors = run_concurrently(
        lambda: resolve_model(f"s3://{BUCKET}/models/tiny/", cache_dir=str(cache), options=s3.options))
    assert not errors and len(calls) == 1 and len(set(results)) == 1
    folder = results[0]
    assert sorted(os.listdir(folder)) == sorted([COMPLETE_MARKER, "config.json", "weights"])
    assert os.path.getsize(os.path.join(folder, "weights", "model.safetensors")) == 1000
    assert json.loads(open(os.path.join(folder, COMPLETE_MARKER)).read())["files"]["config.json"] == 8
    assert not [e for e in os.listdir(cache) if ".tmp-" in e]

    # completed marker: later calls copy nothing; without it, the folder is copied again
    assert resolve_model(f"s3://{BUCKET}/models/tiny", cache_dir=str(cache), options=s3.options) == folder
    assert len(calls) == 1
    os.remove(os.path.join(folder, COMPLETE_MARKER))
    os.makedirs(os.path.join(str(cache), os.path.basename(folder) + ".tmp-999-dead"))
    assert resolve_model(f"s3://{BUCKET}/models/tiny", cache_dir=str(cache), options=s3.options) == folder
    assert len(calls) == 2 and os.path.exists(os.path.join(folder, COMPLETE_MARKER))
    assert not [e for e in os.listdir(cache) if ".tmp-" in e]


def test_resolve_model_local_and_hub(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path), revision=None, cache_dir=None, options=None) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        resolve_model(str(tmp_path / "absent"))
    seen = {}

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, local_files_only=False,
                               ignore_patterns=None):
        seen.update(repo_id=repo_id, revision=revision, local_files_only=local_files_only)
        seen["skips_weights"] = bool(ignore_patterns) and "*.safetensors" in ignore_patterns
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(DEFAULT_MODEL) == str(tmp_path)
    assert seen == {"repo_id": DEFAULT_MODEL, "revision": DEFAULT_REVISION, "local_files_only": True,
                    "skips_weights": False}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    resolve_model("someone/other-model", revision="main")
    assert seen == {"repo_id": "someone/other-model", "revision": "main", "local_files_only": False,
                    "skips_weights": False}
    resolve_model("someone/other-model", revision="main", processor_only=True)  # CPU stages: no weights
    assert seen["skips_weights"] is True


def test_resolve_model_empty_prefix(s3, tmp_path):
    s3.create_bucket(BUCKET)
    with pytest.raises(FileNotFoundError, match="no objects under this prefix"):
        resolve_model(f"s3://{BUCKET}/models/none", cache_dir=str(tmp_path), options=s3.options)


def test_missing_bucket_is_a_missing_manifest(s3):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest("s3://no-such-bkt/m.parquet", s3.options)
