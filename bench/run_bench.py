"""GPU benchmarks: the model card's recipe, batched `generate` and this project's engine, in ONE run.

    python -m bench.run_bench --workloads asr,translate,ocr,summarize --out DIR [--pipeline-clips N]

Builds Phi-4-multimodal at its real size with random bf16 weights on the GPU (bench/real_model.py).
Random weights stop at random points, so every engine decodes exactly the same number of tokens
(min_new_tokens = max_new_tokens). Prints a table, appends it to DIR/RESULTS.md and one JSON object
per measurement to DIR/results.jsonl.

--tiny runs the same code on the tiny checkpoint on CPU (a smoke test of the script, not a benchmark).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import time

import numpy as np
import torch

from bench.asr_calls import bench_asr_calls
from bench.pipeline_jobs import bench_calls_translate, bench_meetings, bench_ocr_docs
from pipeline.model.prompts import task_instruction

WORKLOADS = {
    "asr": {"media": "audio", "seconds": 30.0, "task": "asr", "target": None, "new": 100,
            "engine_items": 512, "card_items": 2, "check": 8},
    "translate": {"media": "audio", "seconds": 30.0, "task": "translate", "target": "fr", "new": 120,
                  "engine_items": 512, "card_items": 2, "check": 8},
    "ocr": {"media": "image", "size": (1700, 2200), "task": "ocr", "target": None, "new": 400,
            "engine_items": 64, "card_items": 1, "check": 4},
    "summarize": {"media": "text", "tokens": 4000, "task": "summarize", "target": None, "new": 300,
                  "engine_items": 128, "card_items": 1, "check": 4},
}  # check: items of the first-step logits check
FLOPS_PER_PARAM_TOKEN = 2


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


class Items:
    """Inputs for one workload, built on CPU once: a few distinct ones, repeated."""

    def __init__(self, builder, spec: dict, distinct: int, rng: np.random.Generator, scale: float = 1.0):
        self.spec = spec
        self.instruction = task_instruction(spec["task"], spec["target"])
        self.raw, self.built = [], []
        for _ in range(distinct):
            if spec["media"] == "audio":
                clip = (0.1 * rng.standard_normal(int(16000 * spec["seconds"] * scale))).astype(np.float32)
                self.raw.append(clip)
                self.built.append(builder.audio(clip, self.instruction))
            elif spec["media"] == "image":
                from PIL import Image

                w, h = (int(v * scale) for v in spec["size"])
                page = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                self.raw.append(page)
                self.built.append(builder.image(page, self.instruction))
            else:
                words = rng.choice(["call", "account", "refund", "order", "hold", "the", "we", "agreed",
                                    "Tuesday", "invoice", "router", "budget"], size=int(spec["tokens"] * scale))
                transcript = " ".join(words)
                built = builder.text(task_instruction("summarize", transcript=transcript))
                while built.input_tokens > spec["tokens"] * scale:  # trim to the token target
                    transcript = transcript[: int(len(transcript) * spec["tokens"] * scale / built.input_tokens)]
                    built = builder.text(task_instruction("summarize", transcript=transcript))
                self.raw.append(task_instruction("summarize", transcript=transcript))
                self.built.append(built)

    def take(self, n: int):
        return [self.built[i % len(self.built)] for i in range(n)]

    def units(self, n: int) -> float:
        """Audio seconds, pages or items: what the workload's metric counts."""
        if self.spec["media"] == "audio":
            return n * len(self.raw[0]) / 16000
        return float(n)


def metric_of(spec: dict) -> str:
    return {"audio": "rtfx", "image": "pages_per_s", "text": "items_per_s"}[spec["media"]]


def run_card(card, items: Items, n: int, new: int) -> tuple[float, list]:
    outs = []

    def go():
        for k in range(n):
            raw = items.raw[k % len(items.raw)]
            if items.spec["media"] == "audio":
                outs.append(card.audio(raw, items.instruction, new, new))
            elif items.spec["media"] == "image":
                outs.append(card.image(raw, items.instruction, new, new))
            else:
                outs.append(card.text(raw, new, new))

    _, wall = timed(go)
    return wall, outs


