"""Fast greedy decoding: a static KV cache of `slots` sequences, one decode step replayed as a CUDA graph,
and finished slots refilled with new prompts (continuous batching).

Why not `generate`: per step it re-creates masks, positions and cache views in Python and launches a few
thousand small kernels; at large batches that overhead, and SDPA materialising the GQA key/value repeat,
dominate (../shared/design/NOTES-phi4mm.md: 28-36 ms per step where the weights read in ~2 ms).

How it stays exact: the prefill's multimodal part (audio/image encoders and the embedding merge) is the
model's own code; its text decoder is the model's forward or, on GPU, the same arithmetic fused
(actors/fast_prefill.py). Decode steps are text-only, and this module runs them with the model's
own modules (norms, projections, MLP, rotary table) and one difference: attention is written as a grouped
matmul over the static cache (no KV repeat), masked per slot. Each slot holds its sequence from position 0,
so positions equal those of an unpadded single-item run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


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
    first_token: int


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


class SlotDecoder:
    """Holds the static cache and the captured step for one model replica."""

    def __init__(self, model, slots: int, max_len: int, eos_ids: set[int], banned_ids: list[int],
                 use_cuda_graph: bool | None = None, fast_prefill=None, grammar=None):
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
        self.use_cuda_graph = (dev.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.graph = None
        self.occupant: list[_Slot | None] = [None] * slots

    # -- the decode step -------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self) -> None:
        self._choose(self._logits())

    @torch.inference_mode()
    def _logits_step(self) -> None:
        self.logits_out.copy_(self._logits())

    def _logits(self) -> torch.Tensor:
        """The next-token logits of every slot (float32), from the static cache."""
        m = self.model.model
        B = self.slots
        pos = self.pos
        tok = self.tokens[self.rows, pos]
        x = m.embed_tokens(tok)[:, None, :]  # [B, 1, H]
        cos = self.cos[pos][:, None, :]
        sin = self.sin[pos][:, None, :]
        valid = self.columns[None, :] <= pos[:, None]  # [B, L]
        bias = torch.zeros(B, 1, 1, self.max_len, device=self.device, dtype=torch.float32)
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        from transformers.models.phi4_multimodal.modeling_phi4_multimodal import apply_rotary_pos_emb

        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv * self.head_dim
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            qkv = attn.qkv_proj(h)
            q = qkv[..., :q_size].view(B, 1, self.n_heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_size:q_size + kv_size].view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
            v = qkv[..., q_size + kv_size:].view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k_cache[i][self.rows, :, pos] = k[:, :, 0]
            self.v_cache[i][self.rows, :, pos] = v[:, :, 0]
            qg = q.reshape(B, self.n_kv, self.groups, self.head_dim)
            scores = torch.matmul(qg, self.k_cache[i].transpose(-1, -2)).float() * self.scaling + bias
            probs = torch.softmax(scores, dim=-1).to(self.dtype)
            out = torch.matmul(probs, self.v_cache[i]).reshape(B, 1, q_size)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x)[:, 0]).float()

    def _choose(self, logits: torch.Tensor) -> None:
        """Greedy choice for every slot; advance the active ones; retire those that finished."""
        # index_fill_/masked scalar ops only: an indexed assignment of a Python scalar copies a CPU
        # tensor to the GPU, which CUDA graph capture refuses
        logits.index_fill_(1, self.banned, float("-inf"))
        next_pos = self.pos + 1
        too_early = (next_pos < self.min_pos)[:, None]
        logits.index_copy_(1, self.eos, logits.index_select(1, self.eos).masked_fill(too_early, float("-inf")))
        nxt = logits.argmax(-1)
        write_at = next_pos.clamp(max=self.max_len - 1)
        current = self.tokens[self.rows, write_at]
        self.tokens[self.rows, write_at] = torch.where(self.active, nxt, current)
        ended = torch.isin(nxt, self.eos)
        self.pos += self.active.long()
        self.active &= ~ended & (self.pos < self.limit)

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        saved = [t.clone() for t in (self.pos, self.active, self.tokens)]
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream, as graph capture requires
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for t, s in zip((self.pos, self.active, self.tokens), saved):
            t.copy_(s)

    def _capture_logits(self) -> None:
        self.logits_out = torch.zeros(self.slots, self.model.lm_head.out_features, device=self.device,
                                      dtype=torch.float32)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # the logits half writes the cache at each slot's position only: harmless
                self._logits_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.logits_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.logits_graph):
            self._logits_step()

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
            return
        if not self.use_cuda_graph:
            self._step()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()

    # -- slots -----------------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.occupant) if s is None]

    @torch.inference_mode()
    def prefill(self, batch: dict[str, torch.Tensor], requests: list[SlotRequest], slots: list[int]
                ) -> list[tuple[SlotRequest, list[int]]]:
        """Run the model's own forward over a left-padded batch, move its cache into the given slots.

        Returns the requests already finished by their first token (eos, or max_new == 1).
        """
        from transformers import DynamicCache

        mask = batch["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        width = mask.shape[1]
        if self.fast_prefill is not None and self.fast_prefill.supports(width):
            logits, keys, values = self.fast_prefill(batch, position_ids)
        else:
            cache = DynamicCache()
            out = self.model(**batch, position_ids=position_ids, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            logits = out.logits[:, -1].float()
            keys = torch.stack([layer.keys for layer in cache.layers])  # [layers, n, kv, width, hd]
            values = torch.stack([layer.values for layer in cache.layers])
        logits[:, self.banned] = float("-inf")
        early = torch.tensor([r.min_new > 0 for r in requests], device=self.device)[:, None]
        logits[:, self.eos] = torch.where(early, float("-inf"), logits[:, self.eos])
        constrained = [(r.matcher, j) for j, r in enumerate(requests) if r.matcher is not None]
        if constrained:
            self.grammar.apply_first(logits, constrained)
        first = logits.argmax(-1).tolist()
        if constrained:
            self.grammar.consume([(matcher, first[j]) for matcher, j in constrained])
        done = []
        for j, (req, slot) in enumerate(zip(requests, slots)):
            n = req.prompt_len
            if n + req.max_new > self.max_len:
                raise ValueError(f"prompt of {n} tokens + {req.max_new} new exceeds the cache ({self.max_len})")
            self.k_cache[:, slot, :, :n] = keys[:, j, :, width - n:]
            self.v_cache[:, slot, :, :n] = values[:, j, :, width - n:]
            self.tokens[slot, n] = first[j]
            finished = first[j] in self.eos_ids or req.max_new <= 1
            self.pos[slot] = n
            self.limit[slot] = n + req.max_new - 1
            self.min_pos[slot] = n + req.min_new
            self.active[slot] = not finished
            if finished:
                done.append((req, [first[j]]))
            else:
                self.occupant[slot] = _Slot(req, first[j])
                self.matchers[slot] = req.matcher
        if self.grammar_steps is not None:  # a forward issued before this prefill is stale for these slots
            self.grammar_steps.hold([slot for _, slot in zip(requests, slots)])
        return done

    def collect(self) -> list[tuple[SlotRequest, list[int]]]:
        """Requests whose slot stopped: their generated tokens (the last may be eos); slots freed."""
        active = self.active.tolist()
        finished = [i for i, s in enumerate(self.occupant) if s is not None and not active[i]]
        if not finished:
            return []
        pos = self.pos.tolist()
        out = []
        for i in finished:
            req = self.occupant[i].request
            tokens = self.tokens[i, req.prompt_len:pos[i] + 1].tolist()
            out.append((req, tokens))
            self.occupant[i] = None
            self.matchers[i] = None
        return out

    def busy(self) -> bool:
        return any(s is not None for s in self.occupant)
