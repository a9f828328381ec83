"""Which layout a Phi-4-multimodal checkpoint is in, and the conversion of the main-branch layout.

Users hold the checkpoint in one of two layouts:

- **native** (`model_type: phi4_multimodal`): what transformers' own classes load, the hub's
  `refs/pr/70` revision; the adapters sit in `speech-lora/` and `vision-lora/` PEFT folders;
- **remote-code** (`model_type: phi4mm`, an `auto_map` naming `modeling_phi4mm`): the hub's main
  branch, the one the model card loads with `trust_remote_code=True`. Its weights use the remote code's
  module names, its LoRA weights live inline in the base checkpoint (`...qkv_proj.base_layer.weight`,
  `...qkv_proj.lora_A.speech.weight`, `...lora_B.vision.weight`), and its processor files name
  remote classes.

`inspect_checkpoint` reads a checkpoint's config and the safetensors headers (never the tensors) through
any fsspec filesystem (local disk, S3, the hub), says which layout it is in and fingerprints its
weights, or raises `CheckpointError` with one message naming what is missing and how to fix it.
`convert_checkpoint` writes a remote-code checkpoint out in the native layout. Nothing here imports or
runs the checkpoint's own code: both work on JSON and safetensors files.

The weight-name mapping follows transformers' `convert_phi4_multimodal_weights_to_hf.py` (read, not
copied). Where this module differs from it:

- the audio config's `depthwise_seperable_out_channel` (sic) is carried over as
  `depthwise_separable_out_channel`; upstream drops it, which is harmless only because the real value
  (1024) equals the native default;
- the vision tower's sizes come from the weights' shapes (the remote code hard-codes SigLIP-so400m:
  1152 wide, 4304 FFN, 16 heads; upstream keeps the native defaults, the same numbers). Heads cannot be
  read off a shape: 16, or `img_processor.num_attention_heads` when the config has one;
- end-of-sequence ids come from the checkpoint's `generation_config.json` (upstream hard-codes
  [199999, 200020]), the image/audio placeholder ids from its tokenizer (the remote code's constants
  200010/200011 are the fallback), and the LoRA ranks and alphas from its `speech_lora`/`vision_lora`
  config entries (upstream hard-codes r=320/alpha=640 and r=256/alpha=512);
- adapter tensors are stored under PEFT's own key prefix (`base_model.model.`), as `save_pretrained`
  writes them, and a checkpoint without inline LoRA weights is refused instead of converted into empty
  adapters;
- the tensors are copied shard by shard (one source shard in memory at a time) instead of building the
  whole model on the meta device, and every expected tensor is checked against the native names;
- the processor is written from its JSON files with the native classes, never through the remote
  processor class; the chat template is replaced by one that accepts structured message parts (the
  main branch's template only takes strings, the pipeline sends `{"type": "audio"}` parts).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

__all__ = ["NATIVE", "REMOTE_CODE", "CheckpointError", "CheckpointInfo", "inspect_checkpoint", "detect_layout",
           "convert_checkpoint", "remote_key_to_native", "read_config_layout", "is_remote_code_config",
           "placeholder_ids", "FINGERPRINT_METHOD"]

NATIVE = "native"
REMOTE_CODE = "remote-code"
ADAPTERS = {"speech": "speech-lora", "vision": "vision-lora"}
MIB = 1 << 20
FINGERPRINT_METHOD = ("sha256 over each weight file's path, size, safetensors header and first and last MiB "
                      "of tensor data")

# The main-branch weight names that transformers' native classes call differently (remote -> native).
_RENAMES = [
    (re.compile(r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))"
                r"\.net\.0\.linear\."), r"\1.gate_up_proj."),
    (re.compile(r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))"
                r"\.net\.2\."), r"\1.down_proj."),
    (re.compile(r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.self_attn)\.linear_([qkv])\."),
     r"\1.\2_proj."),
    (re.compile(r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.self_attn)\.linear_out\."),
     r"\1.o_proj."),
    (re.compile(r"^model\.embed_tokens_extend\.image_embed\.img_projection\.0\."),
     "model.embed_tokens_extend.image_embed.img_projection_up."),
    (re.compile(r"^model\.embed_tokens_extend\.image_embed\.img_projection\.2\."),
     "model.embed_tokens_extend.image_embed.img_projection_down."),
    (re.compile(r"^model\.embed_tokens_extend\.image_embed\.glb_GN$"),
     "model.embed_tokens_extend.image_embed.global_img_feature_extensor"),
    (re.compile(r"^model\.embed_tokens_extend\.image_embed\.sub_GN$"),
     "model.embed_tokens_extend.image_embed.sub_img_feature_extensor"),
    (re.compile(r"^model\.embed_tokens_extend\.audio_embed\.audio_projection\.speech\.0\."),
     "model.embed_tokens_extend.audio_embed.up_proj_for_speech."),
    (re.compile(r"^model\.embed_tokens_extend\.audio_embed\.audio_projection\.speech\.2\."),
     "model.embed_tokens_extend.audio_embed.down_proj_for_speech."),
    (re.compile(r"^model\.embed_tokens_extend\.audio_embed\.audio_projection\.vision\.0\."),
     "model.embed_tokens_extend.audio_embed.up_proj_for_vision_speech."),
    (re.compile(r"^model\.embed_tokens_extend\.audio_embed\.audio_projection\.vision\.2\."),
     "model.embed_tokens_extend.audio_embed.down_proj_for_vision_speech."),
]
# inline LoRA: <module>.lora_A.speech.weight / <module>.lora_B.vision.weight
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>speech|vision)\.weight$")
LORA_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"
_LORA_MODULE = re.compile(r"^model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)$")
PEFT_PREFIX = "base_model.model."

# What a complete checkpoint's weights hold (native names): one sentinel per part.
_PARTS = {
    "text decoder": "model.embed_tokens.weight",
    "audio encoder": "model.embed_tokens_extend.audio_embed.encoder.encoder_embedding.global_mean",
    "vision encoder": "model.embed_tokens_extend.image_embed.img_processor.embeddings.patch_embedding.weight",
}
# The remote code's placeholder ids (modeling_phi4mm.py: _IMAGE_SPECIAL_TOKEN_ID, _AUDIO_SPECIAL_TOKEN_ID)
REMOTE_IMAGE_TOKEN_ID, REMOTE_AUDIO_TOKEN_ID = 200010, 200011
_SIGLIP_HEADS = 16  # the remote code's hard-coded SigLIP-so400m tower

FETCH_HINT = ("copy the complete checkpoint again (every file of microsoft/Phi-4-multimodal-instruct, main "
              "branch or revision refs/pr/70), or convert it ahead with `phi4mm convert-checkpoint SRC DST`")


class CheckpointError(ValueError):
    """A checkpoint the pipeline cannot use: one message naming what is missing and how to fix it."""


# -- reading a checkpoint (config, headers, fingerprint) ----------------------------------------------

@dataclass(frozen=True)
class WeightFile:
    path: str  # relative to the checkpoint root, "/"-separated
    size: int
    tensors: dict  # name -> {"dtype", "shape", "data_offsets"} (the safetensors header, no __metadata__)
    digest: str  # sha256 of path, size, header and the first/last MiB of data


@dataclass(frozen=True)
class CheckpointInfo:
    """What `inspect_checkpoint` found: the layout and a fingerprint of the weights."""
    layout: str  # NATIVE or REMOTE_CODE
    weights_sha: str | None  # sha256 over the weight files' digests (FINGERPRINT_METHOD)
    files: dict = field(default_factory=dict)  # weight file -> size
    config: dict = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return sum(self.files.values())


def read_safetensors_header(read_range, size: int, label: str) -> tuple[dict, bytes]:
    """(header dict, raw header bytes) of a safetensors file, through `read_range(start, end)`."""
    if size < 8:
        raise CheckpointError(f"{label}: {size} bytes, too short to be a safetensors file (a half-copied "
                              f"file?); {FETCH_HINT}")
    (length,) = struct.unpack("<Q", read_range(0, 8))
    if length <= 0 or 8 + length > size:
        raise CheckpointError(f"{label}: cut short ({size} bytes, its header alone claims {8 + length}); "
                              f"{FETCH_HINT}")
    raw = read_range(8, 8 + length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{label}: unreadable safetensors header ({exc}); {FETCH_HINT}") from exc
    return header, raw


def _read_weight_file(fs, path: str, rel: str, size: int, label: str) -> WeightFile:
    def read_range(start: int, end: int) -> bytes:
        return fs.cat_file(path, start=start, end=end)

    header, raw = read_safetensors_header(read_range, size, f"{label}: {rel}")
    header.pop("__metadata__", None)
    end_of_data = max((t["data_offsets"][1] for t in header.values()), default=0)
    expected = 8 + len(raw) + end_of_data
    if size != expected:
        raise CheckpointError(f"{label}: {rel} has {size} bytes, its header says {expected} (a half-copied "
                              f"file); {FETCH_HINT}")
    data_start = 8 + len(raw)
    digest = hashlib.sha256()
    digest.update(f"{rel}\0{size}\0".encode())
    digest.update(raw)
    digest.update(read_range(data_start, min(size, data_start + MIB)))
    if size - MIB > data_start + MIB:
        digest.update(read_range(size - MIB, size))
    return WeightFile(rel, size, header, digest.hexdigest())


def _read_json(fs, path: str, label: str) -> dict:
    try:
        data = json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise CheckpointError(f"{label}: {os.path.basename(path)} is not valid JSON ({exc}); {FETCH_HINT}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{label}: {os.path.basename(path)} is not a JSON object; {FETCH_HINT}")
    return data


def inspect_checkpoint(fs, root: str, label: str, need_weights: bool = True) -> CheckpointInfo:
    """Layout and fingerprint of the checkpoint under `root` on `fs`, or CheckpointError.

    Reads config.json, the adapter configs, the weight index and each safetensors file's header plus two
    MiB of its data: a few MB of reads for the 11 GB checkpoint, also on S3 or the hub.
    """
    root = root.rstrip("/")
    listing = {}
    for path, info in fs.find(root, detail=True).items():
        if info.get("type", "file") == "directory" or path.endswith("/"):
            continue
        rel = path[len(root):].lstrip("/") if path.startswith(root) else os.path.basename(path)
        listing[rel] = (path, int(info.get("size") or 0))
    if "config.json" not in listing:
        what = "is empty" if not listing else "has no config.json"
        raise CheckpointError(f"{label} {what}: not a checkpoint folder (a wrong path, or a copy that has "
                              f"not finished?); {FETCH_HINT}")
    config = _read_json(fs, listing["config.json"][0], label)
    layout = read_config_layout(config, label)
    if not need_weights:
        return CheckpointInfo(layout, None, {}, config)
    index = None
    if "model.safetensors.index.json" in listing:
        index = _read_json(fs, listing["model.safetensors.index.json"][0], label)
    weights: dict[str, WeightFile] = {}
    for rel, (path, size) in sorted(listing.items()):
        if rel.endswith(".safetensors") and (rel.count("/") == 0 or rel.split("/")[0] in ADAPTERS.values()):
            weights[rel] = _read_weight_file(fs, path, rel, size, label)
    adapter_configs = {}
    for sub in ADAPTERS.values():
        if f"{sub}/adapter_config.json" in listing:
            adapter_configs[sub] = _read_json(fs, listing[f"{sub}/adapter_config.json"][0], label)
    check_checkpoint(layout, config, index, weights, adapter_configs, set(listing), label)
    digest = hashlib.sha256()
    for rel in sorted(weights):
        digest.update(f"{rel}\0{weights[rel].digest}\n".encode())
    return CheckpointInfo(layout, digest.hexdigest(), {rel: w.size for rel, w in weights.items()}, config)


# -- the checks (pure functions over the JSON and the headers) ----------------------------------------

def is_remote_code_config(config: dict) -> bool:
    """The main branch's config: `model_type: phi4mm` or an `auto_map` naming its remote classes."""
    auto_map = config.get("auto_map") or {}
    return config.get("model_type") == "phi4mm" or any("phi4mm" in str(v).lower() for v in auto_map.values())