def run_engine(engine, items: Items, n: int, new: int):
    built = items.take(n)
    gens, wall = timed(lambda: engine.generate([b.inputs for b in built], [b.batch_key for b in built], [new] * n,
                                               min_new=new))
    bad = [g for g in gens if isinstance(g, Exception)]
    if bad:
        raise bad[0]
    assert all(len(g.token_ids) == new for g in gens), "output length not fixed"
    return wall, gens


def stats_delta(before: dict, after: dict) -> dict:
    """What an engine's cumulative `stats` gained between two snapshots, for every key it has (the
    engine adds keys as it grows: warm-up, compile and capture times, prefill calls and retries, host
    time per step); a key that is not a number is reported as it is now. The engine's own dict is
    never reset or rebuilt here: code inside the engine adds to its keys, so one left out would break it."""
    out = {}
    for key, value in after.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out[key] = value
            continue
        gained = value - before.get(key, 0)
        out[key] = round(gained, 4) if isinstance(gained, float) else gained
    return out


def engine_timing(stats: dict) -> dict:
    """The headline split of a timed run from its stats delta (absent keys count 0)."""
    steps = stats.get("steps", 0) or 0
    return {"prefill_s": round(stats.get("prefill_s", 0.0), 3), "decode_s": round(stats.get("decode_s", 0.0), 3),
            "decode_ms_per_step": round(1000 * stats.get("decode_s", 0.0) / max(1, steps), 2)}


# first-step logits of the engine against `generate`'s: relative L2 difference a correct path stays under.
# In float32 only summation order differs (~1e-6); in bf16 a correct batched, padded prefill measured
# 0.02-0.05 against the unpadded single forward on an H200 (32 layers of bf16 rounding), while a wrong
# mask, position or cache gives differences of order 1
FIRST_STEP_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}


def engine_first_step_logits(engine, built) -> tuple[torch.Tensor, str]:
    """The engine's first-step logits [n, vocab] (float32) of `built` prefilled as one left-padded batch,
    through the prefill its static decoder runs (the fused decoder when it has one), and that path's name."""
    from actors.collate import collate

    batch = engine._to_device(collate([b.inputs for b in built], engine.pad_token_id))
    pos = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    fused = getattr(getattr(engine, "_decoder", None), "fast_prefill", None)
    if fused is not None:
        supports = getattr(fused, "supports", None)
        if supports is None or supports(batch["attention_mask"].shape[1]):
            return fused(batch, pos)[0].float(), "fused"
    return engine.model(**batch, position_ids=pos, logits_to_keep=1).logits[:, -1].float(), "model"


def first_step_check(model, engine, items: Items, n: int) -> dict:
    """First-step logits of the engine's batched prefill against `generate` on each item alone (one
    unpadded item, the model's own forward, `output_logits`): the largest relative L2 difference, how
    many items pick the same first token, and whether the difference is within the dtype's tolerance."""
    from actors.collate import collate

    built = items.take(n)
    dtype = next(model.parameters()).dtype
    tolerance = FIRST_STEP_TOLERANCE.get(dtype, 0.1)
    with torch.inference_mode():
        many, path = engine_first_step_logits(engine, built)
        worst, same = 0.0, 0
        for k, b in enumerate(built):
            one = engine._to_device(collate([b.inputs], engine.pad_token_id))
            out = model.generate(**one, max_new_tokens=1, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=engine.pad_token_id)
            single = out.logits[0][0].float()
            worst = max(worst, float((many[k] - single).norm() / single.norm()))
            same += int(many[k].argmax() == single.argmax())
    return {"first_step_logits_max_rel_diff": float(f"{worst:.3g}"), "first_step_top1_same": f"{same}/{len(built)}",
            "first_step_tolerance": tolerance, "first_step_within_tolerance": worst <= tolerance,
            "first_step_path": path}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def decoder_param_counts(model) -> tuple[int, int]:
    """(parameters of the decoder layers, of the LM head): what the arithmetic floor counts."""
    layers = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers."))
    return layers, model.lm_head.weight.numel()


