"""The static decoder's memory plan, with the real model's sizes (32 layers, 8 KV heads of 128, bf16)."""
from __future__ import annotations

from actors.kv_plan import length_class, plan_kv

PER_TOKEN = 2 * 32 * 8 * 128 * 2  # 131072 bytes of cache per position of one sequence
CONTEXT = 131072
GB = 10 ** 9


def plan(prompts, new, budget_gb=60, max_slots=512):
    return plan_kv(prompts, new, bytes_per_token=PER_TOKEN, budget_bytes=budget_gb * GB, max_slots=max_slots,
                   context=CONTEXT)


def test_many_short_prompts_get_all_their_slots():
    p = plan([385] * 1024, [100] * 1024)
    [group] = p.groups
    assert group.max_len == 512 and group.slots == 512 and len(group.items) == 1024 and not p.refused
    assert group.slots * group.max_len * PER_TOKEN <= 60 * GB


def test_a_few_long_transcripts_do_not_shrink_the_short_ones():
    prompts = [400] * 600 + [30_000, 29_000, 31_500]
    p = plan(prompts, [300] * len(prompts))
    short, long = p.groups
    assert short.max_len == 768 and short.slots == 512 and len(short.items) == 600
    # the long ones share one cache sized for the longest of them, one slot each, nothing refused
    assert long.items == (600, 601, 602) and long.max_len == 31_872 and long.slots == 3
    for g in p.groups:
        assert g.slots * g.max_len * PER_TOKEN <= 60 * GB
        assert all(prompts[i] + 300 <= g.max_len for i in g.items)


def test_memory_bounds_the_slots_of_long_prompts():
    p = plan([60_000] * 20, [500] * 20, budget_gb=40)
    [group] = p.groups
    assert group.slots == 40 * GB // (group.max_len * PER_TOKEN) == 5 and len(group.items) == 20


def test_items_past_the_context_or_the_memory_are_refused_by_name():
    p = plan([130_000, 100, 90_000], [2000, 50, 500], budget_gb=10)
    assert set(p.refused) == {0, 2}
    assert "130000 tokens + 2000 new tokens exceeds the model's context of 131072 tokens" in p.refused[0]
    assert "90000 tokens + 500 new tokens needs 11.9 GB of KV cache; 10.0 GB is available" in p.refused[2]
    assert [g.items for g in p.groups] == [(1,)]


def test_length_classes_are_powers_of_two():
    assert [length_class(n) for n in (1, 1024, 1025, 5000, 131072)] == [1024, 1024, 2048, 8192, 131072]


def test_engine_runs_short_and_long_prompts_in_their_own_caches_and_refuses_what_cannot_fit(tiny_model):
    """On the tiny model: a call of short prompts and one long one decodes exactly as `generate` does,
    in two caches (the short ones keep their slots), and a prompt past the context is an error item."""
    import numpy as np

    from actors.engine import Phi4MMEngine
    from pipeline.model.inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig

    builder = InputBuilder(tiny_model)
    texts = [builder.text(f"Summarize: meeting {k} about the budget.") for k in range(3)]
    long = builder.text("Summarize: " + " ".join(f"point {k} was agreed." for k in range(400)))
    items = [t.inputs for t in texts] + [long.inputs]
    keys = [t.batch_key for t in texts] + [long.batch_key]
    assert long.input_tokens > 1100 > max(t.input_tokens for t in texts)
    model_cfg = ModelConfig(source=tiny_model)
    static = Phi4MMEngine(tiny_model, "text", model_cfg, BatchingConfig(decoder="static", decode_slots=4))
    reference = Phi4MMEngine(tiny_model, "text", model_cfg, BatchingConfig(decoder="generate"), model=static.model)
    got = static.generate(items, keys, [6] * 4)
    want = reference.generate(items, keys, [6] * 4)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert static.stats["caches_built"] == 2 and static.stats["oom_fallbacks"] == 0

    huge = {**long.inputs, "input_ids": np.zeros(static.context_tokens(), dtype=np.int64)}
    out = static.generate([texts[0].inputs, huge], [keys[0], long.batch_key], [6, 6])
    assert out[0].token_ids == want[0].token_ids
    assert isinstance(out[1], ValueError) and "exceeds the model's context of 131072 tokens" in str(out[1])
