"""GPU checks of the decode step's fast paths (run on the device host: `pytest -m gpu tests/test_gpu_decode.py -s`).

1. Tiny model, float32, CUDA graphs: the compiled step with matmul attention and with FlexAttention give
   the eager step's tokens exactly, with refills, and neither fell back (no warning path taken).
2. Warm-up: after `Phi4MMEngine.warm_up`, a call of the warmed shape compiles and captures nothing.
3. Real shapes, random bf16 weights: ms per decode step of the eager / compiled-matmul / compiled-flex
   steps at asr-like (256 and 512 slots, 512-position cache at position 400) and ocr-like (64 slots,
   5,760 positions at 5,500) states, and each one's logits against the eager step's (relative difference).
   Prints one JSON line per measurement; asserts only that every path ran as itself.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from pipeline.model.prompts import task_instruction

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def engines(tiny_model, modality: str, slots: int, batch: int, **batching):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    cfg = ModelConfig(source=tiny_model, dtype="float32")
    eager = Phi4MMEngine(tiny_model, modality, cfg, BatchingConfig(decoder="static", decode_slots=slots,
                                                                   max_batch_size=batch, decode_step="eager"))
    fast = Phi4MMEngine(tiny_model, modality, cfg, BatchingConfig(decoder="static", decode_slots=slots,
                                                                  max_batch_size=batch, **batching),
                        model=eager.model)
    return eager, fast


@pytest.mark.parametrize("attention", ["matmul", "flex"])
def test_compiled_decode_step_equals_the_eager_step_on_gpu(tiny_model, attention):
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model)
    texts = [builder.text("Summarize: " + "word " * (3 + 7 * k)) for k in range(9)]
    eager, fast = engines(tiny_model, "text", slots=4, batch=2, decode_attention=attention, decode_length_bucket=32)
    max_new = [50, 20, 50, 7, 50, 33, 1, 50, 12]
    want = eager.generate([t.inputs for t in texts], [t.batch_key for t in texts], max_new, min_new=5)
    got = fast.generate([t.inputs for t in texts], [t.batch_key for t in texts], max_new, min_new=5)
    d = fast._decoder
    assert d.fns.compiled and (d.flex is not None) == (attention == "flex")  # no fallback was taken
    assert d.graph is not None and len(d.graphs) >= 1
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_warm_up_leaves_nothing_to_compile_or_capture(tiny_model):
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model)
    rng = np.random.default_rng(11)
    built = [builder.audio((0.1 * rng.standard_normal(16000 * 4)).astype(np.float32), task_instruction("asr"))
             for _ in range(8)]
    _, fast = engines(tiny_model, "speech", slots=8, batch=8)
    assert fast.warm_up([built[0].inputs], 16, call_items=8) > 0
    before = dict(fast.stats)
    fast.generate([b.inputs for b in built], [b.batch_key for b in built], [16] * 8, min_new=16)
    assert fast.stats["caches_built"] == before["caches_built"] == 1
    assert fast.stats["compile_s"] == before["compile_s"] and fast.stats["capture_s"] == before["capture_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in fast.stats.items()}))


@torch.inference_mode()
def test_decode_step_timings_at_real_shapes(tmp_path):
    from actors.decode_step import FlexDecode, StepFunctions
    from actors.slot_decoder import SlotDecoder
    from bench.real_model import random_real_model, write_bench_checkpoint

    model = random_real_model(write_bench_checkpoint(str(tmp_path / "ckpt")))
    eos = set(model.generation_config.eos_token_id)
    for slots, max_len, at in ((256, 512, 400), (512, 512, 400), (64, 5760, 5500)):
        d = SlotDecoder(model, slots, max_len, eos, [], compiled=False)
        g = torch.Generator(device="cuda").manual_seed(0)
        for cache in (d.k_cache, d.v_cache):
            cache.normal_(0, 1, generator=g)
        d.tokens.random_(0, 190000, generator=g)
        state = {"pos": torch.full_like(d.pos, at), "active": torch.ones_like(d.active),
                 "limit": torch.full_like(d.limit, max_len - 2), "min_pos": torch.zeros_like(d.min_pos)}
        d.host_busy[:] = True

        def reset():
            for name, value in state.items():
                getattr(d, name).copy_(value)
            d.host_pos[:] = at
            d.host_limit[:] = max_len - 2

        reference = None
        for name in ("eager", "compiled", "flex"):
            d.graphs.clear()
            d.fns = StepFunctions(compiled=name != "eager")
            d.flex = FlexDecode(slots, max_len, d.pos, d.active) if name == "flex" else None
            reset()
            logits = d._logits(*d.step_shape()).clone()
            reference = logits if reference is None else reference
            rel = float(((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).max())
            reset()
            d.step()  # captures
            assert (d.flex is not None) == (name == "flex") and d.fns.compiled == (name != "eager")
            reset()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                d.step()
            torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - start) / 20
            print(json.dumps({"part": "decode_step", "step": name, "slots": slots, "max_len": max_len, "position": at,
                              "columns": d.step_shape()[1], "ms": round(ms, 2),
                              "ms_per_item_100_steps": round(ms * 100 / slots, 3),
                              "logits_rel_diff_vs_eager": round(rel, 5)}), flush=True)
        del d
        torch.cuda.empty_cache()
