"""Fidelity: the pipeline's text equals the model card's plain recipe on the same tiny weights.

The reference runs one item at a time with the LoRA loaded through peft and NOT merged; the pipeline
merges it, batches by length and builds features in another process. Greedy tokens must agree; where a
near-tie flips a token, the two logit vectors at that step must agree to 1e-4 relative (a tie, not a bug).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.card_recipe import CardRecipe
from pipeline.media.audio import decode_audio
from pipeline.media.pages import decode_pages
from pipeline.model.prompts import task_instruction
from tests.conftest import MAX_NEW, read_output

MAX = int(MAX_NEW)


@pytest.fixture(scope="module")
def card(tiny_model):
    return CardRecipe(tiny_model)


@pytest.fixture(scope="module")
def engines(tiny_model):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    return {m: Phi4MMEngine(tiny_model, m, ModelConfig(source=tiny_model), BatchingConfig())
            for m in ("speech", "vision", "text")}


def engine_logits(engine, inputs: dict[str, np.ndarray]) -> tuple[list[int], list[torch.Tensor]]:
    from actors.collate import collate

    batch = collate([inputs], engine.pad_token_id)
    with torch.inference_mode():
        out = engine.model.generate(**batch, max_new_tokens=MAX, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, bad_words_ids=engine.bad_words_ids)
    return out.sequences[0, batch["input_ids"].shape[1]:].tolist(), [s[0] for s in out.logits]


def assert_same_or_tie(pipeline_text: str, ref, engine, built_inputs, what: str, stats: dict):
    """Equal texts; otherwise the first differing step must be a near-tie with equal logits."""
    if (pipeline_text or "") == ref.text:
        stats["equal"] += 1
        return
    tokens, logits = engine_logits(engine, built_inputs)
    ref_out_tokens = ref.token_ids
    step = next(i for i, (a, b) in enumerate(zip(tokens + [-1], ref_out_tokens + [-2])) if a != b)
    ref_logits = ref.logits[step]
    rel = (logits[step] - ref_logits).norm() / ref_logits.norm()
    assert rel < 1e-4, f"{what}: texts differ at step {step} and logits differ by {rel:.2e}"
    top2 = torch.topk(ref_logits, 2).values
    assert (top2[0] - top2[1]).abs() < 1e-3 * top2[0].abs(), f"{what}: differs at step {step} without a tie"
    stats["ties"] += 1


def test_speech_tasks_match_card_recipe(transcribe_run, meetings_run, card, engines, tiny_model):
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model)
    stats = {"equal": 0, "ties": 0}
    samples, good, _, out = transcribe_run
    rows = read_output(out).to_pandas()
    rows = rows[rows.id.isin(good.id) & rows.task.isin(["asr", "translate"])]
    msamples, mout = meetings_run
    mrows = read_output(mout).to_pandas()
    mrows = mrows[mrows.task == "asr"].assign(uri="long/meeting.flac")
    uris = good.set_index("id").uri
    for folder, frame in ((samples, rows.assign(uri=rows.id.map(uris))), (msamples, mrows)):
        for _, row in frame.iterrows():
            audio = decode_audio((folder / row.uri).read_bytes(), row.uri)
            instruction = task_instruction(row.task, row.target_language)
            for seg in row.segments:
                clip = audio[int(round(seg["start_s"] * 16000)):int(round(seg["end_s"] * 16000))]
                ref = card.audio(clip, instruction, MAX, want_logits=True)
                assert_same_or_tie(seg["text"], ref, engines["speech"], builder.audio(clip, instruction).inputs,
                                   f"{row.id}/{row.task}/{seg['start_s']}", stats)
    assert stats["equal"] + stats["ties"] >= len(rows) + 5
    assert stats["ties"] <= max(1, stats["equal"] // 10), stats  # ties are rare, not the rule


def test_summaries_match_card_recipe(transcribe_run, card, engines, tiny_model):
    """The card's chain, one item at a time: its transcript of each chunk, those ids into the summary
    prompt (as the pipeline builds it: pipeline/stages/from_transcripts.py), its summary of that prompt."""
    from pipeline.model.inputs import InputBuilder
    from pipeline.model.prompts import summary_pieces

    builder = InputBuilder(tiny_model)
    samples, good, _, out = transcribe_run
    rows = read_output(out).to_pandas()
    rows = rows[rows.id.isin(good.id)].set_index(["id", "task"])
    uris = good.set_index("id").uri
    stats = {"equal": 0, "ties": 0}
    for rid in good.id:
        audio = decode_audio((samples / uris[rid]).read_bytes(), uris[rid])
        pieces = []
        for seg in rows.loc[(rid, "asr"), "segments"]:
            clip = audio[int(round(seg["start_s"] * 16000)):int(round(seg["end_s"] * 16000))]
            spoken = card.audio(clip, task_instruction("asr"), MAX)
            if spoken.text:
                pieces += ["", builder.prompt_ids(spoken.token_ids), "\n"]
        prompt = builder.text_pieces(summary_pieces(pieces)).inputs
        ref = card.text_ids(prompt["input_ids"].tolist(), MAX, want_logits=True)
        assert_same_or_tie(rows.loc[(rid, "summarize"), "text"], ref, engines["text"], prompt,
                           f"{rid}/summarize", stats)
    assert stats["equal"] >= len(good) - 1


def test_ocr_matches_card_recipe(ocr_run, card, engines, tiny_model):
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model, dynamic_hd=4)
    samples, manifest, _, out = ocr_run
    rows = read_output(out).to_pandas()
    uris = manifest.set_index("id").uri
    stats = {"equal": 0, "ties": 0}
    instruction = task_instruction("ocr")
    for _, row in rows[rows.id.isin(manifest.id)].iterrows():
        page = decode_pages((samples / uris[row.id]).read_bytes(), uris[row.id])[row.page - 1]
        ref = card.image(page, instruction, MAX, want_logits=True, dynamic_hd=4)
        assert_same_or_tie(row.text, ref, engines["vision"], builder.image(page, instruction).inputs,
                           f"{row.id}/p{row.page}", stats)
    assert stats["equal"] >= 4


def test_ocr_with_the_fused_engine_matches_card_recipe(card, tiny_model):
    """The GPU's path run eagerly here: fused SigLIP (actors/vision_encoder.py), fused prefill and the static
    decoder, the sample pages batched together, against the card recipe one page at a time."""
    from pathlib import Path

    from actors.engine import Phi4MMEngine
    from pipeline.model.inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig

    builder = InputBuilder(tiny_model, dynamic_hd=4)
    engine = Phi4MMEngine(tiny_model, "vision", ModelConfig(source=tiny_model), BatchingConfig(
        decoder="static", prefill="fused", vision_encoder="eager", decode_slots=8))
    assert engine.model.model.embed_tokens_extend.image_embed.__dict__.get("_fused_siglip") is not None
    instruction = task_instruction("ocr")
    docs = Path(__file__).resolve().parents[1] / "samples" / "docs"
    pages = [p for name in ("invoice.png", "minutes.png", "packet.pdf")
             for p in decode_pages((docs / name).read_bytes(), name)]
    built = [builder.image(p, instruction) for p in pages]
    got = engine.generate([b.inputs for b in built], [b.batch_key for b in built], [MAX] * len(built))
    stats = {"equal": 0, "ties": 0}
    for k, (page, b, gen) in enumerate(zip(pages, built, got)):
        ref = card.image(page, instruction, MAX, want_logits=True, dynamic_hd=4)
        assert_same_or_tie(gen.text, ref, engine, b.inputs, f"page {k}", stats)
    assert stats["equal"] >= len(pages) - 1


def test_batched_equals_unbatched_for_equal_length_audio(engines, tiny_model):
    """The engine's batches (equal-length audio, left-padded prompts) give the single-item tokens."""
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model)
    rng = np.random.default_rng(7)
    clips = [(0.1 * rng.standard_normal(16000 * 4)).astype(np.float32) for _ in range(4)]
    items = [builder.audio(c, task_instruction(t, lang)) for c, (t, lang) in
             zip(clips, [("asr", None), ("translate", "fr"), ("translate", "de"), ("asr", None)])]
    assert len({it.batch_key for it in items}) == 1 and len({it.input_tokens for it in items}) > 1
    engine = engines["speech"]
    batched = engine.generate_batch([it.inputs for it in items], MAX)
    single = [engine.generate_batch([it.inputs], MAX)[0] for it in items]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert len({tuple(s.token_ids) for s in single}) > 1  # the inputs matter: not a constant output


def test_scheduler_never_mixes_batch_keys_or_token_budgets(engines):
    """Batches hold one batch key (an audio length bucket, a crop count) and one token budget."""
    engine = engines["speech"]
    plan = engine.plan_batches(["audio:298", "audio:398", "audio:298", "audio:298"], [50, 50, 50, 50],
                               [12, 12, 12, 30])
    assert sorted(map(sorted, plan)) == [[0, 2], [1], [3]]
