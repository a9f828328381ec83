"""What a stage of the graph is: a class that declares itself, is set up once, and maps batches.

Every step of a job's graph (jobs/graph.py), on the CPU side or the GPU side, is a `Stage` subclass:

- `reads` / `writes`: the work-row columns (schemas/work_rows.py) it looks at and fills in; a stage
  passes every other column through unchanged, so the graph can be read column by column;
- `resources(config, cluster)`: what Ray Data must give it (CPUs, GPUs, a pool of actors, rows per
  call), declared next to the code that needs them rather than as literals in the graph;
- `__init__(context)`: the setup, once per worker (a model replica, a processor, a VAD model);
- `process(batch)`: one pyarrow table in, one out; `__call__` wraps it with the stage's counters.

Counters (rows in and out, calls, busy seconds, and whatever the stage counts itself) go to one
`RunCounters` actor per run, named in the context, and end up in `_runs/<run_id>.json`. Without Ray (a
unit test calling a stage on a hand-made table) they stay on the stage object.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa

from schemas.config import JobConfig


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


@dataclass(frozen=True)
class StageContext:
    """What every stage is constructed with, on every worker (pickled by Ray)."""
    config_json: str
    passthrough_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    counters_actor: str | None = None  # the run's RunCounters actor; None: counters stay local
    # what the driver found the checkpoint to be (pipeline/model_source.py: describe_model): source,
    # revision, layout, weights_sha; None outside a job (unit tests)
    model_provenance: dict | None = None

    @property
    def config(self) -> JobConfig:
        return JobConfig.model_validate_json(self.config_json)


class Stage:
    """One declared step of the graph. Subclasses set `reads`/`writes`, `resources` and `process`."""

    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    stage_name: ClassVar[str] = "Stage"  # the class's own name, also under Ray Data's private wrapper

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # Ray Data subclasses an actor class as _SingleThreadedWrapper
            cls.stage_name = cls.__name__

    def __init__(self, context: StageContext):
        self.context = context
        self.config = context.config
        self.counters: Counter = Counter()  # this worker's totals since it started
        self._pushed: Counter = Counter()
        self._actor = None

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        return StageResources(batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        out = self.process(batch)
        self.counters.update(calls=1, rows_in=batch.num_rows, rows_out=out.num_rows)
        self.counters["busy_s"] += time.perf_counter() - started
        self.push_counters()
        return out

    def push_counters(self) -> None:
        """Send what changed since the last push to the run's counters actor (synchronously: a worker
        Ray kills right after its last call must not lose that call's counts)."""
        if self.context.counters_actor is None:
            return
        import ray

        delta = {k: v - self._pushed.get(k, 0) for k, v in self.counters.items()
                 if k not in self._pushed or v != self._pushed[k]}
        if not delta:
            return
        if self._actor is None:
            self._actor = ray.get_actor(self.context.counters_actor)
        ray.get(self._actor.add.remote(self.stage_name, delta))
        self._pushed = Counter(self.counters)


def one_thread_per_worker() -> None:
    """Each CPU stage worker holds one Ray CPU: torch's default of one thread per core, times a pool of
    workers, oversubscribes the node and starves the thread that feeds the GPU."""
    import torch

    torch.set_num_threads(1)


class RunCounters:
    """Sums of every stage worker's counters for one run (a Ray actor: see `start_run_counters`)."""

    def __init__(self):
        self.totals: dict[str, Counter] = {}

    def add(self, stage: str, delta: dict) -> None:
        self.totals.setdefault(stage, Counter()).update(delta)

    def snapshot(self) -> dict[str, dict]:
        return {stage: {k: round(v, 3) if isinstance(v, float) else v for k, v in sorted(c.items())}
                for stage, c in self.totals.items()}


def start_run_counters(run_id: str):
    """The run's counters actor (its name goes into every StageContext); kill it after reading it."""
    import ray

    name = f"phi4mm-counters-{run_id}"
    return name, ray.remote(num_cpus=0)(RunCounters).options(name=name).remote()
