"""The image encoder's patch features without the work the model throws away: SigLIP up to the used layer.

transformers 5.17's `Phi4MultimodalImageEmbedding.get_img_features` runs the whole SigLIP tower with
`output_hidden_states=True` and keeps one hidden state, `hidden_states[feature_layer]` (-2: the output of
layer 26 of 27). So it computes layer 27, the post-layernorm and the attention-pooling head for nothing,
and holds all 28 hidden states until it returns (21 crops x 1024 patches x 1152 x 2 bytes x 28 = 1.4 GB
per Letter page in bf16). Its q, k and v are three GEMMs, and LayerNorm, biases, GELU and residual adds
run as separate kernels.

`install_vision_encoder(model, mode)` replaces `get_img_features` on that model instance only (as
actors/audio_padding.py replaces the audio encoder's forward) by `FusedSiglip.features`:
- the model's own patch embedding (position buckets, patch mask) for every crop;
- only the layers before the feature layer, each as two functions over the tokens flattened to
  [crops * patches, 1152] (layer norm + one QKV GEMM with the three weights concatenated once; output
  projection + residual + layer norm + MLP + residual), compiled by torch.compile on CUDA so the
  epilogues fuse, with attention (SDPA, head_dim 72) eager between them; no hidden-state list;
- the model's own 2x2 average pooling (`image_token_compression`), so the result is exactly what
  `get_img_features` returns. The feature assembly (crops, global image, separators, HD transform,
  projection) stays the model's `forward`.

Attention is bidirectional over each crop's real patches, as SigLIP is (and as the original checkpoint's
vision tower computes it): crops without padding attend all 1024 patches (no mask: flash kernels), crops
with padded patches (the right or bottom edge of a page whose size is not a multiple of 448 px) mask
those keys. transformers 5.17 with `attn_implementation="sdpa"` differs here: its vision attention is
flagged causal, and SDPA applies that flag whenever the batch's patch mask is all ones, so a crop is
encoded causally unless some crop of the same batch is padded (its eager attention is always
bidirectional). This module matches the eager attention and the padded-batch case, and gives each page
the same features whatever it is batched with (tests/test_vision_encoder.py shows both).

On any failure of the fused path a replica logs one warning and runs the model's own method from then on.
"""
from __future__ import annotations

import logging
import math
import types

import torch
import torch.nn.functional as F

__all__ = ["FusedSiglip", "SiglipLayers", "install_vision_encoder", "siglip_halves"]

log = logging.getLogger(__name__)


def siglip_halves(n_heads: int, head_dim: int, eps: float, act):
    """(pre_attention, post_attention) of one SigLIP encoder layer over flattened tokens [N, hidden],
    the sizes, eps and activation closed over as constants (only N is a runtime size when compiled)."""
    hidden = n_heads * head_dim

    def pre_attention(x, ln_w, ln_b, qkv_w, qkv_b):
        """layer_norm1 and the fused q/k/v projection -> q, k, v [N, heads, head_dim] (views)."""
        n = x.shape[0]
        qkv = F.linear(F.layer_norm(x, (hidden,), ln_w, ln_b, eps), qkv_w, qkv_b)
        q = qkv[:, :hidden].view(n, n_heads, head_dim)
        k = qkv[:, hidden:2 * hidden].view(n, n_heads, head_dim)
        v = qkv[:, 2 * hidden:].view(n, n_heads, head_dim)
        return q, k, v

    def post_attention(x, attn, o_w, o_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b):
        """out_proj + residual, layer_norm2, fc1 + activation, fc2 + residual. x, attn: [N, hidden]."""
        x = x + F.linear(attn, o_w, o_b)
        h = act(F.linear(F.layer_norm(x, (hidden,), ln_w, ln_b, eps), fc1_w, fc1_b))
        return x + F.linear(h, fc2_w, fc2_b)

    return pre_attention, post_attention


def _plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear  # an adapter-wrapped projection would hide its delta from us


