"""The report over a small but realistic output dataset, written exactly as the pipeline lays it out.

OUTPUT/task=<task>/part-<run_id>-<n>.parquet (the `task` column only in the directory name, as Ray's
partitioned write leaves it) plus OUTPUT/_runs/<run_id>.json. Files of different jobs carry different
pass-through columns, so the reader's schema unification is exercised too. Numbers checked here were
worked out by hand (see the comments next to the rows).
"""
from __future__ import annotations

import base64
import io
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from jobs import report as rp
from jobs import scoring
from schemas.results import RESULT_COLUMNS, result_schema
from tests.screenshot import screenshot

T0 = datetime(2024, 5, 1, 2, 0, tzinfo=timezone.utc)
CALLS = pa.schema([("uri", pa.string()), ("reference", pa.string()), ("reference_translate", pa.string()),
                   ("agent_id", pa.string())])
DOCS = pa.schema([("uri", pa.string()), ("reference", pa.string())])
MEETINGS = pa.schema([("uri", pa.string()), ("reference_summarize", pa.string())])
DECODE_ERR = "s3://calls/2024/{id}.wav: cannot decode audio (Format not recognised)"


def _row(id: str, task: str, run_id: str, text: str | None = None, error: str | None = None,
         language: str | None = "en", **extra) -> dict:
    """One result row with the contract's columns; `error` given means status=error."""
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(id=id, task=task, page=1, status="error" if error else "ok", error=error,
               text=None if error else text, language=language, model="microsoft/Phi-4-multimodal-instruct",
               model_revision="main", run_id=run_id, processed_at=T0, input_tokens=100, output_tokens=20,
               latency_s=1.0)
    row.update(extra)
    return row


def _write(out: Path, task: str, name: str, rows: list[dict], passthrough: pa.Schema) -> None:
    """Write rows like the pipeline: full result schema, `task` kept in the directory name only."""
    table = pa.Table.from_pylist(rows, schema=result_schema(passthrough)).drop_columns(["task"])
    folder = out / f"task={task}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)


def _calls(out: Path) -> None:
    """Call-centre run: asr + translate, references in en and es."""
    run = "run-transcribe-1"
    calls = {  # id: (language, reference, transcript, error)
        "call-001": ("en", "The quick brown fox jumps.", "the quick brown fox jumped", None),  # WER 1/5, CER 2/25
        "call-002": ("en", "Hello, world!", "hello world", None),  # WER 0 after normalisation
        "call-003": ("es", "Hola, buenos días.", "hola buenos dias", None),  # WER 1/3
        "call-004": ("es", "algo", None, DECODE_ERR.format(id="call-004")),
        "call-005": ("en", None, None, DECODE_ERR.format(id="call-005")),
        "call-006": ("en", None, "thanks for calling", None),
        "call-007": ("en", None, None, "call-007: no speech detected in 12.5 s of audio"),
    }
    translations = {  # id: (target, translation, reference_translate)
        "call-001": ("de", "Der schnelle braune Fuchs springt.", "Der schnelle braune Fuchs springt."),
        "call-002": ("de", "Hallo Welt", None),  # only the copied transcript reference: not scored
        "call-003": ("en", "Hello, good morning.", "Hello, good day."),
        "call-004": ("en", None, "x"),
        "call-005": ("de", None, None),
        "call-006": ("de", "Danke für Ihren Anruf", None),
        "call-007": ("de", None, None),
    }
    asr, tr = [], []
    for i, (cid, (lang, ref, text, err)) in enumerate(calls.items()):
        target, translation, ref_tr = translations[cid]
        common = dict(uri=f"s3://calls/2024/{cid}.wav", reference=ref, reference_translate=ref_tr,
                      agent_id=f"agent-{i % 2}", duration_s=300.0 + 60 * i, language=lang)
        asr.append(_row(cid, "asr", run, text, err, latency_s=1.0 + i,
                        segments=None if err else [{"start_s": 0.0, "end_s": 4.0, "text": text}], **common))
        tr_err = None if not err else f"{cid}: nothing to translate: the transcript failed ({err})"
        tr.append(_row(cid, "translate", run, translation, tr_err, target_language=target, latency_s=0.5,
                       output_tokens=30, **common))
    _write(out, "asr", f"part-{run}-000000.parquet", asr, CALLS)
    _write(out, "translate", f"part-{run}-000000.parquet", tr, CALLS)


