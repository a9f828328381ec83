"""One GPU run that measures everything: every engine workload and every whole job, at a quick size,
each target printed beside its figure of 2026-12-04 and today's.

Device command (one H200; run from the repository root with `.gpu-bundle` carried: it holds
`site.tar.xz`, ~42 MiB, built here by `bash ../shared/gpu-host/make-bundle.sh`, the packages the GPU
host lacks: ray, soundfile, pydantic, soxr, pypdfium2, silero-vad, llguidance, jsonschema, tenacity):

    set -o pipefail; mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu-bundle/site.tar.xz &&
    HF_HUB_OFFLINE=1 PHI4MM_PROGRESS_EVERY_S=30 PYTHONPATH=/tmp/site:$PWD python3 -m bench.suite --out $OUT 2>&1 | tee $OUT/suite.log

It writes three files to --out (suite.jsonl: one JSON object per measurement, as bench/results.jsonl
holds them; suite.md: the targets table, every row and where the time went; the log from `tee`), and
appends the rows and the tables to bench/results.jsonl and bench/RESULTS.md of the checkout it runs in.
Back on the CPU machine, `python -m bench.suite --append-from DIR` appends a fetched run to this
checkout's bench/results.jsonl and bench/RESULTS.md.

What runs, in order (quick sizes; `--size target` runs the targets' own sizes instead):
- engine phase, in a child process that holds the model (real shapes, random bf16 weights): for asr
  (512 x 30 s clips, 100 tokens), ocr (64 pages of 1700x2200, 400 tokens) and summarize (128 prompts of
  4k tokens, 300 tokens) the model card's recipe (1 item), batched `generate` (asr 32 items, ocr and
  summarize 8) and the engine, with the engine's first-step logits against `generate`'s; then extract
  (128 prompts, a 5-field schema, constrained vs unconstrained). `--ablate FIELD[,FIELD]` then re-runs
  the asr and ocr engine at a small size with each batching field off (bool: false; a choice: "off",
  or FIELD=VALUE), beside a reference run of the same size, so the run shows which fast path paid;
- whole jobs, in this process with one local Ray started while the engine phase runs (the job inputs
  are written meanwhile too): 2 one-hour meetings, equal 30 s clips (64, then 512: the first-row
  target), calls of 3 s-10 min (50, then 200: the marginal target against the equal clips'), and ~100
  pages of PDFs and scans through `phi4mm ocr` (host memory peak).
A step whose estimated time would take the run past --limit-s is skipped and said so (its row has
engine "skipped"): run it again with `--only STEP` when that happens. On one H200 the engine phase takes
~4 minutes at 2026-12-04's speeds and the jobs ~6 (each job ~40 s of start-up before its work), so the
last job (ocr_docs) is skipped there (then: `--only ocr,ocr_docs`, ~3 minutes); with the targets met
(first row <= 20 s, engines twice as fast) the whole run takes ~6-7 minutes.
`--set SECTION.FIELD=VALUE` (repeatable) overrides the engine's batching and every job's config.
`--tiny` runs every step at toy size on the tiny checkpoint on CPU (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Today's figures, copied from the baseline run (one H200, random real-shaped bf16 weights, the bench at
# commit 8064a62): /work/shared/perf/2026-12-04/README.md and results.jsonl
BASELINE_SOURCE = "/work/shared/perf/2026-12-04 (one H200, commit 8064a62)"
BASELINE = {
    "asr_engine_rtfx": 1757.0, "asr_engine_floor": 0.241,
    "ocr_engine_pages_per_s": 3.26, "ocr_engine_floor": 0.155,
    "summarize_engine_items_per_s": 4.60, "summarize_engine_floor": 0.163,
    "extract_vs_unconstrained": 0.80, "extract_valid": "128/128",
    "asr_first_step_rel_diff": 0.04748, "ocr_first_step_rel_diff": 0.02428, "summarize_first_step_rel_diff": 0.0411,
    "asr_calls_vs_equal_30s": 0.632, "asr_calls_marginal_rtfx": 754.4, "equal_30s_marginal_rtfx": 1193.4,
    "meetings_rtfx": 233.1,  # 8 x 1 h, 123.6 s
    "ocr_docs_vs_engine": 0.51, "ocr_docs_host_gb": 20.32,  # 300 pages in 68 files, 179 s
    "first_row_s_512": 45.0,  # 512 equal clips: first row ~45 s of a 49.5 s run
}

# (engine workloads) items timed per engine; slots; card recipe items; batched generate's batch size
ENGINE_SIZES = {
    "gpu": {"asr": {"engine_items": 512, "slots": "256", "card_items": 1, "gen_batch": 32},
            "ocr": {"engine_items": 64, "slots": "256", "card_items": 1, "gen_batch": 8},
            "summarize": {"engine_items": 128, "slots": "256", "card_items": 1, "gen_batch": 8}},
    "tiny": {"asr": {"engine_items": 8, "slots": "4", "card_items": 1, "gen_batch": 4},
             "ocr": {"engine_items": 2, "slots": "4", "card_items": 1, "gen_batch": 2},
             "summarize": {"engine_items": 4, "slots": "4", "card_items": 1, "gen_batch": 2}},
}
EXTRACT_SIZES = {"gpu": {"items_n": 128, "slots": 128, "tokens": 4000, "max_new": 160, "distinct": 8},
                 "tiny": {"items_n": 6, "slots": 4, "tokens": 700, "max_new": 400, "distinct": 3}}
ABLATION_SIZES = {"gpu": {"asr": {"engine_items": 256, "slots": "128"}, "ocr": {"engine_items": 16, "slots": "16"}},
                  "tiny": {"asr": {"engine_items": 4, "slots": "2"}, "ocr": {"engine_items": 1, "slots": "2"}}}
# whole jobs: meetings (one hour each), equal 30 s clips (small, large), calls (small, large), ocr pages
JOB_SIZES = {
    "quick": {"meetings": 2, "equal_clips": (64, 512), "asr_calls": (50, 200), "ocr_docs": 100},
    "target": {"meetings": 8, "equal_clips": (128, 512), "asr_calls": (100, 400), "ocr_docs": 300},
    # the smoke run: one size each (a whole job costs ~20 s of actor start-up on a small CPU machine; the
    # two-size arithmetic is tested without Ray, tests/test_bench_tiny.py)
    "tiny": {"meetings": 1, "equal_clips": (6,), "asr_calls": (6,), "ocr_docs": 6},
}
TARGET_SIZES = JOB_SIZES["target"]
# seconds each step took on 2026-12-04's code (an H200), at the quick sizes: what the budget plans with,
# scaled by how fast this run's earlier jobs went against their estimates
STEP_ESTIMATE_S = {"meetings": 61, "equal_clips_small": 40, "equal_clips_large": 50, "asr_calls_small": 52,
                   "asr_calls_large": 75, "ocr_docs": 86}
JOB_STEPS = ("meetings", "equal_clips", "asr_calls", "ocr_docs")
ENGINE_STEPS = ("asr", "ocr", "summarize", "extract")
# bool fields are turned off with False; a choice field with "off" among its values with "off"; these
# with the value that runs the previous path
OFF_VALUES = {"prefill": "model", "decoder": "generate"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="every engine workload and whole job in one run, with targets")
    ap.add_argument("--out", default="/tmp/phi4mm-suite", help="where suite.jsonl and suite.md go ($OUT on the GPU)")
    ap.add_argument("--scratch", default="/tmp/phi4mm-bench")
    ap.add_argument("--tiny", action="store_true", help="every step at toy size, tiny checkpoint, CPU")
    ap.add_argument("--size", choices=("quick", "target"), default="quick",
                    help="whole jobs' sizes: quick (fits 8 minutes with the engine phase) or the targets' own")
    ap.add_argument("--only", default="", help="comma list of steps: " + ",".join(ENGINE_STEPS + JOB_STEPS)
                    + " (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--ablate", default="", metavar="FIELD[=VALUE][,FIELD...]",
                    help="re-run the asr and ocr engine at a small size with each batching field off")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the planned wall time (printed against)")
    ap.add_argument("--limit-s", type=float, default=570.0,
                    help="a step is skipped when its estimate would take the run past this")
    ap.add_argument("--engine-timeout-s", type=float, default=330.0,
                    help="the engine phase is stopped after this (its rows so far are kept); +90 s per "
                         "--ablate field")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="measured bf16 matmul rate of the card")
    ap.add_argument("--record", choices=("auto", "yes", "no"), default="auto",
                    help="append to bench/results.jsonl and bench/RESULTS.md (auto: yes on a GPU run)")
    ap.add_argument("--append-from", default="", help="append a fetched run's suite.jsonl / suite.md, then exit")
    ap.add_argument("--phase", choices=("all", "engine"), default="all", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default="", help=argparse.SUPPRESS)
    return ap


# -- the steps' settings ---------------------------------------------------------------------------
def bench_args(args, **extra):
    """The namespace bench/run_bench.py's functions read, for this suite's settings."""
    from bench.run_bench import finish_args
    from bench.run_bench import parser as bench_parser

    argv = ["--scratch", args.scratch, "--out", args.out, "--peak-tflops", str(args.peak_tflops)]
    if args.tiny:
        argv.append("--tiny")
    out = finish_args(bench_parser().parse_args(argv))
    out.overrides = args.overrides_parsed
    out.stage_files = False  # the rows carry the stage counters; --out holds only the suite's files
    for key, value in extra.items():
        setattr(out, key, value)
    return out


def ablation_values(spec: str) -> list[tuple[str, object]]:
    """`FIELD[=VALUE],...` as (field, value) pairs: a value given is used as it is; else a bool field is
    turned off with False, a choice field with "off" when it has that value, or with OFF_VALUES."""
    from schemas.config import BatchingConfig

    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, sep, text = part.partition("=")
        info = BatchingConfig.model_fields.get(name)
        if info is None:
            raise SystemExit(f"--ablate: BatchingConfig has no field {name!r}")
        if sep:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
        elif info.annotation is bool:
            value = False
        elif "off" in typing.get_args(info.annotation):
            value = "off"
        elif name in OFF_VALUES:
            value = OFF_VALUES[name]
        else:
            raise SystemExit(f"--ablate {name}: say which value turns it off ({name}=VALUE; its values: "
                             f"{typing.get_args(info.annotation) or info.annotation})")
        BatchingConfig(**{name: value})  # a value the field refuses fails here, before any GPU time
        out.append((name, value))
    return out


def selected(args, step: str) -> bool:
    only = [s for s in args.only.split(",") if s]
    return not only or step in only


# -- the engine phase (a child process: it holds the model and the GPU until it exits) ---------------
def engine_phase(args) -> None:
    """Every engine workload on one model, rows appended to `args.rows` as they are measured."""
    from bench.extract_bench import bench_extract
    from bench.real_model import bench_model
    from bench.run_bench import (bench_meta, bench_workload, card_for, decoder_param_counts, failed_row,
                                 free_gpu)

    kind = "tiny" if args.tiny else "gpu"
    ckpt = os.path.join(args.scratch, "ckpt")
    meta = bench_meta()
    rows: list[dict] = []
    written = 0

    def flush():
        nonlocal written
        with open(args.rows, "a") as f:
            for row in rows[written:]:
                f.write(json.dumps(row) + "\n")
        written = len(rows)

    def step(name: str, fn) -> None:
        started = time.perf_counter()
        print(f"== suite: engine {name}", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one workload failing must not lose the others
            rows.append(failed_row(meta, name, exc))
        rows.append({**meta, "workload": name, "engine": "suite_step", "metric": "s", "items": 0,
                     "value": round(time.perf_counter() - started, 1), "wall_s": round(time.perf_counter() - started, 1)})
        flush()

    started = time.perf_counter()
    base = bench_model(ckpt, args.tiny)
    rows.append({**meta, "workload": "model", "engine": "suite_step", "metric": "s", "items": 0,
                 "value": round(time.perf_counter() - started, 1), "wall_s": round(time.perf_counter() - started, 1),
                 "decoder_params": decoder_param_counts(base)})
    flush()
    engine_names = [w for w in ("asr", "ocr", "summarize") if selected(args, w)]
    card = card_for(base, ckpt, engine_names, bench_args(args)) if engine_names else None
    for name in engine_names:
        sizes = ENGINE_SIZES[kind][name]
        wargs = bench_args(args, slots=sizes["slots"], engine_items=sizes["engine_items"],
                           card_items=sizes["card_items"], gen_batch=sizes["gen_batch"], b32_batches=1)
        wargs.slot_counts = [int(s) for s in sizes["slots"].split(",")]
        wargs.slots = wargs.slot_counts[-1]
        step(name, lambda name=name, wargs=wargs: bench_workload(name, wargs, ckpt, base, card, rows, meta))
    card = None  # the card's copy of the model freed
    free_gpu()
    if selected(args, "extract"):
        step("extract", lambda: bench_extract(base, ckpt, rows, meta, overrides=args.overrides_parsed,
                                              **EXTRACT_SIZES[kind]))
    if args.ablate:
        ablations = [("reference", None)] + [(f"{f}={v}", (f, v)) for f, v in ablation_values(args.ablate)]
        for label, change in ablations:
            for name in ("asr", "ocr"):
                sizes = ABLATION_SIZES[kind][name]
                overrides = json.loads(json.dumps(args.overrides_parsed))
                if change:
                    overrides.setdefault("batching", {})[change[0]] = change[1]
                wargs = bench_args(args, engine_items=sizes["engine_items"], first_step_items=0,
                                   row_extra={"ablation": label})
                wargs.overrides = overrides
                wargs.slot_counts = [int(sizes["slots"])]
                wargs.slots = wargs.slot_counts[-1]
                step(f"{name} [{label}]", lambda name=name, wargs=wargs: bench_workload(
                    name, wargs, ckpt, base, None, rows, meta, with_baselines=False))
        reference = {r["workload"]: r["value"] for r in rows
                     if r.get("ablation") == "reference" and r.get("engine") == "engine"}
        for r in rows:
            if r.get("ablation") not in (None, "reference") and r.get("engine") == "engine" and reference.get(r["workload"]):
                r["vs_reference"] = round(r["value"] / reference[r["workload"]], 3)
        open(args.rows, "w").close()  # rewritten whole: the ratios were added to earlier rows
        written = 0
        flush()
    base = None
    free_gpu()


@dataclass
class EnginePhase:
    """The engine phase as a child process (so the GPU and the host memory it held are free for the
    jobs), stopped after its timeout; the rows it wrote either way."""
    child: subprocess.Popen
    rows_file: str
    timeout_s: float
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, args, argv: list[str]) -> "EnginePhase":
        rows_file = os.path.join(args.scratch, "suite-engine-rows.jsonl")
        open(rows_file, "w").close()
        cmd = [sys.executable, "-m", "bench.suite", *argv, "--phase", "engine", "--rows", rows_file]
        timeout = args.engine_timeout_s + 90 * len([p for p in args.ablate.split(",") if p.strip()])
        return cls(subprocess.Popen(cmd, cwd=REPO), rows_file, float("inf") if args.tiny else timeout)

    def finish(self, log) -> list[dict]:
        left = self.timeout_s - (time.perf_counter() - self.started)
        try:
            rc = self.child.wait(timeout=max(1.0, left) if left != float("inf") else None)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = f"stopped after {self.timeout_s:.0f} s (--engine-timeout-s)"
        rows = [json.loads(line) for line in open(self.rows_file) if line.strip()]
        if rc != 0:
            log(f"engine phase ended: {rc}")
            rows.append({"workload": "engine_phase", "engine": "failed", "metric": "-", "value": None, "items": 0,
                         "wall_s": 0, "note": f"engine phase: {rc if isinstance(rc, str) else f'exit code {rc}'}"})
        return rows

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()


# -- whole jobs -----------------------------------------------------------------------------------
def prepare_job_inputs(args_dict: dict) -> None:
    """Every job's input files, written while the engine phase runs (a process of its own, so the
    engine's host side shares no interpreter lock with it)."""
    from bench.asr_calls import prepare_calls
    from bench.pipeline_jobs import HOUR_S, meeting_files, ocr_documents
    from bench.run_bench import equal_clip_files

    args = argparse.Namespace(**args_dict)
    sizes = JOB_SIZES[args.job_sizes]
    if selected(args, "meetings"):
        meeting_files(os.path.join(args.scratch, "meetings", "audio"), sizes["meetings"],
                      HOUR_S * (0.05 if args.tiny else 1.0), os.path.join(REPO, "samples", "long", "meeting.flac"))
    if selected(args, "equal_clips") or selected(args, "asr_calls"):
        equal_clip_files(os.path.join(args.scratch, "pipeline", "audio"), 16, 30.0 * (0.1 if args.tiny else 1.0))
    if selected(args, "asr_calls"):
        prepare_calls(args, sizes["asr_calls"][-1], REPO)
    if selected(args, "ocr_docs"):
        ocr_documents(os.path.join(args.scratch, "ocr_docs", "docs"), sizes["ocr_docs"])


