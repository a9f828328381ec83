"""The speech encoder (transformers' `Phi4MultimodalAudioModel.forward`) re-implemented for packed clips.

One implementation for equal, ragged and packed batches: the clips of a batch are laid end to end on the
time axis (packed), so no frame of one clip reaches another and no padding is computed, and each clip's
output is the output it gets alone.

Why: profiling the asr prefill on an H200 showed the model's encoder at 3.75 ms per 30 s clip against a
~0.6 ms arithmetic ceiling. Its attention adds a materialised [batch, 16, T, T] bias, which sends SDPA to
its float32 math fallback (f32 GEMMs, a `where`, a separate softmax); its 1x1 convolutions run as cuDNN
convolutions at ~110 TFLOP/s with permute copies around them; its norms, activations and residuals run
as separate kernels. And its padding is not masked (a clip batched with longer ones changes; see
actors/audio_padding.py), so mixed lengths had to be masked and still paid for the padding.

Here:
- 1x1 convolutions are `F.linear` on [frames, channels] (no permutes); the causal depthwise convolution
  (kernel 3) is shifted multiply-adds; the front end's stride-2 convolutions are strided multiply-adds in
  channels-last layout, its 1x1 convolutions linears; all of it plain tensor functions of (activations,
  weights) that torch.compile fuses on CUDA (one compiled function shared by all 24 blocks: the weights
  are arguments) and that run eagerly elsewhere.
- Attention is FlexAttention: a `score_mod` looks the model's relative-position bias up per (head,
  distance) instead of reading a dense bias, and a block-sparse mask keeps each query inside its own
  segment (a clip, or one 500-frame window of a longer clip), so the cost follows the sum of squared
  segment lengths. It replicates the model's arithmetic: the model adds its boolean streaming mask to the
  bias as a number (True counts +1, False +0; nothing is masked by it) in the bias dtype, so the table
  holds `bias + 1` (and `bias + 0` where a streaming chunk limit applies) rounded to that dtype.
- Packing (`plan_layout`): in the front end (the stride-2 convolutions read each frame's neighbours) each
  clip starts on a multiple of the time reduction (8) and is followed by enough zero frames that every
  stride-2 convolution reads zeros past its ends, the frames between clips are zeroed before each stride-2
  convolution (the clip alone reads the convolution's own zero padding there), and the subsampled frames
  are then gathered into segments with no gaps: the causal depthwise convolution of the blocks drops the
  taps that would reach before a segment's start (alone, those read zero padding).
- Clips longer than 500 subsampled frames (40 s) are cut by the model into 500-frame windows that it
  computes as separate sequences, the last one padded with zero frames that take part in attention; here
  each window is a segment of 500 frames, the last one with those zero frames.

Inputs arrive as the model takes them (padded `audio_input_features` [clips, frames, 80] and, for
unequal lengths, `audio_attention_mask`); the output has the model's shape ([clips, ceil(frames / 8),
hidden]), each clip's frames first and zeros after them (what the embedding merge reads is each clip's
own count, `audio_embed_sizes`). The one host synchronisation is reading the clip lengths.

`install_audio_encoder(model, mode)` puts this in front of the model's forward; on CUDA it compiles, and
if its first use raises (or disagrees with the reference path on that first batch) it logs one warning
and the replica keeps the previous path (actors/audio_padding.py) for the rest of its life.
"""
from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from actors.audio_padding import _forward as reference_forward
from actors.audio_padding import mask_audio_padding

__all__ = ["PackedAudioEncoder", "PackedLayout", "SegmentAttention", "conformer_block", "device_layout",
           "install_audio_encoder", "plan_layout", "warm_up_audio_encoder"]

log = logging.getLogger(__name__)

WINDOW = 500  # Phi4MultimodalAudioModel.forward's `max_seq_len`: longer sequences are cut into windows
GRANULE = 128  # the packed block-domain length is a multiple of the attention's sparse block size
# the first CUDA batch is also run on the reference path; a relative (Frobenius) difference above this
# means the fast path is wrong, not rounded differently (bf16 over 24 blocks stays well under it)
VERIFY_TOLERANCE = 0.1


# -- layout ------------------------------------------------------------------------------------------