def read_config_layout(config: dict, label: str) -> str:
    """NATIVE or REMOTE_CODE from config.json alone; CheckpointError for another model or a config
    without its audio or vision part."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    remote = is_remote_code_config(config)
    if model_type == "phi4_multimodal" and not remote:
        for part, key in (("audio", "audio_config"), ("vision", "vision_config")):
            if not isinstance(config.get(key), dict):
                raise _missing_part(label, part, f"`{key}`")
        return NATIVE
    if remote:
        embd = config.get("embd_layer") or {}
        if not isinstance((config.get("audio_processor") or {}).get("config"), dict) or \
                not isinstance(embd.get("audio_embd_layer"), dict):
            raise _missing_part(label, "audio", "`audio_processor.config` and `embd_layer.audio_embd_layer`")
        if not isinstance(embd.get("image_embd_layer"), dict):
            raise _missing_part(label, "vision", "`embd_layer.image_embd_layer`")
        return REMOTE_CODE
    what = model_type or "unknown"
    if architectures:
        what += f" ({', '.join(map(str, architectures))})"
    raise CheckpointError(
        f"{label} is a {what} checkpoint, not Phi-4-multimodal-instruct: this pipeline runs "
        f"microsoft/Phi-4-multimodal-instruct only; point --model at it (hub id, or a local or s3:// copy of "
        f"either its main branch or its refs/pr/70 revision)")


def _missing_part(label: str, part: str, keys: str) -> CheckpointError:
    return CheckpointError(
        f"{label}: config.json has no {part} part ({keys} missing), so its {part} replicas cannot be built; "
        f"this is not the full Phi-4-multimodal-instruct config (a text-only or edited copy?): use the "
        f"checkpoint's own config.json; {FETCH_HINT}")


def detect_layout(config: dict, tensor_names, label: str = "checkpoint") -> str:
    """The layout from the config and the weight names together (they must agree)."""
    layout = read_config_layout(config, label)
    names = set(tensor_names)
    remote_names = any(".base_layer." in n or _LORA.match(n) or ".net.0.linear." in n for n in names)
    if layout == NATIVE and remote_names:
        raise CheckpointError(f"{label}: config.json says native layout but the weights use the main branch's "
                              f"(remote-code) names: config and weights come from different copies; {FETCH_HINT}")
    if layout == REMOTE_CODE and names and not remote_names:
        raise CheckpointError(f"{label}: config.json is the main branch's (remote-code) but the weights have no "
                              f"inline LoRA or remote-code names: config and weights come from different copies; "
                              f"{FETCH_HINT}")
    return layout


def check_checkpoint(layout: str, config: dict, index: dict | None, weights: dict, adapter_configs: dict,
                     files: set, label: str) -> None:
    """Refuse a half-copied checkpoint or one whose adapter weights are missing."""
    base = {rel: w for rel, w in weights.items() if "/" not in rel}
    if index is not None:
        listed = sorted(set((index.get("weight_map") or {}).values()))
        missing = [f for f in listed if f not in base]
        if missing:
            raise CheckpointError(
                f"{label} is half-copied: {len(missing)} of the {len(listed)} weight files that "
                f"model.safetensors.index.json lists are missing ({', '.join(missing)}); {FETCH_HINT}")
        names = set()
        for f in listed:
            names.update(base[f].tensors)
        absent = sorted(set(index.get("weight_map") or {}) - names)
        if absent:
            raise CheckpointError(f"{label}: {len(absent)} tensors the index lists are in no weight file "
                                  f"(first: {absent[0]}); {FETCH_HINT}")
    elif not base:
        raise CheckpointError(f"{label} has no weights (*.safetensors next to config.json; .bin/.pt checkpoints "
                              f"are not read); {FETCH_HINT}")
    names = {n for w in base.values() for n in w.tensors}
    detect_layout(config, names, label)
    native_names = {remote_key_to_native(n) for n in names} if layout == REMOTE_CODE else names
    for part, sentinel in _PARTS.items():
        if sentinel not in native_names:
            raise CheckpointError(f"{label}: the weights have no {part} ({sentinel} missing): not a complete "
                                  f"Phi-4-multimodal-instruct checkpoint; {FETCH_HINT}")
    if layout == REMOTE_CODE:
        for adapter, sub in ADAPTERS.items():
            lora = [n for n in names if (m := _LORA.match(n)) and m["adapter"] == adapter]
            if not lora:
                raise CheckpointError(
                    f"{label}: no {adapter} LoRA weights (`*.lora_A.{adapter}.weight`) inline in the weights, so "
                    f"the {adapter} replicas cannot be built: the main-branch checkpoint stores both adapters "
                    f"inside its model-*.safetensors files; {FETCH_HINT}")
        return
    for adapter, sub in ADAPTERS.items():
        for needed in (f"{sub}/adapter_config.json", f"{sub}/adapter_model.safetensors"):
            if needed not in files:
                raise CheckpointError(
                    f"{label}: no {needed}, so the {adapter} replicas cannot be built: the native layout keeps "
                    f"the adapters in speech-lora/ and vision-lora/ (the hub's refs/pr/70 revision has both); "
                    f"{FETCH_HINT}")


def remote_key_to_native(name: str) -> str | None:
    """The native name of a main-branch tensor; None for the inline LoRA tensors (they go to the
    adapter folders)."""
    if _LORA.match(name):
        return None
    for pattern, replacement in _RENAMES:
        new, n = pattern.subn(replacement, name)
        if n:
            return new
    return name.replace(".base_layer.", ".")


# -- conversion -----------------------------------------------------------------------------------------

def convert_config(config: dict, shapes: dict | None = None, eos_token_id=None, token_ids: dict | None = None
                   ) -> dict:
    """The native config.json (a dict) for a main-branch config. `shapes`: native tensor name -> shape,
    for the vision tower's sizes; `token_ids`: {"image": id, "audio": id}."""
    from transformers import Phi4MultimodalConfig

    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
                 "max_position_embeddings", "original_max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "tie_word_embeddings", "bos_token_id", "pad_token_id",
                 "sliding_window")
    text = {k: config[k] for k in text_keys if k in config}
    rope = dict(config.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope_parameters = {"rope_type": "longrope" if rope_type in ("su", "yarn", "longrope") else rope_type,
                       "rope_theta": config.get("rope_theta", 10000.0),
                       "partial_rotary_factor": config.get("partial_rotary_factor", 1.0)}
    for key in ("short_factor", "long_factor"):
        if key in rope:
            rope_parameters[key] = rope[key]
    token_ids = token_ids or {}
    embd = config["embd_layer"]
    raw_audio = dict(config["audio_processor"]["config"])
    audio = {"hidden_size": raw_audio.get("attention_dim"), "num_attention_heads": raw_audio.get("attention_heads"),
             "intermediate_size": raw_audio.get("linear_units"),
             "nemo_conv_channels": (raw_audio.get("nemo_conv_settings") or {}).get("conv_channels"),
             "bias_max_distance": (raw_audio.get("relative_attention_bias_args") or {}).get("t5_bias_max_distance"),
             "depthwise_separable_out_channel": raw_audio.get("depthwise_seperable_out_channel",
                                                              raw_audio.get("depthwise_separable_out_channel")),
             "downsample_rate": embd["audio_embd_layer"].get("downsample_rate")}
    for key in ("activation", "chunk_size", "left_chunk", "dropout_rate", "ext_pw_out_channel",
                "depthwise_multiplier", "kernel_size", "conv_activation", "input_size", "conv_glu_type",
                "time_reduction", "num_blocks"):
        if key in raw_audio:
            audio[key] = raw_audio[key]
    audio = {k: v for k, v in audio.items() if v is not None}
    if "audio" in token_ids:
        audio["audio_token_id"] = token_ids["audio"]
    vision = {"crop_size": embd["image_embd_layer"].get("crop_size", 448)}
    declared = config.get("img_processor") if isinstance(config.get("img_processor"), dict) else {}
    vision["num_attention_heads"] = declared.get("num_attention_heads", _SIGLIP_HEADS)
    if shapes:
        vision.update(_vision_sizes(shapes))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size"):
        if key in declared and key not in vision:
            vision[key] = declared[key]
    if "image" in token_ids:
        vision["image_token_id"] = token_ids["image"]
    native = Phi4MultimodalConfig(**text, rope_parameters=rope_parameters,
                                  eos_token_id=eos_token_id if eos_token_id is not None else config.get("eos_token_id"),
                                  vision_config=vision, audio_config=audio)
    native.architectures = ["Phi4MultimodalForCausalLM"]
    dtype = config.get("torch_dtype") or config.get("dtype")
    out = native.to_diff_dict()
    if dtype:
        out["dtype"] = dtype
    return out


def _vision_sizes(shapes: dict) -> dict:
    prefix = "model.embed_tokens_extend.image_embed.img_processor."
    patch = shapes.get(prefix + "embeddings.patch_embedding.weight")
    positions = shapes.get(prefix + "embeddings.position_embedding.weight")
    fc1 = shapes.get(prefix + "encoder.layers.0.mlp.fc1.weight")
    layers = {int(m[1]) for n in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n))}
    sizes = {}
    if patch:
        sizes["hidden_size"], sizes["patch_size"] = patch[0], patch[2]
        if positions:
            sizes["image_size"] = int(round(positions[0] ** 0.5)) * patch[2]
    if fc1:
        sizes["intermediate_size"] = fc1[0]
    if layers:
        sizes["num_hidden_layers"] = max(layers) + 1
    return sizes


