"""The manifest contract (stable): what an input table must hold before any GPU starts.

A manifest is checked here once, on the driver, so a bad one fails in seconds with a message that names
the column or the ids, instead of hours later on a GPU node. After `validate_manifest` the rest of the
pipeline may rely on every known column being present with its contract type:

| column            | type   |                                                              |
|-------------------|--------|--------------------------------------------------------------|
| `id`              | string | required, non-empty, unique                                  |
| `uri`             | string | local path, file://, s3://, gs://, https:// ... (or null)    |
| `data`            | binary | the bytes themselves, instead of a uri (or null)             |
| `kind`            | string | audio, image, document, meeting (or null: inferred later)    |
| `language`        | string | source language, ISO 639-1 (or null)                         |
| `target_language` | string | translation target (or null)                                 |
| `reference`       | string | reference text for scoring (or null)                         |

Every other column is passed through, type untouched, to every result row, except `data` (the
payload) and the result schema's own names: a manifest column named like a result column the pipeline
fills itself (`status`, `text`, `task`, `error`, `page`, `model`, ...) is refused, with a message naming
it, rather than dropped or overwritten. Inside the pipeline the pass-through columns travel under their
own prefix (schemas/work_rows.py: PASSTHROUGH_PREFIX), so they can never collide with a work-row column
(`modality`, `chunk_text`, ...) either.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas.languages import LANGUAGE_NAMES
from schemas.results import RESULT_COLUMNS

__all__ = [
    "ID", "URI", "DATA", "KIND", "LANGUAGE", "TARGET_LANGUAGE", "REFERENCE", "KINDS", "KNOWN_FIELDS",
    "KNOWN_COLUMNS", "PASSTHROUGH_EXCLUDE", "RESERVED_COLUMNS", "ManifestError", "validate_manifest",
    "passthrough_columns", "unknown_target_languages", "PROMPT_MEDIA_COLUMNS", "PROMPT",
]

ID = "id"
URI = "uri"
DATA = "data"
KIND = "kind"
LANGUAGE = "language"
TARGET_LANGUAGE = "target_language"
REFERENCE = "reference"

KINDS = ("audio", "image", "document", "meeting")

# the prompt job's further media columns (each optional, any mix per row; a row with none of them and no
# uri/data is a text prompt): `images` a list of uris in prompt order, `audio` one uri or a list, `video`
# one uri. The reader (pipeline/io/manifest.py) makes them lists of uris, relative ones resolved like `uri`.
PROMPT_MEDIA_COLUMNS: tuple[str, ...] = ("images", "audio", "video")
PROMPT = "prompt"  # the prompt job: a row's own prompt text (else the job's --prompt template)

# The known columns in the order a validated manifest has them, with their contract types.
KNOWN_FIELDS: dict[str, pa.DataType] = {
    ID: pa.string(),
    URI: pa.string(),
    DATA: pa.binary(),
    KIND: pa.string(),
    LANGUAGE: pa.string(),
    TARGET_LANGUAGE: pa.string(),
    REFERENCE: pa.string(),
}
KNOWN_COLUMNS: tuple[str, ...] = tuple(KNOWN_FIELDS)

# Manifest columns never copied into result rows:
# - `data`: the binary payload would bloat every result row (one per task and page);
# - the result schema's own names (`id`, `language`, `target_language`, `task`, `text`, `status`, ...):
#   a result row already carries them with the value the run used, so a manifest column of the same
#   name cannot travel "unchanged" next to it.
# `uri`, `kind` and `reference` DO pass through: analysts want the source file next to the text, and
# jobs/scoring.py reads the row's `reference` (or `reference_<task>`) from the results.
PASSTHROUGH_EXCLUDE: frozenset[str] = frozenset({DATA, *RESULT_COLUMNS})

# Result columns the pipeline fills itself: a manifest column of one of these names is refused (it can
# neither travel next to the result's own column nor replace it). The manifest's own known columns that
# are also result columns (`id`, `language`, `target_language`) are the values the run uses.
RESERVED_COLUMNS: tuple[str, ...] = tuple(c for c in RESULT_COLUMNS if c not in KNOWN_FIELDS)

# How many offending ids a message lists before it just counts.
_MAX_LISTED = 10


class ManifestError(ValueError):
    """The manifest cannot be run as given; the message names the column or the ids at fault."""


def passthrough_columns(schema: pa.Schema) -> list[str]:
    """The manifest columns copied unchanged into every result row, in manifest order."""
    return [name for name in schema.names if name not in PASSTHROUGH_EXCLUDE]


def validate_manifest(table: pa.Table, *, require_media: bool = True) -> pa.Table:
    """Refuse a manifest the pipeline cannot run; return it with the contract types.

    Refused (ManifestError): no `id` column; neither `uri` nor `data`; a column named like a result
    column the pipeline fills (RESERVED_COLUMNS: `status`, `text`, `task`, ...); zero rows; null or blank ids;
    rows with neither a uri nor data; duplicate ids; a `kind` outside audio|image|document|meeting;
    a known column that cannot be cast to its type; repeated column names. Row-level problems are
    collected and reported together so one run of the check shows everything to fix.

    Returned: known columns first (in KNOWN_COLUMNS order, missing ones added as typed nulls), then
    the pass-through columns in their original order and types. Blank `uri`, `kind`, `language` and
    `target_language` values (CSV gives "" for an empty cell) become null, and `kind` is lower-cased,
    so "absent" has one spelling downstream.

    `require_media=False` (the prompt job): a row may have no uri and no data (its media are in
    PROMPT_MEDIA_COLUMNS, or it is a text prompt).
    """
    names = table.column_names
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ManifestError(f"manifest has repeated column names: {', '.join(repeated)}")
    if ID not in names:
        raise ManifestError(f"manifest has no 'id' column (columns: {_list(names)})")
    if require_media and URI not in names and DATA not in names:
        raise ManifestError(f"manifest has neither a 'uri' nor a 'data' column (columns: {_list(names)})")
    reserved = [n for n in names if n in RESERVED_COLUMNS]
    if reserved:
        listed = ", ".join(repr(n) for n in reserved)
        raise ManifestError(f"manifest column(s) {listed} have the name of a result column that the pipeline "
                            f"fills itself (reserved: {', '.join(RESERVED_COLUMNS)}); rename them, e.g. "
                            f"{reserved[0]!r} -> 'source_{reserved[0]}'")
    if table.num_rows == 0:
        raise ManifestError("manifest has no rows")

    columns = {name: _cast(table.column(name), name) for name in KNOWN_COLUMNS if name in names}
    for name in (URI, KIND, LANGUAGE, TARGET_LANGUAGE):
        if name in columns:
            columns[name] = _blank_to_null(columns[name])
    if KIND in columns:
        columns[KIND] = pc.utf8_lower(columns[KIND])
    for name, typ in KNOWN_FIELDS.items():
        if name not in columns:
            columns[name] = pa.chunked_array([pa.nulls(table.num_rows, typ)])

    problems = _row_problems(columns, require_media)
    if problems:
        raise ManifestError("manifest refused: " + "; ".join(problems))

    arrays = [columns[name] for name in KNOWN_COLUMNS]
    fields = [pa.field(name, KNOWN_FIELDS[name]) for name in KNOWN_COLUMNS]
    for field in table.schema:
        if field.name not in KNOWN_FIELDS:
            arrays.append(table.column(field.name))
            fields.append(field)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def unknown_target_languages(table: pa.Table) -> dict[str, list[str]]:
    """{code: ids} of the rows of a validated manifest whose own `target_language` is not a language
    code the jobs know (schemas/languages.py).

    Not a reason to refuse the manifest: it is a bad value in one row, and it costs only that row's
    translation (the first CPU stage writes an error row naming the code for it, and the row's other outputs
    are made as usual); the driver reports these rows before Ray starts."""
    codes = table[TARGET_LANGUAGE]
    known = pa.array(sorted(LANGUAGE_NAMES))
    bad = pc.and_(pc.is_valid(codes), pc.invert(pc.is_in(pc.utf8_lower(codes), value_set=known)))
    out: dict[str, list[str]] = {}
    for code, rid in zip(pc.filter(codes, bad).to_pylist(), pc.filter(table[ID], bad).to_pylist()):
        out.setdefault(code, []).append(rid)
    return out


def _row_problems(columns: dict[str, pa.ChunkedArray], require_media: bool = True) -> list[str]:
    """Every row-level reason to refuse, each a phrase naming the column and the ids (or rows)."""
    problems = []
    ids = columns[ID]
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(ids), ""), True)
    if pc.any(blank).as_py():
        rows = pc.indices_nonzero(blank).to_pylist()
        problems.append(f"'id' is null or empty in {len(rows)} row(s) (row numbers from 0: {_list(rows)})")

    missing = pc.and_(pc.is_null(columns[URI]), pc.is_null(columns[DATA]))
    if require_media and pc.any(missing).as_py():
        bad = pc.filter(ids, missing).to_pylist()
        problems.append(f"{len(bad)} row(s) have neither a 'uri' nor 'data': ids {_list(bad)}")

    counts = pc.value_counts(pc.drop_null(ids))
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    if dup:
        problems.append(f"{len(dup)} duplicate id(s) in column 'id': {_list(dup)}")

    kinds = columns[KIND]
    unknown = pc.and_(pc.is_valid(kinds), pc.invert(pc.is_in(kinds, value_set=pa.array(KINDS))))
    if pc.any(unknown).as_py():
        values = pc.unique(pc.filter(kinds, unknown)).to_pylist()
        bad = pc.filter(ids, unknown).to_pylist()
        problems.append(f"column 'kind' has unknown value(s) {_list(values)} (expected one of "
                        f"{', '.join(KINDS)}) in {len(bad)} row(s): ids {_list(bad)}")
    return problems


def _cast(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """The column as its contract type (dictionary, large_string, null, int ids ... are all accepted)."""
    target = KNOWN_FIELDS[name]
    if column.type == target:
        return column
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ManifestError(f"column {name!r} has type {column.type}, which cannot be read as {target} "
                            f"({exc})") from None


def _blank_to_null(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strip surrounding whitespace; an empty string becomes null."""
    stripped = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(stripped, ""), pa.scalar(None, pa.string()), stripped)


def _list(values: list) -> str:
    """At most _MAX_LISTED values, then how many more."""
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")
