"""The run's shared state on the driver's node: one Ray actor per run (`start_run_state`) holding

- `counters`: the sums of every stage worker's counters (rows in and out, calls, busy seconds, and
  what each stage counts itself), read by the progress line and written to `_runs/<run_id>.json`;
- `journal`: the work-row keys of each GPU call in flight, which is how a poison input is found;
- `parts`: the parts of long recordings' work rows waiting for their last part (RegroupParts).

It lives on the driver's node, not beside a stage: a stage's actor may be on a worker node that is
lost, and Ray Data then retries the lost call's block, which must neither lose the parts that came
before nor count them twice.
"""
from __future__ import annotations

from collections import Counter, OrderedDict


class PartsStore:
    """The parts of each row that came so far, and the rows made from them lately (held by RunState).

    `add` is idempotent: a part sent again (its call was retried) replaces itself. When the last part of
    a row comes, the row's parts are handed back, in order, and kept a while (up to `keep_bytes`) under
    `released`, with the part that completed it. That part sent again means the call it completed died
    before its output was kept (a dead call makes nothing), so the row is handed back again; any other
    part of a released row sent again came from a retried call that did not complete it: nothing."""

    def __init__(self, keep_bytes: int = 256 * 2**20):
        self.waiting: dict[tuple, dict[int, bytes]] = {}
        self.released: OrderedDict[tuple, tuple[int, list[bytes]]] = OrderedDict()
        self.released_bytes = 0
        self.keep_bytes = keep_bytes

    def add(self, key: tuple, part: int, parts: int, row: bytes) -> list[bytes] | None:
        key = tuple(key)
        if key in self.released:
            completed_by, done = self.released[key]
            return done if part == completed_by else None
        have = self.waiting.setdefault(key, {})
        have[part] = row
        if len(have) < parts:
            return None
        done = [have[k] for k in sorted(have)]
        del self.waiting[key]
        self.released[key] = (part, done)
        self.released_bytes += sum(len(b) for b in done)
        while self.released_bytes > self.keep_bytes and len(self.released) > 1:
            _, (_, old) = self.released.popitem(last=False)
            self.released_bytes -= sum(len(b) for b in old)
        return done

    def waiting_rows(self) -> int:
        return len(self.waiting)


class RunState:
    """One run's state (a Ray actor: `start_run_state`), in three named parts: `totals` (the counters:
    `add`, `snapshot`), the journal of GPU calls in flight (`begin` / `end` / `deaths`), and `parts`, the
    long recordings' work rows waiting for their last part (`hold_part`, RegroupParts).

    The journal is how a poison input is found: Ray restarts a GPU actor whose process died mid-call
    and retries that call without limit, so an input that kills its worker every time would be retried
    forever. A GPU stage records the work-row keys of a call before it runs (`begin`) and clears them
    after (`end`); keys still recorded when the same rows come back were in a call whose worker died.
    The stage then runs that batch's rows one at a time, and a row whose worker died while it ran alone
    `poison_after_deaths` times becomes an error row without running again (actors/model_stage.py).
    """

    def __init__(self):
        self.totals: dict[str, Counter] = {}
        self.in_flight: dict[tuple, int] = {}  # (stage, key) -> rows in the call it is in
        self.died: Counter = Counter()  # (stage, key) -> worker deaths while it was in flight
        self.died_alone: Counter = Counter()  # ... while it was in flight alone
        self.parts = PartsStore()  # parts of long recordings' rows until the last comes (RegroupParts)

    def deaths(self, stage: str, keys: list) -> dict:
        """{key: (deaths, deaths alone)} of the keys whose worker died mid-call (now or before): a key
        still in flight when it is looked up again was in a call that never ended."""
        out, found = {}, 0
        for key in keys:
            sk = (stage, tuple(key))
            size = self.in_flight.pop(sk, None)
            if size is not None:
                found += 1
                self.died[sk] += 1
                self.died_alone[sk] += size == 1
            if self.died[sk]:
                out[tuple(key)] = (self.died[sk], self.died_alone[sk])
        if found:
            self.totals.setdefault(stage, Counter()).update(rows_in_dead_calls=found)
        return out

    def begin(self, stage: str, keys: list) -> None:
        for key in keys:
            self.in_flight[(stage, tuple(key))] = len(keys)

    def end(self, stage: str, keys: list) -> None:
        for key in keys:
            self.in_flight.pop((stage, tuple(key)), None)

    def hold_part(self, stage: str, key: tuple, part: int, parts: int, row: bytes) -> list[bytes] | None:
        """A part row kept until its row's last part comes; then all of them (pipeline/stages/regroup_parts.py)."""
        return self.parts.add(key, part, parts, row)

    def calls_in_flight(self, stage: str) -> int:
        """How many work rows of `stage` are in a call now (for monitoring and fault tests)."""
        return sum(1 for s, _ in self.in_flight if s == stage)

    def add(self, stage: str, delta: dict) -> bool:
        self.totals.setdefault(stage, Counter()).update(delta)
        return True

    def snapshot(self) -> dict[str, dict]:
        return {stage: {k: round(v, 3) if isinstance(v, float) else v for k, v in sorted(c.items())}
                for stage, c in self.totals.items()}


def run_state_name(run_id: str) -> str:
    """The name of a run's state actor (for a tool that looks at a run in flight: tests/node_loss_driver.py)."""
    return f"phi4mm-run-state-{run_id}"


def start_run_state(run_id: str):
    """(name, handle) of the run's state actor; the name goes into the RunContext every stage is built
    with. Kill it after reading it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = run_state_name(run_id)
    # on the driver's node: losing a worker node must not lose the run's counters and journal
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return name, ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(RunState).options(
        name=name, scheduling_strategy=here).remote()
