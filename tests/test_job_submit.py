"""`ray job submit` to a real local Ray head, exactly as the nightly job is submitted to a cluster.

    ray start --head ...   (its own ports, temp dir and auth token: nothing shared with the test session)
    ray job submit --address http://127.0.0.1:<dashboard> --working-dir <repo> --runtime-env runtime_env.yaml \
        -- python -m jobs.transcribe <manifest> <out> --model <tiny> --gpus-per-replica 0

The head is stopped by killing the processes it started, never with `ray stop`: that command stops
every Ray on the machine, including the one this test session runs its in-process jobs on. `ray start`
runs in a session of its own (start_new_session), and every process of that Ray (gcs, raylet,
dashboard, agents, workers, the job supervisor) stays in it; the job's driver gets a session of its
own from Ray's job supervisor, with a watcher that kills it when the supervisor dies.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, SAMPLES, kill_session, read_output
from tests.s3server import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def _head_logs(ray_tmp: str, tail: int = 1500) -> str:
    """The end of the head's own logs (raylet, gcs), for a head that did not come up."""
    logs = Path(ray_tmp) / "session_latest" / "logs"
    parts = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        path = logs / name
        if path.exists():
            parts.append(f"\n--- {name} ---\n" + path.read_text(errors="replace")[-tail:])
    return "".join(parts)


@pytest.mark.realsize
def test_job_submit_to_a_local_head(tiny_model, tmp_path):
    if shutil.which(RAY) is None:
        pytest.skip(f"no ray command next to {sys.executable}")
    pytest.importorskip("aiohttp_cors", reason="the job server needs ray[default]")

    manifest = tmp_path / "calls.csv"
    calls = pd.read_csv(SAMPLES / "transcribe.csv").head(2)
    calls["uri"] = [str(SAMPLES / u) for u in calls.uri]
    calls.to_csv(manifest, index=False)
    out = tmp_path / "out"

    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port", "ray-client-server-port")}
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are limited to 107 chars
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        # `python` in the job's entrypoint must be this environment's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # Ray 2.60 turns token auth on for a new head; this test's own token, not ~/.ray/auth_token
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        # on a busy 2-core machine the raylet can take longer than the default 30 s to register
        "RAY_raylet_start_wait_time_s": "120",
    })
    start = [RAY, "start", "--head", "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--temp-dir={ray_tmp}", "--disable-usage-stats",
             *(f"--{name}={port}" for name, port in ports.items())]
    head = subprocess.Popen(start, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = head.communicate(timeout=180)
        assert head.returncode == 0, log[-3000:] + _head_logs(ray_tmp)
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
                  "--runtime-env", str(REPO / "runtime_env.yaml"), "--submission-id", "nightly-test", "--",
                  "python", "-m", "jobs.transcribe", str(manifest), str(out), "--model", tiny_model,
                  "--max-new-tokens", "8", "--gpus-per-replica", "0", "--run-id", "submitted"]
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "Job 'nightly-test' succeeded" in job.stdout, job.stdout[-3000:]
        # the driver ran on the cluster (RAY_ADDRESS set by the job server), from the uploaded working dir
        assert '"run_id": "submitted"' in job.stdout
        # the job's console (`ray job logs`) carries none of the library lines a user cannot act on
        # (jobs/console.py): Ray Data's actor-argument C++ line, transformers' LongRoPE warning, plan lines
        noise = [line for line in job.stdout.splitlines() if any(
            mark in line for mark in ("core_worker.cc", "rope_parameters", "Execution plan", "Traceback",
                                      "Progress bars disabled", "Token authentication"))]
        assert not noise, noise
        assert "phi4mm: progress" in job.stdout
    finally:
        left = kill_session(head.pid, term_first_s=3.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the test's Ray head still alive: {left}"

    rows = read_output(out).to_pandas()
    assert sorted(rows.id) == sorted(calls.id) and set(rows.task) == {"asr"}
    assert (rows.status == "ok").all(), rows.error.tolist()
    assert (rows.run_id == "submitted").all() and rows.text.str.len().gt(0).all()
    record = json.loads((out / "_runs" / "submitted.json").read_text())
    assert record["counts"] == {"asr": {"ok": 2, "error": 0}}
