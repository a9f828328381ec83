"""The Ray Data graph of a job: its spec's flat list of declared stages (jobs/specs.py), run in order.

    PrepareAudio | PreparePages | PreparePrompts (CPU) [-> BuildChunkFeatures (CPU)]
        -> SpeechStage / VisionStage / TextStage (GPU pools) [-> RegroupParts] -> AssembleChunks
        [-> PrepareFromTranscripts (CPU) -> TextStage (GPU pool) -> AssembleChunks] [-> StructuredAnswers]
        -> ResultRows -> Parquet

The graph lives here, above both sides, because it is the one place that joins the CPU stages
(`pipeline/`) and the GPU stages (`actors/`); neither side imports the other's stages. Nothing here
knows a job by name: each stage declares its resources, how its CPUs count (`cpu_share`) and the
work-row columns it reads and writes; only the actor stages touch a GPU; every stage passes rows it
does not own through, so the row count only changes where a stage says so (one row per output key and
page, +1 summary and +1 extraction per recording). A work row carries its chunks (a long recording's
row travels in parts that RegroupParts joins after the GPU), so there is no shuffle: rows stream to
Parquet as they finish, and a run that dies half way has written what it finished (which --resume
then skips).
"""
from __future__ import annotations

import pyarrow as pa

from actors.model_stage import ModelStage, call_bytes_bound
from jobs.specs import StageSpec, job_spec
from pipeline.context import RunContext
from pipeline.core.stage import Cluster
from schemas.config import JobConfig


def stages_of(config: JobConfig) -> list[StageSpec]:
    """The job's graph, in order."""
    return job_spec(config).graph(config)


def gpu_stages_of(config: JobConfig) -> list[StageSpec]:
    """Every GPU pool of the job, in graph order."""
    return [s for s in stages_of(config) if issubclass(s.stage, ModelStage)]


def media_stages_of(config: JobConfig) -> list[StageSpec]:
    """The GPU pools that read the inputs' media (speech, vision), in graph order."""
    return [s for s in gpu_stages_of(config) if s.stage.modality in ("speech", "vision")]


def reserved_cpus(config: JobConfig, cluster: Cluster) -> float:
    """CPUs the actors other than the decoding pool hold, from their declarations.

    Ray Data reserves one CPU for each GPU actor (they do CPU work between GPU calls); each single-actor
    CPU stage takes its own; one stays free for the driver and Ray's own processes. Without this, a host
    with many GPUs has its CPUs taken by prepare workers and the last GPU actors never start. On an
    autoscaling cluster only the GPU actors that fit the GPUs present now count: later GPU nodes bring
    their own CPUs.
    """
    reserved = 1.0  # the driver and Ray
    per_replica = config.resources.gpus_per_replica
    for spec in stages_of(config):
        if spec.stage.cpu_share == "rest":
            continue
        if spec.stage.cpu_share == "spare":  # its first worker; it grows into what the decoding pool leaves
            reserved += 1
            continue
        res = spec.resources(config, cluster)
        if issubclass(spec.stage, ModelStage):
            fit = int(cluster.gpus / per_replica) if cluster.gpus > 0 and per_replica > 0 else res.pool_size[1]
            reserved += min(res.pool_size[1], fit)
        else:
            reserved += res.pool_size[1] * res.num_cpus
    return reserved


def decoding_stage(config: JobConfig) -> StageSpec:
    """The stage that takes the CPUs the others leave (the job's first, ManifestStage)."""
    return next(s for s in stages_of(config) if s.stage.cpu_share == "rest")


def plan_cluster(config: JobConfig, cpus: float, gpus: float, input_rows: int, autoscaling: bool) -> Cluster:
    cluster = Cluster(cpus=cpus, gpus=gpus, autoscaling=autoscaling, input_rows=input_rows)
    cluster = Cluster(cpus=cpus, gpus=gpus, autoscaling=autoscaling, input_rows=input_rows,
                      reserved_cpus=reserved_cpus(config, cluster))
    workers = decoding_stage(config).resources(config, cluster).pool_size[1]
    return Cluster(cpus=cpus, gpus=gpus, autoscaling=autoscaling, input_rows=input_rows,
                   reserved_cpus=cluster.reserved_cpus, prepare_workers=workers)


def prepare_pool_size(config: JobConfig, cpus: float, gpus: float, rows: int, autoscaling: bool) -> int:
    """CPU workers for decoding and features: the cluster's CPUs less what the other actors need."""
    return plan_cluster(config, cpus, gpus, rows, autoscaling).prepare_workers


def build_dataset(config: JobConfig, manifest: pa.Table, cluster: Cluster, context: RunContext):
    """The lazy Ray Dataset of result rows (nothing runs until it is written)."""
    import ray

    specs = stages_of(config)
    first = specs[0].resources(config, cluster)
    ds = ray.data.from_arrow(manifest_blocks(manifest, first.batch_size))
    for spec in specs:
        ds = ds.map_batches(spec.stage, fn_constructor_args=(context,), batch_format="pyarrow",
                            **spec.resources(config, cluster).map_batches_args())
    limit = queued_features_limit(config, cluster)
    if limit is not None:  # this dataset's own context (a copy made with it), not the process's default
        options = ds.context.execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=limit)
    blocks = [b for spec in specs if (b := spec.stage.dataset_block_bytes(config))]
    if blocks:
        ds.context.target_max_block_size = min(blocks)
    return ds


# the least object store a dataset is limited to: Ray Data splits a limit among the graph's 5-7 operators,
# and under a few GiB the writer's share falls below what one of its tasks needs while the decoding pool's
# pages hold the rest, and the job stalls (seen with 1 GiB and 48-page GPU calls: Write "backpressured",
# budget 0). With replicas on CPU (a cluster without GPUs; calls of `cpu_vision_rows_per_call` pages)
# 1 GiB runs the 300-page PDF and the mixed scans folder without a stall, and the store's high-water
# mark (which every worker that touched it keeps mapped) falls from ~1.9 to ~0.75 GB.
MIN_QUEUED_FEATURES_BYTES = 4 << 30
MIN_QUEUED_FEATURES_BYTES_CPU = 1 << 30


def queued_features_limit(config: JobConfig, cluster: Cluster) -> int | None:
    """Object-store bytes a job's dataset may hold, for jobs whose GPU calls are sized in bytes (vision):
    `queued_calls_per_replica` calls of the largest size per replica of each media pool, at least
    MIN_QUEUED_FEATURES_BYTES (MIN_QUEUED_FEATURES_BYTES_CPU on a cluster without GPUs). Ray Data (below its own default share of the object store, whichever is
    less) then holds the CPU stages back instead of letting them prepare pages that no GPU will read for
    a long time. None: Ray's default."""
    total = 0
    for spec in media_stages_of(config):
        res = spec.resources(config, cluster)
        bound = call_bytes_bound(config, spec.stage.modality, res.batch_size)
        if bound is None:
            return None
        total += bound * res.pool_size[1] * config.batching.queued_calls_per_replica
    floor = MIN_QUEUED_FEATURES_BYTES if cluster.gpus > 0 or cluster.autoscaling else MIN_QUEUED_FEATURES_BYTES_CPU
    return max(total, floor) if total else None


def manifest_blocks(manifest: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Small blocks so that decoding spreads over all CPU workers from the start."""
    n = manifest.num_rows
    return [manifest.slice(i, rows_per_block) for i in range(0, n, rows_per_block)] or [manifest]
