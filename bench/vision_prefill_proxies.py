"""Where an ocr (or asr / summarize) prefill's time goes, and what the fused vision encoder and the fused
decoder's levers change: vision / merge / decoder split, each path on and off, plus CPU proxies.

    python -m bench.vision_prefill_proxies --out DIR                  # GPU: real shapes, random bf16 weights
    python -m bench.vision_prefill_proxies --tiny --out DIR           # CPU smoke run on the tiny checkpoint
    python -m bench.vision_prefill_proxies --cpu-proxies              # CPU: op counts of one real-width layer

One JSON object per measurement on stdout (and OUT/vision-prefill.jsonl); OUT/ocr-prefill-kernels.txt
holds the profiler's top kernels of one fused ocr prefill (vision + merge + decoder) on CUDA.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np
import torch

# the fused decoder's lever sets, from the first version to all levers on
DECODER_VARIANTS = {
    "first": {"compile": "dynamic", "gqa": False, "unpad": False},
    "tokens": {"compile": "tokens", "gqa": False, "unpad": False},
    "tokens+gqa": {"compile": "tokens", "gqa": True, "unpad": False},
    "new": {"compile": "tokens", "gqa": True, "unpad": True},
}
VIEW_OPS = {"view", "_unsafe_view", "transpose", "t", "slice", "select", "expand", "unsqueeze", "squeeze",
            "permute", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk", "reshape",
            "_reshape_alias", "unbind", "lift_fresh", "empty", "empty_like", "empty_strided"}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> tuple[float, float]:
    """(first call's seconds (compiles, captures), mean seconds of `repeat` later calls)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return first, (time.perf_counter() - start) / repeat


def ops_of(fn) -> tuple[int, dict[str, int]]:
    """The aten operators one call issues from Python (the profiler's aten events with no aten parent;
    views and allocations left out): on CPU, a proxy for the kernels the same eager code launches on a
    GPU (a linear with bias = one GEMM, a layer norm = one kernel; SDPA's mask conversion not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        name = event.name.removeprefix("aten::")
        if parent is None and name not in VIEW_OPS:
            counts[name] = counts.get(name, 0) + 1
    return sum(counts.values()), dict(sorted(counts.items()))


def prefill_split(model, batch: dict, pages: int, emit, kernels_out: str | None = None) -> None:
    """ms per item of the vision encoder (the model's get_img_features vs the fused one), the rest of the
    embedding (merge: assembly, projection, placement), and the text decoder under each lever set."""
    from actors.fast_prefill import FastPrefill, PrefillOptions
    from actors.vision_encoder import install_vision_encoder

    has_image = "image_pixel_values" in batch
    mask = batch["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens = int(mask.shape[1])
    padded = not bool(mask.bool().all())
    prefill = FastPrefill(model, options=PrefillOptions(**DECODER_VARIANTS["new"]))
    with torch.inference_mode():
        if has_image:
            embed = model.model.embed_tokens_extend.image_embed
            pixels = batch["image_pixel_values"].flatten(0, 1)
            crop_mask = batch["image_attention_mask"].flatten(0, 1).bool()
            for mode in ("model", "compiled" if torch.cuda.is_available() else "eager"):
                install_vision_encoder(model, mode)
                first, t_vision = timed(lambda: embed.get_img_features(pixels, crop_mask))
                _, t_embed = timed(lambda: prefill.embeddings(batch))
                emit(part="vision", mode=mode, items=pages, crops=int(pixels.shape[0]), first_s=round(first, 2),
                     ms_per_item=round(1000 * t_vision / pages, 2),
                     merge_ms_per_item=round(1000 * (t_embed - t_vision) / pages, 2),
                     fell_back="_fused_siglip" not in embed.__dict__ and mode != "model")
        merged = prefill.embeddings(batch)
        for name, options in DECODER_VARIANTS.items():
            fused = FastPrefill(model, options=PrefillOptions(**options))
            try:
                first, t = timed(lambda fused=fused: fused.decoder(merged, mask, pos))
                emit(part="decoder", variant=name, items=pages, tokens=tokens, padded=padded, first_s=round(first, 2),
                     ms_per_item=round(1000 * t / pages, 2), fell_back=fused._eager_fallback)
            except Exception as exc:  # noqa: BLE001
                emit(part="decoder", variant=name, error=f"{type(exc).__name__}: {exc}"[:300])
        _, t_full = timed(lambda: prefill(batch, pos))
        emit(part="full_fused", items=pages, ms_per_item=round(1000 * t_full / pages, 2))
        if kernels_out and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                prefill(batch, pos)
                sync()
            with open(kernels_out, "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))


def so400m_layer(dtype):
    """One SigLIP-so400m-shaped encoder layer (the model's class), random weights at a scale that keeps
    bf16 meaningful -> (vision config, layer)."""
    from transformers.models.phi4_multimodal.configuration_phi4_multimodal import Phi4MultimodalVisionConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionEncoderLayer

    cfg = Phi4MultimodalVisionConfig()
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (1152, 16, 4304)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Phi4MultimodalVisionEncoderLayer(cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 0.1)
    return cfg, layer.to(dtype)


def siglip_layer_proxies(emit, crops: int = 1, compile_layer: bool = False, device: str = "cpu",
                         dtype=torch.float32) -> None:
    """One SigLIP-so400m-shaped layer (1152, 16 heads of 72, MLP 4304, 1024 patches per crop): ms and
    computing ops of the model's layer vs the fused functions (eager, and compiled when asked)."""
    from actors.vision_encoder import SiglipLayers

    cfg, layer = so400m_layer(dtype)
    layer = layer.to(device)
    x = torch.randn(crops, 1024, 1152, device=device, dtype=dtype)
    stacks = {"eager": SiglipLayers([layer], 16, 72, cfg.layer_norm_eps)}
    if compile_layer:
        stacks["compiled"] = SiglipLayers([layer], 16, 72, cfg.layer_norm_eps, compile_layers=True)
    # the model's layer as its padded-batch path calls it (a bidirectional all-true mask)
    all_true = torch.ones(crops, 1, 1, 1024, dtype=torch.bool, device=device)
    for stack in stacks.values():
        stack.weights()  # the fused QKV weights are made once, outside the counts
    with torch.inference_mode():
        model_ops, model_kinds = ops_of(lambda: layer(x, all_true))
        _, t_model = timed(lambda: layer(x, all_true), 2)
        row = {"part": "siglip_layer", "device": device, "dtype": str(dtype), "crops": crops, "model_ops": model_ops,
               "model_ms": round(1000 * t_model, 1), "model_op_kinds": model_kinds}
        for name, stack in stacks.items():
            if name == "eager":
                row["fused_eager_ops"], row["fused_op_kinds"] = ops_of(lambda s=stack: s.encode(x, None))
            first, t = timed(lambda s=stack: s.encode(x, None), 2)
            row[f"fused_{name}_ms"] = round(1000 * t, 1)
            row[f"fused_{name}_first_s"] = round(first, 1)
    emit(**row)
    # bytes the model's get_img_features holds for its hidden-state list, per crop, in this dtype
    emit(part="siglip_hidden_states", bytes_per_crop=28 * 1024 * 1152 * torch.finfo(dtype).bits // 8)


def tiny_proxies(emit, ckpt: str) -> None:
    """CPU, tiny checkpoint: leaf ops per call of the image features (2 Letter pages, 42 crops) and of
    the text decoder (eager: each lever set's kernel count, which compile then fuses further)."""
    from PIL import Image
    from transformers import AutoModelForCausalLM

    from actors.collate import collate
    from actors.fast_prefill import FastPrefill, PrefillOptions
    from actors.tiny_model import build_tiny_model
    from actors.vision_encoder import FusedSiglip
    from pipeline.model.inputs import InputBuilder
    from pipeline.model.prompts import task_instruction

    build_tiny_model(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    builder = InputBuilder(ckpt)
    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 255, (2200, 1700, 3), dtype=np.uint8)) for _ in range(2)]
    batch = collate([builder.image(p, task_instruction("ocr")).inputs for p in pages], model.config.pad_token_id)
    embed = model.model.embed_tokens_extend.image_embed
    pixels = batch["image_pixel_values"].flatten(0, 1)
    mask = batch["image_attention_mask"].flatten(0, 1).bool()
    fused = FusedSiglip(embed)
    fused.stack.weights()
    with torch.inference_mode():
        for name, fn in (("model", lambda: embed.get_img_features(pixels, mask)),
                         ("fused", lambda: fused.features(pixels, mask))):
            ops, kinds = ops_of(fn)
            _, t = timed(fn, 2)
            emit(part="tiny_image_features", path=name, crops=int(pixels.shape[0]),
                 padded_crops=int((~mask.reshape(len(mask), -1).all(-1)).sum()), leaf_ops=ops,
                 host_ms=round(1000 * t, 1), kinds=kinds)
    texts = [builder.text(task_instruction("summarize", transcript="word " * (20 + 60 * k))) for k in range(4)]
    text_batch = collate([t.inputs for t in texts], model.config.pad_token_id)
    for what, b in (("ocr_2_pages", batch), ("text_4_left_padded", text_batch)):
        prefill = FastPrefill(model, compile_layers=False)
        with torch.inference_mode():
            merged = prefill.embeddings(b)
        m = b["attention_mask"]
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        for variant in ("first", "new"):
            options = dict(DECODER_VARIANTS[variant], compile="off")
            runner = FastPrefill(model, options=PrefillOptions(**options))
            call = functools.partial(runner.decoder, merged, m, pos)
            ops, kinds = ops_of(call)
            with torch.inference_mode():
                _, t = timed(call, 2)
            emit(part="tiny_decoder", batch=what, variant=variant, tokens=int(m.shape[1]),
                 layers=model.config.num_hidden_layers, leaf_ops=ops, host_ms=round(1000 * t, 1),
                 copies={k: v for k, v in kinds.items() if k in ("repeat_interleave", "index", "cat", "stack",
                                                                   "copy_", "gather", "clone")})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench")
    ap.add_argument("--scratch", default="/tmp/phi4mm-bench")
    ap.add_argument("--tiny", action="store_true", help="the tiny checkpoint on CPU (a smoke run)")
    ap.add_argument("--cpu-proxies", action="store_true", help="only the real-width SigLIP layer on CPU")
    ap.add_argument("--workloads", default="ocr,asr", help="of ocr, asr, summarize")
    ap.add_argument("--ocr-pages", type=int, default=12, help="pages per prefill (the engine's: 65 536 tokens / 5 346)")
    ap.add_argument("--asr-clips", type=int, default=64)
    ap.add_argument("--summarize-items", type=int, default=16)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "vision-prefill.jsonl")

    def emit(**row):
        print(json.dumps(row), flush=True)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    torch.manual_seed(0)
    if args.cpu_proxies:
        tiny_proxies(emit, os.path.join(args.scratch, "tiny"))
        siglip_layer_proxies(emit, compile_layer=True)
        return
    from actors.collate import collate
    from bench.real_model import bench_model
    from bench.run_bench import WORKLOADS, Items
    from pipeline.model.inputs import InputBuilder

    ckpt = os.path.join(args.scratch, "ckpt")
    model = bench_model(ckpt, args.tiny)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    pad = model.config.pad_token_id
    sizes = {"ocr": args.ocr_pages, "asr": args.asr_clips, "summarize": args.summarize_items}
    for name in args.workloads.split(","):
        spec = dict(WORKLOADS[name])
        scale = 0.1 if args.tiny and spec["media"] != "image" else 1.0
        items = Items(InputBuilder(ckpt), spec, 2, np.random.default_rng(0), scale)
        n = min(sizes[name], 2) if args.tiny else sizes[name]
        batch = collate([b.inputs for b in items.take(n)], pad)
        batch = {k: (v.to(device, dtype) if k in ("image_pixel_values", "audio_input_features") else v.to(device))
                 for k, v in batch.items()}
        emit(workload=name, items=n, tokens=int(batch["input_ids"].shape[1]), device=str(device))
        kernels = os.path.join(args.out, f"{name}-prefill-kernels.txt") if name == "ocr" else None
        prefill_split(model, batch, n, functools.partial(emit, workload=name), kernels)
        del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        siglip_layer_proxies(emit, crops=21, compile_layer=True, device="cuda", dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
