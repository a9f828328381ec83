"""Progress by default: a long job tells a person what it is doing; --quiet turns it off."""
from __future__ import annotations

import json
import re

import pytest

from jobs.progress import progress_line
from tests.conftest import read_output


def test_progress_line_says_inputs_rows_audio_rate_and_time_left():
    counters = {"PreparePrompts": {"rows_in": 10, "inputs_prepared": 10},
                "ResultRows": {"inputs_done": 4, "rows_out": 8, "error_rows": 1, "audio_s_done": 7200.0}}
    line = progress_line(counters, 20, 60.0)
    assert line == ("phi4mm: progress 1m00s: inputs 10/20 prepared, 4/20 done, 8 rows written (1 errors), "
                    "2.00 h of audio (120x real time), about 4m00s left")
    assert "pages" not in line and "left" not in progress_line({}, 20, 5.0)


def test_jobs_show_progress_by_default_and_not_with_quiet(transcribe_run, capsys, monkeypatch, tmp_path):
    """The session's transcribe run (good and broken calls, every 1 s) printed progress lines that end
    with every input prepared and done, every row written and its error rows counted."""
    samples, good, bad, out = transcribe_run
    lines = [l for l in (out.parent / "console.txt").read_text().splitlines() if l.startswith("phi4mm: progress")]
    assert lines, (out.parent / "console.txt").read_text()[-2000:]
    n = len(good) + len(bad)
    rows = read_output(out)
    errors = sum(s != "ok" for s in rows["status"].to_pylist())
    assert errors > 0  # the broken calls' rows
    assert re.search(rf"inputs {n}/{n} prepared, {n}/{n} done, {rows.num_rows} rows written \({errors} errors\), "
                     r"[0-9.]+ h of audio", lines[-1]), lines[-1]
    manifest = samples / "transcribe.csv"
    # --quiet: the job runs without a progress reporter (what it would run, not run again)
    from jobs import cli, runner

    seen = []
    monkeypatch.setattr(runner, "run_job", lambda config, settings: seen.append(settings.progress) or
                        {"run_id": config.run_id, "counts": {}, "wall_s": 0.0})
    assert cli.main(["transcribe", str(manifest), str(tmp_path / "b"), "--quiet"]) == 0
    assert seen == [False] and "phi4mm: progress" not in capsys.readouterr().err


@pytest.mark.parametrize("job_run", ["transcribe_run", "ocr_run", "meetings_run"])
def test_every_job_counts_its_prepared_inputs(job_run, request):
    """The line as the reporter prints it from each job's counters (the prompt job's: tests/test_structured.py,
    test_the_progress_line_counts_the_prompt_jobs_prepared_inputs): every input prepared and done."""
    out = request.getfixturevalue(job_run)[-1]
    record = json.loads(next((out / "_runs").glob("*.json")).read_text())
    n = len(set(read_output(out)["id"].to_pylist()))
    assert f"inputs {n}/{n} prepared, {n}/{n} done" in progress_line(record["counters"], n, 60.0)
