"""Where a replica's weights come from: a local folder, an s3:// prefix, or a Hugging Face hub id.

Every actor calls `resolve_model` in `__init__` and loads from the local folder it returns. Several
actors start at once on one node (one per GPU, or two per GPU), so a remote checkpoint is copied once
per node under a file lock, into a temporary folder renamed into place when complete: a crashed or
killed copy never leaves a half-written folder that a later actor would load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid

from filelock import FileLock

from pipeline.storage import StorageOptions, find_files, fsspec_filesystem, is_local
from schemas.config import DEFAULT_MODEL, DEFAULT_REVISION, JobConfig

__all__ = ["resolve_model", "local_model_dir", "DEFAULT_MODEL", "DEFAULT_REVISION", "COMPLETE_MARKER", "default_cache_root"]

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
        local = os.path.abspath(os.path.expanduser(spec[len("file://"):] if spec.startswith("file://") else spec))
        if os.path.isdir(local):
            return local
        if spec.startswith(("/", ".", "~", "file://")) or os.path.exists(local):
            raise FileNotFoundError(f"model {spec!r}: no such local folder")
        return _from_hub(spec, revision, cache_dir, processor_only)
    return _from_remote(spec, cache_dir, options, processor_only)


# -- remote prefixes ---------------------------------------------------------------------------------

def _from_remote(uri: str, cache_dir: str | None, options: StorageOptions | None,
                 processor_only: bool = False) -> str:
    uri = uri.rstrip("/")
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_root()))
    os.makedirs(root, exist_ok=True)
    name = hashlib.sha256(uri.encode()).hexdigest()[:16] + ("-processor" if processor_only else "")
    target = os.path.join(root, name)
    if os.path.exists(os.path.join(target, COMPLETE_MARKER)):
        return target
    with FileLock(os.path.join(root, name + ".lock")):
        if os.path.exists(os.path.join(target, COMPLETE_MARKER)):  # another actor finished meanwhile
            return target
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
    return target


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


def local_model_dir(config: JobConfig, processor_only: bool = False) -> str:
    """A local folder holding the job's checkpoint (hub snapshot, s3:// copy, or the folder given).

    CPU stages ask for `processor_only`: the tokenizer and processor files, not the ~11 GB of weights.
    """
    return resolve_model(config.model.source, revision=config.model.resolved_revision(),
                         cache_dir=config.model.cache_dir, options=StorageOptions(endpoint_url=config.s3_endpoint),
                         processor_only=processor_only)
