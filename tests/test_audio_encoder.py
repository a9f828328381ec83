"""The packed speech encoder (actors/audio_encoder.py) computes the model's encoder, clip by clip.

On the tiny model in float32: equal batches give what the model's own forward gives; clips of mixed
lengths (one feature frame, lengths off the 8-frame grid, 30 s, past the 40 s window) packed together,
in several orders, each give what the clip gives alone; the streaming-chunk and clipped-distance parts
of the model's bias too (a small standalone encoder that uses them). One block at the real width
(1024 dims, 16 heads, T = 375) in float32 and bfloat16. Through the engine, tokens are unchanged. The
planner batches clips of every length by prompt tokens, with little padding once packed.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from actors.audio_encoder import (PackedAudioEncoder, SegmentAttention, block_config, block_weights,
                                  conformer_block, device_layout, install_audio_encoder, plan_layout,
                                  warm_up_audio_encoder)

# one frame, lengths off the 8-frame grid, ~3 s, 30 s (3,000 frames), past 40 s (4,100 and 6,007 frames:
# 513 and 751 subsampled frames, cut in 500-frame windows), and exactly two windows (8,000)
LENGTHS = [1, 7, 13, 57, 300, 801, 3000, 4100, 6007, 8000]
TOL = 1e-5


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model.model.embed_tokens_extend.audio_embed.encoder


def features(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 15.0 + 4.0 * torch.randn(1, n, 80, generator=g)  # log-mel-like: the tiny model's norm expects ~15


def padded(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's ragged batch: zero-padded features and the frame mask."""
    longest = max(c.shape[1] for c in clips)
    batch = torch.zeros(len(clips), longest, 80)
    mask = torch.zeros(len(clips), longest, dtype=torch.bool)
    for i, c in enumerate(clips):
        batch[i, :c.shape[1]] = c[0]
        mask[i, :c.shape[1]] = True
    return batch, mask


def model_forward(enc, x, mask=None):
    with torch.inference_mode():
        return type(enc).forward(enc, x, mask)


@pytest.fixture(scope="module")
def alone(encoder):
    """Each clip of LENGTHS through the model's own forward, alone."""
    clips = [features(n, seed=n) for n in LENGTHS]
    return clips, [model_forward(encoder, c)[0] for c in clips]


