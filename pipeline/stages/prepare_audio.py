"""CPU stage of the audio jobs (transcribe, meetings): recordings -> work rows of speech chunks.

Each recording is fetched, decoded to 16 kHz mono (or per channel), checked for speech, cut on silence
into chunks of at most `audio.max_chunk_s`, and each chunk's model inputs built. A long recording (more
than `audio.part_chunks` chunks) is only decoded and cut here: its chunks carry their samples, it
leaves in parts (pipeline/stages/regroup_parts.py), and BuildChunkFeatures builds its features on
every free CPU (pipeline/stages/chunk_features.py).
"""
from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipeline.context import RunContext
from pipeline.core.errors import InputError
from pipeline.io.fetch import PendingFetch
from pipeline.media.audio import SAMPLE_RATE, decode_audio, decode_audio_channels
from pipeline.media.kind import sniff_kind
from pipeline.media.segment import SpeechSegmenter
from pipeline.model.inputs import samples_item
from pipeline.model.prompts import task_instruction
from pipeline.model.transcript_tasks import summary_from_audio
from pipeline.stages.manifest_stage import MANIFEST_READS, ManifestStage, kind_phrase
from pipeline.stages.regroup_parts import split_in_parts
from schemas.manifest import passthrough_columns
from schemas.work_rows import WorkChunk, encode_item, work_row, work_table


class PrepareAudio(ManifestStage):
    """Recordings -> one work row per output key (or one per part of a long recording), with its chunks'
    model inputs built, or the recording's error rows."""

    def __init__(self, context: RunContext):
        super().__init__(context)
        self._segmenter = None

    @property
    def segmenter(self) -> SpeechSegmenter:
        if self._segmenter is None:  # loaded once per worker, only by audio jobs
            self._segmenter = SpeechSegmenter(max_chunk_s=self.config.audio.max_chunk_s,
                                              grid_s=self.config.audio.grid_s)
        return self._segmenter

    def process(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
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
        so the BuildChunkFeatures pool builds the parts' features side by side (pipeline/stages/chunk_features.py)."""
        whole = sorted(set(range(table.num_rows)) - set(parts))
        if whole:
            yield table.take(whole)
        for k in parts:
            yield table.slice(k, 1)

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
        # BuildChunkFeatures pool builds their features part by part on every CPU (pipeline/stages/chunk_features.py)
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
            # a long recording in parts (pipeline/stages/regroup_parts.py): no row holds more than part_chunks chunks
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