def placeholder_ids(tokenizer_config: dict, tokenizer_json: dict) -> dict[str, tuple[str, int]]:
    """{"image": (token, id), "audio": (token, id)}: the tokenizer's own image_token/audio_token when it
    names them, else the tokens at the remote code's ids 200010/200011."""
    by_id = {int(k): v.get("content") for k, v in (tokenizer_config.get("added_tokens_decoder") or {}).items()}
    by_id.update({t["id"]: t["content"] for t in tokenizer_json.get("added_tokens") or []})
    by_token = {v: k for k, v in by_id.items()}
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    found = {}
    for kind, default_id in (("image", REMOTE_IMAGE_TOKEN_ID), ("audio", REMOTE_AUDIO_TOKEN_ID)):
        token = tokenizer_config.get(f"{kind}_token")
        token_id = by_token.get(token, vocab.get(token)) if token else None
        if token_id is None:
            token, token_id = by_id.get(default_id), default_id
        if token is None:
            raise CheckpointError(f"the tokenizer has no {kind} placeholder token (id {default_id} in the real "
                                  f"tokenizer): not the Phi-4-multimodal-instruct tokenizer; {FETCH_HINT}")
        found[kind] = (token, int(token_id))
    return found


def chat_template(image_token: str, audio_token: str) -> str:
    """The main branch's chat format (`<|role|>content<|end|>`, then `<|assistant|>`), also for
    structured content: media parts become the placeholders the native processor expands."""
    return (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '" + image_token + "' }}"
        "{% elif item['type'] == 'audio' %}{{ '" + audio_token + "' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")


