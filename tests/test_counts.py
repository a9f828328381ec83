"""Counts a user reads off a run (issue 10): error rows keep the duration they had, a resume with
nothing left to do starts no Ray, and a small machine decodes on more than one worker."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from jobs.graph import plan_cluster, prepare_pool_size, stages_of
from pipeline.stages.assemble import AssembleChunks
from pipeline.stages.prepare_audio import PrepareAudio
from pipeline.stages.result_rows import ResultRows
from pipeline.context import RunContext
from schemas.config import JobConfig
from schemas.manifest import validate_manifest
from tests.conftest import SAMPLES


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV")
    return buf.getvalue()


def test_error_rows_keep_the_duration_decoded(tiny_model):
    """"no speech detected in 12.3 s" carries duration_s = 12.3 on each of its rows; a bad target
    language's row carries its clip's duration; an undecodable file has none to carry (null)."""
    call = (SAMPLES / "audio" / "call_0001.wav").read_bytes()
    call_s = sf.info(io.BytesIO(call)).duration
    hum = (0.05 * np.sin(2 * np.pi * 50 * np.arange(int(16000 * 12.3)) / 16000)).astype(np.float32)  # mains hum
    table = validate_manifest(pa.Table.from_pylist([
        {"id": "quiet", "data": _wav(hum), "target_language": None},
        {"id": "junk", "data": b"RIFF....not a wave" * 8, "target_language": None},
        {"id": "odd", "data": call, "target_language": "../../etc"},
    ]))
    config = JobConfig(job="transcribe", input="m.csv", output="out", translate_to=["fr"],
                       model={"source": tiny_model}, generation={"max_new_tokens": {"asr": 4, "translate": 4}})
    context = RunContext.for_tests(config)
    work = PrepareAudio(context)(table)
    # what a user reads: the result rows (no generation needed for error rows; the ok ones are not here)
    errors = work.filter(pa.compute.is_valid(work["error"]))
    rows = ResultRows(context)(AssembleChunks(context)(errors)).to_pylist()
    got = {(r["id"], r["task"]): r for r in rows}
    assert set(got) == {("junk", "asr"), ("junk", "translate"), ("odd", "translate"), ("quiet", "asr"),
                        ("quiet", "translate")}
    for task in ("asr", "translate"):
        quiet = got[("quiet", task)]
        assert quiet["status"] == "error" and "no speech detected in 12.3 s" in quiet["error"]
        assert quiet["duration_s"] == pytest.approx(12.3, abs=1e-3)
        assert got[("junk", task)]["duration_s"] is None  # never decoded
    assert got[("odd", "translate")]["duration_s"] == pytest.approx(call_s, abs=1e-3)
    # the clip's good rows carry the same duration
    odd_asr = [r for r in work.to_pylist() if r["id"] == "odd" and r["task"] == "asr"]
    assert odd_asr[0]["error"] is None and odd_asr[0]["duration_s"] == pytest.approx(call_s, abs=1e-3)


def _write_ok_rows(out, task: str, ids: list[str]) -> None:
    import pyarrow.parquet as pq

    from schemas.results import result_schema

    schema = result_schema(pa.schema([("uri", pa.string())]))
    schema = schema.remove(schema.get_field_index("task"))
    rows = [{"id": i, "page": 1, "status": "ok", "run_id": "first", "text": "done", "uri": f"{i}.wav"} for i in ids]
    path = out / f"task={task}" / f"part-first-{'ab' * 16}-000000-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


@pytest.mark.parametrize("missing", [False, True])
def test_a_resume_with_nothing_left_starts_no_ray(tiny_model, tmp_path, capsys, monkeypatch, missing):
    import jobs.runner
    from jobs.cli import main

    class RayStarted(Exception):
        pass

    started = []

    def fake_init_ray(settings):  # the test session may run a Ray already: what counts is the job's ask
        started.append(settings)
        raise RayStarted

    monkeypatch.setattr(jobs.runner, "init_ray", fake_init_ray)
    ids = ["a", "b", "c"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,uri\n" + "".join(f"{i},{i}.wav\n" for i in ids))
    out = tmp_path / "out"
    _write_ok_rows(out, "asr", ids if not missing else ids[:2])  # with `missing`: c is still to do
    args = ["transcribe", str(manifest), str(out), "--model", tiny_model, "--resume", "--run-id", "again"]
    if missing:
        with pytest.raises(RayStarted):
            main(args)
        assert len(started) == 1  # the same test fails if a no-op resume were not told apart
        return
    assert main(args) == 0
    assert not started
    err = capsys.readouterr().err
    assert "phi4mm: resume: every row of" in err and "nothing to run" in err
    record = json.loads((out / "_runs" / "again.json").read_text())
    assert record["rows"] == 0 and record["counts"] == {}


def test_a_small_machine_decodes_on_every_core_and_every_actor_still_fits():
    """A 2-core machine (4 logical CPUs in the local Ray) used to get one prepare worker; now two,
    sharing the logical CPUs the other actors leave, so each of those keeps its CPU and schedules."""
    config = JobConfig(job="transcribe", input="m.parquet", output="out")
    assert prepare_pool_size(config, 4, 0, 1000, autoscaling=False) == 2
    cluster = plan_cluster(config, 4, 0, 1000, False)
    demand = sum(s.resources(config, cluster).pool_size[1] * s.resources(config, cluster).num_cpus
                 for s in stages_of(config))
    assert demand <= 4 and PrepareAudio.resources(config, cluster).num_cpus > 0
    # a 16-CPU, 1-GPU host keeps its pool (11 workers of one CPU each, beside the driver, the replica,
    # ResultRows, the long recordings' features pool and two quarter-CPU actors): the rule only lifts
    # small ones
    big = plan_cluster(config, 16, 1, 1000, False)
    assert PrepareAudio.resources(config, big).pool_size == (11, 11)
    assert PrepareAudio.resources(config, big).num_cpus == 1.0
    # and a manifest of two rows still gets one worker
    assert prepare_pool_size(config, 4, 0, 2, autoscaling=False) == 1
