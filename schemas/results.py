"""The result-row contract (stable): one row per (id, task, page) under OUTPUT/task=<task>/.

`task` is the Hive partition key: it lives in the directory name, not in the files, and comes back as a
column when the dataset is read with partitioning="hive" (pyarrow, DuckDB, Spark, pandas).
For `translate` with several target languages in one run, the key is (id, task, target_language, page).
"""
from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"

SEGMENT_TYPE = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string())])
TOOL_CALL_TYPE = pa.struct([("name", pa.string()), ("arguments", pa.string())])

# Columns every result row has, in this order, before the passed-through manifest columns.
RESULT_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("page", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("text", pa.string()),
    pa.field("language", pa.string()),
    pa.field("target_language", pa.string()),
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("duration_s", pa.float64()),
    pa.field("pages", pa.int32()),
    pa.field("input_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("latency_s", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("model_revision", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("processed_at", pa.timestamp("us", tz="UTC")),
    # which weights wrote the row (appended: the columns above keep their order). The layout the
    # checkpoint came in ("native", or "remote-code": the hub's main branch, converted on load) and a
    # fingerprint of its weight files (pipeline/model/checkpoint_layout.py: FINGERPRINT_METHOD), equal for
    # every copy of the same weights, local, s3:// or hub
    pa.field("model_layout", pa.string()),
    pa.field("model_weights_sha", pa.string()),
    # summarize and extract rows: how the answer was made (1 = in one call over the whole transcript;
    # n = from n sections of it, whose summaries or notes were then combined)
    pa.field("summary_sections", pa.int32()),
    pa.field("summary_from", pa.string()),  # "transcript" or "audio" (and why, when not as asked)
    # prompt rows with --schema, extract rows: the answer as compact JSON, valid under the schema (the
    # schema's top-level scalar properties follow as typed columns of their own: schemas/structured.py)
    pa.field("json", pa.string()),
    # prompt rows with --tools: the calls the model made (arguments as a JSON string)
    pa.field("tool_calls", pa.list_(TOOL_CALL_TYPE)),
]
RESULT_COLUMNS = [f.name for f in RESULT_FIELDS]
RESULT_SCHEMA = pa.schema(RESULT_FIELDS)

# Key columns: never duplicated in an output dataset, also after retries and resumed runs.
KEY_COLUMNS = ("id", "task", "target_language", "page")


def result_schema(passthrough: pa.Schema | None = None, typed: list[pa.Field] | None = None) -> pa.Schema:
    """The full schema of a result table: the contract columns, the --schema's typed columns, then the
    manifest's own extra columns."""
    fields = list(RESULT_FIELDS) + list(typed or [])
    if passthrough is not None:
        taken = set(RESULT_COLUMNS) | {f.name for f in typed or []}
        fields += [f for f in passthrough if f.name not in taken]
    return pa.schema(fields)