def decoder_flops(model, prompt: int, new: int, counts: tuple[int, int] | None = None) -> float:
    """Decoder matmul FLOPs of one item: 2 x params x tokens (embedding lookups excluded)."""
    params, head = counts or decoder_param_counts(model)
    return FLOPS_PER_PARAM_TOKEN * (params * (prompt + new) + head * new)


def engine_batching(args, slots: int, **fixed):
    """The engine's batching for a timed run: the bench's sizes, then the `--set batching.X=V` overrides."""
    from schemas.config import BatchingConfig

    base = {"decoder": "static", "decode_slots": slots, "max_batch_size": args.prefill_batch,
            "max_batch_tokens": args.prefill_tokens, "check_every": args.check_every, **fixed}
    return BatchingConfig(**{**base, **getattr(args, "overrides", {}).get("batching", {})})


def free_gpu() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_workload(name: str, args, ckpt: str, base, card, rows: list[dict], meta: dict,
                   with_baselines: bool = True) -> None:
    """One engine workload: the card recipe (when `card` is given), batched `generate`, then this
    project's engine at each of `args.slot_counts`, all on the same inputs. `with_baselines` False: the
    engine alone (ablation runs)."""
    from actors.engine import Phi4MMEngine
    from pipeline.model.inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig

    spec = WORKLOADS[name]
    new = max(2, int(spec["new"] * args.scale))
    builder = InputBuilder(ckpt)
    items = Items(builder, spec, args.distinct, np.random.default_rng(0), args.scale)
    metric = metric_of(spec)
    prompt = items.built[0].input_tokens
    extra_meta = dict(getattr(args, "row_extra", None) or {})

    def record(engine_name: str, n: int, wall: float, extra: dict | None = None):
        value = items.units(n) / wall
        row = {**meta, "workload": name, "engine": engine_name, "metric": metric, "value": round(value, 3),
               "items": n, "wall_s": round(wall, 3), "prompt_tokens": prompt, "new_tokens": new,
               "tokens_per_s": round(n * new / wall, 1), **extra_meta, **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return value

    card_value = gen_value = None
    gen_out: list = []
    if card is not None and with_baselines:
        n_card = args.card_items or spec["card_items"]
        run_card(card, items, 1, 2)  # warm-up: the adapter loaded, the kernels built
        wall, _ = run_card(card, items, n_card, new)
        card_value = record("card_recipe", n_card, wall, {"lora": "unmerged (peft)"})

    if with_baselines:
        gen_batch = args.gen_batch or spec.get("gen_batch", 32)
        batching = BatchingConfig(decoder="generate", max_batch_size=gen_batch, max_batch_tokens=10**9)
        gen_engine = Phi4MMEngine(ckpt, "speech", ModelConfig(source=ckpt), batching, model=base)
        n_gen = gen_batch * args.b32_batches
        run_engine(gen_engine, items, min(gen_batch, n_gen), 2)  # warm-up at the measured batch shape
        wall, gen_out = run_engine(gen_engine, items, n_gen, new)
        gen_value = record(f"generate_b{gen_batch}", n_gen, wall, {"lora": "merged"})
        del gen_engine
        free_gpu()

    for slots in args.slot_counts:
        started = time.perf_counter()
        fast = Phi4MMEngine(ckpt, "speech", ModelConfig(source=ckpt), engine_batching(args, slots), model=base)
        init_s = time.perf_counter() - started
        # at least two rounds of the slots, so refilling is part of what is timed
        n_fast = max(args.engine_items or spec["engine_items"], 2 * slots if name in ("asr", "translate") else 0)
        # warm-up as a replica does when its actor starts (actors/warm_up.py): the cache and the compiled
        # prefill and decode graphs for a call of the timed size; then a short call for what is left (the
        # runs of 2026-12-04 warmed with the short call alone, and the timed asr call still compiled: 7.45 s
        # of wall for 5.1 s of prefill and decode)
        replica_warm_s = fast.warm_up([b.inputs for b in items.built], new, call_items=n_fast)
        warm_wall, _ = run_engine(fast, items, min(n_fast, 8), new)
        before = dict(fast.stats)
        wall, fast_out = run_engine(fast, items, n_fast, new)
        stats = stats_delta(before, fast.stats)
        extra = {**engine_timing(stats), "slots": getattr(fast._decoder, "slots", None),
                 "engine_init_s": round(init_s, 3), "warmup_wall_s": round(warm_wall, 3),
                 "replica_warm_up_s": round(replica_warm_s, 3),
                 "engine_stats": stats, "warmup_stats": stats_delta({}, before),
                 "batching": fast.batching.model_dump(mode="json")}
        if gen_out:
            compared = min(32, len(gen_out), len(fast_out))
            same = sum(a.token_ids == b.token_ids for a, b in zip(gen_out[:compared], fast_out[:compared]))
            prefixes = [common_prefix(a.token_ids, b.token_ids)
                        for a, b in zip(gen_out[:compared], fast_out[:compared])]
            extra.update({"identical_rows_vs_generate": f"{same}/{compared}",
                          "identical_first10_vs_generate": f"{sum(p >= min(10, new) for p in prefixes)}/{compared}",
                          "mean_identical_prefix": round(float(np.mean(prefixes)), 1)})
        if with_baselines:
            extra.update(first_step_check(base, fast, items, min(args.first_step_items or spec.get("check", 8),
                                                                   n_fast)))
        flops = decoder_flops(base, prompt, new) * n_fast
        extra["fraction_of_arithmetic_floor"] = round(flops / (args.peak_tflops * 1e12) / wall, 3)
        value = record("engine", n_fast, wall, extra)
        if gen_value:
            rows[-1]["vs_generate"] = round(value / gen_value, 2)
        if card_value:
            rows[-1]["vs_card_recipe"] = round(value / card_value, 1)
        del fast
        free_gpu()


def equal_clip_files(folder: str, distinct: int, seconds: float) -> list[str]:
    """`distinct` WAV files of `seconds` of noise each (16 kHz, 16-bit), written once."""
    import soundfile as sf

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    uris = []
    for k in range(distinct):
        path = os.path.join(folder, f"clip{k:03d}.wav")
        clip = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
        if not (os.path.exists(path) and os.path.getsize(path) == 44 + 2 * len(clip)):
            sf.write(path, clip, 16000, subtype="PCM_16")
        uris.append(path)
    return uris


def bench_pipeline(args, ckpt: str, rows: list[dict], meta: dict, gpus: int, n: int) -> dict:
    """The asr work through the whole pipeline: Parquet manifest of WAV files -> Ray Data -> Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.pipeline_jobs import job_row_extras, run_pipeline_job

    work = os.path.join(args.scratch, "pipeline")
    uris = equal_clip_files(os.path.join(work, "audio"), args.distinct, 30.0 * args.scale)
    manifest = os.path.join(work, f"manifest-{n}.parquet")
    pq.write_table(pa.table({"id": [f"call-{i:06d}" for i in range(n)], "uri": [uris[i % len(uris)] for i in range(n)]}),
                   manifest)
    config = asr_job_config(args, ckpt, manifest, os.path.join(work, f"out-{gpus}gpu-{n}"), gpus)
    run = run_pipeline_job(config, f"stages-{gpus}gpu-{n}", args)
    record = run.record
    ok = record["counts"].get("asr", {}).get("ok", 0)
    assert ok == n, record["counts"]
    value = record["audio_s"] / record["wall_s"]
    row = {**meta, "workload": "asr", "engine": "pipeline", "metric": "rtfx", "value": round(value, 3),
           "items": n, "wall_s": round(record["wall_s"], 3), "gpus": gpus,
           **where_the_time_went(record, gpus), **job_row_extras(run, args, rows, "asr"),
           "note": "end to end: actor load, read, decode, VAD, features, GPU, Parquet"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return record


def asr_job_config(args, ckpt: str, manifest: str, output: str, gpus: int = 1) -> dict:
    """The asr pipeline bench's job: 100 new tokens per 30 s clip (min = max), the engine's batching."""
    new = max(2, int(100 * args.scale))
    return {
        "job": "transcribe", "input": manifest, "output": output, "model": {"source": ckpt},
        "generation": {"max_new_tokens": {"asr": new}},
        "benchmark": {"random_weights": not args.tiny, "min_new_tokens": new},
        "batching": {"decoder": "static" if not args.tiny else "generate", "decode_slots": args.slots,
                     "max_batch_size": args.prefill_batch, "rows_per_call": args.slots,
                     "check_every": args.check_every},
        "audio": {"reject_no_speech": False},
        "resources": {"gpus_per_replica": 1.0 if not args.tiny else 0.0, "max_replicas": max(1, gpus),
                      "min_replicas": max(1, gpus)},
    }


def where_the_time_went(record: dict, gpus: int) -> dict:
    """From the run record's per-stage times: how busy the GPU pool was over its span, how many CPU
    decode workers were busy on average, and the rate of the GPU pool over its own span (no start-up)."""
    stages = {s["stage"].split("(")[-1].rstrip(")").split("->")[0]: s for s in record.get("stages", [])}
    speech, prepare = stages.get("SpeechStage"), stages.get("PrepareAudio")
    out = {}
    if speech and speech.get("busy_s") and speech["wall_s"] > 0:
        out["gpu_pool_busy"] = round(speech["busy_s"] / (gpus * speech["wall_s"]), 3)
        out["gpu_span_rtfx"] = round(record["audio_s"] / speech["wall_s"], 1)
        out["gpu_span_s"] = speech["wall_s"]
    if prepare and prepare.get("busy_s") and prepare["wall_s"] > 0:
        out["decode_workers_busy"] = round(prepare["busy_s"] / prepare["wall_s"], 1)
    return out


def engine_value(rows: list[dict], workload: str) -> float | None:
    """The bare engine's figure of `workload` in this run (its last non-ablation row), or None."""
    found = [r["value"] for r in rows if r.get("workload") == workload and r.get("engine") == "engine"
             and not r.get("ablation") and r.get("value") is not None]
    return found[-1] if found else None


TABLE_NOTES = ("identical_rows_vs_generate", "identical_first10_vs_generate", "mean_identical_prefix",
               "first_step_logits_max_rel_diff", "first_step_top1_same", "first_step_within_tolerance",
               "fraction_of_arithmetic_floor", "slots", "prefill_s", "decode_s", "decode_ms_per_step",
               "engine_init_s", "warmup_wall_s", "ablation", "vs_reference", "first_row_s", "gpu_pool_busy",
               "gpu_span_rtfx", "decode_workers_busy", "lora", "audio_h", "all_ok", "fallback_fired",
               "peak_gpu_mib", "engine_prefill_s", "engine_decode_s", "engine_caches_built", "summary_sections",
               "mean_batch", "batches", "batches_full", "chunks", "equal_30s_marginal_rtfx", "vs_equal_30s",
               "vs_equal_30s_end_to_end", "engine_figure", "vs_engine", "stage_wall_s", "gpu_span_pages_per_s",
               "gpu_span_vs_engine", "rows_per_vision_call", "peak_host_gb", "note")


def table(rows: list[dict]) -> str:
    lines = ["| workload | engine | GPUs | metric | value | items | wall s | vs generate | vs card | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = ", ".join(f"{k}={r[k]}" for k in TABLE_NOTES if r.get(k) is not None)
        vs_gen = r.get("vs_generate", r.get("vs_generate_b32", ""))
        lines.append(f"| {r['workload']} | {r['engine']} | {r.get('gpus', 1)} | {r['metric']} | {r['value']} | "
                     f"{r['items']} | {r['wall_s']} | {vs_gen} | {r.get('vs_card_recipe', '')} | {notes} |")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict:
    """`SECTION.FIELD=VALUE` pairs (`batching.decode_slots=512`) as {section: {field: value}}; a value is
    read as JSON when it parses (numbers, true/false, null), else kept as text. Checked against the job
    config's sections now, so a misspelt field fails before any GPU time is spent."""
    from schemas.config import JobConfig

    out: dict = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise SystemExit(f"--set {pair!r}: expected SECTION.FIELD=VALUE, e.g. batching.decode_slots=512")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(section, {})[field] = value
    for section, fields in out.items():
        model = JobConfig.model_fields.get(section)
        if model is None or not hasattr(model.annotation, "model_validate"):
            raise SystemExit(f"--set: no config section {section!r}")
        try:
            model.annotation.model_validate(fields)
        except Exception as exc:  # noqa: BLE001 - the validator's message says which field and why
            raise SystemExit(f"--set {section}: {exc}") from None
    return out


def with_overrides(config: dict, overrides: dict) -> dict:
    """A job config dict with the `--set` overrides merged into its sections."""
    out = dict(config)
    for section, fields in (overrides or {}).items():
        out[section] = {**out.get(section, {}), **fields}
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="asr")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--scratch", default="/tmp/phi4mm-bench")
    ap.add_argument("--card-items", type=int, default=0, help="0: the workload's default")
    ap.add_argument("--gen-batch", type=int, default=0, help="batched generate's batch size (0: 32)")
    ap.add_argument("--b32-batches", type=int, default=2, help="batches of batched generate timed")
    ap.add_argument("--engine-items", type=int, default=0, help="0: the workload's default")
    ap.add_argument("--first-step-items", type=int, default=0, help="items of the first-step logits check "
                                                                     "(0: the workload's default)")
    ap.add_argument("--slots", default="256", help="comma list: the engine is timed at each; the pipeline "
                                                    "uses the last (also as rows per GPU call)")
    ap.add_argument("--prefill-batch", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=65536)
    ap.add_argument("--check-every", type=int, default=16)
    ap.add_argument("--distinct", type=int, default=16)
    ap.add_argument("--pipeline-clips", default="0", help="comma list of manifest sizes, e.g. 512,2048")
    ap.add_argument("--pipeline-gpus", default="1", help="comma list, e.g. 1,2")
    ap.add_argument("--pipeline-per-gpu", action="store_true",
                    help="--pipeline-clips are per GPU: N GPUs get N times the clips (scaling runs)")
    ap.add_argument("--meetings", type=int, default=0, help="N one-hour recordings through `phi4mm meetings`")
    ap.add_argument("--calls-translate", type=int, default=0,
                    help="N 30 s calls through transcribe --translate-to fr --summarize")
    ap.add_argument("--calls", type=int, default=0,
                    help="asr_calls: N calls of 3 s-10 min (and N/4) through transcribe (bench/asr_calls.py)")
    ap.add_argument("--calls-reference", type=int, default=512,
                    help="asr_calls: equal 30 s clips (and a quarter) through the same job, in the same run")
    ap.add_argument("--ocr-docs", type=int, default=0,
                    help="N pages of real-size documents (PDFs of 5-120 pages, scans) through `phi4mm ocr`")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="measured bf16 matmul rate of the card")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override for the engine's batching and every job (repeatable), "
                         "e.g. --set batching.decode_slots=512")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny checkpoint")
    return ap


