"""The decoder half of the prefill as one fused function per layer (torch.compile on CUDA).

Profiling the asr prefill on an H200 (bench/profile_prefill.py, bench/profile/) showed the text decoder
taking 5.95 ms per clip where its matmuls need ~3.2: the rest is elementwise work that transformers runs
as separate kernels (RMSNorm's float32 round trip, the partial rotary's slices and concatenations,
SiLU x up, residual adds). Here one layer is a plain tensor function of (hidden, weights), compiled
once and shared by all layers (the weights are arguments), so those steps fuse into a few kernels and
the matmuls stay cuBLAS's.

How the layer halves are compiled matters. Compiled with `dynamic=True` over [batch, tokens, hidden]
inputs, every size became a runtime symbol (head count, head_dim, rotary width, hidden size as well as
batch and tokens): the rotary kernels then split the concatenation into several loops indexed by runtime
divisions and ran ~10x under memory bandwidth (341 us for 76 MB of q on an H200). Here the halves take
the tokens flattened ([batch * tokens, hidden]) and close over the head counts, head_dim and eps as
constants, so the token count is the only runtime size (`maybe_mark_dynamic`), one graph serves every
batch and width, and each rotary output is one kernel with constant index arithmetic.

Attention stays eager between the two compiled halves (norm + QKV + rotary; output projection + MLP):
compiled as part of one graph, its layout copies cost more than all the fusion saved. It reads the 8
grouped K/V heads directly (`enable_gqa`, no repeated copy of K and V to 24 heads). Left-padded batches
are realigned so each row's tokens start at position 0 (padding after them): causal attention alone is
then exact for every real token, so the flash kernels run instead of a dense [batch, tokens, tokens]
mask (the padding's own outputs are never used); keys and values are put back in the left-padded layout
for the caller, or handed per layer to a `kv_sink` (e.g. written straight into decode slots).

The multimodal part (audio/image encoders and the embedding merge) is still the model's own code; this
takes over after it. The arithmetic is the model's: the same norm formula, the model's rotary table and
rotary function, the same projection layout; on CPU it runs eagerly (tests compare it with the model's
forward).
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import apply_rotary_pos_emb

log = logging.getLogger(__name__)

KvSink = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class PrefillOptions:
    """Which of the fused prefill's levers run (schemas/config.py BatchingConfig's `prefill_*` fields)."""
    # "tokens": halves compiled over flattened tokens, the token count the only runtime size;
    # "dynamic": compiled with every size a runtime symbol (the first version); "off": eager;
    # "auto": "tokens" on CUDA, "off" elsewhere
    compile: Literal["auto", "tokens", "dynamic", "off"] = "auto"
    gqa: bool = True  # SDPA reads the grouped K/V heads (enable_gqa) instead of a repeated copy
    unpad: bool = True  # left-padded rows realigned to start at 0: causal attention, no dense mask

    @classmethod
    def from_batching(cls, batching) -> PrefillOptions:
        return cls(compile=batching.prefill_compile, gqa=batching.prefill_gqa, unpad=batching.prefill_unpad)


# the path every lever falls back to after a failure: eager, repeated K/V, dense mask (the first version's
# eager arithmetic, which the CPU tests compare with the model's forward)
SAFE_OPTIONS = PrefillOptions(compile="off", gqa=False, unpad=False)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Phi4MultimodalRMSNorm: float32 statistics, cast back, then scale
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def layer_halves(n_heads: int, n_kv: int, head_dim: int, eps: float):
    """(pre_attention, post_attention) over flattened tokens, the shapes closed over as constants."""
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim

    def pre_attention(x, cos, sin, ln1, qkv_w):
        """Norm, QKV projection and the model's own (partial) rotary. x [N, hidden], cos/sin [N, rotary
        dims] -> q [N, heads, d], k and v [N, kv_heads, d], each contiguous (v copied out of the
        projection so that q, k and v reach attention in one layout)."""
        n = x.shape[0]
        qkv = F.linear(_rms_norm(x, ln1, eps), qkv_w)
        q = qkv[:, :q_size].view(n, n_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(n, n_kv, head_dim)
        v = qkv[:, q_size + kv_size:].reshape(n, n_kv, head_dim).contiguous()
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # broadcast over the heads axis
        return q, k, v

    def post_attention(x, attn, o_w, ln2, gate_up_w, down_w):
        """Output projection, residual, norm, SiLU-gated MLP, residual. x, attn: [N, hidden]."""
        x = x + F.linear(attn, o_w)
        gate, up = F.linear(_rms_norm(x, ln2, eps), gate_up_w).chunk(2, dim=-1)
        return x + F.linear(up * F.silu(gate), down_w)

    return pre_attention, post_attention


def _own_code(fn, tag: str):
    """`fn` with a code object of its own. torch.compile keeps its graphs per code object, told apart by
    guards only; a "dynamic" graph must never serve a "tokens" call (or the reverse) when one process
    builds both (benchmarks comparing them)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def attention(q, k, v, scaling: float, gqa: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention with grouped KV heads over [b, heads, t, d] views; -> [b, t, heads * d].
    `mask`: a dense boolean [b, 1, t, t] mask instead of plain causal attention (left padding kept).
    With a mask the K/V heads are repeated whatever `gqa` says: only the flash kernels, which take no
    mask, are known to read grouped heads on the GPU's torch."""
    if mask is None and gqa:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b * t, h * d)


