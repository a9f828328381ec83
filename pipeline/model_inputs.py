"""Model inputs built on CPU, one item at a time, with the checkpoint's own processor.

The GPU actor only stacks them (`actors/collate.py`): feature extraction, image crops and tokenisation
never run on the GPU's critical path. An item travels through Ray as one pickled dict of numpy arrays
(`schemas/work_rows.py: encode_item`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.media import SAMPLE_RATE
from pipeline.prompts import chat_messages
from schemas.work_rows import BatchKey


def load_processor(model_dir: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    # transformers 5.17 drops the processor's chat template on reload; the tokenizer keeps the same one
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = processor.tokenizer.chat_template
    return processor


# the image processor's crop (Phi4MultimodalImageProcessor: 448x448 RGB, float32, one 32x32 patch mask
# per crop, ~273 prompt tokens per crop): what one crop of a page costs as prepared features
IMAGE_CROP_BYTES = 3 * 448 * 448 * 4 + 32 * 32 * 4 + 273 * 8


def max_page_feature_bytes(dynamic_hd: int) -> int:
    """The most one page's prepared features can take: `dynamic_hd` crops and the global view."""
    return (dynamic_hd + 1) * IMAGE_CROP_BYTES


@dataclass(frozen=True)
class BuiltItem:
    inputs: dict[str, np.ndarray]  # per-item arrays, no batch dimension
    batch_key: BatchKey  # items batch together only under one key (equal audio length / crop count)
    input_tokens: int


class InputBuilder:
    """Turns (media, instruction) into the processor's per-item arrays."""

    def __init__(self, model_dir: str, system_prompt: str | None = None, dynamic_hd: int | None = None):
        self.processor = load_processor(model_dir)
        self.system_prompt = system_prompt
        self.dynamic_hd = dynamic_hd

    def prompt(self, instruction: str, media: str | None) -> str:
        return self.processor.apply_chat_template(
            chat_messages(instruction, media, self.system_prompt), add_generation_prompt=True, tokenize=False)

    def _run(self, prompt: str, **media) -> dict[str, np.ndarray]:
        out = self.processor(text=[prompt], return_tensors="pt", **media)
        return {k: v[0].numpy() for k, v in out.items() if hasattr(v, "numpy")}

    def audio(self, audio: np.ndarray, instruction: str) -> BuiltItem:
        inputs = self._run(self.prompt(instruction, "audio"), audio=[audio], sampling_rate=SAMPLE_RATE)
        inputs.pop("attention_mask", None)  # rebuilt when batching
        inputs.pop("audio_attention_mask", None)
        frames = inputs["audio_input_features"].shape[0]
        return BuiltItem(inputs, BatchKey("audio", int(frames)), int(inputs["input_ids"].shape[0]))

    def image(self, image, instruction: str) -> BuiltItem:
        kwargs = {"images": [image]}
        if self.dynamic_hd is not None:
            kwargs["dynamic_hd"] = self.dynamic_hd
        inputs = self._run(self.prompt(instruction, "image"), **kwargs)
        inputs.pop("attention_mask", None)
        crops = inputs["image_pixel_values"].shape[0]
        return BuiltItem(inputs, BatchKey("image", int(crops)), int(inputs["input_ids"].shape[0]))

    def text(self, instruction: str) -> BuiltItem:
        inputs = self._run(self.prompt(instruction, None))
        inputs.pop("attention_mask", None)
        return BuiltItem(inputs, BatchKey("text", 0), int(inputs["input_ids"].shape[0]))
