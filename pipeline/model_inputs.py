"""Model inputs built on CPU, one item at a time, with the checkpoint's own processor.

The GPU actor only stacks them (`actors/collate.py`): feature extraction, image crops and tokenisation
never run on the GPU's critical path. An item travels through Ray as one pickled dict of numpy arrays
(`schemas/work_rows.py: encode_item`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.media import SAMPLE_RATE
from pipeline.prompts import chat_messages, prompt_messages
from schemas.work_rows import BatchKey


def load_processor(model_dir: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    # transformers 5.17 drops the processor's chat template on reload; the tokenizer keeps the same one
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = processor.tokenizer.chat_template
    return processor


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

    def prompt_item(self, images: list, audios: list[np.ndarray], instruction: str | None) -> BuiltItem:
        """One prompt over any mix of media (the prompt job): `images` in prompt order, then `audios`,
        then the instruction (None with audio: a spoken query).

        Unlike `audio` / `image`, the media keep their leading axis, one entry per image or audio of
        the prompt (image_pixel_values [images, crops, 3, 448, 448], audio_input_features [audios,
        frames, 80]); actors/collate.py concatenates them over a batch. The batch key holds the mix and
        the shapes that padding would change (images and their padded crop count, every audio's frames),
        so only prompts whose batched output equals their single output share a batch."""
        text = self.processor.apply_chat_template(
            prompt_messages(len(images), len(audios), instruction, self.system_prompt),
            add_generation_prompt=True, tokenize=False)
        media: dict = {}
        if images:
            media["images"] = list(images)
            if self.dynamic_hd is not None:
                media["dynamic_hd"] = self.dynamic_hd
        if audios:
            media.update(audio=list(audios), sampling_rate=SAMPLE_RATE)
        out = self.processor(text=[text], return_tensors="pt", **media)
        inputs = {k: v.numpy() for k, v in out.items() if hasattr(v, "numpy")}
        inputs["input_ids"] = inputs["input_ids"][0]
        inputs.pop("attention_mask", None)
        kind = []
        if images:
            kind.append(f"img{inputs['image_pixel_values'].shape[0]}x{inputs['image_pixel_values'].shape[1]}")
        if audios:
            frames = inputs["audio_input_features"].shape[1]
            mask = inputs.get("audio_attention_mask")
            lengths = mask.sum(-1).tolist() if mask is not None else [frames] * len(audios)
            kind.append("aud" + "-".join(str(int(n)) for n in lengths))
        key = BatchKey("prompt:" + "+".join(kind), 0) if kind else BatchKey("text", 0)
        return BuiltItem(inputs, key, int(inputs["input_ids"].shape[0]))
