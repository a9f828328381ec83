"""Host memory of a whole job: the proportional set size (PSS) of a process and all its descendants
(a local Ray's gcs, raylet, object store and every worker), sampled while a `with` block runs.

PSS splits shared pages (the object store's, a model's mapped weights) among the processes that map
them, so the object store is counted once, not once per worker that touched it (as RSS would).
"""
from __future__ import annotations

import os
import threading


def proc_stats():
    """(pid, the fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ...) of
    every process still readable."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        yield int(entry), stat[stat.rfind(")") + 2:].split()


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process still readable."""
    return {pid: int(fields[1]) for pid, fields in proc_stats()}


def tree_pss_bytes(root_pid: int) -> int:
    """PSS of `root_pid` and all its descendants, in bytes."""
    parents = _parents()
    total = 0
    for pid in parents:
        p = pid
        while p and p != root_pid:
            p = parents.get(p, 0)
        if p != root_pid:
            continue
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


class PeakMemory:
    """Peak PSS (bytes) of this process's tree over a `with` block, sampled every `every_s` seconds."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, tree_pss_bytes(os.getpid()))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
