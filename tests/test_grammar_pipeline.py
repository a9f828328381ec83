"""Pipelined constrained decoding (actors/grammar_pipeline.py): the host's grammar work moved under the next
forward changes no token, reads the device once per step, and the parallel consumption of tokens leaves
the matchers exactly where the serial one does.

Run here on CPU without CUDA graphs (the same step code is replayed from graphs on the GPU: the `gpu` test
at the end, with torch's sync debug mode as the judge of "one event wait per step")."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "maxLength": 20},
        "resolved": {"type": "boolean"},
        "mood": {"enum": ["happy", "neutral", "angry"]},
        "calls": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["reason", "resolved", "mood", "calls"],
}
# which items are constrained: the last one (the longest prompt, prefilled last) is free, so the run ends with
# free slots only, and the decoder goes from pipelined constrained steps back to its unconstrained step
GRAMMAR_ROWS = [True, True, False, True, True, True, True, False]


@pytest.fixture(scope="module")
def texts(tiny_model):
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model)
    return [builder.text(f"Extract the fields of call {i}: " + "words " * (2 * i)) for i in range(len(GRAMMAR_ROWS))]


@pytest.fixture(scope="module")
def grammar():
    from actors.grammar import json_schema_grammar
    from schemas.structured import generation_schema

    return json_schema_grammar(generation_schema(SCHEMA, 12, 8))


def make_engine(tiny_model, pipeline: str, model=None, slots: int = 3):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    # 3 slots for 8 items, prefills of 2: slots are refilled while the others decode
    batching = BatchingConfig(decoder="static", decode_slots=slots, max_batch_size=2, check_every=3,
                              grammar_pipeline=pipeline)
    return Phi4MMEngine(tiny_model, "text", ModelConfig(source=tiny_model), batching, model=model)


def generate(engine, texts, grammar, max_new: int = 90, rows=GRAMMAR_ROWS):
    gens = engine.generate([t.inputs for t in texts], [t.batch_key for t in texts], [max_new] * len(texts),
                           grammars=[grammar if c else None for c, _ in zip(rows, texts)])
    assert not [g for g in gens if isinstance(g, Exception)]
    return gens


class DeviceReads:
    """Counts the tensor reads to the host (`tolist`, `item`, `numpy`, truth value) made inside
    `SlotDecoder.step`: on CUDA each is a wait for the device."""

    def __init__(self, monkeypatch):
        from actors.slot_decoder import SlotDecoder

        self.reads = self.steps = 0
        self.inside = False
        for name in ("tolist", "item", "numpy", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(original))
        step = SlotDecoder.step

        def counted_step(decoder):
            self.inside = True
            try:
                step(decoder)
            finally:
                self.inside = False
            self.steps += 1

        monkeypatch.setattr(SlotDecoder, "step", counted_step)

    def _counted(self, original):
        def method(tensor, *args, **kwargs):
            if self.inside:
                self.reads += 1
            return original(tensor, *args, **kwargs)

        return method


def test_pipelined_tokens_equal_the_serial_steps_with_refills(tiny_model, texts, grammar, monkeypatch):
    """Mixed constrained and free slots, refills while a forward is in flight: the same tokens as the serial
    step, every constrained answer valid, and one device read per step instead of two."""
    from jsonschema import validate

    serial = make_engine(tiny_model, "off")
    serial_reads = DeviceReads(monkeypatch)
    want = generate(serial, texts, grammar)
    assert serial_reads.reads == 2 * serial.grammar.stats["steps"] > 0  # two reads per serial constrained step
    monkeypatch.undo()

    pipelined = make_engine(tiny_model, "on", model=serial.model)
    reads = DeviceReads(monkeypatch)
    got = generate(pipelined, texts, grammar)
    stats = pipelined.grammar.stats
    assert stats["steps"] > 20 and pipelined._decoder.grammar_steps is not None  # the pipeline really ran
    assert stats["held_slots"] > 0  # slots were refilled under an issued forward, and held out of its choice
    assert reads.reads == stats["steps"] == stats["host_reads"]  # one read per pipelined step
    assert reads.steps > stats["steps"]  # the last steps were unconstrained ones, which read nothing
    assert not pipelined._decoder.grammar_steps.pending

    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    lengths = [len(g.token_ids) for g in got]
    assert len(set(lengths)) > 2  # answers end at different steps: refills happen mid-decode
    for g, constrained in zip(got, GRAMMAR_ROWS):
        if constrained:
            validate(json.loads(g.text), SCHEMA)
    free = [g.text for g, c in zip(got, GRAMMAR_ROWS) if not c]
    assert not any(_is_json(t) for t in free)  # the free slots really were free (the tiny model's noise)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_switching_off_mid_life_and_a_failed_warm_up_fall_back_to_the_serial_step(tiny_model, texts, grammar,
                                                                                    monkeypatch, caplog):
    """A forward left in flight by a call's last pipelined step: dropped at the next call's first prefill
    (it serves none of its slots), or when the pipeline is switched off (as extract_bench does between its
    rows); a pipeline that raises while it is made logs one warning and the serial step decodes the same
    tokens."""
    serial = make_engine(tiny_model, "off")
    want_first = [g.token_ids for g in generate(serial, texts[:4], grammar, rows=[True] * 4)]
    want = [g.token_ids for g in generate(serial, texts, grammar)]

    engine = make_engine(tiny_model, "on", model=serial.model)
    first = generate(engine, texts[:4], grammar, rows=[True] * 4)  # constrained to the end
    decoder = engine._decoder
    assert decoder.grammar_steps.pending  # the last step issued a forward nobody chose from
    steps = engine.grammar.stats["steps"]
    second = generate(engine, texts[:4], grammar, rows=[True] * 4)  # starts with that forward in flight
    assert engine._decoder is decoder and [g.token_ids for g in second] == want_first
    # that forward served no slot of the new call: dropped at its first prefill, not sat out for a step
    assert engine.grammar.stats["steps"] - steps == steps
    engine.grammar.pipeline = "off"
    again = generate(engine, texts, grammar)
    assert engine._decoder is decoder and decoder.grammar_steps is None  # the same decoder, that forward dropped
    assert [g.token_ids for g in first] == want_first and [g.token_ids for g in again] == want

    import actors.grammar_pipeline as pipeline_module

    def broken(self, decoder, masks):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(pipeline_module.PipelinedConstrainedSteps, "__init__", broken)
    failing = make_engine(tiny_model, "on", model=serial.model)
    with caplog.at_level(logging.WARNING, logger="actors.grammar"):
        got = [g.token_ids for g in generate(failing, texts, grammar)]
    assert got == want
    warnings = [r for r in caplog.records if "pipelined constrained decoding failed" in r.getMessage()]
    assert len(warnings) == 1 and "capture refused" in warnings[0].getMessage()
    assert failing.grammar.pipeline_failed and not failing.grammar.pipelined(torch.device("cuda"))


def walk_matchers(masks, grammar, count: int, steps: int, seed: int, consume):
    """`count` matchers random-walked for `steps` steps (a finished one replaced by a fresh one), the tokens
    taken by `consume`; yields each step's filled bitmask (a copy) and the matchers."""
    from actors.grammar import unpack_bitmask

    rng = np.random.default_rng(seed)
    matchers = [masks.matcher(grammar) for _ in range(count)]
    for _ in range(steps):
        bitmask = masks.bitmask(count)
        masks.fill([(m, i) for i, m in enumerate(matchers)], bitmask)
        allowed = unpack_bitmask(bitmask, masks.vocab)
        yield bitmask.clone(), matchers
        pairs = []
        for i, m in enumerate(matchers):
            if m.is_stopped():
                matchers[i] = masks.matcher(grammar)
                continue
            ids = torch.nonzero(allowed[i]).flatten().tolist()
            # half the time the smallest allowed id: the walk then closes strings and objects too
            pairs.append((m, ids[0] if rng.random() < 0.5 else int(rng.choice(ids))))
        consume(pairs)