@dataclass
class PackedLayout:
    """Where each clip's frames live in the packed front end and in the packed blocks (host arrays)."""
    lengths: np.ndarray  # feature frames per clip
    frames: np.ndarray  # subsampled frames per clip: ceil(length / reduction) (= audio_embed_sizes)
    front_starts: np.ndarray  # each clip's first frame in the packed feature row (multiples of reduction)
    front_len: int  # the packed feature row's length (a multiple of reduction)
    stage_masks: list[np.ndarray]  # per stride-2 convolution: 1 where its input frame belongs to a clip
    seg_starts: np.ndarray  # block domain: each segment's first frame (clips <= window, or windows)
    seg_lens: np.ndarray
    clip_block_starts: np.ndarray  # block domain: each clip's first frame
    tokens: int  # block-domain length: the segments, then zero frames up to a multiple of GRANULE

    @property
    def real_frames(self) -> int:
        return int(self.frames.sum())

    @property
    def padding_fraction(self) -> float:
        """1 - real subsampled frames / frames the blocks compute (window zeros and the tail)."""
        return 1.0 - self.real_frames / self.tokens

    @property
    def front_padding_fraction(self) -> float:
        """1 - real feature frames / frames the front end computes (the gaps between clips)."""
        return 1.0 - float(self.lengths.sum()) / self.front_len


