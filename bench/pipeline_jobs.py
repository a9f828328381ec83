"""Whole jobs as users run them, on the GPU host: N one-hour meetings, and a night of calls translated
and summarised. Manifest -> Ray Data -> every GPU pool -> Parquet, random real-shaped weights, fixed
output lengths (min = max new tokens), everything in the wall time (Ray start, model loads, compile).

    python3 -m bench.run_bench --workloads "" --meetings 8 --calls-translate 2000 --out DIR

Each reports end-to-end RTFx (audio seconds / wall seconds), the time per stage, the run's counters
(engine prefill/decode split, OOM fallbacks, caches built, summary sections) and the peak GPU memory
(nvidia-smi, sampled every 0.5 s).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import numpy as np

HOUR_S = 3600.0


class GpuMemoryPeak:
    """Peak `memory.used` of GPU 0 over a `with` block, from nvidia-smi every 0.5 s (MiB; None without one)."""

    def __enter__(self):
        self.peak_mib, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                used = max(int(v) for v in out) if out else None
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0, used)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


class FirstRow:
    """Seconds from entering the `with` block to the first result file written under `output` (a
    non-empty Parquet file below it, the run records' `_runs/` aside), polled every 0.1 s: when a user
    sees the job's first results. None when none appeared."""

    def __init__(self, output: str, every_s: float = 0.1):
        self.output, self.every_s = output, every_s

    def _found(self) -> bool:
        for root, dirs, files in os.walk(self.output):
            dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
            for name in files:
                if name.endswith(".parquet"):
                    try:
                        if os.path.getsize(os.path.join(root, name)) > 0:
                            return True
                    except OSError:
                        continue
        return False

    def __enter__(self):
        self.seconds, self._stop, self._start = None, threading.Event(), time.perf_counter()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.every_s):
            if self._found():
                self.seconds = round(time.perf_counter() - self._start, 2)
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        if self.seconds is None and self._found():  # written within the last poll's 0.1 s: seen at the end
            self.seconds = round(time.perf_counter() - self._start, 2)


@dataclass
class JobRun:
    """One whole job as the benchmarks time it: its run record and what was watched from outside."""
    record: dict
    peak_gpu_mib: float | None
    first_row_s: float | None
    config: dict


def meeting_files(folder: str, n: int, seconds: float, source: str) -> list[str]:
    """`n` recordings of `seconds` each, tiled from the shipped meeting at different offsets (so no two
    are the same file), FLAC at 16 kHz as a meeting recorder writes them; one already there at the
    right length is kept."""
    import soundfile as sf

    os.makedirs(folder, exist_ok=True)
    frames = int(seconds * 16000)
    paths = [os.path.join(folder, f"meeting-{k:02d}.flac") for k in range(n)]
    todo = []
    for k, path in enumerate(paths):
        try:
            if sf.info(path).frames == frames:
                continue
        except (RuntimeError, OSError):
            pass
        todo.append(k)
    if not todo:
        return paths
    base, rate = sf.read(source, dtype="float32")
    if base.ndim > 1:
        base = base.mean(axis=1)
    assert rate == 16000, rate
    for k in todo:
        reps = int(np.ceil(frames / len(base))) + 1
        audio = np.roll(np.tile(base, reps), -k * 7919)[:frames]
        sf.write(paths[k], audio, rate, format="FLAC")
    return paths


def run_pipeline_job(config_data: dict, label: str, args) -> JobRun:
    """Run one whole job in this process (its output folder emptied first, so the first result file
    seen is this run's), with the `--set` overrides; the stage counters and per-stage times go into
    `args.out/pipeline-<label>.json` unless `args.stage_files` is False (the suite keeps them in its rows)."""
    from bench.run_bench import with_overrides
    from jobs.runner import run_job
    from schemas.config import JobConfig

    config_data = with_overrides(config_data, getattr(args, "overrides", {}))
    config = JobConfig.model_validate(config_data)
    shutil.rmtree(config.output, ignore_errors=True)
    with GpuMemoryPeak() as mem, FirstRow(config.output) as first:
        record = run_job(config)
    if getattr(args, "stage_files", True):
        with open(os.path.join(args.out, f"pipeline-{label}.json"), "w") as f:
            json.dump({"counters": record.get("counters"), "stages": record.get("stages"),
                       "counts": record["counts"], "wall_s": record["wall_s"],
                       "first_row_s": first.seconds}, f, indent=1)
    return JobRun(record, mem.peak_mib, first.seconds, config_data)


