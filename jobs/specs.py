"""Every job, in one place: its graph (a literal list of stages, with the options it sets on them), the
manifest rules it reads with, and what the driver settles from the manifest before the run.

Adding a job means one `JobSpec` here plus its config fields (schemas/config.py, schemas/tasks.py) and
its command line (jobs/cli.py). Nothing outside those places asks which job is running: a stage that
behaves differently for a job takes an option from the job's spec (e.g. the meetings job's call size).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from actors.model_stage import ModelStage, SpeechStage, VisionStage
from actors.text_stage import TextStage
from pipeline.core.stage import Cluster, Stage, StageResources
from pipeline.stages.assemble import AssembleChunks
from pipeline.stages.chunk_features import BuildChunkFeatures
from pipeline.stages.from_transcripts import PrepareFromTranscripts
from pipeline.stages.prepare_audio import PrepareAudio
from pipeline.stages.prepare_pages import PreparePages
from pipeline.stages.prepare_prompts import PreparePrompts, planned_modalities
from pipeline.stages.regroup_parts import RegroupParts
from pipeline.stages.result_rows import ResultRows
from pipeline.stages.structured_answers import StructuredAnswers
from pipeline.stages.tool_calls import ToolCalls
from schemas.config import JobConfig
from schemas.manifest import PROMPT_MEDIA_COLUMNS
from schemas.tasks import DERIVED_FROM, PROMPT_MODALITIES


@dataclass(frozen=True)
class StageSpec:
    """One step of a job's graph: the stage and the job's options for it (passed to `resources`)."""
    stage: type[Stage]
    options: Mapping[str, Any] = field(default_factory=dict)

    def resources(self, config: JobConfig, cluster: Cluster) -> StageResources:
        return self.stage.resources(config, cluster, **self.options)


@dataclass(frozen=True)
class JobSpec:
    graph: Callable[[JobConfig], list[StageSpec]]
    # read_manifest's options (pipeline/io/manifest.py)
    manifest_rules: Mapping[str, Any] = field(default_factory=dict)
    # what the driver settles from the manifest before Ray starts (a new config; default: unchanged)
    plan: Callable[[JobConfig, pa.Table], JobConfig] = lambda config, manifest: config


def _from_transcripts(config: JobConfig) -> list[StageSpec]:
    """Rows made from whole transcripts (summaries, --extract) by the text pool, then assembled again."""
    if not any(DERIVED_FROM.get(task) == "asr" for task in config.tasks):
        return []
    return [StageSpec(PrepareFromTranscripts), StageSpec(TextStage), StageSpec(AssembleChunks)]


def _audio_graph(config: JobConfig, *, features: Mapping = {}, speech: Mapping = {}) -> list[StageSpec]:
    """Recordings: decoded and cut, long ones' features built by a CPU pool, transcribed (and translated,
    summarised from audio) by the speech pool, parts joined, assembled; then what comes from transcripts."""
    return [StageSpec(PrepareAudio), StageSpec(BuildChunkFeatures, features), StageSpec(SpeechStage, speech),
            StageSpec(RegroupParts), StageSpec(AssembleChunks), *_from_transcripts(config),
            *([StageSpec(StructuredAnswers)] if config.structured_task == "extract" else []),
            StageSpec(ResultRows)]


def transcribe_graph(config: JobConfig) -> list[StageSpec]:
    return _audio_graph(config)


def meetings_graph(config: JobConfig) -> list[StageSpec]:
    # every meeting is long: the features pool starts whole, and a speech call holds fewer rows (each a
    # part of up to `audio.part_chunks` chunks, so a call keeps ~512 chunks in flight)
    return _audio_graph(config, features={"start_whole": True},
                        speech={"rows_per_call": config.batching.meeting_rows_per_call})


def ocr_graph(config: JobConfig) -> list[StageSpec]:
    return [StageSpec(PreparePages), StageSpec(VisionStage), StageSpec(AssembleChunks), StageSpec(ResultRows)]


POOL_FOR_MODALITY: dict[str, type[ModelStage]] = {"speech": SpeechStage, "vision": VisionStage, "text": TextStage}


def prompt_graph(config: JobConfig) -> list[StageSpec]:
    """One GPU pool per mix of media the manifest holds (config.prompt.modalities, planned by the driver),
    each with that mix's adapter merged; rows of the other mixes pass through."""
    planned = config.prompt.modalities or PROMPT_MODALITIES
    pools = [StageSpec(POOL_FOR_MODALITY[m]) for m in PROMPT_MODALITIES if m in planned]
    return [StageSpec(PreparePrompts), *pools, StageSpec(AssembleChunks),
            *([StageSpec(StructuredAnswers)] if config.structured_task else []),
            *([StageSpec(ToolCalls)] if config.prompt.tools else []), StageSpec(ResultRows)]


def plan_prompt_pools(config: JobConfig, manifest: pa.Table) -> JobConfig:
    """Only the pools the manifest's media need (a run of text prompts starts one replica)."""
    return config.model_copy(update={"prompt": config.prompt.model_copy(
        update={"modalities": planned_modalities(manifest)})})


JOBS: dict[str, JobSpec] = {
    "transcribe": JobSpec(transcribe_graph),
    "meetings": JobSpec(meetings_graph),
    "ocr": JobSpec(ocr_graph),
    "prompt": JobSpec(prompt_graph, manifest_rules={"media_lists": PROMPT_MEDIA_COLUMNS, "require_media": False},
                      plan=plan_prompt_pools),
}


def job_spec(config: JobConfig) -> JobSpec:
    return JOBS[config.job]
