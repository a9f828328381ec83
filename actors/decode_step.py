"""The decode step's per-layer arithmetic as plain tensor functions, eager or compiled.

One decode step runs every layer on one token per slot. Written with the model's modules it issues ~85
aten ops per layer (~45 of them kernels: RMSNorm's float32 round trips, the partial rotary's slices and
concatenations, each as its own kernel), ~1,500 kernels per step for the 32-layer model. Here a layer is
four functions of (hidden state, weights) that `torch.compile` fuses into a few kernels each, shared
by all layers (the weights are arguments) and captured inside the decoder's CUDA graphs:

- `pre_attention`: the previous layer's residual add, RMSNorm, QKV projection and the model's rotary;
- `masked_softmax`: scale, mask, softmax and the cast back, in one pass over the scores;
- `post_attention`: output projection, residual, RMSNorm and the SiLU-gated MLP (its residual add is
  the next layer's `pre_attention`'s, or `final_norm`'s);
- `final_norm`: the last residual add and the final norm.

The two attention matmuls and the cache writes stay eager between them (cuBLAS; `index_copy_`): the
cache is never an argument of compiled code, so the compiler cannot copy it.

The arithmetic is the model's: the norm formula of `Phi4MultimodalRMSNorm`, the model's rotary function,
the projection layout of its attention and MLP; the tests compare it with the modules' own forward.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import apply_rotary_pos_emb

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Phi4MultimodalRMSNorm: float32 statistics, cast back to the input dtype, then scale
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def split_rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int,
                 head_dim: int):
    """q [b, heads, d], k and v [b, kv_heads, d] from the fused projection [b, (heads + 2 kv) d], the
    model's partial rotary applied to q and k (cos/sin [b, rotary dims])."""
    b = qkv.shape[0]
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim
    q = qkv[:, :q_size].view(b, n_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(b, n_kv, head_dim)
    v = qkv[:, q_size + kv_size:].view(b, n_kv, head_dim)
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    return q, k, v.contiguous()


def pre_attention(x, delta, cos, sin, ln1, qkv_w, eps: float, n_heads: int, n_kv: int, head_dim: int):
    """(hidden with the previous layer's MLP output added, q, k, v); x, delta [b, hidden] (delta None
    for the first layer)."""
    if delta is not None:
        x = x + delta
    qkv = F.linear(rms_norm(x, ln1, eps), qkv_w)
    return (x, *split_rotate(qkv, cos, sin, n_heads, n_kv, head_dim))


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(scores * scaling) over the valid columns, in float32, cast back to the scores' dtype.
    scores [b, kv, groups, columns]; valid [b, 1, 1, columns] (masked columns get exactly 0)."""
    s = (scores.float() * scaling).masked_fill(~valid, float("-inf"))
    return torch.softmax(s, dim=-1).to(scores.dtype)


def post_attention(x, attn, o_w, ln2, gate_up_w, down_w, eps: float):
    """(hidden after the attention residual, the MLP's output) — the MLP's residual add is left to the
    next layer. attn [b, heads * d]."""
    x = x + F.linear(attn, o_w)
    gate, up = F.linear(rms_norm(x, ln2, eps), gate_up_w).chunk(2, dim=-1)
    return x, F.linear(up * F.silu(gate), down_w)


def final_norm(x, delta, weight, eps: float):
    return rms_norm(x + delta, weight, eps)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, columns: int, valid: torch.Tensor,
              scaling: float, softmax=masked_softmax) -> torch.Tensor:
    """Grouped attention of one query per slot over cache columns [0, columns); -> [b, heads * d].
    q [b, heads, d]; k_cache, v_cache [b, kv, max_len, d] (one layer's, read in place: no KV repeat)."""
    b, heads, d = q.shape
    kv = k_cache.shape[1]
    qg = q.view(b, kv, heads // kv, d)
    scores = torch.matmul(qg, k_cache[:, :, :columns].transpose(-1, -2))  # [b, kv, groups, columns]
    probs = softmax(scores, valid, scaling)
    return torch.matmul(probs, v_cache[:, :, :columns]).reshape(b, heads * d)


def plain_layers(model) -> bool:
    """Whether every decoder layer is the stock one (plain linears, RMSNorms, SiLU MLP), so its weights
    can be passed to the functions above; an attached (unmerged) LoRA is not."""
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    for layer in model.model.layers:
        linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        if any(type(m) is not torch.nn.Linear or m.bias is not None for m in linears):
            return False
        if not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False
    return hasattr(model.model.norm, "variance_epsilon")


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process so far (a timed region that raised it compiled)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a counter moved between versions costs only the attribution
        return 0


def allow_recompiles(n: int) -> None:
    """Dynamo compiles a function for at most `recompile_limit` (8) sets of shapes, then runs it eagerly;
    raise that to `n` (the setting's name changed across versions)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < n:
            setattr(config, name, n)
            return


def _mark_rows_dynamic(*tensors) -> None:
    """One compiled graph for every slot count (a new cache, or a step over fewer slots, compiles nothing)."""
    for t in tensors:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)


class StepFunctions:
    """The four per-layer functions, compiled (Inductor) or eager; `compiled` says which."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        if compiled:
            self._pre = torch.compile(pre_attention, fullgraph=True)
            self._softmax = torch.compile(masked_softmax, fullgraph=True)
            self._post = torch.compile(post_attention, fullgraph=True)
            self._final = torch.compile(final_norm, fullgraph=True)
        else:
            self._pre, self._softmax, self._post, self._final = pre_attention, masked_softmax, post_attention, final_norm

    def pre(self, x, delta, cos, sin, ln1, qkv_w, eps, n_heads, n_kv, head_dim):
        if self.compiled:
            _mark_rows_dynamic(x, delta, cos, sin)
        return self._pre(x, delta, cos, sin, ln1, qkv_w, eps, n_heads, n_kv, head_dim)

    def softmax(self, scores, valid, scaling):
        if self.compiled:  # rows and attended columns vary between the captured graphs
            _mark_rows_dynamic(scores, valid)
            torch._dynamo.maybe_mark_dynamic(scores, 3)
            torch._dynamo.maybe_mark_dynamic(valid, 3)
        return self._softmax(scores, valid, scaling)

    def post(self, x, attn, o_w, ln2, gate_up_w, down_w, eps):
        if self.compiled:
            _mark_rows_dynamic(x, attn)
        return self._post(x, attn, o_w, ln2, gate_up_w, down_w, eps)

    def final(self, x, delta, weight, eps):
        if self.compiled:
            _mark_rows_dynamic(x, delta)
        return self._final(x, delta, weight, eps)


class FlexDecode:
    """Attention of one query per slot by FlexAttention (its decoding kernel on CUDA), reading only each
    slot's cache blocks up to its position. `prepare` writes every slot's block count from its position
    in place (inside the captured graph; a stopped or free slot reads one block: its output is not
    used); the mask hides the columns past the position in its last block. Grouped KV heads are read as
    they are (`enable_gqa`). It always runs over all the cache's slots, so it compiles once per cache
    (static shapes): a step over fewer slots passes its queries in the first rows of a full-size buffer."""

    BLOCK = 128  # cache positions per block (kv_plan.py makes cache lengths multiples of it)

    def __init__(self, slots: int, max_len: int, pos: torch.Tensor, active: torch.Tensor):
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        dev = pos.device
        blocks = max_len // self.BLOCK
        self.slots = slots
        self.pos, self.active = pos, active
        self.kv_blocks = torch.ones(slots, 1, 1, dtype=torch.int32, device=dev)
        kv_index = torch.arange(blocks, dtype=torch.int32, device=dev).expand(slots, 1, 1, blocks).contiguous()

        def up_to_position(b, h, q_idx, kv_idx):
            return kv_idx <= pos[b]

        self.block_mask = BlockMask.from_kv_blocks(self.kv_blocks, kv_index, BLOCK_SIZE=self.BLOCK,
                                                   mask_mod=up_to_position, seq_lengths=(1, max_len))
        self.queries: torch.Tensor | None = None  # [slots, heads, 1, d], for steps over fewer slots
        self.fn = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        allow_recompiles(64)  # one compile per cache shape: a replica may build many caches

    @classmethod
    def fits(cls, max_len: int) -> bool:
        return max_len % cls.BLOCK == 0

    def prepare(self) -> None:
        blocks = torch.where(self.active, self.pos // self.BLOCK + 1, 1)
        self.kv_blocks.copy_(blocks.view(-1, 1, 1))

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scaling: float) -> torch.Tensor:
        """q [rows, heads, d]; k_cache, v_cache: one layer's whole cache [slots, kv, max_len, d];
        -> [rows, heads * d]."""
        rows = q.shape[0]
        if rows < self.slots:
            if self.queries is None:
                self.queries = torch.zeros(self.slots, q.shape[1], 1, q.shape[2], device=q.device, dtype=q.dtype)
            self.queries[:rows, :, 0].copy_(q)
            queries = self.queries
        else:
            queries = q.unsqueeze(2)
        out = self.fn(queries, k_cache, v_cache, block_mask=self.block_mask, scale=scaling, enable_gqa=True)
        return out[:rows].reshape(rows, -1)
