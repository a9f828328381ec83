"""CPU proxy of the host's grammar work per constrained decode step (no GPU, no model):

    python -m bench.grammar_host [--matchers 128] [--steps 150] [--threads 0] [--forward-ms 29.8] [--tiny]

`--matchers` slots hold matchers of the extract bench's grammar (bench/extract_bench.py EXTRACT_SCHEMA,
bounded as the bench's job bounds it) over the bench tokenizer (200 064 ids); each step every active slot
takes a token drawn uniformly from its mask (a random walk through the grammar): by default from the
mask's ordinary tokens (--walk ordinary), as the bench's model mostly picks them (its answers average 89
tokens, which the tokenizer's ~199 500 `<|reserved_N|>` placeholders, ~20 characters each, could not make
under the schema's 120- and 40-character bounds), or from all of it (--walk uniform: strings fill up
with placeholders at once and stay in their dearest, nearly-full states). A slot ends when its
matcher stops (its answer's eos taken) or after --max-new tokens, keeps its stopped matcher for --collect-every
steps (as the decoder keeps a finished slot until the engine collects it), then gets a fresh matcher.

Two sets of matchers walk the same tokens, one through each path's host work:
- serial (SlotDecoder's serial constrained step): a fresh bitmask (`torch.full`), a fill of every slot with a
  matcher (finished ones too), the tokens consumed one matcher at a time;
- pipelined (actors/grammar_pipeline.py): the persistent bitmask refilled for the active slots only, the
  tokens consumed by `LLExecutor.consume_token_par`.
Their masks of the active slots are checked equal every step. `exposed_ms` models what the GPU waits for
per step at a forward of --forward-ms: serial = alloc + max(0, fill - forward) + consume (its fill overlaps
the forward; the rest follows the choice); pipelined = max(0, consume + fill - forward) (all of it runs
under the next forward). The serial path's copy, mask kernels and two reads are GPU-side and not here.

Prints one JSON object per path and a table; --tiny: the tiny tokenizer (a smoke test).
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def summary(name: str, phases: dict[str, list[float]], forward_ms: float, threads: int, steps: int) -> dict:
    row = {"path": name, "threads": threads, "steps": steps}
    for phase, values in phases.items():
        row[f"{phase}_ms_mean"] = round(float(np.mean(values)), 3) if values else 0.0
    for q in (50, 90):
        row[f"fill_ms_p{q}"] = round(percentile(phases["fill"], q), 3)
    row["fill_ms_max"] = round(max(phases["fill"]), 3)
    fill, consume = np.array(phases["fill"]), np.array(phases["consume"])
    if name == "serial":
        exposed = np.array(phases["alloc"]) + np.maximum(0.0, fill - forward_ms) + consume
    else:
        exposed = np.maximum(0.0, consume + fill - forward_ms)
    row["exposed_ms_mean"] = round(float(exposed.mean()), 3)
    row["exposed_ms_p90"] = round(percentile(list(exposed), 90), 3)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--matchers", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=0, help="llguidance threads; 0: GrammarMasks' default")
    ap.add_argument("--forward-ms", type=float, default=29.8, help="the forward the host work hides under")
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--collect-every", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="the tiny tokenizer (a smoke test)")
    ap.add_argument("--walk", choices=["ordinary", "uniform"], default="ordinary")
    ap.add_argument("--dump", help="write every step's phase times (ms) to this JSON file")
    args = ap.parse_args(argv)

    from actors.grammar import GrammarMasks, HostBitmask, json_schema_grammar
    from actors.tiny_model import REAL_IDS, REAL_VOCAB_SIZE, build_processor
    from bench.extract_bench import EXTRACT_SCHEMA
    from schemas.structured import generation_schema

    started = time.perf_counter()
    processor, ids, vocab = build_processor(real_ids=not args.tiny)
    if not args.tiny:
        ids, vocab = REAL_IDS, REAL_VOCAB_SIZE
    masks = GrammarMasks(processor.tokenizer, vocab, [ids["<|endoftext|>"], ids["<|end|>"]], threads=args.threads)
    grammar = json_schema_grammar(generation_schema(EXTRACT_SCHEMA, 120, 8))
    setup_s = time.perf_counter() - started
    n = args.matchers

    t = time.perf_counter()
    masks.fill([(masks.matcher(grammar), 0)], masks.bitmask(1))  # the grammar compiles lazily, at its first mask
    first_compile_s = time.perf_counter() - t
    masks.consume([(masks.matcher(grammar), ids["<|end|>"]) for _ in range(2)])  # starts the thread pool
    # a prefill's first masks (16 fresh matchers): fresh pageable bitmask vs the persistent one
    first = {"serial": [], "pipelined": []}
    persistent = HostBitmask(masks, 16, pin=False)
    for _ in range(5):
        fresh = [(masks.matcher(grammar), j) for j in range(16)]
        t = time.perf_counter()
        masks.fill(fresh, masks.bitmask(16))
        first["serial"].append(1000 * (time.perf_counter() - t))
        fresh = [(masks.matcher(grammar), j) for j in range(16)]
        t = time.perf_counter()
        persistent.fill(fresh)
        first["pipelined"].append(1000 * (time.perf_counter() - t))

    rng = np.random.default_rng(args.seed)
    ordinary = np.ones(vocab, dtype=bool)
    if args.walk == "ordinary":
        names = processor.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(processor.tokenizer)))))
        ordinary[: len(names)] = [not name.startswith("<|") for name in names]
        ordinary[list(masks_eos(ids))] = True
    serial = [masks.matcher(grammar) for _ in range(n)]
    pipelined = [masks.matcher(grammar) for _ in range(n)]
    produced = [0] * n
    finished_at: list[int | None] = [None] * n
    host = HostBitmask(masks, n, pin=False)
    phases = {"serial": {"alloc": [], "fill": [], "consume": []}, "pipelined": {"fill": [], "consume": []}}
    cpu = {path: {phase: [] for phase in phases[path]} for path in phases}

    def timed(path: str, phase: str, work):
        wall, used = time.perf_counter(), time.process_time()
        out = work()
        phases[path][phase].append(1000 * (time.perf_counter() - wall))
        cpu[path][phase].append(1000 * (time.process_time() - used))
        return out

    active_rows = []
    for step in range(args.steps):
        active = [finished_at[i] is None for i in range(n)]
        active_rows.append(sum(active))
        # serial: a fresh bitmask, every slot with a matcher filled
        bitmask = timed("serial", "alloc", lambda: masks.bitmask(n))
        timed("serial", "fill", partial(masks.fill, [(m, i) for i, m in enumerate(serial)], bitmask))
        # pipelined: the persistent bitmask, active slots only
        timed("pipelined", "fill", partial(host.fill, [(m, i) for i, m in enumerate(pipelined) if active[i]]))

        tokens = {}
        for i in np.flatnonzero(active):
            assert np.array_equal(host.tensor[i].numpy(), bitmask[i].numpy()), f"masks differ at step {step}"
            allowed = np.unpackbits(bitmask[i].numpy().view(np.uint8), bitorder="little")[:vocab].astype(bool)
            choices = np.flatnonzero(allowed & ordinary)
            tokens[i] = int(rng.choice(choices if len(choices) else np.flatnonzero(allowed)))

        timed("serial", "consume", partial(consume_serially, serial, tokens))
        timed("pipelined", "consume", partial(masks.consume, [(pipelined[i], token) for i, token in tokens.items()
                                                            if not pipelined[i].is_stopped()]))
        for i in range(n):
            if finished_at[i] is None:
                produced[i] += 1
                if tokens[i] in masks_eos(ids) or produced[i] >= args.max_new:
                    finished_at[i] = step
            elif step - finished_at[i] >= args.collect_every:  # collected, refilled with a fresh answer
                serial[i], pipelined[i] = masks.matcher(grammar), masks.matcher(grammar)
                produced[i], finished_at[i] = 0, None

    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({"wall_ms": phases, "cpu_ms": cpu}, f)
    rows = [summary(name, phases[name], args.forward_ms, masks.threads, args.steps) for name in ("serial", "pipelined")]
    for row, name in zip(rows, ("serial", "pipelined")):
        for phase, values in cpu[name].items():  # CPU time of all the process's threads: steadier on a busy host
            row[f"{phase}_cpu_ms_mean"] = round(float(np.mean(values)), 3)
        row.update(matchers=n, vocab=vocab, forward_ms=args.forward_ms, walk=args.walk,
                   first_masks_16_ms_mean=round(float(np.mean(first[name])), 3),
                   active_rows_mean=round(float(np.mean(active_rows)), 1),
                   setup_s=round(setup_s, 1), grammar_first_mask_s=round(first_compile_s, 2))
        print(json.dumps(row), flush=True)
    print("| path | threads | alloc ms | fill ms mean (CPU) | fill p50 | fill p90 | fill max | consume ms (CPU) | "
          f"exposed ms at a {args.forward_ms} ms forward (mean / p90) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['threads']} | {r.get('alloc_ms_mean', 0.0)} | {r['fill_ms_mean']} "
              f"({r['fill_cpu_ms_mean']}) | {r['fill_ms_p50']} | {r['fill_ms_p90']} | {r['fill_ms_max']} | "
              f"{r['consume_ms_mean']} ({r['consume_cpu_ms_mean']}) | {r['exposed_ms_mean']} / {r['exposed_ms_p90']} |")
    return rows


def consume_serially(matchers: list, tokens: dict[int, int]) -> None:
    for i, token in tokens.items():
        if not matchers[i].is_stopped():
            matchers[i].consume_token(token)


def masks_eos(ids: dict) -> set[int]:
    return {ids["<|endoftext|>"], ids["<|end|>"]}


if __name__ == "__main__":
    main()
