"""CPU stage: manifest rows -> work rows (fetch, decode, segment, prompt, features).

Runs in Ray actors on CPU nodes, before the GPU actors, so a GPU never waits on decoding, resampling,
VAD, feature extraction, image cropping or tokenisation.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pyarrow as pa

from pipeline.chunk_inputs import samples_item
from pipeline.errors import InputError
from pipeline.fetch import PendingFetch, start_fetch
from pipeline.media import SAMPLE_RATE, PageSource, decode_audio, decode_audio_channels, open_pages, sniff_kind
from pipeline.model_inputs import InputBuilder
from pipeline.model_source import local_model_dir
from pipeline.parts import split_in_parts
from pipeline.prompts import task_instruction
from pipeline.segment import SpeechSegmenter
from pipeline.stage import Cluster, Stage, StageContext, StageResources, one_thread_per_worker
from pipeline.storage import StorageOptions
from pipeline.from_transcripts import summary_from_audio
from schemas.config import JobConfig
from schemas.manifest import passthrough_columns
from schemas.languages import is_known_language, unknown_language_message
from schemas.tasks import DERIVED_FROM, output_keys
from schemas.work_rows import WORK_COLUMNS, WorkChunk, encode_item, work_row, work_table

log = logging.getLogger(__name__)

# manifest columns a work row is made from (the others are passed through)
MANIFEST_READS = ("id", "uri", "data", "kind", "language", "target_language")

# Documents leave PrepareWork in blocks of about this many bytes of prepared model inputs (a Letter page
# at 150 dpi is ~31 MB of image features: two pages a block), or of this many rows (error rows for the
# pages past image.max_pages carry no features): a block is handed on as soon as it is full, so neither
# this worker nor the object store ever holds a whole long document's pages
DOCUMENT_BLOCK_BYTES = 64 << 20
DOCUMENT_BLOCK_ROWS = 1024


class PrepareWork(Stage):
    """Manifest rows -> work rows: one per output key (task x target language x page) of each input,
    with its chunks' model inputs built, or one error row per key when the input is bad."""

    reads = MANIFEST_READS
    writes = tuple(WORK_COLUMNS)

    def __init__(self, context: StageContext):
        super().__init__(context)
        one_thread_per_worker()
        processor_dir = self.processor_dir = local_model_dir(self.config, processor_only=True)
        inputs = self.config.inputs
        self.storage = StorageOptions(endpoint_url=self.config.s3_endpoint, connect_timeout_s=inputs.connect_timeout_s,
                                      read_timeout_s=inputs.read_timeout_s)
        self.builder = InputBuilder(processor_dir, self.config.system_prompt, self.config.image.dynamic_hd,
                                    audio_bucket_s=self.config.audio.batch_bucket_s)
        self._segmenter = None
        # what was measured of the current input before it failed (its decoded duration): error rows keep it
        self.measured: dict = {}

    def __call__(self, batch: pa.Table):
        # the progress line's "inputs prepared" (jobs/progress.py), declared here by every stage that turns
        # manifest rows into work rows (this one and its subclasses: PreparePrompts), whatever its name
        self.counters["inputs_prepared"] += batch.num_rows
        return super().__call__(batch)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        """A fixed pool of the CPUs the other actors leave (an autoscaling pool would start with one
        worker and ramp up while the GPUs wait), at most one worker per two inputs; small batches, so
        that decoding spreads over every worker from the start.

        A small machine gets at least one worker per two of its CPUs: the reservation (a CPU for each
        model actor, the light single actors, one for the driver) would leave a 2-core machine (4
        logical CPUs in the local Ray, jobs/runner.py) one worker while those others mostly wait on it.
        The workers then share what is left of the logical CPUs (a fraction each), so every other actor
        keeps its reservation and still schedules; each worker runs one thread."""
        per_task = config.resources.cpus_per_prepare_task
        room = cluster.cpus - cluster.reserved_cpus
        workers = max(int(room // per_task), int(cluster.cpus // 2), 1)
        workers = max(1, min(workers, math.ceil(cluster.input_rows / 2)))
        num_cpus = per_task if workers * per_task <= room else max(room, 0.05 * workers) / workers
        return StageResources(batch_size=rows_per_block(cluster.input_rows, workers), pool_size=(workers, workers),
                              num_cpus=num_cpus)

    @property
    def segmenter(self) -> SpeechSegmenter:
        if self._segmenter is None:  # loaded once per worker, only by audio jobs
            self._segmenter = SpeechSegmenter(max_chunk_s=self.config.audio.max_chunk_s,
                                              grid_s=self.config.audio.grid_s)
        return self._segmenter

    def process(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
        if self.config.job == "ocr":
            return self.document_blocks(batch)
        out_rows: list[dict] = []
        source_rows: list[int] = []
        rows = batch.select([c for c in MANIFEST_READS if c in batch.column_names]).to_pylist()
        # every row's fetch starts now, side by side: a row whose storage stalls costs its own timeout,
        # and the rows beside it are neither blocked by it nor waiting their turn behind it
        fetches = [self.start_load(row) for row in rows]
        for i, row in enumerate(rows):
            self.measured = {}
            made = self.rows_or_errors(row, lambda: self.prepare_row(row, fetches[i]))
            made += self.bad_value_rows(row)
            out_rows.extend(made)
            source_rows.extend([i] * len(made))
        keep = passthrough_columns(batch.schema)
        table = work_table(out_rows, batch.select(keep).take(source_rows) if keep else None)
        parts = [k for k, r in enumerate(out_rows) if r["parts"]]
        return self.part_blocks(table, parts) if parts else table

    @staticmethod
    def part_blocks(table: pa.Table, parts: list[int]) -> Iterator[pa.Table]:
        """The rows in one piece as one block, then each part of a long recording as a block of its own,
        so the BuildChunkInputs pool builds the parts' features side by side (pipeline/chunk_inputs.py)."""
        whole = sorted(set(range(table.num_rows)) - set(parts))
        if whole:
            yield table.take(whole)
        for k in parts:
            yield table.slice(k, 1)

    # -- per row ---------------------------------------------------------------------------------
    def rows_or_errors(self, row: dict, make) -> list[dict]:
        """`make()`'s work rows, or the row's error rows when it fails: a bad input is its own message,
        anything else is logged and named; a row never takes the job down."""
        try:
            return make()
        except InputError as exc:
            self.counters["bad_inputs"] += 1
            return self.error_rows(row, str(exc))
        except Exception as exc:  # noqa: BLE001 - a row never takes the job down
            log.exception("preparing %s failed", row.get("id"))
            self.counters["bad_inputs"] += 1
            return self.error_rows(row, f"{self.name(row)}: could not be prepared ({type(exc).__name__}: {exc})")

    @staticmethod
    def name(row: dict) -> str:
        return row.get("uri") or f"id {row['id']}"

    def all_keys(self, row: dict) -> list:
        """The output keys this stage answers for (schemas/tasks.py); those derived from another task's
        result (the summary, from the transcript) are made after assembly."""
        return [k for k in output_keys(self.config.tasks, self.config.translate_to, row.get("target_language"))
                if k.task not in DERIVED_FROM]

    @staticmethod
    def key_problem(key) -> str | None:
        """Why one output key of a row cannot be made whatever its input holds: a translation into a
        language code the model's prompts do not know (a bad value in the manifest row)."""
        if key.task == "translate" and not is_known_language(key.target_language):
            return f"target_language: {unknown_language_message(key.target_language)}"
        return None

    def input_keys(self, row: dict) -> list:
        """The output keys made from the input's media (the others: `bad_value_rows`)."""
        return [k for k in self.all_keys(row) if self.key_problem(k) is None]

    def bad_value_rows(self, row: dict) -> list[dict]:
        """One error row per output key that a bad value in the row rules out; the row's other outputs
        are made as usual, so a bad `target_language` costs only that translation."""
        return [work_row(row["id"], key.task, target_language=key.target_language, language=row.get("language"),
                         error=f"id {row['id']}: {problem}", **self.measured)
                for key in self.all_keys(row) if (problem := self.key_problem(key)) is not None]

    def error_rows(self, row: dict, message: str) -> list[dict]:
        """One error row per output row the input would have produced."""
        return [work_row(row["id"], key.task, target_language=key.target_language, language=row.get("language"),
                         error=message, **self.measured) for key in self.input_keys(row)]

    def start_load(self, row: dict) -> PendingFetch | None:
        """The row's fetch, started (None for a row that carries its bytes in `data`)."""
        if row.get("data") is not None:
            return None
        inputs = self.config.inputs
        return start_fetch(row["uri"], self.storage, timeout_s=inputs.fetch_timeout_s, rules=inputs)

    def load_bytes(self, row: dict, pending: PendingFetch | None = None) -> bytes:
        if row.get("data") is not None:
            return row["data"]
        return (pending or self.start_load(row)).result()

    def prepare_row(self, row: dict, pending: PendingFetch | None = None) -> list[dict]:
        data = self.load_bytes(row, pending)
        kind = row.get("kind") or sniff_kind(data, row.get("uri"))
        if kind not in ("audio", "meeting"):
            raise InputError(f"{self.name(row)}: is {kind_phrase(kind)}, but the {self.config.job} job takes "
                             "audio (WAV, FLAC, OGG, MP3)")
        return self.audio_rows(row, data)

    def audio_rows(self, row: dict, data: bytes) -> list[dict]:
        name = self.name(row)
        cfg = self.config.audio
        if cfg.split_channels:
            channels = decode_audio_channels(data, name, max_s=cfg.max_audio_s)
            speakers = [f"channel {c + 1}" for c in range(len(channels))] if len(channels) > 1 else [None]
        else:
            channels, speakers = [decode_audio(data, name, max_s=cfg.max_audio_s)], [None]
        duration = len(channels[0]) / SAMPLE_RATE
        self.measured["duration_s"] = duration  # kept by the row's error rows from here on
        if cfg.reject_no_speech and not any(self.segmenter.has_speech(a) for a in channels):
            raise InputError(f"{name}: no speech detected in {duration:.1f} s of audio")
        pieces = sorted(((chunk, speaker) for audio, speaker in zip(channels, speakers)
                         for chunk in self.segmenter.split(audio)), key=lambda p: (p[0].start_s, p[1] or ""))
        rows = self.audio_summary_rows(row, channels, duration)
        # a recording of several parts is only cut here: its chunks carry their samples, and the
        # BuildChunkInputs pool builds their features part by part on every CPU (pipeline/chunk_inputs.py)
        deferred = len(pieces) > cfg.part_chunks
        for key in self.input_keys(row):
            instruction = task_instruction(key.task, key.target_language)
            chunks = []
            for piece, speaker in pieces:
                if deferred:
                    batch_key, item = samples_item(piece.audio)
                    chunks.append(WorkChunk(batch_key, item, 0, piece.start_s, piece.end_s, speaker))
                    continue
                built = self.builder.audio(piece.audio, instruction)
                chunks.append(WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens,
                                        piece.start_s, piece.end_s, speaker))
            # a long recording in parts (pipeline/parts.py): no row holds more than part_chunks chunks
            parts = split_in_parts(chunks, cfg.part_chunks)
            for k, part in enumerate(parts, start=1):
                rows.append(work_row(row["id"], key.task, chunks=part, target_language=key.target_language,
                                     language=row.get("language"), duration_s=duration, modality="speech",
                                     part=k if len(parts) > 1 else None,
                                     parts=len(parts) if len(parts) > 1 else None))
        self.counters.update(audio_inputs=1, audio_chunks=len(pieces))
        self.counters["audio_s"] += duration
        return rows

    def audio_summary_rows(self, row: dict, channels: list, duration: float) -> list[dict]:
        """With `summarize_from_audio`, a recording short enough is summarised from its audio in one
        prompt (the speech pool); longer ones fall back to the transcript (PrepareFromTranscripts)."""
        if not summary_from_audio(self.config, duration):
            return []
        audio = channels[0] if len(channels) == 1 else sum(channels) / len(channels)
        built = self.builder.audio(audio, task_instruction("summarize", from_audio=True))
        chunk = WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens)
        return [work_row(row["id"], "summarize", chunks=[chunk], language=row.get("language"),
                         duration_s=duration, modality="speech", summary_sections=1, summary_from="audio")]

    # -- documents (the ocr job): streamed page by page ------------------------------------------
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


def rows_per_block(input_rows: int, workers: int) -> int:
    """Manifest rows per block and per call: about two blocks per worker, at most 16 rows."""
    return max(1, min(16, math.ceil(input_rows / (2 * workers))))


def kind_phrase(kind: str) -> str:
    return {"image": "an image", "document": "a document", "audio": "audio", "meeting": "audio",
            "unknown": "not a recognised audio, image or document format"}.get(kind, kind)
