"""The driver of tests/test_node_loss.py, run in a process of its own (it starts its own Ray cluster).

A `ray.cluster_utils.Cluster` of a head (no GPU) and two worker nodes with one (logical) GPU each, so
each speech replica sits on a worker node. Once speech calls are in flight, the worker node of a
speech replica is removed (its raylet and every process on it killed, the blocks in its object store
lost), and a fresh worker node is added, as an autoscaler replaces a lost spot node. The job must
finish with every row once.

    python -m tests.node_loss_driver MANIFEST OUTPUT MODEL REPORT.json
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(manifest: str, output: str, model: str, report_path: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from jobs.cli import main as cli
    from pipeline.core.run_state import run_state_name

    # shutdown_at_exit=False: with it, every node added registers a SIGTERM handler, which only the main
    # thread may do, and the replacement node below is added from the killer thread (it failed there,
    # so the job ran on without one and, when the lost replica's calls waited for its restart on a GPU
    # no node had, hung). This process's own `cluster.shutdown()` and the test's kill of its session
    # clean up instead.
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 3, "include_dashboard": False})
    # the driver joins while the head is the only node, so it attaches to the head's raylet (all nodes
    # share one IP here) and the run's counters actor, pinned to the driver's node, stays on the head
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    run_id = "node-loss"
    report: dict = {"removed": None}

    def kill_a_busy_node() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                journal = ray.get_actor(run_state_name(run_id))
                busy = ray.get(journal.calls_in_flight.remote("SpeechStage"), timeout=5)
            except Exception:  # noqa: BLE001 - not started yet
                continue
            if not busy:
                continue
            # the GCS's actor table (the state API would need the dashboard)
            speech = [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                      if a.get("State") == "ALIVE" and "SpeechStage" in a.get("ActorClassName", "")]
            victim = next((n for n in workers if n.node_id in speech), None)
            if victim is None:
                continue
            report["removed"] = {"node_id": victim.node_id, "speech_rows_in_flight": busy,
                                 "speech_actors_on_it": speech.count(victim.node_id)}
            cluster.remove_node(victim, allow_graceful=False)
            cluster.add_node(num_cpus=2, num_gpus=1)  # the replacement node
            report["replaced"] = True
            return

    killer = threading.Thread(target=kill_a_busy_node, daemon=True)
    killer.start()
    config = Path(output).parent / "node-loss.yaml"
    # slow enough GPU calls that the kill lands in one: a fixed number of tokens per item
    config.write_text("batching:\n  rows_per_call: 2\nbenchmark:\n  min_new_tokens: 24\n")
    rc = cli(["transcribe", manifest, output, "--model", model, "--max-new-tokens", "24", "--run-id", run_id,
              "--gpus-per-replica", "1", "--config", str(config)])
    killer.join(timeout=1)
    report["rc"] = rc
    Path(report_path).write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
