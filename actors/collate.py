"""Stack per-item model inputs into one batch, exactly as the processor would have batched them.

Text is left-padded (batched logits then equal single ones). Audio features and image crops are padded
the processor's way (zeros; masks). Audio of mixed lengths is exact only because the engine masks the
audio encoder's padding (actors/audio_padding.py; upstream it does not, shared/design/NOTES-phi4mm.md);
image batches hold one crop count (the scheduler's batch key).

For a GPU replica the features (the large part: 31 MB for 32 clips, ~600 MB for 12 pages in float32) can
be cast to the model's dtype here and written straight into pinned memory, one pass per item: the copy
to the GPU is then half as large and asynchronous. The cast is the one the GPU would do (float32 ->
bfloat16 rounds to nearest even on both), so the values are the same.
"""
from __future__ import annotations

import numpy as np
import torch


def _pad_stack(arrays: list[np.ndarray], value: float = 0.0) -> np.ndarray:
    """Right-pad along the first axis to the longest and stack."""
    longest = max(a.shape[0] for a in arrays)
    out = np.full((len(arrays), longest, *arrays[0].shape[1:]), value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


FEATURES = ("audio_input_features", "image_pixel_values")  # what `features_dtype` applies to


def collate(items: list[dict[str, np.ndarray]], pad_token_id: int, features_dtype: torch.dtype | None = None,
            pin: bool = False) -> dict[str, torch.Tensor]:
    """The batch as CPU tensors. `features_dtype`: the audio features and image crops in this dtype
    (None: as built, float32); `pin`: every tensor in pinned memory (for asynchronous copies to a GPU)."""
    lengths = [len(it["input_ids"]) for it in items]
    longest = max(lengths)
    input_ids = np.full((len(items), longest), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(items), longest), dtype=np.int64)
    for i, it in enumerate(items):
        input_ids[i, longest - lengths[i]:] = it["input_ids"]
        attention_mask[i, longest - lengths[i]:] = 1
    batch: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}

    if "audio_input_features" in items[0] and items[0]["audio_input_features"].ndim == 3:
        batch.update(_listed_audio(items))
    elif "audio_input_features" in items[0]:
        feats = [it["audio_input_features"] for it in items]
        batch["audio_input_features"] = _Padded(feats, 0.0)
        batch["audio_embed_sizes"] = np.stack([np.asarray(it["audio_embed_sizes"]) for it in items])
        frames = [f.shape[0] for f in feats]
        if len(items) > 1 and len(set(frames)) > 1:  # the processor adds this mask only for ragged batches
            batch["audio_attention_mask"] = np.arange(max(frames))[None, :] < np.asarray(frames)[:, None]
    if "image_pixel_values" in items[0] and items[0]["image_pixel_values"].ndim == 5:
        batch.update(_listed_images(items))
    elif "image_pixel_values" in items[0]:
        batch["image_pixel_values"] = _Padded([it["image_pixel_values"] for it in items], 0.0)
        batch["image_attention_mask"] = _pad_stack([it["image_attention_mask"] for it in items], 1)
        batch["image_sizes"] = np.stack([it["image_sizes"] for it in items])
    out = {}
    for k, v in batch.items():
        if isinstance(v, _Padded):
            out[k] = v.tensor(features_dtype if k in FEATURES else None, pin)
        else:
            t = torch.from_numpy(np.ascontiguousarray(v))
            out[k] = t.pin_memory() if pin else t
    return out


class _Padded:
    """Blocks to stack along the first axis, each right-padded along its first (`listed`: second) axis
    with `value`; made into one tensor only when its dtype and memory are known, each block written
    once (cast on the way)."""

    def __init__(self, blocks: list[np.ndarray], value: float, listed: bool = False):
        self.blocks = [b if listed else b[None] for b in blocks]
        self.value = value
        self.shape = (sum(b.shape[0] for b in self.blocks), max(b.shape[1] for b in self.blocks),
                      *self.blocks[0].shape[2:])

    def tensor(self, dtype: torch.dtype | None, pin: bool) -> torch.Tensor:
        if dtype is None and not pin:  # as built: numpy stacks it (no torch copy kernels per block)
            return torch.from_numpy(np.concatenate([_pad_axis1(b, self.shape[1], self.value) for b in self.blocks]))
        out = torch.empty(self.shape, dtype=dtype or torch.from_numpy(self.blocks[0][:0]).dtype, pin_memory=pin)
        row = 0
        for b in self.blocks:
            rows, n = b.shape[0], b.shape[1]
            out[row:row + rows, :n].copy_(torch.from_numpy(np.ascontiguousarray(b)))
            if n < self.shape[1]:
                out[row:row + rows, n:].fill_(self.value)
            row += rows
        return out


# A prompt's media (pipeline/model/inputs.py: InputBuilder.prompt_item) keep their leading axis, one entry
# per image or audio of the prompt; the model takes every image (audio) of a batch in one flat list, in
# prompt order, so a batch is the items' lists concatenated. Their batch key makes the padded shapes
# equal within a batch, so the padding below adds nothing that a single item would not have had.

def _pad_axis1(a: np.ndarray, size: int, value) -> np.ndarray:
    if a.shape[1] == size:
        return a
    out = np.full((a.shape[0], size, *a.shape[2:]), value, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _listed_images(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    crops = max(it["image_pixel_values"].shape[1] for it in items)
    return {
        "image_pixel_values": _Padded([it["image_pixel_values"] for it in items], 0.0, listed=True),
        "image_attention_mask": np.concatenate([_pad_axis1(it["image_attention_mask"], crops, 1)
                                                for it in items]),
        "image_sizes": np.concatenate([it["image_sizes"] for it in items]),
    }


def _listed_audio(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    frames = max(it["audio_input_features"].shape[1] for it in items)
    out = {
        "audio_input_features": _Padded([it["audio_input_features"] for it in items], 0.0, listed=True),
        "audio_embed_sizes": np.concatenate([np.atleast_1d(it["audio_embed_sizes"]) for it in items]),
    }
    if any("audio_attention_mask" in it or it["audio_input_features"].shape[1] != frames for it in items):
        masks = []
        for it in items:
            own = it.get("audio_attention_mask")
            if own is None:
                own = np.ones(it["audio_input_features"].shape[:2], dtype=bool)
            masks.append(_pad_axis1(own.astype(bool), frames, False))
        out["audio_attention_mask"] = np.concatenate(masks)
    return out
