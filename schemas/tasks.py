"""What one input yields: the tasks, their groupings, and the output keys of one manifest row.

The one definition every part uses: the config (which partitions a run writes), the CPU stage (which
work rows, and which error rows, an input makes), resume (which inputs are complete), the report and
the command line. A result row's key is (id, task, target_language, page); pages are known only once a
document is opened, so an input's keys here are (task, target_language) pairs.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

Task = Literal["asr", "translate", "ocr", "summarize", "extract", "prompt"]
Modality = Literal["speech", "vision", "text"]

TASKS: tuple[str, ...] = ("asr", "translate", "ocr", "summarize", "extract", "prompt")

# tasks generated from audio chunks: their rows carry time-stamped segments
SPEECH_TASKS: tuple[str, ...] = ("asr", "translate")
# tasks whose input is a recording (the report counts audio hours over them)
AUDIO_TASKS: tuple[str, ...] = ("asr", "translate", "summarize", "extract")

# which GPU pool serves a task (one model replica per modality, with that modality's adapter merged)
MODALITY_FOR_TASK: dict[str, str] = {"asr": "speech", "translate": "speech", "ocr": "vision",
                                     "summarize": "text", "extract": "text"}
# a prompt row's pool is its own mix of media (speech LoRA for audio only, vision LoRA for images with or
# without audio, base weights for text), decided per row (pipeline/stages/prepare_prompts.py: prompt_modality)
PROMPT_MODALITIES: tuple[str, ...] = ("speech", "vision", "text")

# a task made from another task's finished row rather than from the input: the summary of a recording
# comes from its assembled transcript (unless it is summarised from the audio itself), and so do the
# fields `--extract` reads from it
DERIVED_FROM: dict[str, str] = {"summarize": "asr", "extract": "asr"}
# tasks whose answers follow a run's JSON Schema (a `json` column and typed columns): the prompt job's
# answers with --schema, and the `extract` rows of transcribe / meetings --extract
STRUCTURED_TASKS: tuple[str, ...] = ("prompt", "extract")


class OutputKey(NamedTuple):
    """One output row an input yields (for a document: one per page)."""
    task: str
    target_language: str | None = None


def job_tasks(job: str, translate_to: list[str], summarize: bool, extract: bool = False) -> list[str]:
    """The tasks a run writes, each a partition of the output, in graph order."""
    if job == "ocr":
        return ["ocr"]
    if job == "prompt":
        return ["prompt"]
    tasks = ["asr"]
    if translate_to:
        tasks.append("translate")
    if summarize or job == "meetings":
        tasks.append("summarize")
    if extract:
        tasks.append("extract")
    return tasks


def translation_targets(job_targets: list[str], row_target: str | None) -> list[str]:
    """A row's own `target_language` overrides the job's `--translate-to` list."""
    return [row_target] if row_target else list(job_targets)


def output_keys(tasks: list[str], job_targets: list[str], row_target: str | None = None) -> list[OutputKey]:
    """Every (task, target language) one input yields under a run of `tasks`, in task order."""
    keys: list[OutputKey] = []
    for task in tasks:
        if task == "translate":
            keys += [OutputKey(task, t) for t in translation_targets(job_targets, row_target)]
        else:
            keys.append(OutputKey(task))
    return keys
