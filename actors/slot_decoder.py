"""Fast greedy decoding: a static KV cache of `slots` sequences, one decode step replayed as a CUDA graph,
and finished slots refilled with new prompts (continuous batching).

Why not `generate`: per step it re-creates masks, positions and cache views in Python and launches a few
thousand small kernels; at large batches that overhead, and SDPA materialising the GQA key/value repeat,
dominate (28-36 ms per step on an H200 where the weights read in ~2 ms).

How it stays exact: the prefill's multimodal part (audio/image encoders and the embedding merge) is the
model's own code; its text decoder is the model's forward or, on GPU, the same arithmetic fused
(actors/fast_prefill.py). Decode steps are text-only and run the model's arithmetic as plain tensor
functions (actors/decode_step.py; compiled on GPU) with one difference: attention is a grouped matmul
over the static cache (no KV repeat), masked per slot, or FlexAttention over each slot's blocks. Each
slot holds its sequence from position 0, so positions equal those of an unpadded single-item run.

What a step reads: the host knows every slot's position (its prompt length plus the steps run since,
capped at its limit), so a step attends only cache columns [0, C) with C the highest position over the
occupied slots rounded up to `length_bucket`, and computes only slots [0, R) with R the highest occupied
slot rounded up to a power of two. One CUDA graph is captured per (R, C) met (with FlexAttention, per R:
it skips each slot's blocks past its position itself). Exact: the columns left out are masked for every
slot that is read, and masked columns contribute exactly 0; slots left out are free and never read.

Nothing here reads the device except `collect` (the slots' flags, then the finished slots' tokens) and
a constrained prefill (its first tokens, for the matchers).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from actors.decode_step import (FlexDecode, StepFunctions, attention, compile_count, masked_softmax, plain_layers,
                                split_rotate)

log = logging.getLogger(__name__)

SMALLEST_ROWS = 8  # the fewest slots a step computes (smaller graphs would not be faster)


@dataclass
class SlotRequest:
    index: int  # caller's item index
    prompt_len: int
    max_new: int
    min_new: int = 0
    matcher: object = None  # a grammar's matcher (actors/grammar.py): the tokens are constrained to it


@dataclass
class _Slot:
    request: SlotRequest


def rope_tables(model, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [0, length): the model's rotary module, called as decoding would call it.

    Longrope switches from the short to the long factors once a sequence passes the original context
    (4096 for Phi-4-mini); decode steps past that position use the long factors, as `generate` does.
    """
    rotary = model.model.rotary_emb
    config = model.config
    original = (config.rope_parameters or {}).get("original_max_position_embeddings") or \
        getattr(config, "original_max_position_embeddings", None) or length
    probe = torch.zeros(1, device=device, dtype=dtype)
    spans = [(0, min(length, original))] + ([(original, length)] if length > original else [])
    cos, sin = [], []
    for start, end in spans:
        c, s = rotary(probe, torch.arange(start, end, device=device)[None])
        cos.append(c[0])
        sin.append(s[0])
    return torch.cat(cos), torch.cat(sin)


