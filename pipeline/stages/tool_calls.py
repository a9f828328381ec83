"""`phi4mm prompt --tools`: the tools in the card's format, and the model's calls parsed into columns.

The card lists the tools as JSON in the system message between `<|tool|>` and `<|/tool|>`; the model
answers a call with a JSON list of {"name", "arguments"} (between `<|tool_call|>` markers, which the
decoded text may or may not keep). A row whose answer is such a list gets `tool_calls` (name, arguments
as a JSON string); an answer in words keeps only its `text`.
"""
from __future__ import annotations

import json
import re

import pyarrow as pa

from pipeline.core.stage import Cluster, Stage, StageResources
from schemas.config import JobConfig
from schemas.results import TOOL_CALL_TYPE

_MARKERS = re.compile(r"<\|/?tool_call\|>")


def parse_tool_calls(text: str | None) -> list[dict] | None:
    """[{name, arguments (a JSON string)}] when the answer is a call (or a list of calls), else None."""
    if not text:
        return None
    body = _MARKERS.sub("", text).strip()
    start = min((i for i in (body.find("["), body.find("{")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(body[start:])
    except ValueError:
        return None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):  # {"type": "function", ...}
            call = call["function"]
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        out.append({"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)})
    return out or None


class ToolCalls(Stage):
    """Fills `tool_calls` of the ok prompt rows whose answer is a call."""

    reads = ("task", "error", "text")
    writes = ("tool_calls",)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        return StageResources(batch_size=None, num_cpus=0.25)  # one actor, whole blocks: parsing only

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(list(self.reads)).to_pylist()
        calls = [parse_tool_calls(r["text"]) if r["task"] == "prompt" and r["error"] is None else None
                 for r in rows]
        self.counters["tool_call_rows"] += sum(c is not None for c in calls)
        return batch.append_column(pa.field("tool_calls", pa.list_(TOOL_CALL_TYPE)),
                                   pa.array(calls, pa.list_(TOOL_CALL_TYPE)))
