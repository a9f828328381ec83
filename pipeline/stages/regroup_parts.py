"""Long recordings travel in parts: a work row holds at most `audio.part_chunks` chunks' model inputs.

An hour of audio is ~120 chunks of ~1 MB of features; as one work row it is a 120 MB Ray object that
no block split can cut, that one GPU call must take whole, and that a worker must hold whole. So
PrepareAudio cuts a long recording's work row into parts (`part` k of `parts`, each with its own
chunks, in time order), which flow through the GPU pool like any other rows, and `RegroupParts` puts
them back together, in order, once their features are spent (only texts and counts are left), before
assembly. A part row never reaches the output.

Regrouping needs state across calls: parts of one recording arrive in different blocks. The parts
wait in the run's `RunState` actor (pipeline/core/run_state.py), which lives on the driver's node, not in
the regrouping actor: that actor may be on a worker node that is lost, and Ray Data then retries the
lost call's block, which must neither lose the parts that came before nor make the row twice.
"""
from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.run_state import PartsStore
from pipeline.core.stage import Cluster, Stage, StageResources
from schemas.config import JobConfig

log = logging.getLogger(__name__)

# the per-chunk columns, concatenated part after part when a row is regrouped
CHUNK_COLUMNS = ("chunk_start_s", "chunk_end_s", "chunk_speaker", "chunk_batch_key", "chunk_inputs",
                 "chunk_input_tokens", "chunk_text", "chunk_output_tokens", "chunk_output_ids", "chunk_latency_s",
                 "chunk_error")


def split_in_parts(items: list, per_part: int) -> list[list]:
    """`items` in consecutive parts of at most `per_part` (one part when they fit)."""
    return [items[k:k + per_part] for k in range(0, len(items), per_part)] or [items]


def part_key(row: dict) -> tuple:
    return row["id"], row["task"], row["target_language"], row["page"]


class RegroupParts(Stage):
    """Part rows (parts > 1) back into one work row each, chunks in order; other rows pass through.

    Rows out may be fewer than rows in: a part row waits (in the run's RunState) until its row's
    last part comes, and the whole row leaves with the block that brought it."""

    reads = ("id", "task", "target_language", "page", "part", "parts", *CHUNK_COLUMNS)
    writes = ("part", "parts", *CHUNK_COLUMNS)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        return StageResources(batch_size=None, num_cpus=0.25)  # one actor, whole blocks: list work only

    def __init__(self, context):
        super().__init__(context)
        self.local = PartsStore()  # without a run (a unit test calling the stage): parts wait here

    def process(self, batch: pa.Table) -> pa.Table:
        parts = batch["parts"].fill_null(1)
        split = pc.greater(parts, 1)
        if not pc.any(split).as_py():
            return batch
        whole = batch.filter(pc.invert(split))
        out = [whole]
        pending = batch.filter(split)
        for k, row in enumerate(pending.select(["id", "task", "target_language", "page", "part", "parts"]).to_pylist()):
            blobs = self.add(part_key(row), row["part"], row["parts"], _to_ipc(pending.slice(k, 1)))
            self.counters["parts_in"] += 1
            if blobs is not None:
                out.append(merge_parts([_from_ipc(b) for b in blobs]).select(batch.column_names))
                self.counters["rows_regrouped"] += 1
        return pa.concat_tables(out)

    def add(self, key: tuple, part: int, parts: int, blob: bytes) -> list[bytes] | None:
        """The row's parts when this was its last, else None; held by the run's RunState actor.

        Unlike counters, a part must not be dropped: if that actor cannot be reached the call fails,
        and Ray Data retries the block (the parts already held stay held)."""
        if self.context.run_state is None:
            return self.local.add(key, part, parts, blob)
        import ray

        for attempt in range(5):
            try:
                if self._actor is None:
                    self._actor = ray.get_actor(self.context.run_state)
                return ray.get(self._actor.hold_part.remote(self.stage_name, key, part, parts, blob), timeout=120)
            except Exception as exc:  # noqa: BLE001 - retried, then raised: never a lost part
                self._actor = None
                if attempt == 4:
                    raise RuntimeError(f"{key[0]}: the run's parts store is unreachable ({exc})") from exc
                time.sleep(2.0 * (attempt + 1))
        return None


def merge_parts(tables: list[pa.Table]) -> pa.Table:
    """One work row from its part rows (one row each, in part order): every per-chunk list joined, the
    rest from the first part, and the first error of any part as the row's error."""
    first = tables[0]
    merged = {}
    for name in first.column_names:
        if name in CHUNK_COLUMNS:
            merged[name] = pa.array([[v for t in tables for v in (t[name][0].as_py() or [])]],
                                    first.schema.field(name).type)
        elif name == "error":
            errors = [t["error"][0].as_py() for t in tables if t["error"][0].is_valid]
            merged[name] = pa.array([errors[0] if errors else None], first.schema.field(name).type)
        elif name in ("part", "parts"):
            merged[name] = pa.array([1], first.schema.field(name).type)
        else:
            merged[name] = first[name]
    return pa.table(merged, schema=first.schema)


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(blob).read_all()
