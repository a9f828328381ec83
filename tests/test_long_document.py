"""A 300-page Letter PDF through `phi4mm ocr` on the tiny model at the default 150 dpi and crop cap: every
page a row of its own, once, each saying the document has 300 pages, and the memory of the whole job
(driver, Ray, every worker; PSS) measured and bounded while the pages stream through."""
from __future__ import annotations

import time

import duckdb
import pytest

from tests.conftest import PeakMemory
from tests.documents import text_pdf

PAGES = 300


@pytest.mark.slow
def test_a_300_page_pdf_streams_page_by_page_with_bounded_memory(run_job, tmp_path):
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(text_pdf(PAGES, title="Operator manual"))
    manifest = tmp_path / "docs.csv"
    manifest.write_text(f"id,uri\nmanual,{pdf}\n")
    out = tmp_path / "out"
    started = time.monotonic()
    with PeakMemory() as memory:
        assert run_job("ocr", manifest, out, "--max-new-tokens", "1", "--run-id", "long-pdf", "--quiet") == 0
    wall = time.monotonic() - started
    rows = duckdb.sql(f"select id, page, pages, status, error from read_parquet('{out}/**/*.parquet', "
                      "hive_partitioning=true) order by page").df()
    assert rows["page"].tolist() == list(range(1, PAGES + 1))  # every page, once, in the page column
    assert set(rows["pages"]) == {PAGES} and set(rows["id"]) == {"manual"}
    assert set(rows["status"]) == {"ok"}, rows[rows["status"] != "ok"]["error"].head().tolist()
    # The bound. Without streaming the prepare worker held every page's image and features until the
    # last was made: ~100 MB a page (measured on the old code: 20 / 40 / 72 pages took 2.8 / 4.5 / 9.5 GB,
    # 311 pages passed 12.5 GB before any page was sent on), so ~30 GB here, more than this machine has.
    # Streamed, the prepare worker holds one page (~31 MB of features, ~100 MB while it is made) and a
    # block of two; the vision actor holds at most two calls; Ray, the driver and the tiny model's
    # replicas take ~2.5 GB. Measured here: see the printed line.
    print(f"300-page PDF: wall {wall:.0f} s, peak memory (PSS) of the whole job {memory.peak / 1e9:.2f} GB")
    assert memory.peak < 6e9
