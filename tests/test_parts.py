"""Long recordings travel in parts (pipeline/stages/regroup_parts.py): regrouped in order, once, whatever the retries."""
from __future__ import annotations

import pyarrow as pa

from pipeline.stages.regroup_parts import PartsStore, RegroupParts, split_in_parts
from pipeline.context import RunContext
from schemas.config import JobConfig
from schemas.work_rows import BatchKey, WorkChunk, work_row, work_table


def _part_rows(row_id: str, n_chunks: int, per_part: int) -> list[dict]:
    chunks = [WorkChunk(BatchKey("audio", 3000), b"", 10, 30.0 * k, 30.0 * (k + 1)) for k in range(n_chunks)]
    parts = split_in_parts(chunks, per_part)
    rows = []
    for k, part in enumerate(parts, start=1):
        row = work_row(row_id, "asr", chunks=part, duration_s=30.0 * n_chunks, modality="speech",
                       part=k if len(parts) > 1 else None, parts=len(parts) if len(parts) > 1 else None)
        row["chunk_text"] = [f"{row_id}@{c.start_s:.0f}" for c in part]
        rows.append(row)
    return rows


def test_split_in_parts_keeps_order_and_bounds_every_part():
    assert split_in_parts(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_in_parts(list(range(3)), 16) == [[0, 1, 2]] and split_in_parts([], 4) == [[]]


def test_parts_store_hands_a_row_back_once_and_again_only_to_a_retry_of_its_completing_call():
    store = PartsStore()
    key = ("m", "asr", None, 1)
    assert store.add(key, 3, 3, b"c") is None and store.add(key, 1, 3, b"a") is None
    assert store.add(key, 1, 3, b"a") is None  # a retried call's part: replaces itself
    assert store.add(key, 2, 3, b"b") == [b"a", b"b", b"c"]  # complete: in part order
    assert store.add(key, 1, 3, b"a") is None  # a retry of a call that did not complete it: nothing
    assert store.add(key, 2, 3, b"b") == [b"a", b"b", b"c"]  # its completing call died: once more
    assert store.waiting_rows() == 0


def test_regroup_joins_parts_across_blocks_and_passes_other_rows_through(tiny_model):
    config = JobConfig(job="meetings", input="m", output="o", model={"source": tiny_model})
    stage = RegroupParts(RunContext.for_tests(config))
    long_rows = _part_rows("board", 40, 16)  # 3 parts
    short = _part_rows("standup", 5, 16)  # 1 part: a row in one piece
    assert [r["part"] for r in long_rows] == [1, 2, 3] and short[0]["parts"] is None
    agenda = pa.table({"agenda": ["budget", "budget", "budget", "retro"]})
    table = work_table(long_rows + short, agenda)
    first = stage(table.take([2, 3]))  # the last part comes first, with a whole row
    assert first["id"].to_pylist() == ["standup"]
    second = stage(table.take([0, 1]))
    assert second.num_rows == 1 and second.column_names == table.column_names
    row = second.to_pylist()[0]
    assert row["id"] == "board" and row["part"] == 1 and row["parts"] == 1
    assert row["chunk_start_s"] == [30.0 * k for k in range(40)]  # every chunk, in time order
    assert row["chunk_text"] == [f"board@{30 * k}" for k in range(40)]
    assert row["manifest:agenda"] == "budget"
    assert stage.counters["rows_regrouped"] == 1 and stage.counters["parts_in"] == 3
