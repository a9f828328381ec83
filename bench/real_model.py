"""Phi-4-multimodal at its real size with random weights, for benchmarks on the GPU host (no weights there).

The shapes follow ../shared/design/NOTES-phi4mm.md: 24 heads of 128, 8 KV heads, 32 layers, hidden 3072, FFN 8192,
vocab 200064, tied embeddings, longrope with partial rotary 0.75; SigLIP vision and the conformer audio
encoder at their defaults. The tokenizer is the project's byte-level one with the real special-token ids.
"""
from __future__ import annotations

import os

import torch

ROTARY_PAIRS = 48  # 128 * 0.75 / 2


def real_config():
    from transformers import Phi4MultimodalConfig

    from actors.tiny_model import REAL_IDS, REAL_VOCAB_SIZE

    return Phi4MultimodalConfig(
        vocab_size=REAL_VOCAB_SIZE, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
        original_max_position_embeddings=4096, tie_word_embeddings=True,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0 + 0.02 * i for i in range(ROTARY_PAIRS)],
                         "long_factor": [1.0 + 0.5 * i for i in range(ROTARY_PAIRS)]},
        bos_token_id=REAL_IDS["<|endoftext|>"], pad_token_id=REAL_IDS["<|endoftext|>"],
        eos_token_id=[REAL_IDS["<|endoftext|>"], REAL_IDS["<|end|>"]],
        vision_config={"image_token_id": REAL_IDS["<|image|>"]},
        audio_config={"audio_token_id": REAL_IDS["<|audio|>"]},
    )


def write_bench_checkpoint(path: str) -> str:
    """config.json + processor + generation config: what `random_weights=True` loading needs."""
    from transformers import GenerationConfig

    from actors.tiny_model import build_processor

    os.makedirs(path, exist_ok=True)
    config = real_config()
    config.save_pretrained(path)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                     bos_token_id=config.bos_token_id).save_pretrained(path)
    processor, _, _ = build_processor(real_ids=True)
    processor.save_pretrained(path)
    return path


def random_real_model(path: str, device: str = "cuda", dtype=torch.bfloat16):
    from actors.engine import random_model

    return random_model(path, torch.device(device), dtype, "sdpa")


def bench_model(ckpt: str, tiny: bool):
    """The model a bench script times: the tiny checkpoint on CPU (smoke tests of the scripts), else the
    real shapes with random bf16 weights on the GPU. Writes what `ckpt` needs either way."""
    if tiny:
        from transformers import AutoModelForCausalLM

        from actors.tiny_model import build_tiny_model

        build_tiny_model(ckpt)
        return AutoModelForCausalLM.from_pretrained(ckpt).eval()
    write_bench_checkpoint(ckpt)
    return random_real_model(ckpt)


def save_random_lora(model, path: str, subfolder: str, rank: int) -> str:
    """A random LoRA of the real rank (speech 320, vision 256), saved where the card recipe loads it."""
    from peft import LoraConfig, get_peft_model

    from actors.tiny_model import LORA_TARGETS

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS,
                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    out = os.path.join(path, subfolder)
    peft_model.save_pretrained(out)
    peft_model.unload()
    return out