# processor files of the main branch that name remote classes: rewritten, not copied
_REWRITTEN = {"config.json", "generation_config.json", "tokenizer_config.json", "preprocessor_config.json",
              "processor_config.json", "chat_template.json", "chat_template.jinja", "model.safetensors.index.json"}
_SKIPPED_SUFFIXES = (".py", ".safetensors", ".bin", ".pt", ".pth", ".lock")


def convert_checkpoint(src: str, dst: str, weights: bool = True) -> dict:
    """Write the main-branch checkpoint in local folder `src` to `dst` in the native layout.

    `weights=False`: only the config, tokenizer and processor files (what CPU stages need). Returns a
    summary {"tensors", "bytes", "adapters"}. `dst` must be empty or absent; callers that need an atomic
    result write to a staging folder and rename it (pipeline/model/source.py)."""
    from safetensors import safe_open

    config = _load_json(os.path.join(src, "config.json"))
    if read_config_layout(config, src) != REMOTE_CODE:
        raise CheckpointError(f"{src}: not a main-branch (remote-code) checkpoint; nothing to convert")
    os.makedirs(dst, exist_ok=True)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        with safe_open(os.path.join(src, shard), "pt") as f:
            for name in f.keys():
                native = remote_key_to_native(name)
                if native is not None:
                    shapes[native] = f.get_slice(name).get_shape()
    tokenizer_config = _load_json(os.path.join(src, "tokenizer_config.json"), {})
    tokenizer_json = _load_json(os.path.join(src, "tokenizer.json"), {})
    placeholders = placeholder_ids(tokenizer_config, tokenizer_json)
    generation = _load_json(os.path.join(src, "generation_config.json"), {})
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    end_id = _token_id("<|end|>", tokenizer_config, tokenizer_json)
    if not isinstance(eos, list):
        eos = [eos] + ([end_id] if end_id is not None and end_id != eos else [])
    native_config = convert_config(config, shapes, eos, {k: v[1] for k, v in placeholders.items()})
    _write_json(os.path.join(dst, "config.json"), native_config)
    generation.update(eos_token_id=eos, bos_token_id=native_config.get("bos_token_id"),
                      pad_token_id=native_config.get("pad_token_id"))
    generation.pop("transformers_version", None)
    _write_json(os.path.join(dst, "generation_config.json"), generation)
    for name in sorted(os.listdir(src)):  # tokenizer.json, vocab, merges, added tokens, licences, ...
        path = os.path.join(src, name)
        if os.path.isfile(path) and name not in _REWRITTEN and not name.endswith(_SKIPPED_SUFFIXES) \
                and not name.startswith("."):
            with open(path, "rb") as fin, open(os.path.join(dst, name), "wb") as fout:
                fout.write(fin.read())
    _write_processor(src, dst, tokenizer_config, placeholders)
    summary = {"tensors": 0, "bytes": 0, "adapters": {}}
    if weights:
        summary = _convert_weights(src, dst, shards, config, native_config)
    return summary


