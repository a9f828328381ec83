"""`phi4mm report` over the real output of a pipeline run (the session's transcribe job on the tiny model),
and the same output read by the analysts' tools: DuckDB and pyarrow must agree with the report.

The tiny model's text is noise, so the scores are bad (WER near or above 1); what is checked is that
they are computed from the run's own references, finite, and shown with the worst rows.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re

import duckdb
import pyarrow.dataset as pads
import pytest
from PIL import Image

from jobs.cli import main
from tests.screenshot import screenshot

PLOTS = ("rows per task and status", "latency histogram", "ASR error rate per language")


@pytest.fixture(scope="module")
def report_files(transcribe_run, tmp_path_factory):
    samples, good, bad, out = transcribe_run
    folder = tmp_path_factory.mktemp("report")
    html, js = folder / "report.html", folder / "report.json"
    assert main(["report", str(out), "--html", str(html), "--json", str(js)]) == 0
    return transcribe_run, html, json.loads(js.read_text())


def test_report_counts_and_scores_of_the_run(report_files, capsys):
    (samples, good, bad, out), html, report = report_files
    n = len(good) + len(bad)
    assert report["rows"] == 4 * n and report["duplicate_keys"] == 0
    assert report["counts"]["asr"] == {"ok": len(good), "error": len(bad), "total": n}
    assert report["counts"]["translate"] == {"ok": 2 * len(good), "error": 2 * len(bad), "total": 2 * n}
    assert report["counts"]["summarize"]["total"] == n
    assert [r["run_id"] for r in report["runs"]] == ["e2e-transcribe"]
    # the bad inputs' reasons are grouped, one group per cause
    reasons = " | ".join(g["reason"] for g in report["errors"])
    assert "not found" in reasons and "cannot decode audio" in reasons and "no samples" in reasons

    asr = report["scores"]["asr"]
    assert asr["with_reference"] == len(good) and asr["errors"] == 0  # the bad rows carry no reference
    assert asr["overall"]["n"] == len(good)
    for value in (asr["overall"]["wer"], asr["overall"]["cer"], asr["by_language"]["en"]["wer"]):
        assert isinstance(value, float) and math.isfinite(value) and value >= 0
    # translate/summarize rows carry the transcript reference (passed through): not scored against it
    for task, per_input in (("translate", 2), ("summarize", 1)):
        scores = report["scores"][task]
        assert scores["skipped_transcript_reference"] == per_input * len(good), scores
        assert scores["overall"]["n"] == 0

    worst = report["worst"]["asr"]
    assert sorted(r["id"] for r in worst) == sorted(good.id)
    assert [r["score"] for r in worst] == sorted((r["score"] for r in worst), reverse=True)
    assert all(math.isfinite(r["score"]) and r["reference"] and r["metric"] == "wer" for r in worst)


def test_report_html_renders_with_its_plots(report_files, tmp_path):
    (samples, good, bad, out), html, report = report_files
    source = html.read_text(encoding="utf-8")
    images = dict((alt, b64) for b64, alt in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)"',
                                                        source))
    assert set(PLOTS) <= set(images), sorted(images)  # one run: no throughput-over-time plot
    for alt in PLOTS:
        img = Image.open(io.BytesIO(base64.b64decode(images[alt])))
        img.verify()
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100
    worst_id = report["worst"]["asr"][0]["id"]
    assert "Worst rows" in source and f"<code>{worst_id}</code>" in source
    assert not re.search(r"(src|href)=\"(?!data:)", source)  # self-contained

    screenshot(html, tmp_path, (1280, 2400))


def test_duckdb_pyarrow_and_report_agree(report_files):
    (samples, good, bad, out), html, report = report_files
    duck = dict(duckdb.sql(
        f"select task, count(*) from read_parquet('{out}/**/*.parquet', hive_partitioning=true) group by task"
    ).fetchall())
    table = pads.dataset(str(out), format="parquet", partitioning="hive", ignore_prefixes=["_", "."]).to_table()
    arrow = table.group_by("task").aggregate([("id", "count")]).to_pydict()
    arrow = dict(zip(arrow["task"], arrow["id_count"]))
    from_report = {task: c["total"] for task, c in report["counts"].items()}
    assert duck == arrow == from_report == {"asr": 9, "translate": 18, "summarize": 9}
    # ok/error per task agree too, and DuckDB sees the pass-through column with the data
    duck_ok = dict(duckdb.sql(
        f"select task, count(*) filter (where status = 'ok') from read_parquet('{out}/**/*.parquet', "
        "hive_partitioning=true) group by task").fetchall())
    assert duck_ok == {task: c["ok"] for task, c in report["counts"].items()}
    segments = duckdb.sql(
        f"select count(distinct customer_segment) from read_parquet('{out}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()[0][0]
    assert segments == len(set(good.customer_segment) | set(bad.customer_segment))
