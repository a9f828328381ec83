"""Progress a person can follow on a long job: one `phi4mm: progress` line every ~15 s, and a last one.

Read from the run's state actor (pipeline/core/run_state.py), so it costs the workers nothing: inputs
prepared and finished out of the manifest's rows, rows written and how many are errors, hours of
audio or pages done, the rate, and an estimate of the time left. The lines go to stderr, so they show
on a terminal and in `ray job logs` alike; Ray Data's own progress bars are added on a terminal only.
"""
from __future__ import annotations

import sys
import threading
import time


def progress_line(counters: dict, total_inputs: int, elapsed_s: float) -> str:
    # manifest rows taken in by the stage that prepares them, whichever it is (PrepareAudio, PreparePages, PreparePrompts):
    # each counts them as `inputs_prepared` (pipeline/stages/manifest_stage.py)
    prepared = sum(stage.get("inputs_prepared", 0) for stage in counters.values())
    written = counters.get("ResultRows", {})
    done = written.get("inputs_done", 0)
    rows, errors = written.get("rows_out", 0), written.get("error_rows", 0)
    parts = [f"{_clock(elapsed_s)}: inputs {prepared}/{total_inputs} prepared, {done}/{total_inputs} done",
             f"{rows} rows written ({errors} errors)"]
    audio_s = written.get("audio_s_done", 0.0)
    if audio_s:
        parts.append(f"{audio_s / 3600:.2f} h of audio ({audio_s / max(elapsed_s, 1e-9):.0f}x real time)")
    pages = written.get("pages_done", 0)
    if pages:
        parts.append(f"{pages} pages ({pages / max(elapsed_s, 1e-9):.2f}/s)")
    if 0 < done < total_inputs:
        parts.append(f"about {_clock(elapsed_s * (total_inputs - done) / done)} left")
    return "phi4mm: progress " + ", ".join(parts)


class ProgressReporter:
    """A daemon thread printing `progress_line` every `every_s` seconds until `stop()` (which prints
    the last line)."""

    def __init__(self, run_state, total_inputs: int, every_s: float, stream=None):
        self.actor, self.total, self.every_s = run_state, total_inputs, every_s
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phi4mm-progress", daemon=True)

    def start(self) -> "ProgressReporter":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.report()

    def report(self) -> None:
        import ray

        try:
            counters = ray.get(self.actor.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort; the job goes on without it
            return
        print(progress_line(counters, self.total, time.monotonic() - self.started), file=self.stream, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.report()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
