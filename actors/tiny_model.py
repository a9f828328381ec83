"""A tiny, randomly initialised Phi-4-multimodal checkpoint built fully offline.

It has the same layout as the real one (native transformers format: config, safetensors, tokenizer,
processor, chat template, `speech-lora/` and `vision-lora/` PEFT adapters), so the project's loading
code is exercised unchanged; only the sizes differ. Its text is meaningless.

    phi4mm tiny-model DIR
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif item['type'] == 'audio' %}{{ '<|audio|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|image|>", "<|audio|>", "<|endofprompt|>", "<|assistant|>", "<|end|>",
                  "<|user|>", "<|system|>"]
# Text the byte-level BPE is trained on: the project's prompts and some call-centre speech, so that
# prompts tokenise into a realistic handful of tokens.
_CORPUS = [
    "Transcribe the audio clip into text.", "Translate the audio to French.", "Translate the audio to German.",
    "Extract all the text from this document page. Use Markdown for headings and tables.",
    "Summarize the following meeting transcript.", "You are a helpful assistant.",
    "Thank you for calling, how can I help you today?", "My order has not arrived yet.",
    "The quick brown fox jumps over the lazy dog.", "Please hold while I check your account.",
]
LORA_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"
ADAPTER_RANKS = {"speech-lora": 8, "vision-lora": 4}  # real checkpoint: 320 and 256, alpha = 2r


# the ids these tokens have in the real Phi-4-multimodal tokenizer
REAL_IDS = {"<|endoftext|>": 199999, "<|image|>": 200010, "<|audio|>": 200011, "<|endofprompt|>": 200018,
            "<|assistant|>": 200019, "<|end|>": 200020, "<|user|>": 200021, "<|system|>": 200022}
REAL_VOCAB_SIZE = 200064


def _build_tokenizer(real_ids: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(_CORPUS * 40, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    if real_ids:  # the real checkpoint's special-token ids, fillers in between (for real-shaped benchmarks)
        specials = dict(REAL_IDS)
        taken = set(specials.values())
        for i in range(len(vocab), max(taken) + 1):
            if i not in taken:
                vocab[f"<|reserved_{i}|>"] = i
    else:
        specials = {tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update(specials)
    tokenizer = GPT2Tokenizer(
        vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", add_prefix_space=False,
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
        padding_side="left", chat_template=CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"extra_special_tokens": SPECIAL_TOKENS[1:]}, replace_extra_special_tokens=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if ids != specials:
        raise RuntimeError(f"tokenizer special ids drifted: {ids} != {specials}")
    vocab_size = REAL_VOCAB_SIZE if real_ids else ((len(vocab) + 63) // 64) * 64
    return tokenizer, ids, vocab_size


def build_processor(real_ids: bool = False):
    """The byte-level tokenizer with the chat template and the real image/audio processors."""
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor, Phi4MultimodalProcessor

    tokenizer, ids, vocab_size = _build_tokenizer(real_ids)
    processor = Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(), audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return processor, ids, vocab_size


def _build_config(ids: dict[str, int], vocab_size: int):
    from transformers import Phi4MultimodalConfig

    # head_dim 16 -> 12 rotary dims with the real partial factor 0.75 -> 6 longrope factors
    return Phi4MultimodalConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        original_max_position_embeddings=4096, tie_word_embeddings=True,
        # a wide init (real: 0.02) makes greedy text depend on the input and rarely tie, so tests
        # that compare tokens between two code paths can fail when a path is wrong
        initializer_range=0.3,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0] * 6, "long_factor": [1.0] * 6},
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]],
        # 448/14/448 are hard-coded in the image processor (256 global tokens + separators): keep them
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=448, patch_size=14, crop_size=448, image_token_id=ids["<|image|>"]),
        # the conformer needs ext_pw_out_channel == depthwise_separable_out_channel == hidden_size
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=2,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                          audio_token_id=ids["<|audio|>"]),
    )


def _save_adapters(model, out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    for sub, rank in ADAPTER_RANKS.items():
        peft_model = get_peft_model(model, LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
            init_lora_weights=False))
        peft_model.save_pretrained(str(out / sub))
        model = peft_model.unload()


def build_tiny_model(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random checkpoint to `out` (replacing it) and return its path."""
    import torch
    from transformers import Phi4MultimodalForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    processor, ids, vocab_size = build_processor()
    config = _build_config(ids, vocab_size)
    model = Phi4MultimodalForCausalLM(config).to(torch.float32)
    # The real checkpoint normalises log-mel features with calibrated statistics; the defaults (0, 1)
    # leave features near 20 +- 3, which washes the input out of a random encoder.
    norm = model.model.embed_tokens_extend.audio_embed.encoder.encoder_embedding
    norm.global_mean.fill_(15.0)
    norm.global_invstd.fill_(0.25)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _save_adapters(model, out)
    (out / "TINY_RANDOM_MODEL.txt").write_text(
        "A tiny randomly initialised Phi-4-multimodal built offline by `phi4mm tiny-model`. "
        "Its outputs are meaningless; it exists to exercise the pipeline.\n")
    return out


def is_tiny_model(path: str | os.PathLike) -> bool:
    return (Path(path) / "TINY_RANDOM_MODEL.txt").exists()