def finish_args(args):
    """The derived settings every bench function reads."""
    args.slot_counts = [int(v) for v in str(args.slots).split(",")]
    args.slots = args.slot_counts[-1]
    args.scale = 0.1 if args.tiny else 1.0
    args.device = "cpu" if args.tiny else "cuda"
    if isinstance(args.overrides, list):
        args.overrides = parse_overrides(args.overrides)
    return args


def bench_meta() -> dict:
    card_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"date": dt.date.today().isoformat(), "card": card_name, "gpus": 1, "torch": torch.__version__}


def card_for(base, ckpt: str, workloads: list[str], args):
    """The card recipe on its own copy of the model (it carries the unmerged LoRA; `base` stays plain);
    on the GPU the random LoRAs it loads are written first, at the real ranks."""
    from bench.card_recipe import CardRecipe
    from bench.real_model import save_random_lora

    card_model = copy.deepcopy(base)
    if not args.tiny:
        for name in workloads:
            sub = "vision" if WORKLOADS[name]["media"] == "image" else "speech"
            if WORKLOADS[name]["media"] != "text" and not os.path.isdir(os.path.join(ckpt, f"{sub}-lora")):
                save_random_lora(card_model, ckpt, f"{sub}-lora", 256 if sub == "vision" else 320)
    return CardRecipe(ckpt, device=args.device, dtype=base.dtype, model=card_model)


