"""Where a replica's weights come from: a local folder, an s3:// prefix, or a Hugging Face hub id.

Every actor calls `resolve_model` in `__init__` and loads from the local folder it returns. Several
actors start at once on one node (one per GPU, or two per GPU), so a remote checkpoint is copied once
per node under a file lock, into a temporary folder renamed into place when complete: a crashed or
killed copy never leaves a half-written folder that a later actor would load.

A checkpoint in the hub's main-branch layout (the one the model card loads with trust_remote_code) is
converted to the native layout once per node, into the same cache and under the same lock-staging-marker
scheme (pipeline/model/checkpoint_layout.py does the conversion, without running the checkpoint's code). The
driver calls `describe_model` first: it refuses a checkpoint the pipeline cannot use, before Ray
starts, and says what was loaded (layout and a fingerprint of the weights) for the run record and rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import hashlib
import json
import logging
import os
import shutil
import uuid

from urllib.parse import quote

from filelock import FileLock

from pipeline.model.checkpoint_layout import (FINGERPRINT_METHOD, CheckpointError, convert_checkpoint,
                                        inspect_checkpoint, is_remote_code_config)
from pipeline.io.storage import StorageOptions, find_files, fsspec_filesystem, is_local
from schemas.config import DEFAULT_MODEL, DEFAULT_REVISION, JobConfig

__all__ = ["resolve_model", "ModelRef", "describe_model", "DEFAULT_MODEL", "DEFAULT_REVISION",
           "COMPLETE_MARKER", "default_cache_root", "CheckpointError"]

log = logging.getLogger(__name__)

# Written inside a copied checkpoint as its last file; the folder is used only when it is there.
COMPLETE_MARKER = ".phi4mm-complete.json"


def default_cache_root() -> str:
    """~/.cache/phi4mm/models: node-local disk, shared by the node's actors (PHI4MM_CACHE, read by the
    entry point, jobs/settings.py, puts it elsewhere through ModelConfig.cache_dir)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "phi4mm", "models")


# Weight files: what a CPU node that only needs the processor (tokenizer, chat template, feature and image
# processor settings) does not download.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")


def resolve_model(spec: str, *, revision: str | None = None, cache_dir: str | None = None,
                  options: StorageOptions | None = None, processor_only: bool = False) -> str:
    """A local folder holding the checkpoint named by `spec`.

    - an existing local folder (or file:// uri): returned as is (absolute);
    - a remote prefix (s3://, or any other fsspec protocol such as gs://): copied once per node to
      `cache_dir`/<hash of the uri> (default root: `default_cache_root()`); later calls, from any process
      on the node, return the copy without touching the network. A prefix whose content changes is not
      re-copied: publish a new checkpoint under a new prefix (or delete the cached folder);
    - anything else: a Hugging Face hub id, through `snapshot_download` (its own cache, or `cache_dir`),
      at `revision` (default: DEFAULT_REVISION for DEFAULT_MODEL, the hub's default branch otherwise).
      HF_HUB_OFFLINE=1 is honoured at call time (the hub library reads it only at import).

    `processor_only`: only the top-level files that are not weights (tokenizer, processor and model
    configs, chat template), for CPU stages and the driver: ~10 MB instead of ~11 GB per node.
    """
    spec = spec.strip()
    if is_local(spec):
        local = _local_path(spec)
        if os.path.isdir(local):
            return _as_native(local, f"local:{local}:{_listing_key(local)}", cache_dir, processor_only)
        if _looks_local(spec, local):
            raise FileNotFoundError(f"model {spec!r}: no such local folder")
        snapshot = _from_hub(spec, revision, cache_dir, processor_only)
        return _as_native(snapshot, f"hub:{spec}@{os.path.basename(os.path.normpath(snapshot))}", cache_dir,
                          processor_only)
    return _from_remote(spec, cache_dir, options, processor_only)


def _local_path(spec: str) -> str:
    return os.path.abspath(os.path.expanduser(spec[len("file://"):] if spec.startswith("file://") else spec))


def _looks_local(spec: str, local: str) -> bool:
    """A path, not a hub id: starts like one, or names something that exists."""
    return spec.startswith(("/", ".", "~", "file://")) or os.path.exists(local)


