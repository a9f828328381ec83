"""Chunks back into records, summaries of whole recordings, and the final result rows.

`assemble_group` runs once per output row (Ray Data `groupby(group_key).map_groups`): it stitches the
chunk transcripts in time order with their segments. `PrepareSummaries` turns each assembled transcript
into a text-only work item for the summary. `ResultRows` casts everything to the result contract.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.model_inputs import InputBuilder, encode_item
from pipeline.prompts import task_instruction
from pipeline.work_items import WORK_COLUMNS, group_key
from schemas.config import JobConfig
from schemas.results import RESULT_COLUMNS, STATUS_ERROR, STATUS_OK, result_schema

SPEECH_TASKS = ("asr", "translate")


def assemble_group(group: pa.Table) -> pa.Table:
    """All work items of one (id, task, target, page) -> one row (still in work-item columns)."""
    group = group.sort_by([("start_s", "ascending"), ("chunk_index", "ascending")])
    rows = group.select([c for c in WORK_COLUMNS if c != "model_inputs"]).to_pylist()
    first = rows[0]
    texts = [r["text"] for r in rows if r["text"]]
    failed = [r for r in rows if r["error"]]
    error = None
    if failed:
        r = failed[0]
        where = ""
        if len(rows) > 1:
            where = f" (chunk {r['chunk_index'] + 1}/{len(rows)}, {r['start_s']:.1f}-{r['end_s']:.1f} s"
            where += f"; {len(failed)} of {len(rows)} chunks failed)" if len(failed) > 1 else ")"
        error = r["error"] + where
    segments = None
    if first["task"] in SPEECH_TASKS and first["start_s"] is not None:
        segments = [{"start_s": r["start_s"], "end_s": r["end_s"],
                     "text": (f"[{r['speaker']}] " if r["speaker"] else "") + (r["text"] or "")} for r in rows]
        if first["speaker"]:
            texts = [s["text"] for s in segments if s["text"]]
    merged = dict(first, text=" ".join(t.strip() for t in texts) if texts else None, error=error,
                  modality="none", bucket="", chunk_index=0, n_chunks=len(rows),
                  start_s=None, end_s=None,
                  input_tokens=_sum(r["input_tokens"] for r in rows),
                  output_tokens=_sum(r["output_tokens"] for r in rows),
                  latency_s=_sum(r["latency_s"] for r in rows))
    out = pa.Table.from_pylist([merged], schema=group.select([c for c in WORK_COLUMNS if c != "model_inputs"])
                               .schema)
    out = out.append_column(pa.field("model_inputs", pa.binary()), pa.nulls(1, pa.binary()))
    out = out.append_column(pa.field("segments", _segments_type()), pa.array([segments], _segments_type()))
    extra = [c for c in group.column_names if c not in WORK_COLUMNS and c != "segments"]
    for name in extra:
        out = out.append_column(group.schema.field(name), group.column(name).slice(0, 1))
    return out


def _segments_type() -> pa.DataType:
    from schemas.results import SEGMENT_TYPE

    return pa.list_(SEGMENT_TYPE)


def _sum(values) -> float | int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


class PrepareSummaries:
    """CPU stage: for every assembled `asr` row, add a `summarize` work item built from its transcript.

    A transcript that failed gives a summary row that fails with the same reason, so the summary
    partition has a row for every input too.
    """

    def __init__(self, config_json: str):
        from actors.model_files import local_model_dir
        from pipeline.prepare import one_thread_per_worker

        one_thread_per_worker()
        self.config = JobConfig.model_validate_json(config_json)
        self.builder = InputBuilder(local_model_dir(self.config), self.config.system_prompt)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.prepare import summary_from_audio

        rows = batch.select(["id", "task", "text", "error", "duration_s"]).to_pylist()
        picks, updates = [], []
        for i, row in enumerate(rows):
            if row["task"] != "asr":
                continue
            if not row["error"] and summary_from_audio(self.config, row["duration_s"]):
                continue  # summarised from the audio by the speech pool already
            picks.append(i)
            if row["error"]:
                updates.append({"error": f"no summary: the transcript failed ({row['error']})",
                                "modality": "none", "model_inputs": None, "input_tokens": None})
            elif not row["text"]:
                updates.append({"error": f"{row['id']}: no summary: the transcript is empty",
                                "modality": "none", "model_inputs": None, "input_tokens": None})
            else:
                built = self.builder.text(task_instruction("summarize", transcript=row["text"]))
                updates.append({"error": None, "modality": "text", "model_inputs": encode_item(built.inputs),
                                "input_tokens": built.input_tokens, "bucket": built.bucket})
        if not picks:
            return batch
        summaries = batch.take(picks)
        n = len(picks)
        summaries = _set(summaries, "task", pa.array(["summarize"] * n, pa.string()))
        summaries = _set(summaries, "group_key", pa.array(
            [group_key(r, "summarize", None, 1) for r in summaries["id"].to_pylist()], pa.string()))
        for name, typ in (("text", pa.string()), ("output_tokens", pa.int64()), ("latency_s", pa.float64()),
                          ("target_language", pa.string())):
            summaries = _set(summaries, name, pa.nulls(n, typ))
        summaries = _set(summaries, "segments", pa.nulls(n, summaries.schema.field("segments").type))
        for name in ("error", "modality", "model_inputs", "input_tokens", "bucket"):
            typ = summaries.schema.field(name).type
            values = [u.get(name, summaries[name][k].as_py()) for k, u in enumerate(updates)]
            summaries = _set(summaries, name, pa.array(values, typ))
        return pa.concat_tables([batch, summaries])


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


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


__all__ = ["assemble_group", "PrepareSummaries", "ResultRows", "RESULT_COLUMNS"]