def failed_row(meta: dict, name: str, exc: BaseException, items: int = 0) -> dict:
    import traceback

    traceback.print_exc()
    return {**meta, "workload": name, "engine": "failed", "metric": "-", "value": None, "items": items,
            "wall_s": 0, "note": f"{type(exc).__name__}: {exc}"[:300]}


def main(argv=None):
    args = finish_args(parser().parse_args(argv))
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.scratch, "ckpt")
    from bench.real_model import bench_model

    base = bench_model(ckpt, args.tiny)
    args.decoder_params = decoder_param_counts(base)
    meta = bench_meta()
    rows: list[dict] = []
    workloads = [w for w in args.workloads.split(",") if w]
    if workloads:
        card = card_for(base, ckpt, workloads, args)
        for name in workloads:
            try:
                bench_workload(name, args, ckpt, base, card, rows, meta)
            except Exception as exc:  # noqa: BLE001 - one workload failing must not lose the others
                rows.append(failed_row(meta, name, exc))
            write_results(args.out, rows, partial=True)
        del card
    del base
    free_gpu()
    if args.pipeline_clips != "0":
        base_sizes = [int(n) for n in str(args.pipeline_clips).split(",")]
        for k, gpus in enumerate(int(g) for g in args.pipeline_gpus.split(",")):
            sizes = [n * gpus for n in base_sizes] if args.pipeline_per_gpu else base_sizes
            if k == 0:  # warm-up: Ray up, files in the page cache, kernels built
                bench_pipeline(args, ckpt, [], {**meta, "gpus": gpus}, gpus, min(32, sizes[0]))
            records = [bench_pipeline(args, ckpt, rows, {**meta, "gpus": gpus}, gpus, n) for n in sizes]
            if len(records) > 1:  # the marginal rate: what more audio costs once Ray and the actors are up
                rows.append(marginal_row({**meta, "gpus": gpus}, "asr", records[0], records[-1], sizes[0], sizes[-1]))
                print(json.dumps(rows[-1]), flush=True)
            write_results(args.out, rows, partial=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, n, run in (("meetings", args.meetings, lambda n: bench_meetings(args, ckpt, rows, meta, n, repo)),
                         ("calls_translate_summarize", args.calls_translate,
                          lambda n: bench_calls_translate(args, ckpt, rows, meta, n)),
                         ("asr_calls", args.calls, lambda n: bench_asr_calls(
                             args, ckpt, rows, meta, n, args.calls_reference, repo,
                             lambda rows_, meta_, gpus, m: bench_pipeline(args, ckpt, rows_, {**meta_, "gpus": gpus},
                                                                          gpus, m),
                             lambda manifest, output: asr_job_config(args, ckpt, manifest, output),
                             where_the_time_went)),
                         ("ocr_docs", args.ocr_docs, lambda n: bench_ocr_docs(args, ckpt, rows, meta, n))):
        if n:
            try:
                run(n)
            except Exception as exc:  # noqa: BLE001 - report it and keep the other rows
                rows.append(failed_row(meta, name, exc, n))
            write_results(args.out, rows, partial=True)
    write_results(args.out, rows, partial=False)
    print(table(rows))
    return rows


def marginal_row(meta: dict, workload: str, a: dict, b: dict, n_a: int, n_b: int) -> dict:
    """What more audio costs once Ray and the actors are up: (audio of b - a) / (wall of b - a)."""
    value = (b["audio_s"] - a["audio_s"]) / (b["wall_s"] - a["wall_s"])
    return {**meta, "workload": workload, "engine": "pipeline_marginal", "metric": "rtfx", "value": round(value, 3),
            "items": n_b - n_a, "wall_s": round(b["wall_s"] - a["wall_s"], 3),
            "note": f"(audio of {n_b} - {n_a} clips) / (wall difference)"}


def write_results(out: str, rows: list[dict], partial: bool) -> None:
    with open(os.path.join(out, "results.partial.jsonl" if partial else "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if not partial:
        with open(os.path.join(out, "RESULTS.md"), "w") as f:
            card = rows[0]["card"] if rows else "?"
            f.write(f"\n## {dt.date.today().isoformat()} — {card}\n\n{table(rows)}\n")


if __name__ == "__main__":
    main()
