"""CPU stage of the ocr job: images and documents -> one work row per page, streamed.

A document's pages are rendered and prepared one at a time and leave in blocks of about
DOCUMENT_BLOCK_BYTES, so neither this worker nor the object store ever holds a whole long document's
pages (a 300-page PDF at 150 dpi would be ~30 GB of features).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa

from pipeline.core.errors import InputError
from pipeline.io.fetch import PendingFetch
from pipeline.media.kind import sniff_kind
from pipeline.media.pages import PageSource, open_pages
from pipeline.model.prompts import task_instruction
from pipeline.stages.manifest_stage import MANIFEST_READS, ManifestStage, kind_phrase
from schemas.manifest import passthrough_columns
from schemas.work_rows import WorkChunk, encode_item, work_row, work_table

log = logging.getLogger(__name__)

# Documents leave PreparePages in blocks of about this many bytes of prepared model inputs (a Letter page
# at 150 dpi is ~31 MB of image features: two pages a block), or of this many rows (error rows for the
# pages past image.max_pages carry no features): a block is handed on as soon as it is full, so neither
# this worker nor the object store ever holds a whole long document's pages
DOCUMENT_BLOCK_BYTES = 32 << 20
DOCUMENT_BLOCK_ROWS = 1024


class PreparePages(ManifestStage):
    """Images and documents -> one work row per page, with its model inputs built, or the input's error
    rows (a page that cannot be rendered is an error row of its own)."""

    def process(self, batch: pa.Table) -> Iterator[pa.Table]:
        return self.document_blocks(batch)

    def document_blocks(self, batch: pa.Table) -> Iterator[pa.Table]:
        """The work rows of a batch of images and documents, one per page, handed on in blocks of about
        DOCUMENT_BLOCK_BYTES as the pages are rendered and prepared: one page's image and features are
        held at a time, whatever the page count."""
        rows = batch.select([c for c in MANIFEST_READS if c in batch.column_names]).to_pylist()
        keep = passthrough_columns(batch.schema)
        passthrough = batch.select(keep) if keep else None
        fetches = [self.start_load(row) for row in rows]  # side by side, as in `process`
        pending: list[dict] = []
        sources: list[int] = []
        size, emitted = 0, False
        for i, row in enumerate(rows):
            fetch, fetches[i] = fetches[i], None  # the bytes are held by this row's pages only
            for made in self.document_work_rows(row, fetch):
                pending.append(made)
                sources.append(i)
                size += sum(len(blob) for blob in made["chunk_inputs"])
                if size >= DOCUMENT_BLOCK_BYTES or len(pending) >= DOCUMENT_BLOCK_ROWS:
                    yield work_table(pending, passthrough.take(sources) if passthrough is not None else None)
                    pending, sources, size, emitted = [], [], 0, True
            del fetch
            rows[i] = {}
        if pending or not emitted:
            yield work_table(pending, passthrough.take(sources) if passthrough is not None else None)

    def document_work_rows(self, row: dict, pending: PendingFetch | None) -> Iterator[dict]:
        """One input's work rows, page by page; a bad input yields its error rows instead."""
        try:
            data = self.load_bytes(row, pending)
            kind = row.get("kind") or sniff_kind(data, row.get("uri"))
            if kind not in ("image", "document"):
                raise InputError(f"{self.name(row)}: is {kind_phrase(kind)}, but the ocr job takes images "
                                 "and documents (PNG, JPEG, TIFF, WebP, AVIF, BMP, GIF, PDF)")
            cfg = self.config.image
            pages = open_pages(data, self.name(row), max_pixels=cfg.max_pixels, pdf_dpi=cfg.pdf_dpi)
            del data
        except InputError as exc:
            self.counters["bad_inputs"] += 1
            yield from self.error_rows(row, str(exc))
            yield from self.bad_value_rows(row)
            return
        except Exception as exc:  # noqa: BLE001 - a row never takes the job down
            log.exception("preparing %s failed", row.get("id"))
            self.counters["bad_inputs"] += 1
            yield from self.error_rows(row, f"{self.name(row)}: could not be prepared ({type(exc).__name__}: {exc})")
            yield from self.bad_value_rows(row)
            return
        with pages:
            yield from self.page_rows(row, pages)
        yield from self.bad_value_rows(row)

    def page_rows(self, row: dict, pages: PageSource) -> Iterator[dict]:
        """One work row per page of the document, every one saying the document's page count.

        A page that cannot be rendered or prepared is an error row of its own (the other pages go on).
        Pages past `image.max_pages` are not read, and each is an error row that says so: the cap is a
        cost bound, and a row per page keeps it visible where users count (`status`, `page`, `pages`)
        and lets `--resume` with a higher cap read them, where a note on the read pages would be
        missed by every query that counts rows."""
        cfg, name, n = self.config.image, self.name(row), pages.count
        read = n if cfg.max_pages is None else min(n, cfg.max_pages)
        instruction = task_instruction("ocr")

        def page_row(number: int, **fields) -> dict:
            return work_row(row["id"], "ocr", language=row.get("language"), page=number, pages=n, **fields)

        done = 0
        for index in range(read):
            try:
                built = self.builder.image(pages.render(index), instruction)
            except InputError as exc:
                self.counters["bad_pages"] += 1
                yield page_row(index + 1, error=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one page never takes its document (or the job) down
                log.exception("preparing page %d of %s failed", index + 1, row.get("id"))
                self.counters["bad_pages"] += 1
                yield page_row(index + 1, error=f"{name}: page {index + 1} of {n} could not be prepared "
                                                 f"({type(exc).__name__}: {exc})")
                continue
            chunk = WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens)
            del built
            done += 1
            yield page_row(index + 1, chunks=[chunk], modality="vision")
        for index in range(read, n):
            yield page_row(index + 1, error=f"{name}: page {index + 1} of {n} not read: image.max_pages is "
                                            f"{cfg.max_pages} (raise it to read the whole document)")
        self.counters.update(documents=1, pages=done, pages_not_read=n - read)
