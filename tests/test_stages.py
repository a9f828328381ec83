"""Every stage called on a hand-made table, without Ray: what each one reads, writes and counts.

The whole-run tests (test_jobs_e2e.py, test_fidelity.py) prove the graph; these pin each stage's own
contract, so a change to one stage fails here, next to it, with a small table to look at.
"""
from __future__ import annotations

import pyarrow as pa
import pytest

from actors.model_stage import SpeechStage
from jobs.graph import stages_of
from pipeline.stages.assemble import AssembleChunks
from pipeline.stages.prepare_audio import PrepareAudio
from pipeline.stages.result_rows import ResultRows
from pipeline.context import RunContext
from pipeline.core.stage import Cluster
from pipeline.stages.from_transcripts import PrepareFromTranscripts
from jobs.dataset_write import RunFilenames
from pipeline.io.output import read_results, write_run_record
from pipeline.io.storage import locate
from schemas.config import JobConfig
from schemas.manifest import KNOWN_COLUMNS, validate_manifest
from schemas.results import RESULT_COLUMNS, result_schema
from schemas.work_rows import WORK_COLUMNS, WORK_SCHEMA, BatchKey, WorkChunk, decode_item, encode_item, \
    set_column, work_row, work_table
from tests.conftest import SAMPLES


def context_for(tiny_model: str, job: str = "transcribe", passthrough: pa.Schema | None = None,
                **fields) -> RunContext:
    config = JobConfig(job=job, input="m.csv", output="out", model={"source": tiny_model},
                       generation={"max_new_tokens": {"asr": 6, "translate": 6, "ocr": 6, "summarize": 6}},
                       **fields)
    return RunContext.for_tests(config, passthrough or pa.schema([]))


def manifest(rows: list[dict]) -> pa.Table:
    return validate_manifest(pa.Table.from_pylist(rows))


@pytest.fixture(scope="module")
def call_bytes() -> bytes:
    return (SAMPLES / "audio" / "call_0001.wav").read_bytes()


@pytest.fixture(scope="module")
def prepared(tiny_model, call_bytes):
    """PrepareAudio over a good call (with its own target language), one with the job's targets, junk."""
    table = manifest([
        {"id": "own", "data": call_bytes, "target_language": "es", "agent": "a1"},
        {"id": "job", "data": call_bytes, "agent": "a2"},
        {"id": "junk", "data": b"RIFF....not a wave" * 8, "agent": "a3"},
    ])
    stage = PrepareAudio(context_for(tiny_model, translate_to=["fr", "de"], summarize=True))
    return stage, stage(table)


def test_prepare_makes_one_work_row_per_output_key(prepared):
    stage, out = prepared
    keys = sorted(zip(out["id"].to_pylist(), out["task"].to_pylist(), out["target_language"].to_pylist()),
                  key=str)
    # the summary is derived from the transcript later (PrepareFromTranscripts), so none here
    assert keys == sorted([("own", "asr", None), ("own", "translate", "es"),
                           ("job", "asr", None), ("job", "translate", "fr"), ("job", "translate", "de"),
                           ("junk", "asr", None), ("junk", "translate", "fr"), ("junk", "translate", "de")],
                          key=str)
    rows = out.to_pylist()
    junk = [r for r in rows if r["id"] == "junk"]
    assert all(r["error"] and "junk" in r["error"] and r["modality"] == "none" for r in junk)
    good = [r for r in rows if r["id"] != "junk"]
    assert all(r["error"] is None and r["modality"] == "speech" and r["chunk_inputs"] for r in good)
    assert all(r["duration_s"] and r["duration_s"] > 1 for r in good)
    assert out["manifest:agent"].to_pylist() == [{"own": "a1", "job": "a2", "junk": "a3"}[i] for i in out["id"].to_pylist()]
    assert out.schema.names[:len(WORK_COLUMNS)] == WORK_COLUMNS
    assert stage.counters["bad_inputs"] == 1 and stage.counters["audio_inputs"] == 2
    assert stage.counters["rows_in"] == 3 and stage.counters["rows_out"] == out.num_rows == 8


def test_speech_stage_fills_its_rows_and_passes_the_rest_through(prepared, tiny_model):
    _, work = prepared
    stage = SpeechStage(context_for(tiny_model, translate_to=["fr", "de"]))
    out = stage(work)
    assert out.num_rows == work.num_rows and out["id"].to_pylist() == work["id"].to_pylist()
    chunks = 0
    for before, after in zip(work.to_pylist(), out.to_pylist()):
        if before["modality"] == "speech":
            chunks += len(before["chunk_inputs"])
            assert all(t is not None for t in after["chunk_text"]) and all(n <= 6 for n in after["chunk_output_tokens"])
            assert after["chunk_inputs"] == [None] * len(before["chunk_inputs"])  # spent features dropped
        else:
            assert after == before
    assert stage.counters["items"] == chunks > 0
    assert {"engine_prefill_s", "engine_decode_s"} <= set(stage.counters)


