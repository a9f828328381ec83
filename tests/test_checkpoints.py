"""Checkpoints as users hold them: the main-branch (remote-code) layout, mirrored copies, offline caches.

The main-branch checkpoint is rebuilt here from the native tiny one, written out under the remote code's
names with the adapters inline, by a mapping written independently of pipeline/model/checkpoint_layout.py (the
inverse of transformers' convert_phi4_multimodal_weights_to_hf.py, by hand). Converted, it must generate
token for token what the native tiny model generates, for speech, image and text prompts, whether it
comes from a local folder, an s3:// prefix or the hub cache offline. Every refusal names what is
missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image



REMOTE_CHAT_TEMPLATE = (  # the main branch's template: string contents only
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

# native -> main-branch names (the inverse of the converter's table, written out by hand)
_TO_REMOTE = [
    (r"(encoders\.\d+\.feed_forward_(in|out))\.gate_up_proj\.", r"\1.net.0.linear."),
    (r"(encoders\.\d+\.feed_forward_(in|out))\.down_proj\.", r"\1.net.2."),
    (r"(encoders\.\d+\.self_attn)\.([qkv])_proj\.", r"\1.linear_\2."),
    (r"(encoders\.\d+\.self_attn)\.o_proj\.", r"\1.linear_out."),
    (r"image_embed\.img_projection_up\.", "image_embed.img_projection.0."),
    (r"image_embed\.img_projection_down\.", "image_embed.img_projection.2."),
    (r"image_embed\.global_img_feature_extensor$", "image_embed.glb_GN"),
    (r"image_embed\.sub_img_feature_extensor$", "image_embed.sub_GN"),
    (r"audio_embed\.up_proj_for_speech\.", "audio_embed.audio_projection.speech.0."),
    (r"audio_embed\.down_proj_for_speech\.", "audio_embed.audio_projection.speech.2."),
    (r"audio_embed\.up_proj_for_vision_speech\.", "audio_embed.audio_projection.vision.0."),
    (r"audio_embed\.down_proj_for_vision_speech\.", "audio_embed.audio_projection.vision.2."),
    (r"^(model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj))\.weight$", r"\1.base_layer.weight"),
]


def _remote_name(name: str) -> str:
    for pattern, replacement in _TO_REMOTE:
        new, n = re.subn(pattern, replacement, name)
        if n:
            return new
    return name


def _remote_config(native: dict, lora: dict) -> dict:
    audio, vision = native["audio_config"], native["vision_config"]
    rope = native["rope_parameters"]
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
                 "max_position_embeddings", "original_max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "tie_word_embeddings", "bos_token_id", "pad_token_id",
                 "sliding_window")
    return {
        "_name_or_path": "Phi-4-multimodal-instruct", "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm",
        "auto_map": {"AutoConfig": "configuration_phi4mm.Phi4MMConfig",
                     "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM", "AutoTokenizer": "Xenova/gpt-4o"},
        **{k: native[k] for k in text_keys},
        "eos_token_id": native["bos_token_id"], "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "rope_scaling": {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
        "audio_processor": {"name": "cascades", "config": {
            "activation": audio["activation"], "activation_checkpointing": {"interval": 1, "module": "transformer"},
            "attention_dim": audio["hidden_size"], "attention_heads": audio["num_attention_heads"],
            "batch_norm": False, "bias_in_glu": True, "causal": True, "chunk_size": audio["chunk_size"],
            "cnn_layer_norm": True, "conv_activation": audio["conv_activation"],
            "conv_glu_type": audio["conv_glu_type"], "depthwise_multiplier": audio["depthwise_multiplier"],
            "depthwise_seperable_out_channel": audio["depthwise_separable_out_channel"],
            "dropout_rate": audio["dropout_rate"], "encoder_embedding_config": {"input_size": audio["input_size"]},
            "ext_pw_kernel_size": 1, "ext_pw_out_channel": audio["ext_pw_out_channel"], "input_layer": "nemo_conv",
            "input_size": audio["input_size"], "kernel_size": audio["kernel_size"], "left_chunk": audio["left_chunk"],
            "linear_units": audio["intermediate_size"],
            "nemo_conv_settings": {"conv_channels": audio["nemo_conv_channels"]}, "num_blocks": audio["num_blocks"],
            "relative_attention_bias_args": {"t5_bias_max_distance": audio["bias_max_distance"], "type": "t5"},
            "time_reduction": audio["time_reduction"]}},
        "embd_layer": {"embedding_cls": "image_audio",
                       "audio_embd_layer": {"compression_rate": audio["time_reduction"],
                                            "downsample_rate": audio["downsample_rate"], "embedding_cls": "audio",
                                            "projection_cls": "mlp", "use_conv_downsample": False,
                                            "use_qformer": False},
                       "image_embd_layer": {"crop_size": vision["crop_size"], "embedding_cls": "tune_image",
                                            "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                                            "use_hd_transform": True, "with_learnable_separator": True}},
        # the remote code hard-codes a 16-head SigLIP-so400m; the tiny tower says its own head count
        "img_processor": {"num_attention_heads": vision["num_attention_heads"]},
        "speech_lora": {"r": lora["speech"]["r"], "lora_alpha": lora["speech"]["lora_alpha"], "dp": 0.0,
                        "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))"},
        "vision_lora": {"r": lora["vision"]["r"], "lora_alpha": lora["vision"]["lora_alpha"], "dp": 0.0,
                        "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))"},
        "torch_dtype": native["dtype"], "transformers_version": "4.48.2",
    }


def write_remote_layout(native_dir: str | Path, out: str | Path) -> Path:
    """The native tiny checkpoint as the hub's main branch holds it: remote names, adapters inline, two
    shards with an index, remote processor files and code that must never run."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    native_dir, out = Path(native_dir), Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with safe_open(native_dir / "model.safetensors", "pt") as f:
        tensors = {_remote_name(k): f.get_tensor(k) for k in f.keys()}
    lora = {}
    for adapter in ("speech", "vision"):
        sub = native_dir / f"{adapter}-lora"
        cfg = json.loads((sub / "adapter_config.json").read_text())
        lora[adapter] = cfg
        with safe_open(sub / "adapter_model.safetensors", "pt") as f:
            for k in f.keys():
                module, ab = re.match(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$", k).groups()
                tensors[f"{module}.lora_{ab}.{adapter}.weight"] = f.get_tensor(k)
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for k, t in tensors.items():
        shards["model-0000%d-of-00002.safetensors" % (2 if "embed_tokens_extend" in k else 1)][k] = t
    for name, part in shards.items():
        save_file(part, out / name, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: name for name, part in shards.items() for k in part}}))
    native = json.loads((native_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(_remote_config(native, lora), indent=2))
    generation = json.loads((native_dir / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": generation["bos_token_id"], "eos_token_id": list(reversed(generation["eos_token_id"])),
         "pad_token_id": generation["pad_token_id"], "transformers_version": "4.48.2"}))
    shutil.copy(native_dir / "tokenizer.json", out / "tokenizer.json")
    tok = json.loads((native_dir / "tokenizer_config.json").read_text())
    tok.update(chat_template=REMOTE_CHAT_TEMPLATE, processor_class="Phi4MMProcessor")
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_phi4mm.Phi4MMProcessor",
                     "AutoImageProcessor": "processing_phi4mm.Phi4MMImageProcessor",
                     "AutoFeatureExtractor": "processing_phi4mm.Phi4MMAudioFeatureExtractor"},
        "image_processor_type": "Phi4MMImageProcessor", "feature_extractor_type": "Phi4MMAudioFeatureExtractor",
        "processor_class": "Phi4MMProcessor", "audio_compression_rate": 8, "audio_downsample_rate": 1,
        "audio_feat_stride": 1, "dynamic_hd": 36}))
    for code in ("modeling_phi4mm.py", "configuration_phi4mm.py", "processing_phi4mm.py"):
        (out / code).write_text("raise RuntimeError('the checkpoint's own code was executed')\n")
    return out