def _documents(out: Path) -> None:
    """OCR run: multi-page documents whose reference covers the whole document."""
    run = "run-ocr-1"
    invoice = "Invoice 42\nTotal: 10 EUR"  # normalised: "invoice 42 total 10 eur", 23 characters
    too_big = "s3://docs/{id}.pdf: page {p} is {w}x{h} pixels ({mp} MP), over the 89.5 MP limit " \
              "(possible decompression bomb); downscale it or raise max_pixels"
    rows = [
        _row("scan-1", "ocr", run, "Invoice 42", page=1, pages=2, reference=invoice, uri="s3://docs/scan-1.pdf"),
        _row("scan-1", "ocr", run, "Total: 18 EUR", page=2, pages=2, reference=invoice, uri="s3://docs/scan-1.pdf"),
        _row("scan-2", "ocr", run, "Page one", page=1, pages=2, reference="Page one\nPage two", uri="s3://docs/scan-2.pdf"),
        _row("scan-2", "ocr", run, error=too_big.format(id="scan-2", p=2, w=12000, h=9000, mp=108.0), page=2,
             pages=2, reference="Page one\nPage two", uri="s3://docs/scan-2.pdf"),
        _row("scan-3", "ocr", run, "Bonjour", language="fr", reference="Bonjour", uri="s3://docs/scan-3.pdf"),
        _row("scan-4", "ocr", run, error=too_big.format(id="scan-4", p=1, w=10000, h=9500, mp=95.0),
             uri="s3://docs/scan-4.pdf"),
    ]
    for r in rows:
        r.update(latency_s=2.0, input_tokens=900, output_tokens=60)
    _write(out, "ocr", f"part-{run}-000000.parquet", rows, DOCS)


def _meetings(out: Path) -> None:
    """Meetings run: transcript + summary; summary references in `reference_summarize` (en, de)."""
    run = "run-meetings-1"
    asr = [
        _row("meet-1", "asr", run, "we agreed to ship on friday", duration_s=1200.0, uri="s3://meetings/meet-1.wav",
             reference_summarize="The team agreed to ship on Friday."),
        _row("meet-2", "asr", run, "das team plant", language="de", duration_s=600.0, uri="s3://meetings/meet-2.wav",
             reference_summarize="Das Team plant den Start im Juni."),
        _row("meet-3", "asr", run, error="s3://meetings/meet-3.wav: no speech detected in 1800.0 s of audio",
             duration_s=1800.0, uri="s3://meetings/meet-3.wav"),
    ]
    summaries = [
        _row("meet-1", "summarize", run, "The team agreed to ship the release on Friday.", duration_s=1200.0,
             uri="s3://meetings/meet-1.wav", reference_summarize="The team agreed to ship on Friday."),
        _row("meet-2", "summarize", run, "Das Team plant den Start im Mai.", language="de", duration_s=600.0,
             uri="s3://meetings/meet-2.wav", reference_summarize="Das Team plant den Start im Juni."),
        _row("meet-3", "summarize", run, error="meet-3: no summary: the transcript is empty", duration_s=1800.0,
             uri="s3://meetings/meet-3.wav", reference_summarize="Nothing was said."),
    ]
    _write(out, "asr", f"part-{run}-000000.parquet", asr, MEETINGS)
    _write(out, "summarize", f"part-{run}-000000.parquet", summaries, MEETINGS)


def _runs(out: Path) -> None:
    runs = out / "_runs"
    runs.mkdir()
    (runs / "run-transcribe-1.json").write_text(json.dumps({
        "run_id": "run-transcribe-1", "job": "transcribe", "config": {"translate_to": ["de"]},
        "started_at": "2024-05-01T02:00:00+00:00", "finished_at": "2024-05-01T02:01:00+00:00",
        "wall_s": 60.0, "gpus": 2, "counts": {"asr": {"ok": 4, "error": 3}, "translate": {"ok": 4, "error": 3}},
        "audio_s": 1800.0, "input_tokens": 1400, "output_tokens": 350,
        "throughput": {"audio_s_per_s": 30.0}}))  # 0.5 audio h in 1/30 GPU h: 15 audio h per GPU h
    (runs / "run-ocr-1.json").write_text(json.dumps({
        "run_id": "run-ocr-1", "job": "ocr", "started_at": "2024-05-01T03:00:00Z",
        "finished_at": "2024-05-01T03:02:00Z", "wall_s": 120.0, "gpus": 1, "pages": 40}))  # 1200 pages per GPU h
    (runs / "run-meetings-1.json").write_text(json.dumps({"run_id": "run-meetings-1"}))  # every other key optional


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    _calls(out)
    _documents(out)
    _meetings(out)
    _runs(out)
    return out


