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
from actors.fast_prefill import FastPrefill
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
        # where the static path's time goes, and the batches planned (their mean size)
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "oom_fallbacks": 0, "caches_built": 0,
                      "batches": 0, "batch_items": 0, "batches_full": 0}

    # -- scheduling ------------------------------------------------------------------------------
    def plan_batches(self, batch_keys: list[BatchKey], input_tokens: list[int], max_new: list[int]) -> list[list[int]]:
        """Group item indices: single audio clips of any lengths by prompt-token budget
        (`audio_batch_tokens`); other items by batch key and token budget, similar prompt lengths,
        capped sizes."""
        planned = self._plan(batch_keys, input_tokens, max_new)
        self.stats["batches"] += len(planned)
        self.stats["batch_items"] += sum(len(b) for b, _ in planned)
        self.stats["batches_full"] += sum(full for _, full in planned)
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
                self.stats["oom_fallbacks"] += 1
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
        batch = {k: v.to(self.device) for k, v in batch.items()}
        for key in ("audio_input_features", "image_pixel_values"):
            if key in batch:
                batch[key] = batch[key].to(self.dtype)
        return batch

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
        sized both); the current one is kept when it is long enough without being twice too long."""
        current = self._decoder
        if current is not None and max_len <= current.max_len <= 2 * max_len and current.slots >= slots:
            return current
        self._decoder = None
        _free_cuda_cache()
        self._decoder = SlotDecoder(self.model, slots, max_len, self.eos_ids, self.banned_ids,
                                    fast_prefill=self._fast_prefill())
        self.stats["caches_built"] += 1
        return self._decoder

    def _fast_prefill(self):
        mode = self.batching.prefill
        if mode == "model" or (mode == "auto" and self.device.type != "cuda"):
            return None
        if self._prefill_runner is None:
            self._prefill_runner = FastPrefill(self.model)
        return self._prefill_runner

    def _generate_static(self, decoder, items, plan: list[list[int]], max_new: list[int], min_new: int,
                         results: list) -> None:
        """Decode the items of `plan` (batches of indices) on `decoder`, filling `results` in place."""
        start = time.perf_counter()
        n = sum(len(g) for g in plan)
        tokens: dict[int, list[int]] = {}
        queue = [list(g) for g in plan]
        while queue or decoder.busy():
            free = decoder.free_slots()
            while queue and free and (len(free) >= min(len(queue[0]), self.batching.max_batch_size)
                                      or not decoder.busy()):
                group = queue[0][:len(free)]
                queue[0] = queue[0][len(free):]
                if not queue[0]:
                    queue.pop(0)
                started = time.perf_counter()
                prefilled = self._prefill(decoder, items, group, max_new, min_new, free[:len(group)])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.stats["prefill_s"] += time.perf_counter() - started
                for i, outcome in prefilled:
                    if isinstance(outcome, Exception):
                        results[i] = outcome
                    else:
                        tokens[i] = outcome
                free = decoder.free_slots()
            if decoder.busy():
                started = time.perf_counter()
                for _ in range(self.batching.check_every):
                    decoder.step()
                for req, toks in decoder.collect():  # reads device flags: synchronises
                    tokens[req.index] = toks
                self.stats["decode_s"] += time.perf_counter() - started
                self.stats["steps"] += self.batching.check_every
        latency = (time.perf_counter() - start) / max(1, n)
        for i, toks in tokens.items():
            results[i] = self._finish(toks, latency)

    def _prefill(self, decoder, items, group, max_new, min_new, slots):
        grammars = self._grammars or [None] * len(items)
        if any(grammars[i] for i in group) and decoder.grammar is None:
            decoder.grammar = self.grammar
        requests = [SlotRequest(i, len(items[i]["input_ids"]), max_new[i], min(min_new, max_new[i]),
                                self.grammar.matcher(grammars[i]) if grammars[i] else None)
                    for i in group]
        try:
            batch = self._to_device(collate([items[i] for i in group], self.pad_token_id))
            done = decoder.prefill(batch, requests, slots)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            if len(group) == 1:
                return [(group[0], exc)]
            _free_cuda_cache()
            return [pair for j, i in enumerate(group)
                    for pair in self._prefill(decoder, items, [i], max_new, min_new, [slots[j]])]
        return [(req.index, toks) for req, toks in done]


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
