"""The job's console is for people: library lines a user cannot act on are kept out of it.

What a run prints is `phi4mm:` lines (the manifest count, progress, one line per failed input) and the
closing JSON. Libraries add their own: Ray's startup and Ray Data's execution-plan lines (INFO), Ray's
token-authentication notice, Ray Data's "progress bars disabled" (we turn the bars off on purpose where
no terminal shows them) and its issue detector's advice on per-worker memory requests, transformers' warning about the checkpoint's LongRoPE config fields (the
shipped config of Phi-4-multimodal-instruct; nothing a user can change), rouge-score's absl line, and
one C++ line from Ray's core worker for every actor pool ("has constructor arguments in the object store
and max_restarts > 0": Ray Data passes its own object refs to every map actor, ray-project/ray#57733,
open; not about anything this project passes). With `PHI4MM_LOG=DEBUG` everything is shown again.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager

# Python loggers that only narrate (INFO): shown from DEBUG on
NARRATING_LOGGERS = ("ray", "ray.data", "ray._private", "absl")
# one-off warnings a user cannot act on, by logger and message
IGNORED_WARNINGS = (
    ("ray", re.compile(r"Token authentication is enabled")),
    ("ray.data", re.compile(r"Progress bars disabled")),
    # Ray Data's issue detector: "Operator ... uses 538MiB of memory per worker ... Ray only requests 0.0B"
    ("ray.data", re.compile(r"of memory per worker|Found \d+ issues")),
    ("transformers", re.compile(r"rope_parameters\['original_max_position_embeddings'\]")),
)
# lines written straight to the process's stderr by native code (no Python logger to tune)
IGNORED_NATIVE_LINES = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments "
                                   rb"in the object store and max_restarts > 0"),)


class _DropKnownWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(prefix) and pattern.search(message)
                       for prefix, pattern in IGNORED_WARNINGS)


_FILTER = _DropKnownWarnings()


def quiet_libraries(log_level: str) -> None:
    """Library loggers at WARNING (unless the job's level is DEBUG) and the known noise filtered out.

    Filters go on the handlers too: a logger's filter does not see records of its child loggers."""
    if str(log_level).upper() == "DEBUG":
        return
    for name in NARRATING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in {prefix for prefix, _ in IGNORED_WARNINGS}:
        logger = logging.getLogger(name)
        logger.addFilter(_FILTER)
        for handler in logger.handlers:
            handler.addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FILTER)
    # transformers logs through its own handler on its library logger; the driver does not load it (it
    # would cost 0.9 GB and 4.6 s to import), so this is only for a process that has
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")  # makes the library's handler exist
        for handler in logging.getLogger("transformers").handlers:
            handler.addFilter(_FILTER)


@contextmanager
def native_lines_filtered(enabled: bool = True):
    """While inside: lines on file descriptor 2 that match IGNORED_NATIVE_LINES are dropped, every other
    byte is passed on unchanged, in order.

    Native code (Ray's C++ core worker in this process) writes to the descriptor, not to `sys.stderr`,
    so only a pipe in its place can keep its known-noise line out. Python's own writes to stderr take
    the same pipe, so order is kept. Skipped when stderr has no descriptor (pytest's capture)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        enabled = False
    if not enabled or fd != 2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved), name="phi4mm-stderr", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees end of file
        pump.join(timeout=5)
        os.close(saved)


def _pump(read_end: int, out: int) -> None:
    pending = b""
    try:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = [line + b"\n" for line in lines if not any(p.search(line) for p in IGNORED_NATIVE_LINES)]
                if kept:
                    os.write(out, b"".join(kept))
        if pending:
            os.write(out, pending)
    except OSError:  # the console itself went away (a closed terminal): nothing left to show it on
        pass
