"""An idle decoding worker holds what it was set up with, not what its last call made.

The worker is a Ray actor holding one PreparePages, as the ocr job's decoding pool does. Its first call
prepares a 20-page PDF and four page scans (Letter and A4 at 150 and 200 dpi: 31-60 MB of features
each); the blocks are consumed, and the worker then sits idle while its memory is read from
/proc/<pid>/smaps_rollup (PSS: shared pages, the object store's among them, split among the processes
that map them; Pss_Anon: its own heap). A node runs one such worker per core, so what one keeps while
idle is multiplied by the node's cores.
"""
from __future__ import annotations

import pyarrow as pa
import pytest

from bench.documents import encoded, scan, text_pdf
from bench.host_memory import pss_rollup

PAGES = 20
SCANS = [(1275, 1650), (1240, 1754), (1700, 2200), (1654, 2339)]


@pytest.mark.realsize  # memory, measured (20 s)
def test_an_idle_decoding_worker_holds_what_it_was_set_up_with(ray_session, tiny_model, tmp_path):
    from pipeline.context import RunContext
    from pipeline.stages.prepare_pages import PreparePages
    from schemas.config import JobConfig

    ray = ray_session

    @ray.remote(num_cpus=0.5)
    class DecodingWorker:
        def __init__(self, context):
            import os

            self.stage, self.pid = PreparePages(context), os.getpid()

        def prepare(self, table: pa.Table) -> list[dict]:
            """Every block's (id, page, error, feature bytes): the blocks themselves are let go."""
            return [{"id": r["id"], "page": r["page"], "error": r["error"], "bytes": sum(map(len, r["chunk_inputs"] or []))}
                    for block in self.stage(table) for r in block.select(["id", "page", "error", "chunk_inputs"]).to_pylist()]

        def process_id(self) -> int:
            return self.pid

    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(text_pdf(PAGES, title="Operator manual"))
    config = JobConfig(job="ocr", input="m.csv", output="out", model={"source": tiny_model})
    worker = DecodingWorker.remote(RunContext.for_tests(config, pa.schema([])))
    pid = ray.get(worker.process_id.remote(), timeout=300)
    set_up = pss_rollup(pid)
    table = pa.table({"id": ["manual"] + [f"scan-{k}" for k in range(len(SCANS))],
                      "uri": [str(pdf)] + [None] * len(SCANS),
                      "data": [None] + [encoded(scan(size, seed=k), "PNG") for k, size in enumerate(SCANS)]})
    rows = ray.get(worker.prepare.remote(table), timeout=600)
    idle = pss_rollup(pid)
    ray.kill(worker)
    # every page and scan prepared, once, each with its features (the worker really did the work)
    assert sorted((r["id"], r["page"]) for r in rows) == sorted(
        [("manual", p) for p in range(1, PAGES + 1)] + [(f"scan-{k}", 1) for k in range(len(SCANS))])
    assert not any(r["error"] for r in rows) and min(r["bytes"] for r in rows) > 30e6
    print(f"decoding worker set up: PSS {set_up['Pss'] / 1e9:.2f} GB, anonymous {set_up['Pss_Anon'] / 1e9:.2f}; "
          f"idle after {len(rows)} pages: PSS {idle['Pss'] / 1e9:.2f} GB, anonymous {idle['Pss_Anon'] / 1e9:.2f}, "
          f"object store {idle['Pss_Shmem'] / 1e9:.2f}")
    # What it keeps beyond its setup (Ray's worker, torch, transformers and the processor): the pages it
    # rendered and prepared are freed and handed back to the system at the end of each block and call
    # (pipeline/core/heap.py). Kept by glibc's arenas and pyarrow's pool, the same worker held ~0.5 GB more
    # while idle, for as long as it lived.
    assert idle["Pss_Anon"] - set_up["Pss_Anon"] < 0.2e9
