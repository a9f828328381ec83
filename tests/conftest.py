"""Shared fixtures: the tiny offline checkpoint, one local Ray for the session, and job runners."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from PIL import Image

import pyarrow.dataset as pads
import pytest

from bench.host_memory import PeakMemory, proc_stats, tree_pss_bytes  # noqa: F401 - the tests' process probes

pytest_plugins = ["tests.s3server"]

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
MAX_NEW = "12"  # new tokens per item in the CPU tests: enough to compare texts, quick on the tiny model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# fixtures that make a test real-size (a Ray of its own, a job as a separate command with its memory measured)
REALSIZE_FIXTURES = {"run_job_alone"}


def pytest_collection_modifyitems(config, items):
    """A test that runs a job as a command of its own belongs to the real-size tier: refuse it unmarked."""
    unmarked = [item.nodeid for item in items
                if REALSIZE_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("realsize")]
    if unmarked:
        raise pytest.UsageError("tests using run_job_alone must be marked realsize: " + ", ".join(unmarked))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from actors.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-phi4mm"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from tests.s3server import FAKE_AWS_ENV

    if not ray.is_initialized():
        # The workers' environment is fixed here, once for the session: variables the driver sets later
        # (the `s3_server` fixture sets fake credentials when a test first asks for it) never reach them.
        # So the workers get the fake AWS settings from the start: botocore and pyarrow's S3 client need
        # some credentials to sign requests to the local moto server, and they keep every worker away
        # from real AWS accounts (no profile files, no instance metadata).
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **FAKE_AWS_ENV}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def run_job(ray_session, tiny_model):
    """Run `phi4mm <job> ...` in this process (sharing the session's Ray) and return its exit code."""
    from jobs.cli import main

    def run(job: str, manifest, output, *args: str, model: str | None = None) -> int:
        return main([job, str(manifest), str(output), "--model", model or tiny_model, *args])

    return run


def job_subprocess_env(prefix: str) -> tuple[dict, str]:
    """(environment, Ray temp folder) for a job run as a subprocess with a Ray of its own: the project on
    PYTHONPATH, offline, no RAY_ADDRESS, and a short temp folder (Ray's socket paths must stay short).
    The caller removes the folder."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", RAY_TMPDIR=ray_tmp)
    return env, ray_tmp


@pytest.fixture
def run_job_alone(tiny_model, tmp_path):
    """Run `phi4mm <job> ...` as a user does: a command of its own that starts its own local Ray, in a
    session of its own, its memory (PSS of every process of that session: driver, gcs, raylet, object
    store, workers) sampled while it runs. Returns (exit code, peak PSS in bytes, the console's text).
    Measuring a job inside the test session would count this pytest process and the session Ray's idle
    workers, which grow with the tests run before it. The peak's largest processes are printed."""
    import subprocess
    import sys

    def run(job: str, manifest, output, *args: str, timeout_s: float = 900) -> tuple[int, int, str]:
        env, ray_tmp = job_subprocess_env("rm")
        log = tmp_path / f"{job}.log"
        try:
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", job, str(manifest), str(output),
                                         "--model", tiny_model, *args], cwd=tmp_path, env=env, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    with PeakMemory(session=proc.pid) as memory:
                        proc.wait(timeout=timeout_s)
                finally:
                    kill_session(proc.pid)
                    proc.wait(timeout=10)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        print(f"{job}: peak PSS {memory.peak / 1e9:.2f} GB; at the peak: {memory.breakdown()}")
        return proc.returncode, memory.peak, log.read_text()

    return run


def run_concurrently(fn, n: int = 2) -> tuple[list, list[BaseException]]:
    """Call `fn()` from `n` threads at once: (its results, the exceptions raised)."""
    import threading

    results, errors = [], []

    def call():
        try:
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of the session `sid`.

    A command started with `start_new_session=True` leads a session of its own, and everything a Ray it
    starts runs (gcs, raylet, dashboard, agents, workers) stays in that session. Process groups are not
    enough: Ray puts every worker in a process group of its own, so `killpg` leaves the workers behind.
    """
    return [pid for pid, fields in proc_stats() if int(fields[3]) == sid and fields[0] != "Z"]


def kill_session(sid: int, *, term_first_s: float = 0.0, timeout_s: float = 20.0) -> list[int]:
    """Signal every process of session `sid` until none is left (SIGTERM for `term_first_s` seconds
    first when given, then SIGKILL); returns the pids still alive at the deadline."""
    import signal
    import time

    for sig, wait_s in ((signal.SIGTERM, term_first_s), (signal.SIGKILL, timeout_s)):
        deadline = time.monotonic() + wait_s
        while (pids := session_processes(sid)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
    return session_processes(sid)


def read_output(output) -> "pyarrow.Table":  # noqa: F821
    return pads.dataset(str(output), format="parquet", partitioning="hive",
                        ignore_prefixes=["_", "."]).to_table()


def copy_samples(dst: Path) -> Path:
    """The shipped samples in a scratch folder (tests may add broken inputs beside them)."""
    shutil.copytree(SAMPLES, dst, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dst


@pytest.fixture
def samples_copy(tmp_path) -> Path:
    return copy_samples(tmp_path / "samples")


def _wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def add_bad_audio_rows(folder: Path) -> list[dict]:
    """Inputs a nightly batch really meets: a missing file, junk bytes, silence, an empty file, an image."""
    (folder / "bad").mkdir()
    (folder / "bad" / "junk.wav").write_bytes(b"RIFF....not really a wave file" * 10)
    (folder / "bad" / "silent.wav").write_bytes(_wav_bytes(np.zeros(16000 * 2, dtype=np.float32)))
    (folder / "bad" / "empty.wav").write_bytes(_wav_bytes(np.zeros(0, dtype=np.float32)))
    Image.new("RGB", (64, 64), "white").save(folder / "bad" / "scan.png")
    return [
        {"id": "missing", "uri": "bad/does_not_exist.wav", "language": "en", "customer_segment": "x"},
        {"id": "junk", "uri": "bad/junk.wav", "language": "en", "customer_segment": "x"},
        {"id": "silent", "uri": "bad/silent.wav", "language": "en", "customer_segment": "x"},
        {"id": "empty", "uri": "bad/empty.wav", "language": "en", "customer_segment": "x"},
        {"id": "image", "uri": "bad/scan.png", "language": "en", "customer_segment": "x"},
    ]


def _png_header_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims a huge canvas (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def transcribe_run(run_job, tmp_path_factory):
    """The shipped calls plus broken inputs, transcribed, translated to fr and de, and summarised."""
    samples = copy_samples(tmp_path_factory.mktemp("transcribe") / "samples")
    good = pd.read_csv(samples / "transcribe.csv")
    bad = pd.DataFrame(add_bad_audio_rows(samples))
    manifest = samples / "with_bad.csv"
    pd.concat([good, bad]).to_csv(manifest, index=False)
    out = samples.parent / "out"
    console = io.StringIO()  # what a person sees: tests/test_progress.py reads the progress lines
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(console):
        env.setenv("PHI4MM_PROGRESS_EVERY_S", "1")
        rc = run_job("transcribe", manifest, out, "--translate-to", "fr", "--translate-to", "de", "--summarize",
                     "--max-new-tokens", MAX_NEW, "--run-id", "e2e-transcribe")
    (samples.parent / "console.txt").write_text(console.getvalue())
    assert rc == 0, console.getvalue()[-3000:]
    return samples, good, bad, out


# the shipped meeting (196 s, 7 chunks) travels in parts of 2 chunks: 4 parts, so the fast tier takes the
# long recordings' path (cut by PrepareAudio, features by BuildChunkFeatures, regrouped) that an hour takes
MEETING_PART_CHUNKS = 2


@pytest.fixture(scope="session")
def meetings_run(run_job, tmp_path_factory):
    samples = copy_samples(tmp_path_factory.mktemp("meetings") / "samples")
    out = samples.parent / "out"
    config = samples.parent / "parts.yaml"
    config.write_text(f"audio:\n  part_chunks: {MEETING_PART_CHUNKS}\n")
    assert run_job("meetings", samples / "meetings.jsonl", out, "--max-new-tokens", MAX_NEW, "--config", str(config),
                   "--run-id", "e2e-meetings") == 0
    return samples, out


@pytest.fixture(scope="session")
def ocr_run(run_job, tmp_path_factory):
    samples = copy_samples(tmp_path_factory.mktemp("ocr") / "samples")
    manifest = pd.read_csv(samples / "ocr.csv")
    (samples / "bad").mkdir()
    (samples / "bad" / "bomb.png").write_bytes(_png_header_claiming(60000, 60000))
    (samples / "bad" / "truncated.pdf").write_bytes((samples / "docs" / "packet.pdf").read_bytes()[:300])
    extra = pd.DataFrame([
        {"id": "audio_given", "uri": "audio/call_0001.wav", "archive_box": "B-999"},
        {"id": "bomb", "uri": "bad/bomb.png", "archive_box": "B-999"},
        {"id": "truncated_pdf", "uri": "bad/truncated.pdf", "archive_box": "B-999"},
    ])
    path = samples / "ocr_with_bad.parquet"
    pd.concat([manifest, extra]).to_parquet(path)
    out = samples.parent / "out"
    assert run_job("ocr", path, out, "--max-new-tokens", MAX_NEW, "--dynamic-hd", "4") == 0
    return samples, manifest, extra, out
