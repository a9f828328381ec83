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
ratio to the equal-clip pipeline (target: >= 0.90).
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


def calls_hi(args) -> float:
    """The longest call: 10 min, or 60 s in the CPU smoke test."""
    return MAX_S * (0.1 if args.tiny else 1.0)


def prepare_calls(args, n: int, repo: str) -> list[str]:
    """The `n` call files of the run (the first k of them are the k-call run's)."""
    lengths = call_lengths(n, hi=calls_hi(args))
    return call_files(os.path.join(args.scratch, "asr_calls", "audio"), lengths,
                      os.path.join(repo, "samples", "long", "meeting.flac"))


def run_calls(args, ckpt: str, rows: list[dict], meta: dict, paths: list[str], size: int, job_config_for,
              where_the_time_went) -> dict:
    """The first `size` calls of `paths` through the transcribe job; appends its row, returns its record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.pipeline_jobs import job_row_extras, run_pipeline_job

    work = os.path.join(args.scratch, "asr_calls")
    manifest = os.path.join(work, f"manifest-{size}.parquet")
    pq.write_table(pa.table({"id": [f"call-{k:05d}" for k in range(size)], "uri": paths[:size]}), manifest)
    config = job_config_for(manifest, os.path.join(work, f"out-{size}"))
    per_30s = config["generation"]["max_new_tokens"]["asr"]
    config["benchmark"] = {**config["benchmark"], "new_tokens_per_30s": per_30s}
    run = run_pipeline_job(config, f"asr_calls-{size}", args)
    record = run.record
    assert record["counts"].get("asr", {}).get("ok", 0) == size, record["counts"]
    hi = calls_hi(args)
    row = {**meta, "workload": "asr_calls", "engine": "pipeline", "metric": "rtfx",
           "value": round(record["audio_s"] / record["wall_s"], 1), "items": size,
           "wall_s": round(record["wall_s"], 1), "audio_h": round(record["audio_s"] / 3600, 2),
           "calls_s": [MIN_S, hi], "tokens_per_30s": per_30s, **where_the_time_went(record, 1),
           **batch_stats(record), **job_row_extras(run, args, rows, "asr"),
           "note": f"end to end: calls log-uniform {MIN_S:g}-{hi:g} s, chunked on silence, "
                   f"{per_30s} tokens per 30 s"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return record


def marginal_summary(meta: dict, sizes: tuple[int, int], records: list[dict], equal_sizes: tuple[int, int] | None,
                     equal: list[dict]) -> dict:
    """The calls' marginal RTFx (what more audio costs once Ray and the actors are up) beside the equal
    30 s clips' marginal RTFx of the same run, and their ratio (`vs_equal_30s`, the target's measure)."""
    summary = {**meta, "workload": "asr_calls", "engine": "pipeline_marginal", "metric": "rtfx", "items": sizes[-1],
               "value": None, "wall_s": round(records[-1]["wall_s"], 1)}
    if len(records) > 1:
        a, b = records[0], records[-1]
        summary["value"] = round((b["audio_s"] - a["audio_s"]) / (b["wall_s"] - a["wall_s"]), 1)
        summary["note"] = f"(audio of {sizes[-1]} - {sizes[0]} calls) / (wall difference)"
    if len(equal) > 1:
        a, b = equal[0], equal[-1]
        equal_marginal = (b["audio_s"] - a["audio_s"]) / (b["wall_s"] - a["wall_s"])
        summary["equal_30s_marginal_rtfx"] = round(equal_marginal, 1)
        summary["equal_30s_rtfx"] = round(b["audio_s"] / b["wall_s"], 1)
        summary["equal_30s_clips"] = list(equal_sizes) if equal_sizes else None
        if summary["value"] is not None:
            summary["vs_equal_30s"] = round(summary["value"] / equal_marginal, 3)
        summary["vs_equal_30s_end_to_end"] = round((records[-1]["audio_s"] / records[-1]["wall_s"])
                                                   / (b["audio_s"] / b["wall_s"]), 3)
    return summary


def bench_asr_calls(args, ckpt: str, rows: list[dict], meta: dict, n: int, reference: int, repo: str,
                    equal_clips, job_config_for, where_the_time_went) -> None:
    """`equal_clips(rows, meta, gpus, n)`: the asr pipeline bench on n equal 30 s clips (its record);
    `job_config_for(manifest, output)`: that bench's job config, so both share every setting."""
    paths = prepare_calls(args, n, repo)
    equal, equal_sizes = [], None
    if reference:
        equal_clips([], meta, 1, min(32, reference))  # warm-up: Ray up, kernels built, files cached
        equal_sizes = (max(1, reference // 4), reference)
        equal = [equal_clips(rows, meta, 1, m) for m in sorted(set(equal_sizes))]
    sizes = (max(1, n // 4), n)
    records = [run_calls(args, ckpt, rows, meta, paths, size, job_config_for, where_the_time_went)
               for size in sorted(set(sizes))]
    summary = marginal_summary(meta, sizes, records, equal_sizes, equal)
    rows.append(summary)
    print(json.dumps(summary), flush=True)
