"""A run whose progress stops for `resources.stall_timeout_s` stops, with one `phi4mm:` line naming the
stage that holds the work and what it waits for; what was written stays, and `--resume` finishes the run.

The stall is one a cluster really meets: a GPU replica that no node can hold (it asks for a GPU type the
cluster has none of, as after a lost GPU node that no autoscaler replaces)."""
from __future__ import annotations

import json

import pytest

from jobs.stall import stall_reason
from pipeline.core.stage import StageResources
from tests.conftest import read_output

NEW = "8"


def write_manifest(path, ids):
    with open(path, "w") as f:
        for i in ids:
            f.write(json.dumps({"id": i, "prompt": f"Say something about {i}."}) + "\n")


@pytest.mark.realsize
def test_a_replica_no_node_can_hold_stops_the_run_and_resume_finishes_it(run_job, ray_session, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "out"
    write_manifest(tmp_path / "first.jsonl", ["a", "b"])
    assert run_job("prompt", tmp_path / "first.jsonl", out, "--max-new-tokens", NEW, "--run-id", "first") == 0
    written = sorted(p.name for p in out.rglob("*.parquet"))
    capsys.readouterr()

    # the nightly run joins "a cluster" (RAY_ADDRESS: its pools ask for the GPUs the config says, as on an
    # autoscaling cluster) whose nodes have no H200: the text pool's replica can never be placed
    monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)
    (tmp_path / "job.yaml").write_text("resources: {stall_timeout_s: 10}\n")
    write_manifest(tmp_path / "all.jsonl", ["a", "b", "c", "d"])
    rc = run_job("prompt", tmp_path / "all.jsonl", out, "--max-new-tokens", NEW, "--resume", "--run-id", "stalled",
                 "--gpus-per-replica", "1", "--accelerator-type", "H200", "--config", str(tmp_path / "job.yaml"),
                 "--quiet")
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("phi4mm:") and "no progress" in line]
    assert rc == 3, err[-3000:]
    assert len(said) == 1 and "TextStage holds the work" in said[0] and "1 GPU of type H200" in said[0] \
        and "--resume" in said[0], err[-3000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.rglob("*.parquet")) == written  # the first run's files stay, none added
    assert not (out / "_runs" / "stalled.json").exists()  # the record of a finished run only

    monkeypatch.delenv("RAY_ADDRESS")
    assert run_job("prompt", tmp_path / "all.jsonl", out, "--max-new-tokens", NEW, "--resume",
                   "--run-id", "resumed") == 0
    rows = read_output(out).to_pandas()
    assert sorted(rows.id) == ["a", "b", "c", "d"] and (rows.status == "ok").all()  # each once
    assert sorted(rows[rows.run_id == "resumed"].id) == ["c", "d"]


def test_the_reason_names_the_stage_and_what_it_waits_for():
    stages = ["PreparePrompts", "TextStage", "AssembleChunks", "ResultRows"]
    cpu, gpu = StageResources(batch_size=8), StageResources(batch_size=8, num_gpus=1, accelerator_type="H100")
    resources = {"PreparePrompts": cpu, "TextStage": gpu, "AssembleChunks": cpu, "ResultRows": cpu}
    counters = {"PreparePrompts": {"rows_in": 4, "rows_out": 4}}
    a10 = [{"Alive": True, "Resources": {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}},
           {"Alive": False, "Resources": {"CPU": 8, "GPU": 1, "accelerator_type:H100": 1}}]  # the lost node
    said = stall_reason(stages, resources, counters, {}, a10)
    assert said.startswith("TextStage holds the work: its replica asks for 1 GPU of type H100") and "A10G" in said
    h100 = [{"Alive": True, "Resources": {"CPU": 8, "GPU": 1, "accelerator_type:H100": 1}}]
    said = stall_reason(stages, resources, counters, {"TextStage": 32}, h100)
    assert said.startswith("TextStage holds the work: 32 rows are in a GPU call that has not returned")
    said = stall_reason(stages, resources, counters, {}, h100)
    assert said.startswith("TextStage holds the work: PreparePrompts put out 4 rows and TextStage has taken none")
