"""One model replica: loads Phi-4-multimodal once, for one modality, and decodes batches greedily.

Per-modality weights: the speech LoRA (audio prompts) or the vision LoRA (image prompts) is merged into
the base weights at load time, so no adapter math runs per token; text-only prompts use the base
weights, as the model card prescribes. Native transformers classes only (no remote code).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from actors.audio_encoder import install_audio_encoder
from actors.collate import collate
from actors.decode_step import compile_count
from actors.fast_prefill import FastPrefill, PrefillOptions
from actors.kv_plan import KvPlan, plan_kv
from actors.slot_decoder import SlotDecoder, SlotRequest
from pipeline.model.inputs import load_processor
from actors.vision_encoder import install_vision_encoder
from schemas.config import BatchingConfig, ModelConfig
from schemas.work_rows import BatchKey

log = logging.getLogger(__name__)

ADAPTER_FOR_MODALITY = {"speech": "speech-lora", "vision": "vision-lora", "text": None}


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    latency_s: float


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_attention(cfg: ModelConfig) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def load_model(model_dir: str, modality: str, cfg: ModelConfig, device: torch.device,
               random_weights: bool = False):
    """The base model with the modality's adapter merged in (or attached, when merging is off);
    `random_weights` (benchmarks): the architecture with random weights, nothing read."""
    from transformers import AutoModelForCausalLM

    if random_weights:
        return random_model(model_dir, device, pick_dtype(cfg, device), pick_attention(cfg))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=pick_dtype(cfg, device), attn_implementation=pick_attention(cfg))
    adapter = ADAPTER_FOR_MODALITY[modality]
    if adapter is not None:
        adapter_dir = os.path.join(model_dir, adapter)
        if not os.path.isdir(adapter_dir):
            raise FileNotFoundError(f"{model_dir}: no {adapter}/ adapter folder for the {modality} replicas")
        if cfg.merge_adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        else:
            model.load_adapter(adapter_dir, adapter_name=modality)
            model.set_adapter(modality)
    return model.to(device).eval()


def random_model(model_dir: str, device: torch.device, dtype: torch.dtype, attn: str):
    """The checkpoint's architecture with random weights made on the device (benchmarks: real shapes,
    no 11 GB read). A merged LoRA changes values, not shapes or cost, so adapters are skipped."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    finally:
        torch.set_default_dtype(previous)
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
    return model.to(dtype).eval()


