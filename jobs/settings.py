"""The process environment, read once, at the entry point: every variable the jobs honour is here.

Nothing below `jobs/` reads the environment for its own settings (storage credentials and endpoints
are the S3 libraries' own business, and `pipeline/io/storage.py` fills an unset endpoint on the driver so
the value travels to the workers). A job's settings that vary per run belong in `JobConfig`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    ray_address: str | None  # RAY_ADDRESS: join this cluster (else start a local one-machine Ray)
    log_level: str  # PHI4MM_LOG: the driver's logging level (default INFO)
    worker_logs: bool  # PHI4MM_WORKER_LOGS=1: stream the workers' logs to the console
    progress: bool  # progress lines on stderr (PHI4MM_QUIET=1 or --quiet: off), bars on a terminal
    progress_every_s: float  # PHI4MM_PROGRESS_EVERY_S: seconds between progress lines (default 15)
    model_cache: str | None  # PHI4MM_CACHE: node-local root for copies of s3:// checkpoints (+ /models)

    @property
    def autoscaling(self) -> bool:
        """Joined a cluster that may add GPU nodes: pools ask for what the config allows."""
        return bool(self.ray_address)


def from_environment() -> Settings:
    cache = os.environ.get("PHI4MM_CACHE") or None
    return Settings(ray_address=os.environ.get("RAY_ADDRESS") or None,
                    log_level=os.environ.get("PHI4MM_LOG", "INFO"),
                    worker_logs=_flag("PHI4MM_WORKER_LOGS"), progress=not _flag("PHI4MM_QUIET"),
                    progress_every_s=float(os.environ.get("PHI4MM_PROGRESS_EVERY_S") or 15),
                    model_cache=os.path.join(cache, "models") if cache else None)
