"""The Ray Data graph of a job, as a flat list of declared stages.

    manifest -> PrepareWork (CPU) -> <modality>Stage (GPU pool) -> assemble ->
    [PrepareSummaries (CPU) -> TextStage (GPU pool) -> assemble] -> ResultRows (CPU) -> Parquet

Only the actor stages touch a GPU; every stage passes rows it does not own through, so the row count
only changes where a stage says so (one row per task and page, +1 summary per recording). A work row
carries all of its chunks, so there is no shuffle: rows stream to Parquet as they finish, and a run
that dies half way has written what it finished (which --resume then skips).
"""
from __future__ import annotations

import math
import os

import pyarrow as pa

from actors.stages import STAGE_FOR_MODALITY, TextStage
from pipeline.assemble import PrepareSummaries, ResultRows, assemble
from pipeline.prepare import MODALITY_FOR_TASK, PrepareWork
from schemas.config import JobConfig


def manifest_blocks(manifest: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Small blocks so that decoding spreads over all CPU workers from the start."""
    n = manifest.num_rows
    return [manifest.slice(i, rows_per_block) for i in range(0, n, rows_per_block)] or [manifest]


def cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", os.cpu_count() or 1)), float(res.get("GPU", 0))


def media_stages_of(config: JobConfig) -> list:
    """The GPU stages that read the inputs (speech, vision), in graph order."""
    return [STAGE_FOR_MODALITY[m] for m in sorted({MODALITY_FOR_TASK[t] for t in config.tasks} - {"text"})]


def gpu_stages_of(config: JobConfig) -> list:
    """Every GPU stage of the job: the media stages, then summaries (after assembly)."""
    return media_stages_of(config) + ([TextStage] if "summarize" in config.tasks else [])


def prepare_pool_size(config: JobConfig, cpus: float, gpus: float, rows: int, autoscaling: bool) -> int:
    """CPU workers for decoding and features: the cluster's CPUs less what the other actors need.

    Ray Data reserves one CPU for each GPU actor (they do CPU work between GPU calls); ResultRows and
    PrepareSummaries take one each, and one stays free for the driver and Ray's own processes. Without
    this, a host with many GPUs has its CPUs taken by prepare workers and the last GPU actors never
    start. On an autoscaling cluster only the GPU actors that fit the GPUs present now count: later GPU
    nodes bring their own CPUs.
    """
    gpu_actors = 0
    per_replica = config.resources.gpus_per_replica
    for stage in gpu_stages_of(config):
        pool = stage.ray_options(config, gpus, autoscaling)["compute"]
        fit = int(gpus / per_replica) if gpus > 0 and per_replica > 0 else pool.max_size
        gpu_actors += min(pool.max_size, fit)
    others = 1 + (1 if "summarize" in config.tasks else 0) + 1
    # a fixed pool: an autoscaling one starts with one worker and ramps up while the GPUs wait
    return max(1, min(int(cpus) - gpu_actors - others, math.ceil(rows / 2)))


def build_dataset(config: JobConfig, manifest: pa.Table, model_name: str, model_revision: str | None, passthrough_schema: pa.Schema):
    import ray
    from ray.data import ActorPoolStrategy

    cpus, gpus = cluster_resources()
    autoscaling = bool(os.environ.get("RAY_ADDRESS"))  # joined a cluster that may add GPU nodes
    cfg_json = config.model_dump_json()
    prepare_workers = prepare_pool_size(config, cpus, gpus, manifest.num_rows, autoscaling)
    rows_per_block = max(1, min(16, math.ceil(manifest.num_rows / (2 * prepare_workers))))
    ds = ray.data.from_arrow(manifest_blocks(manifest, rows_per_block))
    ds = ds.map_batches(PrepareWork, fn_constructor_args=(cfg_json,), batch_format="pyarrow",
                        batch_size=rows_per_block, compute=ActorPoolStrategy(size=prepare_workers),
                        num_cpus=config.resources.cpus_per_prepare_task)
    for stage in media_stages_of(config):
        ds = ds.map_batches(stage, fn_constructor_args=(cfg_json,), batch_format="pyarrow",
                            **stage.ray_options(config, gpus, autoscaling))
    ds = ds.map_batches(assemble, batch_format="pyarrow", batch_size=None)
    if "summarize" in config.tasks:
        ds = ds.map_batches(PrepareSummaries, fn_constructor_args=(cfg_json,),
                            batch_format="pyarrow", batch_size=64, compute=ActorPoolStrategy(size=1))
        ds = ds.map_batches(TextStage, fn_constructor_args=(cfg_json,), batch_format="pyarrow",
                            **TextStage.ray_options(config, gpus, autoscaling))
        ds = ds.map_batches(assemble, batch_format="pyarrow", batch_size=None)
    ds = ds.map_batches(ResultRows, fn_constructor_args=(cfg_json, model_name, model_revision,
                                                         passthrough_schema),
                        batch_format="pyarrow", batch_size=1024, compute=ActorPoolStrategy(size=1))
    return ds
