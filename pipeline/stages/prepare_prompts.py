"""CPU stage of the prompt job: manifest rows -> one prompt work row each, over any mix of media.

A row's media: `uri`/`data` (one item, its kind inferred as in the other jobs: audio, an image, or a
document whose pages become images), `images` (uris, in prompt order), `audio` (uris), `video` (frames
sampled by pipeline/media/video.py). Its prompt: the row's `prompt` value, else the job's template with
`{column}` filled from the row. Which pool serves the row is its mix, as the model's reference
implementation switches adapters (shared/design/NOTES-phi4mm.md, Adapters): the speech LoRA for audio
only, the vision LoRA for images with or without audio, the base weights for text only.

A bad value costs the row, never the batch: a missing template column, an unreadable medium, a null
in a list of media, too many images, a prompt longer than the model's context become one error row
naming the input and the cause.
"""
from __future__ import annotations

import json
import logging
import math
import os

import pyarrow as pa

from pipeline.core.errors import InputError
from pipeline.media.audio import SAMPLE_RATE, decode_audio
from pipeline.media.kind import sniff_kind
from pipeline.media.pages import decode_pages
from pipeline.stages.manifest_stage import MANIFEST_READS, ManifestStage
from pipeline.model.prompts import prompt_system_message
from pipeline.media.video import sample_frames
from schemas.manifest import PROMPT, PROMPT_MEDIA_COLUMNS, passthrough_columns
from schemas.templates import template_parts
from schemas.work_rows import WorkChunk, encode_item, work_row, work_table

log = logging.getLogger(__name__)


def prompt_text(row: dict, template: str | None) -> str | None:
    """The row's own prompt (its `prompt` value; a number is its text), else the template filled from the
    row (schemas/templates.py: only `{column}` fields); InputError naming a placeholder that the row has no
    column for (or whose value is null), or a `prompt` value that is not text."""
    own = row.get(PROMPT)
    if isinstance(own, float) and math.isnan(own):  # a missing value in a numeric Parquet column
        own = None
    if isinstance(own, (int, float)) and not isinstance(own, bool):
        return str(own)
    if own is not None and not isinstance(own, str):
        raise InputError(f"id {row['id']}: its `prompt` value is {_kind_of(own)} ({_shown(own)}), not text")
    if own is not None and own.strip():
        return own
    if not template:
        return None
    filled = []
    for literal, name in template_parts(template):
        filled.append(literal)
        if name is None:
            continue
        if name not in row:
            raise InputError(f"id {row['id']}: the prompt template names {{{name}}}, but the manifest has no "
                             f"column {name!r}")
        value = row[name]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise InputError(f"id {row['id']}: the prompt template names {{{name}}}, but this row's "
                             f"{name!r} is empty")
        filled.append(field_text(row["id"], name, value))
    return "".join(filled)


def field_text(row_id: str, name: str, value: object) -> str:
    """A column's value as the text a template puts in its field: text as it is, a number or a boolean
    as written, a list or a map as JSON; bytes are refused (InputError) rather than shown as b'...'."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise InputError(f"id {row_id}: the prompt template names {{{name}}}, but this row's {name!r} holds bytes, "
                         "not text")
    if isinstance(value, (bool, int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _kind_of(value: object) -> str:
    return {list: "a list", dict: "a map", bool: "a boolean", bytes: "bytes"}.get(type(value),
                                                                              f"a {type(value).__name__}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def context_tokens(model_dir: str) -> int:
    """The model's longest sequence (`max_position_embeddings` of its config; 131072 when not said)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value or 131072)


def prompt_modality(images: int, audios: int) -> str:
    """The pool (and adapter) of a prompt: vision for any image, speech for audio only, else text."""
    return "vision" if images else "speech" if audios else "text"


def planned_modalities(manifest: pa.Table) -> list[str]:
    """The pools a manifest's prompt rows need, told from their columns on the driver (a uri's kind from
    its `kind` or its extension; an unknown one may be either medium): a run of text prompts starts no
    speech or vision replica."""
    cols = [c for c in ("uri", "data", "kind", *PROMPT_MEDIA_COLUMNS) if c in manifest.column_names]
    needed: set[str] = set()
    for row in manifest.select(cols).to_pylist():
        kind = None
        if row.get("uri") or row.get("data") is not None:
            kind = row.get("kind") or sniff_kind(row.get("data") or b"", row.get("uri"))
        images = bool(row.get("images") or row.get("video")) or kind in ("image", "document")
        audios = bool(row.get("audio")) or kind in ("audio", "meeting")
        if kind == "unknown" and not images:
            needed |= {"speech", "vision"}
        else:
            needed.add(prompt_modality(images, audios))
    return [m for m in ("speech", "vision", "text") if m in needed]


