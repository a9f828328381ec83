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

from actors.collate import collate
from schemas.config import BatchingConfig, ModelConfig

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


def load_model(model_dir: str, modality: str, cfg: ModelConfig, device: torch.device):
    """The base model with the modality's adapter merged in (or attached, when merging is off)."""
    from transformers import AutoModelForCausalLM

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


class Phi4MMEngine:
    """Greedy batched generation over pre-built items (see pipeline/model_inputs.py)."""

    def __init__(self, model_dir: str, modality: str, model_cfg: ModelConfig, batching: BatchingConfig,
                 device: torch.device | None = None):
        from pipeline.model_inputs import load_processor

        self.device = device or pick_device()
        self.modality = modality
        self.batching = batching
        self.processor = load_processor(model_dir)
        self.model = load_model(model_dir, modality, model_cfg, self.device)
        self.dtype = next(self.model.parameters()).dtype
        tok = self.processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # random (test) weights can emit the placeholders; a real model never should: forbid them
        self.bad_words_ids = [[self.processor.image_token_id], [self.processor.audio_token_id]]

    def plan_batches(self, buckets: list[str], input_tokens: list[int], max_new: list[int]) -> list[list[int]]:
        """Group item indices: same bucket and token budget, similar prompt lengths, capped sizes."""
        order = sorted(range(len(buckets)), key=lambda i: (buckets[i], max_new[i], input_tokens[i]))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            same_kind = current and (buckets[current[0]], max_new[current[0]]) == (buckets[i], max_new[i])
            tokens = (len(current) + 1) * max(input_tokens[j] for j in current + [i])
            if current and (not same_kind or len(current) >= self.batching.max_batch_size
                            or tokens > self.batching.max_batch_tokens):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def generate_batch(self, items: list[dict[str, np.ndarray]], max_new_tokens: int,
                       min_new_tokens: int = 0) -> list[Generation]:
        start = time.perf_counter()
        batch = collate(items, self.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        for key in ("audio_input_features", "image_pixel_values"):
            if key in batch:
                batch[key] = batch[key].to(self.dtype)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  do_sample=False, bad_words_ids=self.bad_words_ids,
                                  pad_token_id=self.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        latency = time.perf_counter() - start
        results = []
        for row in new:
            ids = []
            for t in row:
                if t in self.eos_ids:
                    break
                ids.append(t)
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            results.append(Generation(ids, text, latency / len(new)))
        return results
