"""Chunks back into records, summaries of whole recordings, and the final result rows.

`assemble` (a plain map over work rows: a row already holds all of its chunks, so nothing is regrouped
and rows stream on to Parquet) stitches the chunk texts in time order with their segments.
`PrepareSummaries` turns each assembled transcript into a text-only work row for its summary.
`ResultRows` casts everything to the result contract.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.model_inputs import InputBuilder, encode_item
from pipeline.prompts import task_instruction
from pipeline.work_items import Chunk, set_column, work_row, work_table
from schemas.config import JobConfig
from schemas.results import STATUS_ERROR, STATUS_OK, result_schema

SPEECH_TASKS = ("asr", "translate")


def assemble(batch: pa.Table) -> pa.Table:
    """Fill text, segments, token counts and the row's error from its chunks (idempotent)."""
    cols = ("task", "error", "chunk_start_s", "chunk_end_s", "chunk_speaker", "chunk_text", "chunk_error",
            "chunk_input_tokens", "chunk_output_tokens", "chunk_latency_s")
    rows = batch.select(list(cols)).to_pylist()
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


class PrepareSummaries:
    """CPU stage: for every assembled `asr` row, add a `summarize` work row built from its transcript.

    A transcript that failed gives a summary row that fails with the same reason, so the summary
    partition has a row for every input too.
    """

    def __init__(self, config_json: str):
        from actors.model_files import local_model_dir
        from pipeline.prepare import one_thread_per_worker

        one_thread_per_worker()
        self.config = JobConfig.model_validate_json(config_json)
        self.builder = InputBuilder(local_model_dir(self.config, processor_only=True), self.config.system_prompt)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.prepare import summary_from_audio

        rows = batch.select(["id", "task", "text", "error", "duration_s", "language"]).to_pylist()
        picks, made = [], []
        for i, row in enumerate(rows):
            if row["task"] != "asr":
                continue
            if not row["error"] and summary_from_audio(self.config, row["duration_s"]):
                continue  # summarised from the audio by the speech pool already
            common = {"language": row["language"], "duration_s": row["duration_s"]}
            if row["error"]:
                made.append(work_row(row["id"], "summarize", **common,
                                     error=f"no summary: the transcript failed ({row['error']})"))
            elif not row["text"]:
                made.append(work_row(row["id"], "summarize", **common,
                                     error=f"{row['id']}: no summary: the transcript is empty"))
            else:
                built = self.builder.text(task_instruction("summarize", transcript=row["text"]))
                chunk = Chunk(built.bucket, encode_item(built.inputs), built.input_tokens)
                made.append(work_row(row["id"], "summarize", chunks=[chunk], modality="text", **common))
            picks.append(i)
        if not picks:
            return batch
        extra = [c for c in batch.column_names if c not in made[0]]
        summaries = work_table(made, batch.select(extra).take(picks) if extra else None)
        return pa.concat_tables([batch, summaries.select(batch.column_names)])


class ResultRows:
    """CPU stage: rows in work-item columns -> rows in the result contract (plus pass-through)."""

    def __init__(self, config_json: str, model_name: str, model_revision: str | None,
                 passthrough_schema: pa.Schema):
        self.config = JobConfig.model_validate_json(config_json)
        self.model_name, self.model_revision = model_name, model_revision
        self.schema = result_schema(passthrough_schema)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = pc.if_else(pc.is_null(batch["error"]), STATUS_OK, STATUS_ERROR)
        now = datetime.now(timezone.utc)
        columns = {
            "status": status,
            "model": pa.array([self.model_name] * n, pa.string()),
            "model_revision": pa.array([self.model_revision] * n, pa.string()),
            "run_id": pa.array([self.config.run_id] * n, pa.string()),
            "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }
        arrays = []
        for field in self.schema:
            if field.name in columns:
                arrays.append(columns[field.name])
            elif field.name in batch.column_names:
                arrays.append(batch[field.name].cast(field.type))
            else:
                arrays.append(pa.nulls(n, field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)
