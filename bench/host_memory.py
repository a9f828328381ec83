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


def pss_rollup(pid: int) -> dict[str, int]:
    """Every Pss field of a process's smaps rollup, in bytes ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem",
    ...); raises OSError once the process is gone."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {name: int(rest.split()[0]) * 1024 for name, _, rest in (line.partition(":") for line in f)
                if name.startswith("Pss")}


def _pss_by_pid(pids, field: str = "Pss") -> dict[int, int]:
    """pid -> a field of the smaps rollup (bytes) of each of `pids` still alive: "Pss", or "Pss_Shmem"
    (the part in shared memory: for a Ray worker, the object store's pages it maps)."""
    out = {}
    for pid in pids:
        try:
            out[pid] = pss_rollup(pid)[field]
        except (OSError, KeyError):
            continue
    return out


def _pss_bytes(pids) -> int:
    """The summed PSS of `pids`, in bytes (processes gone meanwhile count nothing)."""
    return sum(_pss_by_pid(pids).values())


def process_name(pid: int) -> str:
    """A short name for a process: a Ray worker's title (ray::VisionStage), else its command."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    name = words[0].decode(errors="replace") if words else "?"
    if not name.startswith("ray::") and len(words) > 1:
        name = " ".join(w.decode(errors="replace") for w in words[:3])
    return name[:60]


def tree_pss_bytes(root_pid: int) -> int:
    """PSS of `root_pid` and all its descendants, in bytes."""
    parents = _parents()
    members = []
    for pid in parents:
        p = pid
        while p and p != root_pid:
            p = parents.get(p, 0)
        if p == root_pid:
            members.append(pid)
    return _pss_bytes(members)


def session_pss_by_pid(sid: int) -> dict[int, int]:
    """pid -> PSS of every process of the session `sid`, in bytes: a command started in a session of its
    own (`start_new_session=True`) keeps everything its local Ray starts in that session, including the
    processes Ray re-parents."""
    return _pss_by_pid(pid for pid, fields in proc_stats() if int(fields[3]) == sid)


def session_pss_bytes(sid: int) -> int:
    return sum(session_pss_by_pid(sid).values())


class PeakMemory:
    """Peak PSS (bytes) over a `with` block, sampled every `every_s` seconds: of this process's tree, or,
    given `session`, of every process of that session (a job run as a command with a Ray of its own)."""

    def __init__(self, every_s: float = 0.5, session: int | None = None):
        self.every_s, self.session = every_s, session

    def sample(self) -> int:
        if not self.session:
            return tree_pss_bytes(os.getpid())
        by_pid = session_pss_by_pid(self.session)
        total = sum(by_pid.values())
        if total > self.peak:  # who held what at the peak, largest first (a session's processes only)
            top = sorted(by_pid.items(), key=lambda kv: -kv[1])[:8]
            shmem = _pss_by_pid(by_pid, "Pss_Shmem")
            self.at_peak = [(process_name(pid), n, shmem.get(pid, 0)) for pid, n in top]
            self.shmem_at_peak = sum(shmem.values())
        return total

    def breakdown(self) -> str:
        """The largest processes at the peak, for a failure message ("ray::VisionStage 2.10 GB (1.20 shared), ...": the part of each
        process's PSS in shared memory, the object store's pages it maps, in brackets)."""
        return (", ".join(f"{name} {n / 1e9:.2f} GB ({shared / 1e9:.2f} shared)" for name, n, shared in self.at_peak)
                + f"; {self.shmem_at_peak / 1e9:.2f} GB of the total in shared memory (the object store)")

    def __enter__(self):
        self.peak, self._stop, self.at_peak, self.shmem_at_peak = 0, threading.Event(), [], 0
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.sample())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
