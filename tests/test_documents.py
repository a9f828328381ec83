"""Documents page by page: PreparePages streams a document's pages in small blocks, a bad page is its own
error row, `image.max_pages` says what it left unread, pyramidal TIFFs' overviews are not pages, the run
record counts the pages read, and the vision pool's calls are sized by the bytes they carry."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from PIL import Image, TiffImagePlugin

from pipeline.media.kind import sniff_kind
from pipeline.media.pages import count_pages, decode_pages, open_pages
from pipeline.stages.prepare_pages import DOCUMENT_BLOCK_BYTES, PreparePages
from pipeline.context import RunContext
from pipeline.core.stage import Stage
from schemas.config import JobConfig
from schemas.manifest import validate_manifest
from bench.documents import LETTER_150_DPI, encoded, scan, text_pdf


def ocr_stage(tiny_model, **image) -> PreparePages:
    config = JobConfig(job="ocr", input="m.csv", output="out", model={"source": tiny_model}, image=image)
    return PreparePages(RunContext.for_tests(config, pa.schema([])))


def pyramidal_tiff(pages: int, levels: int = 2, thumbnail: bool = True) -> bytes:
    """A TIFF as slide scanners and GIS tools write it: each full-resolution page followed by its
    reduced-resolution overviews (NewSubfileType 1), and a thumbnail at the end (also NewSubfileType 1)."""
    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf, True) as tf:
        def frame(image, subfile_type):
            info = TiffImagePlugin.ImageFileDirectory_v2()
            info[254] = subfile_type
            image.save(tf, "TIFF", tiffinfo=info, compression="tiff_lzw")
            tf.newFrame()

        for page in range(pages):
            full = scan((1700, 2200), seed=page)
            frame(full, 2 if pages > 1 else 0)  # bit 1: a page of a multi-page document
            for level in range(1, levels + 1):
                frame(full.resize((1700 >> level, 2200 >> level)), 1)
        if thumbnail:
            frame(full.resize((120, 155)), 1)
    return buf.getvalue()


# -- media: pages -------------------------------------------------------------------------------------

def test_pyramidal_tiff_pages_are_its_full_resolution_frames():
    data = pyramidal_tiff(pages=3)
    assert Image.open(io.BytesIO(data)).n_frames == 3 * 3 + 1  # what a frame walk alone would OCR
    assert count_pages(data, "slide.tiff") == 3
    assert [p.size for p in decode_pages(data, "slide.tiff")] == [(1700, 2200)] * 3
    single = pyramidal_tiff(pages=1)
    assert count_pages(single, "map.tiff") == 1 and sniff_kind(single) == "image"  # one page, not a document


def test_page_source_renders_each_page_alone_and_knows_the_count_first():
    with open_pages(text_pdf(5), "report.pdf") as pages:
        assert pages.count == 5
        assert pages.render(4).size == (LETTER_150_DPI[0], LETTER_150_DPI[1] + 1)  # 792 pt at 150 dpi: 1650.0
        assert pages.render(0).size == pages.render(4).size


# -- PreparePages: streamed, a row per page -----------------------------------------------------------

def test_a_document_streams_in_blocks_every_page_once_with_its_page_count(tiny_model):
    stage = ocr_stage(tiny_model)
    table = validate_manifest(pa.Table.from_pylist([
        {"id": "report", "data": text_pdf(7)}, {"id": "scan", "data": encoded(scan((1240, 1754), 1), "PNG")}]))
    out = stage(table)
    assert not isinstance(out, pa.Table)  # a generator: Ray Data takes its blocks as they come
    blocks = list(out)
    assert len(blocks) >= 3  # 8 pages of ~31 MB of features: no block holds the whole document
    assert all(b.num_rows <= 1 + DOCUMENT_BLOCK_BYTES // (30 << 20) for b in blocks)
    rows = pa.concat_tables(blocks).to_pylist()
    assert [(r["id"], r["page"], r["pages"]) for r in rows] == \
        [("report", p, 7) for p in range(1, 8)] + [("scan", 1, 1)]
    assert all(r["error"] is None and r["modality"] == "vision" for r in rows)
    # the stage's counters see every block: rows out, one call, the pages read
    assert stage.counters["calls"] == 1 and stage.counters["rows_in"] == 2
    assert stage.counters["rows_out"] == 8 and stage.counters["blocks_out"] == len(blocks)
    assert stage.counters["pages"] == 8 and stage.counters["documents"] == 2


def test_max_pages_reads_the_first_pages_and_says_which_were_not_read(tiny_model):
    rows = pa.concat_tables(list(ocr_stage(tiny_model, max_pages=3)(
        validate_manifest(pa.Table.from_pylist([{"id": "manual", "data": text_pdf(8)}]))))).to_pylist()
    assert [r["page"] for r in rows] == list(range(1, 9)) and {r["pages"] for r in rows} == {8}
    assert [r["error"] is None for r in rows] == [True] * 3 + [False] * 5
    assert rows[3]["error"] == "id manual: page 4 of 8 not read: image.max_pages is 3 (raise it to read the " \
                              "whole document)"
    assert all(r["modality"] == "none" and r["chunk_inputs"] == [] for r in rows[3:])  # no work for the GPU


def test_an_oversized_page_is_an_error_row_of_its_own_and_the_rest_are_read(tiny_model):
    # page 2 is a poster (36x48 in): 5400x7200 pixels at 150 dpi, over a 10 MP cap; the Letter pages are not
    pdf = _concat_pdfs(text_pdf(1), text_pdf(1, size_pt=(2592, 3456)), text_pdf(1))
    rows = pa.concat_tables(list(ocr_stage(tiny_model, max_pixels=10_000_000)(
        validate_manifest(pa.Table.from_pylist([{"id": "mixed", "data": pdf}]))))).to_pylist()
    assert [(r["page"], r["pages"], r["error"] is None) for r in rows] == [(1, 3, True), (2, 3, False), (3, 3, True)]
    assert "page 2 of 3 would render at 5400x7200 pixels at 150 dpi, over the 10.0 MP limit" in rows[1]["error"]


def test_a_document_that_cannot_be_opened_is_one_error_row(tiny_model):
    stage = ocr_stage(tiny_model)
    rows = pa.concat_tables(list(stage(validate_manifest(pa.Table.from_pylist([
        {"id": "cut", "data": text_pdf(4)[:200]}, {"id": "ok", "data": text_pdf(1)}]))))).to_pylist()
    assert [(r["id"], r["page"], r["error"] is None) for r in rows] == [("cut", 1, False), ("ok", 1, True)]
    assert rows[0]["error"].startswith("id cut: cannot open PDF") and rows[0]["pages"] is None
    assert stage.counters["bad_inputs"] == 1


def _concat_pdfs(*pdfs: bytes) -> bytes:
    import pypdfium2 as pdfium

    out = pdfium.PdfDocument.new()
    for data in pdfs:
        src = pdfium.PdfDocument(data)
        out.import_pages(src)
    buf = io.BytesIO()
    out.save(buf)
    return buf.getvalue()


# -- Stage: a streaming process keeps its counters right ------------------------------------------------

class _Splitter(Stage):
    def process(self, batch):
        for start in range(0, batch.num_rows, 2):
            yield batch.slice(start, 2)


def test_a_streaming_stage_counts_every_block_it_yields():
    stage = _Splitter(RunContext.for_tests(JobConfig(job="ocr", input="m", output="o")))
    blocks = list(stage(pa.table({"x": list(range(5))})))
    assert [b.num_rows for b in blocks] == [2, 2, 1]
    assert stage.counters["calls"] == 1 and stage.counters["rows_in"] == 5
    assert stage.counters["rows_out"] == 5 and stage.counters["blocks_out"] == 3
    assert stage.counters["busy_s"] >= 0


# -- the run record counts pages read ------------------------------------------------------------------

def test_run_record_counts_pages_read_not_error_rows():
    from jobs.run_record import run_record
    from schemas.results import RESULT_SCHEMA

    rows = [{"id": "a", "task": "ocr", "page": p, "pages": 5, "status": "ok" if p <= 3 else "error"}
            for p in range(1, 6)] + [{"id": "b", "task": "ocr", "page": 1, "pages": None, "status": "error"}]
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    now = datetime.now(timezone.utc)
    record = run_record({"run_id": "r", "job": "ocr"}, table, now, now, 0)
    assert record["pages"] == 3 and record["counts"] == {"ocr": {"ok": 3, "error": 3}}


# -- GPU calls sized by what they carry ----------------------------------------------------------------

def test_vision_calls_are_sized_by_features_bytes_and_speech_keeps_its_rows():
    from actors.model_stage import SpeechStage, VisionStage, call_rows
    from jobs.graph import queued_features_limit, stages_of
    from pipeline.model.inputs import max_page_feature_bytes
    from pipeline.core.stage import Cluster

    cluster = Cluster(cpus=16, gpus=1)
    ocr = JobConfig(job="ocr", input="m", output="o")
    rows = VisionStage.resources(ocr, cluster).batch_size
    assert rows == call_rows(ocr, "vision") == 48  # 4 GiB / 89 MB, the largest page at dynamic_hd 36
    assert rows * max_page_feature_bytes(36) <= ocr.batching.vision_call_bytes
    assert 31_000_000 * rows < 1.6e9  # what a call of Letter pages (13 crops, ~31 MB) carries
    fewer_crops = ocr.model_copy(update={"image": ocr.image.model_copy(update={"dynamic_hd": 12})})
    assert call_rows(fewer_crops, "vision") == 136  # smaller pages: more of them per call
    # the object store holds at most 3 such calls per replica of prepared pages
    assert queued_features_limit(ocr, cluster) == 3 * rows * max_page_feature_bytes(36)
    # a replica on CPU (the tiny model): a few pages a call, and so a few in the object store
    on_cpu = Cluster(cpus=16, gpus=0)
    assert VisionStage.resources(ocr, on_cpu).batch_size == 2
    assert 3 * 2 * max_page_feature_bytes(36) < queued_features_limit(ocr, on_cpu) == 1 << 30  # the CPU floor
    # a GPU cluster with small calls still gets the 4 GiB floor (the writer's share must fit a task)
    few = ocr.model_copy(update={"batching": ocr.batching.model_copy(update={"rows_per_call": 2})})
    assert queued_features_limit(few, cluster) == 4 << 30
    # speech and meetings: as before (30 s chunks, ~1 MB each)
    assert SpeechStage.resources(JobConfig(job="transcribe", input="m", output="o"), cluster).batch_size == 512
    # (a meetings row is one part of up to 16 chunks: 32 rows, ~512 chunks, pipeline/stages/regroup_parts.py)
    meetings = JobConfig(job="meetings", input="m", output="o")
    speech = next(s for s in stages_of(meetings) if s.stage is SpeechStage)  # the meetings job's own size
    assert speech.resources(meetings, cluster).batch_size == 32
    assert queued_features_limit(JobConfig(job="transcribe", input="m", output="o"), cluster) is None


@pytest.mark.parametrize("value", [0, 1000])
def test_a_vision_call_budget_under_a_mebibyte_is_refused(value):
    with pytest.raises(ValueError, match="vision_call_bytes"):
        JobConfig(job="ocr", input="m", output="o", batching={"vision_call_bytes": value})
