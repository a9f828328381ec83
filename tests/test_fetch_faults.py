"""Reads that block or reach where they should not: FIFOs, stalled storage, silent endpoints, and the
operator's rules for what a manifest may make a worker read. Every test is bounded by a deadline of a
second or two: on the code before these rules, each of the blocking ones hung forever."""
from __future__ import annotations

import os
import socket
import threading
import time

import fsspec
import pyarrow as pa
import pytest
from fsspec.spec import AbstractFileSystem

from pipeline.core.errors import InputError
from pipeline.io.fetch import check_allowed, fetch_bytes, start_fetch
from pipeline.stages.prepare_audio import PrepareAudio
from pipeline.context import RunContext
from pipeline.io.storage import StorageOptions
from schemas.config import InputsConfig, JobConfig
from schemas.manifest import validate_manifest
from tests.conftest import SAMPLES
from tests.s3server import FAKE_AWS_ENV

RELEASE = threading.Event()  # set at the end of the module: stalled reads left behind then finish


class StallFileSystem(AbstractFileSystem):
    """`stall://...`: a storage whose every read blocks (a stalled NFS/FUSE mount, a hung client)."""

    protocol = "stall"

    def cat_file(self, path, start=None, end=None, **kwargs):
        RELEASE.wait(60)
        return b"too late"


fsspec.register_implementation("stall", StallFileSystem, clobber=True)


@pytest.fixture(scope="module", autouse=True)
def _release_stalled_reads():
    yield
    RELEASE.set()