def test_parallel_consumption_equals_serial_over_60_steps(tiny_model, grammar):
    """`LLExecutor.consume_token_par` (GrammarMasks.consume) leaves every matcher where `consume_token`
    does: the bitmasks of two random walks, one consumed each way, are identical at every step."""
    from actors.grammar import GrammarMasks
    from actors.tiny_model import build_processor

    processor, ids, vocab = build_processor()
    masks = GrammarMasks(processor.tokenizer, vocab, [ids["<|endoftext|>"], ids["<|end|>"]], threads=2)

    def serial(pairs):
        for m, token in pairs:
            m.consume_token(token)

    walks = zip(walk_matchers(masks, grammar, 12, 60, 7, serial),
                walk_matchers(masks, grammar, 12, 60, 7, masks.consume))
    distinct, finished = set(), 0
    for (want, _), (got, matchers) in walks:
        assert torch.equal(got, want)
        distinct.update(bytes(row.numpy()) for row in got)
        finished += sum(m.is_stopped() for m in matchers)
    assert len(distinct) > 20 and finished > 0  # the walks went through many grammar states, to the end


def test_host_bitmask_resets_rows_it_no_longer_fills(tiny_model, grammar):
    """The persistent bitmask: a row filled once and not the next time allows everything again."""
    from actors.grammar import GrammarMasks, HostBitmask
    from actors.tiny_model import build_processor

    processor, ids, vocab = build_processor()
    masks = GrammarMasks(processor.tokenizer, vocab, [ids["<|end|>"]], threads=1)
    host = HostBitmask(masks, 3, pin=False)
    a, b = masks.matcher(grammar), masks.matcher(grammar)
    host.fill([(a, 0), (b, 2)])
    assert not (host.tensor[0] == -1).all() and (host.tensor[1] == -1).all()
    host.fill([(b, 2)])
    assert (host.tensor[0] == -1).all() and not (host.tensor[2] == -1).all()