def _token_id(token: str, tokenizer_config: dict, tokenizer_json: dict) -> int | None:
    for t in tokenizer_json.get("added_tokens") or []:
        if t.get("content") == token:
            return int(t["id"])
    for k, v in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        if v.get("content") == token:
            return int(k)
    return ((tokenizer_json.get("model") or {}).get("vocab") or {}).get(token)


def _write_processor(src: str, dst: str, tokenizer_config: dict, placeholders: dict) -> None:
    """Native tokenizer_config.json and processor_config.json, from the main branch's JSON files."""
    from transformers import AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor, \
        Phi4MultimodalProcessor

    image_token, audio_token = placeholders["image"][0], placeholders["audio"][0]
    tok = {k: v for k, v in tokenizer_config.items() if k not in ("auto_map", "chat_template", "processor_class")}
    tok["image_token"], tok["audio_token"] = image_token, audio_token
    extra = tok.get("extra_special_tokens")
    if isinstance(extra, dict):
        extra.update(image_token=image_token, audio_token=audio_token)
    _write_json(os.path.join(dst, "tokenizer_config.json"), tok)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    tokenizer.image_token, tokenizer.audio_token = image_token, audio_token
    tokenizer.image_token_id, tokenizer.audio_token_id = placeholders["image"][1], placeholders["audio"][1]
    pre = _load_json(os.path.join(src, "preprocessor_config.json"), {})
    audio_keys = ("audio_compression_rate", "audio_downsample_rate", "audio_feat_stride")
    image_keys = ("dynamic_hd",)
    processor = Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(**{k: pre[k] for k in image_keys if k in pre}),
        audio_processor=Phi4MultimodalFeatureExtractor(**{k: pre[k] for k in audio_keys if k in pre}),
        tokenizer=tokenizer, chat_template=chat_template(image_token, audio_token))
    processor.save_pretrained(dst)


