"""Constrained decoding: llguidance's token masks for a JSON Schema grammar, applied to the logits.

Why llguidance (over xgrammar and outlines-core): one abi3 wheel (CPython 3.9+, so the same wheel on
this project's python3.11 CPU hosts and the GPU host's python3.12), no dependency on a torch build
(xgrammar's wheels follow torch versions), JSON Schema compiled lazily in Rust (no per-schema warm-up),
and `LLExecutor` fills many sequences' masks in parallel threads, so one step's masks for a whole batch
cost a fraction of a decode step.

A mask is applied outside the captured CUDA graph (actors/slot_decoder.py): the graph computes logits,
the host fills the bitmask of each constrained slot, it is copied over and applied, then the token is
picked. Unconstrained slots get an all-ones row.
"""
from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, ceil(vocab/32)] int32 (bit j of word w: token 32w + j allowed) -> [rows, vocab] bool.
    (llguidance.torch.apply_token_bitmask_inplace does this too, but compiles a kernel per process
    first: ~5 s on CPU, for what is two tensor ops.)"""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


class GrammarMasks:
    """One replica's grammar machinery: the tokenizer as llguidance sees it, compiled grammars by their
    text, a thread pool for the masks."""

    def __init__(self, hf_tokenizer, vocab: int, eos_ids: list[int]):
        import llguidance
        import llguidance.hf

        self.vocab = vocab
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab, eos_token=sorted(eos_ids))
        self.executor = llguidance.LLExecutor()
        self.words = (vocab + 31) // 32
        self._fresh: dict[str, object] = {}  # grammar -> a matcher at its start, copied per sequence

    def matcher(self, grammar: str):
        """A fresh matcher (one per sequence) for a grammar made by `json_schema_grammar`: a copy of the
        grammar's first matcher, so the grammar is compiled once per replica, not once per sequence."""
        import llguidance

        fresh = self._fresh.get(grammar)
        if fresh is None:
            fresh = llguidance.LLMatcher(self.tokenizer, grammar)
            if fresh.is_error():
                raise ValueError(f"the grammar cannot be used: {fresh.get_error()}")
            self._fresh[grammar] = fresh
        return fresh.deep_copy()

    def bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, self.words), -1, dtype=torch.int32)

    def fill(self, pairs: list[tuple[object, int]], bitmask: torch.Tensor) -> None:
        """Fill row `index` of `bitmask` (CPU int32) for every (matcher, index); other rows are left."""
        from llguidance.torch import fill_next_token_bitmask_par

        if pairs:
            fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """-inf where the bitmask forbids (in place); logits [rows, >= vocab] on any device."""
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), self.vocab)
        logits[:, : self.vocab].masked_fill_(~allowed, float("-inf"))
        if logits.shape[1] > self.vocab:
            logits[:, self.vocab:] = float("-inf")


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of a JSON Schema (compact JSON: no free whitespace to wander in)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


class GrammarLogitsProcessor:
    """The same masks for transformers' `generate` (the CPU path): a LogitsProcessor over a batch whose
    rows each have a matcher or None. Rows that finished (eos, then padding) stop being constrained."""

    def __init__(self, masks: GrammarMasks, matchers: list):
        self.masks, self.matchers = masks, list(matchers)
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        else:
            last = input_ids[:, -1].tolist()
            for i, m in enumerate(self.matchers):
                if m is not None and (m.is_stopped() or not m.consume_token(last[i])):
                    self.matchers[i] = None  # finished or off the grammar (padding after eos)
        bitmask = self.masks.bitmask(scores.shape[0])
        self.masks.fill([(m, i) for i, m in enumerate(self.matchers) if m is not None], bitmask)
        scores = scores.clone()
        self.masks.apply(scores, bitmask)
        return scores
