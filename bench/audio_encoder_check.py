"""GPU check of the packed speech encoder (actors/audio_encoder.py) against the model's own, at real size.

    python -m bench.audio_encoder_check --out DIR [--batch 64] [--iters 5]

A Phi4MultimodalAudioModel of the released sizes (transformers' defaults: 1024 dims, 24 blocks, 16 heads)
with random weights in bfloat16 on CUDA; no checkpoint is read. Prints one JSON object per measurement:
- equal: `--batch` clips of 30 s: ms per clip, packed (compiled) and the model's forward, and their
  relative difference (||packed - model|| / ||model|| over the clips' frames);
- ragged: clips of call-chunk lengths (bench.asr_calls' call lengths cut into <= 30 s chunks) of about
  the same total audio: ms per audio second, packed and the masked model path (actors/audio_padding.py),
  the ratio to the equal batch's, and the relative difference;
- compile: seconds of the first packed call, and whether later batches recompiled;
- kernels: the profiler's top CUDA kernels of one packed call (OUT/encoder-kernels.txt) and the counts of
  rows that must be gone: float32 GEMMs (`f32f32`), cuDNN's old 1x1 kernels (`cutlass_75`), `where`.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def timed(fn, iters: int) -> float:
    """Seconds per call (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def relative_difference(a, b, frames) -> float:
    num = den = 0.0
    for i, n in enumerate(frames):
        x, y = a[i, :n].float(), b[i, :n].float()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / den) ** 0.5


def ragged_lengths(total_frames: int, seed: int = 10) -> list[int]:
    """Feature-frame lengths of call chunks (20-30 s cuts of bench.asr_calls' calls, and the rests) up to
    `total_frames` of audio."""
    from bench.asr_calls import call_lengths

    rng = np.random.default_rng(seed)
    out: list[int] = []
    for s in call_lengths(400, seed):
        while s > 30.0:
            cut = float(np.round(rng.uniform(20.0, 30.0) * 2) / 2)
            out.append(cut)
            s -= cut
        out.append(float(s))
    frames, total = [], 0
    for s in out:
        n = (int(s * 16000) - 400) // 160 + 1
        if total + n > total_frames:
            break
        frames.append(n)
        total += n
    return frames


def batch_of(lengths: list[int], device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    longest = max(lengths)
    x = torch.zeros(len(lengths), longest, 80)
    mask = torch.zeros(len(lengths), longest, dtype=torch.bool)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, 80, generator=g)
        mask[i, :n] = True
    same = len(set(lengths)) == 1
    return x.to(device, dtype), (None if same else mask.to(device))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    from torch._dynamo.utils import counters
    from transformers import Phi4MultimodalAudioConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel

    from actors.audio_encoder import PackedAudioEncoder
    from actors.audio_padding import _forward as masked_forward

    os.makedirs(args.out, exist_ok=True)
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    config = Phi4MultimodalAudioConfig()
    config._attn_implementation = "sdpa"
    enc = Phi4MultimodalAudioModel(config).to(device, dtype).eval()
    packed = PackedAudioEncoder(enc)
    rows = []

    def emit(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    with torch.inference_mode():
        equal = [3000] * args.batch
        x, mask = batch_of(equal, device, dtype)
        started = time.perf_counter()
        got = packed(x, mask)
        torch.cuda.synchronize()
        emit(what="compile", first_call_s=round(time.perf_counter() - started, 1),
             graphs=counters["stats"]["unique_graphs"])
        want = enc(x, mask)
        frames = [375] * len(equal)
        t_packed = timed(lambda: packed(x, mask), args.iters)
        t_model = timed(lambda: enc(x, mask), args.iters)
        emit(what="equal", clips=len(equal), packed_ms_per_clip=round(1000 * t_packed / len(equal), 3),
             model_ms_per_clip=round(1000 * t_model / len(equal), 3),
             relative_difference=round(relative_difference(got, want, frames), 5))
        equal_ms_per_s = 1000 * t_packed / (sum(equal) / 100)

        lengths = ragged_lengths(sum(equal))
        x, mask = batch_of(lengths, device, dtype, seed=1)
        graphs = counters["stats"]["unique_graphs"]
        got = packed(x, mask)
        want = masked_forward(enc, x, mask)
        frames = [-(-n // 8) for n in lengths]
        t_packed = timed(lambda: packed(x, mask), args.iters)
        t_model = timed(lambda: masked_forward(enc, x, mask), args.iters)
        seconds = sum(lengths) / 100
        emit(what="ragged", clips=len(lengths), audio_s=round(seconds, 1),
             packed_ms_per_audio_s=round(1000 * t_packed / seconds, 4),
             model_ms_per_audio_s=round(1000 * t_model / seconds, 4),
             packed_ratio_to_equal=round(equal_ms_per_s / (1000 * t_packed / seconds), 3),
             relative_difference=round(relative_difference(got, want, frames), 5),
             recompiled=counters["stats"]["unique_graphs"] != graphs)

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            packed(x, mask)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        with open(os.path.join(args.out, "encoder-kernels.txt"), "w") as f:
            f.write(table)
        names = [e.key for e in prof.key_averages()]
        emit(what="kernels", f32f32=sum("f32f32" in n for n in names), cutlass_75=sum("cutlass_75" in n for n in names),
             where=sum(n.startswith("aten::where") for n in names),
             cuda_kernels=sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    with open(os.path.join(args.out, "audio_encoder_check.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
