"""Mixed-length audio batches that give each clip's unbatched output: the conformer's padding, masked.

transformers 5.17's Phi-4-multimodal audio encoder (`Phi4MultimodalAudioModel`, see
shared/design/NOTES-phi4mm.md, "Batching pitfalls") does not mask padding: its boolean padding mask is
*added* to the attention bias (+1 for a real frame, +0 for a padded one, so padded frames are still
attended), and its subsampling convolutions read the padded frames next to a clip's end. A clip batched
with longer ones therefore came out different from the same clip alone.

`mask_audio_padding(model)` replaces the encoder's forward, on that model instance only, for ragged
batches (an `audio_attention_mask` with unequal lengths). Each clip then computes exactly what it
computes alone:
- subsampling: before each stride-2 convolution the frames past the clip's length at that stage are
  zeroed, which is what the convolution's own zero padding gives the clip alone;
- attention: keys past the clip's length get the dtype's lowest value added (softmax weight 0); for
  real keys the bias is the model's own, `streaming mask (as 1/0) + relative bias`;
- recordings longer than 500 subsampled frames (40 s) are cut by the model into 500-frame windows, the
  last one zero-padded and those zeros attended; a batched clip that long gets the same zeros at the same
  places, and only the keys past its own last window are masked.
Everything else in a conformer block is per frame (feed-forward, norms) or causal (the depthwise
convolution is left-padded and cut on the right), so padded frames cannot reach earlier ones there.

Single clips and equal-length batches (no mask, or a mask of equal lengths) run the model's own forward,
untouched. The placeholder count per clip (`audio_embed_sizes`) is the clip's own, set by the processor.
tests/test_audio_padding.py checks batched == unbatched on the tiny model, encoder outputs and tokens.

This is the reference path: `BatchingConfig.audio_encoder = "model"` (the default on CPU) runs it, and
the packed encoder (actors/audio_encoder.py, the default on GPU) falls back to it if it fails. It still
computes the padding and a dense [batch, heads, T, T] bias, which sends SDPA to its float32 math path.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

__all__ = ["mask_audio_padding"]

_WINDOW = 500  # Phi4MultimodalAudioModel.forward's `max_seq_len`: longer sequences are cut into windows


def mask_audio_padding(model: torch.nn.Module) -> int:
    """Install the masked ragged-batch forward on every audio encoder inside `model`; returns how many
    (0 for a model without one). Idempotent."""
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel

    count = 0
    for module in model.modules():
        if isinstance(module, Phi4MultimodalAudioModel):
            if not getattr(module, "_masks_padding", False):
                module.forward = types.MethodType(_forward, module)
                module._masks_padding = True
            count += 1
    return count


def _forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
    if mask is None:
        return type(self).forward(self, hidden_states, mask, **kwargs)
    lengths = mask.to(torch.long).sum(-1).reshape(-1)  # feature frames per clip
    if bool((lengths == hidden_states.shape[1]).all()):
        return type(self).forward(self, hidden_states, None, **kwargs)  # nothing padded: the model's own path
    return _ragged_forward(self, hidden_states, lengths)


def _time_mask(lengths: torch.Tensor, size: int, device) -> torch.Tensor:
    """[batch, size] True where the position lies inside the clip."""
    return torch.arange(size, device=device)[None, :] < lengths.to(device)[:, None]


def _subsample(embed, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi4MultimodalAudioNemoConvSubsampling.forward with each stride-2 convolution's input zeroed past
    the clip's length at that stage (lengths halve, rounding up, at each stride-2 convolution)."""
    h = x.unsqueeze(1)  # [b, 1, time, mel]
    for layer in embed.conv:
        if isinstance(layer, torch.nn.Conv2d) and layer.stride[0] == 2:
            h = h * _time_mask(lengths, h.shape[2], h.device)[:, None, :, None].to(h.dtype)
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
        h = layer(h)
    b, _, t, _ = h.shape
    return embed.out(h.transpose(1, 2).reshape(b, t, -1)), lengths


def _ragged_forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Phi4MultimodalAudioModel.forward (eval mode) for clips of unequal lengths, each as if alone."""
    x = self.encoder_embedding(features)
    x, sub = _subsample(self.embed, x, lengths)  # sub: subsampled frames per clip (= audio_embed_sizes)
    bs, seq_len, dim = x.shape
    device = x.device
    # the length each clip is computed over alone: its own, or its windows' when the model cuts it
    span = torch.where(sub > _WINDOW, torch.div(sub + _WINDOW - 1, _WINDOW, rounding_mode="floor") * _WINDOW, sub)
    x = x * _time_mask(sub, seq_len, device)[:, :, None].to(x.dtype)  # alone, those frames are zeros
    if seq_len > _WINDOW:
        pad = (-seq_len) % _WINDOW
        x = F.pad(x, (0, 0, 0, pad))
        windows = (seq_len + pad) // _WINDOW
        x = x.reshape(bs * windows, _WINDOW, dim)  # = the model's unfold_tensor: consecutive windows
        width = _WINDOW
        key_pos = torch.arange(windows * _WINDOW, device=device).reshape(windows, _WINDOW)
        valid = key_pos[None] < span.to(device)[:, None, None]  # [b, windows, width]
        valid = valid.reshape(bs * windows, width)
    else:
        width = seq_len
        valid = _time_mask(span, width, device)
    n = x.shape[0]
    streaming = self._streaming_mask(width, n, self.config.chunk_size, self.config.left_chunk).to(device)
    relative = self.relative_attention_bias_layer(x)  # [1, heads, width, width]
    bias = streaming.unsqueeze(1) + relative  # the model's own: bool mask + bias (True counts 1)
    lowest = torch.finfo(bias.dtype).min
    bias = bias.masked_fill(~valid[:, None, None, :], lowest)
    for layer in self.encoders:
        x = layer(x, bias)
    if seq_len > _WINDOW:
        x = x.reshape(bs, -1, dim)[:, :seq_len]
    return x