class Phi4MMEngine:
    """Greedy generation over pre-built items (see pipeline/model/inputs.py), for one modality."""

    def __init__(self, model_dir: str, modality: str, model_cfg: ModelConfig, batching: BatchingConfig,
                 device: torch.device | None = None, model=None, random_weights: bool = False):
        self.device = device or pick_device()
        self.model_dir = model_dir
        self.modality = modality
        self.batching = batching
        self.processor = load_processor(model_dir)
        self.model = model if model is not None else load_model(model_dir, modality, model_cfg, self.device,
                                                                      random_weights)
        # mixed-length audio batches give unbatched outputs (packed encoder on GPU: actors/audio_encoder.py)
        install_audio_encoder(self.model, batching.audio_encoder)
        install_vision_encoder(self.model, batching.vision_encoder)  # SigLIP up to the used layer only
        self.dtype = next(self.model.parameters()).dtype
        tok = self.processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # random (test) weights can emit the placeholders; a real model never should: forbid them
        self.banned_ids = [self.processor.image_token_id, self.processor.audio_token_id]
        self.bad_words_ids = [[t] for t in self.banned_ids]
        mode = batching.decoder
        self.use_static = mode == "static" or (mode == "auto" and self.device.type == "cuda")
        self._decoder = None
        self._prefill_runner = None  # actors/fast_prefill.FastPrefill, made with the first static decoder
        self._grammar = None  # actors/grammar.GrammarMasks, made with the first constrained item
        self._grammars: list[str | None] = []  # the current `generate` call's grammar per item
        self.stats = new_stats()

    def _add(self, key: str, value) -> None:
        """Adds to a stats counter (also to one a caller's reset left out)."""
        self.stats[key] = self.stats.get(key, 0) + value

    # -- scheduling ------------------------------------------------------------------------------
    def plan_batches(self, batch_keys: list[BatchKey], input_tokens: list[int], max_new: list[int]) -> list[list[int]]:
        """Group item indices: single audio clips of any lengths by prompt-token budget
        (`audio_batch_tokens`); other items by batch key and token budget, similar prompt lengths,
        capped sizes."""
        planned = self._plan(batch_keys, input_tokens, max_new)
        self._add("batches", len(planned))
        self._add("batch_items", sum(len(b) for b, _ in planned))
        self._add("batches_full", sum(full for _, full in planned))
        return [b for b, _ in planned]

    def _plan_batches(self, batch_keys: list[BatchKey], input_tokens: list[int], max_new: list[int]) -> list[list[int]]:
        return [b for b, _ in self._plan(batch_keys, input_tokens, max_new)]

    def _plan(self, batch_keys, input_tokens, max_new) -> list[tuple[list[int], bool]]:
        """(batch, whether a size limit closed it). Audio clips (batch key kind "audio") batch across
        lengths: the speech encoder packs them, so a batch costs its clips' own frames whatever their
        lengths (actors/audio_encoder.py; the masked model forward is exact too). They are taken in
        length order, so a batch also holds similar lengths for the decoder's padded prefill, and cut
        where the next one would pass `audio_batch_tokens` prompt tokens or `max_batch_tokens` padded
        ones; the static decoder takes each item's own max_new, `generate` one per batch (and at most
        `max_batch_size` items). Other items: one batch key and one max_new per batch, at most
        `max_batch_size` items and `max_batch_tokens` padded prompt tokens."""
        cfg = self.batching
        budget = cfg.audio_batch_tokens
        by_budget = {i for i, k in enumerate(batch_keys) if budget and getattr(k, "kind", None) == "audio"}
        one_max_new = not self.use_static  # `generate` decodes a batch to one max_new
        planned: list[tuple[list[int], bool]] = []

        def cut(order, same, full) -> None:
            current: list[int] = []
            for i in order:
                if current and (not same(current[0], i) or full(current, i)):
                    planned.append((current, same(current[0], i)))
                    current = []
                current.append(i)
            if current:
                planned.append((current, False))

        def padded_over(current, i) -> bool:
            return (len(current) + 1) * max(input_tokens[j] for j in current + [i]) > cfg.max_batch_tokens

        keyed = sorted((i for i in range(len(batch_keys)) if i not in by_budget),
                       key=lambda i: (batch_keys[i], max_new[i], input_tokens[i]))
        cut(keyed, lambda a, b: (batch_keys[a], max_new[a]) == (batch_keys[b], max_new[b]),
            lambda cur, i: len(cur) >= cfg.max_batch_size or padded_over(cur, i))
        audio = sorted(by_budget, key=lambda i: (max_new[i] if one_max_new else 0, input_tokens[i]))
        cut(audio, lambda a, b: not one_max_new or max_new[a] == max_new[b],
            lambda cur, i: (sum(input_tokens[j] for j in cur) + input_tokens[i] > budget or padded_over(cur, i)
                            or (one_max_new and len(cur) >= cfg.max_batch_size)))
        return planned

    @property
    def grammar(self):
        if self._grammar is None:
            from actors.grammar import GrammarMasks

            self._grammar = GrammarMasks(self.processor.tokenizer, self.model.lm_head.out_features,
                                         sorted(self.eos_ids), threads=self.batching.grammar_threads,
                                         pipeline=self.batching.grammar_pipeline)
        return self._grammar

    def generate(self, items: list[dict[str, np.ndarray]], batch_keys: list[BatchKey], max_new: list[int],
                 min_new: int = 0, grammars: list[str | None] | None = None) -> list[Generation | Exception]:
        """Generations for all items, in order; an item that fails on its own gets its exception (also
        one that cannot fit the model's context or the KV memory: it names its token count and the limit).
        `grammars`: per item, an llguidance grammar its tokens must follow (actors/grammar.py), or None."""
        self._grammars = grammars or [None] * len(items)
        input_tokens = [len(it["input_ids"]) for it in items]
        kv = self.plan_kv(input_tokens, max_new)
        results: list[Generation | Exception] = [None] * len(items)  # type: ignore[list-item]
        for i, why in kv.refused.items():
            results[i] = ValueError(why)
        if self.use_static:
            try:
                for group in kv.groups:
                    index = list(group.items)
                    plan = [[index[j] for j in batch] for batch in self.plan_batches(
                        [batch_keys[i] for i in index], [input_tokens[i] for i in index], [max_new[i] for i in index])]
                    self._generate_static(self.decoder_for(group.max_len, group.slots), items, plan, max_new,
                                          min_new, results)
                return results
            except torch.cuda.OutOfMemoryError:
                log.warning("static decoder out of memory; falling back to generate for this call")
                self._add("oom_fallbacks", 1)
                self._decoder = None
                _free_cuda_cache()
        todo = [i for i in range(len(items)) if i not in kv.refused]
        plan = self.plan_batches([batch_keys[i] for i in todo], [input_tokens[i] for i in todo],
                                 [max_new[i] for i in todo])
        for group in plan:
            group = [todo[j] for j in group]
            for i, gen in self._generate_group(items, group, max_new[group[0]], min_new):
                results[i] = gen
        return results

    # -- memory ----------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Bytes of static cache per position of one sequence (keys and values, every layer)."""
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * self.dtype.itemsize

    def kv_budget_bytes(self) -> int:
        """What the static caches may take: a fraction of the GPU memory free besides the current cache
        (the rest is the prefill's working memory); on CPU, what `decode_slots` full-context slots take."""
        per_token = self.kv_bytes_per_token()
        if self.device.type != "cuda":
            return self.batching.decode_slots * self.context_tokens() * per_token
        free, _ = torch.cuda.mem_get_info(self.device)
        held = self._decoder.slots * self._decoder.max_len * per_token if self._decoder is not None else 0
        return int((free + held) * self.batching.kv_cache_fraction)

    def context_tokens(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 131072))

    def plan_kv(self, input_tokens: list[int], max_new: list[int]) -> KvPlan:
        return plan_kv(input_tokens, max_new, bytes_per_token=self.kv_bytes_per_token(),
                       budget_bytes=self.kv_budget_bytes(), max_slots=self.batching.decode_slots,
                       context=self.context_tokens())

    def _generate_group(self, items, group: list[int], max_new: int, min_new: int):
        try:
            grammars = [self._grammars[i] for i in group] if self._grammars else None
            gens = self.generate_batch([items[i] for i in group], max_new, min(min_new, max_new), grammars)
            return list(zip(group, gens))
        except Exception as exc:  # noqa: BLE001 - one bad row must not sink its batch
            if len(group) == 1:
                return [(group[0], exc)]
            log.warning("batch of %d failed (%s); retrying row by row", len(group), exc)
            _free_cuda_cache()
            return [pair for i in group for pair in self._generate_group(items, [i], max_new, min_new)]

    # -- transformers generate ------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on the device, features in the model's dtype (a no-op cast when `_collate` cast
        them); copies from pinned memory are asynchronous."""
        batch = {k: v.to(self.device, non_blocking=v.is_pinned()) for k, v in batch.items()}
        for key in FEATURE_KEYS:
            if key in batch:
                batch[key] = batch[key].to(self.dtype)
        return batch

    def _collate(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """`collate` for this replica: on CUDA (BatchingConfig.pinned_inputs) the features cast to the
        model's dtype on the host (the same round-to-nearest-even as the GPU's cast: half the bytes to
        copy) and every tensor in pinned memory, so the copies to the GPU are asynchronous."""
        if self.device.type != "cuda" or not self.batching.pinned_inputs:
            return collate(items, self.pad_token_id)
        return collate(items, self.pad_token_id, features_dtype=self.dtype, pin=True)

    @torch.inference_mode()
    def generate_batch(self, items: list[dict[str, np.ndarray]], max_new_tokens: int,
                       min_new_tokens: int = 0, grammars: list[str | None] | None = None) -> list[Generation]:
        start = time.perf_counter()
        batch = self._to_device(collate(items, self.pad_token_id))
        extra = {}
        if grammars and any(grammars):
            from transformers import LogitsProcessorList

            from actors.grammar import GrammarLogitsProcessor

            matchers = [self.grammar.matcher(g) if g else None for g in grammars]
            extra["logits_processor"] = LogitsProcessorList([GrammarLogitsProcessor(self.grammar, matchers)])
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  do_sample=False, bad_words_ids=self.bad_words_ids,
                                  pad_token_id=self.pad_token_id, **extra)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        latency = (time.perf_counter() - start) / len(new)
        return [self._finish(row, latency) for row in new]

    def _finish(self, token_ids: list[int], latency: float) -> Generation:
        ids = []
        for t in token_ids:
            if t in self.eos_ids:
                break
            ids.append(t)
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Generation(ids, text, latency)

    # -- static cache + CUDA graph + continuous batching ------------------------------------------
    def decoder_for(self, max_len: int, slots: int):
        """A static decoder of at least `slots` slots for sequences up to `max_len` (actors/kv_plan.py
        sized both). The current one is kept whenever it is that large: a step reads only the slots and
        cache columns in use (actors/slot_decoder.py), so a larger cache costs memory, not time, and
        keeping it keeps its captured graphs. A new one covers the current one's shape too when the
        memory budget holds both (caches only grow, so calls of alternating shapes stop rebuilding)."""
        current = self._decoder
        if current is not None and current.max_len >= max_len and current.slots >= slots:
            return current
        if current is not None:
            both = max(max_len, current.max_len), max(slots, current.slots)
            if both[0] * both[1] * self.kv_bytes_per_token() <= self.kv_budget_bytes():
                max_len, slots = both
        self._decoder = None
        _free_cuda_cache()
        b = self.batching
        compiled = None if b.decode_step == "auto" else b.decode_step == "compiled"
        self._decoder = SlotDecoder(self.model, slots, max_len, self.eos_ids, self.banned_ids,
                                    fast_prefill=self._fast_prefill(), compiled=compiled,
                                    length_bucket=b.decode_length_bucket, row_buckets=b.decode_row_buckets,
                                    attention="flex" if b.decode_attention == "flex" else "matmul",
                                    on_time=self._add)
        self._add("caches_built", 1)
        return self._decoder

    def _fast_prefill(self):
        mode = self.batching.prefill
        if mode == "model" or (mode == "auto" and self.device.type != "cuda"):
            return None
        if self._prefill_runner is None:
            self._prefill_runner = FastPrefill(self.model, options=PrefillOptions.from_batching(self.batching))
        return self._prefill_runner

    def _generate_static(self, decoder, items, plan: list[list[int]], max_new: list[int], min_new: int,
                         results: list) -> None:
        """Decode the items of `plan` (batches of indices) on `decoder`, filling `results` in place.

        Between looks at the device (`collect`, which reads it), the decoder runs `check_every` steps, or
        fewer when an occupied slot reaches its token limit sooner (known on the host), so no slot idles
        past its limit. Times come from CUDA events on the stream, read once at the end."""
        start = time.perf_counter()
        n = sum(len(g) for g in plan)
        tokens: dict[int, list[int]] = {}
        queue = [list(g) for g in plan]
        clock = StreamClock(self.device)
        while queue or decoder.busy():
            free = decoder.free_slots()
            while queue and free and (len(free) >= min(len(queue[0]), self.batching.max_batch_size)
                                      or not decoder.busy()):
                group = queue[0][:len(free)]
                queue[0] = queue[0][len(free):]
                if not queue[0]:
                    queue.pop(0)
                started, compiles = clock.mark(), compile_count()
                prefilled = self._prefill(decoder, items, group, max_new, min_new, free[:len(group)], clock)
                clock.add("compile_s" if compile_count() > compiles else "prefill_s", started, clock.mark())
                for i, outcome in prefilled:
                    if isinstance(outcome, Exception):
                        results[i] = outcome
                    else:
                        tokens[i] = outcome
                free = decoder.free_slots()
            if decoder.busy():
                steps = min(self.batching.check_every, decoder.steps_left())
                started, aside = clock.mark(), self._time_aside()
                for _ in range(steps):
                    self._add("attended_columns", decoder.step_shape()[1])
                    decoder.step()
                clock.add("decode_s", started, clock.mark(), less=self._time_aside() - aside)
                for req, toks in decoder.collect():  # reads device flags: synchronises
                    tokens[req.index] = toks
                self._add("steps", steps)
        for key, seconds in clock.read().items():
            self._add(key, seconds)
        latency = (time.perf_counter() - start) / max(1, n)
        for i, toks in tokens.items():
            results[i] = self._finish(toks, latency)

    def _time_aside(self) -> float:
        """Seconds so far spent compiling and capturing graphs (not decoding, though it happens in a step)."""
        return self.stats.get("compile_s", 0.0) + self.stats.get("capture_s", 0.0)

    def _prefill(self, decoder, items, group, max_new, min_new, slots, clock=None):
        """Prefill `group` into `slots`; returns (item, error) for items that failed alone (a batch that
        fails is retried item by item: counted in prefill_retries and logged once)."""
        clock = clock or StreamClock(self.device)
        grammars = self._grammars or [None] * len(items)
        if any(grammars[i] for i in group) and decoder.grammar is None:
            decoder.grammar = self.grammar
        requests = [SlotRequest(i, len(items[i]["input_ids"]), max_new[i], min(min_new, max_new[i]),
                                self.grammar.matcher(grammars[i]) if grammars[i] else None)
                    for i in group]
        try:
            started = time.perf_counter()
            host = self._collate([items[i] for i in group])
            self._add("collate_s", time.perf_counter() - started)
            copy_start = clock.mark()
            batch = self._to_device(host)
            clock.add("h2d_s", copy_start, clock.mark())
            self._add("prefill_calls", 1)
            done = decoder.prefill(batch, requests, slots)
            self._add("prefill_items", len(group))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            if len(group) == 1:
                return [(group[0], exc)]
            self._add("prefill_retries", 1)
            log.warning("prefill of a batch of %d failed (%s: %s); retrying it item by item", len(group),
                        type(exc).__name__, exc)
            _free_cuda_cache()
            return [pair for j, i in enumerate(group)
                    for pair in self._prefill(decoder, items, [i], max_new, min_new, [slots[j]], clock)]
        return [(req.index, toks) for req, toks in done]

    # -- warm-up ---------------------------------------------------------------------------------
    def warm_up(self, items: list[dict[str, np.ndarray]], max_new: int, *, call_items: int | None = None,
                grammar: str | None = None) -> float:
        """Pay a replica's one-time costs before its first call, on items like those it will get
        (`items`: one or a few built prompts, e.g. a full-length audio chunk with its instruction):

        - the static cache a call of `call_items` such items (default `decode_slots`) with `max_new` new
          tokens each needs (kv_plan.py: the same plan a real call makes, so the call keeps it);
        - the compiled prefill, run once on a full prefill batch of them (`max_batch_size` or what
          `max_batch_tokens` holds), and one decode step at that width;
        - the decode step's CUDA graph for every attended length of that cache at all its slots;
        - with `grammar`, the constrained path (its grammar compiled, its logits graph captured).

        The time is counted in `warmup_s` (its compiling and capturing also in `compile_s` and
        `capture_s`), not in prefill_s / decode_s. Only the static decoder warms up (on CPU with
        `decoder="generate"` there is nothing to warm). A failure is logged once and costs only the
        warm-up. Returns the seconds spent."""
        if not self.use_static or not items or not self.batching.warm_up:
            return 0.0
        started = time.perf_counter()
        kept = {k: self.stats.get(k, 0) for k in WARM_UP_HIDES}
        try:
            prompt = max(len(it["input_ids"]) for it in items)
            calls = call_items or self.batching.decode_slots
            kv = self.plan_kv([prompt] * calls, [max_new] * calls)
            if kv.refused:
                log.warning("warm-up skipped: %s", next(iter(kv.refused.values())))
                return 0.0
            group = kv.groups[0]
            decoder = self.decoder_for(group.max_len, group.slots)
            width = max(1, min(self.batching.max_batch_size, decoder.slots, self.batching.max_batch_tokens // prompt))
            batch = [items[k % len(items)] for k in range(width)]
            self._generate_static(decoder, batch, [list(range(width))], [min(2, max_new)] * width, 0, [None] * width)
            decoder.capture_all()
            if grammar:  # after the unconstrained graphs: a failing fast path is dropped there first
                self._grammars = [grammar] * width
                self._generate_static(decoder, batch, [list(range(width))], [min(2, max_new)] * width, 0,
                                      [None] * width)
        except Exception as exc:  # noqa: BLE001 - warming up must never cost the replica
            log.warning("warm-up failed (%s: %s); the first call pays its one-time costs", type(exc).__name__, exc)
            _free_cuda_cache()
        finally:
            self._grammars = []
            self.stats.update(kept)
        spent = time.perf_counter() - started
        self._add("warmup_s", spent)
        return spent


# counters a warm-up leaves as they were: its prefill and decode are not the job's
WARM_UP_HIDES = ("prefill_s", "decode_s", "steps", "prefill_calls", "prefill_items", "collate_s", "h2d_s",
                 "attended_columns", "batches", "batch_items", "batches_full")

FEATURE_KEYS = ("audio_input_features", "image_pixel_values")


def new_stats() -> dict:
    """The engine's counters, cumulative over the replica's life (the stage reports them as engine_*):

    prefill_s, decode_s: time of the static path's prefills and decode steps (CUDA events on the stream;
      neither includes compiling, capturing graphs or warming up);
    warmup_s: time in `warm_up`; compile_s: time of prefills and graph warm-ups during which Dynamo
      compiled something (in warm-up or later); capture_s: capturing decode graphs;
    collate_s: host time stacking items; h2d_s: time of the host-to-device copies (part of prefill_s);
    prefill_calls, prefill_items: prefill batches run and items in them; prefill_retries: batches that
      failed and were retried item by item;
    steps: decode steps; attended_columns: their attended cache columns summed (/ steps: columns a step
      reads per slot with matmul attention; with FlexAttention the whole cache, of which it reads each
      slot's blocks up to its position);
    caches_built, oom_fallbacks; batches, batch_items, batches_full: the prefill batches planned.
    """
    return {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "oom_fallbacks": 0, "caches_built": 0,
            "batches": 0, "batch_items": 0, "batches_full": 0, "warmup_s": 0.0, "compile_s": 0.0,
            "capture_s": 0.0, "prefill_calls": 0, "prefill_items": 0, "prefill_retries": 0, "collate_s": 0.0,
            "h2d_s": 0.0, "attended_columns": 0}


class StreamClock:
    """Times phases of the work on the current CUDA stream with events (no host sync: read once, at the
    end), or with the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object, float]] = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, key: str, start, end, less: float = 0.0) -> None:
        """Counts the span start..end (two marks) in `key`, less `less` seconds spent on something else."""
        self.spans.append((key, start, end, less))

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, start, end, less in self.spans:
            if self.cuda:
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                seconds = end - start
            out[key] = out.get(key, 0.0) + max(0.0, seconds - less)
        self.spans.clear()
        return out


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