def _ceil_div(a, b):
    return -(-a // b)


def _intervals(starts: np.ndarray, lens: np.ndarray, size: int) -> np.ndarray:
    """[size] float32: 1 inside [start, start + len) for each pair, else 0."""
    edges = np.zeros(size + 1, np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lens, -1)
    return (np.cumsum(edges[:-1]) > 0).astype(np.float32)


def plan_layout(lengths, reduction: int = 8, window: int = WINDOW, granule: int = GRANULE) -> PackedLayout:
    """The packed layout of clips of `lengths` feature frames (see the module docstring)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    stages = int(round(math.log2(reduction)))
    half = reduction // 2
    frames = _ceil_div(lengths, reduction)
    # span: enough that at every stride-2 convolution's input a zero frame follows the clip (the last
    # convolution's input is the tightest: ceil(length / half) frames + 1, in units of `half`), rounded
    # up so the next clip starts on a multiple of `reduction` (every stage then halves evenly)
    spans = reduction * _ceil_div(_ceil_div(lengths, half) + 1, 2)
    front_starts = np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)
    front_len = int(spans.sum())
    stage_masks = [_intervals(front_starts >> k, _ceil_div(lengths, 1 << k), front_len >> k)
                   for k in range(stages)]
    windows = np.where(frames > window, _ceil_div(frames, window), 1)
    seg_lens = np.where(frames > window, window, frames)
    seg_lens = np.repeat(seg_lens, windows)
    seg_starts = np.concatenate([[0], np.cumsum(seg_lens)[:-1]]).astype(np.int64)
    clip_extent = np.where(frames > window, windows * window, frames)
    clip_block_starts = np.concatenate([[0], np.cumsum(clip_extent)[:-1]]).astype(np.int64)
    # at least two blocks: a compiled kernel specialises sizes of 1, which would cost a second compile
    tokens = max(2 * granule, int(_ceil_div(int(clip_extent.sum()), granule) * granule))
    return PackedLayout(lengths, frames, front_starts, front_len, stage_masks, seg_starts, seg_lens,
                        clip_block_starts, tokens)


@dataclass
class DeviceLayout:
    """The index tensors one packed forward needs, on the device."""
    feature_src: torch.Tensor  # [front_len]: row of the flattened padded features (or the zero row)
    stage_masks: list[torch.Tensor]  # [front_len >> k, 1, 1]
    block_src: torch.Tensor  # [tokens]: row of the front end's output (or the zero row)
    seg_ids: torch.Tensor  # [tokens] int32: segment of each frame (the tail is one more segment)
    positions: torch.Tensor  # [tokens] int32: frame index within its segment
    out_src: torch.Tensor  # [clips * out_frames]: block-domain row of each output frame (or the zero row)
    kv_blocks: tuple[torch.Tensor, ...]  # partial and full kv block counts and indices (flex BlockMask)
    positions_host: np.ndarray  # `positions` on the host


def device_layout(layout: PackedLayout, padded_frames: int, out_frames: int, device, dtype,
                  reduction: int = 8, block: int = GRANULE) -> DeviceLayout:
    lengths, frames = layout.lengths, layout.frames
    clips = len(lengths)
    # front end: packed row frame -> padded features row b * padded_frames + t (zero row: clips * padded)
    feature_src = np.full(layout.front_len, clips * padded_frames, np.int64)
    total = int(lengths.sum())
    local = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    feature_src[np.repeat(layout.front_starts, lengths) + local] = \
        np.repeat(np.arange(clips) * padded_frames, lengths) + local
    # blocks: block-domain frame -> front-end output row (zero row: front_len // reduction)
    tokens = layout.tokens
    front_rows = layout.front_len // reduction
    block_src = np.full(tokens, front_rows, np.int64)
    local = np.arange(int(frames.sum())) - np.repeat(np.cumsum(frames) - frames, frames)
    block_src[np.repeat(layout.clip_block_starts, frames) + local] = \
        np.repeat(layout.front_starts // reduction, frames) + local
    n_seg = len(layout.seg_lens)
    seg_ids = np.full(tokens, n_seg, np.int32)  # the tail: a segment of its own
    seg_ids[:int(layout.seg_lens.sum())] = np.repeat(np.arange(n_seg, dtype=np.int32), layout.seg_lens)
    tail = int(layout.seg_lens.sum())
    starts = np.append(layout.seg_starts, tail)
    positions = (np.arange(tokens) - starts[seg_ids]).astype(np.int32)
    # output: [clips, out_frames] -> block-domain frame (zero row: tokens)
    out_src = np.full((clips, out_frames), tokens, np.int64)
    j = np.arange(out_frames)[None, :]
    inside = j < frames[:, None]
    out_src[inside] = (layout.clip_block_starts[:, None] + j)[inside]
    kv = _kv_blocks(seg_ids, block)

    def put(a, dtype=None):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype, non_blocking=True)

    return DeviceLayout(put(feature_src), [put(m, dtype).view(-1, 1, 1) for m in layout.stage_masks], put(block_src),
                        put(seg_ids), put(positions), put(out_src.reshape(-1)), tuple(put(a) for a in kv),
                        positions)


def _kv_blocks(seg_ids: np.ndarray, block: int):
    """Block-sparse structure of 'a query sees the keys of its own segment' over [tokens] frames in
    blocks of `block`: (partial counts, partial indices, full counts, full indices) shaped as
    BlockMask.from_kv_blocks takes them ([1, 1, q blocks] and [1, 1, q blocks, kv blocks])."""
    n = len(seg_ids) // block
    tiles = seg_ids.reshape(n, block)
    lo, hi = tiles[:, 0], tiles[:, -1]  # segment ids grow along the row: a tile spans [lo, hi]
    touches = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])  # some segment in both tiles
    uniform = lo == hi
    full = uniform[:, None] & uniform[None, :] & (lo[:, None] == lo[None, :])
    partial = touches & ~full

    def listed(m):
        counts = m.sum(1).astype(np.int32)
        order = np.argsort(~m, axis=1, kind="stable").astype(np.int32)  # True columns first, in order
        return counts[None, None], order[None, None]

    pc, pi = listed(partial)
    fc, fi = listed(full)
    return pc, pi, fc, fi


# -- the model's arithmetic as tensor functions --------------------------------------------------------

def _act(name: str):
    from transformers.activations import ACT2FN

    return {"swish": F.silu, "silu": F.silu, "relu": F.relu}.get(name) or ACT2FN[name]


def front_end(raw, mean, invstd, masks, first_w, first_b, stages, out_w, out_b, act):
    """Phi4MultimodalAudioMeanVarianceNormLayer + Phi4MultimodalAudioNemoConvSubsampling over one packed
    feature row raw [frames, mel] in channels-last layout ([time, freq, channels]); -> [frames / 8, hidden].
    masks[k]: [frames >> k, 1, 1], zeroing the frames outside clips before the k-th stride-2 convolution.
    first_w [channels, 9] (the 1 -> channels 3x3 convolution), stages: (depthwise [channels, 9], bias,
    pointwise [channels, channels], bias) per further stride-2 stage; out_w: `out`'s weight with its
    input columns in (freq, channel) order."""
    x = (raw - mean) * invstd
    x = x.unsqueeze(-1) * masks[0]  # [t, f, 1]
    x = act(_strided_taps(x, first_w) + first_b)
    for k, (dw_w, dw_b, pw_w, pw_b) in enumerate(stages, start=1):
        x = x * masks[k]
        x = _strided_taps(x, dw_w) + dw_b
        x = act(F.linear(x, pw_w, pw_b))
    t = x.shape[0]
    return F.linear(x.reshape(t, -1), out_w, out_b)


def _strided_taps(x, w):
    """A 3x3 convolution of stride 2 and zero padding 1 over [time, freq, c_in] in which each output
    channel reads one input channel (c_in == 1: broadcast to all, the front end's first convolution;
    c_in == channels: depthwise). w: [channels, 9] in (time tap, freq tap) order. -> [t/2, f/2, channels]."""
    t, f = x.shape[0], x.shape[1]
    to, fo = (t - 1) // 2 + 1, (f - 1) // 2 + 1
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    out = None
    for i in range(3):
        for j in range(3):
            term = xp[i:i + 2 * to - 1:2, j:j + 2 * fo - 1:2] * w[:, 3 * i + j]
            out = term if out is None else out + term
    return out


def pre_attention(x, ln1_w, ln1_b, up_w, up_b, down_w, down_b, lna_w, lna_b, qkv_w, qkv_b,
                  heads: int, eps: float, act):
    """The block up to attention: feed_forward_in (half-step residual), layer_norm_att, QKV projection.
    x: [frames, hidden] -> (residual, q, k, v), q/k/v as [1, heads, frames, head_dim] views."""
    t, d = x.shape
    h = F.layer_norm(x, (d,), ln1_w, ln1_b, eps)
    up, gate = F.linear(h, up_w, up_b).chunk(2, dim=-1)
    residual = x + 0.5 * F.linear(up * act(gate), down_w, down_b)
    qkv = F.linear(F.layer_norm(residual, (d,), lna_w, lna_b, eps), qkv_w, qkv_b)
    q, k, v = qkv.view(t, 3, heads, d // heads).permute(1, 2, 0, 3).unbind(0)
    return residual, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)


def post_attention(residual, attn, positions, o_w, o_b, lnc_w, lnc_b, glu_w, glu_b, glu_b1, glu_b2,
                   dw_w, dw_b, pw_w, pw_b, ext_w, ext_b, ln2_w, ln2_b, up_w, up_b, down_w, down_b,
                   lnf_w, lnf_b, eps: float, act, glu_act, conv_act, multiplier: int):
    """The block after attention: output projection, the convolution module (GLU pointwise conv, causal
    depthwise conv restarted at each segment start, pointwise conv, activation, pointwise conv),
    feed_forward_out (half step) and the final layer norm. attn: [1, heads, frames, head_dim]."""
    t, d = residual.shape
    x = residual + F.linear(attn[0].transpose(0, 1).reshape(t, d), o_w, o_b)
    g = F.linear(F.layer_norm(x, (d,), lnc_w, lnc_b, eps), glu_w, glu_b)
    e = g.shape[-1] // 2
    g = (g[:, :e] + glu_b1) * glu_act(g[:, e:] + glu_b2)
    if multiplier > 1:
        g = g.repeat_interleave(multiplier, dim=-1)
    taps = dw_w.shape[1]
    # output t = sum_j w[j] * g[t + j - (taps - 1)]: tap j reads `shift` = taps - 1 - j frames back
    c = g * dw_w[:, taps - 1] + dw_b
    pos = positions.unsqueeze(-1)
    for shift in range(1, taps):
        back = F.pad(g[:t - shift], (0, 0, shift, 0))
        c = c + torch.where(pos >= shift, back, 0.0) * dw_w[:, taps - 1 - shift]
    c = F.linear(conv_act(F.linear(c, pw_w, pw_b)), ext_w, ext_b)
    x = x + c
    h = F.layer_norm(x, (d,), ln2_w, ln2_b, eps)
    up, gate = F.linear(h, up_w, up_b).chunk(2, dim=-1)
    x = x + 0.5 * F.linear(up * act(gate), down_w, down_b)
    return F.layer_norm(x, (d,), lnf_w, lnf_b, eps)


def conformer_block(x, positions, block_mask, score_mod, weights: dict, cfg: "BlockConfig", pre=None,
                    post=None, flex=None):
    """One Phi4MultimodalAudioConformerEncoderLayer over packed frames x [frames, hidden]; `pre`, `post`
    and `flex`: compiled versions of the halves and of flex_attention (default: eager)."""
    from torch.nn.attention.flex_attention import flex_attention

    w = weights
    residual, q, k, v = (pre or pre_attention)(
        x, w["ln1_w"], w["ln1_b"], w["up1_w"], w["up1_b"], w["down1_w"], w["down1_b"], w["lna_w"], w["lna_b"],
        w["qkv_w"], w["qkv_b"], cfg.heads, cfg.eps, cfg.act)
    attn = (flex or flex_attention)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=cfg.scale)
    return (post or post_attention)(
        residual, attn, positions, w["o_w"], w["o_b"], w["lnc_w"], w["lnc_b"], w["glu_w"], w["glu_b"],
        w["glu_b1"], w["glu_b2"], w["dw_w"], w["dw_b"], w["pw_w"], w["pw_b"], w["ext_w"], w["ext_b"],
        w["ln2_w"], w["ln2_b"], w["up2_w"], w["up2_b"], w["down2_w"], w["down2_b"], w["lnf_w"], w["lnf_b"],
        cfg.eps, cfg.act, cfg.glu_act, cfg.conv_act, cfg.multiplier)


@dataclass(frozen=True)
class BlockConfig:
    heads: int
    scale: float
    eps: float
    act: object
    glu_act: object
    conv_act: object
    multiplier: int


def block_weights(layer) -> dict[str, torch.Tensor]:
    """A Phi4MultimodalAudioConformerEncoderLayer's weights as the block functions take them (1x1
    convolutions as [out, in] matrices, the QKV projections concatenated)."""
    ffi, ffo, att, conv = layer.feed_forward_in, layer.feed_forward_out, layer.self_attn, layer.conv
    dw = conv.dw_sep_conv_1d
    return {
        "ln1_w": ffi.layer_norm.weight, "ln1_b": ffi.layer_norm.bias,
        "up1_w": ffi.gate_up_proj.weight, "up1_b": ffi.gate_up_proj.bias,
        "down1_w": ffi.down_proj.weight, "down1_b": ffi.down_proj.bias,
        "lna_w": layer.layer_norm_att.weight, "lna_b": layer.layer_norm_att.bias,
        "qkv_w": torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
        "qkv_b": torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
        "o_w": att.o_proj.weight, "o_b": att.o_proj.bias,
        "lnc_w": conv.layer_norm.weight, "lnc_b": conv.layer_norm.bias,
        "glu_w": conv.glu.ext_pw_conv_1d.weight[..., 0], "glu_b": conv.glu.ext_pw_conv_1d.bias,
        "glu_b1": conv.glu.b1.reshape(-1), "glu_b2": conv.glu.b2.reshape(-1),
        "dw_w": dw.dw_conv.weight[:, 0], "dw_b": dw.dw_conv.bias,
        "pw_w": dw.pw_conv.weight[..., 0], "pw_b": dw.pw_conv.bias,
        "ext_w": conv.ext_pw_conv_1d.weight[..., 0], "ext_b": conv.ext_pw_conv_1d.bias,
        "ln2_w": ffo.layer_norm.weight, "ln2_b": ffo.layer_norm.bias,
        "up2_w": ffo.gate_up_proj.weight, "up2_b": ffo.gate_up_proj.bias,
        "down2_w": ffo.down_proj.weight, "down2_b": ffo.down_proj.bias,
        "lnf_w": layer.layer_norm.weight, "lnf_b": layer.layer_norm.bias,
    }


def block_config(config, layer) -> BlockConfig:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return BlockConfig(heads=config.num_attention_heads, scale=head_dim ** -0.5,
                       eps=layer.layer_norm.eps, act=_act(config.activation),
                       glu_act=_act(config.conv_glu_type), conv_act=_act(config.conv_activation),
                       multiplier=config.depthwise_multiplier)


class RelativeBias:
    """The model's attention bias as a FlexAttention score_mod: `relative_attention_bias_layer`'s table
    looked up per (head, key - query distance), plus the boolean streaming mask as a number (the model
    adds it, True as 1, in the bias dtype).

    Segments are at most WINDOW frames long, so distances within one lie in [-(WINDOW - 1), WINDOW - 1]:
    the table is indexed by distance + (WINDOW - 1), the model's clipping to its bucket range applied
    when the table is made. The score_mod reads only tensors and module constants (no Python numbers from
    the model), so a compiled kernel sees no symbolic sizes in it; distances across segments (masked out
    by the block mask, but scored in mixed blocks) are clamped into the table.
    `chunk_of`/`first_seen` (streaming chunks only): persistent [frames] buffers the caller fills with
    each frame's chunk index within its segment and the first chunk it sees."""

    def __init__(self, bias_layer, chunk_size: int, left_chunk: int, chunk_of: torch.Tensor,
                 first_seen: torch.Tensor):
        values = bias_layer.bias_values.weight.detach()  # [buckets, heads]
        far, buckets = int(bias_layer.max_distance), int(bias_layer.num_buckets)
        rel = torch.arange(-(WINDOW - 1), WINDOW, device=values.device).clamp(-far, far - 1)
        index = rel.abs() if bias_layer.symmetric else rel + buckets // 2
        by_distance = values[index]  # [2 * WINDOW - 1, heads]
        self.plus_one = (by_distance + 1).t().contiguous()  # [heads, distances]: True + bias, in its dtype
        self.plus_zero = by_distance.t().contiguous()
        self.streaming = int(chunk_size) > 0
        self.chunk_size, self.left_chunk = int(chunk_size), int(left_chunk)
        self.chunk_of, self.first_seen = chunk_of, first_seen

    def score_mod(self):
        plus_one, plus_zero = self.plus_one, self.plus_zero
        if not self.streaming:  # no chunks (the released model): every key gets True = +1
            def score_mod(score, b, h, q, kv):
                d = (kv - q).clamp(-(WINDOW - 1), WINDOW - 1) + (WINDOW - 1)
                return score + plus_one[h, d].to(score.dtype)
            return score_mod
        chunk_of, first_seen = self.chunk_of, self.first_seen

        def streaming_score_mod(score, b, h, q, kv):
            # adaptive_enc_mask: a key is True when its chunk is the query's or one of `left_chunk` before
            d = (kv - q).clamp(-(WINDOW - 1), WINDOW - 1) + (WINDOW - 1)
            seen = (chunk_of[kv] <= chunk_of[q]) & (chunk_of[kv] >= first_seen[q])
            return score + torch.where(seen, plus_one[h, d], plus_zero[h, d]).to(score.dtype)
        return streaming_score_mod

    def fill(self, positions: np.ndarray, tokens: int):
        """The streaming buffers for frames at `positions` (index within their segment)."""
        if self.streaming:
            chunk = positions // self.chunk_size
            self.chunk_of[:tokens].copy_(torch.from_numpy(chunk.astype(np.int32)))
            self.first_seen[:tokens].copy_(torch.from_numpy((chunk - self.left_chunk).astype(np.int32)))


