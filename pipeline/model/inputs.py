"""Model inputs built on CPU, one item at a time, with the checkpoint's own processor.

The GPU actor only stacks them (`actors/collate.py`): feature extraction, image crops and tokenisation
never run on the GPU's critical path. An item travels through Ray as one pickled dict of numpy arrays
(`schemas/work_rows.py: encode_item`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.media.audio import SAMPLE_RATE
from pipeline.model.prompts import chat_messages, prompt_messages
from schemas.work_rows import BatchKey, encode_item

FEATURE_FRAMES_PER_S = 100  # the feature extractor's hop: 160 samples at 16 kHz
DEFAULT_AUDIO_BUCKET_S = 2.0  # schemas/config.py AudioConfig.batch_bucket_s


def load_processor(model_dir: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    # transformers 5.17 drops the processor's chat template on reload; the tokenizer keeps the same one
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = processor.tokenizer.chat_template
    return processor


_HOLE = "\u2063PHI4MM-INSTRUCTION\u2063"  # where the instruction goes in the chat prompt (never in a real one)

# the image processor's crop (Phi4MultimodalImageProcessor: 448x448 RGB, float32, one 32x32 patch mask
# per crop, ~273 prompt tokens per crop): what one crop of a page costs as prepared features
IMAGE_CROP_BYTES = 3 * 448 * 448 * 4 + 32 * 32 * 4 + 273 * 8


def max_page_feature_bytes(dynamic_hd: int) -> int:
    """The most one page's prepared features can take: `dynamic_hd` crops and the global view."""
    return (dynamic_hd + 1) * IMAGE_CROP_BYTES


@dataclass(frozen=True)
class BuiltItem:
    inputs: dict[str, np.ndarray]  # per-item arrays, no batch dimension
    batch_key: BatchKey  # items batch together only under one key (audio length bucket / crop count)
    input_tokens: int


class InputBuilder:
    """Turns (media, instruction) into the processor's per-item arrays."""

    def __init__(self, model_dir: str, system_prompt: str | None = None, dynamic_hd: int | None = None,
                 audio_bucket_s: float = DEFAULT_AUDIO_BUCKET_S, *, processor=None, load_now: bool = True):
        """`processor`: one already loaded from `model_dir` (a replica's engine holds one) instead of a
        second copy; `load_now=False`: load it on first use, for a stage that may never build an input in
        a run (loading imports torch and transformers, ~4.3 s of one core; the driver has checked that it
        loads before any worker starts, jobs/runner.py)."""
        self.model_dir = model_dir
        self.system_prompt = system_prompt
        self.dynamic_hd = dynamic_hd
        self._added_ids: frozenset[int] | None = None
        self.audio_bucket_frames = max(1, int(round(audio_bucket_s * FEATURE_FRAMES_PER_S)))
        self._processor = processor if processor is not None or not load_now else load_processor(model_dir)

    @property
    def processor(self):
        """The checkpoint's processor (loaded here if the builder was made with `load_now=False`)."""
        if self._processor is None:
            self._processor = load_processor(self.model_dir)
        return self._processor

    def prompt(self, instruction: str, media: str | None, system_prompt: str | None = None) -> str:
        """The chat prompt; `system_prompt` (when given) instead of the builder's own system message."""
        return self.processor.apply_chat_template(
            chat_messages(instruction, media, system_prompt or self.system_prompt), add_generation_prompt=True,
            tokenize=False)

    def _run(self, prompt: str, **media) -> dict[str, np.ndarray]:
        out = self.processor(text=[prompt], return_tensors="pt", **media)
        return {k: v[0].numpy() for k, v in out.items() if hasattr(v, "numpy")}

    def audio(self, audio: np.ndarray, instruction: str) -> BuiltItem:
        inputs = self._run(self.prompt(instruction, "audio"), audio=[audio], sampling_rate=SAMPLE_RATE)
        inputs.pop("attention_mask", None)  # rebuilt when batching
        inputs.pop("audio_attention_mask", None)
        frames = int(inputs["audio_input_features"].shape[0])
        return BuiltItem(inputs, BatchKey("audio", audio_bucket(frames, self.audio_bucket_frames)),
                         int(inputs["input_ids"].shape[0]))

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

    def text_pieces(self, pieces: list[str | list[int]], system_prompt: str | None = None) -> BuiltItem:
        """A text prompt whose instruction is `pieces` in order: strings are tokenised, lists of token
        ids (text the model generated, `prompt_ids`) go in as they are, never decoded and tokenised
        again. Summaries of transcripts use it: a transcript is the ids the speech pool generated, so
        its length in the prompt is what was generated, and the long texts are never re-tokenised.
        `system_prompt`: this prompt's system message instead of the builder's (--extract's schema)."""
        prompt = self.prompt(_HOLE, None, system_prompt)
        before, after = prompt.split(_HOLE)
        ids = self.token_ids(before)
        for piece in pieces:
            ids += self.token_ids(piece) if isinstance(piece, str) else list(piece)
        ids += self.token_ids(after)
        return BuiltItem({"input_ids": np.asarray(ids, dtype=np.int64)}, BatchKey("text", 0), len(ids))

    def token_ids(self, text: str) -> list[int]:
        """`text`'s token ids as the processor gives them for a prompt (no special tokens added)."""
        return list(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, generated: list[int]) -> list[int]:
        """Generated ids fit to go back into a prompt: the tokenizer's added tokens (end markers, media
        placeholders, tool tags) dropped, as decoding with skip_special_tokens drops them from the text."""
        if self._added_ids is None:
            self._added_ids = frozenset(self.processor.tokenizer.added_tokens_decoder)
        return [t for t in generated if t not in self._added_ids]


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


def audio_bucket(frames: int, bucket_frames: int) -> int:
    """The batch key's size for a clip of `frames` feature frames: the end of its bucket on a grid of
    `bucket_frames` (a 12.34 s clip -> 1400 on the 2 s grid). The clip keeps its own features and its own
    placeholder count; the key only says which clips may share a batch. Mixed lengths inside one batch
    are exact because the GPU side masks the audio encoder's padding (actors/audio_padding.py); the
    grid bounds the padding a batch carries (at most one bucket's width per clip)."""
    return -(-frames // bucket_frames) * bucket_frames


SAMPLES = "samples"  # BatchKey kind of a chunk that still holds its audio samples


def samples_item(audio: np.ndarray) -> tuple[BatchKey, bytes]:
    """A chunk's audio as it travels to BuildChunkFeatures (float32 16 kHz samples, exact)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    return BatchKey(SAMPLES, int(audio.shape[0])), encode_item({"samples": audio})
