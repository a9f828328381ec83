"""Language codes the jobs accept (ISO 639-1) and the English names the model's prompts use.

At the bottom of the imports because both the config (`--translate-to` is checked before Ray starts)
and the prompts need it.
"""
from __future__ import annotations

LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "ja": "Japanese", "zh": "Chinese", "ko": "Korean", "ru": "Russian", "ar": "Arabic", "hi": "Hindi",
    "nl": "Dutch", "pl": "Polish", "sv": "Swedish", "da": "Danish", "fi": "Finnish", "no": "Norwegian",
    "tr": "Turkish", "th": "Thai", "vi": "Vietnamese", "id": "Indonesian", "ms": "Malay", "he": "Hebrew",
    "uk": "Ukrainian", "hu": "Hungarian", "cs": "Czech", "ro": "Romanian", "el": "Greek",
}


def language_name(code: str) -> str:
    """ISO 639-1 code -> the English name the model understands. Unknown codes are refused early."""
    try:
        return LANGUAGE_NAMES[code.strip().lower()]
    except KeyError:
        raise ValueError(unknown_language_message(code)) from None


def is_known_language(code: str | None) -> bool:
    return code is not None and code.strip().lower() in LANGUAGE_NAMES


def unknown_language_message(code: str | None) -> str:
    return f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGE_NAMES))}"
