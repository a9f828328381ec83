"""The fused prefill (actors/fast_prefill.py): its K/V sink, grouped attention, fallback, and decoding
after it. The comparison with the model's forward per lever set is tests/test_slot_decoder.py's
test_fused_prefill_equals_the_model_forward_with_left_padding (it uses the helpers here)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.model.prompts import task_instruction

COMPILE_OK = pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile needs a C compiler")


def padded_text_batch(builder, reference):
    from actors.collate import collate

    texts = [builder.text(task_instruction("summarize", transcript="word " * (3 + 11 * k))) for k in range(3)]
    batch = collate([t.inputs for t in texts], reference.pad_token_id)
    assert not bool(batch["attention_mask"].bool().all())  # the batch really is padded
    return batch


def model_prefill(model, batch):
    """The model's own forward over the left-padded batch: last logits, keys, values [layers, b, kv, t, d]."""
    import torch
    from transformers import DynamicCache

    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(**batch, position_ids=pos, past_key_values=cache, use_cache=True)
    return (out.logits[:, -1].float(), torch.stack([layer.keys for layer in cache.layers]),
            torch.stack([layer.values for layer in cache.layers]))


def assert_real_tokens_close(got, want, lengths, tol):
    import torch

    width = got.shape[3]
    for row, n in enumerate(lengths):  # the real tokens of each row (the padding's K/V are never read)
        torch.testing.assert_close(got[:, row, :, width - n:], want[:, row, :, width - n:], rtol=tol, atol=tol)

def engine(tiny_model, modality, decoder, slots=4, model=None, prefill="model", **batching):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    config = BatchingConfig(decoder=decoder, decode_slots=slots, max_batch_size=3, check_every=3,
                            prefill=prefill, **batching)
    return Phi4MMEngine(tiny_model, modality, ModelConfig(source=tiny_model), config, model=model)


@pytest.fixture(scope="module")
def builder(tiny_model):
    from pipeline.model.inputs import InputBuilder

    return InputBuilder(tiny_model, dynamic_hd=2)


@pytest.mark.parametrize("unpad", [True, False])
def test_fused_prefill_writes_slots_through_a_sink(tiny_model, builder, unpad):
    """`kv_sink` (slot_sink): each row's keys/values land at positions [0, n) of its slot, equal to the
    model's, whether the rows were realigned or masked; nothing is stacked (keys, values returned as None)."""
    import torch

    from actors.fast_prefill import FastPrefill, PrefillOptions, slot_sink

    reference = engine(tiny_model, "text", "generate")
    batch = padded_text_batch(builder, reference)
    want_logits, want_keys, want_values = model_prefill(reference.model, batch)
    cfg = reference.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, 5, cfg.num_key_value_heads, 256, head_dim)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    slots = [4, 0, 2]
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits, keys, values = FastPrefill(reference.model, options=PrefillOptions(compile="off", unpad=unpad))(
        batch, pos, kv_sink=slot_sink(k_cache, v_cache, slots))
    assert keys is None and values is None
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    width = batch["input_ids"].shape[1]
    for row, n in enumerate(batch["attention_mask"].sum(-1).tolist()):
        torch.testing.assert_close(k_cache[:, slots[row], :, :n], want_keys[:, row, :, width - n:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v_cache[:, slots[row], :, :n], want_values[:, row, :, width - n:], rtol=1e-5, atol=1e-5)
    assert not k_cache[:, [1, 3]].any()  # other slots untouched


def test_grouped_attention_is_bit_equal_to_repeated_heads():
    """SDPA's enable_gqa reads the 8 K/V heads where the first version copied them to 24: same bits."""
    import torch

    from actors.fast_prefill import attention

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 37, 24, 128, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(2, 37, 8, 128, dtype=dtype).transpose(1, 2) for _ in range(2))
        assert torch.equal(attention(q, k, v, 128 ** -0.5, gqa=True), attention(q, k, v, 128 ** -0.5, gqa=False))


def test_fused_prefill_failure_falls_back_once(tiny_model, builder, caplog, monkeypatch):
    """A failing configured path logs one warning and runs the safe path (equal results) from then on."""
    import torch

    import actors.fast_prefill as fp

    reference = engine(tiny_model, "text", "generate")
    batch = padded_text_batch(builder, reference)
    want_logits, _, _ = model_prefill(reference.model, batch)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    fused = fp.FastPrefill(reference.model, compile_layers=False)
    real = fp.F.scaled_dot_product_attention

    def no_gqa(*args, enable_gqa=False, **kwargs):
        if enable_gqa:
            raise RuntimeError("no kernel for grouped heads")
        return real(*args, **kwargs)

    monkeypatch.setattr(fp.F, "scaled_dot_product_attention", no_gqa)
    for _ in range(2):
        logits, _, _ = fused(batch, pos)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert fused._eager_fallback
    assert sum("fused prefill" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_fifty_steps_with_refills_after_the_fused_prefill(tiny_model, builder, modality):
    """Mixed-length prompts (realigned rows) and pages (fused SigLIP), 3 slots for 5 items, 50 new
    tokens: the static decoder after the fused prefill gives generate's tokens, item by item."""
    from PIL import Image

    rng = np.random.default_rng(7)
    if modality == "text":
        built = [builder.text(task_instruction("summarize", transcript="word " * (4 + 9 * k))) for k in range(5)]
    else:
        built = [builder.image(Image.fromarray(rng.integers(0, 255, (300 + 40 * k, 500, 3), dtype=np.uint8)),
                               task_instruction("ocr")) for k in range(5)]
    reference = engine(tiny_model, modality, "generate", vision_encoder="model")
    want = [reference.generate_batch([b.inputs], 50)[0].token_ids for b in built]
    fast = engine(tiny_model, modality, "static", slots=3, model=reference.model, prefill="fused",
                  vision_encoder="eager")
    got = fast.generate([b.inputs for b in built], [b.batch_key for b in built], [50] * 5)
    assert not fast._decoder.fast_prefill._eager_fallback
    assert [g.token_ids for g in got] == want
    assert max(map(len, want)) == 50  # the items really decode for 50 steps
