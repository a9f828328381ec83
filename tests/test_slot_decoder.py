"""The static-cache decoder (the GPU fast path) gives generate's tokens, also while refilling slots.

Run here on CPU without CUDA graphs; the same code is captured as a graph on the GPU (bench/ and the
`gpu` tests compare it with generate on the real shapes).
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.model.prompts import task_instruction
from tests.test_fast_prefill import COMPILE_OK, assert_real_tokens_close, model_prefill, padded_text_batch


@pytest.fixture(scope="module")
def builder(tiny_model):
    from pipeline.model.inputs import InputBuilder

    return InputBuilder(tiny_model, dynamic_hd=2)


PREFILLS = ["model", "fused"]  # the model's forward, or actors/fast_prefill.py (eager here, compiled on GPU)


def engine(tiny_model, modality, decoder, slots=4, model=None, prefill="model"):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    batching = BatchingConfig(decoder=decoder, decode_slots=slots, max_batch_size=3, check_every=3,
                              prefill=prefill)
    return Phi4MMEngine(tiny_model, modality, ModelConfig(source=tiny_model), batching, model=model)


def speech_items(builder, n=7):
    rng = np.random.default_rng(3)
    tasks = [("asr", None), ("translate", "fr"), ("translate", "de")]
    items, buckets = [], []
    for k in range(n):
        seconds = 3 if k % 3 else 4  # two lengths, one 2 s bucket: batched together (masked padding)
        clip = (0.1 * rng.standard_normal(16000 * seconds)).astype(np.float32)
        built = builder.audio(clip, task_instruction(*tasks[k % 3]))
        items.append(built.inputs)
        buckets.append(built.batch_key)
    return items, buckets


@pytest.mark.parametrize("prefill", PREFILLS)
def test_static_decoder_equals_generate_with_refills(tiny_model, builder, prefill):
    items, buckets = speech_items(builder)
    reference = engine(tiny_model, "speech", "generate")
    fast = engine(tiny_model, "speech", "static", slots=3, model=reference.model, prefill=prefill)  # 7 items, 3 slots
    max_new = [12, 12, 5, 12, 1, 12, 9]
    want = [reference.generate_batch([it], m)[0].token_ids for it, m in zip(items, max_new)]
    got = fast.generate(items, buckets, max_new)
    assert [g.token_ids for g in got] == want
    assert [len(w) for w in want][2] <= 5 and len(want[4]) <= 1
    assert len({tuple(w) for w in want}) > 3


@pytest.mark.parametrize("prefill", PREFILLS)
def test_static_decoder_min_new_tokens_and_eos(tiny_model, builder, prefill):
    items, buckets = speech_items(builder, 3)
    reference = engine(tiny_model, "speech", "generate")
    fast = engine(tiny_model, "speech", "static", model=reference.model, prefill=prefill)
    want = [reference.generate_batch([it], 10, min_new_tokens=10)[0].token_ids for it in items]
    got = fast.generate(items, buckets, [10, 10, 10], min_new=10)
    assert [g.token_ids for g in got] == want


@pytest.mark.parametrize("prefill", PREFILLS)
def test_static_decoder_vision_and_text(tiny_model, builder, prefill):
    from PIL import Image

    rng = np.random.default_rng(5)
    pages = [Image.fromarray(rng.integers(0, 255, (300 + 40 * k, 500, 3), dtype=np.uint8)) for k in range(3)]
    built = [builder.image(p, task_instruction("ocr")) for p in pages]
    reference = engine(tiny_model, "vision", "generate")
    fast = engine(tiny_model, "vision", "static", model=reference.model, prefill=prefill)
    want = [reference.generate_batch([b.inputs], 8)[0].token_ids for b in built]
    got = fast.generate([b.inputs for b in built], [b.batch_key for b in built], [8] * 3)
    assert [g.token_ids for g in got] == want

    texts = [builder.text(task_instruction("summarize", transcript="word " * (5 + 9 * k))) for k in range(3)]
    reference = engine(tiny_model, "text", "generate")
    fast = engine(tiny_model, "text", "static", model=reference.model, prefill=prefill)
    want = [reference.generate_batch([t.inputs], 8)[0].token_ids for t in texts]
    got = fast.generate([t.inputs for t in texts], [t.batch_key for t in texts], [8] * 3)
    assert [g.token_ids for g in got] == want


OPTIONS = {"new": {}, "no-gqa": {"gqa": False}, "masked": {"unpad": False},
           "first": {"gqa": False, "unpad": False}}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=COMPILE_OK)])
def test_fused_prefill_equals_the_model_forward_with_left_padding(tiny_model, builder, compiled, options):
    """Logits and KV of the fused prefill = the model's own forward, padded rows included; compiled
    (inductor on CPU here, as on the GPU: 'tokens' = one graph for all widths) as well as eager, with each
    lever (grouped K/V heads, realigned rows instead of a dense mask) on and off."""
    import torch

    from actors.fast_prefill import FastPrefill, PrefillOptions

    if compiled and options not in ("new", "first"):
        pytest.skip("the levers' arithmetic is the same compiled or not; compile time is dear on CPU")
    reference = engine(tiny_model, "text", "generate")
    batch = padded_text_batch(builder, reference)
    want_logits, want_keys, want_values = model_prefill(reference.model, batch)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    fused = FastPrefill(reference.model, options=PrefillOptions(
        compile=("tokens" if options == "new" else "dynamic") if compiled else "off", **OPTIONS[options]))
    logits, keys, values = fused(batch, pos)
    assert not fused._eager_fallback  # the configured path really ran
    tol = 1e-4 if compiled else 1e-5  # compiled: inductor's own reduction order in the norms
    lengths = batch["attention_mask"].sum(-1).tolist()
    torch.testing.assert_close(logits, want_logits, rtol=tol, atol=tol)
    assert_real_tokens_close(keys, want_keys, lengths, tol)
    assert_real_tokens_close(values, want_values, lengths, tol)
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    if compiled:  # a second batch of another width and size reuses the graphs (no recompilation)
        from torch._dynamo.utils import counters

        frames = counters["stats"]["unique_graphs"]
        other = {k: v[:2, 3:] for k, v in batch.items()}
        fused(other, (other["attention_mask"].cumsum(-1) - 1).clamp(min=0))
        assert counters["stats"]["unique_graphs"] == frames