@dataclass
class Budget:
    """Wall time since the suite started; which steps still fit under the limit."""
    limit_s: float
    started: float = field(default_factory=time.perf_counter)
    estimated: float = 0.0  # of the job steps done: their estimates, and what they took
    took: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def speed(self) -> float:
        """How this run's jobs went against their estimates so far (1.0 before any), within [0.3, 1.5]."""
        return min(1.5, max(0.3, self.took / self.estimated)) if self.estimated else 1.0

    def fits(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s * self.speed() <= self.limit_s

    def done(self, estimate_s: float, took_s: float) -> None:
        self.estimated += estimate_s
        self.took += took_s


def job_phase(args, rows: list[dict], meta: dict, budget: Budget, log, checkpoint=None) -> None:
    """The whole jobs in order, each skipped when it would pass the budget; `checkpoint()` after each
    (the outputs rewritten, so a run stopped from outside still leaves what it measured)."""
    from bench.asr_calls import marginal_summary, prepare_calls, run_calls
    from bench.pipeline_jobs import bench_meetings, bench_ocr_docs
    from bench.run_bench import asr_job_config, bench_pipeline, failed_row, marginal_row, where_the_time_went

    sizes = JOB_SIZES[args.job_sizes]
    ckpt = os.path.join(args.scratch, "ckpt")
    bargs = bench_args(args, decoder_params=args.decoder_params)

    def step(name: str, estimate_key: str, fn, items: int):
        estimate = STEP_ESTIMATE_S[estimate_key] * (0.0 if args.tiny else 1.0)
        if not budget.fits(estimate):
            log(f"skipped {name}: {budget.elapsed():.0f} s gone, ~{estimate * budget.speed():.0f} s more "
                f"would pass --limit-s {budget.limit_s:.0f}")
            rows.append({**meta, "workload": name, "engine": "skipped", "metric": "-", "value": None,
                         "items": items, "wall_s": 0, "note": f"not run: the budget (--limit-s {budget.limit_s:.0f}) "
                                                             f"was {budget.elapsed():.0f} s in"})
            return None
        log(f"job {name} ({items}) at {budget.elapsed():.0f} s")
        started = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - report it and keep the other rows
            rows.append(failed_row(meta, name, exc, items))
            return None
        finally:
            took = time.perf_counter() - started
            budget.done(estimate, took)
            rows.append({**meta, "workload": name, "engine": "suite_step", "metric": "s", "items": items,
                         "value": round(took, 1), "wall_s": round(took, 1)})
            if checkpoint is not None:
                checkpoint()

    if selected(args, "meetings"):
        step("meetings", "meetings", lambda: bench_meetings(bargs, ckpt, rows, meta, sizes["meetings"], REPO),
             sizes["meetings"])
    equal: list = []
    # each of these runs at a small and a large size (their difference is the marginal rate); one size
    # only when the sizes say so (a smoke run)
    if selected(args, "equal_clips") or selected(args, "asr_calls"):
        keys = ("equal_clips_small", "equal_clips_large")[-len(sizes["equal_clips"]):]
        for key, n in zip(keys, sizes["equal_clips"]):
            equal.append(step("asr", key, lambda n=n: bench_pipeline(bargs, ckpt, rows, meta, 1, n), n))
        if len(equal) == 2 and all(equal):
            rows.append(marginal_row(meta, "asr", equal[0], equal[1], *sizes["equal_clips"]))
            print(json.dumps(rows[-1]), flush=True)
    if selected(args, "asr_calls"):
        calls = sizes["asr_calls"]
        paths = prepare_calls(bargs, calls[-1], REPO)

        def config_for(manifest, output):
            return asr_job_config(bargs, ckpt, manifest, output)

        keys = ("asr_calls_small", "asr_calls_large")[-len(calls):]
        records = [step("asr_calls", key, lambda n=n: run_calls(bargs, ckpt, rows, meta, paths, n, config_for,
                                                                 where_the_time_went), n)
                   for key, n in zip(keys, calls)]
        if all(records):
            rows.append(marginal_summary(meta, (calls[0], calls[-1]), records, sizes["equal_clips"],
                                         equal if all(equal) else []))
            print(json.dumps(rows[-1]), flush=True)
    if selected(args, "ocr_docs"):
        step("ocr_docs", "ocr_docs", lambda: bench_ocr_docs(bargs, ckpt, rows, meta, sizes["ocr_docs"]),
             sizes["ocr_docs"])


# -- targets ----------------------------------------------------------------------------------------
def _find(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and not r.get("ablation")]
    return found[-1] if found else None


def _stage_span(row: dict, stage: str) -> float | None:
    for s in row.get("stages") or []:
        if s.get("stage", "").split("(")[-1].rstrip(")").split("->")[0] == stage and s.get("wall_s"):
            return s["wall_s"]
    return None


def projected(row: dict | None, done: float, target: float, span_stage: str) -> float | None:
    """The job's rate at the target's size from this run at a smaller one: this run's wall time plus the
    extra work (`target - done` units) at the GPU pool's own rate over its span (`done` / span). An
    estimate, printed as one; units per second (audio seconds: RTFx; pages: pages/s)."""
    if not row or not row.get("wall_s") or not done or done >= target:
        return None
    span = _stage_span(row, span_stage)
    if not span:
        return None
    return target / (row["wall_s"] + (target - done) * span / done)


@dataclass
class TargetLine:
    workload: str
    target: str
    today: str
    now: object
    floor: object
    met: str


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def target_lines(rows: list[dict], args) -> list[TargetLine]:
    """Every target: what it asks, today's figure (BASELINE), this run's, its fraction of the arithmetic
    floor, and whether it is met (on a --tiny run: "tiny", not a verdict)."""
    b = BASELINE
    sizes = JOB_SIZES[args.job_sizes]
    lines: list[TargetLine] = []

    def verdict(value, goal, higher=True, note=""):
        if args.tiny:
            return "tiny"
        if value is None:
            return "not run"
        ok = value >= goal if higher else value <= goal
        return ("yes" if ok else "no") + note

    for name, unit, goal in (("asr", "RTFx", 3650.0), ("ocr", "pages/s", 6.0), ("summarize", "items/s", 9.2)):
        row = _find(rows, workload=name, engine="engine")
        key = {"asr": "asr_engine_rtfx", "ocr": "ocr_engine_pages_per_s", "summarize": "summarize_engine_items_per_s"}[name]
        value = row["value"] if row else None
        lines.append(TargetLine(f"{name} engine ({unit})", f">= {goal:g}",
                                f"{_fmt(b[key])} ({b[name + '_engine_floor']} of floor)", _fmt(value),
                                _fmt(row.get("fraction_of_arithmetic_floor")) if row else "-", verdict(value, goal)))
        diff = row.get("first_step_logits_max_rel_diff") if row else None
        tol = row.get("first_step_tolerance") if row else None
        lines.append(TargetLine(f"{name} first-step logits vs generate (rel. L2)",
                                f"<= {tol:g}" if tol else "<= bf16 tolerance", _fmt(b[f"{name}_first_step_rel_diff"]),
                                f"{_fmt(diff)} ({row.get('first_step_top1_same')} same top-1, {row.get('first_step_path')})"
                                if diff is not None else "-", "", verdict(diff, tol or 0.1, higher=False)))
    con = _find(rows, workload="extract", engine="engine_constrained")
    ratio = con.get("vs_unconstrained") if con else None
    lines.append(TargetLine("extract: constrained / unconstrained items/s", ">= 0.90, every answer valid",
                            f"{b['extract_vs_unconstrained']} ({b['extract_valid']} valid)",
                            f"{_fmt(ratio)} ({con.get('valid_json')} valid)" if con else "-", "",
                            verdict(ratio, 0.90) if not con or con.get("all_valid") or args.tiny
                            else "no (invalid answers)"))
    calls = _find(rows, workload="asr_calls", engine="pipeline_marginal")
    ratio = calls.get("vs_equal_30s") if calls else None
    lines.append(TargetLine(f"asr_calls {sizes['asr_calls'][0]}->{sizes['asr_calls'][-1]} calls: marginal vs "
                            "equal 30 s clips", ">= 0.90",
                            f"{b['asr_calls_vs_equal_30s']} ({b['asr_calls_marginal_rtfx']:g} / "
                            f"{b['equal_30s_marginal_rtfx']:g} RTFx)",
                            f"{_fmt(ratio)} ({_fmt(calls.get('value'))} / {_fmt(calls.get('equal_30s_marginal_rtfx'))})"
                            if ratio is not None else "-", "", verdict(ratio, 0.90)))
    meet = _find(rows, workload="meetings", engine="pipeline")
    value = meet["value"] if meet else None
    lines.append(TargetLine(f"meetings {sizes['meetings']} x 1 h, transcript + summary (x real time)", ">= 400 (8 x 1 h)",
                            f"{b['meetings_rtfx']:g} (8 x 1 h)", _fmt(value),
                            _fmt(meet.get("fraction_of_arithmetic_floor")) if meet else "-",
                            verdict(value, 400.0)))
    if meet and sizes["meetings"] < TARGET_SIZES["meetings"]:
        proj = projected(meet, (meet.get("audio_h") or 0) * 3600, TARGET_SIZES["meetings"] * 3600, "SpeechStage")
        more = TARGET_SIZES["meetings"] - (meet.get("audio_h") or 0)
        lines.append(TargetLine(f"  projected to 8 x 1 h (this run + {more:g} h at the speech pool's span rate)",
                                ">= 400", "", _fmt(proj), "", verdict(proj, 400.0, note=" (projected)")))
    docs = _find(rows, workload="ocr_docs", engine="pipeline")
    ratio = docs.get("vs_engine") if docs else None
    lines.append(TargetLine(f"ocr_docs {sizes['ocr_docs']} pages: pages/s vs the bare engine", ">= 0.80 (300 pages)",
                            f"{b['ocr_docs_vs_engine']} (300 pages)", _fmt(ratio),
                            _fmt(docs.get("fraction_of_arithmetic_floor")) if docs else "-", verdict(ratio, 0.80)))
    engine = _find(rows, workload="ocr", engine="engine")
    if docs and engine and sizes["ocr_docs"] < TARGET_SIZES["ocr_docs"]:
        rate = projected(docs, sizes["ocr_docs"], TARGET_SIZES["ocr_docs"], "VisionStage")
        proj = rate / engine["value"] if rate else None
        more = TARGET_SIZES["ocr_docs"] - sizes["ocr_docs"]
        lines.append(TargetLine(f"  projected to 300 pages (this run + {more} pages at the vision pool's span rate)",
                                ">= 0.80", "", _fmt(proj), "", verdict(proj, 0.80, note=" (projected)")))
    peak = docs.get("peak_host_gb") if docs else None
    lines.append(TargetLine(f"ocr_docs {sizes['ocr_docs']} pages: host memory peak (GB)", "<= 10",
                            f"{b['ocr_docs_host_gb']} (300 pages)", _fmt(peak), "", verdict(peak, 10.0, higher=False)))
    large = sizes["equal_clips"][-1]
    equal = _find(rows, workload="asr", engine="pipeline", items=large)
    first = equal.get("first_row_s") if equal else None
    lines.append(TargetLine(f"first result row, {large} equal 30 s clips (s after the job starts)", "<= 20",
                            f"~{b['first_row_s_512']:g}", _fmt(first),
                            _fmt(equal.get("fraction_of_arithmetic_floor")) if equal else "-",
                            verdict(first, 20.0, higher=False)))
    return lines


def targets_table(lines: list[TargetLine]) -> str:
    out = ["| workload | target | today | now | fraction of floor | met |", "|---|---|---|---|---|---|"]
    out += [f"| {t.workload} | {t.target} | {t.today} | {t.now} | {t.floor} | {t.met} |" for t in lines]
    return "\n".join(out)


def timing_table(rows: list[dict]) -> str:
    out = ["| step | s |", "|---|---|"]
    for r in rows:
        if r.get("engine") == "suite_step":
            label = r["workload"] + (f" ({r['items']})" if r.get("items") else "") + \
                (f" [{r['ablation']}]" if r.get("ablation") else "")
            out.append(f"| {label} | {r['value']} |")
    return "\n".join(out)


# -- outputs ----------------------------------------------------------------------------------------
def measurement_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("engine") != "suite_step"]


