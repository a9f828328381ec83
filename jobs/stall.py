"""A run that stops making progress stops, saying where it waits.

Ray Data waits for what it needs: a GPU replica lost with its node restarts only where a GPU is free, and
on a cluster that adds no node in its place the calls it held wait for one. Ray Data's own guard
(`DataContext.execution_no_progress_timeout_s`: no block taken from or queued at any operator for that
long) then fails the execution with `ExecutionTimeoutError`, and shuts its executor down (its actors and
tasks end; the files already written stay). The runner sets that timeout from
`resources.stall_timeout_s` and turns the error into `JobStalled`, whose message says which stage holds
the work and what it waits for (`stall_reason`), so the command ends with one line and a non-zero exit
code, and `--resume` continues from what was written.
"""
from __future__ import annotations


class JobStalled(RuntimeError):
    """The run made no progress for `resources.stall_timeout_s`; the message says where it waits."""


def stall_reason(stages: list[str], resources: dict, counters: dict, in_flight: dict, nodes: list[dict]) -> str:
    """Which stage holds the work and what it waits for.

    `stages`: the graph's stage names in order; `resources`: stage -> its StageResources (what one of its
    workers asks Ray for); `counters`: the run's counters snapshot (pipeline/core/stage.py); `in_flight`: GPU
    stage -> work rows in a call now (the run's journal); `nodes`: ray.nodes().

    In order of certainty: a stage whose replicas no alive node can hold (more GPUs, or a GPU type, than
    any node has) waits forever; a GPU stage with rows in a call that has not returned holds them; else
    the stage after the last one that put rows out has not taken them in.
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    for stage in stages:
        need = _request(resources.get(stage))
        if need and not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in alive):
            return (f"{stage} holds the work: its replica asks for {_said(need)}, and no node of the cluster has "
                    f"that ({_nodes(alive)}): a GPU node lost and not replaced, or a GPU type no node has")
    for stage in stages:
        if in_flight.get(stage):
            return (f"{stage} holds the work: {in_flight[stage]} rows are in a GPU call that has not returned (a "
                    "hung replica, or one call longer than the timeout)")
    for before, stage in zip(stages, stages[1:]):
        made = counters.get(before, {}).get("rows_out", 0)
        if made and not counters.get(stage, {}).get("rows_in"):
            return (f"{stage} holds the work: {before} put out {made} rows and {stage} has taken none in (its "
                    f"workers have not started: {_nodes(alive)})")
    took = [s for s in stages if counters.get(s, {}).get("rows_in")]
    if took:
        return f"{took[-1]} was the last stage to take rows in, and no stage has finished a call since"
    first = stages[0] if stages else "the first stage"
    return f"{first} holds the work: it has taken no row in (its workers have not started: {_nodes(alive)})"


def _request(res) -> dict[str, float]:
    """The GPU resources one replica of a stage asks for ({} for a CPU stage)."""
    if res is None or not res.num_gpus:
        return {}
    need = {"GPU": res.num_gpus}
    if res.accelerator_type:
        need[f"accelerator_type:{res.accelerator_type}"] = 0.001  # Ray's marker resource of a GPU type
    return need


def _said(need: dict[str, float]) -> str:
    gpus = need["GPU"]
    kind = next((k.split(":", 1)[1] for k in need if k.startswith("accelerator_type:")), None)
    return f"{gpus:g} GPU" + ("s" if gpus != 1 else "") + (f" of type {kind}" if kind else "")


def _nodes(alive: list[dict]) -> str:
    if not alive:
        return "no node is alive"
    shown = []
    for node in alive[:4]:
        kinds = [k.split(":", 1)[1] for k in node if k.startswith("accelerator_type:")]
        kind = f" {'/'.join(kinds)}" if kinds else ""
        shown.append(f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU{kind}")
    more = f" and {len(alive) - 4} more" if len(alive) > 4 else ""
    return f"{len(alive)} node{'s' if len(alive) != 1 else ''} alive: " + "; ".join(shown) + more


def stall_message(timeout_s: float, reason: str) -> str:
    return (f"the run made no progress for {timeout_s:g} s (resources.stall_timeout_s) and was stopped: {reason}. "
            "The files written so far stay; rerun with --resume to continue")
