"""Constrained decoding: llguidance's token masks for a JSON Schema grammar, applied to the logits.

Why llguidance (over xgrammar and outlines-core): one abi3 wheel (CPython 3.9+, so the same wheel on
this project's python3.11 CPU hosts and the GPU host's python3.12), no dependency on a torch build
(xgrammar's wheels follow torch versions), JSON Schema compiled lazily in Rust (no per-schema warm-up),
and `LLExecutor` fills many sequences' masks in parallel threads, so one step's masks for a whole batch
cost a fraction of a decode step.

How the static decoder uses them (actors/slot_decoder.py, actors/grammar_pipeline.py): the masks are
filled on the host into a persistent (pinned, on CUDA) bitmask, copied to a static device bitmask,
unpacked and applied to the logits, then the token is picked. Unconstrained slots get an all-ones row.
Pipelined, the host fills step t+1's masks while the GPU already runs step t+1's forward.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

PIPELINE_MODES = ("auto", "on", "off")


def default_grammar_threads() -> int:
    """llguidance's own default made explicit: 80 % of the CPUs this process may run on, 1 to 32."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(32, int(cpus * 0.8)))


def bit_shifts(device) -> torch.Tensor:
    return torch.arange(32, device=device, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, ceil(vocab/32)] int32 (bit j of word w: token 32w + j allowed) -> [rows, vocab] bool.
    (llguidance.torch.apply_token_bitmask_inplace does this too, but compiles a kernel per process
    first: ~5 s on CPU, for what is two tensor ops.)"""
    if shifts is None:
        shifts = bit_shifts(bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int, shifts: torch.Tensor | None = None
                  ) -> None:
    """-inf where `bitmask` (on the logits' device) forbids, in place; logits [rows, >= vocab]. Tensor ops
    with scalar fills only, so it can be captured in a CUDA graph."""
    allowed = unpack_bitmask(bitmask, vocab, shifts)
    logits[:, :vocab].masked_fill_(~allowed, float("-inf"))
    if logits.shape[1] > vocab:
        logits[:, vocab:] = float("-inf")


class HostBitmask:
    """A persistent host bitmask (pinned on CUDA, so its copy to the device is asynchronous), refilled in
    place: each fill writes the rows it is given and resets to all-allowed the rows the previous fill
    wrote and this one does not, so rows no fill names always allow everything."""

    def __init__(self, masks: GrammarMasks, rows: int, pin: bool):
        self.masks = masks
        self.tensor = torch.full((rows, masks.words), -1, dtype=torch.int32, pin_memory=pin)
        self.restricted: set[int] = set()
        self.copied = None  # CUDA event after the last copy out of `tensor`: a refill waits for it

    def fill(self, pairs: list[tuple[object, int]]) -> None:
        if self.copied is not None:
            self.copied.synchronize()  # (already complete where the caller waited on a later event)
            self.copied = None
        rows = {i for _, i in pairs}
        for row in self.restricted - rows:
            self.tensor[row].fill_(-1)
        self.masks.fill(pairs, self.tensor)
        self.restricted = rows

    def copy_to(self, device_bitmask: torch.Tensor, rows: int) -> None:
        """Copy the first `rows` rows into `device_bitmask` (asynchronous from pinned memory on CUDA)."""
        device_bitmask[:rows].copy_(self.tensor[:rows], non_blocking=True)
        if device_bitmask.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()


class GrammarMasks:
    """One replica's grammar machinery: the tokenizer as llguidance sees it, compiled grammars by their
    text, a thread pool for the masks and the tokens, and whether the static decoder pipelines its
    constrained steps (actors/grammar_pipeline.py)."""

    def __init__(self, hf_tokenizer, vocab: int, eos_ids: list[int], threads: int = 0, pipeline: str = "auto"):
        import llguidance
        import llguidance.hf

        if pipeline not in PIPELINE_MODES:
            raise ValueError(f"pipeline must be one of {PIPELINE_MODES}, not {pipeline!r}")
        self.vocab = vocab
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab, eos_token=sorted(eos_ids))
        self.threads = threads or default_grammar_threads()
        self.executor = llguidance.LLExecutor(num_threads=self.threads)
        self.words = (vocab + 31) // 32
        self.pipeline = pipeline
        self.pipeline_failed = False  # the pipelined path failed its warm-up: the serial one, for good
        self._fresh: dict[str, object] = {}  # grammar -> a matcher at its start, copied per sequence
        self._first: tuple[HostBitmask, torch.Tensor] | None = None  # the prefill's first-token masks
        self.stats = new_grammar_stats()

    def pipelined(self, device: torch.device) -> bool:
        """Whether the static decoder on `device` pipelines its constrained steps."""
        if self.pipeline_failed or self.pipeline == "off":
            return False
        return self.pipeline == "on" or device.type == "cuda"

    def pipeline_failure(self, where: str, exc: BaseException) -> None:
        """The pipelined path raised in its warm-up: one warning, the serial path for this replica's life."""
        self.pipeline_failed = True
        log.warning("pipelined constrained decoding failed in %s (%s: %s); using the serial constrained step "
                    "from now on", where, type(exc).__name__, exc)

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

    def consume(self, pairs: list[tuple[object, int]]) -> None:
        """Every (matcher, token): the matcher takes its token, the matchers in parallel threads (each
        matcher's result is what its own `consume_token` gives: a refused token leaves it in error)."""
        if len(pairs) > 1:
            self.executor.consume_token_par(pairs)
        elif pairs:
            matcher, token = pairs[0]
            matcher.consume_token(token)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """-inf where the bitmask forbids (in place); logits [rows, >= vocab] on any device."""
        apply_bitmask(logits, bitmask.to(logits.device, non_blocking=True), self.vocab)

    def apply_first(self, logits: torch.Tensor, pairs: list[tuple[object, int]]) -> None:
        """The masks of a prefill's first tokens: row `index` of `logits` for every (matcher, index), the
        other rows free. Pipelined, through a persistent pinned bitmask and an asynchronous copy (a fresh
        pageable one costs an allocation and a copy that waits for the prefill)."""
        rows = logits.shape[0]
        if self.pipelined(logits.device):
            try:
                host, device_bitmask, shifts = self._first_buffers(rows, logits.device)
            except Exception as exc:  # noqa: BLE001 - e.g. pinned memory refused: the serial path
                self.pipeline_failure("the first-token masks", exc)
            else:
                host.fill(pairs)
                host.copy_to(device_bitmask, rows)
                apply_bitmask(logits, device_bitmask[:rows], self.vocab, shifts)
                return
        bitmask = self.bitmask(rows)
        self.fill(pairs, bitmask)
        self.apply(logits, bitmask)

    def _first_buffers(self, rows: int, device: torch.device):
        if self._first is None or self._first[0].tensor.shape[0] < rows or self._first[1].device != device:
            size = max(rows, 32)
            self._first = (HostBitmask(self, size, pin=device.type == "cuda"),
                           torch.full((size, self.words), -1, dtype=torch.int32, device=device),
                           bit_shifts(device))
        return self._first


def new_grammar_stats() -> dict:
    """Where a replica's constrained decode steps spend their time, summed over steps. Host phases: fill
    (the masks; serial: while the forward runs), launch (serial: mask and choice issued; pipelined: copies,
    mask+choice and the next forward issued), wait (serial: its two reads; pipelined: the event after the
    choice), consume; `host_reads`: device reads. Pipelined on CUDA, the GPU's time from CUDA events:
    forward, mask+choice, and idle (from a forward's end to the mask copy after it: the GPU waiting for the
    host; steps with a prefill in that gap are left out); the graphs' capture (warm-up included), which
    lands in the decode time of the first constrained call of a decoder."""
    return {"steps": 0, "launch_s": 0.0, "wait_s": 0.0, "consume_s": 0.0, "fill_s": 0.0, "host_reads": 0,
            "held_slots": 0, "gpu_timed_steps": 0, "gpu_forward_s": 0.0, "gpu_choose_s": 0.0, "gpu_idle_s": 0.0,
            "gpu_idle_steps": 0, "capture_s": 0.0}


def grammar_stats_per_step(stats: dict) -> dict:
    """`new_grammar_stats` per step, in ms (the GPU ones per timed step), for a benchmark's row."""
    steps = max(1, stats["steps"])
    out = {"grammar_steps": stats["steps"], "grammar_host_reads_per_step": round(stats["host_reads"] / steps, 3),
           "grammar_held_slots": stats["held_slots"], "grammar_capture_s": round(stats["capture_s"], 3)}
    for key in ("launch_s", "wait_s", "consume_s", "fill_s"):
        out[f"grammar_{key[:-2]}_ms_per_step"] = round(1000 * stats[key] / steps, 3)
    for key, count in (("gpu_forward_s", "gpu_timed_steps"), ("gpu_choose_s", "gpu_timed_steps"),
                       ("gpu_idle_s", "gpu_idle_steps")):
        out[f"grammar_{key[:-2]}_ms_per_step"] = round(1000 * stats[key] / stats[count], 3) if stats[count] else None
    return out


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
