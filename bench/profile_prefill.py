"""Where the asr engine's time goes on the GPU: prefill parts (audio encoder + embedding merge, decoder)
and the decode step at several slot counts. Prints one JSON object per measurement and writes the
profiler's top kernels of one prefill to OUT/prefill-kernels.txt.

    python -m bench.profile_prefill --out DIR [--batches 32,64] [--slots 256,512]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, repeat: int = 3) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench")
    ap.add_argument("--scratch", default="/tmp/phi4mm-bench")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--slots", default="256,512")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of the script on the tiny checkpoint")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from actors.collate import collate
    from actors.engine import Phi4MMEngine
    from actors.slot_decoder import SlotDecoder
    from bench.real_model import bench_model
    from bench.run_bench import WORKLOADS, Items
    from pipeline.model.inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig

    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.scratch, "ckpt")
    model = bench_model(ckpt, args.tiny)
    engine = Phi4MMEngine(ckpt, "speech", ModelConfig(source=ckpt), BatchingConfig(), model=model)
    items = Items(InputBuilder(ckpt), WORKLOADS["asr"], 4, np.random.default_rng(0), 0.1 if args.tiny else 1.0)
    rows = []

    def emit(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    m = model.model
    with torch.inference_mode():
        for b in [int(x) for x in args.batches.split(",")]:
            batch = engine._to_device(collate([it.inputs for it in items.take(b)], engine.pad_token_id))
            n_tokens = batch["input_ids"].shape[1]
            mask = batch["attention_mask"]
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}

            def full():
                from transformers import DynamicCache

                return model(**batch, position_ids=pos, past_key_values=DynamicCache(), use_cache=True,
                             logits_to_keep=1)

            def embeds():
                return m.embed_tokens_extend(batch["input_ids"], m.embed_tokens(batch["input_ids"]),
                                             **{k: v for k, v in extra.items() if k.startswith("audio")})

            merged = embeds()

            def decoder():
                from transformers import DynamicCache

                return model(inputs_embeds=merged, attention_mask=mask, position_ids=pos,
                             past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

            def decoder_no_mask():
                from transformers import DynamicCache

                return model(inputs_embeds=merged, position_ids=pos, past_key_values=DynamicCache(),
                             use_cache=True, logits_to_keep=1)

            def encoder_only():
                feats = batch["audio_input_features"]
                return m.embed_tokens_extend.audio_embed.encoder(feats, batch.get("audio_attention_mask"))

            from actors.fast_prefill import FastPrefill

            fused = FastPrefill(model)

            def fused_full():
                return fused(batch, pos)

            def fused_decoder():
                return fused.decoder(merged, mask, pos)

            for name, fn in (("prefill_fused_full", fused_full), ("prefill_fused_decoder", fused_decoder),
                             ("prefill_full", full), ("prefill_embed_merge", embeds),
                             ("prefill_audio_encoder", encoder_only), ("prefill_decoder", decoder),
                             ("prefill_decoder_no_mask", decoder_no_mask)):
                try:
                    t = cuda_time(fn)
                    emit(part=name, batch=b, tokens=n_tokens, s=round(t, 4), ms_per_clip=round(1000 * t / b, 2),
                         fused_fell_back=fused._eager_fallback)
                except Exception as exc:  # noqa: BLE001
                    emit(part=name, batch=b, error=f"{type(exc).__name__}: {exc}"[:300])
            if b == 32 and torch.cuda.is_available():
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    full()
                    torch.cuda.synchronize()
                with open(os.path.join(args.out, "prefill-kernels.txt"), "w") as f:
                    f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fused_decoder()
                    torch.cuda.synchronize()
                with open(os.path.join(args.out, "fused-decoder-kernels.txt"), "w") as f:
                    f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
            del batch, merged
            torch.cuda.empty_cache()

        for slots in [int(x) for x in args.slots.split(",")]:
            dec = SlotDecoder(model, slots, 512, engine.eos_ids, engine.banned_ids)
            dec.active.fill_(True)
            dec.pos.fill_(400)
            dec.limit.fill_(510)
            dec.step()  # capture

            def step():
                dec.pos.fill_(400)
                dec.active.fill_(True)
                for _ in range(20):
                    dec.step()

            t = cuda_time(step) / 20
            emit(part="decode_step", slots=slots, max_len=512, ms=round(1000 * t, 2),
                 ms_per_clip_100_steps=round(1000 * t * 100 / slots, 2))
            del dec
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "profile.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
