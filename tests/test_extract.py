"""`transcribe --extract` / `meetings --extract`: a task=extract row per recording, the schema's fields read
from the whole transcript under the schema's grammar, typed columns read back with pyarrow and DuckDB; a
long transcript is read in sections (notes, then the fields from the notes) with no call past the window;
a recording whose transcript failed has a failed extract row; a bad schema is refused before Ray starts."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest
from jsonschema import validate

from actors.text_stage import TextStage
from pipeline.stages.from_transcripts import PrepareFromTranscripts
from pipeline.context import RunContext
from schemas.config import JobConfig
from schemas.work_rows import work_table
from tests.conftest import read_output
from tests.test_summaries import transcript_row

SCHEMA = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "maxLength": 16},
        "resolved": {"type": "boolean"},
        "mood": {"enum": ["happy", "neutral", "angry"]},
        "follow_ups": {"type": "integer", "minimum": 0, "maximum": 9},
        "callback": {"type": "object", "properties": {"day": {"type": "string", "maxLength": 8}}},
    },
    "required": ["reason", "resolved", "mood"],
}
TYPES = {"reason": pa.string(), "resolved": pa.bool_(), "mood": pa.string(), "follow_ups": pa.int64()}


@pytest.fixture(scope="module")
def extract_run(run_job, tmp_path_factory):
    """The shipped calls plus one whose file is missing, through `phi4mm transcribe --extract`."""
    from tests.conftest import SAMPLES

    folder = tmp_path_factory.mktemp("extract")
    (folder / "schema.json").write_text(json.dumps(SCHEMA))
    calls = pd.read_csv(SAMPLES / "transcribe.csv")
    calls["uri"] = [str(SAMPLES / u) for u in calls.uri]
    calls = pd.concat([calls, pd.DataFrame([{"id": "call_missing", "uri": str(folder / "gone.wav"),
                                             "language": "en"}])], ignore_index=True)
    calls.to_csv(folder / "calls.csv", index=False)
    out = folder / "out"
    assert run_job("transcribe", folder / "calls.csv", out, "--extract", str(folder / "schema.json"),
                   "--extract-prompt", "Fill in the call's fields.", "--max-new-tokens", "160",
                   "--run-id", "extract") == 0
    return out, list(calls.id)


def test_every_recording_has_an_extract_row_that_validates_with_typed_columns(extract_run):
    out, ids = extract_run
    table = read_output(out)
    rows = table.to_pandas()
    extract = rows[rows.task == "extract"].set_index("id")
    assert sorted(extract.index) == sorted(ids)  # one per recording, the failed one too
    assert sorted(rows[rows.task == "asr"].id) == sorted(ids)  # the transcripts are still written
    assert {name: table.schema.field(name).type for name in TYPES} == TYPES
    assert "callback" not in table.column_names  # an object: only in `json`
    ok = extract[extract.status == "ok"]
    assert len(ok) == len(ids) - 1, extract.error.to_dict()
    for rid, row in ok.iterrows():
        answer = json.loads(row.json)
        validate(answer, SCHEMA)
        assert (row.reason, row.resolved, row.mood) == (answer["reason"], answer["resolved"], answer["mood"])
        assert row.summary_sections == 1 and row.summary_from == "transcript" and row.duration_s > 0
    bad = extract.loc["call_missing"]
    assert bad.status == "error" and "no extraction: the transcript failed" in bad.error and pd.isna(bad.json)
    # the other partitions carry the typed columns as nulls (one schema across the dataset)
    assert rows[rows.task == "asr"].json.isna().all() and rows[rows.task == "asr"].mood.isna().all()


def test_extract_columns_in_duckdb(extract_run):
    import duckdb

    out, ids = extract_run
    glob = str(out / "**" / "*.parquet")
    con = duckdb.connect()
    kinds = dict(con.execute(f"select column_name, column_type from (describe select * from "
                             f"read_parquet('{glob}', hive_partitioning=true))").fetchall())
    assert (kinds["reason"], kinds["resolved"], kinds["mood"], kinds["follow_ups"]) == \
        ("VARCHAR", "BOOLEAN", "VARCHAR", "BIGINT")
    counts = con.execute(f"select task, count(*) from read_parquet('{glob}', hive_partitioning=true) "
                         "group by task").fetchall()
    assert dict(counts) == {"asr": len(ids), "extract": len(ids)}
    moods = con.execute(f"select distinct mood from read_parquet('{glob}', hive_partitioning=true) "
                        "where task = 'extract' and status = 'ok'").fetchall()
    assert {m for (m,) in moods} <= {"happy", "neutral", "angry"}


WINDOW = 1200
NEW = 160  # the tiny model's constrained answer to SCHEMA takes up to ~110 tokens


def extract_context(tiny_model: str) -> RunContext:
    config = JobConfig(job="meetings", input="m", output="o", model={"source": tiny_model},
                       generation={"max_new_tokens": {"asr": NEW, "summarize": NEW, "extract": NEW}},
                       summary={"window_tokens": WINDOW}, extract={"json_schema": SCHEMA})
    return RunContext.for_tests(config)


def test_a_long_transcript_is_read_in_sections_then_extracted_from_the_notes(tiny_model):
    """80 segments do not fit one window: notes per section (free text), combined while they are too long
    for one extraction prompt, then one constrained call; every call within the window."""
    from pipeline.stages.assemble import assemble
    from pipeline.stages.structured_answers import StructuredAnswers

    context = extract_context(tiny_model)
    table = work_table([transcript_row(80), transcript_row(1) | {"id": "short"}], None)
    prepared = PrepareFromTranscripts(context)(table)
    made = {(r["id"], r["task"]): r for r in prepared.to_pylist() if r["task"] != "asr"}
    assert set(made) == {("meeting", "summarize"), ("meeting", "extract"), ("short", "summarize"),
                         ("short", "extract")}
    long, short = made["meeting", "extract"], made["short", "extract"]
    assert short["summary_sections"] == 1 and long["summary_sections"] == len(long["chunk_inputs"]) > 2
    assert all(n + NEW <= WINDOW for n in long["chunk_input_tokens"])

    stage = TextStage(context)
    calls: list[tuple[int, bool]] = []  # (prompt + new tokens, constrained) of every item generated
    generate = stage.engine.generate

    def spy(items, keys, max_new, min_new=0, grammars=None):
        calls.extend((len(it["input_ids"]) + m, bool(grammars and g)) for it, m, g in
                     zip(items, max_new, grammars or [None] * len(items)))
        return generate(items, keys, max_new, min_new, grammars)

    stage.engine.generate = spy
    done = stage(prepared)
    assert calls and max(n for n, _ in calls) <= WINDOW
    # constrained: the short transcript's one prompt and the long one's final extraction; the long one's
    # section notes and combining rounds are free text, and there are more of them than sections
    assert sum(c for _, c in calls) == 2
    assert sum(not c for _, c in calls) >= long["summary_sections"] + 2  # + the two summaries' calls
    answers = StructuredAnswers(context)(assemble(done))
    out = {(r["id"], r["task"]): r for r in answers.to_pylist() if r["task"] == "extract"}
    for key, row in out.items():
        assert len(row["chunk_text"]) == 1 and row["error"] is None, (key, row["error"], row["chunk_error"])
        validate(json.loads(row["json"]), SCHEMA)
        assert row["schema:mood"] in {"happy", "neutral", "angry"}


@pytest.mark.realsize  # a whole meetings run (34 s); the fast tier extracts from calls (the transcribe run) and from a long transcript's section notes
def test_meetings_extract_writes_one_row_per_meeting(run_job, samples_copy, tmp_path):
    schema = tmp_path / "actions.json"
    schema.write_text(json.dumps({"type": "object", "properties": {
        "decisions": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "next_meeting_day": {"enum": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]}},
        "required": ["decisions", "next_meeting_day"]}))
    out = tmp_path / "out"
    assert run_job("meetings", samples_copy / "meetings.jsonl", out, "--extract", str(schema),
                   "--max-new-tokens", "96", "--run-id", "meet-extract") == 0
    rows = read_output(out).to_pandas()
    assert sorted(rows.task.unique()) == ["asr", "extract", "summarize"]
    extract = rows[rows.task == "extract"]
    assert len(extract) == len(rows[rows.task == "asr"]) and (extract.status == "ok").all(), extract.error.tolist()
    assert all(json.loads(j)["next_meeting_day"] == day for j, day in zip(extract.json, extract.next_meeting_day))
    record = json.loads((out / "_runs" / "meet-extract.json").read_text())
    assert record["counters"]["PrepareFromTranscripts"]["extractions"] == len(extract)


@pytest.mark.parametrize("args, message", [
    (["--extract", "{schema}"], "--extract {schema}: not a valid JSON Schema"),
    (["--extract-prompt", "Fill it in."], "--extract-prompt needs --extract SCHEMA.json"),
])
def test_a_bad_extract_is_refused_before_ray_starts(args, message, tmp_path, capsys, monkeypatch):
    import ray

    from jobs.cli import main

    schema = tmp_path / "bad.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integr"}}}))
    manifest = tmp_path / "calls.csv"
    manifest.write_text("id,uri\nc1,/nowhere.wav\n")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    was_running = ray.is_initialized()
    code = main(["transcribe", str(manifest), str(tmp_path / "out"), *[a.format(schema=schema) for a in args]])
    assert code != 0 and message.format(schema=schema) in capsys.readouterr().err
    assert ray.is_initialized() == was_running


def test_extract_belongs_to_the_transcript_jobs():
    with pytest.raises(ValueError, match="--extract applies to the transcribe and meetings jobs"):
        JobConfig(job="ocr", input="i", output="o", extract={"json_schema": SCHEMA})
    config = JobConfig(job="transcribe", input="i", output="o", extract={"json_schema": SCHEMA})
    assert config.tasks == ["asr", "extract"] and config.structured_task == "extract"
