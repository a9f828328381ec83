"""A 300-page Letter PDF through `phi4mm ocr` on the tiny model at the default 150 dpi and crop cap: every
page a row of its own, once, each saying the document has 300 pages, and the memory of the whole job
(driver, Ray, every worker; PSS) measured and bounded while the pages stream through."""
from __future__ import annotations

import json
import time

import duckdb
import pytest

from bench.documents import text_pdf

PAGES = 300


@pytest.mark.realsize
def test_a_300_page_pdf_streams_page_by_page_with_bounded_memory(run_job_alone, tmp_path):
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(text_pdf(PAGES, title="Operator manual"))
    manifest = tmp_path / "docs.csv"
    manifest.write_text(f"id,uri\nmanual,{pdf}\n")
    out = tmp_path / "out"
    started = time.monotonic()
    rc, peak, console = run_job_alone("ocr", manifest, out, "--max-new-tokens", "1", "--run-id", "long-pdf", "--quiet")
    assert rc == 0, console[-3000:]
    wall = time.monotonic() - started
    rows = duckdb.sql(f"select id, page, pages, status, error from read_parquet('{out}/**/*.parquet', "
                      "hive_partitioning=true) order by page").df()
    assert rows["page"].tolist() == list(range(1, PAGES + 1))  # every page, once, in the page column
    assert set(rows["pages"]) == {PAGES} and set(rows["id"]) == {"manual"}
    assert set(rows["status"]) == {"ok"}, rows[rows["status"] != "ok"]["error"].head().tolist()
    # The bound. Without streaming the prepare worker held every page's image and features until the
    # last was made: ~100 MB a page (measured on the old code: 20 / 40 / 72 pages took 2.8 / 4.5 / 9.5 GB,
    # 311 pages passed 12.5 GB before any page was sent on), so ~30 GB here, more than this machine has.
    # Streamed, none of it grows with the page count: the prepare worker holds a page being made and a
    # block of two; the vision replica on CPU takes 2 pages a call; on a cluster without GPUs the object
    # store holds at most 1 GiB of this dataset's blocks (3 calls' worth at the largest page, at least
    # 1 GiB); each worker hands its freed heap back after every block (pipeline/core/heap.py); the driver
    # checks the processor in a child process, so it never loads torch. Measured as a user runs it (a
    # command with its own Ray, 2 cores): 4.73 GB (decoding worker 1.74, vision replica 1.64, 0.75 GB
    # of it all in the object store, driver 0.17). Before those four changes: 7.0 GB here, 8.03 GB on
    # the CI machine (object store 1.9-2.1 GB under the old 4 GiB floor, driver 0.65 GB with torch).
    print(f"300-page PDF: wall {wall:.0f} s, peak memory (PSS) of the whole job {peak / 1e9:.2f} GB")
    assert peak < 6e9


@pytest.mark.realsize
def test_a_folder_of_mixed_scans_runs_with_the_default_config_every_page_once(run_job_alone, tmp_path):
    """A scanning room's folder: PNG, JPEG, TIFF (one pyramidal, with overviews) and WebP pages at Letter
    and A4 sizes, and multi-page PDFs of 3 to 12 pages, through `phi4mm ocr` with the default config
    (only the output length capped): every page a row, once; the job's memory measured and bounded."""
    from bench.documents import A4_PT, encoded, scan
    from tests.test_documents import pyramidal_tiff

    folder = tmp_path / "scans"
    folder.mkdir()
    expected = {}  # file -> pages
    sizes = [(1275, 1650), (1240, 1754), (1700, 2200), (1654, 2339)]  # Letter/A4 at 150 and 200 dpi
    formats = [("png", "PNG", {}), ("jpg", "JPEG", {"quality": 85}), ("tif", "TIFF", {"compression": "tiff_lzw"}),
               ("webp", "WEBP", {"quality": 80})]
    for k in range(40):
        ext, fmt, kwargs = formats[k % 4]
        name = f"scan-{k:02d}.{ext}"
        (folder / name).write_bytes(encoded(scan(sizes[k // 4 % 4], seed=k), fmt, **kwargs))
        expected[name] = 1
    for k, pages in enumerate((3, 5, 8, 12)):
        name = f"report-{k}.pdf"
        (folder / name).write_bytes(text_pdf(pages, A4_PT if k % 2 else (612, 792), title=f"Report {k}"))
        expected[name] = pages
    (folder / "slide.tif").write_bytes(pyramidal_tiff(pages=2))  # 2 pages, 4 overviews and a thumbnail
    expected["slide.tif"] = 2
    manifest = tmp_path / "scans.csv"
    manifest.write_text("id,uri\n" + "".join(f"{name},{folder / name}\n" for name in sorted(expected)))
    out = tmp_path / "out"
    started = time.monotonic()
    rc, peak, console = run_job_alone("ocr", manifest, out, "--max-new-tokens", "1", "--run-id", "scans", "--quiet")
    assert rc == 0, console[-3000:]
    wall = time.monotonic() - started
    got = duckdb.sql(f"select id, count(*) n, count(distinct page) d, min(page) lo, max(page) hi, max(pages) p, "
                     f"count(*) filter (where status = 'ok') ok from read_parquet('{out}/**/*.parquet', "
                     "hive_partitioning=true) group by id").df().set_index("id")
    assert sorted(got.index) == sorted(expected)
    for name, pages in expected.items():
        assert tuple(got.loc[name, ["n", "d", "lo", "hi", "p", "ok"]]) == (pages, pages, 1, pages, pages, pages), name
    record = json.loads((out / "_runs" / "scans.json").read_text())
    assert record["pages"] == sum(expected.values()) == 70
    # the bound: the vision replica here runs on CPU, so its calls hold 2 pages (on a GPU: 48, the 4 GiB
    # budget at the largest page); the object store holds what the vision pool can take soon (3 calls,
    # at least 1 GiB on a cluster without GPUs, 4 GiB with) or Ray Data's share of the store, whichever is
    # less. Measured as a user runs it (a command with its own Ray on 2 cores): 6.27 GB, at the peak two
    # decoding workers of 1.55-1.76 GB (torch, the processor, a page being prepared), the vision replica
    # 1.64 GB, 1.24 GB of it all in the object store, the driver 0.16 GB. Before the smaller CPU calls,
    # floor and freed-heap release: 7.9-8.9 GB over four runs. With the old defaults (512-row calls) the
    # same machine stalled with the vision actor alone at 11.9 GB.
    print(f"{len(expected)} mixed scans, 70 pages: wall {wall:.0f} s, peak memory (PSS) {peak / 1e9:.2f} GB")
    assert peak < 8e9
