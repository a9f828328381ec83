"""Work items: the rows that flow from the CPU stages through the GPU actors to assembly.

One manifest row becomes one work item per (task, target language, chunk or page). A bad input becomes
one error item per task instead, so every input still yields a result row for every task.
"""
from __future__ import annotations

import pyarrow as pa

# Columns a work item carries besides the passed-through manifest columns.
WORK_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string()),
    pa.field("task", pa.string()),
    pa.field("target_language", pa.string()),
    pa.field("language", pa.string()),
    pa.field("page", pa.int32()),
    pa.field("pages", pa.int32()),
    pa.field("chunk_index", pa.int32()),
    pa.field("n_chunks", pa.int32()),
    pa.field("speaker", pa.string()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("duration_s", pa.float64()),
    pa.field("group_key", pa.string()),
    pa.field("modality", pa.string()),  # speech | vision | text | none (nothing to generate)
    pa.field("bucket", pa.string()),
    pa.field("model_inputs", pa.binary()),
    pa.field("input_tokens", pa.int64()),
    pa.field("text", pa.string()),
    pa.field("output_tokens", pa.int64()),
    pa.field("latency_s", pa.float64()),
    pa.field("error", pa.string()),
]
WORK_SCHEMA = pa.schema(WORK_FIELDS)
WORK_COLUMNS = [f.name for f in WORK_FIELDS]


def group_key(row_id: str, task: str, target_language: str | None, page: int) -> str:
    """The output row a work item belongs to: (id, task, target language, page)."""
    return "\x1f".join((row_id, task, target_language or "", str(page)))


def work_item(row_id: str, task: str, *, target_language: str | None = None, language: str | None = None,
              page: int = 1, pages: int | None = None, chunk_index: int = 0, n_chunks: int = 1,
              speaker: str | None = None, start_s: float | None = None, end_s: float | None = None,
              duration_s: float | None = None, modality: str = "none", bucket: str = "",
              model_inputs: bytes | None = None, input_tokens: int | None = None,
              text: str | None = None, error: str | None = None) -> dict:
    return {
        "id": row_id, "task": task, "target_language": target_language, "language": language,
        "page": page, "pages": pages, "chunk_index": chunk_index, "n_chunks": n_chunks, "speaker": speaker,
        "start_s": start_s, "end_s": end_s, "duration_s": duration_s,
        "group_key": group_key(row_id, task, target_language, page), "modality": modality,
        "bucket": bucket, "model_inputs": model_inputs, "input_tokens": input_tokens, "text": text,
        "output_tokens": None, "latency_s": None, "error": error,
    }


def work_table(items: list[dict], passthrough: pa.Table | None) -> pa.Table:
    """Items as a table in WORK_SCHEMA, with the passed-through manifest columns appended row by row."""
    table = pa.Table.from_pylist(items, schema=WORK_SCHEMA)
    if passthrough is not None:
        for name in passthrough.column_names:
            if name not in WORK_COLUMNS:
                table = table.append_column(passthrough.schema.field(name), passthrough.column(name))
    return table