@pytest.fixture(scope="module")
def report(output: Path) -> dict:
    return rp.build_report(str(output))


def test_counts(report: dict) -> None:
    assert report["rows"] == 10 + 7 + 6 + 3
    assert report["counts"] == {
        "asr": {"ok": 6, "error": 4, "total": 10},
        "translate": {"ok": 4, "error": 3, "total": 7},
        "ocr": {"ok": 4, "error": 2, "total": 6},
        "summarize": {"ok": 2, "error": 1, "total": 3},
    }
    assert report["status_totals"]["error"] == 10 and report["status_totals"]["total"] == 26
    assert report["duplicate_keys"] == 0
    assert report["tokens"]["ocr"] == {"input": 6 * 900, "output": 6 * 60}
    assert report["tokens"]["translate"]["output"] == 7 * 30


def test_error_groups(report: dict) -> None:
    groups = {g["reason"]: g for g in report["errors"]}
    decode = groups["<input>: cannot decode audio (Format not recognised)"]
    assert decode["count"] == 2 and decode["tasks"] == {"asr": 2} and decode["example_id"] == "call-004"
    assert decode["example_error"] == DECODE_ERR.format(id="call-004")
    # one cause across inputs, from two jobs with different naming (id vs uri)
    assert groups["<input>: no speech detected in <n> s of audio"]["count"] == 2
    assert groups["<input>: page <n> is <n>x<n> pixels (<n> MP), over the <n> MP limit (possible decompression "
                  "bomb); downscale it or raise max_pixels"]["count"] == 2
    assert sum(g["count"] for g in report["errors"]) == 10
    assert report["errors"][0]["count"] >= report["errors"][-1]["count"]


def test_normalize_error_keeps_the_cause() -> None:
    assert rp.normalize_error("/data/in/a b.wav: CUDA out of memory, tried 2.00 GiB", ["a b.wav"]) == \
        "<input>: CUDA out of memory, tried <n> GiB"
    assert rp.normalize_error(None) == "(no message)"
    assert rp.normalize_error("Phi-4 failed on 3f9a2c1d7e8b", []) == "Phi-4 failed on <hex>"


def test_throughput(report: dict) -> None:
    runs = {r["run_id"]: r for r in report["runs"]}
    assert runs["run-transcribe-1"]["gpu_hours"] == pytest.approx(2 * 60 / 3600)
    assert runs["run-transcribe-1"]["audio_hours_per_gpu_hour"] == pytest.approx(15.0)
    assert runs["run-ocr-1"]["pages_per_gpu_hour"] == pytest.approx(1200.0)
    meetings = runs["run-meetings-1"]  # no sizes in the record: taken from its rows, each input once
    assert meetings["sizes_from"] == "dataset" and meetings["audio_hours"] == pytest.approx(3600 / 3600)
    assert meetings["gpu_hours"] is None
    total = report["throughput"]
    assert total["audio_hours_per_gpu_hour"] == pytest.approx(15.0)  # ocr GPU time not counted against audio
    assert total["pages_per_gpu_hour"] == pytest.approx(1200.0)
    assert total["gpu_hours"] == pytest.approx(4 / 60)


def test_latency(report: dict) -> None:
    asr = report["latency"]["asr"]
    expected = [1.0 + i for i in range(7)] + [1.0] * 3
    assert asr["n"] == 10 and asr["p50"] == pytest.approx(float(np.percentile(expected, 50)))
    assert asr["max"] == 7.0 and report["latency"]["all"]["n"] == 26
    assert sum(sum(c) for c in report["latency_histogram"]["counts"].values()) == 26


def test_asr_scores_by_hand(report: dict) -> None:
    asr = report["scores"]["asr"]
    # corpus WER: (1 + 0 + 1) edits over (5 + 2 + 3) reference words
    assert asr["overall"]["wer"] == pytest.approx(0.2)
    assert asr["by_language"]["en"]["wer"] == pytest.approx(1 / 7)
    assert asr["by_language"]["es"]["wer"] == pytest.approx(1 / 3)
    assert asr["overall"]["n"] == 3 and asr["with_reference"] == 4 and asr["errors"] == 1
    worst = report["worst"]["asr"]
    assert [w["id"] for w in worst] == ["call-003", "call-001", "call-002"]
    fox = worst[1]
    assert fox["wer"] == pytest.approx(0.2) and fox["cer"] == pytest.approx(2 / 25)  # "jumps" -> "jumped"