def job_floor_fraction(record: dict, args) -> float | None:
    """The job's decoder arithmetic (2 x decoder params x every prompt and output token its rows count,
    plus the LM head per output token) over the card's peak rate and the job's wall time."""
    counts = getattr(args, "decoder_params", None)
    if not counts or not record.get("wall_s"):
        return None
    params, head = counts
    flops = 2 * (params * (record.get("input_tokens", 0) + record.get("output_tokens", 0))
                 + head * record.get("output_tokens", 0))
    return round(flops / (args.peak_tflops * 1e12) / record["wall_s"], 4)


def job_row_extras(run: JobRun, args, rows: list[dict], engine_workload: str | None) -> dict:
    """What every whole-job row carries: when its first result was written, its stage counters (the
    engine's stats among them), the peak GPU memory, its fraction of the arithmetic floor, and the bare
    engine's figure of the same run (`engine_figure`: that workload's engine value; None when it did not
    run), so a job's rate sits beside the engine's."""
    from bench.run_bench import engine_value

    return {"first_row_s": run.first_row_s, "peak_gpu_mib": run.peak_gpu_mib,
            "fraction_of_arithmetic_floor": job_floor_fraction(run.record, args),
            "engine_figure": ({"workload": engine_workload, "value": engine_value(rows, engine_workload)}
                              if engine_workload else None),
            "counters": run.record.get("counters", {}),
            "stages": [{k: s.get(k) for k in ("stage", "wall_s", "busy_s")} for s in run.record.get("stages", [])]}


def job_config(args, job: str, ckpt: str, manifest: str, output: str) -> dict:
    """Fixed output lengths (100 tokens per 30 s of speech, 300 per summary; min = max, so every run
    does the same work), random weights, both GPU pools on the one GPU, one replica each."""
    speech_new, summary_new = (4, 8) if args.tiny else (100, 300)
    return {
        "job": job, "input": manifest, "output": output, "model": {"source": ckpt},
        "generation": {"max_new_tokens": {"asr": speech_new, "translate": speech_new, "summarize": summary_new}},
        "benchmark": {"random_weights": not args.tiny, "min_new_tokens": summary_new},
        "batching": {"decoder": "generate" if args.tiny else "static"},
        "audio": {"reject_no_speech": False},
        "resources": {"gpus_per_replica": 0.0 if args.tiny else 0.5, "max_replicas": 1},
    }


def summary_of(record: dict, peak_mib: float | None) -> dict:
    counters = record.get("counters", {})
    engine = {k: round(sum(c.get(k, 0) for c in counters.values()), 3)
              for k in ("engine_prefill_s", "engine_decode_s", "engine_oom_fallbacks", "engine_caches_built")}
    stages = {s["stage"].split("(")[-1].rstrip(")"): s["wall_s"] for s in record.get("stages", [])}
    return {"counts": record["counts"], "peak_gpu_mib": peak_mib, **engine,
            "summary_sections": counters.get("PrepareFromTranscripts", {}).get("summary_sections"),
            "stage_wall_s": stages}


