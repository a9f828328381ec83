"""Filesystems for every uri the pipeline reads or writes: local paths, file://, s3:// and fsspec's others.

One `StorageOptions` object says how to reach object storage (endpoint, region, profile, retries). It is
a small frozen pydantic model, so it pickles and travels to Ray tasks and actors unchanged: build it once
on the driver, where the environment (AWS_ENDPOINT_URL_S3, ...) is known, and ship it.

Two views of the same storage:
- `fsspec_filesystem` (s3fs for S3): listing, globbing, whole-object reads (`pipeline.io.fetch`), copies.
- `pyarrow_filesystem`: what pyarrow and Ray Data take as `filesystem=` for Parquet reads and writes.
  For S3 it is pyarrow's native C++ client (`pyarrow.fs.S3FileSystem`): it reads and writes Parquet
  without the GIL and in parallel, and it is the client Ray Data itself uses for s3:// paths. It works
  against moto (and MinIO) through `endpoint_override` + `scheme`, which is why the endpoint must be
  passed explicitly: that client ignores boto's configuration and moto's in-process mocks. It cannot be
  given a named profile, so with `profile` set the s3fs filesystem is wrapped for pyarrow instead
  (`PyFileSystem(FSSpecHandler(...))`: correct, slower).

Retries: S3 requests are retried inside the client (botocore / the AWS C++ SDK, "standard" mode:
SlowDown, 503, 500, throttling, connection errors, exponential backoff with jitter) `retries` times.
s3fs's own retry loop is set to a single try so the layers do not multiply; `pipeline.io.fetch` adds an
outer loop around whole-object reads for what escapes the client (broken bodies, timeouts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["StorageOptions", "Location", "locate", "fsspec_filesystem", "pyarrow_filesystem", "protocol_of",
           "is_local", "local_path", "find_files", "is_file_entry", "remove_directory_markers", "ENDPOINT_ENV_VARS"]

# Read, in this order, when `endpoint_url` is not given (the AWS SDKs' own names for the setting).
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

_S3_PROTOCOLS = ("s3", "s3a")


class StorageOptions(BaseModel):
    """How to reach object storage. Frozen and picklable: it travels to Ray workers as is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 "
                                     "(MinIO, moto); None: AWS (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    region: str | None = Field(None, description="None: the SDK's default chain (AWS_DEFAULT_REGION, config file)")
    profile: str | None = Field(None, description="a named profile from ~/.aws; None: the default credential chain")
    anon: bool = Field(False, description="unsigned requests (public buckets)")
    retries: int = Field(4, ge=0, le=20, description="retries of one S3 request inside the client")
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to open a connection to the object store")
    read_timeout_s: float = Field(60.0, gt=0, description="seconds a read may wait for the next bytes")

    @model_validator(mode="before")
    @classmethod
    def _endpoint_from_env(cls, data: Any) -> Any:
        """Fill a missing endpoint from the environment *now*, on the process that builds the options,
        so the value travels with the object to workers whose environment may lack it."""
        if isinstance(data, dict) and not data.get("endpoint_url"):
            env = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
            data = {**data, "endpoint_url": env}
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_has_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
            raise ValueError(f"endpoint_url {value!r} must look like http://HOST:PORT or https://HOST")
        return value

    def s3fs_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `s3fs.S3FileSystem` (also usable as fsspec `storage_options`)."""
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        kwargs: dict[str, Any] = {
            "anon": self.anon,
            "client_kwargs": client_kwargs,
            "config_kwargs": {
                "retries": {"mode": "standard", "total_max_attempts": self.retries + 1},
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": self.read_timeout_s,
            },
            # New objects arrive while a long-lived worker runs: never answer a listing from memory.
            "use_listings_cache": False,
        }
        if self.profile:
            kwargs["profile"] = self.profile
        return kwargs


def protocol_of(uri: str) -> str:
    """'s3', 'gs', 'https', ... or 'file' for plain paths and file:// uris."""
    scheme, sep, _ = uri.partition("://")
    if not sep or not scheme or "/" in scheme:
        return "file"
    return scheme.lower()


def is_local(uri: str) -> bool:
    return protocol_of(uri) == "file"


def local_path(uri: str) -> str:
    """Absolute local path of a plain path or a file:// uri: Ray workers do not share the driver's cwd.

    A file:// uri is a URL, so its path is percent-decoded (file:///calls/my%20call.wav names
    "/calls/my call.wav", RFC 8089) and an empty or "localhost" host is dropped; a plain path is taken
    literally ("50%20off.wav" is that file name).
    """
    if uri[:7].lower() == "file://":
        rest = uri[7:]
        if rest[:10].lower() == "localhost/":
            rest = rest[9:]
        uri = unquote(rest)
    return os.path.abspath(os.path.expanduser(uri))