def test_other_scores(report: dict) -> None:
    tr = report["scores"]["translate"]
    assert tr["overall"]["n"] == 2 and tr["errors"] == 1 and tr["skipped_transcript_reference"] == 1
    assert set(tr["by_target_language"]) == {"de", "en"} and set(tr["by_language"]) == {"en", "es"}
    assert tr["by_target_language"]["de"]["bleu"] == pytest.approx(100.0)
    assert 0 < tr["overall"]["chrf"] < 100
    ocr = report["scores"]["ocr"]  # scan-1 pages joined: 1 edit in 23 chars; scan-3 exact; scan-2 incomplete
    assert ocr["overall"]["cer"] == pytest.approx(1 / 30) and ocr["overall"]["n"] == 2
    assert ocr["skipped_incomplete"] == 1 and ocr["errors"] == 1
    summ = report["scores"]["summarize"]
    assert summ["by_language"]["de"]["rouge1"] == pytest.approx(6 / 7)  # non-ASCII-safe tokenizer
    assert summ["by_language"]["de"]["rouge2"] == pytest.approx(5 / 6)
    assert 0.5 < summ["by_language"]["en"]["rougeL"] < 1 and summ["errors"] == 1


def test_reads_through_a_given_filesystem(output: Path, report: dict) -> None:
    """An s3:// OUTPUT with a filesystem passed in (as for S3 later): bucket-relative paths."""
    import pyarrow.fs as pafs

    bucket = pafs.SubTreeFileSystem(str(output.parent), pafs.LocalFileSystem())
    other = rp.build_report(f"s3://{output.name}/", filesystem=bucket)
    assert other["counts"] == report["counts"] and other["scores"] == report["scores"]
    assert len(other["runs"]) == 3


def test_normalisation() -> None:
    assert scoring.normalize_text("  Don't   STOP—now!  ") == "dont stop now"
    assert scoring.normalize_text(None) == ""


def test_report_is_json(report: dict) -> None:
    json.dumps(report, allow_nan=False)


def test_dataset_reads_with_duckdb_and_pyarrow(output: Path) -> None:
    counts = dict(duckdb.sql(
        f"select task, count(*) from read_parquet('{output}/**/*.parquet', hive_partitioning=true) group by task"
    ).fetchall())
    assert counts == {"asr": 10, "translate": 7, "ocr": 6, "summarize": 3}
    wer_rows = duckdb.sql(
        f"select count(*) from read_parquet('{output}/**/*.parquet', hive_partitioning=true, union_by_name=true) "
        "where task = 'asr' and reference is not null").fetchall()[0][0]
    assert wer_rows == 4
    dataset = pads.dataset(str(output), format="parquet", partitioning="hive")
    table = dataset.to_table(columns=["id", "task", "status"])
    assert table.num_rows == 26 and set(table["task"].to_pylist()) == {"asr", "translate", "ocr", "summarize"}


def test_cli_writes_html_and_json(output: Path, tmp_path: Path, capsys) -> None:
    assert rp.main([str(output), "--html", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "asr" in text and "WER 20.0 %" in text and "15.0 audio h/GPU h" in text
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == 26
    assert rp.main([str(tmp_path / "missing")]) == 2


def test_empty_output(tmp_path: Path) -> None:
    (tmp_path / "_runs").mkdir()
    (tmp_path / "_runs" / "broken.json").write_text("{")
    (tmp_path / "_tmp").mkdir()  # writer leftovers: ignored like pyarrow ignores them
    (tmp_path / "_tmp" / "partial.parquet").write_bytes(b"not parquet")
    (tmp_path / ".part.parquet").write_bytes(b"not parquet")
    report = rp.build_report(str(tmp_path))
    assert report["rows"] == 0 and report["counts"] == {} and report["scores"] == {}
    assert report["warnings"] and "broken.json" in report["warnings"][0]
    rp.write_html(report, str(tmp_path / "empty.html"))  # renders without plots


def test_html_renders(report: dict, tmp_path: Path) -> None:
    from PIL import Image

    page = tmp_path / "report.html"
    rp.write_html(report, str(page))
    source = page.read_text(encoding="utf-8")
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', source)
    assert len(images) == 4  # status, throughput (3 runs), latency, WER per language
    for b64 in images:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.verify()
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100
    assert "call-003" in source and "&lt;input&gt;: cannot decode audio" in source
    assert not re.search(r"(src|href)=\"(?!data:)", source)  # self-contained: nothing fetched

    screenshot(page, tmp_path, (1280, 2000))
