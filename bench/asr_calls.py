"""`asr_calls`: a night of calls of every length through the whole pipeline, against equal 30 s clips.

    python3 -m bench.run_bench --workloads "" --calls 400 --calls-reference 512 --out DIR

N calls (`--calls`) with lengths drawn log-uniformly between 3 s and 10 min (mean ~113 s; the long ones
cut on silences into <= 30 s chunks, as in production), cut from the shipped meeting recording (speech
with pauses, so the VAD finds real cuts) at a different offset each, written once as 16 kHz WAV files.
Output is fixed at 100 tokens per 30 s of audio (per chunk, by its 2 s length bucket:
`benchmark.new_tokens_per_30s`), so a call costs what its audio would. The same run does the `asr`
pipeline on equal 30 s clips (bench/run_bench.py: bench_pipeline, `--calls-reference` clips) with the
same batching; each is run at two sizes (N/4 and N) for the marginal rate, what more audio costs once
Ray and the actors are up. Reported: end-to-end and marginal RTFx, the GPU pool's busy fraction and
span rate, the batches the engine formed (count, mean size, full ones) from the stage counters, and the
ratio to the equal-clip pipeline (target: >= 0.85).
"""
from __future__ import annotations

import json
import os

import numpy as np

SAMPLE_RATE = 16000
MIN_S, MAX_S = 3.0, 600.0


def call_lengths(n: int, seed: int = 10, lo: float = MIN_S, hi: float = MAX_S) -> np.ndarray:
    """`n` lengths in seconds, log-uniform in [lo, hi], rounded to samples (each a different length)."""
    rng = np.random.default_rng(seed)
    return np.round(np.exp(rng.uniform(np.log(lo), np.log(hi), n)) * SAMPLE_RATE) / SAMPLE_RATE


def call_files(folder: str, lengths: np.ndarray, source: str) -> list[str]:
    """One WAV per length, cut from `source` tiled, starting at a different offset each (no two files
    the same). Written once: an existing file of the right size is kept (the N/4 run uses the first
    N/4 of the N files)."""
    import soundfile as sf

    base, rate = sf.read(source, dtype="float32")
    if base.ndim > 1:
        base = base.mean(axis=1)
    assert rate == SAMPLE_RATE, rate
    longest = int(max(lengths) * rate)
    tiled = np.tile(base, int(np.ceil((longest + len(base)) / len(base))) + 1)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, seconds in enumerate(lengths):
        n = int(round(seconds * rate))
        path = os.path.join(folder, f"call-{k:05d}.wav")
        if not (os.path.exists(path) and os.path.getsize(path) == 44 + 2 * n):
            start = (k * 7919 * 16) % len(base)
            sf.write(path, tiled[start:start + n], rate, subtype="PCM_16")
        paths.append(path)
    return paths


def batch_stats(record: dict) -> dict:
    """The batches the speech pool's engine formed, from the run's stage counters."""
    speech = record.get("counters", {}).get("SpeechStage", {})
    batches, items = speech.get("engine_batches", 0), speech.get("engine_batch_items", 0)
    return {"batches": batches, "mean_batch": round(items / batches, 1) if batches else None,
            "batches_full": speech.get("engine_batches_full"), "gpu_calls": speech.get("calls"),
            "chunks": record.get("counters", {}).get("PrepareAudio", {}).get("audio_chunks")}


def bench_asr_calls(args, ckpt: str, rows: list[dict], meta: dict, n: int, reference: int, repo: str,
                    equal_clips, job_config_for, where_the_time_went) -> None:
    """`equal_clips(rows, meta, gpus, n)`: the asr pipeline bench on n equal 30 s clips (its record);
    `job_config_for(manifest, output)`: that bench's job config, so both share every setting."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.pipeline_jobs import GpuMemoryPeak
    from jobs.runner import run_job
    from schemas.config import JobConfig

    work = os.path.join(args.scratch, "asr_calls")
    hi = MAX_S * (0.1 if args.tiny else 1.0)  # the CPU smoke test: 3 s to 60 s
    lengths = call_lengths(n, hi=hi)
    paths = call_files(os.path.join(work, "audio"), lengths, os.path.join(repo, "samples", "long", "meeting.flac"))
    equal = []
    if reference:
        equal_clips([], meta, 1, min(32, reference))  # warm-up: Ray up, kernels built, files cached
        equal = [equal_clips(rows, meta, 1, m) for m in sorted({max(1, reference // 4), reference})]
    records = []
    for size in sorted({max(1, n // 4), n}):
        manifest = os.path.join(work, f"manifest-{size}.parquet")
        pq.write_table(pa.table({"id": [f"call-{k:05d}" for k in range(size)], "uri": paths[:size]}), manifest)
        config = job_config_for(manifest, os.path.join(work, f"out-{size}"))
        per_30s = config["generation"]["max_new_tokens"]["asr"]
        config["benchmark"] = {**config["benchmark"], "new_tokens_per_30s": per_30s}
        with GpuMemoryPeak() as mem:
            record = run_job(JobConfig.model_validate(config))
        assert record["counts"].get("asr", {}).get("ok", 0) == size, record["counts"]
        with open(os.path.join(args.out, f"pipeline-asr_calls-{size}.json"), "w") as f:
            json.dump({"counters": record.get("counters"), "stages": record.get("stages"),
                       "counts": record["counts"], "wall_s": record["wall_s"]}, f, indent=1)
        row = {**meta, "workload": "asr_calls", "engine": "pipeline", "metric": "rtfx",
               "value": round(record["audio_s"] / record["wall_s"], 1), "items": size,
               "wall_s": round(record["wall_s"], 1), "audio_h": round(record["audio_s"] / 3600, 2),
               "calls_s": [MIN_S, hi], "tokens_per_30s": per_30s, "peak_gpu_mib": mem.peak_mib,
               **where_the_time_went(record, 1), **batch_stats(record),
               "note": f"end to end: calls log-uniform {MIN_S:g}-{hi:g} s, chunked on silence, "
                       f"{per_30s} tokens per 30 s"}
        rows.append(row)
        records.append(record)
        print(json.dumps(row), flush=True)
    summary = {**meta, "workload": "asr_calls", "engine": "pipeline_marginal", "metric": "rtfx", "items": n,
               "value": None, "wall_s": round(records[-1]["wall_s"], 1)}
    if len(records) > 1:
        a, b = records
        summary["value"] = round((b["audio_s"] - a["audio_s"]) / (b["wall_s"] - a["wall_s"]), 1)
        summary["note"] = f"(audio of {n} - {n // 4} calls) / (wall difference)"
    if len(equal) > 1:
        a, b = equal
        equal_marginal = (b["audio_s"] - a["audio_s"]) / (b["wall_s"] - a["wall_s"])
        summary["equal_30s_marginal_rtfx"] = round(equal_marginal, 1)
        summary["equal_30s_rtfx"] = round(b["audio_s"] / b["wall_s"], 1)
        if summary["value"] is not None:
            summary["vs_equal_30s"] = round(summary["value"] / equal_marginal, 3)  # target >= 0.85
        summary["vs_equal_30s_end_to_end"] = round((records[-1]["audio_s"] / records[-1]["wall_s"])
                                                   / (b["audio_s"] / b["wall_s"]), 3)
    rows.append(summary)
    print(json.dumps(summary), flush=True)
