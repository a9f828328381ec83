"""Summaries of any length: a transcript too long for the summary window is summarised in sections
(cut at segment boundaries), then the section summaries combined, and no call exceeds the window."""
from __future__ import annotations

import json

import pytest

from actors.text_stage import TextStage
from pipeline.context import RunContext
from pipeline.stages.from_transcripts import PrepareFromTranscripts, split_in_sections
from schemas.config import JobConfig
from schemas.work_rows import work_row, work_table
from tests.conftest import read_output

WINDOW = 256
NEW = 8


def context(tiny_model: str, window: int = WINDOW) -> RunContext:
    config = JobConfig(job="meetings", input="m", output="o", model={"source": tiny_model},
                       generation={"max_new_tokens": {"asr": NEW, "summarize": NEW}},
                       summary={"window_tokens": window})
    return RunContext.for_tests(config)


def transcript_row(n_segments: int) -> dict:
    row = work_row("meeting", "asr", duration_s=30.0 * n_segments, language="en")
    texts = [f"In part {k} the team discussed budget line {k} and agreed to revisit it next week."
             for k in range(n_segments)]
    row["segments"] = [{"start_s": 30.0 * k, "end_s": 30.0 * (k + 1), "text": t} for k, t in enumerate(texts)]
    row["text"] = " ".join(texts)
    return row


def test_sections_keep_order_and_fit_the_budget():
    texts = [f"t{k}" for k in range(10)]
    sections = split_in_sections(texts, [3] * 10, 7, lambda t, n: [t])
    assert sections == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6", "t7"], ["t8", "t9"]]
    cut = split_in_sections(["a", "long", "b"], [1, 20, 1], 7, lambda t, n: ["lo", "ng"])
    assert cut == [["a"], ["lo"], ["ng"], ["b"]]
    with pytest.raises(ValueError, match="raise it"):
        split_in_sections(["a"], [1], 0, lambda t, n: [t])


def test_a_long_transcript_is_summarised_in_sections_within_the_window(tiny_model):
    table = work_table([transcript_row(40), transcript_row(1) | {"id": "short"}], None)
    prepared = PrepareFromTranscripts(context(tiny_model))(table)
    summaries = {r["id"]: r for r in prepared.to_pylist() if r["task"] == "summarize"}
    long, short = summaries["meeting"], summaries["short"]
    assert short["summary_sections"] == 1 and long["summary_sections"] == len(long["chunk_inputs"]) > 2
    assert all(n + NEW <= WINDOW for n in long["chunk_input_tokens"])
    assert long["summary_from"] == "transcript"

    stage = TextStage(context(tiny_model))
    seen: list[int] = []
    generate = stage.engine.generate

    def spy(items, keys, max_new, *rest):
        seen.extend(len(it["input_ids"]) + m for it, m in zip(items, max_new))
        return generate(items, keys, max_new, *rest)

    stage.engine.generate = spy
    out = {r["id"]: r for r in stage(prepared).to_pylist() if r["task"] == "summarize"}
    assert seen and max(seen) <= WINDOW  # every call of every round within the window
    assert len(seen) > long["summary_sections"] + 1  # the sections, then at least one combining round
    done = out["meeting"]
    assert len(done["chunk_text"]) == 1 and done["chunk_text"][0] is not None and done["chunk_error"] == [None]
    assert done["chunk_input_tokens"][0] > sum(long["chunk_input_tokens"])  # every round's prompt counted
    assert stage.counters["combine_items"] >= 1


def test_meetings_job_with_a_small_window_writes_sectioned_summaries(run_job, samples_copy, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"  # transcripts of 40 tokens per 30 s chunk: longer than the window
    config.write_text("generation: {max_new_tokens: {asr: 40, summarize: 8}}\nbenchmark: {min_new_tokens: 40}\n")
    assert run_job("meetings", samples_copy / "meetings.jsonl", out, "--config", str(config),
                   "--summary-window", str(WINDOW), "--run-id", "small-window") == 0
    rows = read_output(out).to_pandas()
    summary = rows[rows.task == "summarize"].iloc[0]
    assert summary.status == "ok" and summary.text, summary.error
    assert summary.summary_sections > 1 and summary.summary_from == "transcript"
    asr = rows[rows.task == "asr"].iloc[0]
    assert asr.status == "ok" and pd_isna(asr.summary_sections)
    record = json.loads((out / "_runs" / "small-window.json").read_text())
    assert record["counters"]["PrepareFromTranscripts"]["sectioned_summaries"] == 1


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_a_transcript_goes_into_its_summary_prompt_as_the_ids_generated_for_it(tiny_model):
    """Random weights generate ids that decode to odd text, which re-tokenises several times longer; the
    summary prompt holds the generated ids themselves (less the tokenizer's added tokens), so its length
    is the transcript's generated length plus the wording, and nothing long is tokenised again."""
    import random

    from pipeline.model.inputs import InputBuilder
    from pipeline.model.prompts import summary_pieces
    from schemas.work_rows import decode_item

    builder = InputBuilder(tiny_model)
    tokenizer = builder.processor.tokenizer
    added = sorted(tokenizer.added_tokens_decoder)
    rng = random.Random(7)
    generated = [[rng.randrange(3, added[0]) for _ in range(12)] + [added[0]] for _ in range(6)]
    row = work_row("call", "asr", duration_s=180.0, language="en")
    row.update(chunk_text=[tokenizer.decode(ids, skip_special_tokens=True) for ids in generated],
               chunk_speaker=[None] * 6, chunk_output_ids=generated, text="x",
               segments=[{"start_s": 30.0 * k, "end_s": 30.0 * (k + 1), "text": "x"} for k in range(6)])
    prepared = PrepareFromTranscripts(context(tiny_model, window=4096))(work_table([row], None))
    summary = [r for r in prepared.to_pylist() if r["task"] == "summarize"][0]
    assert summary["summary_sections"] == 1
    prompt = decode_item(summary["chunk_inputs"][0])["input_ids"].tolist()
    newline = len(builder.token_ids("\n"))
    wording = builder.text_pieces(summary_pieces([])).input_tokens
    assert summary["chunk_input_tokens"] == [len(prompt)] == [wording + 6 * (12 + newline)]
    kept = [ids[:12] for ids in generated]
    at = [next(k for k in range(len(prompt)) if prompt[k:k + 12] == ids) for ids in kept]
    assert at == sorted(at)  # every chunk's ids, whole and in order
    assert added[0] not in prompt[at[0]:at[-1] + 12]  # the end marker each chunk generated is not in the prompt
    retokenised = sum(len(builder.token_ids(t)) for t in row["chunk_text"])
    assert retokenised != 6 * 12  # the odd text would not have had the generated length