def assembled_row(texts: list[str | None], errors: list[str | None], task: str = "asr") -> dict:
    chunks = [WorkChunk(BatchKey("audio", 100), b"", 10, start_s=30.0 * k, end_s=30.0 * (k + 1))
              for k in range(len(texts))]
    row = work_row(f"r{len(texts)}", task, chunks=chunks, modality="speech", duration_s=30.0 * len(texts))
    row.update(chunk_text=texts, chunk_error=errors, chunk_output_tokens=[3] * len(texts),
               chunk_latency_s=[0.5] * len(texts))
    return row


def test_assemble_stitches_chunks_in_time_order_and_names_the_failed_chunk(tiny_model):
    table = work_table([assembled_row(["hello", "world"], [None, None]),
                        assembled_row(["a", None, "c"], [None, "r3: generation failed (boom)", None])], None)
    out = AssembleChunks(context_for(tiny_model))(table).to_pylist()
    assert out[0]["text"] == "hello world" and out[0]["error"] is None
    assert [s["start_s"] for s in out[0]["segments"]] == [0.0, 30.0]
    assert out[0]["input_tokens"] == 20 and out[0]["output_tokens"] == 6 and out[0]["latency_s"] == 1.0
    assert out[1]["error"] == "r3: generation failed (boom) (chunk 2/3, 30.0-60.0 s)"


def test_prepare_summaries_adds_a_summary_row_for_every_transcript(tiny_model):
    ok = work_row("ok", "asr", language="en", duration_s=60.0)
    ok["text"] = "we agreed to ship on friday"
    failed = work_row("bad", "asr", error="bad.wav: cannot decode audio")
    empty = work_row("empty", "asr", duration_s=5.0)
    translation = work_row("ok", "translate", target_language="fr")
    table = work_table([ok, failed, empty, translation], pa.table({"agent": ["a", "b", "c", "a"]}))
    stage = PrepareFromTranscripts(context_for(tiny_model, summarize=True))
    out = stage(table)
    assert out.num_rows == 7 and out.slice(0, 4).equals(table)
    summaries = {r["id"]: r for r in out.slice(4).to_pylist()}
    assert set(summaries) == {"ok", "bad", "empty"} and all(r["task"] == "summarize" for r in summaries.values())
    assert summaries["ok"]["modality"] == "text" and summaries["ok"]["error"] is None
    assert summaries["ok"]["chunk_input_tokens"][0] > 5 and summaries["ok"]["manifest:agent"] == "a"
    assert summaries["bad"]["error"] == "no summary: the transcript failed (bad.wav: cannot decode audio)"
    assert "transcript is empty" in summaries["empty"]["error"]
    assert stage.counters["summaries"] == 3


def test_result_rows_cast_to_the_contract_with_status_and_provenance(tiny_model):
    ok = assembled_row(["hi"], [None])
    ok["text"] = "hi"
    bad = work_row("bad", "asr", error="bad.wav: no speech detected in 2.0 s of audio")
    passthrough = pa.schema([("agent", pa.string())])
    table = work_table([ok, bad], pa.table({"agent": ["a", "b"]}))
    stage = ResultRows(context_for(tiny_model, passthrough=passthrough, run_id="run-1"))
    out = stage(table)
    assert out.schema == result_schema(passthrough)
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error"] and rows[1]["error"].startswith("bad.wav")
    assert all(r["run_id"] == "run-1" and r["model"] == stage.model_name and r["processed_at"] for r in rows)
    assert [r["agent"] for r in rows] == ["a", "b"]
    assert stage.counters["ok_rows"] == 1 and stage.counters["error_rows"] == 1


def test_work_rows_round_trip_their_chunks_and_batch_keys():
    inputs = {"input_ids": [1, 2, 3]}
    row = work_row("x", "ocr", chunks=[WorkChunk(BatchKey("image", 5), encode_item(inputs), 3)], page=2, pages=4,
                   modality="vision")
    table = work_table([row], None)
    assert table.schema == WORK_SCHEMA
    back = table.to_pylist()[0]
    assert BatchKey(**back["chunk_batch_key"][0]) == BatchKey("image", 5)
    assert decode_item(back["chunk_inputs"][0]) == inputs and back["page"] == 2
    assert set_column(table, "text", ["t"])["text"].to_pylist() == ["t"]
    assert work_row("y", "asr", error="e")["modality"] == "none"  # nothing to generate