def _convert_weights(src: str, dst: str, shards: list[str], config: dict, native_config: dict) -> dict:
    """Base tensors renamed shard by shard into the same number of files; inline LoRA into PEFT folders."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    lora: dict[str, dict[str, torch.Tensor]] = {"speech": {}, "vision": {}}
    weight_map: dict[str, str] = {}
    total = 0
    n = len(shards)
    for i, shard in enumerate(shards):
        out_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        with safe_open(os.path.join(src, shard), "pt") as f:
            for name in f.keys():
                m = _LORA.match(name)
                if m:
                    lora[m["adapter"]][f"{PEFT_PREFIX}{m['module']}.lora_{m['ab']}.weight"] = f.get_tensor(name)
                    continue
                native = remote_key_to_native(name)
                if native in tensors or native in weight_map:
                    raise CheckpointError(f"{src}: two tensors map to {native}; not a checkpoint this converter knows")
                tensors[native] = f.get_tensor(name)
        for name in tensors:
            weight_map[name] = out_name
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(dst, out_name), metadata={"format": "pt"})
        del tensors
    _check_native_names(src, native_config, set(weight_map))
    if n > 1:
        _write_json(os.path.join(dst, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    adapters = {}
    for adapter, sub in ADAPTERS.items():
        adapters[sub] = _write_adapter(src, os.path.join(dst, sub), lora[adapter], config.get(f"{adapter}_lora") or {})
    log.info("converted %s: %d tensors (%.2f GB) in %d files, adapters %s", src, len(weight_map), total / 1e9, n,
             adapters)
    return {"tensors": len(weight_map), "bytes": total, "adapters": adapters}


def _check_native_names(src: str, native_config: dict, names: set) -> None:
    """Every tensor the native model expects is there (the tied lm_head aside), and nothing else."""
    import torch
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    config = Phi4MultimodalConfig.from_dict(native_config)
    with torch.device("meta"):
        model = Phi4MultimodalForCausalLM(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: the converted weights do not match the native model: {len(missing)} missing "
            f"(first: {missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]}); a checkpoint "
            f"this converter does not know (an edited or partial copy?); {FETCH_HINT}")


def _write_adapter(src: str, folder: str, tensors: dict, declared: dict) -> dict:
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not tensors:
        raise CheckpointError(f"{src}: no inline LoRA weights for {os.path.basename(folder)}; {FETCH_HINT}")
    modules = {k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors}
    odd = sorted(m for m in modules if not _LORA_MODULE.match(m))
    if odd:
        raise CheckpointError(f"{src}: LoRA weights on modules the native adapters do not target ({odd[0]}, ...)")
    rank = next(t.shape[0] for k, t in tensors.items() if ".lora_A." in k)
    r = int(declared.get("r", rank))
    if r != rank:
        raise CheckpointError(f"{src}: config says {os.path.basename(folder)} rank {r}, the weights have {rank}")
    alpha = declared.get("lora_alpha", 2 * r)  # the model card's convention: alpha = 2r
    LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=float(declared.get("dp", 0.0)),
               task_type="CAUSAL_LM").save_pretrained(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"r": r, "lora_alpha": alpha, "tensors": len(tensors)}


def _load_json(path: str, default=None):
    if default is not None and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