class SegmentAttention:
    """What FlexAttention needs for one packed batch: the block mask (a query sees its own segment) and
    the bias score_mod. The tensors their functions read are persistent buffers, refilled per batch
    (the same tensors every call, so a compiled kernel is reused) and grown rarely."""

    def __init__(self, bias_layer, config, device, compiled: bool):
        self.bias_layer, self.config, self.device, self.compiled = bias_layer, config, device, compiled
        self.capacity = 0

    def _grow(self, tokens: int) -> None:
        self.capacity = max(tokens, 2 * self.capacity, 32768)
        make = lambda: torch.zeros(self.capacity, dtype=torch.int32, device=self.device)  # noqa: E731
        self.seg_ids = seg = make()
        self.bias = RelativeBias(self.bias_layer, self.config.chunk_size, self.config.left_chunk, make(), make())

        def same_segment(b, h, q, kv):
            return seg[q] == seg[kv]
        self.mask_mod = same_segment
        self.score_mod = self.bias.score_mod()
        if self.compiled:
            _mark_static([self.seg_ids, self.bias.plus_one, self.bias.plus_zero, self.bias.chunk_of,
                          self.bias.first_seen])

    def prepare(self, dl: DeviceLayout, tokens: int):
        """-> (block_mask, score_mod) for the batch laid out as `dl`."""
        from torch.nn.attention.flex_attention import BlockMask

        if tokens > self.capacity:
            self._grow(tokens)
        self.seg_ids[:tokens].copy_(dl.seg_ids)
        self.bias.fill(dl.positions_host, tokens)
        pc, pi, fc, fi = dl.kv_blocks
        block_mask = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=GRANULE, mask_mod=self.mask_mod,
                                              seq_lengths=(tokens, tokens))
        return block_mask, self.score_mod


