"""The rows made from whole transcripts (summaries, --extract): their token limits, their wording, whether
a summary comes from the audio instead, and how a transcript too long for one prompt is cut into
sections. Shared by the CPU stage that makes those rows (pipeline/stages/from_transcripts.py) and the
text pool that combines the sections' answers (actors/text_stage.py), so both cut alike.
"""
from __future__ import annotations

from pipeline.model.prompts import prompt_system_message, schema_fields
from schemas.config import JobConfig

# the tasks made from whole transcripts, in the order their rows are made
TRANSCRIPT_TASKS = ("summarize", "extract")


def answer_limits(config: JobConfig) -> dict[str, int]:
    """New tokens per answer of each transcript task (a section's notes and summaries included)."""
    limits = config.generation.max_new_tokens
    return {task: limits.get(task, 512) for task in TRANSCRIPT_TASKS}


def extract_wording(config: JobConfig) -> tuple[str | None, str]:
    """(--extract's system message, with the schema; the schema's field names for the notes prompts),
    or (None, "") without --extract."""
    schema = config.extract.json_schema
    if schema is None:
        return None, ""
    return prompt_system_message(config.system_prompt, schema), schema_fields(schema)


def summary_from_audio(config: JobConfig, duration: float | None) -> bool:
    """Whether this recording's summary comes from its audio (else from its transcript)."""
    return ("summarize" in config.tasks and config.audio.summarize_from_audio and duration is not None
            and duration <= config.audio.max_summary_audio_s)


def split_in_sections(texts: list, tokens: list[int], budget: int, cut) -> list[list]:
    """Consecutive texts (or any items) grouped so that each group's tokens stay within `budget`; a text
    longer than the budget on its own is cut (`cut(text, budget)`) and its pieces stand alone. Order is
    kept."""
    if budget < 1:
        raise ValueError(f"the summary window leaves {budget} tokens for the transcript: raise it")
    sections: list[list[str]] = []
    current: list[str] = []
    used = 0
    for text, n in zip(texts, tokens):
        if n > budget:
            if current:
                sections.append(current)
                current, used = [], 0
            sections += [[piece] for piece in cut(text, budget)]
            continue
        if current and used + n > budget:
            sections.append(current)
            current, used = [], 0
        current.append(text)
        used += n
    if current:
        sections.append(current)
    return sections


def fitted(groups: list[list], build, limit: int) -> list[tuple[list, object]]:
    """Each group with its built prompt (`build(group)`), halving any group whose prompt is over `limit`
    tokens (token estimates are only estimates: the prompt as built is what counts). A single text whose
    prompt is still over the limit raises ValueError."""
    out = []
    for group in groups:
        built = build(group)
        if built.input_tokens <= limit:
            out.append((group, built))
        elif len(group) > 1:
            half = len(group) // 2
            out += fitted([group[:half], group[half:]], build, limit)
        else:
            raise ValueError(f"a prompt of {built.input_tokens} tokens does not fit the summary window "
                             f"({limit} tokens besides the summary): raise --summary-window")
    return out