class PreparePrompts(ManifestStage):
    """Manifest rows -> prompt work rows (task `prompt`, page 1), one per row, with the model inputs of
    its media and prompt built (pipeline/model/inputs.py: InputBuilder.prompt_item), or an error row."""

    reads = MANIFEST_READS + PROMPT_MEDIA_COLUMNS + (PROMPT,)  # and the template's columns

    def __init__(self, context):
        super().__init__(context)
        self.builder.system_prompt = prompt_system_message(self.config.system_prompt,
                                                           self.config.prompt.json_schema, self.config.prompt.tools)
        # the model's context, and the most characters a prompt of that many tokens can have (no token is
        # longer than the vocabulary's longest entry), so that a longer one is refused before it is
        # tokenised: a 100-million-character prompt would otherwise hold this worker for minutes
        self.context_len = context_tokens(self.processor_dir)
        longest = max((len(t) for t in self.builder.processor.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = self.context_len * max(longest, 1)
        # (the GPU stages' default for a task the config's limits leave out: actors/model_stage.py)
        self.max_new = self.config.generation.max_new_tokens.get("prompt", 256)

    def process(self, batch: pa.Table) -> pa.Table:
        out_rows: list[dict] = []
        rows = batch.to_pylist()
        fetches = [self.start_media(row) for row in rows]  # every medium of every row, side by side
        for row, pending in zip(rows, fetches):
            out_rows.extend(self.rows_or_errors(row, lambda: [self.prompt_row(row, pending)]))
        keep = passthrough_columns(batch.schema)
        return work_table(out_rows, batch.select(keep) if keep else None)

    def start_media(self, row: dict) -> dict[str, list]:
        """{column: [(uri, pending fetch)]} for every uri the row names; `uri` only when it has no data."""
        out: dict[str, list] = {}
        if row.get("uri") and row.get("data") is None:
            out["uri"] = [(row["uri"], self.fetch(row["uri"]))]
        for name in PROMPT_MEDIA_COLUMNS:
            uris = row.get(name) or []
            out[name] = [(u, self.fetch(u) if u is not None else None) for u in uris]  # null: prompt_row says so
        return out

    def prompt_row(self, row: dict, pending: dict[str, list]) -> dict:
        cfg, image_cfg = self.config.prompt, self.config.image
        for name in PROMPT_MEDIA_COLUMNS:
            uris = [u for u, _ in pending.get(name, [])]
            if None in uris:
                raise InputError(f"id {row['id']}: item {uris.index(None) + 1} of the {len(uris)} in its `{name}` "
                                 "list is null, not a uri")
        instruction = prompt_text(row, cfg.template)
        if instruction is not None and len(instruction) > self.max_prompt_chars:
            raise InputError(f"id {row['id']}: the prompt is {len(instruction)} characters, more than the model's "
                             f"context of {self.context_len} tokens can hold")
        images, audios = [], []
        if row.get("data") is not None or pending.get("uri"):
            data = row["data"] if row.get("data") is not None else pending["uri"][0][1].result()
            name = self.name(row)
            kind = row.get("kind") or sniff_kind(data, row.get("uri"))
            if kind in ("audio", "meeting"):
                audios.append(decode_audio(data, name, max_s=cfg.max_audio_s))
            elif kind in ("image", "document"):
                images += decode_pages(data, name, max_pixels=image_cfg.max_pixels, pdf_dpi=image_cfg.pdf_dpi,
                                       max_pages=cfg.max_images + 1)
            else:
                raise InputError(f"{name}: is not a recognised audio, image or document format (a video goes in "
                                 "the `video` column)")
        for uri, fetch in pending.get("images", []):
            images += decode_pages(fetch.result(), uri, max_pixels=image_cfg.max_pixels, pdf_dpi=image_cfg.pdf_dpi,
                                   max_pages=cfg.max_images + 1)
        for uri, fetch in pending.get("video", []):
            images += sample_frames(fetch.result(), uri, fps=cfg.fps, max_frames=cfg.max_frames,
                                    max_side=cfg.frame_max_side, max_pixels=image_cfg.max_pixels)
        for uri, fetch in pending.get("audio", []):
            audios.append(decode_audio(fetch.result(), uri, max_s=cfg.max_audio_s))
        if len(images) > cfg.max_images:
            raise InputError(f"id {row['id']}: the prompt has more than {cfg.max_images} images "
                             "(prompt.max_images)")
        if not instruction and not audios:
            raise InputError(f"id {row['id']}: no prompt: the row has no `prompt` value and the job no "
                             "--prompt, and no audio to ask the question")
        modality = prompt_modality(len(images), len(audios))
        if cfg.modalities is not None and modality not in cfg.modalities:
            raise InputError(f"id {row['id']}: its media make a {modality} prompt, but the driver planned no "
                             f"{modality} pool from the manifest (set the row's `kind` to what the file is)")
        built = self.builder.prompt_item(images, audios, instruction)
        if built.input_tokens + self.max_new > self.context_len:
            raise InputError(f"id {row['id']}: the prompt is {built.input_tokens} tokens; with {self.max_new} new "
                             f"tokens (generation.max_new_tokens) it passes the model's context of {self.context_len} "
                             "tokens")
        duration = sum(len(a) for a in audios) / SAMPLE_RATE if audios else None
        chunk = WorkChunk(built.batch_key, encode_item(built.inputs), built.input_tokens)
        self.counters.update(prompts=1, prompt_images=len(images), prompt_audios=len(audios))
        return work_row(row["id"], "prompt", chunks=[chunk], language=row.get("language"), duration_s=duration,
                        modality=modality)