class PackedAudioEncoder:
    """Phi4MultimodalAudioModel's forward (eval) over packed clips; compiled on CUDA, eager elsewhere."""

    def __init__(self, encoder, compile: bool | None = None):
        self.encoder = encoder
        cfg = encoder.config
        self.config = cfg
        device = encoder.embed.out.weight.device
        self.device = device
        if compile is None:
            compile = device.type == "cuda"
        self.compiled = compile
        self.reduction = cfg.time_reduction
        self.layers = [block_weights(layer) for layer in encoder.encoders]
        self.block_cfg = block_config(cfg, encoder.encoders[0])
        self.front = _front_weights(encoder)
        if compile:  # only the frame counts vary; weights kept static so no size of theirs is shared with them
            _mark_static([self.layers, self.front])
        self.attention = SegmentAttention(encoder.relative_attention_bias_layer, cfg, device, compile)
        self.funcs: dict = {}
        if compile:
            from torch.nn.attention.flex_attention import flex_attention

            self.funcs = {"pre": torch.compile(pre_attention, dynamic=True),
                          "post": torch.compile(post_attention, dynamic=True),
                          "flex": torch.compile(flex_attention, dynamic=True),
                          "front": torch.compile(front_end, dynamic=True)}

    @torch.inference_mode()
    def __call__(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        clips, padded, _ = features.shape
        if mask is None:
            lengths = [padded] * clips
        else:
            lengths = mask.reshape(clips, -1).sum(-1).tolist()  # the one host synchronisation
        layout = plan_layout(lengths, self.reduction)
        out_frames = _ceil_div(padded, self.reduction)
        return self.forward_packed(features, layout, out_frames)

    def forward_packed(self, features, layout: PackedLayout, out_frames: int) -> torch.Tensor:
        clips, padded, mel = features.shape
        dl = device_layout(layout, padded, out_frames, features.device, features.dtype, self.reduction)
        tokens = layout.tokens
        block_mask, score_mod = self.attention.prepare(dl, tokens)
        flat = torch.cat([features.reshape(clips * padded, mel), features.new_zeros(1, mel)])
        raw = flat[dl.feature_src]
        f = self.front
        sub = self.funcs.get("front", front_end)(
            raw, f["mean"], f["invstd"], dl.stage_masks, f["first_w"], f["first_b"], f["stages"],
            f["out_w"], f["out_b"], f["act"])
        x = torch.cat([sub, sub.new_zeros(1, sub.shape[1])])[dl.block_src]
        funcs = {k: self.funcs.get(k) for k in ("pre", "post", "flex")}
        for weights in self.layers:
            x = conformer_block(x, dl.positions, block_mask, score_mod, weights, self.block_cfg, **funcs)
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])[dl.out_src]
        return x.view(clips, out_frames, -1)


