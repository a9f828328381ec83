"""`--resume`: a rerun into the same output redoes only what is missing or failed, every key once.

(a) errors retried: an input that was missing gets its rows once it exists; the rows that were already
    ok are left exactly as the first run wrote them.
(b) a real kill: `python -m jobs.transcribe` with its own local Ray, SIGKILLed mid-run with all its
    processes, then resumed into the same output.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.manifest import passthrough_columns, validate_manifest
from schemas.results import result_schema
from tests.conftest import REPO, kill_session, read_output
from schemas.results import KEY_COLUMNS

MAX_NEW = "8"
KEY = list(KEY_COLUMNS)
CLIPS = ["audio/call_0001.wav", "audio/call_0002.flac", "audio/call_0003.ogg", "audio/call_0004.mp3"]


def _keys_once(rows: pd.DataFrame) -> None:
    dupes = rows[rows.duplicated(KEY, keep=False)]
    assert dupes.empty, dupes[KEY + ["run_id"]]


def test_resume_retries_errors_and_keeps_ok_rows(run_job, samples_copy):
    calls = pd.read_csv(samples_copy / "transcribe.csv").head(3)
    late = {"id": "late_call", "uri": "audio/late_call.wav", "language": "en", "reference": None,
            "customer_segment": "business"}
    manifest = samples_copy / "resume.csv"
    pd.concat([calls, pd.DataFrame([late])], ignore_index=True).to_csv(manifest, index=False)
    out = samples_copy.parent / "out"
    args = ("--translate-to", "fr", "--max-new-tokens", MAX_NEW)

    assert run_job("transcribe", manifest, out, *args, "--run-id", "first") == 0
    first = read_output(out).to_pandas()
    assert len(first) == 4 * 2  # asr + translate(fr) per input
    failed = first[first.id == "late_call"]
    assert (failed.status == "error").all() and failed.error.str.contains("not found").all()
    assert (first[first.id != "late_call"].status == "ok").all()

    # the recording arrives; the nightly rerun resumes into the same output
    shutil.copy(samples_copy / "audio" / "call_0001.wav", samples_copy / "audio" / "late_call.wav")
    assert run_job("transcribe", manifest, out, *args, "--run-id", "second", "--resume") == 0

    rows = read_output(out).to_pandas()
    assert len(rows) == 4 * 2
    _keys_once(rows)
    assert (rows.status == "ok").all(), rows[rows.status != "ok"][["id", "task", "error"]]
    redone = rows[rows.id == "late_call"]
    assert sorted(redone.task) == ["asr", "translate"] and (redone.run_id == "second").all()
    assert redone.error.isna().all() and redone.text.str.len().gt(0).all()
    assert (redone.customer_segment == "business").all()

    # the rows that were ok are the first run's rows, untouched: not recomputed, not rewritten
    cols = KEY + ["status", "text", "output_tokens", "run_id", "processed_at", "customer_segment"]
    kept = rows[rows.id != "late_call"][cols].sort_values(KEY, na_position="first").reset_index(drop=True)
    before = first[first.id != "late_call"][cols].sort_values(KEY, na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before, check_dtype=False)  # before: NaN-able (error rows)
    assert (kept.run_id == "first").all()

    # the second run's record counts only what it did; both runs finished, so both records exist
    second = json.loads((out / "_runs" / "second.json").read_text())
    assert second["counts"] == {"asr": {"ok": 1, "error": 0}, "translate": {"ok": 1, "error": 0}}
    assert (out / "_runs" / "first.json").exists()

    # a third resume finds nothing to do and changes nothing
    assert run_job("transcribe", manifest, out, *args, "--run-id", "third", "--resume") == 0
    again = read_output(out).to_pandas()
    assert len(again) == 8 and set(again.run_id) == {"first", "second"}
    assert json.loads((out / "_runs" / "third.json").read_text())["rows"] == 0


# -- the resume bookkeeping on hand-made outputs (no Ray) ---------------------------------------------

def _write_rows(out: Path, task: str, run_id: str, rows: list[dict], index: int = 0) -> Path:
    """A result file as the pipeline names and lays it out (the `task` only in the folder name)."""
    schema = result_schema(pa.schema([("uri", pa.string())]))
    schema = schema.remove(schema.get_field_index("task"))
    full = [{"page": 1, "status": "ok", "run_id": run_id, **r} for r in rows]
    path = out / f"task={task}" / f"part-{run_id}-{'ab' * 16}-{index:06d}-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path)
    return path


def test_superseded_rows_of_a_run_whose_name_extends_this_one_are_dropped(tmp_path):
    """Run ids "nightly-2" then "nightly": the older run's files are not this run's files."""
    import pyarrow.fs as pafs

    from pipeline.io.resume import drop_superseded

    _write_rows(tmp_path, "asr", "nightly-2", [{"id": "x", "status": "error", "error": "x.wav: not found"},
                                               {"id": "y", "text": "hello"}])
    _write_rows(tmp_path, "asr", "nightly", [{"id": "x", "text": "found now"}])
    assert drop_superseded(str(tmp_path), pafs.LocalFileSystem(), "nightly") == 1
    rows = read_output(tmp_path).to_pandas().set_index("id")
    assert sorted(rows.index) == ["x", "y"] and rows.run_id.to_dict() == {"x": "nightly", "y": "nightly-2"}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".rewrite")]


def test_rows_with_their_own_target_language_are_not_redone(tmp_path):
    """A manifest row's target_language overrides the job's --translate-to; once that one translation
    is written ok, resume has nothing left to do for the row."""
    from pipeline.io.resume import rows_to_redo
    from pipeline.io.storage import locate
    from schemas.config import JobConfig

    _write_rows(tmp_path, "asr", "first", [{"id": "a"}, {"id": "b"}, {"id": "c"}])
    _write_rows(tmp_path, "translate", "first", [{"id": "a", "target_language": "es"},
                                                 {"id": "b", "target_language": "fr"}])
    manifest = validate_manifest(pa.table({"id": ["a", "b", "c"], "uri": ["a.wav", "b.wav", "c.wav"],
                                           "target_language": ["es", None, None]}))
    config = JobConfig(job="transcribe", input="m.csv", output=str(tmp_path), translate_to=["fr"], resume=True)
    todo = rows_to_redo(manifest, config, locate(str(tmp_path)))
    assert todo["id"].to_pylist() == ["c"]  # c lacks its translation; a (es) and b (fr) are complete


# -- (b) a real process kill ---------------------------------------------------------------------------

N_INPUTS = 12
WHOLE = "part-first-0123456789abcdef0123456789abcdef-000000-0.parquet"  # names as the killed run's write
TORN = "part-first-0123456789abcdef0123456789abcdef-000001-0.parquet"


def _parquet_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.parquet") if "_runs" not in p.parts)


def _plant_killed_write(out: Path, manifest: pd.DataFrame, done_ids: list[str], torn_ids: list[str]) -> None:
    """What a kill during the write phase leaves in the output: a file that landed whole, with ok rows
    of the killed run, and one cut off mid-write (pyarrow writes local files in place, not by rename).

    Used when the kill landed before any file did; both are named as the killed run's write would name
    them. A torn file from a real kill during the write: tests/test_torn_write.py.
    """
    valid = validate_manifest(pa.Table.from_pandas(manifest, preserve_index=False))
    passthrough = valid.select(passthrough_columns(valid.schema)).schema
    schema = result_schema(passthrough)
    schema = schema.remove(schema.get_field_index("task"))  # the partition key lives in the folder name
    folder = out / "task=asr"
    folder.mkdir(parents=True, exist_ok=True)
    for ids, name in ((done_ids, WHOLE), (torn_ids, TORN)):
        src = manifest.set_index("id").loc[ids]
        rows = [{"id": i, "page": 1, "status": "ok", "text": f"transcript of {i} (killed run)",
                 "language": "en", "duration_s": 2.0, "input_tokens": 10, "output_tokens": 3,
                 "latency_s": 0.1, "model": "tiny", "run_id": "first",
                 "processed_at": pd.Timestamp("2024-05-01", tz="UTC"), "uri": src.uri[i]} for i in ids]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)
    torn = folder / TORN
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])


@pytest.mark.realsize
def test_killed_run_resumes_to_every_row_once(tiny_model, tmp_path):
    clips = tmp_path / "audio"
    shutil.copytree(REPO / "samples" / "audio", clips)
    manifest = pd.DataFrame({"id": [f"call_{i:03d}" for i in range(N_INPUTS)],
                             "uri": [str(clips / Path(CLIPS[i % 4]).name) for i in range(N_INPUTS)],
                             "language": "en"})
    manifest_path = tmp_path / "calls.csv"
    manifest.to_csv(manifest_path, index=False)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the session's
    env["PYTHONPATH"] = str(REPO)
    # a short temp dir of its own: Ray's socket paths must stay under 107 characters
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp

    def job(run_id: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "jobs.transcribe", str(manifest_path), str(out), "--model", tiny_model,
                "--max-new-tokens", MAX_NEW, "--run-id", run_id, *extra]

    log_path = tmp_path / "first.log"
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(job("first"), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            # kill it a few seconds into the Ray Data execution (models loading, batches in flight), or as
            # soon as an output file lands, whichever comes first
            started = deadline = None
            limit = time.monotonic() + 90
            while time.monotonic() < limit and proc.poll() is None:
                if started is None and "phi4mm: progress" in log_path.read_text(errors="replace"):
                    started = time.monotonic()
                    deadline = started + 3.0
                if _parquet_files(out) or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, f"the job ended before it could be killed:\n{log_path.read_text()[-3000:]}"
            assert started is not None, f"the job did not start its dataset in 90 s:\n{log_path.read_text()[-3000:]}"
        finally:
            left = kill_session(proc.pid)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert not left, f"processes of the killed job still alive: {left}"
        assert not (out / "_runs" / "first.json").exists(), "the killed run must not have a run record"

        landed = _parquet_files(out)
        # whatever the kill left can be read (or is a torn file that resume removes)
        planted = not landed
        if planted:
            _plant_killed_write(out, manifest, done_ids=["call_000", "call_001", "call_002"],
                                torn_ids=["call_003", "call_004"])
        killed_ok = set(pd.concat([_readable(p) for p in _parquet_files(out)] or [pd.DataFrame({"id": []})]).id)

        resumed = subprocess.run(job("second", "--resume"), cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    if planted:  # the torn file was removed by the resume, the whole one kept
        assert not (out / "task=asr" / TORN).exists() and (out / "task=asr" / WHOLE).exists()
    # every input has its row exactly once, and the dataset reads cleanly with both readers
    rows = read_output(out).to_pandas()  # pyarrow, no exclude_invalid_files: a torn file would fail here
    _keys_once(rows)
    assert sorted(rows.id) == sorted(manifest.id) and set(rows.task) == {"asr"}
    assert (rows.status == "ok").all(), rows[rows.status != "ok"][["id", "error"]]
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/**/*.parquet', hive_partitioning=true)").fetchall()[0][0]
    assert n == N_INPUTS
    # rows that landed whole before the kill were kept; everything else came from the resumed run
    by_id = rows.set_index("id")
    assert (by_id.loc[sorted(killed_ok), "run_id"] == "first").all()
    assert (by_id.drop(index=sorted(killed_ok)).run_id == "second").all()
    assert (out / "_runs" / "second.json").exists() and not (out / "_runs" / "first.json").exists()
    record = json.loads((out / "_runs" / "second.json").read_text())
    assert record["counts"] == {"asr": {"ok": N_INPUTS - len(killed_ok), "error": 0}}


def _readable(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path, columns=["id", "status"]).to_pandas().query("status == 'ok'")
    except (pa.ArrowInvalid, OSError):
        return pd.DataFrame({"id": []})
