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
import subprocess
import threading

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


def meeting_files(folder: str, n: int, seconds: float, source: str) -> list[str]:
    """`n` recordings of `seconds` each, tiled from the shipped meeting at different offsets (so no two
    are the same file), FLAC at 16 kHz as a meeting recorder writes them."""
    import soundfile as sf

    base, rate = sf.read(source, dtype="float32")
    if base.ndim > 1:
        base = base.mean(axis=1)
    assert rate == 16000, rate
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(n):
        reps = int(np.ceil(seconds * rate / len(base))) + 1
        audio = np.roll(np.tile(base, reps), -k * 7919)[: int(seconds * rate)]
        path = os.path.join(folder, f"meeting-{k:02d}.flac")
        sf.write(path, audio, rate, format="FLAC")
        paths.append(path)
    return paths


def run_pipeline_job(config_data: dict, label: str, out_dir: str) -> tuple[dict, float | None]:
    from jobs.runner import run_job
    from schemas.config import JobConfig

    config = JobConfig.model_validate(config_data)
    with GpuMemoryPeak() as mem:
        record = run_job(config)
    with open(os.path.join(out_dir, f"pipeline-{label}.json"), "w") as f:
        json.dump({"counters": record.get("counters"), "stages": record.get("stages"),
                   "counts": record["counts"], "wall_s": record["wall_s"]}, f, indent=1)
    return record, mem.peak_mib


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
    record, peak = run_pipeline_job(job_config(args, "meetings", ckpt, manifest, os.path.join(work, f"out-{n}")),
                                    f"meetings-{n}", args.out)
    summary = summary_of(record, peak)
    ok = all(c.get("error", 0) == 0 for c in record["counts"].values())
    row = {**meta, "workload": "meetings", "engine": "pipeline", "metric": "rtfx",
           "value": round(record["audio_s"] / record["wall_s"], 1), "items": n, "wall_s": round(record["wall_s"], 1),
           "audio_h": round(record["audio_s"] / 3600, 2), "all_ok": ok,
           "fallback_fired": bool(summary["engine_oom_fallbacks"]), **summary,
           "note": "end to end: Ray, both model loads, decode, VAD, features, asr + summary pools, Parquet"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return record


def bench_calls_translate(args, ckpt: str, rows: list[dict], meta: dict, n: int) -> dict:
    """`transcribe --translate-to fr --summarize` over `n` 30-second calls (16 distinct files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    work = os.path.join(args.scratch, "calls")
    os.makedirs(os.path.join(work, "audio"), exist_ok=True)
    rng = np.random.default_rng(2)
    seconds = 3.0 if args.tiny else 30.0
    uris = []
    for k in range(16):
        path = os.path.join(work, "audio", f"call{k:02d}.wav")
        sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        uris.append(path)
    manifest = os.path.join(work, f"manifest-{n}.parquet")
    pq.write_table(pa.table({"id": [f"call-{i:06d}" for i in range(n)], "uri": [uris[i % 16] for i in range(n)]}),
                   manifest)
    config = job_config(args, "transcribe", ckpt, manifest, os.path.join(work, f"out-{n}"))
    record, peak = run_pipeline_job({**config, "translate_to": ["fr"], "summarize": True},
                                    f"calls-translate-{n}", args.out)
    summary = summary_of(record, peak)
    row = {**meta, "workload": "calls_translate_summarize", "engine": "pipeline", "metric": "rtfx",
           "value": round(record["audio_s"] / record["wall_s"], 1), "items": n, "wall_s": round(record["wall_s"], 1),
           "audio_h": round(record["audio_s"] / 3600, 2), **summary,
           "note": "end to end: asr + translate (fr) + summary per call"}
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
        record, peak_gpu = run_pipeline_job(config, f"ocr-docs-{pages}", args.out)
    counts = record["counts"].get("ocr", {})
    assert counts.get("ok", 0) == pages, record["counts"]
    stages = {s["stage"].split("(")[-1].rstrip(")").split("->")[0]: s for s in record.get("stages", [])}
    vision = stages.get("VisionStage", {})
    span = vision.get("wall_s") or None
    value = record["pages"] / record["wall_s"]
    engine = [r["value"] for r in rows if r.get("workload") == "ocr" and r.get("engine") == "engine"]
    counters = record.get("counters", {})
    row = {**meta, "workload": "ocr_docs", "engine": "pipeline", "metric": "pages_per_s", "value": round(value, 3),
           "items": pages, "files": len(paths), "wall_s": round(record["wall_s"], 1), "new_tokens": new,
           "gpu_span_pages_per_s": round(record["pages"] / span, 3) if span else None,
           "gpu_pool_busy": round(vision["busy_s"] / span, 3) if span and vision.get("busy_s") else None,
           "vs_engine": round(value / engine[-1], 3) if engine else None,
           "gpu_span_vs_engine": round(record["pages"] / span / engine[-1], 3) if engine and span else None,
           "rows_per_vision_call": counters.get("VisionStage", {}).get("rows_in", 0)
           / max(1, counters.get("VisionStage", {}).get("calls", 1)),
           "peak_host_gb": round(host.peak / 1e9, 2), "peak_gpu_mib": peak_gpu, **summary_of(record, peak_gpu),
           "note": "end to end: Ray, model load, render (150 dpi), crops, vision pool, Parquet; PDFs of "
                   f"{', '.join(str(n) for n in OCR_PDF_PAGES)} pages and single scans"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return record