@pytest.mark.parametrize("job,extra", [
    ("transcribe", {}), ("transcribe", {"translate_to": ["fr"], "summarize": True}),
    ("transcribe", {"extract": {"json_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}}),
    ("ocr", {}), ("meetings", {}),
    ("prompt", {"prompt": {"template": "Describe {id}"}}),
    ("prompt", {"prompt": {"json_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
                           "tools": [{"name": "f", "description": "d", "parameters": {"type": "object"}}]}})])
def test_each_stage_reads_only_columns_an_earlier_stage_wrote(job, extra):
    """Every job's declared graph (jobs/specs.py), read column by column: the manifest's columns, then
    what each stage writes; the result rows' columns are all there at the end."""
    config = JobConfig(job=job, input="m", output="o", **extra)
    available = set(KNOWN_COLUMNS) | ({"prompt", "images", "audio", "video"} if job == "prompt" else set())
    specs = stages_of(config)
    assert specs[0].stage.cpu_share == "rest" and specs[-1].stage is ResultRows  # the decoding pool first
    for spec in specs:
        missing = set(spec.stage.reads) - available
        assert not missing, f"{spec.stage.__name__} reads {sorted(missing)} that no earlier stage wrote"
        available |= set(spec.stage.writes)
        res = spec.resources(config, Cluster(cpus=8, gpus=1, input_rows=100))
        assert res.pool_size[0] >= 1 and (res.batch_size is None or res.batch_size >= 1)
    assert set(RESULT_COLUMNS) <= available


def test_every_job_is_one_spec_and_no_module_asks_which_job_runs():
    """A job is one entry of jobs/specs.py: nothing outside the CLI, schemas/ and the specs tests the
    job's name (adding a job must not mean hunting for `config.job == ...` in the stages)."""
    import re

    from jobs.specs import JOBS
    from tests.conftest import REPO

    assert set(JOBS) == {"transcribe", "meetings", "ocr", "prompt"}
    allowed = {"jobs/cli.py", "jobs/specs.py"}
    asks = re.compile(r"\.job\s*(==|!=|in\b|not in\b)|\bjob\s*(==|!=)\s*[\"']")
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for folder in ("pipeline", "actors", "jobs", "bench")
             for path in sorted((REPO / folder).rglob("*.py"))
             if str(path.relative_to(REPO)) not in allowed
             for n, line in enumerate(path.read_text().splitlines(), start=1) if asks.search(line)]
    assert not found, "the job's name tested outside its spec:\n" + "\n".join(found)


def test_stage_counters_count_calls_rows_and_time(tiny_model):
    stage = AssembleChunks(context_for(tiny_model))
    table = work_table([assembled_row(["a"], [None])], None)
    stage(table)
    stage(table)
    assert stage.counters["calls"] == 2 and stage.counters["rows_in"] == 2 and stage.counters["busy_s"] >= 0


def test_written_files_are_named_by_run_and_read_back_per_run(tmp_path, tiny_model):
    names = RunFilenames("run-7")
    assert names.get_filename_for_task("a" * 32, 3) == f"part-run-7-{'a' * 32}-000003.parquet"
    stage = ResultRows(context_for(tiny_model, run_id="run-7"))
    rows = stage(work_table([work_row("x", "asr", error="e")], None)).drop_columns(["task"])
    (tmp_path / "task=asr").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(rows, tmp_path / "task=asr" / names.get_filename_for_task("a" * 32, 0))
    back = read_results(str(tmp_path), run_id="run-7")
    assert back.num_rows == 1 and back["task"].to_pylist() == ["asr"]
    assert read_results(str(tmp_path), run_id="other").num_rows == 0
    path = write_run_record(locate(str(tmp_path)), {"run_id": "run-7", "counts": {}})
    assert path.endswith("_runs/run-7.json")


def test_benchmark_tokens_per_30s_follow_each_chunks_length_bucket(prepared, tiny_model):
    """`benchmark.new_tokens_per_30s` (bench/asr_calls.py): each audio chunk decodes exactly that many
    tokens per 30 s of its 2 s length bucket, and the engine counts the batches it formed."""
    _, work = prepared
    stage = SpeechStage(context_for(tiny_model, translate_to=["fr", "de"],
                                    benchmark={"new_tokens_per_30s": 60}))
    out = stage(work).to_pylist()
    seen = 0
    for row in out:
        for key, tokens in zip(row["chunk_batch_key"], row["chunk_output_tokens"]):
            want = -(-60 * key["size"] // 3000)  # a 5.2 s call: the 6 s bucket -> 12 tokens
            assert tokens == want, (key, tokens)
            seen += 1
    assert seen == stage.counters["items"] == 5
    assert stage.counters["engine_batch_items"] == 5 and 1 <= stage.counters["engine_batches"] <= 5
