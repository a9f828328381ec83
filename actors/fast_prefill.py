"""The decoder half of the prefill as one fused function per layer (torch.compile on CUDA).

Profiling the asr prefill on an H200 (bench/profile_prefill.py, bench/profile/) showed the text decoder
taking 5.95 ms per clip where its matmuls need ~3.2: the rest is elementwise work that transformers runs
as separate kernels (RMSNorm's float32 round trip, the partial rotary's slices and concatenations,
SiLU x up, residual adds). Here one layer is a plain tensor function of (hidden, weights), compiled
once and shared by all layers (the weights are arguments), so those steps fuse into a few kernels and
the matmuls stay cuBLAS's.

Attention itself stays eager between two compiled halves (norm + QKV + rotary; output projection +
MLP): compiled as part of one graph, its KV repeat and layout copies cost more than all the fusion
saved (bench/profile/).

The multimodal part (audio/image encoders and the embedding merge) is still the model's own code; this
takes over after it. The arithmetic is the model's: the same norm formula, the model's rotary table and
rotary function, the same projection layout; on CPU it runs eagerly (tests compare it with the model's forward).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import apply_rotary_pos_emb

log = logging.getLogger(__name__)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Phi4MultimodalRMSNorm: float32 statistics, cast back, then scale
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def pre_attention(x, cos, sin, ln1, qkv_w, n_heads: int, n_kv: int, head_dim: int, eps: float):
    """Norm, QKV projection and the model's own (partial) rotary, in the projection's layout (no
    transposes in the compiled code): q [b, t, heads, d], k and v [b, t, kv_heads, d]. cos/sin:
    [b, t, rotary dims]."""
    b, t, _ = x.shape
    qkv = F.linear(_rms_norm(x, ln1, eps), qkv_w)
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim
    q = qkv[..., :q_size].view(b, t, n_heads, head_dim)
    k = qkv[..., q_size:q_size + kv_size].view(b, t, n_kv, head_dim)
    v = qkv[..., q_size + kv_size:].view(b, t, n_kv, head_dim)
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # broadcast over the heads axis
    return q, k, v


def post_attention(x, attn, o_w, ln2, gate_up_w, down_w, eps: float):
    """Output projection, residual, norm, SiLU-gated MLP, residual. attn: [b, t, heads * d]."""
    x = x + F.linear(attn, o_w)
    gate, up = F.linear(_rms_norm(x, ln2, eps), gate_up_w).chunk(2, dim=-1)
    return x + F.linear(up * F.silu(gate), down_w)


def attention(q, k, v, mask, scaling: float):
    """Causal attention with grouped KV heads over [b, heads, t, d] views; -> [b, t, heads * d].
    Eager: the attention kernels are fused already, and compiled around them the KV repeat and the
    layout copies came out several times slower than the native ones."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def decoder_layer(x, cos, sin, mask, ln1, qkv_w, o_w, ln2, gate_up_w, down_w,
                  eps: float, n_heads: int, n_kv: int, head_dim: int, scaling: float, pre=None, post=None):
    """One Phi-4 decoder layer over a whole prompt: returns (hidden, keys, values), keys and values as
    [batch, kv_heads, tokens, head_dim] after rotary. `pre`/`post`: compiled versions of the two
    halves (default: eager)."""
    q, k, v = (pre or pre_attention)(x, cos, sin, ln1, qkv_w, n_heads, n_kv, head_dim, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # views: [b, heads, t, d]
    attn = attention(q, k, v, mask, scaling)
    return (post or post_attention)(x, attn, o_w, ln2, gate_up_w, down_w, eps), k, v


class FastPrefill:
    """Runs the text decoder over merged input embeddings; compiled on CUDA, eager elsewhere."""

    def __init__(self, model, compile_layers: bool | None = None):
        self.model = model
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self.sliding_window = getattr(cfg, "sliding_window", None)
        device = next(model.parameters()).device
        if compile_layers is None:
            compile_layers = device.type == "cuda"
        self.halves = {}
        if compile_layers:  # shared by all layers: the weights are arguments
            self.halves = {"pre": torch.compile(pre_attention, dynamic=True),
                           "post": torch.compile(post_attention, dynamic=True)}
        self.compiled = compile_layers
        self._eager_fallback = False
        self.ok_hidden_act = getattr(cfg, "hidden_act", "silu") == "silu"

    def supports(self, tokens: int) -> bool:
        return self.ok_hidden_act and (self.sliding_window is None or tokens <= self.sliding_window)

    def embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own multimodal embedding (token embeddings + audio/image encoders, merged)."""
        m = self.model.model
        ids = batch["input_ids"]
        media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        return m.embed_tokens_extend(ids, m.embed_tokens(ids), **media)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor], position_ids: torch.Tensor):
        """-> (last-position logits [b, vocab] float32, keys, values [layers, b, kv, tokens, head_dim])."""
        return self.decoder(self.embeddings(batch), batch["attention_mask"], position_ids)

    @torch.inference_mode()
    def decoder(self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """The text decoder over merged embeddings `x` [b, tokens, hidden]; returns as `__call__`."""
        m = self.model.model
        cos, sin = m.rotary_emb(x, position_ids=position_ids)
        mask = attention_mask.bool()
        if bool(mask.all()):
            attn_mask = None  # no padding: plain causal attention (flash kernels)
        else:
            t = mask.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
            attn_mask = causal[None] & mask[:, None, :]
            # a left-pad query sees nothing; let it see everything (its output is never used) so the
            # softmax stays finite and no NaN reaches the real tokens through pad keys and values
            attn_mask = attn_mask | ~attn_mask.any(-1, keepdim=True)
            attn_mask = attn_mask[:, None]
        keys, values = [], []
        for layer in m.layers:
            args = (cos, sin, attn_mask, layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight,
                    layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                    layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight,
                    self.eps, self.n_heads, self.n_kv, self.head_dim, self.scaling)
            x, k, v = self._run_layer(x, args)
            keys.append(k)
            values.append(v)
        logits = self.model.lm_head(m.norm(x[:, -1:]))[:, -1].float()
        return logits, torch.stack(keys), torch.stack(values)

    def _run_layer(self, x, args):
        if not self._eager_fallback:
            try:
                return decoder_layer(x, *args, **self.halves)
            except Exception as exc:  # noqa: BLE001 - a compiler problem must cost speed, not the run
                if not self.compiled:
                    raise
                log.warning("compiled prefill failed (%s: %s); running it eagerly", type(exc).__name__, exc)
                self._eager_fallback = True
        return decoder_layer(x, *args)
