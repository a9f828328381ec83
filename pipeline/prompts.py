"""The prompts, in one place: the model card's wording for each task, and language names.

The placeholders (<|audio|>, <|image|>) are never written here: the chat template inserts them from the
message parts, so the same code works with the real tokenizer and the tiny one.
"""
from __future__ import annotations

LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "ja": "Japanese", "zh": "Chinese", "ko": "Korean", "ru": "Russian", "ar": "Arabic", "hi": "Hindi",
    "nl": "Dutch", "pl": "Polish", "sv": "Swedish", "da": "Danish", "fi": "Finnish", "no": "Norwegian",
    "tr": "Turkish", "th": "Thai", "vi": "Vietnamese", "id": "Indonesian", "ms": "Malay", "he": "Hebrew",
    "uk": "Ukrainian", "hu": "Hungarian", "cs": "Czech", "ro": "Romanian", "el": "Greek",
}

ASR_PROMPT = "Transcribe the audio clip into text."
TRANSLATE_PROMPT = "Translate the audio to {language}."
OCR_PROMPT = ("Extract all the text from this document page, in reading order. "
              "Use Markdown for headings, lists and tables.")
SUMMARIZE_TRANSCRIPT_PROMPT = ("Summarize the following transcript of a recorded conversation: "
                               "the topics, decisions and action items.\n\n{transcript}")
SUMMARIZE_AUDIO_PROMPT = "Summarize this recording: the topics, decisions and action items."


def language_name(code: str) -> str:
    """ISO 639-1 code -> the English name the model understands. Unknown codes are refused early."""
    try:
        return LANGUAGE_NAMES[code.strip().lower()]
    except KeyError:
        known = ", ".join(sorted(LANGUAGE_NAMES))
        raise ValueError(f"unknown language code {code!r}; known: {known}") from None


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