def _listing_key(folder: str) -> str:
    """Names, sizes and times of a local folder's top-level files: a changed checkpoint converts anew."""
    entries = []
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        entries.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def _cache_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _root(cache_dir: str | None) -> str:
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_root()))
    os.makedirs(root, exist_ok=True)
    return root


# -- main-branch checkpoints: converted once per node ------------------------------------------------

def _is_remote_code(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False  # not a checkpoint we can tell: loaded as is (describe_model refuses it on the driver)
    return isinstance(config, dict) and is_remote_code_config(config)


def _native_name(key: str, processor_only: bool) -> str:
    return _cache_name(key) + "-native" + ("-processor" if processor_only else "")


def _as_native(folder: str, key: str, cache_dir: str | None, processor_only: bool,
               discard_source: bool = False) -> str:
    """`folder` itself when it is not in the main-branch layout; else its native conversion, made once
    per node in the cache (`key` names the source: the same source converts to the same folder)."""
    if not _is_remote_code(folder):
        return folder
    root = _root(cache_dir)
    name = _native_name(key, processor_only)
    target = os.path.join(root, name)
    if not os.path.exists(os.path.join(target, COMPLETE_MARKER)):
        with FileLock(os.path.join(root, name + ".lock")):
            if not os.path.exists(os.path.join(target, COMPLETE_MARKER)):
                _remove_leftovers(root, name)
                staging = os.path.join(root, f"{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                try:
                    log.info("converting the main-branch checkpoint %s to the native layout in %s", folder, target)
                    summary = convert_checkpoint(folder, staging, weights=not processor_only)
                    with open(os.path.join(staging, COMPLETE_MARKER), "w") as f:
                        json.dump({"converted_from": key, "layout": "remote-code", **summary}, f, indent=1)
                    if os.path.exists(target):
                        shutil.rmtree(target)
                    os.rename(staging, target)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    if discard_source and os.path.abspath(folder) != os.path.abspath(target):
        shutil.rmtree(folder, ignore_errors=True)  # the raw copy of an s3:// checkpoint: not needed again
    return target


# -- remote prefixes ---------------------------------------------------------------------------------

def _from_remote(uri: str, cache_dir: str | None, options: StorageOptions | None,
                 processor_only: bool = False) -> str:
    uri = uri.rstrip("/")
    root = _root(cache_dir)
    name = _cache_name(uri) + ("-processor" if processor_only else "")
    target = os.path.join(root, name)
    # a main-branch checkpoint's copy is converted and then removed: its conversion is what is kept
    converted = os.path.join(root, _native_name(f"remote:{uri}", processor_only))
    if os.path.exists(os.path.join(converted, COMPLETE_MARKER)):
        return converted
    if os.path.exists(os.path.join(target, COMPLETE_MARKER)):
        return _as_native(target, f"remote:{uri}", cache_dir, processor_only, discard_source=True)
    with FileLock(os.path.join(root, name + ".lock")):
        if os.path.exists(os.path.join(converted, COMPLETE_MARKER)):  # converted meanwhile
            return converted
        if os.path.exists(os.path.join(target, COMPLETE_MARKER)):  # another actor finished meanwhile
            return _as_native(target, f"remote:{uri}", cache_dir, processor_only, discard_source=True)
        _remove_leftovers(root, name)
        staging = os.path.join(root, f"{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            files = _download(uri, staging, options, processor_only)
            with open(os.path.join(staging, COMPLETE_MARKER), "w") as f:
                json.dump({"uri": uri, "files": files}, f, indent=1)
            if os.path.exists(target):  # an unmarked folder: not ours to trust
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return _as_native(target, f"remote:{uri}", cache_dir, processor_only, discard_source=True)


def _remove_leftovers(root: str, name: str) -> None:
    """Staging folders of copies that died (we hold the lock, so none is in progress)."""
    for entry in os.listdir(root):
        if entry.startswith(name + ".tmp-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _download(uri: str, dest: str, options: StorageOptions | None, processor_only: bool = False
              ) -> dict[str, int]:
    """Copy every object under `uri` into `dest`, keeping the relative layout; {relative path: size}."""
    fs, prefix = fsspec_filesystem(uri, options)
    found = find_files(fs, prefix)
    if processor_only:
        found = {p: info for p, info in found.items()
                 if "/" not in os.path.relpath(p, prefix) and not p.endswith(WEIGHT_SUFFIXES)}
    if not found:
        raise FileNotFoundError(f"model {uri!r}: no objects under this prefix")
    files = {}
    remote, local = [], []
    for path in sorted(found):
        rel = os.path.relpath(path, prefix) if path != prefix else os.path.basename(path)
        files[rel] = int(found[path].get("size") or 0)
        remote.append(path)
        local.append(os.path.join(dest, *rel.split("/")))
    for path in local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    log.info("copying %d files (%.2f GB) from %s to %s", len(files), sum(files.values()) / 1e9, uri, dest)
    fs.get(remote, local)  # list-to-list: s3fs downloads several objects concurrently
    for rel, size in files.items():
        got = os.path.getsize(os.path.join(dest, *rel.split("/")))
        if got != size:
            raise OSError(f"model {uri!r}: {rel} copied {got} bytes, expected {size}")
    return files


# -- the hub -------------------------------------------------------------------------------------------

def _from_hub(repo_id: str, revision: str | None, cache_dir: str | None, processor_only: bool = False) -> str:
    from huggingface_hub import snapshot_download

    if revision is None and repo_id == DEFAULT_MODEL:
        revision = DEFAULT_REVISION
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    ignore = [f"*{suffix}" for suffix in WEIGHT_SUFFIXES] + ["*/*"] if processor_only else None
    return snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                             ignore_patterns=ignore)


@dataclass(frozen=True)
class ModelRef:
    """The job's checkpoint as the driver found it: where it is (`source`, `revision` with the default
    model's native-format revision filled in, `cache_dir`) and what it is (`provenance`: describe_model's
    layout and weights_sha, written into every row; None in unit tests)."""
    source: str
    revision: str | None = None
    cache_dir: str | None = None
    provenance: dict | None = None

    @classmethod
    def of(cls, config: JobConfig, provenance: dict | None = None) -> "ModelRef":
        return cls(config.model.source, config.model.resolved_revision(), config.model.cache_dir, provenance)

    def local_dir(self, options: StorageOptions, processor_only: bool = False) -> str:
        """A local folder holding the checkpoint (hub snapshot, s3:// copy made once per node, or the
        folder given), read with the run's storage options (its timeouts included). CPU stages ask for
        `processor_only`: the tokenizer and processor files, not the ~11 GB of weights."""
        return resolve_model(self.source, revision=self.revision, cache_dir=self.cache_dir, options=options,
                             processor_only=processor_only)


# -- what the driver checks and records ---------------------------------------------------------------

HUB_TOKEN_HINT = ("set HF_TOKEN (or run `hf auth login`) with a token that has accepted the model's terms, or "
                  "mirror the checkpoint to a local folder or s3:// prefix and pass that to --model")
OFFLINE_HINT = ("HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache: download it once on a machine "
                "with hub access (`hf download {repo} --revision {revision}`, into the same HF_HOME), or pass "
                "a local folder or s3:// copy to --model")


def describe_model(spec: str, *, revision: str | None = None, cache_dir: str | None = None,
                   options: StorageOptions | None = None, need_weights: bool = True) -> dict:
    """What `spec` names, checked where it lies (local disk, the object store, the hub or its local cache)
    before anything is copied: {"source", "revision", "layout", "weights_sha", "weights_bytes",
    "fingerprint"}. Raises CheckpointError (a ValueError: the CLI prints it as one line) for a checkpoint
    the pipeline cannot use, FileNotFoundError for a local path that does not exist. `need_weights=False`
    (benchmarks on random weights): the config alone is checked, and there is no weights_sha."""
    spec = spec.strip()
    resolved_revision = None
    if is_local(spec):
        local = _local_path(spec)
        if os.path.isdir(local):
            fs, root, label = fsspec_filesystem(local)[0], local, local
        elif _looks_local(spec, local):
            raise FileNotFoundError(f"model {spec!r}: no such local folder")
        else:
            if revision is None and spec == DEFAULT_MODEL:
                revision = DEFAULT_REVISION
            fs, root, resolved_revision = _hub_checkpoint(spec, revision, cache_dir)
            label = f"{spec}@{revision or 'main'}"
    else:
        fs, root = fsspec_filesystem(spec.rstrip("/"), options)
        label = spec.rstrip("/")
    try:
        info = inspect_checkpoint(fs, root, label, need_weights=need_weights)
    except PermissionError as exc:
        raise CheckpointError(f"model {label}: access denied ({exc}); run the job with credentials that may "
                              f"read it") from exc
    return {"source": spec, "revision": resolved_revision or revision, "layout": info.layout,
            "weights_sha": info.weights_sha, "weights_bytes": info.weights_bytes, "fingerprint": FINGERPRINT_METHOD}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_checkpoint(repo_id: str, revision: str | None, cache_dir: str | None):
    """(filesystem, root, commit) of a hub checkpoint: its local cache snapshot offline, the hub itself
    online (headers read with range requests: nothing is downloaded)."""
    import httpx
    from huggingface_hub import HfApi, HfFileSystem, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    label = f"{repo_id}@{revision or 'main'}"
    if _hub_offline():
        try:
            folder = snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
            raise CheckpointError(f"model {label}: {OFFLINE_HINT.format(repo=repo_id, revision=revision or 'main')}"
                                  ) from exc
        return fsspec_filesystem(folder)[0], folder, os.path.basename(os.path.normpath(folder))
    try:
        commit = HfApi().model_info(repo_id, revision=revision).sha
    except GatedRepoError as exc:
        raise CheckpointError(f"model {label}: the hub says this model is gated and the job has no token that "
                              f"may read it; {HUB_TOKEN_HINT}") from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"model {label}: no revision {revision!r} on the hub (the native layout is "
                              f"revision {DEFAULT_REVISION}; the main branch is converted)") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"model {label}: no such model on the hub, or a private one the job's token may "
                              f"not read; check the id, or {HUB_TOKEN_HINT}") from exc
    except (OfflineModeIsEnabled, ConnectionError, TimeoutError, httpx.TransportError) as exc:
        raise CheckpointError(f"model {label}: the hub cannot be reached ({type(exc).__name__}); set "
                              f"HF_HUB_OFFLINE=1 to use the local cache, or pass a local folder or s3:// copy "
                              f"to --model") from exc
    return HfFileSystem(), f"{repo_id}@{quote(commit or revision or 'main', safe='')}", commit


