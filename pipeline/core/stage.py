"""What a stage of the graph is: a class that declares itself, is set up once, and maps batches.

Every step of a job's graph (jobs/graph.py), on the CPU side or the GPU side, is a `Stage` subclass:

- `reads` / `writes`: the work-row columns (schemas/work_rows.py) it looks at and fills in; a stage
  passes every other column through unchanged, so the graph can be read column by column;
- `resources(config, cluster)`: what Ray Data must give it (CPUs, GPUs, a pool of actors, rows per
  call), declared next to the code that needs them rather than as literals in the graph;
- `__init__(context)`: the setup, once per worker (a model replica, a processor, a VAD model);
- `process(batch)`: one pyarrow table in, and either one table out or an iterator of tables (blocks
  handed downstream as each is made: a 300-page PDF's pages leave in small blocks while the rest are
  still being rendered, so memory does not grow with the page count); `__call__` wraps it with the
  stage's counters either way (Ray Data iterates a batch function's generator, block by block).

Every stage is built with the run's `RunContext` (pipeline/context.py: the config, the storage options
and output location resolved once on the driver, the model reference, the run state actor's name).
Counters (rows in and out, calls, busy seconds, and whatever the stage counts itself) go to the run's
`RunState` actor (pipeline/core/run_state.py) and end up in `_runs/<run_id>.json` under the stage's
`stage_name`. Without Ray (a unit test calling a stage on a hand-made table) they stay on the stage object.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from pipeline.core.heap import release_free_heap
from schemas.config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """What the graph is planned for: the resources Ray reports when the job starts, and the input."""
    cpus: float
    gpus: float
    # joined a cluster that may add nodes: GPU pools ask for what the config allows, not what is there
    autoscaling: bool = False
    input_rows: int = 1  # manifest rows this run processes
    # CPUs the graph's other actors hold (one per GPU replica, the single-actor CPU stages, the driver):
    # the decoding pool takes the rest (jobs/graph.py fills this from the other stages' declarations)
    reserved_cpus: float = 0.0
    # workers of the decoding pool (the stage whose cpu_share is "rest"), filled by jobs/graph.py
    prepare_workers: int = 0


@dataclass(frozen=True)
class StageResources:
    """A stage's `map_batches` arguments, as the stage declares them."""
    batch_size: int | None  # rows per call; None: whole blocks
    pool_size: tuple[int, int] = (1, 1)  # actors (min, max); equal: a fixed pool
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None

    def map_batches_args(self) -> dict:
        from ray.data import ActorPoolStrategy

        low, high = self.pool_size
        pool = ActorPoolStrategy(min_size=low, max_size=high) if high > low else ActorPoolStrategy(size=high)
        args = {"batch_size": self.batch_size, "compute": pool, "num_cpus": self.num_cpus}
        if self.num_gpus:
            args["num_gpus"] = self.num_gpus
            if self.accelerator_type:
                args["accelerator_type"] = self.accelerator_type
        return args


class Stage:
    """One declared step of the graph. Subclasses set `reads`/`writes`, `resources` and `process`."""

    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    stage_name: ClassVar[str] = "Stage"  # the class's own name, also under Ray Data's private wrapper
    # how the graph counts its CPUs (jobs/graph.py): "declared" (what `resources` says is reserved),
    # "rest" (the decoding pool: the CPUs everything else leaves), "spare" (one worker reserved; it grows
    # into what the decoding pool leaves)
    cpu_share: ClassVar[str] = "declared"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # Ray Data subclasses an actor class as _SingleThreadedWrapper
            cls.stage_name = cls.__name__

    def __init__(self, context):  # a pipeline/context.py RunContext (core/ imports no other pipeline package)
        self.context = context
        self.config = context.config
        self.counters: Counter = Counter()  # this worker's totals since it started
        self._pushed: Counter = Counter()
        self._actor = None
        # hand the heap a call freed back to the system after each call and block (core/heap.py): a node
        # runs a CPU worker per core, each otherwise keeping its largest call's heap while idle
        self.release_heap = True

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster, **options) -> StageResources:
        """What Ray Data must give the stage; `options` are a job's own settings for it (jobs/specs.py)."""
        return StageResources(batch_size=None)

    @classmethod
    def dataset_block_bytes(cls, config: JobConfig) -> int | None:
        """The dataset's target block size this stage needs (None: Ray Data's default)."""
        return None

    def process(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
        started = time.perf_counter()
        out = self.process(batch)
        if isinstance(out, pa.Table):
            self.counters.update(calls=1, rows_in=batch.num_rows, rows_out=out.num_rows)
            self._hand_back_heap()  # what the call made and let go of, not kept resident while idle
            self.counters["busy_s"] += time.perf_counter() - started
            self.push_counters()
            return out
        return self._stream(batch, out, started)

    def _stream(self, batch: pa.Table, blocks: Iterator[pa.Table], started: float) -> Iterator[pa.Table]:
        """The blocks of a streaming `process`, each counted as it leaves: `rows_out` per block, `calls`
        and `rows_in` once, `busy_s` the time spent making them (not the time downstream holds a block
        back), pushed after every block so progress shows while a long document is still going."""
        self.counters.update(calls=1, rows_in=batch.num_rows)
        busy_from = started
        for block in blocks:
            self.counters["rows_out"] += block.num_rows
            self.counters["blocks_out"] += 1
            self.counters["busy_s"] += time.perf_counter() - busy_from
            self.push_counters()
            yield block
            busy_from = time.perf_counter()
            self._hand_back_heap()
        self._hand_back_heap()
        self.counters["busy_s"] += time.perf_counter() - busy_from
        self.push_counters()

    def _hand_back_heap(self) -> None:
        if self.release_heap:
            release_free_heap()

    def journal(self, method: str, *args):
        """Call the run's state actor (RunState: `deaths`, `begin`, `end`, `hold_part`) synchronously;
        None without one (a unit test calling a stage on a hand-made table)."""
        if self.context.run_state is None:
            return None
        return self._call_counters(method, *args)

    def _call_counters(self, method: str, *args):
        """One synchronous call to the run's state actor. If it cannot be reached (its node was lost
        and it is restarting), the call is skipped with a warning: counts and journal entries are
        bookkeeping, and never worth failing a batch of rows over."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.context.run_state)
            return ray.get(getattr(self._actor, method).remote(self.stage_name, *args), timeout=60)
        except (RayActorError, ActorUnavailableError, GetTimeoutError, ValueError) as exc:
            log.warning("%s: the run's state actor is unreachable, %s skipped (%s)", self.stage_name, method,
                        type(exc).__name__)
            self._actor = None
            return None

    def push_counters(self) -> None:
        """Send what changed since the last push to the run's state actor (synchronously: a worker
        Ray kills right after its last call must not lose that call's counts)."""
        if self.context.run_state is None:
            return
        delta = {k: v - self._pushed.get(k, 0) for k, v in self.counters.items()
                 if k not in self._pushed or v != self._pushed[k]}
        if not delta:
            return
        if self._call_counters("add", delta):  # else: sent again with the next push
            self._pushed = Counter(self.counters)


def one_thread_per_worker() -> None:
    """Each CPU stage worker holds one Ray CPU: torch's default of one thread per core, times a pool of
    workers, oversubscribes the node and starves the thread that feeds the GPU."""
    import torch

    torch.set_num_threads(1)