def test_host_proxy_script_runs_on_the_tiny_tokenizer(capsys):
    """bench/grammar_host.py (the CPU proxy of the host's grammar work) runs and reports both paths."""
    from bench.grammar_host import main

    main(["--tiny", "--matchers", "6", "--steps", "12", "--threads", "1"])
    out = capsys.readouterr().out
    assert "serial" in out and "pipelined" in out and "fill_ms_mean" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipelined_steps_on_cuda_graphs_equal_serial_and_never_sync_implicitly(tiny_model, texts, grammar):
    """On the GPU (float32): graphs captured, the serial step's tokens, no implicit synchronisation in a
    pipelined step (torch's sync debug mode raises on one; the event wait is explicit), GPU times kept."""
    from actors.engine import Phi4MMEngine
    from actors.slot_decoder import SlotDecoder
    from schemas.config import BatchingConfig, ModelConfig

    def engine(mode, model=None):
        batching = BatchingConfig(decoder="static", decode_slots=3, max_batch_size=2, check_every=3,
                                  grammar_pipeline=mode)
        return Phi4MMEngine(tiny_model, "text", ModelConfig(source=tiny_model, dtype="float32"), batching,
                            model=model)

    serial = engine("off")
    want = [g.token_ids for g in generate(serial, texts, grammar)]
    fast = engine("auto", model=serial.model)
    step = SlotDecoder.step

    strict = []

    def strict_step(decoder):  # steps with a forward in flight: the steady state
        if decoder.grammar_steps is not None and decoder.grammar_steps.pending:
            strict.append(1)
            torch.cuda.set_sync_debug_mode("error")
        try:
            step(decoder)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    SlotDecoder.step = strict_step
    try:
        got = [g.token_ids for g in generate(fast, texts, grammar)]
    finally:
        SlotDecoder.step = step
    assert got == want and len(strict) > 20
    steps = fast._decoder.grammar_steps
    assert steps.forward_graph is not None and steps.choose_graph is not None
    stats = fast.grammar.stats
    assert stats["gpu_timed_steps"] == stats["steps"] and stats["gpu_forward_s"] > 0