def start_aligned_index(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[b, width] source columns that move each left-padded row's tokens to the start: column i of the
    realigned row reads column (i + padding) mod width (its padding lands after its tokens)."""
    columns = torch.arange(width, device=lengths.device)
    return (columns[None, :] + (width - lengths)[:, None]) % width


def left_padded_index(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of `start_aligned_index`: column j of the left-padded row reads (j - padding) mod width."""
    columns = torch.arange(width, device=lengths.device)
    return (columns[None, :] - (width - lengths)[:, None]) % width


def slot_sink(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: list[int]) -> KvSink:
    """A `kv_sink` writing each layer's keys/values of batch row j into `k_cache[layer, slots[j], :, :width]`
    (caches [layers, slots, kv_heads, max_len, head_dim]). Row j's token p lands at cache position p; the
    positions past its own length receive its padding, which a decoder overwrites before it reads them."""
    index = torch.tensor(slots, device=k_cache.device, dtype=torch.long)

    def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        width = k.shape[2]
        k_cache[layer, :, :, :width].index_copy_(0, index, k)
        v_cache[layer, :, :, :width].index_copy_(0, index, v)

    return write


class FastPrefill:
    """Runs the text decoder over merged input embeddings; compiled on CUDA, eager elsewhere."""

    def __init__(self, model, compile_layers: bool | None = None, options: PrefillOptions | None = None):
        self.model = model
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self.device = next(model.parameters()).device
        options = options or PrefillOptions()
        if compile_layers is not None:  # the caller's explicit choice overrides the options' "auto"
            if not compile_layers:
                options = replace(options, compile="off")
            elif options.compile in ("auto", "off"):
                options = replace(options, compile="tokens")
        if options.compile == "auto":
            options = replace(options, compile="tokens" if self.device.type == "cuda" else "off")
        self.options = options
        self.pre, self.post = layer_halves(self.n_heads, self.n_kv, self.head_dim, self.eps)
        self.halves = (self.pre, self.post)
        if options.compile == "tokens":
            self.halves = (torch.compile(self.pre), torch.compile(self.post))
        elif options.compile == "dynamic":
            self.halves = tuple(torch.compile(_own_code(f, "every_size_dynamic"), dynamic=True)
                                for f in (self.pre, self.post))
        self.compiled = options.compile != "off"
        self._eager_fallback = False  # set once the configured path failed: SAFE_OPTIONS from then on
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
    def __call__(self, batch: dict[str, torch.Tensor], position_ids: torch.Tensor, kv_sink: KvSink | None = None):
        """-> (last-position logits [b, vocab] float32, keys, values [layers, b, kv, tokens, head_dim] in
        the batch's left-padded layout); with `kv_sink`, keys and values go to it instead (None, None)."""
        return self.decoder(self.embeddings(batch), batch["attention_mask"], position_ids, kv_sink)

    @torch.inference_mode()
    def decoder(self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                kv_sink: KvSink | None = None):
        """The text decoder over merged embeddings `x` [b, tokens, hidden]; returns as `__call__`.

        `kv_sink(layer, keys, values)`, keys/values [b, kv_heads, tokens, head_dim]: row j's token p at
        column p (start-aligned: its padding, if any, after its tokens); called once per layer, again
        from layer 0 if the configured path fails and the safe one reruns."""
        if not self._eager_fallback:
            try:
                return self._decoder(x, attention_mask, position_ids, kv_sink, self.options, self.halves)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a compiler or kernel problem must cost speed, not the run
                if self.options == SAFE_OPTIONS:
                    raise
                log.warning("fused prefill (%s) failed (%s: %s); running the eager, repeated-K/V, masked "
                            "path from now on", self.options, type(exc).__name__, exc)
                self._eager_fallback = True
        return self._decoder(x, attention_mask, position_ids, kv_sink, SAFE_OPTIONS, (self.pre, self.post))

    def _decoder(self, x, attention_mask, position_ids, kv_sink, options: PrefillOptions, halves):
        m = self.model.model
        pre, post = halves
        b, width, hidden = x.shape
        mask = attention_mask.bool()
        lengths = attn_mask = None
        if not bool(mask.all()):
            if options.unpad:
                lengths = mask.sum(-1)
                source = start_aligned_index(lengths, width)
                x = x.gather(1, source[:, :, None].expand(b, width, hidden))
                position_ids = position_ids.gather(1, source)
            else:
                causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
                attn_mask = causal[None] & mask[:, None, :]
                # a left-pad query sees nothing; let it see everything (its output is never used) so the
                # softmax stays finite and no NaN reaches the real tokens through pad keys and values
                attn_mask = attn_mask | ~attn_mask.any(-1, keepdim=True)
                attn_mask = attn_mask[:, None]
        cos, sin = m.rotary_emb(x, position_ids=position_ids)
        n = b * width
        x = x.reshape(n, hidden)
        cos, sin = cos.reshape(n, -1), sin.reshape(n, -1)
        if options.compile == "tokens":
            for t in (x, cos, sin):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        keys = values = move = None  # move: the column gather between the layout computed and the one wanted
        if kv_sink is None:
            shape = (len(m.layers), b, self.n_kv, width, self.head_dim)
            keys = torch.empty(shape, device=x.device, dtype=x.dtype)
            values = torch.empty(shape, device=x.device, dtype=x.dtype)
            if lengths is not None:  # computed start-aligned, returned left-padded
                move = left_padded_index(lengths, width)
        elif attn_mask is not None:  # computed left-padded, the sink takes them start-aligned
            move = start_aligned_index(mask.sum(-1), width)
        if move is not None:
            move = move[:, None, :, None].expand(b, self.n_kv, width, self.head_dim)
        for i, layer in enumerate(m.layers):
            q, k, v = pre(x, cos, sin, layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight)
            q = q.view(b, width, self.n_heads, self.head_dim).transpose(1, 2)  # views: [b, heads, t, d]
            k = k.view(b, width, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(b, width, self.n_kv, self.head_dim).transpose(1, 2)
            attn = attention(q, k, v, self.scaling, options.gqa, attn_mask)
            if options.compile == "tokens":
                torch._dynamo.maybe_mark_dynamic(attn, 0)
            x = post(x, attn, layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                     layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)
            if kv_sink is not None:
                kv_sink(i, k, v) if move is None else kv_sink(i, k.gather(2, move), v.gather(2, move))
            elif move is not None:
                torch.gather(k, 2, move, out=keys[i])
                torch.gather(v, 2, move, out=values[i])
            else:
                keys[i].copy_(k)
                values[i].copy_(v)
        x = x.view(b, width, hidden)
        if lengths is not None:
            last = x[torch.arange(b, device=x.device), lengths - 1][:, None]
        else:
            last = x[:, -1:]
        logits = self.model.lm_head(m.norm(last))[:, -1].float()
        return logits, keys, values
