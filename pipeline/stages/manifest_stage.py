"""The first CPU stage of every job, in common: manifest rows in, each input's fetch started, and the error
rows of a bad input or a bad value made the same way whatever the job.

Runs in Ray actors on CPU nodes, before the GPU actors, so a GPU never waits on decoding, resampling,
VAD, feature extraction, image cropping or tokenisation. Its subclasses, one per kind of input, say
what an input becomes: PrepareAudio (transcribe, meetings), PreparePages (ocr), PreparePrompts (prompt).
The progress line counts the inputs this stage has taken (`inputs_prepared`).
"""
from __future__ import annotations

import logging
import math

import pyarrow as pa

from pipeline.context import RunContext
from pipeline.core.errors import InputError
from pipeline.core.stage import Cluster, Stage, StageResources, one_thread_per_worker
from pipeline.io.fetch import PendingFetch, start_fetch
from pipeline.model.inputs import InputBuilder
from schemas.config import JobConfig
from schemas.languages import is_known_language, unknown_language_message
from schemas.tasks import DERIVED_FROM, output_keys
from schemas.work_rows import WORK_COLUMNS, work_row

log = logging.getLogger(__name__)

# manifest columns a work row is made from (the others are passed through)
MANIFEST_READS = ("id", "uri", "data", "kind", "language", "target_language")


class ManifestStage(Stage):
    """Manifest rows -> work rows: one per output key (task x target language x page) of each input, or
    one error row per key when the input is bad. The decoding pool: it takes the CPUs the other actors
    leave (jobs/graph.py plans them)."""

    reads = MANIFEST_READS
    writes = tuple(WORK_COLUMNS)
    cpu_share = "rest"

    def __init__(self, context: RunContext):
        super().__init__(context)
        one_thread_per_worker()
        self.storage = context.storage  # the run's options: every fetch has the `inputs` timeouts
        self.processor_dir = context.model_dir(processor_only=True)
        self.builder = InputBuilder(self.processor_dir, self.config.system_prompt,
                                    self.config.image.dynamic_hd, audio_bucket_s=self.config.audio.batch_bucket_s)
        # what was measured of the current input before it failed (its decoded duration): error rows keep it
        self.measured: dict = {}

    def __call__(self, batch: pa.Table):
        # the progress line's "inputs prepared" (jobs/progress.py): every stage that turns manifest rows into
        # work rows counts them so, whatever its name
        self.counters["inputs_prepared"] += batch.num_rows
        return super().__call__(batch)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        """A fixed pool of the CPUs the other actors leave (an autoscaling pool would start with one
        worker and ramp up while the GPUs wait), at most one worker per two inputs; small batches, so
        that decoding spreads over every worker from the start.

        A small machine gets at least one worker per two of its CPUs: the reservation (a CPU for each
        model actor, the light single actors, one for the driver) would leave a 2-core machine (4
        logical CPUs in the local Ray, jobs/runner.py) one worker while those others mostly wait on it.
        The workers then share what is left of the logical CPUs (a fraction each), so every other actor
        keeps its reservation and still schedules; each worker runs one thread."""
        per_task = config.resources.cpus_per_prepare_task
        room = cluster.cpus - cluster.reserved_cpus
        workers = max(int(room // per_task), int(cluster.cpus // 2), 1)
        workers = max(1, min(workers, math.ceil(cluster.input_rows / 2)))
        num_cpus = per_task if workers * per_task <= room else max(room, 0.05 * workers) / workers
        return StageResources(batch_size=rows_per_block(cluster.input_rows, workers), pool_size=(workers, workers),
                              num_cpus=num_cpus)

    def rows_or_errors(self, row: dict, make) -> list[dict]:
        """`make()`'s work rows, or the row's error rows when it fails: a bad input is its own message,
        anything else is logged and named; a row never takes the job down."""
        try:
            return make()
        except InputError as exc:
            self.counters["bad_inputs"] += 1
            return self.error_rows(row, str(exc))
        except Exception as exc:  # noqa: BLE001 - a row never takes the job down
            log.exception("preparing %s failed", row.get("id"))
            self.counters["bad_inputs"] += 1
            return self.error_rows(row, f"{self.name(row)}: could not be prepared ({type(exc).__name__}: {exc})")

    @staticmethod
    def name(row: dict) -> str:
        return row.get("uri") or f"id {row['id']}"

    def all_keys(self, row: dict) -> list:
        """The output keys this stage answers for (schemas/tasks.py); those derived from another task's
        result (the summary, from the transcript) are made after assembly."""
        return [k for k in output_keys(self.config.tasks, self.config.translate_to, row.get("target_language"))
                if k.task not in DERIVED_FROM]

    @staticmethod
    def key_problem(key) -> str | None:
        """Why one output key of a row cannot be made whatever its input holds: a translation into a
        language code the model's prompts do not know (a bad value in the manifest row)."""
        if key.task == "translate" and not is_known_language(key.target_language):
            return f"target_language: {unknown_language_message(key.target_language)}"
        return None

    def input_keys(self, row: dict) -> list:
        """The output keys made from the input's media (the others: `bad_value_rows`)."""
        return [k for k in self.all_keys(row) if self.key_problem(k) is None]

    def bad_value_rows(self, row: dict) -> list[dict]:
        """One error row per output key that a bad value in the row rules out; the row's other outputs
        are made as usual, so a bad `target_language` costs only that translation."""
        return [work_row(row["id"], key.task, target_language=key.target_language, language=row.get("language"),
                         error=f"id {row['id']}: {problem}", **self.measured)
                for key in self.all_keys(row) if (problem := self.key_problem(key)) is not None]

    def error_rows(self, row: dict, message: str) -> list[dict]:
        """One error row per output row the input would have produced."""
        return [work_row(row["id"], key.task, target_language=key.target_language, language=row.get("language"),
                         error=message, **self.measured) for key in self.input_keys(row)]

    def start_load(self, row: dict) -> PendingFetch | None:
        """The row's fetch, started (None for a row that carries its bytes in `data`)."""
        if row.get("data") is not None:
            return None
        return self.fetch(row["uri"])

    def fetch(self, uri: str) -> PendingFetch:
        """One uri's fetch, started, under the run's storage options, `inputs` rules and deadline."""
        inputs = self.config.inputs
        return start_fetch(uri, self.storage, timeout_s=inputs.fetch_timeout_s, rules=inputs)

    def load_bytes(self, row: dict, pending: PendingFetch | None = None) -> bytes:
        if row.get("data") is not None:
            return row["data"]
        return (pending or self.start_load(row)).result()


def rows_per_block(input_rows: int, workers: int) -> int:
    """Manifest rows per block and per call: about two blocks per worker, at most 16 rows."""
    return max(1, min(16, math.ceil(input_rows / (2 * workers))))


def kind_phrase(kind: str) -> str:
    return {"image": "an image", "document": "a document", "audio": "audio", "meeting": "audio",
            "unknown": "not a recognised audio, image or document format"}.get(kind, kind)
