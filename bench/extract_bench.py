"""GPU benchmark `extract`: constrained decoding (--schema) against the same prompt unconstrained, in ONE run.

    python -m bench.extract_bench --out bench [--items 128] [--slots 128] [--tiny]

The workload: a 4,000-token call transcript and a 5-field schema (the call-centre extraction of the
README), through this project's engine (static KV cache, CUDA-graph decode step, refilled slots) on
Phi-4-multimodal at its real size with random bf16 weights (bench/real_model.py). Constrained: every
step's logits come from the captured graph, llguidance fills the masks of the slots on the host, they
are applied, then the token is picked (actors/grammar.py, actors/slot_decoder.py). Random weights end
an answer wherever the grammar lets them, so the unconstrained run decodes exactly the constrained
run's mean answer length (min_new = max_new) and both do the same arithmetic: the difference is the
grammar's cost. Target: constrained items/s at least 0.90 of unconstrained, every answer valid.

The constrained run is measured per grammar pipeline mode (`--grammar-pipeline`, default both: the serial
step, then the pipelined one of actors/grammar_pipeline.py), each row with the host's time per step by
phase and, pipelined on CUDA, the GPU's forward / mask+choice / idle time per step from CUDA events
(actors/grammar.py: grammar_stats_per_step).

Appends one JSON object per measurement to OUT/results.extract.jsonl and prints a table.
--tiny runs the same code on the tiny checkpoint on CPU (a smoke test of the script, not a benchmark).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "maxLength": 120},
        "resolved": {"type": "boolean"},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "product": {"type": "string", "maxLength": 40},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["reason", "resolved", "sentiment", "product", "priority"],
}
EXTRACT_PROMPT = "From this call transcript, extract the fields of the schema.\n\n{transcript}"
WORDS = ["customer", "agent", "refund", "order", "hold", "the", "we", "agreed", "Tuesday", "invoice", "router",
         "billing", "account", "cancel", "upgrade", "thanks", "delivery", "late", "manager", "number"]


def transcripts(builder, tokens: int, distinct: int, rng) -> list:
    """`distinct` built prompts of about `tokens` prompt tokens each (system message with the schema)."""
    out = []
    for _ in range(distinct):
        text = " ".join(rng.choice(WORDS, size=tokens))
        built = builder.text(EXTRACT_PROMPT.format(transcript=text))
        while built.input_tokens > tokens and len(text) > 100:  # (the schema's system message stays whole)
            text = text[: int(len(text) * min(0.95, tokens / built.input_tokens))]
            built = builder.text(EXTRACT_PROMPT.format(transcript=text))
        out.append(built)
    return out


def bench_extract(base, ckpt: str, rows: list[dict], meta: dict, items_n: int = 128, slots: int = 128,
                  tokens: int = 4000, max_new: int = 160, distinct: int = 8, overrides: dict | None = None,
                  modes: tuple[str, ...] = ("auto",)) -> dict:
    """Constrained then unconstrained decoding of `items_n` extraction prompts on `base` (the same engine,
    the same prompts); appends both rows to `rows` and returns the constrained one (its
    `vs_unconstrained` is the target's measure, `valid_json` how many answers validate)."""
    from jsonschema import validate

    from actors.engine import Phi4MMEngine
    from actors.grammar import grammar_stats_per_step, new_grammar_stats
    from actors.model_stage import answer_grammar
    from bench.run_bench import engine_timing, stats_delta, timed
    from pipeline.model.inputs import InputBuilder
    from pipeline.model.prompts import prompt_system_message
    from schemas.config import BatchingConfig, JobConfig, ModelConfig
    from schemas.structured import typed_fields

    config = JobConfig(job="prompt", input="-", output="-", model={"source": ckpt},
                       prompt={"json_schema": EXTRACT_SCHEMA, "max_string_chars": 120})
    grammar = answer_grammar(config)
    builder = InputBuilder(ckpt, prompt_system_message(None, EXTRACT_SCHEMA))
    built = transcripts(builder, tokens, distinct, np.random.default_rng(0))
    items = [built[i % len(built)] for i in range(items_n)]
    # prefill batches as the pipeline runs them (max_batch_tokens at its default, 65,536: 16 of these
    # prompts a batch); the first run lifted it to 1M tokens, and 32 prompts of 3,875 tokens in one
    # compiled prefill ran out of memory and fell back to `generate`
    batching = BatchingConfig(**{"decoder": "static", "decode_slots": slots, "max_batch_size": 32,
                                 "check_every": 16, **(overrides or {}).get("batching", {})})
    engine = Phi4MMEngine(ckpt, "text", ModelConfig(source=ckpt), batching, model=base)
    meta = {**meta, "workload": "extract", "metric": "items_per_s", "prompt_tokens": built[0].input_tokens,
            "schema_fields": len(EXTRACT_SCHEMA["properties"])}
    mine: list[dict] = []

    def run(items, grammars, max_new: int, min_new: int):
        before = dict(engine.stats)
        engine.grammar.stats = new_grammar_stats()
        gens, wall = timed(lambda: engine.generate([b.inputs for b in items], [b.batch_key for b in items],
                                                   [max_new] * len(items), min_new, grammars))
        bad = [g for g in gens if isinstance(g, Exception)]
        if bad:
            raise bad[0]
        return gens, wall, stats_delta(before, engine.stats)

    def record(name: str, gens, wall: float, stats: dict, extra: dict) -> dict:
        row = {**meta, "engine": name, "value": round(len(items) / wall, 3), "items": len(items),
               "wall_s": round(wall, 3), "new_tokens_mean": round(float(np.mean([len(g.token_ids) for g in gens])), 1),
               **engine_timing(stats), "slots": slots, "engine_stats": stats,
               "batching": engine.batching.model_dump(mode="json"), **extra}
        mine.append(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    few = items[: min(8, len(items))]
    run(few, None, 8, 8)  # warm-up: the static cache, the captured step
    for mode in modes:  # warm-up: the grammar's tokenizer, the constrained step's graphs
        engine.grammar.pipeline = mode
        run(few, [grammar] * len(few), max_new, 0)
    constrained = []
    for mode in modes:
        engine.grammar.pipeline = mode  # read at every constrained step (actors/slot_decoder.py)
        gens, wall, stats = run(items, [grammar] * len(items), max_new, 0)
        valid = 0
        for g in gens:
            try:
                validate(json.loads(g.text), EXTRACT_SCHEMA)
                valid += 1
            except Exception:  # noqa: BLE001 - an invalid answer is counted, not fatal
                pass
        steps = engine._decoder.grammar_steps
        constrained.append(record("engine_constrained", gens, wall, stats, {
            "valid_json": f"{valid}/{len(gens)}", "all_valid": valid == len(gens),
            "typed_columns": len(typed_fields(EXTRACT_SCHEMA)), "grammar_pipeline": mode,
            "pipelined": steps is not None, "graphs": steps is not None and steps.choose_graph is not None,
            "grammar_threads": engine.grammar.threads, **grammar_stats_per_step(engine.grammar.stats)}))
    new = max(1, int(round(constrained[-1]["new_tokens_mean"])))
    gens, wall, stats = run(items, None, new, new)
    free = record("engine_unconstrained", gens, wall, stats,
                  {"note": f"min_new = max_new = {new}: the constrained mean"})
    for con in constrained:
        con["vs_unconstrained"] = round(con["value"] / free["value"], 3)
        con["within_10pct"] = con["vs_unconstrained"] >= 0.90
    return constrained[-1]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench")
    ap.add_argument("--scratch", default="/tmp/phi4mm-bench")
    ap.add_argument("--items", type=int, default=128)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4000, help="prompt tokens per transcript")
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--distinct", type=int, default=8)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="batching.FIELD=VALUE")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny checkpoint")
    ap.add_argument("--grammar-pipeline", choices=["auto", "on", "off", "both"], default="both",
                    help="BatchingConfig.grammar_pipeline of the constrained run; both: a serial row, then auto")
    args = ap.parse_args(argv)
    if args.tiny:
        args.items, args.slots, args.tokens, args.max_new, args.distinct = 6, 4, 700, 400, 3
    from bench.real_model import bench_model
    from bench.run_bench import bench_meta, parse_overrides

    overrides = parse_overrides(args.overrides)
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.scratch, "ckpt")
    base = bench_model(ckpt, args.tiny)
    rows: list[dict] = []
    modes = ("off", "auto") if args.grammar_pipeline == "both" else (args.grammar_pipeline,)
    bench_extract(base, ckpt, rows, bench_meta(), args.items, args.slots, args.tokens, args.max_new, args.distinct,
                  overrides, modes)
    with open(os.path.join(args.out, "results.extract.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("| workload | engine | items/s | wall s | new tokens | decode ms/step | vs unconstrained | valid |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| extract | {r['engine']} | {r['value']} | {r['wall_s']} | {r['new_tokens_mean']} | "
              f"{r['decode_ms_per_step']} | {r.get('vs_unconstrained', '')} | {r.get('valid_json', '')} |")
    return rows


if __name__ == "__main__":
    main()
