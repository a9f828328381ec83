"""Read a manifest from wherever it lives, into one validated pyarrow table (on the driver).

A source is one of:
- a manifest file: Parquet (.parquet/.pq/.parq), CSV (.csv), JSON Lines (.jsonl/.ndjson/.json; a .json
  file holding one JSON array also works); CSV and JSON may be compressed (.gz, .bz2, .xz, .zst);
- a folder (local or an s3:// prefix) or a glob whose files are all manifest files: read and
  concatenated (columns unified; Hive `key=value` folder names become string columns);
- a folder, prefix or glob of media files, or a single media file: the listing is the manifest, one row
  per file (see `_listing`). Manifest-format files in a mixed folder are left out of the listing.

Passing `suffixes` or `modified_since` always means "list the files" (they filter a listing), e.g.
`read_manifest("s3://calls/incoming/", suffixes=[".wav"], modified_since=yesterday)`.

Files and folders whose name starts with "." or "_" below the source (`_SUCCESS`, `.crc`, `_runs/`) are
ignored, as Spark, Hive and pyarrow do.

Relative `uri` values in a manifest file are resolved against that file's folder (in the file's own
storage: a relative uri in s3://b/m/manifest.csv means s3://b/m/<uri>), so a manifest shipped next to
its media works from any working directory and on Ray workers, whose cwd is not the driver's.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.io.storage import StorageOptions, find_files, fsspec_filesystem, is_file_entry, protocol_of
from schemas.manifest import KNOWN_FIELDS, PROMPT, ManifestError, validate_manifest

__all__ = ["read_manifest", "manifest_format"]

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".parq": "parquet", ".csv": "csv",
            ".jsonl": "json", ".ndjson": "json", ".json": "json"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Known columns read as strings whatever they look like: CSV inference would turn the id "00123" into the
# integer 123, and CSV/JSON inference turns ids or references that look like dates into timestamps.
_STRING_COLUMNS = [name for name, typ in KNOWN_FIELDS.items() if typ == pa.string()]
_INDEX_COLUMN = re.compile(r"^__index_level_\d+__$")  # pandas' index, stored by DataFrame.to_parquet
_MAX_READERS = 8
# known columns whose values never hold a line break: one there means a quote was left open above it
_SINGLE_LINE_COLUMNS = ("id", "uri", "kind", "language", "target_language")


def read_manifest(source: str, options: StorageOptions | None = None, *, suffixes: list[str] | None = None,
                  modified_since: datetime | None = None, media_lists: tuple[str, ...] = (),
                  require_media: bool = True) -> pa.Table:
    """The manifest at `source`, validated (`schemas.manifest.validate_manifest`).

    Raises ManifestError when the source does not exist, matches nothing, cannot be parsed, or fails
    validation; the message names the source (or the file, column, ids) at fault.

    `media_lists` (the prompt job: schemas/manifest.py PROMPT_MEDIA_COLUMNS): columns of uris made
    list<string> (one uri, a JSON list in a CSV cell, or a list), each resolved like `uri`;
    `require_media`: see validate_manifest.
    """
    fs, path = fsspec_filesystem(source, options)
    protocol = protocol_of(source)
    files, root = _find_files(fs, path, source)
    tabular = [p for p in files if manifest_format(p)]
    if suffixes is None and modified_since is None and tabular and len(tabular) == len(files):
        table = _read_tables(fs, tabular, root, protocol, media_lists)
    else:
        table = _listing(fs, files, root, protocol, source, suffixes, modified_since)
    return validate_manifest(table, require_media=require_media)


def manifest_format(path: str) -> str | None:
    """'parquet', 'csv', 'json' or None (not a manifest file) from the file name."""
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            fmt = _FORMATS.get(posixpath.splitext(name[: -len(ext)])[1])
            return fmt if fmt in ("csv", "json") else None
    return _FORMATS.get(posixpath.splitext(name)[1])


# -- finding the files -------------------------------------------------------------------------------

def _find_files(fs: fsspec.AbstractFileSystem, path: str, source: str) -> tuple[dict[str, dict], str]:
    """({file path: info}, the folder ids and Hive keys are relative to) for a file, folder or glob."""
    try:
        if any(c in path for c in "*?["):
            root = _glob_root(path)
            found = fs.glob(path, detail=True)
            files = {p: i for p, i in found.items() if is_file_entry(p, i) and not _hidden(p, root)}
            if not files:
                raise ManifestError(f"{source}: no files match this pattern")
            return files, root
        if fs.isdir(path):
            root = path.rstrip("/")
            files = {p: i for p, i in find_files(fs, root).items() if not _hidden(p, root)}
            if not files:
                raise ManifestError(f"{source}: folder is empty (no files below it)")
            return files, root
        if fs.isfile(path):
            return {path: fs.info(path)}, posixpath.dirname(path)
    except ManifestError:
        raise
    except FileNotFoundError:
        pass  # e.g. s3fs for a bucket that does not exist: reported below like any missing path
    except PermissionError as exc:
        raise ManifestError(f"{source}: permission denied ({exc})") from exc
    except OSError as exc:
        raise ManifestError(f"{source}: cannot be listed ({type(exc).__name__}: {exc})") from exc
    raise ManifestError(f"{source}: manifest not found (no such file, folder or prefix)")


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: 'b/calls/*/x.wav' -> 'b/calls'."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return "/".join(fixed)


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root) if root else path
    return any(part.startswith((".", "_")) for part in rel.split("/"))


# -- manifest files ----------------------------------------------------------------------------------

def _read_tables(fs: fsspec.AbstractFileSystem, paths: list[str], root: str, protocol: str,
                 media_lists: tuple[str, ...] = ()) -> pa.Table:
    """Read every manifest file (a few at a time: S3 latency, not CPU, is the cost) and concatenate."""
    paths = sorted(paths)
    with ThreadPoolExecutor(max_workers=min(_MAX_READERS, len(paths))) as pool:
        tables = list(pool.map(lambda p: _read_one(fs, p, root, protocol, media_lists), paths))
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"the manifest files under {_display(fs, root, protocol)} disagree on column "
                            f"types ({exc})") from exc


def _read_one(fs: fsspec.AbstractFileSystem, path: str, root: str, protocol: str,
              media_lists: tuple[str, ...] = ()) -> pa.Table:
    fmt = manifest_format(path)
    shown = _display(fs, path, protocol)
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        else:
            with fs.open(path, "rb", compression="infer") as f:
                raw = f.read()
            table = _parse_csv(raw) if fmt == "csv" else _parse_json(raw, shown, media_lists)
            _check_row_count(raw, table, fmt, shown)
    except ManifestError:
        raise
    except FileNotFoundError as exc:
        raise ManifestError(f"{shown}: manifest not found") from exc
    except PermissionError as exc:
        raise ManifestError(f"{shown}: permission denied") from exc
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"{shown}: cannot be read as {fmt} ({type(exc).__name__}: {exc})") from exc
    table = table.drop_columns([c for c in table.column_names if _INDEX_COLUMN.match(c)])
    table = _add_hive_keys(table, path, root, shown)
    table = _resolve_uris(table, posixpath.dirname(path), protocol)
    return _resolve_uri_lists(table, posixpath.dirname(path), protocol, media_lists)


def _parse_csv(raw: bytes) -> pa.Table:
    types = {name: pa.string() for name in _STRING_COLUMNS}
    # quoted fields may hold newlines (multi-line reference texts): without this pyarrow fails as soon
    # as a read block boundary falls inside one, i.e. only on large manifests
    return pacsv.read_csv(io.BytesIO(raw), parse_options=pacsv.ParseOptions(newlines_in_values=True),
                          convert_options=pacsv.ConvertOptions(column_types=types))


def _check_row_count(raw: bytes, table: pa.Table, fmt: str, shown: str) -> None:
    """Refuse a CSV or JSON Lines file whose parse is suspect, naming the line, instead of losing rows.

    pyarrow reads a CSV quote that is never closed as one field running to the end of the file: a
    4-row manifest with a stray quote on row 1 came out as 1 row, and the run "succeeded". So CSV is
    parsed a second time, strictly (Python's csv module: a quoted field must close, and close before a
    delimiter), with every record's first line noted; a record that fails, a line break in a column
    that never holds one (id, uri, kind, language, target_language), or a row count that disagrees with
    pyarrow's refuses the file. JSON Lines: one row per non-blank line.
    """
    if fmt == "json":
        if raw.lstrip()[:1] == b"[":
            return  # one JSON array: json.loads saw every object
        lines = sum(1 for line in raw.splitlines() if line.strip())
        if lines != table.num_rows:
            raise ManifestError(f"{shown}: parsed as {table.num_rows} rows, but the file has {lines} non-blank "
                                "lines (one JSON object per line expected); refused rather than lose rows")
        return
    if fmt != "csv":
        return
    text = raw.decode("utf-8-sig", errors="replace")
    csv.field_size_limit(2**31 - 1)  # long reference texts: the module's default stops at 128 KiB
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    checked: list[tuple[int, str]] = []
    records, start = 0, 1
    try:
        for row in reader:
            if not row:  # a blank line: pyarrow skips those too
                start = reader.line_num + 1
                continue
            if header is None:
                header = row
                checked = [(i, name) for i, name in enumerate(header) if name in _SINGLE_LINE_COLUMNS]
            else:
                records += 1
                for i, name in checked:
                    if i < len(row) and ("\n" in row[i] or "\r" in row[i]):
                        raise ManifestError(
                            f"{shown}: line {start}: column {name!r} holds a line break "
                            f"({row[i][:60]!r}...), so a quote on or above this line is not closed where it "
                            "should be; the manifest is refused, since the rows it swallowed would be lost")
            start = reader.line_num + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            what = f"a quoted field opened on line {start} is never closed"
        elif "expected after" in str(exc):
            what = f"the record starting on line {start} has a quote that does not close its field ({exc})"
        else:
            what = f"the record starting on line {start} cannot be parsed ({exc})"
        raise ManifestError(f"{shown}: line {start}: {what}; every row after it would be lost, so the manifest "
                            "is refused") from exc
    if records != table.num_rows:
        raise ManifestError(f"{shown}: the CSV parser read {table.num_rows} rows, but the file holds {records} "
                            "records; refused rather than lose rows")


def _parse_json(raw: bytes, shown: str = "the manifest", media_lists: tuple[str, ...] = ()) -> pa.Table:
    """JSON Lines, or one JSON array of objects. Known columns whose strings inference turned into
    timestamps (ids or references that look like dates) are read again as strings; JSON numbers are
    cast to strings later, by validate_manifest (an explicit string type would refuse them here).

    A file pyarrow cannot read as one table (a column whose kind of value changes from line to line: the
    prompt job's `images` one uri here and a list there, a `prompt` that is a number in one line and text
    in the next) is read line by line instead, and what still does not fit is refused naming the line,
    the column and the value (`_table_from_objects`)."""
    if raw.lstrip()[:1] == b"[":
        rows = json.loads(raw)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("a .json manifest must be JSON Lines or one array of objects")
        return _table_from_objects(rows, [f"object {k + 1}" for k in range(len(rows))], shown, media_lists)
    try:
        table = pajson.read_json(io.BytesIO(raw))
    except pa.ArrowInvalid:
        rows, where = [], []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ManifestError(f"{shown}: line {n}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{shown}: line {n}: {_json_kind(row)}, not a JSON object")
            rows.append(row)
            where.append(f"line {n}")
        return _table_from_objects(rows, where, shown, media_lists)
    retype = [n for n in _STRING_COLUMNS
              if n in table.column_names and pa.types.is_temporal(table.schema.field(n).type)]
    if retype:
        schema = pa.schema([(n, pa.string()) for n in retype])
        table = pajson.read_json(io.BytesIO(raw), parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="infer"))
    return table


def _table_from_objects(rows: list[dict], where: list[str], shown: str, media_lists: tuple[str, ...]) -> pa.Table:
    """One table from parsed JSON objects (`where`: each one's line, for messages). The columns of
    `media_lists` take one uri or a list of uris (a list may hold a null: that row's error, made by the
    prompt stage, names it); a `prompt` number is its text. A value of another kind than its column's
    refuses the file, naming the line, the column and the value."""
    for row, at in zip(rows, where):
        for name in media_lists:
            value = row.get(name)
            if isinstance(value, str):
                row[name] = [value]
            elif isinstance(value, list):
                for k, item in enumerate(value):
                    if item is not None and not isinstance(item, str):
                        raise ManifestError(f"{shown}: {at}: column {name!r}: item {k + 1} is {_json_kind(item)} "
                                            f"({_shown(item)}), not a uri")
            elif value is not None:
                raise ManifestError(f"{shown}: {at}: column {name!r} holds {_json_kind(value)} ({_shown(value)}); "
                                    "a uri or a list of uris expected")
        if media_lists and isinstance(row.get(PROMPT), (int, float)) and not isinstance(row[PROMPT], bool):
            row[PROMPT] = str(row[PROMPT])
    names = list(dict.fromkeys(k for row in rows for k in row))  # every row's keys, not the first's
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ManifestError(f"{shown}: column {name!r}: {_kind_clash(values, where) or exc}") from None
    return pa.table(columns) if columns else pa.table({})


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def _kind_clash(values: list, where: list[str]) -> str | None:
    """'line 7 holds a list (["a.png"]), line 2 text' for the first value whose kind differs from the
    first non-null value's, or None."""
    first = next((k for k, v in enumerate(values) if v is not None), None)
    if first is None:
        return None
    kind = _json_kind(values[first])
    for k, value in enumerate(values):
        if value is not None and _json_kind(value) != kind:
            return (f"{where[k]} holds {_json_kind(value)} ({_shown(value)}), {where[first]} {kind}; a column holds "
                    "one kind of value")
    return None


def _add_hive_keys(table: pa.Table, path: str, root: str, shown: str) -> pa.Table:
    """`key=value` folders between the root and the file become string columns (when not already there).

    pyarrow's HivePartitioning parses the folder names: percent-decoding of keys and values, and
    `__HIVE_DEFAULT_PARTITION__` as null. Its discovery (`HivePartitioning.discover`) is not used, since
    it infers types (day=07 would become the integer 7) and needs a pyarrow dataset over the files; so
    the keys are picked out here, the first folder of each key that the file does not already have as a
    column, and declared as strings.
    """
    rel = posixpath.relpath(posixpath.dirname(path), root) if root else posixpath.dirname(path)
    folders: dict[str, str] = {}
    for part in rel.split("/"):
        key, sep, _ = part.partition("=")
        key = unquote(key)
        if sep and key and key not in table.column_names:
            folders.setdefault(key, part)
    if not folders:
        return table
    hive = pads.HivePartitioning(pa.schema([(key, pa.string()) for key in folders]),
                                 null_fallback="__HIVE_DEFAULT_PARTITION__", segment_encoding="uri")
    try:
        values = pads.get_partition_keys(hive.parse("/".join(folders.values()) + "/"))
    except pa.ArrowInvalid as exc:  # e.g. a percent-escape that is not UTF-8
        raise ManifestError(f"{shown}: its folder names are not valid Hive key=value pairs ({exc})") from exc
    for key in folders:
        table = table.append_column(key, pa.array([values.get(key)] * table.num_rows, pa.string()))
    return table


def _resolve_uris(table: pa.Table, base_dir: str, protocol: str) -> pa.Table:
    if "uri" not in table.column_names:
        return table
    column = table.column("uri")
    if not pa.types.is_string(column.type):
        try:
            column = column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return table  # validate_manifest names the column and its type
    values = column.to_pylist()
    resolved = [_resolve_uri(v, base_dir, protocol) for v in values]
    if resolved == values and column.type == table.schema.field("uri").type:
        return table
    index = table.column_names.index("uri")
    return table.set_column(index, "uri", pa.array(resolved, pa.string()))


def _resolve_uri_lists(table: pa.Table, base_dir: str, protocol: str, columns: tuple[str, ...]) -> pa.Table:
    """Each of `columns` present as list<string> of resolved uris: a list stays a list, a JSON list in a
    string (a CSV cell) is parsed, any other value is one uri; null and empty stay null."""
    for name in columns:
        if name not in table.column_names:
            continue
        lists = []
        for value in table.column(name).to_pylist():
            if isinstance(value, str) and value.strip().startswith("["):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass  # one odd uri: its fetch names it
            if value is None or value == "" or value == []:
                lists.append(None)
                continue
            items = value if isinstance(value, list) else [value]
            # a null item stays (the prompt stage makes the row's error naming it), never dropped
            lists.append([None if v is None else _resolve_uri(v if isinstance(v, str) else str(v), base_dir, protocol)
                          for v in items])
        index = table.column_names.index(name)
        table = table.set_column(index, name, pa.array(lists, pa.list_(pa.string())))
    return table


def _resolve_uri(value: Any, base_dir: str, protocol: str) -> Any:
    """A relative path against the manifest's folder; absolute paths and uris with a scheme as they are."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text or protocol_of(text) != "file" or text.startswith(("file://", "/", "~")):
        return value
    if protocol == "file":
        return os.path.normpath(os.path.join(base_dir, text))
    return f"{protocol}://{posixpath.normpath(posixpath.join(base_dir, text))}"


# -- media listings ----------------------------------------------------------------------------------

def _listing(fs: fsspec.AbstractFileSystem, files: dict[str, dict], root: str, protocol: str, source: str,
             suffixes: list[str] | None, modified_since: datetime | None) -> pa.Table:
    """One manifest row per media file: `id`, `uri`, `size_bytes`, `modified_at` (UTC).

    `id`: for object stores the object key without the bucket (s3://b/calls/a.wav -> "calls/a.wav"),
    so an object keeps its id whichever prefix is listed and resumed runs match it; for local files the
    path relative to the listed folder (a single file: its name), since absolute local paths differ
    from machine to machine. `uri`: the full uri (local: the absolute path).
    `suffixes`: case-insensitive name endings, with or without the dot ("wav", ".WAV", ".tar.gz").
    `modified_since`: keep files modified at or after it; a naive datetime is taken as UTC.
    Without `suffixes`, manifest-format files (.parquet, .csv, .json...) are left out: they are never
    media, and a folder may hold its own manifest next to the recordings.
    """
    ends = tuple("." + s.lower().lstrip(".") for s in suffixes) if suffixes else None
    since = _as_utc(modified_since) if modified_since is not None else None
    rows = []
    for path, info in files.items():
        if ends is None and manifest_format(path):
            continue
        if ends is not None and not path.lower().endswith(ends):
            continue
        modified = _modified_at(info)
        if since is not None and (modified is None or modified < since):
            continue
        rows.append({"id": _listing_id(path, root, protocol), "uri": _display(fs, path, protocol),
                     "size_bytes": info.get("size"), "modified_at": modified})
    if not rows:
        filters = []
        if suffixes:
            filters.append(f"suffixes {', '.join(suffixes)}")
        if since is not None:
            filters.append(f"modified since {since.isoformat()}")
        raise ManifestError(f"{source}: no media files found" + (f" ({'; '.join(filters)})" if filters else ""))
    rows.sort(key=lambda r: r["id"])
    schema = pa.schema([("id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64()),
                        ("modified_at", pa.timestamp("us", tz="UTC"))])
    return pa.Table.from_pylist(rows, schema=schema)


def _listing_id(path: str, root: str, protocol: str) -> str:
    if protocol == "file":
        return posixpath.relpath(path, root) if root else posixpath.basename(path)
    return path.split("/", 1)[1] if "/" in path else path


def _display(fs: fsspec.AbstractFileSystem, path: str, protocol: str) -> str:
    """The uri a person (and fetch_bytes) would use for a path inside `fs`."""
    if protocol == "file":
        return path
    if protocol in ("s3", "s3a"):
        return f"{protocol}://{path}"
    return fs.unstrip_protocol(path)


def _modified_at(info: dict) -> datetime | None:
    """A file's modification time as an aware UTC datetime, from whichever key the fsspec backend uses."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            return _as_utc(value)
    return None


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