def _mark_static(tree) -> None:
    """Every tensor in `tree` (dicts, lists, tuples) as of static shape for torch.compile(dynamic=True):
    otherwise a frame count that happens to equal one of their sizes is specialised to it (duck sizing)
    and the next batch recompiles."""
    if isinstance(tree, torch.Tensor):
        torch._dynamo.mark_static(tree)
    elif isinstance(tree, dict):
        _mark_static(list(tree.values()))
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            _mark_static(item)


def _front_weights(encoder) -> dict:
    embed = encoder.embed
    convs = [m for m in embed.conv if isinstance(m, torch.nn.Conv2d)]
    first, rest = convs[0], convs[1:]
    assert first.in_channels == 1 and first.stride == (2, 2) and first.kernel_size == (3, 3), first
    stages = []
    for dw, pw in zip(rest[0::2], rest[1::2]):
        assert dw.groups == dw.in_channels and dw.stride == (2, 2) and pw.kernel_size == (1, 1), (dw, pw)
        stages.append((dw.weight.reshape(dw.out_channels, 9), dw.bias, pw.weight[:, :, 0, 0], pw.bias))
    channels = first.out_channels
    out_w = embed.out.weight  # input columns in (channel, freq) order: the model flattens [c, f]
    hidden = out_w.shape[0]
    freq = out_w.shape[1] // channels
    out_w = out_w.view(hidden, channels, freq).transpose(1, 2).reshape(hidden, freq * channels).contiguous()
    norm = encoder.encoder_embedding
    return {"mean": norm.global_mean, "invstd": norm.global_invstd,
            "first_w": first.weight.reshape(channels, 9), "first_b": first.bias, "stages": stages,
            "out_w": out_w, "out_b": embed.out.bias, "act": _act(encoder.config.nemo_activation)}