# -- converting ahead: `phi4mm convert-checkpoint SRC DST` ----------------------------------------------

def convert_to_native(src: str, dst: str, *, revision: str | None = None, options: StorageOptions | None = None,
                      cache_dir: str | None = None) -> dict:
    """Convert the main-branch checkpoint at `src` (local folder, s3:// prefix or hub id) into the native
    layout at `dst` (local folder or s3:// prefix, absent or empty). Returns what describe_model says of
    the source, with the conversion's summary."""
    import tempfile

    info = describe_model(src, revision=revision, cache_dir=cache_dir, options=options)
    if info["layout"] != "remote-code":
        raise CheckpointError(f"{src} is already in the native layout: nothing to convert; pass it to --model as it is")
    local_dst = is_local(dst)
    if local_dst:
        dst = _local_path(dst)
        if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
            raise CheckpointError(f"{dst} exists and is not empty: give a new folder to convert into")
    else:
        fs_dst, prefix = fsspec_filesystem(dst.rstrip("/"), options)
        if find_files(fs_dst, prefix):
            raise CheckpointError(f"{dst} already holds objects: give a new prefix to convert into")
    work = tempfile.mkdtemp(prefix="phi4mm-convert-",
                            dir=os.path.dirname(dst.rstrip("/")) if local_dst else None)
    try:
        spec = src.strip()
        if is_local(spec) and os.path.isdir(_local_path(spec)):
            folder = _local_path(spec)
        elif is_local(spec):
            rev = revision if revision is not None or spec != DEFAULT_MODEL else DEFAULT_REVISION
            folder = _from_hub(spec, rev, cache_dir)
        else:
            folder = os.path.join(work, "source")
            _download(spec.rstrip("/"), folder, options)
        out = os.path.join(work, "native")
        summary = convert_checkpoint(folder, out)
        if local_dst:
            if os.path.isdir(dst):
                os.rmdir(dst)
            os.rename(out, dst)
        else:
            files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
            remote = [f"{prefix}/{os.path.relpath(f, out).replace(os.sep, '/')}" for f in files]
            fs_dst.put(files, remote)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**info, "converted_to": dst, **summary}
