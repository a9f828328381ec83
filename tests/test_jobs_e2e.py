"""The three jobs end to end through a real local Ray on the tiny checkpoint, read back as Parquet.

Every claim of "nothing lost" here is a row count: inputs x tasks (x pages) = output rows.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from tests.conftest import MEETING_PART_CHUNKS, read_output

def test_transcribe_translate_summarize_keeps_every_row(transcribe_run):
    samples_copy, good, bad, out = transcribe_run
    rows = read_output(out).to_pandas()
    n_inputs = len(good) + len(bad)
    # asr + translate(fr) + translate(de) + summarize for every input, good or bad
    assert len(rows) == n_inputs * 4
    assert rows.groupby("task").size().to_dict() == {"asr": n_inputs, "translate": 2 * n_inputs,
                                                     "summarize": n_inputs}
    assert not rows.duplicated(["id", "task", "target_language", "page"]).any()
    assert set(rows[rows.task == "translate"].target_language) == {"fr", "de"}

    ok = rows[rows.id.isin(good.id)]
    assert (ok.status == "ok").all(), ok[ok.status != "ok"][["id", "task", "error"]]
    assert ok.error.isna().all()
    assert ok.text.str.len().gt(0).all()
    assert (ok.output_tokens > 0).all() and (ok.input_tokens > 0).all() and (ok.latency_s > 0).all()
    assert (ok.run_id == "e2e-transcribe").all() and ok.processed_at.notna().all()
    # pass-through columns come back unchanged on every row of their input
    merged = rows.merge(pd.concat([good, bad])[["id", "customer_segment", "reference"]], on="id",
                        suffixes=("", "_in"))
    assert (merged.customer_segment == merged.customer_segment_in).all()
    assert ((merged.reference == merged.reference_in) | merged.reference_in.isna()).all()

    failed = rows[rows.id.isin(bad.id)].set_index(["id", "task", "target_language"], drop=False)
    assert (failed.status == "error").all() and failed.text.isna().all()
    messages = failed[failed.task == "asr"].set_index("id").error
    assert "does_not_exist.wav" in messages["missing"] and "not found" in messages["missing"].lower()
    assert "junk.wav" in messages["junk"] and "decode" in messages["junk"].lower()
    assert "silent.wav" in messages["silent"] and "silent" in messages["silent"].lower()
    assert "empty.wav" in messages["empty"] and "empty" in messages["empty"].lower()
    assert "scan.png" in messages["image"] and "image" in messages["image"].lower()
    summaries = failed[failed.task == "summarize"].set_index("id").error
    assert summaries["junk"].startswith("no summary") and "junk.wav" in summaries["junk"]

    # segments cover each clip from 0 to its duration
    for _, row in ok[ok.task == "asr"].iterrows():
        segs = list(row.segments)
        assert segs[0]["start_s"] == 0 and segs[-1]["end_s"] == pytest.approx(row.duration_s, abs=1e-3)
        assert row.duration_s == pytest.approx(sf.info(samples_copy / good.set_index("id").uri[row.id]).duration,
                                               abs=0.01)

    record = json.loads((out / "_runs" / "e2e-transcribe.json").read_text())
    assert record["counts"]["asr"] == {"ok": len(good), "error": len(bad)}
    assert record["counts"]["translate"] == {"ok": 2 * len(good), "error": 2 * len(bad)}
    assert record["audio_s"] == pytest.approx(ok[ok.task == "asr"].duration_s.sum())
    # the manifest carried reference transcripts: the run record holds the scores (meaningless numbers
    # for random weights, but computed over every ok asr row that had a reference)
    wer = record["scores"]["asr"]["overall"]["wer"]
    assert wer is not None and wer >= 0 and record["scores"]["asr"]["with_reference"] == len(good)
    # where the time went: every stage of the graph, the speech pool busy for part of the run
    stages = {s["stage"].split("(")[-1].rstrip(")"): s for s in record["stages"]}
    assert {"PrepareAudio", "SpeechStage", "ResultRows"} <= set(stages), list(stages)
    speech = stages["SpeechStage"]
    assert 0 < speech["busy_s"] <= record["wall_s"] and speech["calls"] >= 1
    # what each stage counted: every input seen once, the bad ones named as such, every row written,
    # and the engine's split of its time between prefill and decode
    counters = record["counters"]
    assert counters["PrepareAudio"]["rows_in"] == len(good) + len(bad)
    assert counters["PrepareAudio"]["bad_inputs"] == len(bad)
    assert counters["ResultRows"]["rows_out"] == record["rows"]
    assert counters["ResultRows"]["error_rows"] == sum(c["error"] for c in record["counts"].values())
    assert counters["SpeechStage"]["items"] >= 3 * len(good)  # asr + two translations, a chunk or more each
    assert counters["SpeechStage"]["engine_decode_s"] + counters["SpeechStage"]["engine_prefill_s"] >= 0
    assert counters["TextStage"]["items"] == len(good)  # one summary per transcript that worked


def test_meetings_long_recording_is_chunked_and_stitched(meetings_run):
    samples_copy, out = meetings_run
    rows = read_output(out).to_pandas().set_index("task")
    assert sorted(rows.index) == ["asr", "summarize"]
    asr, summary = rows.loc["asr"], rows.loc["summarize"]
    assert asr.status == "ok" and summary.status == "ok", (asr.error, summary.error)
    segs = list(asr.segments)
    truth = json.loads((samples_copy / "long" / "meeting.segments.json").read_text())
    assert len(segs) == int(np.ceil(truth["duration_s"] / 30.0)) or len(segs) > truth["duration_s"] / 30.0
    assert all(s["end_s"] - s["start_s"] <= 30.0 + 1e-6 for s in segs)
    # the chunks tile the recording: no gap, no overlap, from 0 to the end
    assert segs[0]["start_s"] == 0.0 and segs[-1]["end_s"] == pytest.approx(truth["duration_s"], abs=1e-3)
    assert all(a["end_s"] == pytest.approx(b["start_s"]) for a, b in zip(segs, segs[1:]))
    assert asr.text == " ".join(s["text"].strip() for s in segs if s["text"].strip())
    assert summary.team == "network-operations" and asr.team == "network-operations"
    assert summary.text and summary.input_tokens > asr.output_tokens  # built from the whole transcript
    # it travelled in parts of audio.part_chunks chunks (MEETING_PART_CHUNKS here), each part's features
    # built by the features pool in a call of its own, and was regrouped once, in order (the 3-hour
    # meeting in the real-size tier checks the same at 3 hours, with its memory)
    counters = json.loads((out / "_runs" / "e2e-meetings.json").read_text())["counters"]
    regrouped, built = counters["RegroupParts"], counters["BuildChunkFeatures"]
    parts = int(np.ceil(len(segs) / MEETING_PART_CHUNKS))
    assert parts > 1 and regrouped["rows_regrouped"] == 1 and regrouped["parts_in"] == parts, regrouped
    assert built["chunks_built"] == len(segs) and built["calls"] == parts, built
    assert counters["SpeechStage"]["items"] == len(segs)


def test_ocr_pages_and_bad_documents(ocr_run):
    samples_copy, manifest, extra, out = ocr_run
    rows = read_output(out).to_pandas()
    assert set(rows.task) == {"ocr"}
    pages = rows.groupby("id").page.apply(sorted).to_dict()
    assert pages["doc_0004"] == [1, 2]  # the 2-page PDF: one row per page
    assert all(pages[i] == [1] for i in ["doc_0001", "doc_0002", "doc_0003", "audio_given", "bomb"])
    assert len(rows) == len(manifest) + len(extra) + 1
    good = rows[rows.id.isin(manifest.id)]
    assert (good.status == "ok").all(), good.error.tolist()
    assert (good[good.id == "doc_0004"].pages == 2).all()
    errors = rows[rows.id.isin(extra.id)].set_index("id").error
    assert "call_0001.wav" in errors["audio_given"] and "audio" in errors["audio_given"]
    assert "bomb.png" in errors["bomb"] and "pixel" in errors["bomb"].lower()
    assert "truncated.pdf" in errors["truncated_pdf"]
    assert (rows.set_index("id").loc[extra.id, "archive_box"] == "B-999").all()


def test_bad_manifest_is_refused_before_ray_starts(tmp_path, tiny_model, capsys):
    from jobs.cli import main

    manifest = tmp_path / "dupes.csv"
    pd.DataFrame({"id": ["a", "b", "a"], "uri": ["x.wav", "y.wav", "z.wav"]}).to_csv(manifest, index=False)
    assert main(["transcribe", str(manifest), str(tmp_path / "out"), "--model", tiny_model]) == 2
    err = capsys.readouterr().err
    assert "duplicate" in err.lower() and "a" in err
    assert not (tmp_path / "out").exists()

    no_uri = tmp_path / "no_uri.csv"
    pd.DataFrame({"id": ["a"], "path": ["x.wav"]}).to_csv(no_uri, index=False)
    assert main(["transcribe", str(no_uri), str(tmp_path / "out"), "--model", tiny_model]) == 2
    assert "uri" in capsys.readouterr().err

    assert main(["transcribe", str(manifest), str(tmp_path / "out"), "--translate-to", "xx",
                 "--model", tiny_model]) == 2
    assert "xx" in capsys.readouterr().err


@pytest.mark.realsize  # a whole job (30 s); the fast tier runs the same rows through the CPU stages below
def test_stereo_calls_split_by_channel_and_summarised_from_audio(run_job, samples_copy, tmp_path):
    """Agent and customer on separate channels: one transcript with both, in time order, labelled."""
    import soundfile as sf

    manifest = samples_copy / "stereo.csv"
    pd.DataFrame([{"id": "stereo", "uri": "audio/call_0002.flac", "crm_ticket": 981},
                  {"id": "mono", "uri": "audio/call_0001.wav", "crm_ticket": 982}]).to_csv(manifest, index=False)
    assert sf.info(samples_copy / "audio" / "call_0002.flac").channels == 2
    out = tmp_path / "out"
    assert run_job("transcribe", manifest, out, "--split-channels", "--summarize-from-audio",
                   "--max-new-tokens", "8") == 0
    rows = read_output(out).to_pandas().set_index(["id", "task"])
    assert sorted(rows.index) == [("mono", "asr"), ("mono", "summarize"), ("stereo", "asr"), ("stereo", "summarize")]
    assert (rows.status == "ok").all(), rows.error.tolist()
    speakers = [s["text"].split("]")[0] + "]" for s in rows.loc[("stereo", "asr"), "segments"]]
    assert sorted(set(speakers)) == ["[channel 1]", "[channel 2]"]
    starts = [s["start_s"] for s in rows.loc[("stereo", "asr"), "segments"]]
    assert starts == sorted(starts)
    # the summary came from the audio (speech pool, audio tokens in its prompt), not from the transcript
    assert rows.loc[("stereo", "summarize"), "input_tokens"] > 100
    assert rows.loc[("stereo", "summarize"), "segments"] is None
    assert rows.loc[("mono", "asr"), "crm_ticket"] == 982


def test_stereo_call_splits_by_channel_through_the_cpu_stages(samples_copy, tiny_model):
    """The stereo test's rows through PrepareAudio, then (each chunk given a text, as the speech pool
    would) AssembleChunks and ResultRows: one transcript with both channels, labelled, in time order; the
    summary row is one chunk of audio for the speech pool; the mono call is one speaker."""
    import pyarrow as pa

    from pipeline.context import RunContext
    from pipeline.stages.assemble import AssembleChunks
    from pipeline.stages.prepare_audio import PrepareAudio
    from pipeline.stages.result_rows import ResultRows
    from schemas.config import JobConfig
    from schemas.manifest import validate_manifest
    from schemas.work_rows import set_column

    audio = samples_copy / "audio"
    table = validate_manifest(pa.table({"id": ["stereo", "mono"], "uri": [str(audio / "call_0002.flac"),
                                                                          str(audio / "call_0001.wav")]}))
    config = JobConfig(job="transcribe", input="m.csv", output="out", model={"source": tiny_model},
                       audio={"split_channels": True, "summarize_from_audio": True}, summarize=True)
    context = RunContext.for_tests(config, pa.schema([]))
    work = PrepareAudio(context)(table)
    rows = {(r["id"], r["task"]): r for r in work.to_pylist()}
    assert sorted(rows) == [("mono", "asr"), ("mono", "summarize"), ("stereo", "asr"), ("stereo", "summarize")]
    assert not any(r["error"] for r in rows.values())
    assert set(rows[("stereo", "asr")]["chunk_speaker"]) == {"channel 1", "channel 2"}
    assert set(rows[("mono", "asr")]["chunk_speaker"]) == {None}
    summary = rows[("stereo", "summarize")]
    assert summary["modality"] == "speech" and len(summary["chunk_inputs"]) == 1  # the audio itself, one chunk
    texts = [[f"words {k}" for k in range(len(c))] for c in work["chunk_inputs"].to_pylist()]
    done = set_column(work, "chunk_text", texts)
    out = {(r["id"], r["task"]): r for r in ResultRows(context)(AssembleChunks(context)(done)).to_pylist()}
    segments = out[("stereo", "asr")]["segments"]
    assert sorted({s["text"].split("]")[0] + "]" for s in segments}) == ["[channel 1]", "[channel 2]"]
    assert [s["start_s"] for s in segments] == sorted(s["start_s"] for s in segments)
    assert out[("stereo", "summarize")]["status"] == "ok" and out[("stereo", "summarize")]["segments"] is None