def rounded_up(n: int, size: int, cap: int) -> int:
    """`n` rounded up to a multiple of `size` (0: no rounding, `cap`), at most `cap`."""
    return min(cap, size * -(-n // size)) if size else cap


def row_bucket(n: int, slots: int) -> int:
    """The slots a step computes when the highest occupied slot is n - 1: a power of two, capped."""
    rows = SMALLEST_ROWS
    while rows < n:
        rows *= 2
    return min(rows, slots)


class SlotDecoder:
    """Holds the static cache and the captured steps for one model replica.

    `compiled`: the step's per-layer elementwise work compiled by Inductor (None: on CUDA);
    `length_bucket`: attended cache columns are rounded up to a multiple of this (0: always the whole
    cache); `row_buckets`: a step computes only the slots up to the highest occupied one (rounded up to
    a power of two) instead of all; `attention`: "matmul" (grouped matmuls over the attended columns, a
    fused softmax) or "flex" (FlexAttention reading each slot's blocks up to its position; compiled steps
    only); `on_time(key, seconds)`: told the time spent compiling (`compile_s`) and capturing graphs
    (`capture_s`).
    """

    def __init__(self, model, slots: int, max_len: int, eos_ids: set[int], banned_ids: list[int],
                 use_cuda_graph: bool | None = None, fast_prefill=None, grammar=None, *,
                 compiled: bool | None = None, length_bucket: int = 256, row_buckets: bool = True,
                 attention: str = "matmul", on_time=None):
        self.model = model
        self.grammar = grammar  # actors/grammar.GrammarMasks, needed by requests with a matcher
        self.matchers: list = [None] * slots  # per slot: its request's matcher, or None
        self.logits_graph = None  # the step's first half (logits only), captured for constrained steps
        self.grammar_steps = None  # actors/grammar_pipeline.PipelinedConstrainedSteps, made when first used
        self.logits_out = None
        self.fast_prefill = fast_prefill  # actors/fast_prefill.FastPrefill, or None: the model's forward
        cfg = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.slots, self.max_len = slots, max_len
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.n_heads // self.n_kv
        self.scaling = self.head_dim ** -0.5
        dev, dt = self.device, self.dtype
        shape = (self.n_layers, slots, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=dt)
        self.v_cache = torch.zeros(shape, device=dev, dtype=dt)
        self.cos, self.sin = rope_tables(model, max_len, dev, dt)
        self.tokens = torch.zeros(slots, max_len, dtype=torch.long, device=dev)
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)  # position of each slot's last token
        self.limit = torch.zeros(slots, dtype=torch.long, device=dev)  # last position a token may take
        self.min_pos = torch.zeros(slots, dtype=torch.long, device=dev)  # eos banned before this position
        self.active = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.eos_ids = set(eos_ids)
        self.eos = torch.tensor(sorted(eos_ids), device=dev)
        self.banned = torch.tensor(banned_ids, device=dev, dtype=torch.long)
        self.rows = torch.arange(slots, device=dev)
        self.columns = torch.arange(max_len, device=dev)
        # a layer's cache viewed as rows of head_dim: slot s, kv head h, position p is row base[s, h] + p
        self.cache_base = (self.rows[:, None] * self.n_kv + torch.arange(self.n_kv, device=dev)) * max_len
        self.use_cuda_graph = (dev.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (rows, columns) -> captured step
        self._graph_pool = None  # one memory pool shared by all graphs (they never run at once)
        self._capture_stream = None
        self.occupant: list[_Slot | None] = [None] * slots
        # the host's view of each slot: occupied, its position (exact while active, an upper bound once
        # it stopped on the device) and its limit; what sizes each step without reading the device
        self.host_busy = np.zeros(slots, dtype=bool)
        self.host_pos = np.zeros(slots, dtype=np.int64)
        self.host_limit = np.zeros(slots, dtype=np.int64)
        self.length_bucket = length_bucket
        self.row_buckets = row_buckets
        self.on_time = on_time or (lambda key, seconds: None)
        if compiled is None:
            compiled = dev.type == "cuda"
        self.plain = plain_layers(model)  # else (an attached LoRA): the modules are called, eagerly
        self.fns = StepFunctions(compiled and self.plain)
        self.flex = FlexDecode(slots, max_len, self.pos, self.active) \
            if attention == "flex" and self.fns.compiled and FlexDecode.fits(max_len) else None
        if self.plain:
            self.weights = [(layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight,
                             layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                             layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)
                            for layer in model.model.layers]
            self.eps = model.model.norm.variance_epsilon

    @property
    def graph(self):
        """A captured step, if any was (the unconstrained steps ran as CUDA graphs)."""
        return next(iter(self.graphs.values()), None)

    # -- the decode step -------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, rows: int | None = None, columns: int | None = None) -> None:
        self._choose(self._logits(rows, columns))

    @torch.inference_mode()
    def _logits_step(self) -> None:
        self.logits_out.copy_(self._logits())

    @torch.inference_mode()
    def _logits(self, rows: int | None = None, columns: int | None = None) -> torch.Tensor:
        """The next-token logits (float32) of slots [0, rows), attending cache columns [0, columns);
        default: every slot over the whole cache. Columns past a slot's position are masked (they add
        exactly 0), so any `columns` above the positions of the slots that matter gives their logits."""
        rows = self.slots if rows is None else rows
        columns = self.max_len if columns is None else columns
        m = self.model.model
        hd = self.head_dim
        pos = self.pos[:rows]
        x = m.embed_tokens(self.tokens[:rows].gather(1, pos[:, None])[:, 0])  # [rows, hidden]
        cos, sin = self.cos[pos], self.sin[pos]
        valid = (self.columns[:columns] <= pos[:, None])[:, None, None, :]
        at = (self.cache_base[:rows] + pos[:, None]).view(-1)  # where each slot's new key goes, per kv head
        softmax = self.fns.softmax if self.plain else masked_softmax
        if self.flex is not None:
            self.flex.prepare()
        delta = None
        for i, layer in enumerate(m.layers):
            x, q, k, v = self._pre_attention(i, layer, x, delta, cos, sin)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            k_cache.view(-1, hd).index_copy_(0, at, k.reshape(-1, hd))
            v_cache.view(-1, hd).index_copy_(0, at, v.reshape(-1, hd))
            if self.flex is not None:
                out = self.flex(q, k_cache, v_cache, self.scaling)
            else:
                out = attention(q, k_cache[:rows], v_cache[:rows], columns, valid, self.scaling, softmax)
            x, delta = self._post_attention(i, layer, x, out)
        h = self.fns.final(x, delta, m.norm.weight, self.eps) if self.plain else m.norm(x + delta)
        return self.model.lm_head(h).float()

    def _pre_attention(self, i, layer, x, delta, cos, sin):
        if self.plain:
            ln1, qkv_w = self.weights[i][:2]
            return self.fns.pre(x, delta, cos, sin, ln1, qkv_w, self.eps, self.n_heads, self.n_kv, self.head_dim)
        if delta is not None:
            x = x + delta
        qkv = layer.self_attn.qkv_proj(layer.input_layernorm(x))
        return (x, *split_rotate(qkv, cos, sin, self.n_heads, self.n_kv, self.head_dim))

    def _post_attention(self, i, layer, x, out):
        if self.plain:
            o_w, ln2, gate_up_w, down_w = self.weights[i][2:]
            return self.fns.post(x, out, o_w, ln2, gate_up_w, down_w, self.eps)
        x = x + layer.self_attn.o_proj(out)
        return x, layer.mlp(layer.post_attention_layernorm(x))

    def _choose(self, logits: torch.Tensor) -> None:
        """Greedy choice for the first `len(logits)` slots; advance the active ones; retire those that
        finished."""
        # index_fill_/masked scalar ops only: an indexed assignment of a Python scalar copies a CPU
        # tensor to the GPU, which CUDA graph capture refuses
        r = logits.shape[0]
        pos, active, tokens = self.pos[:r], self.active[:r], self.tokens[:r]
        logits.index_fill_(1, self.banned, float("-inf"))
        next_pos = pos + 1
        too_early = (next_pos < self.min_pos[:r])[:, None]
        logits.index_copy_(1, self.eos, logits.index_select(1, self.eos).masked_fill(too_early, float("-inf")))
        nxt = logits.argmax(-1)
        write_at = next_pos.clamp(max=self.max_len - 1)[:, None]
        current = tokens.gather(1, write_at)[:, 0]
        tokens.scatter_(1, write_at, torch.where(active, nxt, current)[:, None])
        ended = torch.isin(nxt, self.eos)
        pos += active.long()
        active &= ~ended & (pos < self.limit[:r])

    # -- CUDA graphs -----------------------------------------------------------------------------
    def _pool_and_stream(self):
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream()
        return self._graph_pool, self._capture_stream

    def _captured(self, run) -> torch.cuda.CUDAGraph:
        """`run` warmed up twice on the capture stream (compiling what it needs), then captured; the
        slots' state is restored after (the cache writes are harmless: each step writes a slot's cache
        at its position before anything reads there)."""
        pool, stream = self._pool_and_stream()
        saved = [t.clone() for t in (self.pos, self.active, self.tokens)]
        started, compiles = time.perf_counter(), compile_count()
        try:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            warmed = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                run()
        finally:
            for t, s in zip((self.pos, self.active, self.tokens), saved):
                t.copy_(s)
        done = time.perf_counter()
        compiled = warmed - started if compile_count() > compiles else 0.0
        self.on_time("compile_s", compiled)
        self.on_time("capture_s", done - started - compiled)
        return graph

    def _capture(self, rows: int, columns: int) -> torch.cuda.CUDAGraph:
        try:
            graph = self._captured(lambda: self._step(rows, columns))
        except Exception as exc:  # noqa: BLE001 - a compiler problem must cost speed, not the run
            if self.flex is None and not self.fns.compiled:
                raise
            self._fall_back(exc)
            return self._capture(rows, columns)
        self.graphs[(rows, columns)] = graph
        return graph

    def _fall_back(self, exc: Exception) -> None:
        """One step down after a failure: FlexAttention -> matmul attention -> the eager step."""
        if self.flex is not None:
            log.warning("FlexAttention decode step failed (%s: %s); attending with matmuls", type(exc).__name__, exc)
            self.flex = None
        else:
            log.warning("compiled decode step failed (%s: %s); decoding with the eager step", type(exc).__name__, exc)
            self.fns = StepFunctions(compiled=False)

    def capture_all(self, rows: int | None = None) -> int:
        """Capture the step for every attended length at `rows` slots (default: all), so that decoding
        captures nothing later at that width; returns the graphs captured now."""
        if not self.use_cuda_graph:
            return 0
        rows = self.slots if rows is None else rows
        bucket = self.length_bucket if self.length_bucket and self.flex is None else self.max_len
        lengths = sorted({min(c, self.max_len) for c in range(bucket, self.max_len + bucket, bucket)})
        todo = [c for c in lengths if (rows, c) not in self.graphs]
        for columns in todo:
            self._capture(rows, columns)
        return len(todo)

    def _capture_logits(self) -> None:
        self.logits_out = torch.zeros(self.slots, self.model.lm_head.out_features, device=self.device,
                                      dtype=torch.float32)
        try:
            self.logits_graph = self._captured(self._logits_step)
        except Exception as exc:  # noqa: BLE001 - as in `_capture`
            if self.flex is None and not self.fns.compiled:
                raise
            self._fall_back(exc)
            self._capture_logits()

    @torch.inference_mode()
    def constrained_step(self) -> None:
        """One step with the grammar masks of the constrained slots. Pipelined (actors/grammar_pipeline.py)
        the host's grammar work runs under the next step's forward; else the serial step below."""
        steps = self._pipelined_steps()
        if steps is not None:
            steps.step()
        else:
            self._constrained_step_serial()

    def _pipelined_steps(self):
        """The pipelined constrained steps where the grammar masks want them (read at every step), made (on
        CUDA: captured and replayed once) at the first constrained step; None, after one warning, if that
        raised. Dropping them is safe at any step boundary: the matchers are up to date, and the serial
        step recomputes the forward they may have issued (whose only effect, each slot's cache entry at its
        position, is what that forward writes again)."""
        wanted = self.grammar.pipelined(self.device)
        if self.grammar_steps is not None and not wanted:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # its graphs' work done before they are freed
            self.grammar_steps = None
        if self.grammar_steps is None and wanted:
            from actors.grammar_pipeline import PipelinedConstrainedSteps

            try:
                self.grammar_steps = PipelinedConstrainedSteps(self, self.grammar)
            except Exception as exc:  # noqa: BLE001 - the serial step still decodes exactly
                self.grammar.pipeline_failure("its warm-up", exc)
        return self.grammar_steps

    def _constrained_step_serial(self) -> None:
        """Logits from the graph, the masks filled on the host and applied, then the same choice as
        `_choose`; the matchers then take the chosen tokens (the device is read after the choice)."""
        stats = self.grammar.stats
        started = time.perf_counter()
        if self.use_cuda_graph:
            if self.logits_graph is None:
                self._capture_logits()
            self.logits_graph.replay()
            logits = self.logits_out
        else:
            logits = self._logits()
        pairs = [(m, i) for i, m in enumerate(self.matchers) if m is not None]
        bitmask = self.grammar.bitmask(self.slots)
        self.grammar.fill(pairs, bitmask)
        filled = time.perf_counter()
        self.grammar.apply(logits, bitmask)
        was_active = self.active.clone()
        self._choose(logits)
        issued = time.perf_counter()
        chosen = self.tokens[self.rows, self.pos].tolist()
        active = was_active.tolist()
        stats["host_reads"] += 2
        waited = time.perf_counter()
        for m, i in pairs:
            if active[i] and not m.is_stopped():
                m.consume_token(chosen[i])
        stats["steps"] += 1
        stats["fill_s"] += filled - started
        stats["launch_s"] += issued - filled
        stats["wait_s"] += waited - issued
        stats["consume_s"] += time.perf_counter() - waited

    def step(self) -> None:
        # (a pipelined constrained step may have issued the next forward: its choice is a constrained step)
        if any(m is not None for m in self.matchers) or (self.grammar_steps is not None and self.grammar_steps.pending):
            self.constrained_step()
        elif not self.use_cuda_graph:
            self._step(*self.step_shape())
        else:
            shape = self.step_shape()
            (self.graphs.get(shape) or self._capture(*shape)).replay()
        self._advance()

    def step_shape(self) -> tuple[int, int]:
        """(slots, cache columns) the next step computes: up to the highest occupied slot, and past the
        highest position any occupied slot can have reached (host bookkeeping, no device read)."""
        busy = np.flatnonzero(self.host_busy)
        if not len(busy):
            return self.slots, self.max_len
        rows = row_bucket(int(busy[-1]) + 1, self.slots) if self.row_buckets else self.slots
        if self.flex is not None:  # it reads each slot's own blocks: one graph per width
            return rows, self.max_len
        return rows, rounded_up(int(self.host_pos[:rows].max()) + 1, self.length_bucket, self.max_len)

    def _advance(self) -> None:
        np.minimum(self.host_pos + self.host_busy, self.host_limit, out=self.host_pos)

    def steps_left(self) -> int:
        """Steps until the first occupied slot reaches its limit (0: one has; collect before stepping)."""
        if not self.host_busy.any():
            return 0
        return int((self.host_limit - self.host_pos)[self.host_busy].min())

    # -- slots -----------------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return np.flatnonzero(~self.host_busy).tolist()

    @torch.inference_mode()
    def prefill(self, batch: dict[str, torch.Tensor], requests: list[SlotRequest], slots: list[int]
                ) -> list[tuple[SlotRequest, list[int]]]:
        """Run the model's own forward over a left-padded batch, move its cache into the given slots.

        The slots' state is written on the device (no read back, unless a request has a grammar); a
        request finished by its first token (eos, or max_new == 1) is returned by the next `collect`.
        Returns [] (kept for callers that took finished requests from here).
        """
        from transformers import DynamicCache

        for req in requests:
            if req.prompt_len + req.max_new > self.max_len:
                raise ValueError(f"prompt of {req.prompt_len} tokens + {req.max_new} new exceeds the cache "
                                 f"({self.max_len})")
        mask = batch["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        width = mask.shape[1]
        if self.fast_prefill is not None and self.fast_prefill.supports(width):
            # each layer's keys/values go straight into the requests' slots (no stacked copy of them all)
            from actors.fast_prefill import slot_sink

            logits, keys, values = self.fast_prefill(batch, position_ids,
                                                     kv_sink=slot_sink(self.k_cache, self.v_cache, list(slots)))
        else:
            cache = DynamicCache()
            out = self.model(**batch, position_ids=position_ids, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            logits = out.logits[:, -1].float()
            keys = torch.stack([layer.keys for layer in cache.layers])  # [layers, n, kv, width, hd]
            values = torch.stack([layer.values for layer in cache.layers])
        slot_t, start, limit, min_pos, more, early = self._slot_state(requests, slots)
        logits.index_fill_(1, self.banned, float("-inf"))
        logits.index_copy_(1, self.eos, logits.index_select(1, self.eos).masked_fill(early.bool()[:, None],
                                                                                        float("-inf")))
        constrained = [(r.matcher, j) for j, r in enumerate(requests) if r.matcher is not None]
        if constrained:
            self.grammar.apply_first(logits, constrained)
        first = logits.argmax(-1)
        if constrained:  # the matchers take the first tokens on the host: the one read of a prefill
            chosen = first.tolist()
            self.grammar.consume([(matcher, chosen[j]) for matcher, j in constrained])
        for j, (req, slot) in enumerate(zip(requests, slots)):
            if keys is None:  # written by the fused prefill's sink already
                break
            n = req.prompt_len
            self.k_cache[:, slot, :, :n] = keys[:, j, :, width - n:]
            self.v_cache[:, slot, :, :n] = values[:, j, :, width - n:]
        self.tokens.index_put_((slot_t, start), first)
        self.pos.index_copy_(0, slot_t, start)
        self.limit.index_copy_(0, slot_t, limit)
        self.min_pos.index_copy_(0, slot_t, min_pos)
        self.active.index_copy_(0, slot_t, more.bool() & ~torch.isin(first, self.eos))
        for req, slot in zip(requests, slots):
            self.occupant[slot] = _Slot(req)
            self.matchers[slot] = req.matcher
            self.host_busy[slot] = True
            self.host_pos[slot] = req.prompt_len
            self.host_limit[slot] = req.prompt_len + req.max_new - 1
        if self.grammar_steps is not None:  # a forward issued before this prefill is stale for these slots
            self.grammar_steps.hold(list(slots))
        return []

    def _slot_state(self, requests: list[SlotRequest], slots: list[int]) -> torch.Tensor:  # [6, n]
        """Per request, on the device (one asynchronous copy from pinned memory): slot, prompt length
        (the first token's position), limit (the last position a token may take), the position before
        which eos is banned, whether it may take a second token, whether eos is banned at the first."""
        rows = np.array([[slot, r.prompt_len, r.prompt_len + r.max_new - 1, r.prompt_len + r.min_new,
                          r.max_new > 1, r.min_new > 0] for r, slot in zip(requests, slots)], dtype=np.int64)
        host = torch.from_numpy(np.ascontiguousarray(rows.T))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def collect(self) -> list[tuple[SlotRequest, list[int]]]:
        """Requests whose slot stopped: their generated tokens (the last may be eos); slots freed.
        Two device reads: the slots' flags and positions, then the finished slots' tokens."""
        if not self.host_busy.any():
            return []
        active, pos = torch.stack([self.active.long(), self.pos]).tolist()
        busy = np.flatnonzero(self.host_busy)
        # the slots still running: their positions as read (the host's bound may be ahead of a slot that
        # sat out a step), so every slot left has steps to run
        self.host_pos[busy] = np.asarray(pos)[busy]
        finished = [i for i in busy.tolist() if not active[i]]
        if not finished:
            return []
        end = max(pos[i] for i in finished) + 1
        rows = self.tokens[torch.tensor(finished, device=self.device), :end].tolist()
        out = []
        for i, row in zip(finished, rows):
            req = self.occupant[i].request
            out.append((req, row[req.prompt_len:pos[i] + 1]))
            self.occupant[i] = None
            self.matchers[i] = None
            self.host_busy[i] = False
            self.host_pos[i] = self.host_limit[i] = 0
        return out

    def busy(self) -> bool:
        return bool(self.host_busy.any())
