"""Node loss mid-run: a worker node holding a speech (GPU-stage) replica and prepared blocks is removed
while its calls are in flight (tests/node_loss_driver.py, a head and two worker nodes of a
`ray.cluster_utils.Cluster`, in a process of its own). The job finishes with every row exactly once.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import SAMPLES, job_subprocess_env, kill_session, read_output

N_INPUTS = 8


@pytest.mark.realsize
def test_losing_a_worker_node_mid_run_keeps_every_row_once(tiny_model, tmp_path):
    clips = sorted((SAMPLES / "audio").glob("call_000*"))
    manifest = tmp_path / "calls.csv"
    pd.DataFrame({"id": [f"call_{i:02d}" for i in range(N_INPUTS)],
                  "uri": [str(clips[i % len(clips)]) for i in range(N_INPUTS)], "language": "en"}
                 ).to_csv(manifest, index=False)
    out, report = tmp_path / "out", tmp_path / "report.json"
    env, ray_tmp = job_subprocess_env("rn")
    log = tmp_path / "driver.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "tests.node_loss_driver", str(manifest), str(out),
                                     tiny_model, str(report)], cwd=tmp_path, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=420)
        finally:
            kill_session(proc.pid)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    tail = log.read_text(errors="replace")[-3000:]
    assert rc == 0, tail
    done = json.loads(report.read_text())
    assert done["removed"] is not None, f"no worker node was removed:\n{tail}"
    assert done["removed"]["speech_actors_on_it"] >= 1 and done["removed"]["speech_rows_in_flight"] >= 1
    assert done.get("replaced"), f"the replacement node was not added:\n{tail}"

    rows = read_output(out).to_pandas()
    assert len(rows) == N_INPUTS and sorted(rows.id) == [f"call_{i:02d}" for i in range(N_INPUTS)]
    assert (rows.status == "ok").all(), rows[rows.status != "ok"][["id", "error"]]
    record = json.loads((out / "_runs" / "node-loss.json").read_text())
    assert record["counts"] == {"asr": {"ok": N_INPUTS, "error": 0}}
