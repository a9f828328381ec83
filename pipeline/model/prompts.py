"""The prompts, in one place: the model card's wording for each task, and language names.

The placeholders (<|audio|>, <|image|>) are never written here: the chat template inserts them from the
message parts, so the same code works with the real tokenizer and the tiny one.
"""
from __future__ import annotations

from schemas.languages import language_name

ASR_PROMPT = "Transcribe the audio clip into text."
TRANSLATE_PROMPT = "Translate the audio to {language}."
OCR_PROMPT = ("Extract all the text from this document page, in reading order. "
              "Use Markdown for headings, lists and tables.")
SUMMARIZE_TRANSCRIPT_PROMPT = ("Summarize the following transcript of a recorded conversation: "
                               "the topics, decisions and action items.\n\n{transcript}")
SUMMARIZE_AUDIO_PROMPT = "Summarize this recording: the topics, decisions and action items."
# a transcript too long for one summary window: its sections, then their summaries, are summarised
SUMMARIZE_SECTION_PROMPT = ("Summarize part {part} of {parts} of the transcript of a recorded conversation: "
                            "the topics, decisions and action items.\n\n{transcript}")
COMBINE_SUMMARIES_PROMPT = ("These are summaries of consecutive parts of one recorded conversation. Combine "
                            "them into one summary of the whole conversation: the topics, decisions and "
                            "action items.\n\n{summaries}")

# --extract (transcribe, meetings): the schema's fields from a whole transcript; the schema itself goes in
# the system message (SCHEMA_INSTRUCTION), and the answer is constrained to it
EXTRACT_TRANSCRIPT_PROMPT = ("Fill in the fields of the JSON Schema from what was said in this recorded "
                             "conversation.")
# a transcript too long for one window: notes on the fields from each section, then the fields from the notes
EXTRACT_SECTION_PROMPT = ("Part {part} of {parts} of the transcript of a recorded conversation follows. Write "
                          "down, briefly, everything in it that bears on these fields: {fields}.\n\n{transcript}")
COMBINE_NOTES_PROMPT = ("These are notes on consecutive parts of one recorded conversation, about these "
                        "fields: {fields}. Combine them into one set of notes on the whole conversation.\n\n{summaries}")
EXTRACT_FROM_NOTES_PROMPT = ("{instruction}\n\nThe conversation was too long to read at once; these are notes on "
                             "its consecutive parts.\n\n{summaries}")


# Summary prompts as pieces (pipeline/model/inputs.py: InputBuilder.text_pieces): the wording's text around
# the transcript or the summaries, which go in as the token ids the model generated
Pieces = list  # of str | list[int]


def _around(template: str, hole: str, **fields) -> tuple[str, str]:
    before, after = template.split("{" + hole + "}")
    return before.format(**fields), after.format(**fields)


def summary_pieces(transcript: Pieces) -> Pieces:
    before, after = _around(SUMMARIZE_TRANSCRIPT_PROMPT, "transcript")
    return [before, *transcript, after]


def section_pieces(transcript: Pieces, part: int, parts: int) -> Pieces:
    before, after = _around(SUMMARIZE_SECTION_PROMPT, "transcript", part=part, parts=parts)
    return [before, *transcript, after]


def combine_pieces(summaries: list[list[int]]) -> Pieces:
    """The combining prompt: "Part 1: <ids>\\n\\nPart 2: <ids>..." inside COMBINE_SUMMARIES_PROMPT."""
    return _numbered(*_around(COMBINE_SUMMARIES_PROMPT, "summaries"), summaries)



def extract_pieces(transcript: Pieces, instruction: str | None = None) -> Pieces:
    """The direct extraction prompt: the instruction, then the transcript."""
    return [(instruction or EXTRACT_TRANSCRIPT_PROMPT) + "\n\nThe transcript:\n\n", *transcript]


def extract_section_pieces(transcript: Pieces, part: int, parts: int, fields: str) -> Pieces:
    before, after = _around(EXTRACT_SECTION_PROMPT, "transcript", part=part, parts=parts, fields=fields)
    return [before, *transcript, after]


def _numbered(before: str, after: str, texts: list[list[int]]) -> Pieces:
    pieces: Pieces = [before]
    for k, ids in enumerate(texts, start=1):
        pieces += [("\n\n" if k > 1 else "") + f"Part {k}: ", ids]
    return pieces + [after]


def combine_notes_pieces(notes: list[list[int]], fields: str) -> Pieces:
    return _numbered(*_around(COMBINE_NOTES_PROMPT, "summaries", fields=fields), notes)


def extract_from_notes_pieces(notes: list[list[int]], instruction: str | None = None) -> Pieces:
    return _numbered(*_around(EXTRACT_FROM_NOTES_PROMPT, "summaries",
                              instruction=instruction or EXTRACT_TRANSCRIPT_PROMPT), notes)


def schema_fields(json_schema: dict) -> str:
    """The schema's top-level property names, for the notes prompts ("reason, resolved, mood")."""
    return ", ".join(json_schema.get("properties") or {}) or "the fields of the schema"

def task_instruction(task: str, target_language: str | None = None, transcript: str | None = None,
                     from_audio: bool = False) -> str:
    if task == "asr":
        return ASR_PROMPT
    if task == "translate":
        return TRANSLATE_PROMPT.format(language=language_name(target_language or ""))
    if task == "ocr":
        return OCR_PROMPT
    if task == "summarize":
        return SUMMARIZE_AUDIO_PROMPT if from_audio else SUMMARIZE_TRANSCRIPT_PROMPT.format(transcript=transcript)
    raise ValueError(f"unknown task {task!r}")


def chat_messages(instruction: str, media: str | None, system_prompt: str | None = None) -> list[dict]:
    """Messages for the chat template: the media part first, then the instruction (as the card does)."""
    parts: list[dict] = []
    if media is not None:
        parts.append({"type": media})
    parts.append({"type": "text", "text": instruction})
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": parts}]


def prompt_messages(images: int, audios: int, instruction: str | None, system_prompt: str | None = None) -> list[dict]:
    """Messages for a prompt over any mix of media, the card's way: the images first (<|image_1|>, ...),
    then the audios, then the text. No text with audio is the card's spoken query: the audio asks."""
    parts: list[dict] = [{"type": "image"}] * images + [{"type": "audio"}] * audios
    if instruction:
        parts.append({"type": "text", "text": instruction})
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": parts}]


TOOL_SYSTEM = "You are a helpful assistant with some tools."  # the card's tool-calling system message
SCHEMA_INSTRUCTION = "Answer with one JSON object, and nothing else, that follows this JSON Schema:\n{schema}"


def prompt_system_message(system_prompt: str | None, json_schema: dict | None = None,
                          tools: list[dict] | None = None) -> str | None:
    """The prompt job's system message: the job's --system (with --tools: the card's tool sentence and
    `<|tool|>[...]<|/tool|>` block after it), then what the answer must look like."""
    import json

    parts = [system_prompt] if system_prompt else []
    if tools:
        block = f"<|tool|>{json.dumps(tools, ensure_ascii=False)}<|/tool|>"
        parts = [(parts[0] if parts else TOOL_SYSTEM) + block]
    if json_schema is not None:
        parts.append(SCHEMA_INSTRUCTION.format(schema=json.dumps(json_schema, ensure_ascii=False)))
    return "\n\n".join(parts) or None