@pytest.fixture(scope="module")
def remote_model(tiny_model, tmp_path_factory) -> str:
    return str(write_remote_layout(tiny_model, tmp_path_factory.mktemp("remote") / "phi4mm-main"))


# -- generation: converted == native, token for token --------------------------------------------------

MAX = 16
PROMPTS = {"speech": "Transcribe the audio clip into text.",
           "vision": "Extract all the text from this document page. Use Markdown for headings and tables.",
           "text": "Summarize the following meeting transcript. Thank you for calling, how can I help you today?"}


def _generations(model_dir: str) -> dict[str, list[int]]:
    """Greedy tokens of the engine (the pipeline's loader: adapters merged) for one prompt per modality."""
    from actors.engine import Phi4MMEngine
    from pipeline.media.audio import decode_audio
    from pipeline.model.inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig
    from tests.conftest import SAMPLES

    builder = InputBuilder(model_dir)
    audio = decode_audio((SAMPLES / "audio" / "call_0001.wav").read_bytes(), "call_0001.wav")[:16000 * 4]
    image = Image.open(SAMPLES / "docs" / "invoice.png").convert("RGB")
    items = {"speech": builder.audio(audio, PROMPTS["speech"]), "vision": builder.image(image, PROMPTS["vision"]),
             "text": builder.text(PROMPTS["text"])}
    out = {}
    for modality, item in items.items():
        engine = Phi4MMEngine(model_dir, modality, ModelConfig(source=model_dir, dtype="float32"), BatchingConfig())
        out[modality] = engine.generate_batch([item.inputs], MAX)[0].token_ids
        out[modality + "_prompt"] = item.inputs["input_ids"].tolist()
    return out


