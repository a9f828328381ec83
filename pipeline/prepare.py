"""CPU stage: manifest rows -> work rows (fetch, decode, segment, prompt, features).

Runs in Ray tasks on CPU nodes, before the GPU actors, so a GPU never waits on decoding, resampling,
VAD, feature extraction, image cropping or tokenisation.
"""
from __future__ import annotations

import logging

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.model_inputs import InputBuilder, encode_item
from pipeline.prompts import task_instruction
from pipeline.work_items import Chunk, work_row, work_table
from schemas.config import JobConfig
from schemas.manifest import passthrough_columns

log = logging.getLogger(__name__)

MODALITY_FOR_TASK = {"asr": "speech", "translate": "speech", "ocr": "vision", "summarize": "text"}


class PrepareWork:
    """`__call__(batch)`: a pyarrow batch of manifest rows -> a pyarrow table of work rows."""

    def __init__(self, config_json: str):
        from actors.model_files import local_model_dir
        from pipeline.storage import StorageOptions

        one_thread_per_worker()
        self.config = JobConfig.model_validate_json(config_json)
        processor_dir = local_model_dir(self.config, processor_only=True)
        self.storage = StorageOptions(endpoint_url=self.config.s3_endpoint)
        self.builder = InputBuilder(processor_dir, self.config.system_prompt, self.config.image.dynamic_hd)
        self._segmenter = None

    @property
    def segmenter(self):
        if self._segmenter is None:  # loaded once per worker, only by audio jobs
            from pipeline.segment import SpeechSegmenter

            self._segmenter = SpeechSegmenter(max_chunk_s=self.config.audio.max_chunk_s,
                                              grid_s=self.config.audio.grid_s)
        return self._segmenter

    def __call__(self, batch: pa.Table) -> pa.Table:
        out_rows: list[dict] = []
        source_rows: list[int] = []
        rows = batch.select([c for c in ("id", "uri", "data", "kind", "language", "target_language")
                             if c in batch.column_names]).to_pylist()
        for i, row in enumerate(rows):
            try:
                made = self.prepare_row(row)
            except InputError as exc:
                made = self.error_rows(row, str(exc))
            except Exception as exc:  # noqa: BLE001 - a row never takes the job down
                log.exception("preparing %s failed", row.get("id"))
                made = self.error_rows(row, f"{self.name(row)}: could not be prepared "
                                             f"({type(exc).__name__}: {exc})")
            out_rows.extend(made)
            source_rows.extend([i] * len(made))
        keep = passthrough_columns(batch.schema)
        return work_table(out_rows, batch.select(keep).take(source_rows) if keep else None)

    # -- per row ---------------------------------------------------------------------------------
    @staticmethod
    def name(row: dict) -> str:
        return row.get("uri") or f"id {row['id']}"

    def targets(self, row: dict) -> list[str]:
        """Translation targets: the row's own target_language overrides the job's list."""
        return [row["target_language"]] if row.get("target_language") else list(self.config.translate_to)

    def speech_tasks(self, row: dict) -> list[tuple[str, str | None]]:
        tasks: list[tuple[str, str | None]] = [("asr", None)]
        if "translate" in self.config.tasks:
            tasks += [("translate", t) for t in self.targets(row)]
        return tasks

    def error_rows(self, row: dict, message: str) -> list[dict]:
        """One error row per output row the input would have produced."""
        if self.config.job == "ocr":
            pairs = [("ocr", None)]
        else:
            pairs = self.speech_tasks(row)
        return [work_row(row["id"], task, target_language=target, language=row.get("language"), error=message)
                for task, target in pairs]

    def load_bytes(self, row: dict) -> bytes:
        from pipeline.fetch import fetch_bytes

        if row.get("data") is not None:
            return row["data"]
        return fetch_bytes(row["uri"], self.storage)

    def prepare_row(self, row: dict) -> list[dict]:
        from pipeline.decode import sniff_kind

        data = self.load_bytes(row)
        kind = row.get("kind") or sniff_kind(data, row.get("uri"))
        if self.config.job == "ocr":
            if kind not in ("image", "document"):
                raise InputError(f"{self.name(row)}: is {kind_phrase(kind)}, but the ocr job takes images "
                                 "and documents (PNG, JPEG, TIFF, WebP, BMP, GIF, PDF)")
            return self.document_rows(row, data)
        if kind not in ("audio", "meeting"):
            raise InputError(f"{self.name(row)}: is {kind_phrase(kind)}, but the {self.config.job} job takes "
                             "audio (WAV, FLAC, OGG, MP3)")
        return self.audio_rows(row, data)

    def audio_rows(self, row: dict, data: bytes) -> list[dict]:
        from pipeline.decode import SAMPLE_RATE, decode_audio, decode_audio_channels

        name = self.name(row)
        cfg = self.config.audio
        if cfg.split_channels:
            channels = decode_audio_channels(data, name)
            speakers = [f"channel {c + 1}" for c in range(len(channels))] if len(channels) > 1 else [None]
        else:
            channels, speakers = [decode_audio(data, name)], [None]
        duration = len(channels[0]) / SAMPLE_RATE
        if cfg.reject_no_speech and not any(self.segmenter.has_speech(a) for a in channels):
            raise InputError(f"{name}: no speech detected in {duration:.1f} s of audio")
        pieces = sorted(((chunk, speaker) for audio, speaker in zip(channels, speakers)
                         for chunk in self.segmenter.split(audio)), key=lambda p: (p[0].start_s, p[1] or ""))
        rows = self.audio_summary_rows(row, channels, duration)
        for task, target in self.speech_tasks(row):
            instruction = task_instruction(task, target)
            chunks = []
            for piece, speaker in pieces:
                built = self.builder.audio(piece.audio, instruction)
                chunks.append(Chunk(built.bucket, encode_item(built.inputs), built.input_tokens,
                                    piece.start_s, piece.end_s, speaker))
            rows.append(work_row(row["id"], task, chunks=chunks, target_language=target,
                                 language=row.get("language"), duration_s=duration, modality="speech"))
        return rows

    def audio_summary_rows(self, row: dict, channels: list, duration: float) -> list[dict]:
        """With `summarize_from_audio`, a recording short enough is summarised from its audio in one
        prompt (the speech pool); longer ones fall back to the transcript (PrepareSummaries)."""
        if not summary_from_audio(self.config, duration):
            return []
        audio = channels[0] if len(channels) == 1 else sum(channels) / len(channels)
        built = self.builder.audio(audio, task_instruction("summarize", from_audio=True))
        chunk = Chunk(built.bucket, encode_item(built.inputs), built.input_tokens)
        return [work_row(row["id"], "summarize", chunks=[chunk], language=row.get("language"),
                         duration_s=duration, modality="speech")]

    def document_rows(self, row: dict, data: bytes) -> list[dict]:
        from pipeline.decode import decode_pages

        cfg = self.config.image
        pages = decode_pages(data, self.name(row), max_pixels=cfg.max_pixels, pdf_dpi=cfg.pdf_dpi,
                             max_pages=cfg.max_pages)
        instruction = task_instruction("ocr")
        rows = []
        for number, image in enumerate(pages, start=1):
            built = self.builder.image(image, instruction)
            chunk = Chunk(built.bucket, encode_item(built.inputs), built.input_tokens)
            rows.append(work_row(row["id"], "ocr", chunks=[chunk], language=row.get("language"), page=number,
                                 pages=len(pages), modality="vision"))
        return rows


def one_thread_per_worker() -> None:
    """Each CPU stage worker holds one Ray CPU: torch's default of one thread per core, times a pool of
    workers, oversubscribes the node and starves the thread that feeds the GPU."""
    import torch

    torch.set_num_threads(1)


def summary_from_audio(config: JobConfig, duration: float | None) -> bool:
    """Whether this recording's summary comes from its audio (else from its transcript)."""
    return ("summarize" in config.tasks and config.audio.summarize_from_audio and duration is not None
            and duration <= config.audio.max_summary_audio_s)


def kind_phrase(kind: str) -> str:
    return {"image": "an image", "document": "a document", "audio": "audio", "meeting": "audio",
            "unknown": "not a recognised audio, image or document format"}.get(kind, kind)
