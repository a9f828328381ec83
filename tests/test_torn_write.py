"""A torn Parquet file from a real kill during the write, then `--resume`.

The job (`python -m jobs.transcribe`, its own local Ray) writes its result files slowly (the test-only
`benchmark.write_delay_s`: every write call of a local result file sleeps first), and is SIGKILLed with
all its processes while a file is half written: a file with Parquet's header and no footer. The resumed
run removes it and ends with every row exactly once, readable by pyarrow and DuckDB.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SAMPLES, job_subprocess_env, kill_session, read_output

N_INPUTS = 6


def _whole(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except (pa.ArrowInvalid, OSError):
        return False


def _torn(path: Path) -> bool:
    return not _whole(path) and path.exists() and path.stat().st_size > 0


@pytest.mark.realsize
def test_kill_during_the_write_leaves_a_torn_file_that_resume_replaces(tiny_model, run_job, tmp_path):
    clips = sorted((SAMPLES / "audio").glob("call_000*"))
    ids = [f"call_{i:02d}" for i in range(N_INPUTS)]
    manifest = tmp_path / "calls.csv"
    pd.DataFrame({"id": ids, "uri": [str(clips[i % len(clips)]) for i in range(N_INPUTS)], "language": "en"}
                 ).to_csv(manifest, index=False)
    out = tmp_path / "out"
    slow = tmp_path / "slow.yaml"
    slow.write_text("batching:\n  rows_per_call: 2\nbenchmark:\n  write_delay_s: 0.5\n")
    env, ray_tmp = job_subprocess_env("rt")

    log = tmp_path / "first.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "jobs.transcribe", str(manifest), str(out), "--model",
                                     tiny_model, "--max-new-tokens", "6", "--run-id", "first", "--config", str(slow)],
                                    cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        torn = []
        try:
            limit = time.monotonic() + 240
            while time.monotonic() < limit and proc.poll() is None and not torn:
                torn = [p for p in out.rglob("*.parquet") if "_runs" not in p.parts and _torn(p)]
                time.sleep(0.05)
            assert torn, f"no half-written file seen (rc {proc.poll()}):\n{log.read_text()[-3000:]}"
        finally:
            left = kill_session(proc.pid)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL and not left
        assert not (out / "_runs" / "first.json").exists()
        assert any(_torn(p) for p in torn), "the kill did not leave the file torn"
        # whole files only: a file just opened (0 bytes) at the kill is neither torn nor landed
        landed = {p for p in out.rglob("*.parquet") if "_runs" not in p.parts and _whole(p)}

    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # the resumed run, on the test session's Ray (one Ray start less)
    assert run_job("transcribe", manifest, out, "--max-new-tokens", "6", "--run-id", "second", "--resume") == 0

    assert not [p for p in torn if p.exists()], "the torn file was not removed"
    # files that landed whole are kept: resume redoes what is missing, not the whole run (seen once in a
    # full-suite run on a loaded machine: one whole file's rows redone and superseded, still exactly once)
    assert not landed or any(p.exists() for p in landed), sorted(str(p) for p in landed)
    rows = read_output(out).to_pandas()  # no exclude_invalid_files: a torn file would fail here
    assert sorted(rows.id) == ids and not rows.duplicated(["id", "task"]).any()
    assert (rows.status == "ok").all(), rows[rows.status != "ok"][["id", "error"]]
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/**/*.parquet', hive_partitioning=true)").fetchall()[0][0]
    assert n == N_INPUTS
