"""Summaries of whole recordings: from the assembled transcript (text pool), or from the audio itself."""
from __future__ import annotations

import pyarrow as pa

from pipeline.model_inputs import InputBuilder
from pipeline.model_source import local_model_dir
from pipeline.prompts import task_instruction
from pipeline.stage import Cluster, Stage, StageContext, StageResources, one_thread_per_worker
from schemas.config import JobConfig
from schemas.work_rows import WORK_COLUMNS, WorkChunk, carried_columns, encode_item, work_row, work_table


def summary_from_audio(config: JobConfig, duration: float | None) -> bool:
    """Whether this recording's summary comes from its audio (else from its transcript)."""
    return ("summarize" in config.tasks and config.audio.summarize_from_audio and duration is not None
            and duration <= config.audio.max_summary_audio_s)


class PrepareSummaries(Stage):
    """For every assembled `asr` row, add a `summarize` work row built from its transcript (adds rows).

    A transcript that failed gives a summary row that fails with the same reason, so the summary
    partition has a row for every input too.
    """

    reads = ("id", "task", "text", "error", "duration_s", "language")
    writes = tuple(WORK_COLUMNS)  # the new rows

    def __init__(self, context: StageContext):
        super().__init__(context)
        one_thread_per_worker()
        self.builder = InputBuilder(local_model_dir(self.config, processor_only=True), self.config.system_prompt)

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
            if not row["error"] and summary_from_audio(self.config, row["duration_s"]):
                continue  # summarised from the audio by the speech pool already
            common = {"language": row["language"], "duration_s": row["duration_s"]}
            if row["error"]:
                made.append(work_row(row["id"], "summarize", **common,
                                     error=f"no summary: the transcript failed ({row['error']})"))
            elif not row["text"]:
                made.append(work_row(row["id"], "summarize", **common,
                                     error=f"{row['id']}: no summary: the transcript is empty"))
            else:
                built = self.builder.text(task_instruction("summarize", transcript=row["text"]))
                chunk = WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens)
                made.append(work_row(row["id"], "summarize", chunks=[chunk], modality="text", **common))
            picks.append(i)
        self.counters["summaries"] += len(made)
        if not picks:
            return batch
        extra = carried_columns(batch)
        summaries = work_table(made, batch.select(extra).take(picks) if extra else None, carried=True)
        return pa.concat_tables([batch, summaries.select(batch.column_names)])
