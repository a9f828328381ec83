"""What a GPU replica warms up when it starts: dummy items shaped like the calls its pool will get.

The engine's one-time costs (compiling the prefill and the decode step, capturing the decode graphs,
allocating the static cache) otherwise land in the first call, and in the engine's prefill and decode
times. Each pool knows its modality and the job's sizes, so it warms what it will use:

- speech: a chunk of `audio.max_chunk_s` seconds (the length most chunks have) with the longest of the
  job's speech instructions, the largest of their token limits, a cache for `decode_slots` of them;
- vision: a white Letter page at `image.pdf_dpi` (12 crops and the global view at 150 dpi), the ocr limit, a cache for
  one call's pages;
- text: a 2,048-token prompt (summaries and extractions vary; what matters is that the compiled code
  exists), the text tasks' token limit.

With a JSON Schema (--schema / --extract) the constrained path is warmed too.
"""
from __future__ import annotations

import logging

import numpy as np

from pipeline.media.audio import SAMPLE_RATE
from pipeline.model.prompts import task_instruction
from schemas.config import JobConfig
from schemas.tasks import MODALITY_FOR_TASK

log = logging.getLogger(__name__)

TEXT_WARM_UP_TOKENS = 2048
LETTER_INCHES = (8.5, 11.0)


def warm_up_replica(engine, config: JobConfig, modality: str, grammar: str | None = None,
                    call_items: int | None = None) -> float:
    """Warm `engine` (actors/engine.py: Phi4MMEngine.warm_up) for `modality`'s calls of this job; the
    seconds spent (0 when the engine has nothing to warm, or warming is off). Never raises."""
    if not config.batching.warm_up or not getattr(engine, "use_static", False):
        return 0.0
    try:
        items, max_new, call_items = warm_up_work(engine.model_dir, config, modality, call_items,
                                                  processor=engine.processor)
    except Exception as exc:  # noqa: BLE001 - a replica that cannot warm up still works
        log.warning("warm-up items for the %s pool could not be built (%s: %s); not warming up", modality,
                    type(exc).__name__, exc)
        return 0.0
    spent = engine.warm_up(items, max_new, call_items=call_items, grammar=grammar)
    log.info("%s replica warmed up in %.1f s (compile %.1f s, graphs %.1f s)", modality, spent,
             engine.stats.get("compile_s", 0.0), engine.stats.get("capture_s", 0.0))
    return spent


def warm_up_work(model_dir: str, config: JobConfig, modality: str, call_items: int | None = None,
                 processor=None) -> tuple[list[dict], int, int]:
    """(items, max_new tokens, items per call) a pool's warm-up runs on; `call_items`: the pool's rows per
    call (the vision pool's cache holds one call's pages); `processor`: the replica's, already loaded."""
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(model_dir, config.system_prompt, config.image.dynamic_hd,
                           audio_bucket_s=config.audio.batch_bucket_s, processor=processor)
    limits = config.generation.max_new_tokens
    tasks = config.tasks
    # the tasks this pool may answer (a prompt's pool is decided per row: it may be any)
    served = [t for t in tasks if MODALITY_FOR_TASK.get(t, modality) == modality]
    if modality == "speech":
        rng = np.random.default_rng(0)
        clip = (0.01 * rng.standard_normal(int(config.audio.max_chunk_s * SAMPLE_RATE))).astype(np.float32)
        spoken = [t for t in tasks if t in ("asr", "translate")] or ["asr"]
        target = (config.translate_to or ["fr"])[0]
        items = [builder.audio(clip, task_instruction(t, target if t == "translate" else None)).inputs
                 for t in spoken]
        max_new = max(limits.get(t, 256) for t in served or spoken)
        if config.benchmark.new_tokens_per_30s:
            max_new = config.benchmark.new_tokens_per_30s
        return items, max_new, config.batching.decode_slots
    if modality == "vision":
        from PIL import Image

        dpi = config.image.pdf_dpi
        page = Image.new("RGB", (int(LETTER_INCHES[0] * dpi), int(LETTER_INCHES[1] * dpi)), "white")
        items = [builder.image(page, task_instruction("ocr")).inputs]
        return items, max(limits.get(t, 1024) for t in served or ["ocr"]), call_items or config.batching.rows_per_call
    words = builder.token_ids("word " * TEXT_WARM_UP_TOKENS)[:TEXT_WARM_UP_TOKENS]
    item = builder.text_pieces([words]).inputs
    text_tasks = [t for t in tasks if t in ("summarize", "extract", "prompt")] or ["summarize"]
    return [item], max(limits.get(t, 512) for t in text_tasks), config.batching.decode_slots