def test_equal_batches_equal_the_model_forward(encoder):
    packed = PackedAudioEncoder(encoder, compile=False)
    # past 40 s only one clip: upstream's batched forward fails on a view in its window unfold for two
    for n, b in ((3000, 2), (13, 3), (801, 2), (4100, 1), (1, 2)):
        x = torch.cat([features(n, seed=100 + k) for k in range(b)])
        want = model_forward(encoder, x)
        got = packed(x)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < TOL, n
        # the processor's mask of equal lengths means the same
        assert float((packed(x, torch.ones(b, n, dtype=torch.bool)) - want).abs().max()) < TOL


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled", "long-first-pairs"])
def test_mixed_lengths_packed_equal_each_clip_alone(encoder, alone, order):
    clips, outs = alone
    n = len(clips)
    orders = {"ascending": [list(range(n))], "descending": [list(range(n))[::-1]],
              "shuffled": [list(np.random.default_rng(3).permutation(n))],
              "long-first-pairs": [[9, 0], [7, 2], [6, 5, 1], [8, 3, 4]]}[order]
    packed = PackedAudioEncoder(encoder, compile=False)
    for idx in orders:
        x, mask = padded([clips[i] for i in idx])
        got = packed(x, mask)
        assert got.shape[:2] == (len(idx), -(-x.shape[1] // 8))  # the model's output shape
        for row, i in zip(got, idx):
            frames = outs[i].shape[0]
            assert frames == -(-LENGTHS[i] // 8)  # the clip's own placeholder count
            assert float((row[:frames] - outs[i]).abs().max()) < TOL, (order, LENGTHS[i])
            assert not row[frames:].any()  # nothing past the clip's own frames


def test_upstream_ragged_batch_differs_so_the_comparison_can_fail(encoder, alone):
    clips, outs = alone
    x, mask = padded([clips[i] for i in (3, 4, 5)])  # under 40 s: upstream's ragged path runs
    upstream = model_forward(encoder, x, mask)
    worst = max(float((upstream[k, :outs[i].shape[0]] - outs[i]).abs().max()) for k, i in enumerate((3, 4, 5)))
    assert worst > 1e-2


def test_layout_packs_clips_without_padding():
    layout = plan_layout([3000] * 64)
    assert layout.tokens == 64 * 375 + 128 - (64 * 375) % 128 and layout.padding_fraction < 0.01
    assert layout.front_padding_fraction < 0.003  # 8 zero frames after each 30 s clip
    layout = plan_layout([301, 7, 4100])
    assert list(layout.front_starts % 8) == [0, 0, 0]
    # a 41 s clip is computed as two 500-frame windows, the second one mostly the model's zeros
    assert list(layout.seg_lens) == [38, 1, 500, 500] and layout.clip_block_starts.tolist() == [0, 38, 39]
    for k, m in enumerate(layout.stage_masks):  # a zero frame after each clip at every stride-2 conv
        starts, lens = layout.front_starts >> k, -(-layout.lengths // (1 << k))
        assert all(m[s + n] == 0 for s, n in zip(starts, lens) if s + n < len(m))
        assert int(m.sum()) == int(lens.sum())


def small_encoder(**overrides):
    """A standalone encoder whose config uses the parts the released model leaves off: streaming chunks
    (chunk_size > 0: keys outside the chunk window get the bias + 0, inside + 1) and a bias table short
    enough that distances are clipped."""
    from transformers import Phi4MultimodalAudioConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel

    torch.manual_seed(5)
    config = Phi4MultimodalAudioConfig(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=4,
                                       ext_pw_out_channel=32, depthwise_separable_out_channel=32,
                                       nemo_conv_channels=8, **overrides)
    enc = Phi4MultimodalAudioModel(config).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith((".b1", ".b2")):
                p.normal_(0, 0.5)  # initialised to zero: make them count
        enc.encoder_embedding.global_mean.fill_(15.0)
        enc.encoder_embedding.global_invstd.fill_(0.25)
    return enc


@pytest.mark.parametrize("overrides", [dict(chunk_size=4, left_chunk=1, bias_max_distance=20),
                                       # symmetric: upstream indexes past its table once a distance
                                       # reaches bias_max_distance, so only unclipped distances here
                                       dict(bias_symmetric=True)])
def test_streaming_chunks_and_clipped_distances_equal_each_clip_alone(overrides):
    """In float64: with distances clipped, the last window of a 41 s clip (13 frames, then 487 equal zero
    frames) is ill-conditioned enough that float32 rounding alone reaches ~1e-5 in either implementation;
    in float64 they agree to ~1e-15, so any real difference in the arithmetic would show."""
    enc = small_encoder(**overrides).double()
    lengths = [5, 250, 4100, 999]
    clips = [features(n, seed=7 + n).double() for n in lengths]
    outs = [model_forward(enc, c)[0] for c in clips]
    x, mask = padded(clips)
    got = PackedAudioEncoder(enc, compile=False)(x.double(), mask)
    for row, out in zip(got, outs):
        assert float((row[:out.shape[0]] - out).abs().max()) < 1e-10
    enc.config.left_chunk += 1  # the comparison can fail: a chunk window one chunk wider differs
    if overrides.get("chunk_size", -1) > 0:
        wider = PackedAudioEncoder(enc, compile=False)(x.double(), mask)
        assert float((wider[1, :outs[1].shape[0]] - outs[1]).abs().max()) > 1e-3


def real_width_layer(dtype):
    from transformers import Phi4MultimodalAudioConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (
        Phi4MultimodalAudioConformerEncoderLayer, Phi4MultimodalAudioRelativeAttentionBias)

    torch.manual_seed(0)
    config = Phi4MultimodalAudioConfig()  # the released sizes: 1024 dims, 16 heads, 1536 MLP, kernel 3
    config._attn_implementation = "sdpa"
    layer = Phi4MultimodalAudioConformerEncoderLayer(config).eval()
    bias = Phi4MultimodalAudioRelativeAttentionBias(config).eval()
    with torch.no_grad():
        layer.conv.glu.b1.normal_(0, 0.5)
        layer.conv.glu.b2.normal_(0, 0.5)
    return config, layer.to(dtype), bias.to(dtype)


def model_layer(layer, bias, x):
    """The model's block on one clip: its attention mask is the all-True streaming mask plus the bias."""
    t = x.shape[1]
    mask = torch.ones(1, t, t, dtype=torch.bool).unsqueeze(1) + bias(x)
    with torch.inference_mode():
        return layer(x, mask)


def packed_block(config, layer, bias_layer, clips):
    """conformer_block over `clips` ([1, t, d] each) packed as segments; -> each clip's output."""
    lengths = [c.shape[1] * 8 for c in clips]
    layout = plan_layout(lengths)
    dl = device_layout(layout, max(lengths), max(lengths) // 8, "cpu", clips[0].dtype)
    block_mask, score_mod = SegmentAttention(bias_layer, config, "cpu", False).prepare(dl, layout.tokens)
    x = torch.zeros(layout.tokens, config.hidden_size, dtype=clips[0].dtype)
    for c, s in zip(clips, layout.clip_block_starts):
        x[s:s + c.shape[1]] = c[0]
    with torch.inference_mode():
        y = conformer_block(x, dl.positions, block_mask, score_mod, block_weights(layer), block_config(config, layer))
    return [y[s:s + c.shape[1]] for c, s in zip(clips, layout.clip_block_starts)]


def test_real_width_block_float32_and_bfloat16():
    config, layer, bias = real_width_layer(torch.float32)
    g = torch.Generator().manual_seed(1)
    clips = [torch.randn(1, t, 1024, generator=g) for t in (375, 121)]
    want = [model_layer(layer, bias, c)[0] for c in clips]
    got = packed_block(config, layer, bias, clips)
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) < TOL * float(b.abs().max())
    config, layer, bias = real_width_layer(torch.bfloat16)
    clips16 = [c.to(torch.bfloat16) for c in clips]
    want16 = [model_layer(layer, bias, c)[0].float() for c in clips16]
    got16 = packed_block(config, layer, bias, clips16)
    for a, b in zip(got16, want16):
        assert float((a.float() - b).norm() / b.norm()) < 2e-2


def test_install_runs_packed_and_falls_back_once(tiny_model, alone, caplog):
    from transformers import AutoModelForCausalLM

    def load():
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        return model, model.model.embed_tokens_extend.audio_embed.encoder

    model, enc = load()
    assert install_audio_encoder(model, "model") == 1 and getattr(enc, "_packed", None) is None
    assert install_audio_encoder(model, "packed", verify_first=True) == 1  # CUDA's first-batch check
    guard = enc._packed
    assert warm_up_audio_encoder(model) == 1 and guard.calls == 0 and not guard.verify  # checked on a dummy
    guard.verify = True
    clips, outs = alone
    x, mask = padded([clips[i] for i in (4, 1, 7)])
    with torch.inference_mode():
        got = enc(x, mask)
    assert guard.calls == 1 and not guard.verify and not guard.failed
    assert float((got[2, :outs[7].shape[0]] - outs[7]).abs().max()) < TOL

    def broken(*a, **k):
        raise RuntimeError("no kernel")
    guard.packed = broken
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        first, second = enc(x, mask), enc(x, mask)
    assert sum("packed audio encoder failed" in r.getMessage() for r in caplog.records) == 1  # one warning
    assert guard.failed and torch.equal(first, second)
    assert float((first[2, :outs[7].shape[0]] - outs[7]).abs().max()) < TOL  # the masked model path

    # wrong numbers (not an exception) on the first batch: caught by the check, the reference returned
    model, enc = load()
    install_audio_encoder(model, "packed", verify_first=True)
    guard, right = enc._packed, enc._packed.packed
    guard.packed = lambda *a: 1.5 * right(*a)
    with torch.inference_mode():
        got = enc(x, mask)
    assert guard.failed and float((got[2, :outs[7].shape[0]] - outs[7]).abs().max()) < TOL


@pytest.mark.realsize
def test_compiled_encoder_equals_each_clip_alone_without_recompiling(encoder, alone):
    """torch.compile (Inductor, CPU) of the same functions the GPU compiles: three batches of different
    packed lengths, one compile of each function (the frame counts are dynamic)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    clips, outs = alone
    packed = PackedAudioEncoder(encoder, compile=True)
    for idx in ([4, 1, 7], [9, 0, 5, 3], [2, 6]):
        x, mask = padded([clips[i] for i in idx])
        got = packed(x, mask)
        for row, i in zip(got, idx):
            assert float((row[:outs[i].shape[0]] - outs[i]).abs().max()) < TOL
    assert counters["stats"]["unique_graphs"] == 4  # front end, pre-attention, flex attention, post-attention


# -- through the engine ----------------------------------------------------------------------------------

MAX = 12


def speech_engine(tiny_model, **batching):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    return Phi4MMEngine(tiny_model, "speech", ModelConfig(source=tiny_model), BatchingConfig(**batching))


def test_engine_tokens_unchanged_with_the_packed_encoder(tiny_model):
    """Clips of 1 frame (400 samples) to 45 s, batched across lengths by the planner and encoded packed
    (the static decoder, as on the GPU), give each clip's tokens alone through the model's encoder."""
    from pipeline.model.inputs import InputBuilder
    from pipeline.model.prompts import task_instruction

    builder = InputBuilder(tiny_model)
    rng = np.random.default_rng(4)
    samples = [400, 16000 * 3 + 77, int(16000 * 7.77), int(16000 * 29.9), 16000 * 45]
    built = [builder.audio((0.1 * rng.standard_normal(n)).astype(np.float32), task_instruction("asr"))
             for n in samples]
    assert built[0].inputs["audio_input_features"].shape[0] == 1
    reference = speech_engine(tiny_model, audio_encoder="model")
    alone = [reference.generate_batch([b.inputs], MAX)[0].token_ids for b in built]
    assert len({tuple(t) for t in alone}) > 2  # the audio matters
    packed = speech_engine(tiny_model, audio_encoder="packed", decoder="static", decode_slots=8)
    encoder = packed.model.model.embed_tokens_extend.audio_embed.encoder
    keys, tokens = [b.batch_key for b in built], [b.input_tokens for b in built]
    order = [3, 0, 4, 1, 2]
    plan = packed.plan_batches([keys[i] for i in order], [tokens[i] for i in order], [MAX] * 5)
    assert len(plan) == 1  # five lengths, one batch (2 s buckets made five)
    got = packed.generate([built[i].inputs for i in order], [keys[i] for i in order], [MAX] * 5)
    assert [g.token_ids for g in got] == [alone[i] for i in order]
    assert encoder._packed.calls >= 1 and not encoder._packed.failed


def chunk_seconds(n_calls: int, seed: int = 10) -> list[float]:
    """Chunk lengths like the asr_calls benchmark's: its call lengths (log-uniform 3 s - 10 min), a call
    over 30 s cut into chunks of 20-30 s on a 0.5 s grid (where silences fall, roughly) and the rest."""
    from bench.asr_calls import call_lengths

    rng = np.random.default_rng(seed)
    out = []
    for s in call_lengths(n_calls, seed):
        while s > 30.0:
            cut = float(np.round(rng.uniform(20.0, 30.0) * 2) / 2)
            out.append(cut)
            s -= cut
        out.append(float(s))
    return out


def planner_proxies(engine, seconds, text_tokens: int = 12, per_30s: int = 100) -> dict:
    """The planner on chunks of `seconds`: batches per 1,000 chunks, and the padding the encoder computes
    packed (block frames and front-end frames) and padded (every clip to its batch's longest)."""
    from pipeline.model.inputs import audio_bucket
    from schemas.work_rows import BatchKey

    frames = [(int(s * 16000) - 400) // 160 + 1 for s in seconds]
    keys = [BatchKey("audio", audio_bucket(f, 200)) for f in frames]
    tokens = [-(-f // 8) + text_tokens for f in frames]
    max_new = [max(1, -(-per_30s * k.size // 3000)) for k in keys]  # as the benchmark sets them
    plan = engine.plan_batches(keys, tokens, max_new)
    assert sorted(i for b in plan for i in b) == list(range(len(seconds)))
    layouts = [plan_layout([frames[i] for i in b]) for b in plan]
    real = sum(lay.real_frames for lay in layouts)
    return {
        "batches_per_1000": 1000 * len(plan) / len(seconds),
        "mean_items": len(seconds) / len(plan),
        "packed_padding": 1 - real / sum(lay.tokens for lay in layouts),
        "front_padding": 1 - sum(frames) / sum(lay.front_len for lay in layouts),
        "padded_padding": 1 - real / sum(len(b) * max(-(-frames[i] // 8) for i in b) for b in plan),
        "max_tokens": max(sum(tokens[i] for i in b) for b in plan),
        "plan": plan,
    }


def test_planner_fills_batches_across_lengths_with_little_padding(tiny_model):
    seconds = chunk_seconds(400)
    assert 18 < np.mean(seconds) < 26  # like the benchmark's (22.7 s mean chunk)
    static = speech_engine(tiny_model, decoder="static")
    new = planner_proxies(static, seconds)
    # the planner before: 2 s length buckets of at most 32 items
    old = planner_proxies(speech_engine(tiny_model, decoder="static", audio_batch_tokens=None, max_batch_size=32),
                          seconds)
    print({k: round(v, 4) for k, v in new.items() if k != "plan"}, {k: round(v, 4) for k, v in old.items() if k != "plan"})
    assert new["max_tokens"] <= static.batching.audio_batch_tokens
    assert new["packed_padding"] <= 0.03 and new["front_padding"] <= 0.03
    assert new["batches_per_1000"] < old["batches_per_1000"] / 2.5
    assert new["mean_items"] > 60  # ~25,000 tokens of ~23 s chunks
    # the generate decoder keeps one max_new per batch and at most max_batch_size items
    cpu = speech_engine(tiny_model)
    plan = planner_proxies(cpu, seconds)["plan"]
    assert max(map(len, plan)) <= cpu.batching.max_batch_size
    frames = [(int(s * 16000) - 400) // 160 + 1 for s in seconds]
    assert all(len({-(-100 * -(-frames[i] // 200) * 200 // 3000) for i in b}) == 1 for b in plan)
