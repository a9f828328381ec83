"""What is made from a whole recording's transcript for the text pool: its summary (unless it comes from the
audio itself) and, with --extract, the schema's fields."""
from __future__ import annotations

import pyarrow as pa

from pipeline.context import RunContext
from pipeline.core.stage import Cluster, Stage, StageResources, one_thread_per_worker
from pipeline.model.inputs import InputBuilder
from pipeline.model.prompts import extract_pieces, extract_section_pieces, section_pieces, summary_pieces
from pipeline.model.transcript_tasks import (TRANSCRIPT_TASKS, answer_limits, extract_wording, fitted,
                                             split_in_sections, summary_from_audio)
from schemas.config import JobConfig
from schemas.work_rows import WORK_COLUMNS, WorkChunk, carried_columns, encode_item, work_row, work_table


class PrepareFromTranscripts(Stage):
    """For every assembled `asr` row, add the work rows made from its transcript (adds rows): a
    `summarize` row (unless the speech pool summarised it from the audio) and, with --extract, an
    `extract` row.

    A transcript that failed gives rows that fail with the same reason, so those partitions have a row
    for every input too.
    """

    reads = ("id", "task", "text", "segments", "error", "duration_s", "language", "chunk_text", "chunk_speaker",
             "chunk_output_ids")
    writes = tuple(WORK_COLUMNS)  # the new rows

    def __init__(self, context: RunContext):
        super().__init__(context)
        one_thread_per_worker()
        self.builder = InputBuilder(context.model_dir(processor_only=True), self.config.system_prompt)
        self.window = self.config.summary.window_tokens
        self.max_new = answer_limits(self.config)
        self.tasks = [t for t in TRANSCRIPT_TASKS if t in self.config.tasks]
        self.extract_system, self.fields = extract_wording(self.config)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        # one actor: tokenising transcripts is quick; whole blocks as they come, never gathered, so the
        # rows of a GPU call stream on to the writer (a kill throws away only what is upstream)
        return StageResources(batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(list(self.reads)).to_pylist()
        picks, made = [], []
        for i, row in enumerate(rows):
            if row["task"] != "asr":
                continue
            common = {"language": row["language"], "duration_s": row["duration_s"]}
            segments = None
            for task in self.tasks:
                if task == "summarize" and not row["error"] and summary_from_audio(self.config, row["duration_s"]):
                    continue  # summarised from the audio by the speech pool already
                what = "summary" if task == "summarize" else "extraction"
                if row["error"]:
                    new = work_row(row["id"], task, **common, error=f"no {what}: the transcript failed ({row['error']})")
                elif not row["text"]:
                    new = work_row(row["id"], task, **common, error=f"{row['id']}: no {what}: the transcript is empty")
                else:
                    if segments is None:
                        segments = self.transcript_segments(row)
                        self.counters["transcript_tokens"] += sum(len(ids) for _, ids, _ in segments)
                    new = self.summary_row(row, segments, common) if task == "summarize" else \
                        self.extract_row(row, segments, common)
                made.append(new)
                picks.append(i)
        self.counters["summaries"] += sum(r["task"] == "summarize" for r in made)
        self.counters["extractions"] += sum(r["task"] == "extract" for r in made)
        if not picks:
            return batch
        extra = carried_columns(batch)
        new_rows = work_table(made, batch.select(extra).take(picks) if extra else None, carried=True)
        return pa.concat_tables([batch, new_rows.select(batch.column_names)])

    def summary_row(self, row: dict, segments: list, common: dict) -> dict:
        """The summary's work row: one prompt when the transcript fits the window, else one prompt per
        section (consecutive segments), which TextStage summarises and then combines."""
        how = "transcript"
        if self.config.audio.summarize_from_audio:
            how = (f"transcript: the recording is longer than the {self.config.audio.max_summary_audio_s:.0f} s "
                   "limit for summaries from audio")
        built = self.builder.text_pieces(summary_pieces([p for segment in segments for p in segment]))
        if built.input_tokens + self.max_new["summarize"] <= self.window:
            chunks = [WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens)]
        else:
            chunks = self.section_chunks(segments, section_pieces, self.max_new["summarize"])
            self.counters["sectioned_summaries"] += 1
        self.counters["summary_sections"] += len(chunks)
        return work_row(row["id"], "summarize", chunks=chunks, modality="text", summary_sections=len(chunks),
                        summary_from=how, **common)

    def extract_row(self, row: dict, segments: list, common: dict) -> dict:
        """The extraction's work row: one prompt (the schema in its system message, answered under the
        schema's grammar) when the transcript fits the window; else one notes prompt per section, which
        TextStage answers freely, combines while the notes are too long, and then extracts from."""
        instruction = self.config.extract.instruction
        built = self.builder.text_pieces(extract_pieces([p for segment in segments for p in segment], instruction),
                                         self.extract_system)
        if built.input_tokens + self.max_new["extract"] <= self.window:
            chunks = [WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens)]
        else:
            fields = self.fields
            chunks = self.section_chunks(segments, lambda t, k, n: extract_section_pieces(t, k, n, fields),
                                         self.max_new["extract"])
            self.counters["sectioned_extractions"] += 1
        return work_row(row["id"], "extract", chunks=chunks, modality="text", summary_sections=len(chunks),
                        summary_from="transcript", **common)

    def transcript_segments(self, row: dict) -> list[tuple[str, list[int], str]]:
        """The transcript as (speaker label, token ids, line end) per segment, in order: the ids the speech
        pool generated for each chunk (added tokens dropped); a row without them (a transcript from
        elsewhere) has its segments' texts tokenised."""
        texts, speakers, generated = row["chunk_text"] or [], row["chunk_speaker"] or [], row["chunk_output_ids"] or []
        segments = []
        if generated and all(ids is not None for ids, t in zip(generated, texts) if t and t.strip()):
            for text, speaker, ids in zip(texts, speakers, generated):
                if text and text.strip():
                    segments.append((f"[{speaker}] " if speaker else "", self.builder.prompt_ids(ids), "\n"))
            return segments
        for text in [s["text"] for s in row["segments"] or [] if s["text"]] or [row["text"]]:
            segments.append(("", self.builder.token_ids(text), "\n"))
        return segments

    def section_chunks(self, segments: list[tuple[str, list[int], str]], make, max_new: int) -> list[WorkChunk]:
        """One chunk per section of consecutive segments, each prompt `make(pieces, part, parts)` within
        the window with `max_new` tokens to answer."""
        overhead = self.builder.text_pieces(make([], 99, 99)).input_tokens
        budget = self.window - max_new - overhead
        marks = {m: len(self.builder.token_ids(m)) for seg in segments for m in (seg[0], seg[2])}
        sizes = [marks[label] + len(ids) + marks[end] for label, ids, end in segments]

        def cut(segment, n):  # a segment longer than a section on its own: its ids in slices
            label, ids, end = segment
            step = max(1, n - marks[label] - marks[end])
            return [(label, ids[k:k + step], end) for k in range(0, len(ids), step)]

        def pieces(group):
            return [p for segment in group for p in segment]

        sections = split_in_sections(segments, sizes, budget, cut)
        sections = [g for g, _ in fitted(sections, lambda g: self.builder.text_pieces(make(pieces(g), 99, 99)),
                                         self.window - max_new)]
        chunks = []
        for k, section in enumerate(sections, start=1):
            built = self.builder.text_pieces(make(pieces(section), k, len(sections)))
            chunks.append(WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens))
        return chunks
