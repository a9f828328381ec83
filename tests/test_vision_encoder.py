"""The fused SigLIP encoder (actors/vision_encoder.py) gives the model's own image features.

Compared in float32 on the tiny checkpoint (its 2-layer tower runs 1 layer: feature_layer -2) and on one
SigLIP-so400m-shaped layer (1152 wide, 16 heads of 72, MLP 4304, 1024 patches) with random weights.
transformers 5.17's sdpa vision attention is causal when no crop of the batch is padded (see the module
docstring): there the model's eager attention is the reference; with a padded crop, its sdpa path is.
"""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from pipeline.model.prompts import task_instruction

COMPILE_OK = pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile needs a C compiler")


def load(tiny_model, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def models(tiny_model):
    """The same weights with sdpa and with eager attention."""
    return {"sdpa": load(tiny_model), "eager": load(tiny_model, "eager")}


def crops_and_masks(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 448, 448, generator=g)
    full = torch.ones(n, 32, 32, dtype=torch.bool)
    padded = full.clone()
    padded[1, :, -4:] = False  # the right edge of a page: 4 columns of padded patches
    padded[n - 1, -3:, :] = False  # the bottom edge
    return pixels, full, padded


def assert_close_rel(got, want, rel):
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=COMPILE_OK)])
def test_fused_features_equal_the_models(models, compiled):
    """get_img_features: padded crops in the batch -> the model's sdpa path; none -> its eager path."""
    from actors.vision_encoder import FusedSiglip

    pixels, full, padded = crops_and_masks()
    rel = 1e-5 if not compiled else 2e-5  # compiled: inductor's own reduction order in the layer norms
    with torch.inference_mode():
        for attn, mask in (("sdpa", padded), ("eager", full), ("eager", padded)):
            embed = models[attn].model.embed_tokens_extend.image_embed
            fused = FusedSiglip(embed, compile_layers=compiled)
            want = embed.get_img_features(pixels, mask)
            got = fused.features(pixels, mask)
            assert got.shape == want.shape == (4, 256, 32)
            assert_close_rel(got, want, rel)
            if compiled:  # other crop counts reuse the graphs
                from torch._dynamo.utils import counters

                graphs = counters["stats"]["unique_graphs"]
                assert_close_rel(fused.features(pixels[:3], mask[:3]), embed.get_img_features(pixels[:3], mask[:3]), rel)
                assert counters["stats"]["unique_graphs"] == graphs


def test_features_do_not_depend_on_the_batch(models):
    """An unpadded crop gets the same features alone and next to a padded one (the model's sdpa path
    encodes it causally alone and bidirectionally in that batch)."""
    from actors.vision_encoder import FusedSiglip

    pixels, full, padded = crops_and_masks()
    fused = FusedSiglip(models["sdpa"].model.embed_tokens_extend.image_embed)
    with torch.inference_mode():
        alone = fused.features(pixels[:1], full[:1])
        batched = fused.features(pixels, padded)[:1]
    assert_close_rel(batched, alone, 1e-5)


def test_only_the_layers_before_the_feature_layer_run(models):
    from actors.vision_encoder import FusedSiglip

    embed = models["sdpa"].model.embed_tokens_extend.image_embed
    layers = embed.img_processor.encoder.layers
    fused = FusedSiglip(embed)
    assert embed.layer_idx == -2 and fused.depth == len(layers) - 1 == len(fused.layers)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (embed.img_processor.post_layernorm,
                                                                        embed.img_processor.head, layers[-1])]
    try:
        pixels, _, padded = crops_and_masks(2)
        with torch.inference_mode():
            fused.features(pixels, padded[:2])
    finally:
        for h in hooks:
            h.remove()
    assert not calls  # the last layer, the post layernorm and the pooling head never run


def test_image_embed_and_prefill_equal_the_models(tiny_model):
    """Installed on a model: the image embedding (assembly, projection, merge) and the fused prefill's
    logits equal the model's own, for pages whose crops are padded (the sample pages' case)."""
    from PIL import Image

    from actors.collate import collate
    from actors.fast_prefill import FastPrefill
    from actors.vision_encoder import install_vision_encoder
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model, dynamic_hd=4)
    rng = np.random.default_rng(5)
    pages = [Image.fromarray(rng.integers(0, 255, (300 + 40 * k, 500, 3), dtype=np.uint8)) for k in range(3)]
    batch = collate([builder.image(p, task_instruction("ocr")).inputs for p in pages], 0)
    assert not bool(batch["image_attention_mask"].bool().all())  # padded crops: the model is bidirectional
    model = load(tiny_model)
    prefill = FastPrefill(model, compile_layers=False)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        want_embed = prefill.embeddings(batch)
        want_logits = model(**batch, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
        assert install_vision_encoder(model, "eager") == 1
        got_embed = prefill.embeddings(batch)
        got_logits = prefill(batch, pos)[0]
    assert_close_rel(got_embed, want_embed, 1e-5)
    assert_close_rel(got_logits, want_logits, 1e-5)


def test_install_modes_and_fallback(tiny_model, caplog):
    from actors.vision_encoder import install_vision_encoder

    model = load(tiny_model)
    embed = model.model.embed_tokens_extend.image_embed
    assert install_vision_encoder(model, "auto") == 0  # CPU: the model's own
    assert "get_img_features" not in embed.__dict__
    assert install_vision_encoder(model, "eager") == 1
    assert install_vision_encoder(model, "eager") == 1 and embed._fused_siglip is not None  # idempotent
    pixels, _, padded = crops_and_masks(2)
    with torch.inference_mode():
        want = type(embed).get_img_features(embed, pixels, padded[:2])

        def broken(*args):
            raise RuntimeError("no kernel")

        embed._fused_siglip.encode = broken
        with caplog.at_level(logging.WARNING):
            first = embed.get_img_features(pixels, padded[:2])
            second = embed.get_img_features(pixels, padded[:2])
    assert torch.equal(first, want) and torch.equal(second, want)
    assert sum("fused vision encoder" in r.message for r in caplog.records) == 1
    assert "get_img_features" not in embed.__dict__  # the model's own from now on
    assert install_vision_encoder(model, "model") == 0


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_real_width_layer_equals_the_models(dtype, rel):
    """SiglipLayers (what FusedSiglip runs) over one 1152-wide layer, two crops of 1024 patches (one with 4 padded columns): fused == the model's
    layer (its sdpa attention with the padded batch's mask); bf16 against the float32 model."""
    from actors.vision_encoder import SiglipLayers
    from bench.vision_prefill_proxies import so400m_layer

    cfg, layer = so400m_layer(torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1024, 1152, generator=g)
    key_mask = torch.ones(2, 1024, dtype=torch.bool)
    key_mask[1].view(32, 32)[:, -4:] = False
    with torch.inference_mode():
        want = layer(x, key_mask[:, None, None, :])
        if dtype != torch.float32:
            _, layer = so400m_layer(dtype)
        got = SiglipLayers([layer], 16, 72, cfg.layer_norm_eps).encode(x.to(dtype), key_mask).float()
    err = ((got - want).norm() / want.norm()).item()
    assert err <= rel, f"{dtype}: relative error {err:.2e}"
    if dtype == torch.float32:
        assert_close_rel(got, want, rel)
