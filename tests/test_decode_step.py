"""The decode step that reads only the slots and cache columns in use, eager and compiled, against the
step it replaced (every slot over the whole cache, the model's modules op by op); the engine's
bookkeeping around it: stats, warm-up, cache reuse, steps between looks, prefill retries and syncs.

CPU, tiny model, float32. The compiled variant runs Inductor's CPU backend (the GPU runs the same
functions through its CUDA backend, inside CUDA graphs).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipeline.model.prompts import task_instruction

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile needs a C compiler")


@pytest.fixture(scope="module")
def builder(tiny_model):
    from pipeline.model.inputs import InputBuilder

    return InputBuilder(tiny_model, dynamic_hd=2)


def engine(tiny_model, slots=4, model=None, decoder="static", **batching):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    cfg = dict(decoder=decoder, decode_slots=slots, max_batch_size=3, check_every=3, prefill="model")
    cfg.update(batching)
    return Phi4MMEngine(tiny_model, "text", ModelConfig(source=tiny_model), BatchingConfig(**cfg), model=model)


def texts(builder, n, seed=0):
    """Text prompts of mixed lengths (~20-230 tokens)."""
    rng = np.random.default_rng(seed)
    return [builder.text("Summarize: " + "word " * int(rng.integers(2, 60))) for _ in range(n)]


@torch.inference_mode()
def reference_logits(d, rows=None, columns=None) -> torch.Tensor:
    """The step this module replaced, verbatim in its arithmetic: every slot, every cache column, the
    model's modules, index_put cache writes, an additive -inf bias."""
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import apply_rotary_pos_emb

    m = d.model.model
    B = d.slots
    pos = d.pos
    tok = d.tokens[d.rows, pos]
    x = m.embed_tokens(tok)[:, None, :]
    cos = d.cos[pos][:, None, :]
    sin = d.sin[pos][:, None, :]
    valid = d.columns[None, :] <= pos[:, None]
    bias = torch.zeros(B, 1, 1, d.max_len, dtype=torch.float32).masked_fill(~valid[:, None, None, :], float("-inf"))
    q_size, kv_size = d.n_heads * d.head_dim, d.n_kv * d.head_dim
    for i, layer in enumerate(m.layers):
        attn = layer.self_attn
        qkv = attn.qkv_proj(layer.input_layernorm(x))
        q = qkv[..., :q_size].view(B, 1, d.n_heads, d.head_dim).transpose(1, 2)
        k = qkv[..., q_size:q_size + kv_size].view(B, 1, d.n_kv, d.head_dim).transpose(1, 2)
        v = qkv[..., q_size + kv_size:].view(B, 1, d.n_kv, d.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        d.k_cache[i][d.rows, :, pos] = k[:, :, 0]
        d.v_cache[i][d.rows, :, pos] = v[:, :, 0]
        qg = q.reshape(B, d.n_kv, d.groups, d.head_dim)
        scores = torch.matmul(qg, d.k_cache[i].transpose(-1, -2)).float() * d.scaling + bias
        probs = torch.softmax(scores, dim=-1).to(d.dtype)
        out = torch.matmul(probs, d.v_cache[i]).reshape(B, 1, q_size)
        x = x + attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return d.model.lm_head(m.norm(x)[:, 0]).float()


def prefill(eng, decoder, built, slots, max_new):
    from actors.slot_decoder import SlotRequest

    batch = eng._to_device(eng._collate([b.inputs for b in built]))
    requests = [SlotRequest(j, b.input_tokens, max_new) for j, b in enumerate(built)]
    return decoder.prefill(batch, requests, slots)


STEPS = ["eager", pytest.param("compiled", marks=needs_cc), pytest.param("flex", marks=needs_cc)]


@pytest.mark.parametrize("step", STEPS)
def test_step_logits_equal_the_whole_cache_step(tiny_model, builder, step):
    """Slots 1, 6, 9 of 16 occupied, refilled at mixed prompt lengths: the step over 16 -> 8 or 16 rows
    and 16-column buckets (or FlexAttention's per-slot blocks) gives the occupied slots the old step's
    logits (1e-5) at every step."""
    from actors.slot_decoder import SlotDecoder

    eng = engine(tiny_model)
    compiled = step != "eager"
    d = SlotDecoder(eng.model, 16, 512, eng.eos_ids, eng.banned_ids, compiled=compiled, length_bucket=16,
                    attention="flex" if step == "flex" else "matmul")
    assert d.fns.compiled == compiled and (d.flex is not None) == (step == "flex")
    built = texts(builder, 6, seed=1)
    prefill(eng, d, built[:3], [1, 6, 9], 60)
    shapes = set()
    for n in range(50):
        if n == 20:  # refill slot 6 (and a slot past 8 rows) with other prompts
            d.collect()
            d.occupant[6] = d.occupant[12] = None
            d.host_busy[[6, 12]] = False
            prefill(eng, d, built[3:5], [6, 12], 60)
        rows, columns = d.step_shape()
        shapes.add((rows, columns))
        busy = np.flatnonzero(d.host_busy)
        assert columns > int(d.pos[busy].max())  # the bucket covers every occupied slot's position
        new = d._logits(rows, columns)[busy]
        old = reference_logits(d)[busy]
        if compiled:  # fused float32 arithmetic (another summation order): relative error per row
            assert float(((new - old).norm(dim=-1) / old.norm(dim=-1)).max()) <= 1e-5
        else:
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
        d.step()
    assert {r for r, _ in shapes} == {16}
    columns = {c for _, c in shapes}
    if step == "flex":  # the graphs read each slot's own blocks: one shape
        assert columns == {512}
    else:
        assert len(columns) >= 3
    # before the refill into slot 12 the step computed 8 rows
    d2 = SlotDecoder(eng.model, 16, 512, eng.eos_ids, eng.banned_ids, length_bucket=16)
    prefill(eng, d2, built[:2], [0, 5], 8)
    assert d2.step_shape() == (8, 16 * -(-(max(b.input_tokens for b in built[:2]) + 1) // 16))


class OldStepDecoder:
    """Makes an engine's decoder step the old way: every slot, the whole cache, the model's modules."""

    @staticmethod
    def install(eng, max_len, slots):
        d = eng.decoder_for(max_len, slots)
        d._logits = lambda rows=None, columns=None: reference_logits(d)
        return d


@pytest.mark.parametrize("step", STEPS)
def test_tokens_equal_the_old_step_over_50_steps_with_refills(tiny_model, builder, step):
    built = texts(builder, 9, seed=2)
    items = [b.inputs for b in built]
    keys = [b.batch_key for b in built]
    max_new = [50, 20, 50, 7, 50, 33, 1, 50, 12]
    old = engine(tiny_model, slots=3)
    OldStepDecoder.install(old, 512, 3)
    want = old.generate(items, keys, max_new, min_new=5)
    new = engine(tiny_model, slots=3, model=old.model, decode_step="eager" if step == "eager" else "compiled",
                 decode_attention="flex" if step == "flex" else "matmul", decode_length_bucket=32)
    got = new.generate(items, keys, max_new, min_new=5)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert max(len(w.token_ids) for w in want) >= 45 and len({tuple(w.token_ids) for w in want}) > 5
    assert new._decoder.fns.compiled == (step != "eager") and (new._decoder.flex is not None) == (step == "flex")
    if step != "flex":  # fewer columns read (flex reads each slot's blocks; its graphs attend all columns)
        assert new.stats["attended_columns"] < old.stats["steps"] * new._decoder.max_len


@needs_cc
def test_compiled_step_kernel_count(tiny_model):
    """CPU proxy for the launches per step: the kernels Inductor generates for one step's compiled
    functions (the matmuls stay library calls; the GPU's graphs hold the same split)."""
    import re

    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    from actors.slot_decoder import SlotDecoder

    torch._dynamo.reset()
    eng = engine(tiny_model)
    d = SlotDecoder(eng.model, 8, 128, eng.eos_ids, eng.banned_ids, compiled=True)
    d.active.fill_(True)
    d.pos.fill_(20)
    d.limit.fill_(100)
    with config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(lambda: d._step(8, 128))
    kernels = [len(re.findall(r"^\s+cpp_fused_\w+\(", code, re.M)) for code in codes]
    library = [len(re.findall(r"extern_kernels\.\w+\(", code)) for code in codes]
    # pre-attention (layer 0, and with the previous residual), softmax, post-attention, final norm
    assert len(codes) == 5, kernels
    assert max(kernels) <= 2 and sum(kernels) <= 8, kernels  # 2 layers: ~5 fused kernels per layer + 1
    assert sum(library) == 1 + 3 + 1, library  # QKV (x2 graphs), O (+ residual), gate/up, down projections
    # the compiled step equals the eager one on the same state
    e = SlotDecoder(eng.model, 8, 128, eng.eos_ids, eng.banned_ids, compiled=False)
    for t in ("pos", "active", "limit", "tokens", "k_cache", "v_cache"):
        getattr(e, t).copy_(getattr(d, t))
    torch.testing.assert_close(d._logits(8, 64), e._logits(8, 64), rtol=1e-4, atol=1e-4)


def test_engine_stats_keys_and_steps_between_looks(tiny_model, builder):
    """Fixed outputs (min_new = max_new = 12): 11 steps per wave, not check_every's multiple."""
    built = texts(builder, 4, seed=3)
    items, keys = [b.inputs for b in built], [b.batch_key for b in built]
    eng = engine(tiny_model, slots=4, max_batch_size=4, check_every=5)
    out = eng.generate(items, keys, [12] * 4, min_new=12)
    assert all(len(g.token_ids) == 12 for g in out)
    assert eng.stats["steps"] == 11  # one wave: the first token comes from the prefill
    two = engine(tiny_model, slots=2, model=eng.model, max_batch_size=2, check_every=5)
    assert [g.token_ids for g in two.generate(items, keys, [12] * 4, min_new=12)] == [g.token_ids for g in out]
    assert two.stats["steps"] == 22
    for key in ("prefill_s", "decode_s", "steps", "warmup_s", "compile_s", "capture_s", "prefill_calls",
                "prefill_items", "prefill_retries", "collate_s", "h2d_s", "attended_columns", "caches_built"):
        assert key in eng.stats
    assert eng.stats["prefill_calls"] == 1 and eng.stats["prefill_items"] == 4 and two.stats["prefill_calls"] == 2
    assert eng.stats["prefill_s"] > 0 and eng.stats["decode_s"] > 0 and eng.stats["prefill_retries"] == 0


def test_a_cache_that_fits_is_reused_across_calls_of_other_sizes(tiny_model, builder):
    built = sorted(texts(builder, 6, seed=4), key=lambda b: -b.input_tokens)
    items, keys = [b.inputs for b in built], [b.batch_key for b in built]
    eng = engine(tiny_model, slots=4)
    reference = engine(tiny_model, model=eng.model, decoder="generate")
    first = eng.generate(items[:4], keys[:4], [30] * 4)  # a cache for 4 slots
    again = eng.generate(items[4:], keys[4:], [6, 6])  # 2 items, shorter: fits, kept
    assert eng.stats["caches_built"] == 1
    want = reference.generate(items[:4], keys[:4], [30] * 4) + reference.generate(items[4:], keys[4:], [6, 6])
    assert [g.token_ids for g in first + again] == [w.token_ids for w in want]
    longer = dict(items[0], input_ids=np.concatenate([items[0]["input_ids"]] * 4))
    eng.generate([longer], [keys[0]], [200])  # longer than the cache: a new one, as wide as the old one
    assert eng.stats["caches_built"] == 2 and eng._decoder.slots == 4
    assert [g.token_ids for g in eng.generate(items[:4], keys[:4], [30] * 4)] == [w.token_ids for w in want[:4]]
    assert eng.stats["caches_built"] == 2  # the short call fits the grown cache


def test_a_failed_prefill_batch_is_retried_and_counted(tiny_model, builder, monkeypatch, caplog):
    from actors.slot_decoder import SlotDecoder

    built = texts(builder, 3, seed=5)
    items, keys = [b.inputs for b in built], [b.batch_key for b in built]
    want = engine(tiny_model).generate(items, keys, [8] * 3)
    real = SlotDecoder.prefill

    def flaky(self, batch, requests, slots):
        if len(requests) > 1:
            raise RuntimeError("forced failure of a batch")
        return real(self, batch, requests, slots)

    monkeypatch.setattr(SlotDecoder, "prefill", flaky)
    eng = engine(tiny_model)
    with caplog.at_level("WARNING"):
        got = eng.generate(items, keys, [8] * 3)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert eng.stats["prefill_retries"] == 1 and eng.stats["prefill_calls"] == 4
    assert sum("retrying it item by item" in r.message for r in caplog.records) == 1


def test_warm_up_builds_the_cache_and_leaves_outputs_unchanged(tiny_model, builder):
    built = texts(builder, 5, seed=6)
    items, keys = [b.inputs for b in built], [b.batch_key for b in built]
    cold = engine(tiny_model, slots=4)
    want = cold.generate(items, keys, [10] * 5)
    warm = engine(tiny_model, slots=4, model=cold.model)
    longest = max(built, key=lambda b: b.input_tokens)
    spent = warm.warm_up([longest.inputs], 10)
    assert spent > 0 and warm.stats["warmup_s"] == pytest.approx(spent)
    assert warm.stats["caches_built"] == 1 and warm._decoder.slots == 4
    assert warm.stats["prefill_s"] == 0 and warm.stats["decode_s"] == 0 and warm.stats["steps"] == 0
    assert warm.stats["prefill_calls"] == 0
    got = warm.generate(items, keys, [10] * 5)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert warm.stats["caches_built"] == 1  # the call kept the warm cache
    off = engine(tiny_model, slots=4, model=cold.model, warm_up=False)
    assert off.warm_up([longest.inputs], 10) == 0.0 and off._decoder is None
    gen = engine(tiny_model, model=cold.model, decoder="generate")
    assert gen.warm_up([longest.inputs], 10) == 0.0


def test_prefill_reads_nothing_back_from_the_device(tiny_model, builder, monkeypatch):
    """Unconstrained prefill: slot state written by tensor ops, no .tolist()/.item()/bool() on a tensor
    outside the model's forward (stubbed here with its own outputs)."""
    from actors.slot_decoder import SlotDecoder, SlotRequest

    eng = engine(tiny_model)
    built = texts(builder, 3, seed=7)
    batch = eng._to_device(eng._collate([b.inputs for b in built]))
    d = SlotDecoder(eng.model, 4, 512, eng.eos_ids, eng.banned_ids)

    class Forward:  # the model's own forward, run once before counting
        def __init__(self):
            from actors.fast_prefill import FastPrefill

            pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            self.layers = []  # what it hands a K/V sink, layer by layer (replayed to the decoder's sink)
            self.out = FastPrefill(eng.model, compile_layers=False)(
                batch, pos, kv_sink=lambda layer, k, v: self.layers.append((layer, k.clone(), v.clone())))

        def supports(self, width):
            return True

        def __call__(self, batch, position_ids, kv_sink=None):
            for layer, k, v in self.layers:
                kv_sink(layer, k, v)
            return self.out[0].clone(), None, None

    d.fast_prefill = Forward()
    reads = []
    for name in ("tolist", "item", "__bool__", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: (reads.append(_n), _r(self, *a, **k))[1])
    requests = [SlotRequest(j, b.input_tokens, [1, 5, 5][j]) for j, b in enumerate(built)]
    assert d.prefill(batch, requests, [3, 0, 2]) == []
    assert reads == []
    first = [r for r, _ in d.collect()]
    assert "tolist" in reads  # the probe does see reads (collect's)
    monkeypatch.undo()
    assert d.busy() and d.free_slots() == [1, 3]
    assert [r.index for r in first] == [0]  # max_new 1: finished by its first token, returned by collect
    assert d.steps_left() == 4


def test_collate_casts_features_like_the_gpu(builder):
    """bfloat16 features from collate = the float32 batch cast by torch (round to nearest even, what the
    GPU's cast does too), checked against the rounding written out on the bits."""
    from actors.collate import collate

    rng = np.random.default_rng(8)
    items = [builder.audio((0.1 * rng.standard_normal(16000 * s)).astype(np.float32),
                           task_instruction("asr")).inputs for s in (2, 3)]
    items[0]["audio_input_features"][0, :4] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.0e-39]  # ties, a subnormal
    f32 = collate(items, 0)
    bf16 = collate(items, 0, features_dtype=torch.bfloat16)
    assert bf16["audio_input_features"].dtype == torch.bfloat16
    assert torch.equal(bf16["audio_input_features"], f32["audio_input_features"].to(torch.bfloat16))
    bits = f32["audio_input_features"].numpy().view(np.uint32).astype(np.uint64)
    rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round half to even on the bits
    assert np.array_equal(bf16["audio_input_features"].view(torch.int16).numpy().view(np.uint16), rne)
    for key in f32:
        if key != "audio_input_features":
            assert torch.equal(bf16[key], f32[key])


def test_each_pool_warms_up_on_its_calls_shapes(tiny_model):
    """The stage's warm-up items: a full-length chunk per speech instruction, a Letter page, a long
    text prompt; and a static engine warmed through the stage's entry point counts it in warmup_s."""
    from actors.warm_up import warm_up_replica, warm_up_work
    from schemas.config import JobConfig, ModelConfig

    cfg = JobConfig(job="transcribe", input="in.parquet", output="out", translate_to=["de"],
                    model=ModelConfig(source=tiny_model))
    items, new, calls = warm_up_work(tiny_model, cfg, "speech")
    assert [it["audio_input_features"].shape[0] for it in items] == [2998, 2998]  # 30 s: asr and translate
    assert new == 320 and calls == 512
    pages, new, calls = warm_up_work(tiny_model, cfg.model_copy(update={"job": "ocr", "translate_to": []}), "vision")
    assert pages[0]["image_pixel_values"].shape[0] == 13 and new == 1024 and calls >= 1  # 12 crops + global
    [text], new, _ = warm_up_work(tiny_model, cfg, "text")
    assert len(text["input_ids"]) >= 2048 and new == 512
    eng = engine(tiny_model, slots=2)
    eng.model_dir = tiny_model
    small = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"max_new_tokens": {"summarize": 4}}),
                                   "batching": cfg.batching.model_copy(update={"decode_slots": 2})})
    assert warm_up_replica(eng, small, "text") > 0 and eng.stats["warmup_s"] > 0
    assert eng._decoder is not None and eng._decoder.max_len >= 2048 and eng.stats["steps"] == 0