# -- installing it ----------------------------------------------------------------------------------

def wants_packed(mode: str, device: torch.device) -> bool:
    return mode == "packed" or (mode == "auto" and device.type == "cuda")


def install_audio_encoder(model: torch.nn.Module, mode: str = "auto", compile: bool | None = None,
                          verify_first: bool | None = None) -> int:
    """Make every audio encoder in `model` give each clip its unbatched output (the masked padding of
    actors/audio_padding.py, always), and, when `mode` asks for it ("packed", or "auto" on CUDA), run it
    through PackedAudioEncoder. Returns how many encoders. Idempotent."""
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel

    count = mask_audio_padding(model)
    for module in model.modules():
        if not isinstance(module, Phi4MultimodalAudioModel):
            continue
        device = module.embed.out.weight.device
        if not wants_packed(mode, device):
            module.forward = types.MethodType(reference_forward, module)
            module._packed = None
            continue
        if getattr(module, "_packed", None) is None:
            packed = PackedAudioEncoder(module, compile)
            verify = packed.compiled if verify_first is None else verify_first
            module._packed = _Guarded(module, packed, verify)
            module.forward = module._packed
    return count


def warm_up_audio_encoder(model: torch.nn.Module) -> int:
    """Compile (and check) every packed audio encoder in `model` on a dummy batch; returns how many."""
    guards = [m._packed for m in model.modules() if getattr(m, "_packed", None) is not None]
    for guard in guards:
        guard.warm_up()
    return len(guards)