@pytest.fixture(scope="module")
def native_generations(tiny_model) -> dict[str, list[int]]:
    return _generations(tiny_model)


def _assert_same(native: dict, converted: dict) -> None:
    for modality in ("speech", "vision", "text"):
        assert converted[modality + "_prompt"] == native[modality + "_prompt"], f"{modality}: prompts differ"
        assert native[modality], f"{modality}: the native model generated nothing to compare"
        assert converted[modality] == native[modality], f"{modality}: generations differ"


def test_converted_main_branch_generates_as_native(remote_model, tiny_model, native_generations, tmp_path):
    from pipeline.model.source import COMPLETE_MARKER, describe_model, resolve_model

    info = describe_model(remote_model)
    assert info["layout"] == "remote-code" and len(info["weights_sha"]) == 64
    assert describe_model(tiny_model)["layout"] == "native"
    cache = tmp_path / "cache"
    folder = resolve_model(remote_model, cache_dir=str(cache))
    assert folder.startswith(str(cache)) and folder.endswith("-native")
    assert json.loads(Path(folder, COMPLETE_MARKER).read_text())["layout"] == "remote-code"
    assert sorted(os.listdir(Path(folder, "speech-lora"))) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in Path(folder).rglob("*.py")], "the remote code is not carried over"
    # once per node: a second call finds the conversion
    mtime = Path(folder, COMPLETE_MARKER).stat().st_mtime
    assert resolve_model(remote_model, cache_dir=str(cache)) == folder
    assert Path(folder, COMPLETE_MARKER).stat().st_mtime == mtime
    _assert_same(native_generations, _generations(folder))
    # the native tiny checkpoint itself is loaded where it is
    assert resolve_model(tiny_model, cache_dir=str(cache)) == tiny_model


def test_conversion_runs_once_per_node_under_the_lock(remote_model, tmp_path, monkeypatch):
    import time

    import pipeline.model.source as model_source
    from tests.conftest import run_concurrently

    calls = []
    real = model_source.convert_checkpoint

    def counting(src, dst, weights=True):
        calls.append(dst)
        time.sleep(0.3)  # both callers are inside resolve_model at once
        return real(src, dst, weights=weights)

    monkeypatch.setattr(model_source, "convert_checkpoint", counting)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (model_source._native_name(f"local:{remote_model}:{model_source._listing_key(remote_model)}", False)
              + ".tmp-999-dead")).mkdir()  # a conversion that died: cleared, not used
    results, errors = run_concurrently(lambda: model_source.resolve_model(remote_model, cache_dir=str(cache)))
    assert not errors and len(calls) == 1 and len(set(results)) == 1
    assert not [e for e in os.listdir(cache) if ".tmp-" in e]


