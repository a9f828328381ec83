"""The run record, `OUTPUT/_runs/<run_id>.json`: what one run did, computed from the rows it wrote."""
from __future__ import annotations

from datetime import datetime

import pyarrow as pa

from jobs.scoring import score_all


def run_record(config_json: dict, rows: pa.Table, started_at: datetime, finished_at: datetime,
               gpus: float, counters: dict | None = None, model: dict | None = None) -> dict:
    """Counts, sizes, tokens, wall time, throughput and (with references) scores of one run, from the
    rows it wrote."""
    counts: dict[str, dict[str, int]] = {}
    for task, status in zip(rows["task"].to_pylist(), rows["status"].to_pylist()):
        counts.setdefault(task, {"ok": 0, "error": 0})[status] += 1
    table = rows.to_pandas() if rows.num_rows else None
    wall = (finished_at - started_at).total_seconds()
    audio_s = pages = input_tokens = output_tokens = 0.0
    if table is not None:
        asr = table[(table["task"] == "asr") & (table["status"] == "ok")]  # audio transcribed (error rows
        # carry the duration they decoded too, issue 10)
        audio_s = float(asr["duration_s"].fillna(0).sum())
        # pages read: an error row (a page that failed, or one past image.max_pages) is not a page read
        pages = int(((table["task"] == "ocr") & (table["status"] == "ok")).sum())
        input_tokens = int(table["input_tokens"].fillna(0).sum())
        output_tokens = int(table["output_tokens"].fillna(0).sum())
    scores = {}
    if table is not None:
        scores = score_all(table).summary  # only tasks whose rows carry reference texts
    return {
        "run_id": config_json["run_id"], "job": config_json["job"], "config": config_json,
        "started_at": started_at.isoformat(), "finished_at": finished_at.isoformat(), "wall_s": wall,
        "gpus": gpus, "rows": rows.num_rows, "counts": counts, "audio_s": audio_s,
        "audio_hours": audio_s / 3600, "pages": pages, "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "throughput": {"audio_s_per_s": audio_s / wall if wall else None,
                       "pages_per_s": pages / wall if wall else None,
                       "output_tokens_per_s": output_tokens / wall if wall else None},
        "scores": scores,
        # the checkpoint that wrote the rows: source, revision, layout, weights_sha (as in every row)
        "model": model or {},
        # per stage: rows in/out, calls, busy seconds, and what the stage counts itself (bad inputs,
        # chunks, pages; for GPU stages items, output tokens and the engine's prefill/decode split)
        "counters": counters or {},
    }