class _Guarded:
    """The packed forward with the reference path behind it: if the packed path raises (or, on its first
    use, disagrees with the reference), one warning, then the reference for the rest of the replica."""

    def __init__(self, module, packed: PackedAudioEncoder, verify_first: bool):
        self.module, self.packed = module, packed
        self.verify = verify_first
        self.failed = False
        self.calls = 0

    def __call__(self, hidden_states, mask=None, **kwargs):
        if not self.failed:
            try:
                out = self.packed(hidden_states, mask)
                if self.verify:
                    self._check(out, hidden_states, mask)
                self.calls += 1
                return out
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a compiler or kernel problem must cost speed, not the run
                log.warning("packed audio encoder failed (%s: %s); this replica uses the model's encoder "
                            "with masked padding from now on", type(exc).__name__, exc)
                self.failed = True
        return reference_forward(self.module, hidden_states, mask, **kwargs)


    @torch.inference_mode()
    def warm_up(self, lengths=(3000, 1234)) -> None:
        """One dummy ragged batch through the guarded path: the compile (and on CUDA the check against
        the reference) happens here instead of inside the first real prefill."""
        w = self.packed.front["out_w"]
        x = torch.randn(len(lengths), max(lengths), self.packed.config.input_size, device=w.device, dtype=w.dtype)
        mask = torch.arange(max(lengths), device=w.device)[None, :] < torch.tensor(lengths, device=w.device)[:, None]
        self(x, mask)
        self.calls = 0

    def _check(self, out, hidden_states, mask) -> None:
        """Compare with the reference path once; raise when they differ. A batch the reference cannot run
        (upstream's batched forward fails on clips past 40 s) is not compared; the next one is."""
        try:
            ref = reference_forward(self.module, hidden_states, mask)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001
            return
        self.verify = False
        err = _relative_error(out, ref, mask, self.packed.reduction)
        if not err <= VERIFY_TOLERANCE:
            raise RuntimeError(f"differs from the model's forward by {err:.3g} (relative)")


def _relative_error(out, ref, mask, reduction: int) -> float:
    """||out - ref|| / ||ref|| over each clip's own frames."""
    clips = out.shape[0]
    if mask is None:
        frames = [out.shape[1]] * clips
    else:
        frames = [_ceil_div(int(n), reduction) for n in mask.reshape(clips, -1).sum(-1).tolist()]
    num = den = 0.0
    for i, n in enumerate(frames):
        a, b = out[i, :n].float(), ref[i, :n].float()
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))
