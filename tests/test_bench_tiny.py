"""Every bench script's --tiny mode, through every engine it times, on CPU with the tiny checkpoint: the
GPU benchmark cannot break unseen (as committed on 2026-12-04 its engine workloads failed with
KeyError 'batches', also in --tiny, and nothing ran that mode)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE_WORKLOADS = ("asr", "ocr", "summarize")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("engine") != "suite_step"]


def check_suite_outputs(out: Path, stdout: str) -> None:
    """What a reader of a `bench.suite --tiny --ablate prefill --set batching.check_every=4` run expects."""
    assert sorted(os.listdir(out)) == ["suite.jsonl", "suite.md"]  # what comes back from the GPU host: a few files
    rows = _measured(_rows(out / "suite.jsonl"))
    assert not [r for r in rows if r["engine"] in ("failed", "skipped")], [r for r in rows if r["engine"] == "failed"]

    for name in ENGINE_WORKLOADS:
        mine = [r for r in rows if r["workload"] == name and not r.get("ablation")]
        engines = {r["engine"] for r in mine}
        assert {"card_recipe", "engine"} <= engines and any(e.startswith("generate_b") for e in engines), engines
        engine = next(r for r in mine if r["engine"] == "engine")
        assert engine["value"] > 0 and engine["fraction_of_arithmetic_floor"] is not None
        # float32 on CPU: the engine's prefill and generate's first step agree to summation order
        assert engine["first_step_within_tolerance"], engine
        assert engine["first_step_logits_max_rel_diff"] <= 1e-3
        # the engine's own stats are recorded whole (its keys, not a list of known ones)
        assert engine["engine_stats"]["batches"] >= 1 and engine["engine_stats"]["steps"] > 0
        assert engine["vs_generate"] and engine["vs_card_recipe"]
        assert engine["batching"]["check_every"] == 4  # the --set override reached the engine

    constrained = next(r for r in rows if r["workload"] == "extract" and r["engine"] == "engine_constrained")
    assert constrained["all_valid"] and constrained["vs_unconstrained"] > 0
    assert any(r["workload"] == "extract" and r["engine"] == "engine_unconstrained" for r in rows)

    ablation = {(r["workload"], r["ablation"]) for r in rows if r.get("ablation") and r["engine"] == "engine"}
    assert ablation == {("asr", "reference"), ("ocr", "reference"), ("asr", "prefill=model"), ("ocr", "prefill=model")}
    assert all(r.get("vs_reference") for r in rows if r.get("ablation") == "prefill=model")

    jobs = [r for r in rows if r["engine"] == "pipeline"]
    assert {r["workload"] for r in jobs} == {"meetings", "asr", "asr_calls", "ocr_docs"}
    for r in jobs:  # when a user sees the first result, and the run record's stage counters
        assert r["first_row_s"] is not None and 0 < r["first_row_s"] <= r["wall_s"] + 1, r
        assert any(k.startswith("engine_") for stage in r["counters"].values() for k in stage), r["counters"]
        assert r["engine_figure"]["value"] is not None  # the engine's figure of the same run beside it
    docs = next(r for r in jobs if r["workload"] == "ocr_docs")
    assert docs["vs_engine"] and docs["peak_host_gb"] > 0
    # one size each in the smoke run: the marginal rows' arithmetic is test_job_phase_pairs_and_budget's
    assert any(r["workload"] == "asr_calls" and r["engine"] == "pipeline_marginal" for r in rows)

    text = (out / "suite.md").read_text()
    for target in ("asr engine (RTFx)", "ocr engine (pages/s)", "summarize engine (items/s)", "extract:",
                   "asr_calls", "meetings", "ocr_docs", "host memory peak", "first result row"):
        assert target in text and target in stdout, target
    assert "1,757" in text and "0.632" in text  # today's figures beside this run's
    table = [line.split(" | ") for line in text.split("Where the time went")[0].splitlines()
             if line.startswith("| ") and "projected" not in line][1:]
    figures = {cells[0].strip("| "): cells[3] for cells in table}
    assert len(figures) == 12 and [k for k, v in figures.items() if v == "-"] == \
        ["asr_calls 6->6 calls: marginal vs equal 30 s clips"], figures  # every target has a figure but that


@pytest.mark.realsize  # a command of its own that starts its own Ray and runs every whole job
def test_suite_tiny_runs_every_step(tmp_path):
    """`python -m bench.suite --tiny` as the lead runs it on the GPU (a command of its own, its own Ray):
    every engine workload through the card recipe, batched generate and the engine, extract both ways,
    an ablation, every whole job; every row where a reader expects it, the targets table printed."""
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PHI4MM_PROGRESS_EVERY_S": "60",
           "RAY_raylet_start_wait_time_s": "300"}  # a busy shared test machine starts Ray slowly
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "bench.suite", "--tiny", "--out", str(out), "--scratch", str(scratch),
                           "--ablate", "prefill", "--set", "batching.check_every=4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    check_suite_outputs(out, proc.stdout)


@pytest.fixture
def bench_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PHI4MM_PROGRESS_EVERY_S", "60")


def test_run_bench_tiny_translate_fused(bench_env, tmp_path):
    """bench/run_bench.py --tiny on the workload the suite leaves out (translate), with the fused prefill
    forced on (`--set`), so the first-step check runs the fused path (the GPU's) against generate."""
    from bench import run_bench

    rows = run_bench.main(["--tiny", "--workloads", "translate", "--slots", "4", "--engine-items", "8",
                           "--gen-batch", "4", "--b32-batches", "1", "--card-items", "1",
                           "--set", "batching.prefill=fused", "--out", str(tmp_path / "out"),
                           "--scratch", str(tmp_path / "scratch")])
    assert not [r for r in rows if r["engine"] == "failed"], rows
    engine = next(r for r in rows if r["engine"] == "engine")
    assert engine["first_step_path"] == "fused" and engine["first_step_within_tolerance"], engine
    assert engine["batching"]["prefill"] == "fused"
    assert {r["engine"] for r in rows if r["workload"] == "translate"} == {"card_recipe", "generate_b4", "engine"}
    assert (tmp_path / "out" / "results.jsonl").exists() and (tmp_path / "out" / "RESULTS.md").exists()


def test_extract_and_profile_scripts_tiny(bench_env, tmp_path):
    from bench import extract_bench, profile_prefill

    rows = extract_bench.main(["--tiny", "--out", str(tmp_path), "--scratch", str(tmp_path / "scratch")])
    # the constrained run serial, then pipelined (--grammar-pipeline both, the default), then unconstrained
    assert [(r["engine"], r.get("grammar_pipeline")) for r in rows] == \
        [("engine_constrained", "off"), ("engine_constrained", "auto"), ("engine_unconstrained", None)]
    assert all(r["all_valid"] and r["engine_stats"]["steps"] > 0 for r in rows[:2])
    assert rows[0]["vs_unconstrained"] > 0 and rows[1]["vs_unconstrained"] > 0
    profile_prefill.main(["--tiny", "--batches", "4", "--slots", "8", "--out", str(tmp_path),
                          "--scratch", str(tmp_path / "scratch")])
    parts = {json.loads(line).get("part") for line in (tmp_path / "profile.jsonl").read_text().splitlines()}
    assert {"prefill_full", "prefill_fused_full", "decode_step"} <= parts
    assert not [line for line in (tmp_path / "profile.jsonl").read_text().splitlines() if '"error"' in line]


def test_engine_stats_are_read_not_reset():
    """The bench takes differences of the engine's cumulative stats: every key kept, new ones included,
    the engine's own dict untouched (rebuilding it from known keys broke the engine: KeyError 'batches')."""
    from bench.run_bench import stats_delta

    stats = {"prefill_s": 1.0, "steps": 10, "batches": 2, "warmup_s": 3.0, "path": "fused"}
    before = dict(stats)
    stats.update(prefill_s=1.5, steps=26, batches=3, prefill_retries=1)
    assert stats_delta(before, stats) == {"prefill_s": 0.5, "steps": 16, "batches": 1, "warmup_s": 0.0,
                                          "path": "fused", "prefill_retries": 1}


def test_overrides_and_ablations_are_checked_before_any_gpu_time():
    from bench.run_bench import parse_overrides, with_overrides
    from bench.suite import ablation_values

    assert parse_overrides(["batching.decode_slots=512", "batching.prefill=model"]) == \
        {"batching": {"decode_slots": 512, "prefill": "model"}}
    with pytest.raises(SystemExit, match="decode_slotz"):
        parse_overrides(["batching.decode_slotz=512"])
    with pytest.raises(SystemExit, match="SECTION.FIELD=VALUE"):
        parse_overrides(["decode_slots=512"])
    assert with_overrides({"batching": {"decoder": "static"}}, {"batching": {"decode_slots": 8}}) == \
        {"batching": {"decoder": "static", "decode_slots": 8}}
    assert ablation_values("prefill,decoder") == [("prefill", "model"), ("decoder", "generate")]
    with pytest.raises(SystemExit, match="no field"):
        ablation_values("no_such_path")


def test_targets_table_from_rows():
    """The targets table reads each target's figure from the rows it is measured in, says met or not,
    and projects a quick-size whole job to the target's size from the GPU pool's span rate."""
    import argparse

    from bench.suite import projected, target_lines

    rows = [
        {"workload": "asr", "engine": "engine", "value": 3700.0, "fraction_of_arithmetic_floor": 0.5,
         "first_step_logits_max_rel_diff": 0.03, "first_step_tolerance": 0.1, "first_step_top1_same": "8/8",
         "first_step_path": "fused"},
        {"workload": "ocr", "engine": "engine", "value": 5.0, "fraction_of_arithmetic_floor": 0.2},
        {"workload": "extract", "engine": "engine_constrained", "vs_unconstrained": 0.95, "valid_json": "127/128",
         "all_valid": False},
        {"workload": "asr_calls", "engine": "pipeline_marginal", "value": 1000.0, "vs_equal_30s": 0.91,
         "equal_30s_marginal_rtfx": 1100.0},
        {"workload": "asr", "engine": "pipeline", "items": 512, "first_row_s": 19.0, "value": 400.0},
        {"workload": "ocr_docs", "engine": "pipeline", "value": 2.0, "wall_s": 50.0, "vs_engine": 0.4,
         "peak_host_gb": 9.0, "stages": [{"stage": "MapBatches(VisionStage)", "wall_s": 20.0}]},
    ]
    lines = {t.workload: t for t in target_lines(rows, argparse.Namespace(job_sizes="quick", tiny=False))}
    assert lines["asr engine (RTFx)"].met == "yes" and lines["ocr engine (pages/s)"].met == "no"
    assert lines["summarize engine (items/s)"].met == "not run"
    assert lines["asr first-step logits vs generate (rel. L2)"].met == "yes"
    assert lines["extract: constrained / unconstrained items/s"].met == "no (invalid answers)"
    assert lines["first result row, 512 equal 30 s clips (s after the job starts)"].met == "yes"
    assert lines["ocr_docs 100 pages: host memory peak (GB)"].met == "yes"
    # 100 pages in 50 s, the vision pool busy for 20 of them: 200 more pages take 40 s more
    assert projected(rows[-1], 100, 300, "VisionStage") == pytest.approx(300 / 90)
    proj = lines["  projected to 300 pages (this run + 200 pages at the vision pool's span rate)"]
    assert proj.now == f"{300 / 90 / 5.0:.3g}" and proj.met == "no (projected)"


def _record(audio_s: float, wall_s: float) -> dict:
    return {"audio_s": audio_s, "wall_s": wall_s, "pages": 0, "counts": {}, "counters": {}, "stages": []}


def test_job_phase_pairs_and_budget(monkeypatch, tmp_path):
    """The suite's whole-job phase at its GPU sizes with the jobs faked (no Ray): the equal clips and the
    calls each run at two sizes, in order, and their marginal rows come out of the wall differences; a
    step whose estimate passes the limit is skipped and said so, the rest still run."""
    import argparse

    import bench.asr_calls as asr_calls
    import bench.pipeline_jobs as pipeline_jobs
    import bench.run_bench as run_bench
    from bench import suite

    ran = []

    def fake_equal(args, ckpt, rows, meta, gpus, n):
        ran.append(("equal", n))
        record = _record(30.0 * n, 20.0 + 30.0 * n / 1200)  # 20 s to start, then 1,200x
        rows.append({**meta, "workload": "asr", "engine": "pipeline", "items": n, "value": 30.0 * n / record["wall_s"],
                     "wall_s": record["wall_s"], "first_row_s": 12.0})
        return record

    def fake_calls(args, ckpt, rows, meta, paths, n, config_for, where):
        ran.append(("calls", n))
        assert config_for("m", "o")["job"] == "transcribe" and len(paths) == 200
        return _record(113.0 * n, 25.0 + 113.0 * n / 1000)  # 25 s to start, then 1,000x

    monkeypatch.setattr(run_bench, "bench_pipeline", fake_equal)
    monkeypatch.setattr(asr_calls, "run_calls", fake_calls)
    monkeypatch.setattr(asr_calls, "prepare_calls", lambda args, n, repo: [f"call-{k}.wav" for k in range(n)])
    monkeypatch.setattr(pipeline_jobs, "bench_meetings", lambda *a: ran.append(("meetings",)))
    monkeypatch.setattr(pipeline_jobs, "bench_ocr_docs", lambda *a: ran.append(("ocr_docs",)))
    args = argparse.Namespace(tiny=False, job_sizes="quick", only="", scratch=str(tmp_path), out=str(tmp_path),
                              peak_tflops=790.0, overrides_parsed={}, decoder_params=(10, 1))
    rows: list[dict] = []
    suite.job_phase(args, rows, {"card": "test"}, suite.Budget(limit_s=10_000), print)
    assert ran == [("meetings",), ("equal", 64), ("equal", 512), ("calls", 50), ("calls", 200), ("ocr_docs",)]
    equal = next(r for r in rows if r.get("engine") == "pipeline_marginal" and r["workload"] == "asr")
    assert equal["value"] == pytest.approx(1200.0)
    calls = next(r for r in rows if r.get("engine") == "pipeline_marginal" and r["workload"] == "asr_calls")
    assert calls["value"] == pytest.approx(1000.0, rel=1e-3) and calls["vs_equal_30s"] == pytest.approx(0.833, abs=1e-3)
    assert calls["equal_30s_marginal_rtfx"] == pytest.approx(1200.0)
    assert not [r for r in rows if r["engine"] in ("failed", "skipped")]

    ran.clear()
    rows = []
    import time

    late = suite.Budget(limit_s=100, started=time.perf_counter() - 90)  # 90 s gone: no job fits in 10 more
    suite.job_phase(args, rows, {"card": "test"}, late, print)
    assert ran == []
    assert [r["workload"] for r in rows if r["engine"] == "skipped"] == \
        ["meetings", "asr", "asr", "asr_calls", "asr_calls", "ocr_docs"]
    assert not [r for r in rows if r["engine"] in ("failed", "pipeline_marginal")]