def bench_meetings(args, ckpt: str, rows: list[dict], meta: dict, n: int, repo: str) -> dict:
    """`n` one-hour recordings through `phi4mm meetings`: transcript (100 tokens per 30 s chunk) + summary
    (300 tokens) of each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = os.path.join(args.scratch, "meetings")
    seconds = HOUR_S * (0.05 if args.tiny else 1.0)
    paths = meeting_files(os.path.join(work, "audio"), n, seconds, os.path.join(repo, "samples", "long", "meeting.flac"))
    manifest = os.path.join(work, f"manifest-{n}.parquet")
    pq.write_table(pa.table({"id": [f"meeting-{k:02d}" for k in range(n)], "uri": paths}), manifest)
    run = run_pipeline_job(job_config(args, "meetings", ckpt, manifest, os.path.join(work, f"out-{n}")),
                           f"meetings-{n}", args)
    record = run.record
    summary = summary_of(record, run.peak_gpu_mib)
    ok = all(c.get("error", 0) == 0 for c in record["counts"].values())
    row = {**meta, "workload": "meetings", "engine": "pipeline", "metric": "rtfx",
           "value": round(record["audio_s"] / record["wall_s"], 1), "items": n, "wall_s": round(record["wall_s"], 1),
           "audio_h": round(record["audio_s"] / 3600, 2), "all_ok": ok,
           "fallback_fired": bool(summary["engine_oom_fallbacks"]), **summary, **job_row_extras(run, args, rows, "asr"),
           "note": "end to end: Ray, both model loads, decode, VAD, features, asr + summary pools, Parquet"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return record


def bench_calls_translate(args, ckpt: str, rows: list[dict], meta: dict, n: int) -> dict:
    """`transcribe --translate-to fr --summarize` over `n` 30-second calls (16 distinct files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.run_bench import equal_clip_files

    work = os.path.join(args.scratch, "calls")
    uris = equal_clip_files(os.path.join(work, "audio"), 16, 3.0 if args.tiny else 30.0)
    manifest = os.path.join(work, f"manifest-{n}.parquet")
    pq.write_table(pa.table({"id": [f"call-{i:06d}" for i in range(n)], "uri": [uris[i % 16] for i in range(n)]}),
                   manifest)
    config = job_config(args, "transcribe", ckpt, manifest, os.path.join(work, f"out-{n}"))
    run = run_pipeline_job({**config, "translate_to": ["fr"], "summarize": True}, f"calls-translate-{n}", args)
    record = run.record
    row = {**meta, "workload": "calls_translate_summarize", "engine": "pipeline", "metric": "rtfx",
           "value": round(record["audio_s"] / record["wall_s"], 1), "items": n, "wall_s": round(record["wall_s"], 1),
           "audio_h": round(record["audio_s"] / 3600, 2), **summary_of(record, run.peak_gpu_mib),
           **job_row_extras(run, args, rows, "asr"), "note": "end to end: asr + translate (fr) + summary per call"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return record


# documents of a bulk-OCR night: multi-page PDFs of 5-120 pages (Letter and A4, typed reports) and
# single scans (PNG, JPEG, TIFF, WebP at 150-200 dpi); the largest PDF first, so its pages (prepared
# one after another by one worker) start while the rest spread over the other workers
OCR_PDF_PAGES = (120, 60, 30, 15, 8, 5)


def ocr_documents(folder: str, pages: int) -> list[str]:
    """Files holding `pages` pages in all: the PDFs of OCR_PDF_PAGES that fit, then single scans."""
    from bench.documents import A4_PT, LETTER_PT, encoded, scan, text_pdf

    os.makedirs(folder, exist_ok=True)
    paths, left = [], pages
    for k, n in enumerate(OCR_PDF_PAGES):
        if n > left:
            continue
        path = os.path.join(folder, f"report-{k:02d}-{n}p.pdf")
        if not os.path.exists(path):  # the same bytes every time: written once
            with open(path, "wb") as f:
                f.write(text_pdf(n, LETTER_PT if k % 2 == 0 else A4_PT, title=f"Report {k}"))
        paths.append(path)
        left -= n
    sizes = [(1275, 1650), (1240, 1754), (1700, 2200), (1654, 2339)]  # Letter/A4 at 150 and 200 dpi
    formats = [("png", "PNG", {}), ("jpg", "JPEG", {"quality": 85}), ("tiff", "TIFF", {"compression": "tiff_lzw"}),
               ("webp", "WEBP", {"quality": 80})]
    for k in range(left):
        ext, fmt, kwargs = formats[k % len(formats)]
        path = os.path.join(folder, f"scan-{k:03d}.{ext}")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(encoded(scan(sizes[k % len(sizes)], seed=k), fmt, **kwargs))
        paths.append(path)
    return paths


def bench_ocr_docs(args, ckpt: str, rows: list[dict], meta: dict, pages: int) -> dict:
    """`phi4mm ocr` over `pages` pages of real-size documents with the default config (fixed output per
    page: min = max new tokens, the same as the bare engine's `ocr` workload): pages/s end to end and over
    the vision pool's span, the peak host memory of the whole job, and the fraction of the bare engine's
    pages/s when the `ocr` workload ran in the same run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.host_memory import PeakMemory
    from bench.run_bench import engine_value

    work = os.path.join(args.scratch, "ocr_docs")
    paths = ocr_documents(os.path.join(work, "docs"), pages)
    manifest = os.path.join(work, f"manifest-{pages}.parquet")
    # a PDF every 11 rows, the largest first: PreparePages takes a few manifest rows per call and prepares
    # them one after another, so two long PDFs in one call would be read by one worker in turn
    pdfs, scans = [p for p in paths if p.endswith(".pdf")], [p for p in paths if not p.endswith(".pdf")]
    ordered = []
    for k, pdf in enumerate(pdfs):
        ordered += [pdf] + scans[k * 10:(k + 1) * 10]
    ordered += scans[len(pdfs) * 10:]
    pq.write_table(pa.table({"id": [os.path.basename(p) for p in ordered], "uri": ordered}), manifest)
    new = max(2, int(400 * args.scale))  # as bench/run_bench.py WORKLOADS["ocr"]["new"], the bare engine's
    config = {"job": "ocr", "input": manifest, "output": os.path.join(work, f"out-{pages}"),
              "model": {"source": ckpt}, "generation": {"max_new_tokens": {"ocr": new}},
              "benchmark": {"random_weights": not args.tiny, "min_new_tokens": new},
              "resources": {"gpus_per_replica": 0.0 if args.tiny else 1.0, "max_replicas": 1}}
    with PeakMemory() as host:
        run = run_pipeline_job(config, f"ocr-docs-{pages}", args)
    record = run.record
    counts = record["counts"].get("ocr", {})
    assert counts.get("ok", 0) == pages, record["counts"]
    stages = {s["stage"].split("(")[-1].rstrip(")").split("->")[0]: s for s in record.get("stages", [])}
    vision = stages.get("VisionStage", {})
    span = vision.get("wall_s") or None
    value = record["pages"] / record["wall_s"]
    engine = engine_value(rows, "ocr")
    counters = record.get("counters", {})
    row = {**meta, "workload": "ocr_docs", "engine": "pipeline", "metric": "pages_per_s", "value": round(value, 3),
           "items": pages, "files": len(paths), "wall_s": round(record["wall_s"], 1), "new_tokens": new,
           "gpu_span_pages_per_s": round(record["pages"] / span, 3) if span else None,
           "gpu_pool_busy": round(vision["busy_s"] / span, 3) if span and vision.get("busy_s") else None,
           "vs_engine": round(value / engine, 3) if engine else None,
           "gpu_span_vs_engine": round(record["pages"] / span / engine, 3) if engine and span else None,
           "rows_per_vision_call": counters.get("VisionStage", {}).get("rows_in", 0)
           / max(1, counters.get("VisionStage", {}).get("calls", 1)),
           "peak_host_gb": round(host.peak / 1e9, 2), **summary_of(record, run.peak_gpu_mib),
           **job_row_extras(run, args, rows, "ocr"),
           "note": "end to end: Ray, model load, render (150 dpi), crops, vision pool, Parquet; PDFs of "
                   f"{', '.join(str(n) for n in OCR_PDF_PAGES)} pages and single scans; peak_host_gb: PSS of "
                   "the bench process and everything it started (its local Ray)"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return record
