"""Chunks back into records: a work row's chunk results stitched into its text and time-stamped segments.

A plain map over work rows: a row holds all of its chunks by now (a long recording's parts were joined
by pipeline/stages/regroup_parts.py: RegroupParts), so rows stream on to Parquet.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.core.stage import Cluster, Stage, StageResources
from schemas.config import JobConfig
from schemas.tasks import SPEECH_TASKS
from schemas.work_rows import set_column


class AssembleChunks(Stage):
    """Fill `text`, `segments`, token counts, latency and the row's `error` from its chunks
    (idempotent: the graph runs it after each GPU stage that adds chunk results)."""

    reads = ("task", "error", "chunk_start_s", "chunk_end_s", "chunk_speaker", "chunk_text", "chunk_error",
             "chunk_input_tokens", "chunk_output_tokens", "chunk_latency_s")
    writes = ("text", "segments", "error", "input_tokens", "output_tokens", "latency_s")

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        return StageResources(batch_size=None, num_cpus=0.25)  # one actor, whole blocks: list work only

    def process(self, batch: pa.Table) -> pa.Table:
        return assemble(batch)


def assemble(batch: pa.Table) -> pa.Table:
    rows = batch.select(list(AssembleChunks.reads)).to_pylist()
    out = {name: [] for name in ("text", "segments", "error", "input_tokens", "output_tokens", "latency_s")}
    for row in rows:
        starts, n = row["chunk_start_s"], len(row["chunk_text"])
        labelled = [(f"[{sp}] " if sp else "") + (t or "").strip()
                    for sp, t in zip(row["chunk_speaker"], row["chunk_text"])]
        texts = [t for t, raw in zip(labelled, row["chunk_text"]) if raw and raw.strip()]
        error = row["error"]
        failed = [k for k in range(n) if row["chunk_error"][k]]
        if error is None and failed:
            k = failed[0]
            error = row["chunk_error"][k]
            if n > 1:
                where = f"chunk {k + 1}/{n}"
                if starts[k] is not None:
                    where += f", {starts[k]:.1f}-{row['chunk_end_s'][k]:.1f} s"
                more = f"; {len(failed)} of {n} chunks failed" if len(failed) > 1 else ""
                error = f"{error} ({where}{more})"
        segments = None
        if row["task"] in SPEECH_TASKS and n and starts[0] is not None:
            segments = [{"start_s": a, "end_s": b, "text": t}
                        for a, b, t in zip(starts, row["chunk_end_s"], labelled)]
        out["text"].append(" ".join(texts) if texts else None)
        out["segments"].append(segments)
        out["error"].append(error)
        out["input_tokens"].append(_sum(row["chunk_input_tokens"]))
        out["output_tokens"].append(_sum(row["chunk_output_tokens"]))
        out["latency_s"].append(_sum(row["chunk_latency_s"]))
    for name, values in out.items():
        batch = set_column(batch, name, values)
    return batch


def _sum(values) -> float | int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None
