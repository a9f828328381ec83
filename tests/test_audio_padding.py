"""Calls of every length batch together and stay exact (issue 10).

The model's audio encoder does not mask padding upstream (shared/design/NOTES-phi4mm.md): a clip batched
with longer clips came out different. actors/audio_padding.py masks it; here, on the tiny model in
float32, each clip of a mixed-length batch gives its unbatched encoder output and its unbatched tokens,
and clips of 200 distinct lengths batch together across their length buckets.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.prompts import task_instruction
from tests.conftest import MAX_NEW

MAX = int(MAX_NEW)
# short calls, chunk-sized clips, and one past the encoder's 500-frame (40 s) window (summaries from audio)
SECONDS = [3.1, 3.9, 7.77, 12.3, 13.5, 29.9, 45.0]  # pairs share a 2 s bucket


@pytest.fixture(scope="module")
def builder(tiny_model):
    from pipeline.model.inputs import InputBuilder

    return InputBuilder(tiny_model)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(11)
    return [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in SECONDS]


def speech_engine(tiny_model, decoder="generate", model=None):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    return Phi4MMEngine(tiny_model, "speech", ModelConfig(source=tiny_model),
                        BatchingConfig(decoder=decoder, max_batch_size=32), model=model)


def encoder_outputs(model, items, pad_token_id):
    from actors.collate import collate

    batch = collate(items, pad_token_id)
    encoder = model.model.embed_tokens_extend.audio_embed.encoder
    with torch.inference_mode():
        return encoder(batch["audio_input_features"], batch.get("audio_attention_mask"))


def test_mixed_length_encoder_outputs_equal_each_clip_alone(tiny_model, builder, clips):
    from transformers import AutoModelForCausalLM

    from actors.audio_padding import mask_audio_padding

    items = [builder.audio(c, task_instruction("asr")).inputs for c in clips]
    sizes = [int(it["audio_embed_sizes"]) for it in items]
    assert sizes == [int(np.ceil(((len(c) - 400) // 160 + 1) / 8)) for c in clips]  # the clip's own count
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pad = 0
    alone = [encoder_outputs(model, [it], pad)[0] for it in items]
    assert [a.shape[0] for a in alone] == sizes
    short = items[:6]  # upstream's ragged path fails outright past 40 s (a view error in its unfold)
    upstream = encoder_outputs(model, short, pad)
    worst_upstream = max(float((row[:a.shape[0]] - a).abs().max()) for row, a in zip(upstream, alone))
    assert worst_upstream > 1e-2  # without the fix, padding changes the short clips: the test can fail

    assert mask_audio_padding(model) == 1
    n = len(items)
    for order in (list(range(n)), list(range(6)), list(range(n))[::-1], [0, 6]):
        out = encoder_outputs(model, [items[i] for i in order], pad)
        for row, i in zip(out, order):
            assert float((row[:sizes[i]] - alone[i]).abs().max()) < 1e-5, (order, SECONDS[i])
    # single clips still run the model's own forward: bit for bit what they gave before
    assert torch.equal(encoder_outputs(model, [items[2]], pad)[0], alone[2])


@pytest.mark.parametrize("decoder", ["generate", "static"])
def test_mixed_length_transcripts_equal_each_clip_alone(tiny_model, builder, clips, decoder):
    """Clips of seven lengths (3 s to 45 s), in the batches the scheduler forms on the length grid,
    give each clip's tokens when it runs alone, token for token; the static decoder (the GPU path) too."""
    tasks = [("asr", None), ("translate", "fr"), ("asr", None), ("translate", "de")]
    built = [builder.audio(c, task_instruction(*tasks[k % 4])) for k, c in enumerate(clips)]
    single = speech_engine(tiny_model)
    alone = [single.generate_batch([b.inputs], MAX)[0].token_ids for b in built]
    assert len({tuple(t) for t in alone}) > 3  # the audio matters: not a constant output
    engine = speech_engine(tiny_model, decoder, model=single.model)
    keys = [b.batch_key for b in built]
    plan = engine.plan_batches(keys, [b.input_tokens for b in built], [MAX] * len(built))
    assert any(len({built[i].inputs["audio_input_features"].shape[0] for i in g}) > 1 for g in plan)
    got = engine.generate([b.inputs for b in built], keys, [MAX] * len(built))
    assert [g.token_ids for g in got] == alone
    # and all seven in one ragged batch, whatever the keys say
    together = engine.generate([b.inputs for b in built], [keys[0]] * len(built), [MAX] * len(built))
    assert [g.token_ids for g in together] == alone


def test_clips_of_200_distinct_lengths_batch_across_lengths(tiny_model, builder):
    """Keys still bucket lengths on the 2 s grid, but the planner batches audio clips of any lengths
    together: in length order, up to max_batch_size for the `generate` decoder (one max_new per batch),
    by prompt tokens (`audio_batch_tokens`) for the static one."""
    seconds = 3.0 + 0.135 * np.arange(200)  # 3 s to 29.9 s, every one a different frame count
    built = [builder.audio(np.zeros(int(16000 * s), np.float32) + 0.01, task_instruction("asr")) for s in seconds]
    frames = [b.inputs["audio_input_features"].shape[0] for b in built]
    assert len(set(frames)) == 200  # the old key (the exact length) made 200 groups
    keys = {b.batch_key for b in built}
    assert len(keys) <= 14, sorted(keys)  # 27 s of lengths on the 2 s grid
    for b, n in zip(built, frames):
        assert b.batch_key.kind == "audio" and 0 <= b.batch_key.size - n < 200  # a bucket ends within 2 s
    tokens = [b.input_tokens for b in built]
    engine = speech_engine(tiny_model)
    plan = engine.plan_batches([b.batch_key for b in built], tokens, [MAX] * 200)
    assert sorted(i for g in plan for i in g) == list(range(200))
    assert len(plan) == 7 and all(len(g) == 32 for g in plan[:-1])  # full batches across buckets
    assert [i for g in plan for i in g] == sorted(range(200), key=lambda i: tokens[i])  # in length order
    static = speech_engine(tiny_model, "static", model=engine.model)
    plan = static.plan_batches([b.batch_key for b in built], tokens, [MAX] * 200)
    budget = static.batching.audio_batch_tokens
    assert all(sum(tokens[i] for i in g) <= budget for g in plan)
    assert len(plan) <= -(-sum(tokens) // (budget - max(tokens)))  # each but the last within one clip of it
