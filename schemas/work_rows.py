"""Work rows: the CPU<->GPU contract, what flows from the CPU stages through the GPU actors to the results.

One work row is one future output row: (id, task, target language, page). It carries its chunks as
lists (one entry per audio chunk; one entry for a page or a text prompt); a long recording's row travels
in parts of a bounded number of chunks, joined again after the GPU by one actor that holds them
(pipeline/stages/regroup_parts.py), so there is no shuffle barrier and results stream to Parquet as rows finish. A bad
input becomes one error row per output key instead, so every input still yields a row for every task.

A chunk's model inputs travel as one pickled dict of numpy arrays (`encode_item` / `decode_item`), which
keeps arbitrary shapes out of Arrow's tensor types. `BatchKey` says which chunks may share a GPU batch.
"""
from __future__ import annotations

import pickle
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from schemas.results import RESULT_FIELDS


class BatchKey(NamedTuple):
    """Chunks batch together on a GPU only under equal keys.

    Audio: clips of any length may share a batch (the GPU side masks the audio encoder's padding,
    actors/audio_padding.py, so each clip's output is its unbatched one); the key is the clip's length
    bucket (pipeline/model/inputs.py: audio_bucket), so a batch pads each clip by less than one bucket.
    Images: one crop count per batch. Text prompts are left-padded and masked, so they share one key.
    """
    kind: str  # "audio" | "image" | "text"; "samples": audio whose model inputs are not built yet
    size: int  # audio: end of the length bucket, in feature frames (100 per s); image: crops; text: 0;
    # samples: their count


BATCH_KEY_TYPE = pa.struct([("kind", pa.string()), ("size", pa.int64())])