def fsspec_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `uri`. S3 paths come back as "bucket/key", local ones absolute.

    s3fs instances are cached by fsspec per argument set, so calling this per row is cheap.
    """
    options = options or StorageOptions()
    protocol = protocol_of(uri)
    if protocol == "file":
        return LocalFileSystem(), local_path(uri)
    if protocol in _S3_PROTOCOLS:
        import s3fs

        fs = s3fs.S3FileSystem(**options.s3fs_kwargs())
        fs.retries = 1  # s3fs's own retry loop (a class attribute): one try, botocore retries instead
        return fs, uri.split("://", 1)[1]
    if protocol in ("http", "https"):
        # aiohttp waits forever by default for a server that accepts and never answers
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, connect=options.connect_timeout_s,
                                        sock_connect=options.connect_timeout_s, sock_read=options.read_timeout_s)
        return fsspec.filesystem(protocol, client_kwargs={"timeout": timeout}), uri
    fs, path = fsspec.core.url_to_fs(uri)  # gs://, memory://, ...: fsspec's own, with its defaults
    return fs, path


def is_file_entry(path: str, info: dict) -> bool:
    """A real file, not an S3 "directory marker": the zero-byte `prefix/` objects that the S3 console's
    "Create folder", pyarrow's S3 client and Ray writes leave behind, which s3fs reports as files."""
    return info.get("type") == "file" and not path.endswith("/")


def find_files(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """{path: info} of every file below `path` (recursive), directory markers left out."""
    return {p: i for p, i in fs.find(path, detail=True).items() if is_file_entry(p, i)}


@dataclass(frozen=True)
class Location:
    """A folder uri resolved once (datatrove's `DataFolder`, both views): the pyarrow filesystem and path
    that Parquet reads and writes and Ray Data take, and the fsspec filesystem and path for listings,
    small files and S3 markers, both made from the same `options`. Built on the driver by `locate`;
    every later use of the output goes through it instead of resolving the uri again (an S3 region
    lookup each time)."""
    uri: str
    options: StorageOptions
    fs: pafs.FileSystem
    path: str
    fsspec_fs: fsspec.AbstractFileSystem
    fsspec_path: str


def locate(uri: str, options: StorageOptions | None = None) -> Location:
    options = options or StorageOptions()
    fs, path = pyarrow_filesystem(uri, options)
    fsspec_fs, fsspec_path = fsspec_filesystem(uri, options)
    return Location(uri, options, fs, path, fsspec_fs, fsspec_path)


def remove_directory_markers(location: Location) -> list[str]:
    """Delete the zero-byte "directory" objects (`out/`, `out/task=asr/`) under an S3 prefix; returns
    their keys. No-op elsewhere.

    pyarrow's S3 client leaves them behind (`create_dir`, and `delete_file` re-creates a folder that
    its last file left), and readers that list through s3fs (pandas, pyarrow's dataset over s3fs,
    Polars) then take `out/task=asr/` for a file and fail with FileNotFoundError. S3 has no folders:
    the objects below a prefix are all a reader needs.
    """
    if protocol_of(location.uri) not in _S3_PROTOCOLS:
        return []
    fs, path = location.fsspec_fs, location.fsspec_path.rstrip("/")
    bucket, _, prefix = path.partition("/")
    try:
        entries = fs.find(path, detail=True, withdirs=True)
    except FileNotFoundError:
        return []
    # the prefix's own marker is not always listed below it
    entries = {**entries, **({f"{path}/": {"size": 0}} if prefix else {})}
    removed = []
    for name, info in entries.items():
        if not name.endswith("/") or info.get("size") not in (0, None):
            continue
        key = name.split("/", 1)[1]
        if not key:
            continue
        try:
            fs.call_s3("head_object", Bucket=bucket, Key=key)
        except (FileNotFoundError, OSError):
            continue  # no such object: a prefix, not a marker
        fs.call_s3("delete_object", Bucket=bucket, Key=key)
        removed.append(key)
    return removed


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for pyarrow / Ray Data `filesystem=` arguments."""
    options = options or StorageOptions()
    protocol = protocol_of(uri)
    if protocol == "file":
        return pafs.LocalFileSystem(), local_path(uri)
    if protocol in _S3_PROTOCOLS and not options.profile:
        path = uri.split("://", 1)[1]
        return _native_s3(options, bucket=path.split("/", 1)[0]), path
    fs, path = fsspec_filesystem(uri, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _native_s3(options: StorageOptions, bucket: str) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "anonymous": options.anon,
        "connect_timeout": options.connect_timeout_s,
        "request_timeout": options.read_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.retries + 1),
    }
    region = options.region
    if options.endpoint_url:
        parts = urlsplit(options.endpoint_url)
        kwargs["endpoint_override"] = parts.netloc + parts.path
        kwargs["scheme"] = parts.scheme
    elif region is None and bucket:
        # AWS answers a request sent to the wrong region with a redirect the C++ client does not
        # follow (s3fs/botocore do); ask the bucket where it lives (one HEAD request).
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, ValueError):
            region = None  # let the SDK's default chain decide; the real error surfaces on use
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)