class SiglipLayers:
    """A stack of SigLIP encoder layers run through `siglip_halves` (compiled or not), attention eager."""

    def __init__(self, layers, n_heads: int, head_dim: int, eps: float, compile_layers: bool = False):
        self.layers = list(layers)
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            if not all(_plain_linear(p) for p in (a.q_proj, a.k_proj, a.v_proj, a.out_proj, mlp.fc1, mlp.fc2)):
                raise TypeError("SigLIP projections are wrapped (an adapter?); the fused encoder reads plain weights")
        self.n_heads, self.head_dim = n_heads, head_dim
        self.scaling = head_dim ** -0.5
        act = self.layers[0].mlp.activation_fn if self.layers else None
        self.pre, self.post = siglip_halves(n_heads, head_dim, eps, act)
        self.halves = (self.pre, self.post)
        if compile_layers:
            self.halves = (torch.compile(self.pre), torch.compile(self.post))
        self.compiled = compile_layers
        self._weights: list[tuple] = []
        self._source: tuple = ()

    def weights(self) -> list[tuple]:
        """Per layer: (ln1 w, b, qkv w, b, out w, b, ln2 w, b, fc1 w, b, fc2 w, b), the QKV weight and
        bias concatenated once (rebuilt if the model's tensors were moved or replaced since)."""
        source = tuple((l.self_attn.q_proj.weight.data_ptr(), l.self_attn.q_proj.weight.device) for l in self.layers)
        if source != self._source:
            self._weights = []
            for layer in self.layers:
                a, mlp = layer.self_attn, layer.mlp
                qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
                qkv_b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
                self._weights.append((layer.layer_norm1.weight, layer.layer_norm1.bias, qkv_w, qkv_b,
                                      a.out_proj.weight, a.out_proj.bias,
                                      layer.layer_norm2.weight, layer.layer_norm2.bias,
                                      mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias))
            self._source = source
        return self._weights

    def encode(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """The layers over `x` [crops, patches, hidden]; `key_mask` [crops, patches] True for the
        patches each crop attends (None: all, bidirectional)."""
        crops, patches, hidden = x.shape
        n = crops * patches
        h = x.reshape(n, hidden)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        pre, post = self.halves
        for ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b in self.weights():
            if self.compiled:
                torch._dynamo.maybe_mark_dynamic(h, 0)
            q, k, v = pre(h, ln1_w, ln1_b, qkv_w, qkv_b)
            q, k, v = (t.view(crops, patches, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            attn = attn.transpose(1, 2).reshape(n, hidden)
            if self.compiled:
                torch._dynamo.maybe_mark_dynamic(attn, 0)
            h = post(h, attn, o_w, o_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b)
        return h.view(crops, patches, hidden)


class FusedSiglip:
    """SigLIP patch features of `image_embed` (a Phi4MultimodalImageEmbedding) up to its feature layer."""

    def __init__(self, image_embed, compile_layers: bool = False):
        vision = image_embed.img_processor
        cfg = vision.config
        layers = vision.encoder.layers
        # hidden_states holds the embeddings and then each layer's output: index i = after i layers
        self.depth = image_embed.layer_idx if image_embed.layer_idx >= 0 else len(layers) + 1 + image_embed.layer_idx
        if not 0 <= self.depth <= len(layers):
            raise ValueError(f"feature layer {image_embed.layer_idx} outside the {len(layers)} SigLIP layers")
        self.image_embed = image_embed
        self.stack = SiglipLayers(layers[:self.depth], cfg.num_attention_heads,
                                  cfg.hidden_size // cfg.num_attention_heads, cfg.layer_norm_eps, compile_layers)
        self.layers = self.stack.layers
        self.compiled = compile_layers
        self.patches_per_side = cfg.image_size // cfg.patch_size

    def encode(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.stack.encode(x, key_mask)

    def hidden(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The feature layer's hidden states [crops, patches, hidden] (what `hidden_states[feature_layer]`
        of the model's vision tower holds). Crops with and without padded patches run as two groups, so
        the unpadded ones take the maskless (flash) attention."""
        vision = self.image_embed.img_processor
        crops = pixel_values.shape[0]
        if patch_mask is None:
            side = self.patches_per_side
            patch_mask = torch.ones(crops, side, side, dtype=torch.bool, device=pixel_values.device)
        patch_mask = patch_mask.bool()
        x = vision.embeddings(pixel_values=pixel_values, patch_attention_mask=patch_mask)
        valid = patch_mask.reshape(crops, -1)
        # a crop with no real patch (only possible for an extreme aspect ratio) attends all of them: its
        # features are cut away by the model's assembly, this only keeps its softmax finite
        valid = valid | ~valid.any(-1, keepdim=True)
        padded = ~valid.all(-1)
        padded_rows = padded.nonzero().flatten()
        if padded_rows.numel() == 0:  # one host sync per call (the rows' count)
            return self.encode(x, None)
        if padded_rows.numel() == crops:
            return self.encode(x, valid)
        full_rows = (~padded).nonzero().flatten()
        out = torch.empty_like(x)
        out.index_copy_(0, full_rows, self.encode(x.index_select(0, full_rows), None))
        out.index_copy_(0, padded_rows, self.encode(x.index_select(0, padded_rows), valid.index_select(0, padded_rows)))
        return out

    def features(self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """= Phi4MultimodalImageEmbedding.get_img_features: the feature layer's patches, 2x2 average
        pooled with the model's own modules -> [crops, pooled patches, hidden]."""
        embed = self.image_embed
        feature = self.hidden(pixel_values, attention_mask)
        width = int(math.sqrt(feature.size(1)))
        feature = feature.view(-1, width, width, feature.size(-1)).permute(0, 3, 1, 2)  # NCHW
        if getattr(embed, "img_processor_padding", None) is not None:
            feature = embed.img_processor_padding(feature)
        feature = embed.image_token_compression(feature).permute(0, 2, 3, 1)  # NHWC
        return feature.reshape(-1, feature.size(1) * feature.size(2), feature.size(-1))


def _image_embeddings(model) -> list:
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    return [m for m in model.modules() if isinstance(m, Phi4MultimodalImageEmbedding)]


def install_vision_encoder(model: torch.nn.Module, mode: str = "auto") -> int:
    """Replace `get_img_features` of every image embedding inside `model` by the fused encoder.

    `mode` (schemas/config.py BatchingConfig.vision_encoder): "compiled" (halves compiled by
    torch.compile), "eager" (the same functions uncompiled), "model" (leave the model's own), "auto"
    (compiled on CUDA, the model's own elsewhere). Returns how many were replaced. Idempotent: a second
    call replaces the previous installation."""
    embeds = _image_embeddings(model)
    for embed in embeds:
        embed.__dict__.pop("get_img_features", None)  # back to the class's method
        embed.__dict__.pop("_fused_siglip", None)
    if mode == "model" or not embeds:
        return 0
    device = next(model.parameters()).device
    if mode == "auto":
        if device.type != "cuda":
            return 0
        mode = "compiled"
    count = 0
    for embed in embeds:
        try:
            fused = FusedSiglip(embed, compile_layers=mode == "compiled")
        except (TypeError, ValueError) as exc:
            log.warning("fused vision encoder not installed (%s); the model's own runs", exc)
            continue
        embed._fused_siglip = fused
        embed.get_img_features = types.MethodType(_get_img_features, embed)
        count += 1
    return count


def _get_img_features(self, img_embeds: torch.Tensor, attention_mask=None) -> torch.Tensor:
    fused = self.__dict__.get("_fused_siglip")
    if fused is not None:
        try:
            return fused.features(img_embeds, attention_mask)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a compiler or kernel problem must cost speed, not the run
            log.warning("fused vision encoder (%s) failed (%s: %s); the model's own runs from now on",
                        "compiled" if fused.compiled else "eager", type(exc).__name__, exc)
            self.__dict__.pop("_fused_siglip", None)
            self.__dict__.pop("get_img_features", None)
    return type(self).get_img_features(self, img_embeds, attention_mask)