# Columns a work row carries besides the passed-through manifest columns. Those it shares with the
# result rows are the result schema's own fields, so the two can never disagree on a type.
_RESULT = {f.name: f for f in RESULT_FIELDS}
WORK_FIELDS: list[pa.Field] = [
    *(_RESULT[n] for n in ("id", "task", "target_language", "language", "page", "pages", "duration_s",
                           "summary_sections", "summary_from")),
    pa.field("modality", pa.string()),  # speech | vision | text | none (nothing to generate)
    # a long recording's row travels in parts of at most audio.part_chunks chunks (pipeline/stages/regroup_parts.py):
    # part k of parts, regrouped before assembly; null for a row in one piece
    pa.field("part", pa.int32()),
    pa.field("parts", pa.int32()),
    _RESULT["error"],  # the row failed before generation (fetch, decode, ...)
    # per chunk (audio chunk, page, or text prompt), in time order
    pa.field("chunk_start_s", pa.list_(pa.float64())),
    pa.field("chunk_end_s", pa.list_(pa.float64())),
    pa.field("chunk_speaker", pa.list_(pa.string())),
    pa.field("chunk_batch_key", pa.list_(BATCH_KEY_TYPE)),
    pa.field("chunk_inputs", pa.list_(pa.binary())),  # pickled model inputs; emptied after generation
    pa.field("chunk_input_tokens", pa.list_(pa.int64())),
    pa.field("chunk_text", pa.list_(pa.string())),
    pa.field("chunk_output_tokens", pa.list_(pa.int64())),
    # the generated token ids: a transcript goes into its summary's prompt as these, never re-tokenised
    pa.field("chunk_output_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("chunk_latency_s", pa.list_(pa.float64())),
    pa.field("chunk_error", pa.list_(pa.string())),
    # filled by assembly (pipeline/stages/assemble.py)
    *(_RESULT[n] for n in ("text", "segments", "input_tokens", "output_tokens", "latency_s")),
]
WORK_SCHEMA = pa.schema(WORK_FIELDS)
WORK_COLUMNS = [f.name for f in WORK_FIELDS]

# The manifest's pass-through columns ride along in a work table under this prefix (`agent_id` travels
# as `manifest:agent_id`), a namespace of their own: a manifest column named `modality` or `chunk_text`
# can neither overwrite nor be overwritten by the work row's column of that name. ResultRows
# (pipeline/stages/result_rows.py) restores the names.
PASSTHROUGH_PREFIX = "manifest:"
assert not any(c.startswith(PASSTHROUGH_PREFIX) for c in WORK_COLUMNS)


def carried_name(name: str) -> str:
    """A pass-through column's name inside a work table."""
    return PASSTHROUGH_PREFIX + name


def carried_columns(table: pa.Table) -> list[str]:
    """The pass-through columns of a work table, by their names there (prefixed)."""
    return [c for c in table.column_names if c.startswith(PASSTHROUGH_PREFIX)]


def encode_item(inputs: dict[str, np.ndarray]) -> bytes:
    return pickle.dumps(inputs, protocol=5)


def decode_item(blob: bytes) -> dict[str, np.ndarray]:
    return pickle.loads(blob)


class WorkChunk:
    """One unit of generation inside a work row: an audio chunk, a page, or a text prompt."""

    __slots__ = ("start_s", "end_s", "speaker", "batch_key", "inputs", "input_tokens")

    def __init__(self, batch_key: BatchKey, inputs: bytes, input_tokens: int, start_s: float | None = None,
                 end_s: float | None = None, speaker: str | None = None):
        self.start_s, self.end_s, self.speaker = start_s, end_s, speaker
        self.batch_key, self.inputs, self.input_tokens = batch_key, inputs, input_tokens


def work_row(row_id: str, task: str, *, chunks: list[WorkChunk] = (), target_language: str | None = None,
             language: str | None = None, page: int = 1, pages: int | None = None,
             duration_s: float | None = None, modality: str = "none", error: str | None = None,
             summary_sections: int | None = None, summary_from: str | None = None, part: int | None = None,
             parts: int | None = None) -> dict:
    n = len(chunks)
    return {
        "id": row_id, "task": task, "target_language": target_language, "language": language, "page": page,
        "pages": pages, "duration_s": duration_s, "summary_sections": summary_sections,
        "summary_from": summary_from, "modality": modality if n else "none", "error": error,
        "part": part, "parts": parts,
        "chunk_start_s": [c.start_s for c in chunks], "chunk_end_s": [c.end_s for c in chunks],
        "chunk_speaker": [c.speaker for c in chunks],
        "chunk_batch_key": [c.batch_key._asdict() for c in chunks],
        "chunk_inputs": [c.inputs for c in chunks], "chunk_input_tokens": [c.input_tokens for c in chunks],
        "chunk_text": [None] * n, "chunk_output_tokens": [None] * n, "chunk_output_ids": [None] * n,
        "chunk_latency_s": [None] * n,
        "chunk_error": [None] * n,
        "text": None, "segments": None, "input_tokens": None, "output_tokens": None, "latency_s": None,
    }


def work_table(rows: list[dict], passthrough: pa.Table | None, *, carried: bool = False) -> pa.Table:
    """Rows as a table in WORK_SCHEMA, with the passed-through manifest columns appended row by row.

    `passthrough` holds the manifest's columns by their own names (they are prefixed here), or with
    `carried=True` columns already taken from a work table (prefixed, kept as they are)."""
    table = pa.Table.from_pylist(rows, schema=WORK_SCHEMA)
    if passthrough is not None:
        for field in passthrough.schema:
            name = field.name if carried else carried_name(field.name)
            if not name.startswith(PASSTHROUGH_PREFIX):
                raise ValueError(f"{field.name!r} is not a carried pass-through column")
            table = table.append_column(field.with_name(name), passthrough.column(field.name))
    return table


def set_column(table: pa.Table, name: str, values) -> pa.Table:
    """`table` with column `name` replaced by `values` (a list or an Arrow array), keeping its type."""
    field = table.schema.field(name)
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, field.type)
    return table.set_column(table.schema.get_field_index(name), field, array)