@pytest.fixture
def silent_server():
    """A TCP server that accepts every connection and never sends a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def fifo(tmp_path) -> str:
    path = str(tmp_path / "call.wav")
    os.mkfifo(path)
    return path


# -- local paths must be regular files ---------------------------------------------------------------

def test_fifo_is_refused_without_being_opened(tmp_path):
    path = fifo(tmp_path)
    started = time.monotonic()
    with pytest.raises(InputError) as err:
        fetch_bytes(path, timeout_s=5)
    assert str(err.value) == (f"{path}: is a FIFO (named pipe), not a regular file, so it is never opened "
                              "(a read could block forever)")
    assert time.monotonic() - started < 2  # refused, not timed out


def test_device_and_directory_are_refused(tmp_path):
    with pytest.raises(InputError, match="is a character device, not a regular file"):
        fetch_bytes("/dev/zero", timeout_s=5)  # no rules: the regular-file check holds anyway
    with pytest.raises(InputError, match="is a directory, not a file"):
        fetch_bytes(str(tmp_path), timeout_s=5)


# -- every fetch has a deadline ----------------------------------------------------------------------

def test_stalled_storage_becomes_an_error_at_the_deadline():
    started = time.monotonic()
    with pytest.raises(InputError) as err:
        fetch_bytes("stall://mount/call.wav", timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert "stall://mount/call.wav: no answer within 0.5 s" in str(err.value)
    assert "inputs.fetch_timeout_s" in str(err.value)
    assert 0.4 < elapsed < 2


def test_stalled_fetches_wait_side_by_side():
    """Four stalled reads started together cost one timeout, not four."""
    started = time.monotonic()
    pending = [start_fetch(f"stall://mount/{i}.wav", timeout_s=0.6) for i in range(4)]
    errors = []
    for p in pending:
        with pytest.raises(InputError, match="no answer within 0.6 s") as err:
            p.result()
        errors.append(err)
    assert len(errors) == 4 and time.monotonic() - started < 1.5


def test_http_endpoint_that_never_answers_times_out(silent_server):
    options = StorageOptions(connect_timeout_s=0.3, read_timeout_s=0.3)
    rules = InputsConfig(allowed_schemes=["http"], connect_timeout_s=0.3, read_timeout_s=0.3, fetch_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(InputError) as err:
        fetch_bytes(f"http://{silent_server}/a.wav", options, attempts=2, base_delay_s=0.01, timeout_s=2,
                    rules=rules)
    assert str(err.value).startswith(f"http://{silent_server}/a.wav: ")
    assert ("still failing after" in str(err.value)) or ("no answer within" in str(err.value))
    assert time.monotonic() - started < 4


def test_s3_endpoint_that_never_answers_times_out(silent_server, monkeypatch):
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    options = StorageOptions(endpoint_url=f"http://{silent_server}", region="us-east-1", retries=0,
                             connect_timeout_s=0.3, read_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"^s3://bkt-silent/a\.wav: (still failing after|no answer within)"):
        fetch_bytes("s3://bkt-silent/a.wav", options, attempts=3, base_delay_s=0.01, timeout_s=2)
    assert time.monotonic() - started < 4


# -- PrepareAudio: one row's stall is that row's error, never the batch's --------------------------------

def _context(tiny_model: str, **inputs) -> RunContext:
    config = JobConfig(job="transcribe", input="m.csv", output="out", model={"source": tiny_model},
                       inputs=inputs)
    return RunContext.for_tests(config, pa.schema([]))


def test_prepare_writes_every_row_beside_a_fifo_and_a_stalled_read(tiny_model, tmp_path):
    good = str(SAMPLES / "audio" / "call_0001.wav")
    manifest = validate_manifest(pa.Table.from_pylist([
        {"id": "good", "uri": good},
        {"id": "pipe", "uri": fifo(tmp_path)},
        {"id": "stalled", "uri": "stall://mount/call.wav"},
        {"id": "stalled2", "uri": "stall://mount/call2.wav"},
        {"id": "also_good", "uri": good},
    ]))
    stage = PrepareAudio(_context(tiny_model, allowed_schemes=["file", "stall"], fetch_timeout_s=1,
                                 connect_timeout_s=0.5))
    started = time.monotonic()
    out = stage(manifest)
    assert time.monotonic() - started < 20  # the two stalls overlap: about 1 s of waiting, plus decoding
    rows = {r["id"]: r for r in out.to_pylist()}
    assert sorted(rows) == sorted(manifest.column("id").to_pylist())  # one asr row per input, none lost
    assert out.num_rows == manifest.num_rows
    assert rows["good"]["error"] is None and rows["also_good"]["error"] is None
    assert "is a FIFO (named pipe), not a regular file" in rows["pipe"]["error"]
    assert "no answer within 1 s" in rows["stalled"]["error"]
    assert "no answer within 1 s" in rows["stalled2"]["error"]
    assert stage.counters["bad_inputs"] == 3


# -- what a manifest may make a worker read ------------------------------------------------------------

def test_default_rules_allow_local_and_object_stores_but_not_http(tmp_path):
    rules = InputsConfig()
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    check_allowed(str(tmp_path / "a.wav"), rules)
    check_allowed("s3://calls-in/a.wav", rules)
    check_allowed("gs://calls-in/a.wav", rules)
    with pytest.raises(InputError) as err:
        fetch_bytes("http://10.0.0.5/admin/export.wav", rules=rules, timeout_s=5)
    assert str(err.value) == ("http://10.0.0.5/admin/export.wav: uri scheme 'http' is not allowed "
                              "(inputs.allowed_schemes: file, s3, s3a, gs, gcs)")
    with pytest.raises(InputError, match="uri scheme 'memory' is not allowed"):
        check_allowed("memory://x/a.wav", rules)


def test_system_paths_are_never_inputs():
    with pytest.raises(InputError, match=r"^/proc/self/environ: is a system path \(under /proc\)"):
        fetch_bytes("/proc/self/environ", rules=InputsConfig(), timeout_s=5)


def test_allowed_prefixes_confine_local_and_s3_uris(tmp_path):
    inside = tmp_path / "calls"
    inside.mkdir()
    (inside / "a.wav").write_bytes(b"RIFF-a")
    (tmp_path / "secret.wav").write_bytes(b"RIFF-secret")
    os.symlink(tmp_path / "secret.wav", inside / "link.wav")
    rules = InputsConfig(allowed_prefixes=[str(inside), "s3://calls-in/incoming/"])

    assert fetch_bytes(str(inside / "a.wav"), rules=rules, timeout_s=5) == b"RIFF-a"
    assert fetch_bytes(f"file://{inside}/a.wav", rules=rules, timeout_s=5) == b"RIFF-a"
    check_allowed("s3://calls-in/incoming/2024/a.wav", rules)
    check_allowed("s3a://calls-in/incoming/a.wav", rules)
    outside = [str(tmp_path / "secret.wav"), str(inside / "link.wav"), f"{inside}/../secret.wav",
               "/etc/passwd", "s3://calls-in/other/a.wav", "s3://calls-in-2/incoming/a.wav"]
    for uri in outside:
        with pytest.raises(InputError, match=r"is outside the allowed locations \(inputs.allowed_prefixes: "):
            fetch_bytes(uri, rules=rules, timeout_s=5)
    with pytest.raises(InputError, match="has '.' or '..' path segments"):
        check_allowed("s3://calls-in/incoming/../secrets/a.wav", rules)


def test_rules_are_validated():
    with pytest.raises(ValueError, match="not a uri scheme"):
        InputsConfig(allowed_schemes=["s3", "bad scheme"])
    with pytest.raises(ValueError, match="empty prefix would allow everything"):
        InputsConfig(allowed_prefixes=[""])
    with pytest.raises(ValueError, match="'calls-in/x' is a relative path; give a bucket as s3://calls-in/x"):
        InputsConfig(allowed_prefixes=["calls-in/x"])
    with pytest.raises(ValueError, match="shorter than connect_timeout_s"):
        InputsConfig(fetch_timeout_s=1, connect_timeout_s=5)
    assert InputsConfig(allowed_schemes=["S3://", "file"]).allowed_schemes == ["s3", "file"]


# -- messages ------------------------------------------------------------------------------------------

def test_file_uri_is_percent_decoded(tmp_path):
    (tmp_path / "my call.wav").write_bytes(b"RIFF-space")
    assert fetch_bytes(f"file://{tmp_path}/my%20call.wav", timeout_s=5) == b"RIFF-space"
    assert fetch_bytes(f"file://localhost{tmp_path}/my%20call.wav", timeout_s=5) == b"RIFF-space"
    (tmp_path / "50%20off.wav").write_bytes(b"RIFF-literal")  # a plain path is taken literally
    assert fetch_bytes(str(tmp_path / "50%20off.wav"), timeout_s=5) == b"RIFF-literal"


# -- the whole job: every row written, the blocking ones as errors ---------------------------------------

@pytest.mark.realsize
def test_job_with_a_fifo_and_forbidden_uris_writes_every_row(run_job, samples_copy, tmp_path):
    import pandas as pd

    from tests.conftest import read_output

    good = pd.read_csv(samples_copy / "transcribe.csv").head(2)
    fifo_path = fifo(samples_copy)
    extra = pd.DataFrame([{"id": "pipe", "uri": fifo_path}, {"id": "web", "uri": "http://10.0.0.5/a.wav"},
                          {"id": "system", "uri": "/proc/self/environ"}])
    manifest = samples_copy / "faults.csv"
    pd.concat([good, extra]).to_csv(manifest, index=False)
    started = time.monotonic()
    assert run_job("transcribe", manifest, tmp_path / "out", "--max-new-tokens", "4") == 0
    assert time.monotonic() - started < 240  # it used to wait forever on the FIFO
    rows = read_output(tmp_path / "out").to_pandas().set_index("id")
    assert sorted(rows.index) == sorted([*good.id, *extra.id])  # one asr row per input, none lost
    assert (rows.loc[list(good.id)].status == "ok").all()
    assert "not a regular file" in rows.loc["pipe"].error
    assert "uri scheme 'http' is not allowed" in rows.loc["web"].error
    assert "is a system path (under /proc)" in rows.loc["system"].error
