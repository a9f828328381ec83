"""The prompt template (`--prompt`, `--prompt-file`, `prompt.template`): text with `{column}` fields that
are filled from each manifest row, and `{{` / `}}` for literal braces. Nothing else.

A template is filled, never evaluated: Python's `str.format` would follow `{id.__class__.__mro__}` into
the interpreter's objects, pad `{topic:>99999999}` to a hundred million characters, and apply `!r`
conversions; so a field with an attribute, an index, a conversion or a format spec is refused when the
config is read, before Ray starts, with a message naming the template and the field.
"""
from __future__ import annotations

import string


class TemplateError(ValueError):
    """A template that is not plain text with `{column}` fields; the message names the field."""


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """[(literal text, column name or None)] in order; TemplateError for anything but `{column}`,
    `{{` and `}}`."""
    shown = template if len(template) <= 80 else template[:60] + f"... ({len(template)} characters)"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise TemplateError(f"the prompt template {shown!r} cannot be read: {exc} (write {{{{ or }}}} for a "
                            "literal brace)") from None
    parts = []
    for literal, field, spec, conversion in parsed:
        if field is None:
            parts.append((literal, None))
            continue
        written = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        why = None
        if not field.strip():
            why = "names no column"
        elif conversion:
            why = f"has a conversion (!{conversion})"
        elif spec:
            why = f"has a format spec (:{spec})"
        elif "." in field or "[" in field:
            why = "has an attribute or an index (. or [)"
        if why:
            raise TemplateError(f"the prompt template {shown!r}: the field {written} {why}; a template only "
                                "fills {column} fields with a row's values ({{ and }} are literal braces)")
        parts.append((literal, field))
    return parts


def template_columns(template: str) -> list[str]:
    """The columns a template names, in order, each once."""
    return list(dict.fromkeys(name for _, name in template_parts(template) if name is not None))