def test_convert_checkpoint_command(remote_model, tmp_path, capsys):
    from jobs.cli import main
    from pipeline.model.source import describe_model

    dst = tmp_path / "native"
    assert main(["convert-checkpoint", remote_model, str(dst)]) == 0
    assert describe_model(str(dst))["layout"] == "native"
    assert "native" in capsys.readouterr().out
    # a native checkpoint, another model: one line each
    assert main(["convert-checkpoint", str(dst), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("phi4mm: ") and "already in the native layout" in err[0]


def test_main_branch_through_s3(s3, remote_model, native_generations, tmp_path, capsys):
    from jobs.cli import main
    from pipeline.model.source import describe_model, resolve_model

    for f in sorted(Path(remote_model).rglob("*")):
        if f.is_file():
            s3.put("models", f"phi4mm-main/{f.relative_to(remote_model).as_posix()}", f.read_bytes())
    uri = "s3://models/phi4mm-main/"
    info = describe_model(uri, options=s3.options)
    assert info["layout"] == "remote-code" and info["weights_sha"] == describe_model(remote_model)["weights_sha"]
    cache = tmp_path / "cache"
    folder = resolve_model(uri, cache_dir=str(cache), options=s3.options)
    assert folder.endswith("-native")
    assert [e for e in os.listdir(cache) if not e.endswith(".lock")] == [os.path.basename(folder)], \
        "the raw copy is removed once converted"
    assert resolve_model(uri, cache_dir=str(cache), options=s3.options) == folder
    processor_dir = resolve_model(uri, cache_dir=str(cache), options=s3.options, processor_only=True)
    assert processor_dir.endswith("-native-processor")
    assert not [p for p in Path(processor_dir).rglob("*.safetensors")]
    _assert_same(native_generations, _generations(folder))
    # the command, s3:// on both sides
    assert main(["convert-checkpoint", uri, "s3://models/phi4mm-native/", "--s3-endpoint",
                 s3.options.endpoint_url]) == 0
    assert describe_model("s3://models/phi4mm-native", options=s3.options)["layout"] == "native"


def _fake_hub_cache(cache: Path, repo: str, source: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache's layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_main_branch_from_hub_cache_offline(remote_model, native_generations, tmp_path, monkeypatch):
    from pipeline.model.source import describe_model, resolve_model

    hub_cache = tmp_path / "hub"
    _fake_hub_cache(hub_cache, "someone/phi4mm-mirror", remote_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = describe_model("someone/phi4mm-mirror", cache_dir=str(hub_cache))
    assert info["layout"] == "remote-code" and info["revision"] == "0123456789abcdef0123456789abcdef01234567"
    # the hub cache and the conversions share cache_dir here, as they do under one PHI4MM_CACHE root
    folder = resolve_model("someone/phi4mm-mirror", cache_dir=str(hub_cache))
    assert folder.endswith("-native") and Path(folder).parent == hub_cache
    _assert_same(native_generations, _generations(folder))
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache"):
        describe_model("someone/not-cached", cache_dir=str(hub_cache))


# -- refusals: one message naming what is missing and how to fix it ------------------------------------

def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _refusal(folder) -> str:
    from pipeline.model.source import CheckpointError, describe_model

    with pytest.raises(CheckpointError) as info:
        describe_model(str(folder))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_refuses_another_model(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path / "llama")
    _edit_json(folder / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    message = _refusal(folder)
    assert "is a llama (LlamaForCausalLM) checkpoint, not Phi-4-multimodal-instruct" in message
    assert "point --model at it" in message


def test_refuses_a_half_copied_folder(remote_model, tiny_model, tmp_path):
    folder = _copy(remote_model, tmp_path / "half")
    (folder / "model-00002-of-00002.safetensors").unlink()
    message = _refusal(folder)
    assert "is half-copied: 1 of the 2 weight files that model.safetensors.index.json lists are missing " \
           "(model-00002-of-00002.safetensors)" in message and "copy the complete checkpoint again" in message
    cut = _copy(tiny_model, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert f"model.safetensors has {len(data) // 2} bytes, its header says {len(data)} (a half-copied file)" \
        in _refusal(cut)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty: not a checkpoint folder" in _refusal(empty)
    no_weights = _copy(tiny_model, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    assert "has no weights (*.safetensors next to config.json" in _refusal(no_weights)


def test_refuses_missing_adapter_weights(remote_model, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    native = _copy(tiny_model, tmp_path / "native")
    shutil.rmtree(native / "speech-lora")
    message = _refusal(native)
    assert "no speech-lora/adapter_config.json, so the speech replicas cannot be built" in message
    assert "refs/pr/70 revision has both" in message
    remote = _copy(remote_model, tmp_path / "remote")
    for shard in remote.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: v for k, v in tensors.items() if ".vision." not in k}, shard)
    index = json.loads((remote / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".vision." not in k}
    (remote / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "no vision LoRA weights (`*.lora_A.vision.weight`) inline in the weights" in _refusal(remote)


def test_refuses_a_config_without_its_audio_or_vision_part(remote_model, tiny_model, tmp_path):
    remote = _copy(remote_model, tmp_path / "remote")
    _edit_json(remote / "config.json", audio_processor=None)
    message = _refusal(remote)
    assert "config.json has no audio part (`audio_processor.config` and `embd_layer.audio_embd_layer` missing)" \
        in message and "use the checkpoint's own config.json" in message
    native = _copy(tiny_model, tmp_path / "native")
    _edit_json(native / "config.json", vision_config=None)
    assert "config.json has no vision part (`vision_config` missing)" in _refusal(native)


def test_refuses_a_gated_hub_id_without_a_token(monkeypatch):
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    from pipeline.model.source import CheckpointError, describe_model

    def gated(self, repo_id, revision=None, **kwargs):
        request = httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise GatedRepoError("Access to model is restricted", response=httpx.Response(401, request=request))

    monkeypatch.setattr(HfApi, "model_info", gated)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(CheckpointError, match=r"someone/gated-phi4mm@main: the hub says this model is gated and the "
                                              r"job has no token that may read it; set HF_TOKEN"):
        describe_model("someone/gated-phi4mm")


def test_a_refused_model_stops_the_job_before_ray(tiny_model, tmp_path, capsys, monkeypatch):
    import jobs.runner

    started = []  # the test session may already run a Ray: what counts is that this job asks for none
    monkeypatch.setattr(jobs.runner, "init_ray", lambda settings: started.append(settings))

    from jobs.cli import main
    from tests.conftest import SAMPLES

    folder = _copy(tiny_model, tmp_path / "no-vision-lora")
    shutil.rmtree(folder / "vision-lora")
    rc = main(["ocr", str(SAMPLES / "ocr.csv"), str(tmp_path / "out"), "--model", str(folder)])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("phi4mm") and " rows read" not in line]  # the manifest count comes first
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"phi4mm: {folder}: no vision-lora/adapter_config.json")
    assert not started and not (tmp_path / "out").exists()


def test_layout_of_weights_and_config_must_agree(remote_model, tiny_model, tmp_path):
    mixed = _copy(tiny_model, tmp_path / "mixed")
    shutil.copy(Path(remote_model) / "config.json", mixed / "config.json")
    assert "config.json is the main branch's (remote-code) but the weights have no inline LoRA" in _refusal(mixed)


def test_placeholder_ids_fall_back_to_the_remote_code_constants():
    from pipeline.model.checkpoint_layout import CheckpointError, placeholder_ids

    tokenizer_json = {"added_tokens": [{"id": 200010, "content": "<|endoftext10|>"},
                                       {"id": 200011, "content": "<|endoftext11|>"}]}
    assert placeholder_ids({}, tokenizer_json) == {"image": ("<|endoftext10|>", 200010),
                                                   "audio": ("<|endoftext11|>", 200011)}
    with pytest.raises(CheckpointError, match="the tokenizer has no image placeholder token"):
        placeholder_ids({}, {"added_tokens": []})


# -- provenance: the run record and every row say which weights wrote them -------------------------------
# (last in this file: it starts the session's Ray, which the refusal test above must not find running)

@pytest.mark.realsize  # a whole job on a converted checkpoint (the generation-equality test above stays in the fast tier)
def test_job_on_main_branch_checkpoint_records_its_provenance(run_job, remote_model, tiny_model, tmp_path):
    import pandas as pd

    from pipeline.model.source import describe_model
    from tests.conftest import SAMPLES, read_output

    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"id": "call-1", "uri": str(SAMPLES / "audio" / "call_0001.wav"), "language": "en"}]).to_csv(
        manifest, index=False)
    config = tmp_path / "job.yaml"
    config.write_text(f"model:\n  cache_dir: {tmp_path / 'cache'}\n")
    out = tmp_path / "out"
    assert run_job("transcribe", manifest, out, "--max-new-tokens", "4", "--run-id", "main-branch",
                   "--config", str(config), model=remote_model) == 0
    rows = read_output(out).to_pandas()
    expected = describe_model(remote_model)
    assert len(rows) == 1 and rows.status.tolist() == ["ok"]
    assert rows.model_layout.tolist() == ["remote-code"]
    assert rows.model_weights_sha.tolist() == [expected["weights_sha"]]
    record = json.loads((out / "_runs" / "main-branch.json").read_text())
    assert record["model"]["layout"] == "remote-code" and record["model"]["weights_sha"] == expected["weights_sha"]
    assert record["model"]["source"] == remote_model
    assert describe_model(tiny_model)["weights_sha"] != expected["weights_sha"]