def write_outputs(args, rows: list[dict], lines: list[TargetLine], wall_s: float, final: bool) -> str:
    from bench.run_bench import table

    card = next((r.get("card") for r in rows if r.get("card")), "?")
    overrides = " ".join(f"--set {s}.{k}={json.dumps(v)}" for s, f in args.overrides_parsed.items()
                         for k, v in f.items())
    header = (f"\n## {dt.date.today().isoformat()} — bench.suite on {card}: {'tiny CPU smoke run, ' if args.tiny else ''}"
              f"{args.job_sizes} sizes, {wall_s:.0f} s{' (partial)' if not final else ''}"
              f"{', ' + overrides if overrides else ''}{', --ablate ' + args.ablate if args.ablate else ''}\n\n"
              f"Today: {BASELINE_SOURCE}.\n\n")
    text = (header + targets_table(lines) + "\n\nWhere the time went:\n\n" + timing_table(rows)
            + "\n\nEvery measurement:\n\n" + table(measurement_rows(rows)) + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "suite.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(text)
    return text


def append_to_bench(rows: list[dict], text: str) -> None:
    """The run's rows onto bench/results.jsonl, its tables onto bench/RESULTS.md."""
    with open(os.path.join(REPO, "bench", "results.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in measurement_rows(rows))
    with open(os.path.join(REPO, "bench", "RESULTS.md"), "a") as f:
        f.write(text)


def append_from(folder: str) -> None:
    rows = [json.loads(line) for line in open(os.path.join(folder, "suite.jsonl")) if line.strip()]
    with open(os.path.join(folder, "suite.md")) as f:
        text = f.read()
    append_to_bench(rows, text)
    print(f"appended {len(measurement_rows(rows))} rows to bench/results.jsonl and {folder}/suite.md to "
          "bench/RESULTS.md")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.append_from:
        append_from(args.append_from)
        return 0
    from bench.run_bench import parse_overrides

    args.overrides_parsed = parse_overrides(args.overrides)
    args.job_sizes = "tiny" if args.tiny else args.size
    if args.ablate:
        ablation_values(args.ablate)  # a bad field fails now
    if args.phase == "engine":
        engine_phase(args)
        return 0
    return run_all(args, argv)


def decoder_params_of(ckpt: str) -> tuple[int, int]:
    """(decoder layers' parameters, LM head's) of the checkpoint's architecture, counted on the meta
    device (no memory, no weights): what the jobs' fraction of the arithmetic floor counts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.run_bench import decoder_param_counts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    return decoder_param_counts(model)


def light_meta() -> dict:
    """The rows' date, card and torch, without starting CUDA in this process (the jobs' driver stays as
    light as a user's): the card's name from nvidia-smi."""
    import torch

    try:
        card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.splitlines()[0].strip() or "cpu"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        card = "cpu"
    return {"date": dt.date.today().isoformat(), "card": card, "gpus": 1, "torch": torch.__version__}


def run_all(args, argv: list[str]) -> int:
    import multiprocessing

    from bench.real_model import bench_model

    budget = Budget(args.limit_s if not args.tiny else float("inf"))

    def log(message: str) -> None:
        print(f"== suite [{budget.elapsed():.0f} s]: {message}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.scratch, exist_ok=True)
    log(f"out {args.out}; sizes {args.job_sizes}; plan {args.budget_s:.0f} s, limit {args.limit_s:.0f} s")
    ckpt = os.path.join(args.scratch, "ckpt")
    if args.tiny:  # the tiny weights are written once, here, before the engine phase reads them
        bench_model(ckpt, True)
    else:
        from bench.real_model import write_bench_checkpoint

        write_bench_checkpoint(ckpt)
    prep = multiprocessing.get_context("spawn").Process(
        target=prepare_job_inputs, args=({"scratch": args.scratch, "tiny": args.tiny, "job_sizes": args.job_sizes,
                                          "only": args.only},))
    wants_jobs = any(selected(args, s) for s in JOB_STEPS)
    wants_engine = any(selected(args, s) for s in ENGINE_STEPS) or bool(args.ablate)
    rows: list[dict] = []
    engine = EnginePhase.start(args, argv) if wants_engine else None
    try:
        if wants_jobs:
            prep.start()
            prep.join()
            try:  # Ray up while the engine phase runs; when it cannot start now, the first job starts it
                from jobs.runner import init_ray
                from jobs.settings import from_environment

                init_ray(from_environment())
                log("job inputs written, Ray started")
            except Exception as exc:  # noqa: BLE001
                import ray

                ray.shutdown()
                log(f"job inputs written; Ray did not start yet ({type(exc).__name__}: {exc}), the first job will")
        if engine is not None:
            rows.extend(engine.finish(log))
            log("engine phase done")
    finally:
        if engine is not None:
            engine.stop()
    meta = next(({k: r[k] for k in ("date", "card", "gpus", "torch")} for r in rows if "card" in r), None) \
        or light_meta()
    args.decoder_params = next((tuple(r["decoder_params"]) for r in rows if r.get("decoder_params")), None) \
        or decoder_params_of(ckpt)
    lines = target_lines(rows, args)
    write_outputs(args, rows, lines, budget.elapsed(), final=False)
    if wants_jobs:
        job_phase(args, rows, meta, budget, log,
                  lambda: write_outputs(args, rows, target_lines(rows, args), budget.elapsed(), final=False))
    lines = target_lines(rows, args)
    text = write_outputs(args, rows, lines, budget.elapsed(), final=True)
    record = args.record == "yes" or (args.record == "auto" and not args.tiny)
    if record:
        append_to_bench(rows, text)
    print(text, flush=True)
    failed = [r for r in rows if r.get("engine") == "failed"]
    log(f"done in {budget.elapsed():.0f} s (plan {args.budget_s:.0f} s); {len(failed)} failed step(s)"
        + (": " + "; ".join(f"{r['workload']}: {r.get('note')}" for r in failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
