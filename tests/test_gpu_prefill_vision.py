"""GPU tests of the compiled prefill levers and the compiled SigLIP encoder (run on the device host:
`pytest -m gpu tests/test_gpu_prefill_vision.py`): each path really runs (no fallback), equals the model's
own in float32, and the real-width SigLIP layer in bf16 stays within 2e-2 of float32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.prompts import task_instruction

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                attn_implementation="sdpa").to("cuda").eval()


def rel(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_compiled_prefill_levers_equal_the_model_forward(tiny_model):
    from actors.collate import collate
    from actors.fast_prefill import FastPrefill, PrefillOptions, slot_sink
    from pipeline.model.inputs import InputBuilder

    model = cuda_model(tiny_model)
    builder = InputBuilder(tiny_model)
    texts = [builder.text(task_instruction("summarize", transcript="word " * (4 + 13 * k))) for k in range(6)]
    batch = {k: v.cuda() for k, v in collate([t.inputs for t in texts], model.config.pad_token_id).items()}
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        want = model(**batch, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
        for options in (PrefillOptions(compile="tokens"), PrefillOptions(compile="tokens", unpad=False),
                        PrefillOptions(compile="dynamic", gqa=False, unpad=False)):
            fused = FastPrefill(model, options=options)
            logits, keys, _ = fused(batch, pos)
            assert not fused._eager_fallback, options
            assert rel(logits, want) < 1e-4, options
        cfg = model.config
        shape = (cfg.num_hidden_layers, 8, cfg.num_key_value_heads, 256, cfg.hidden_size // cfg.num_attention_heads)
        k_cache = torch.zeros(shape, device="cuda")
        v_cache = torch.zeros(shape, device="cuda")
        fused = FastPrefill(model, options=PrefillOptions(compile="tokens"))
        fused(batch, pos, kv_sink=slot_sink(k_cache, v_cache, list(range(6))))
        assert not fused._eager_fallback
        width = batch["input_ids"].shape[1]
        for row, n in enumerate(batch["attention_mask"].sum(-1).tolist()):
            assert rel(k_cache[:, row, :, :n], keys[:, row, :, width - n:]) < 1e-5


def test_compiled_vision_encoder_equals_the_model(tiny_model):
    from actors.vision_encoder import install_vision_encoder

    model = cuda_model(tiny_model)
    embed = model.model.embed_tokens_extend.image_embed
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(5, 3, 448, 448, generator=g).cuda()
    mask = torch.ones(5, 32, 32, dtype=torch.bool, device="cuda")
    mask[2, :, -4:] = False  # a padded crop: the model's sdpa path is then bidirectional, as ours
    with torch.inference_mode():
        want = embed.get_img_features(pixels, mask)
        assert install_vision_encoder(model, "auto") == 1  # auto = compiled on CUDA
        got = embed.get_img_features(pixels, mask)
        again = embed.get_img_features(pixels[:3], mask[:3])  # another crop count: same graphs
    assert embed.__dict__.get("_fused_siglip") is not None and embed._fused_siglip.compiled  # no fallback
    assert rel(got, want) < 1e-5
    assert rel(again, want[:3]) < 1e-5


def test_real_width_siglip_layer_bf16_compiled():
    from actors.vision_encoder import SiglipLayers
    from bench.vision_prefill_proxies import so400m_layer

    cfg, layer32 = so400m_layer(torch.float32)
    _, layer16 = so400m_layer(torch.bfloat16)
    layer32, layer16 = layer32.cuda(), layer16.cuda()
    x = torch.randn(4, 1024, 1152, device="cuda")
    key_mask = torch.ones(4, 1024, dtype=torch.bool, device="cuda")
    key_mask[3].view(32, 32)[:, -4:] = False
    with torch.inference_mode():
        want = layer32(x, key_mask[:, None, None, :])
        fused32 = SiglipLayers([layer32], 16, 72, cfg.layer_norm_eps, compile_layers=True)
        fused16 = SiglipLayers([layer16], 16, 72, cfg.layer_norm_eps, compile_layers=True)
        # the maskless (flash) and masked groups, as FusedSiglip runs them
        got32 = torch.cat([fused32.encode(x[:3], None), fused32.encode(x[3:], key_mask[3:])])
        got16 = torch.cat([fused16.encode(x[:3].bfloat16(), None), fused16.encode(x[3:].bfloat16(), key_mask[3:])])
    assert rel(got32, want) < 1e-5
    assert rel(got16, want) < 2e-2


def test_ocr_engine_tokens_with_fused_paths_equal_generate(tiny_model):
    """float32 on the GPU: the engine's static path with the compiled vision encoder and prefill gives
    generate's tokens (the model's own vision path: the pages are padded, so it is bidirectional too)."""
    from PIL import Image

    from actors.engine import Phi4MMEngine
    from pipeline.model.inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig

    builder = InputBuilder(tiny_model, dynamic_hd=4)
    rng = np.random.default_rng(5)
    pages = [Image.fromarray(rng.integers(0, 255, (1100 + 40 * k, 850, 3), dtype=np.uint8)) for k in range(4)]
    built = [builder.image(p, task_instruction("ocr")) for p in pages]
    assert not any(bool(b.inputs["image_attention_mask"].all()) for b in built)  # every page has padded crops
    cfg = ModelConfig(source=tiny_model, dtype="float32")
    reference = Phi4MMEngine(tiny_model, "vision", cfg, BatchingConfig(decoder="generate", vision_encoder="model"))
    want = [reference.generate_batch([b.inputs], 16)[0].token_ids for b in built]
    fast = Phi4MMEngine(tiny_model, "vision", cfg, BatchingConfig(decoder="static", decode_slots=4), model=reference.model)
    got = fast.generate([b.inputs for b in built], [b.batch_key for b in built], [16] * len(built))
    embed = fast.model.model.embed_tokens_extend.image_embed
    assert embed.__dict__.get("_fused_siglip") is not None  # the compiled encoder ran without falling back
    assert [g.token_ids for g in got] == want
