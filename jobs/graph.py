"""The Ray Data graph of a job: a flat list of declared stages (pipeline/core/stage.py), run in order.

    PrepareWork (CPU) [-> BuildChunkInputs (CPU)] -> SpeechStage / VisionStage (GPU pools)
        [-> RegroupParts] -> AssembleChunks
        [-> PrepareFromTranscripts (CPU) -> TextStage (GPU pool) -> AssembleChunks [-> StructuredAnswers]]
        -> ResultRows -> Parquet

The graph lives here, above both sides, because it is the one place that joins the CPU stages
(`pipeline/`) and the GPU stages (`actors/`); neither side imports the other's stages. Each stage
declares its resources and the work-row columns it reads and writes; only the actor stages touch a
GPU; every stage passes rows it does not own through, so the row count only changes where a stage says
so (one row per output key and page, +1 summary and +1 extraction per recording). A work row carries its chunks (a long
recording's row travels in parts that RegroupParts joins after the GPU: pipeline/stages/regroup_parts.py), so there is
no shuffle: rows stream to Parquet as they finish, and a run that dies half way has written what it
finished (which --resume then skips).
"""
from __future__ import annotations

import pyarrow as pa

from actors.stages import STAGE_FOR_MODALITY, ModelStage, TextStage, call_bytes_bound
from pipeline.stages.assemble import AssembleChunks
from pipeline.stages.chunk_features import BuildChunkInputs
from pipeline.media.audio import SAMPLE_RATE
from pipeline.stages.regroup_parts import RegroupParts
from pipeline.stages.prepare import PrepareWork
from pipeline.stages.prepare_prompts import PreparePrompts
from pipeline.stages.result_rows import ResultRows
from pipeline.stages.structured_answers import StructuredAnswers
from pipeline.stages.tool_calls import ToolCalls
from pipeline.core.stage import Cluster, Stage, StageContext
from pipeline.stages.from_transcripts import PrepareFromTranscripts
from schemas.config import JobConfig
from schemas.tasks import DERIVED_FROM, MODALITY_FOR_TASK, PROMPT_MODALITIES


def prompt_stages_of(config: JobConfig) -> list[type[ModelStage]]:
    """The prompt job's GPU stages: one pool per mix its manifest holds (config.prompt.modalities, filled
    by the driver), each with that mix's adapter merged; rows of the other mixes pass through."""
    planned = config.prompt.modalities or PROMPT_MODALITIES
    return [STAGE_FOR_MODALITY[m] for m in PROMPT_MODALITIES if m in planned]


def media_stages_of(config: JobConfig) -> list[type[ModelStage]]:
    """The GPU stages that read the inputs (speech, vision), in graph order."""
    if config.job == "prompt":
        return [s for s in prompt_stages_of(config) if s is not TextStage]
    return [STAGE_FOR_MODALITY[m] for m in sorted({MODALITY_FOR_TASK[t] for t in config.tasks} - {"text"})]


def gpu_stages_of(config: JobConfig) -> list[type[ModelStage]]:
    """Every GPU stage of the job: the media stages, then summaries (after assembly)."""
    if config.job == "prompt":
        return prompt_stages_of(config)
    return media_stages_of(config) + ([TextStage] if from_transcripts(config) else [])


def from_transcripts(config: JobConfig) -> bool:
    """Whether the run makes rows from whole transcripts (summaries, --extract) for the text pool."""
    return any(DERIVED_FROM.get(task) == "asr" for task in config.tasks)


def stages_of(config: JobConfig) -> list[type[Stage]]:
    """The job's graph, in order."""
    if config.job == "prompt":  # PreparePrompts -> speech / vision / text pools -> AssembleChunks -> ResultRows
        structured = ([StructuredAnswers] if config.structured_task else []) + \
            ([ToolCalls] if config.prompt.tools else [])
        return [PreparePrompts, *prompt_stages_of(config), AssembleChunks, *structured, ResultRows]
    media = media_stages_of(config)
    # a long recording is cut by PrepareWork, its parts' features built by a pool, and its parts joined
    # after the speech pool (pipeline/stages/chunk_features.py, pipeline/stages/regroup_parts.py)
    speech = any(stage.modality == "speech" for stage in media)
    stages: list[type[Stage]] = [PrepareWork, *([BuildChunkInputs] if speech else []), *media,
                                 *([RegroupParts] if speech else []), AssembleChunks]
    if from_transcripts(config):
        stages += [PrepareFromTranscripts, TextStage, AssembleChunks]
    if config.structured_task == "extract":
        stages.append(StructuredAnswers)
    return stages + [ResultRows]


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
    gpu_stages = gpu_stages_of(config)
    for stage in stages_of(config):
        if issubclass(stage, PrepareWork):
            continue
        if stage is BuildChunkInputs:  # its first worker; it grows into what the decoding pool leaves
            reserved += 1
            continue
        res = stage.resources(config, cluster)
        if stage in gpu_stages:
            fit = int(cluster.gpus / per_replica) if cluster.gpus > 0 and per_replica > 0 else res.pool_size[1]
            reserved += min(res.pool_size[1], fit)
        else:
            reserved += res.pool_size[1] * res.num_cpus
    return reserved


def plan_cluster(config: JobConfig, cpus: float, gpus: float, input_rows: int, autoscaling: bool) -> Cluster:
    cluster = Cluster(cpus=cpus, gpus=gpus, autoscaling=autoscaling, input_rows=input_rows)
    return Cluster(cpus=cpus, gpus=gpus, autoscaling=autoscaling, input_rows=input_rows,
                   reserved_cpus=reserved_cpus(config, cluster))


def prepare_pool_size(config: JobConfig, cpus: float, gpus: float, rows: int, autoscaling: bool) -> int:
    """CPU workers for decoding and features: the cluster's CPUs less what the other actors need."""
    cluster = plan_cluster(config, cpus, gpus, rows, autoscaling)
    return PrepareWork.resources(config, cluster).pool_size[1]


def build_dataset(config: JobConfig, manifest: pa.Table, cluster: Cluster, context: StageContext):
    """The lazy Ray Dataset of result rows (nothing runs until it is written)."""
    import ray

    first = PrepareWork.resources(config, cluster)
    ds = ray.data.from_arrow(manifest_blocks(manifest, first.batch_size))
    for stage in stages_of(config):
        ds = ds.map_batches(stage, fn_constructor_args=(context,), batch_format="pyarrow",
                            **stage.resources(config, cluster).map_batches_args())
    limit = queued_features_limit(config, cluster)
    if limit is not None:  # this dataset's own context (a copy made with it), not the process's default
        options = ds.context.execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=limit)
    if BuildChunkInputs in stages_of(config):
        ds.context.target_max_block_size = part_block_bytes(config)
    return ds


def part_block_bytes(config: JobConfig) -> int:
    """The dataset's target block size when long recordings travel in parts: half a full part's samples
    (`audio.part_chunks` chunks of `max_chunk_s` at 16 kHz float32: 15 MB at the defaults).

    Ray Data merges the blocks a stage yields until they pass its target block size (128 MiB by
    default), so the parts PrepareWork yields one by one reached BuildChunkInputs four to a block, in
    few calls on few workers (measured: 60 parts of 8 one-hour meetings in 16 calls). Under half a part,
    every part leaves as a block of its own and the features pool takes one part per call; blocks of
    short calls are cut to ~15 MB (a dozen calls' features), which the speech pool's calls gather again."""
    return config.audio.part_chunks * int(config.audio.max_chunk_s * SAMPLE_RATE) * 4 // 2


# the least object store a dataset is limited to: Ray Data splits a limit among the graph's 5-7 operators,
# and under a few GiB the writer's share falls below what one of its tasks needs while PrepareWork's
# pages hold the rest, and the job stalls (seen with 1 GiB: Write "backpressured", budget 0)
MIN_QUEUED_FEATURES_BYTES = 4 << 30


def queued_features_limit(config: JobConfig, cluster: Cluster) -> int | None:
    """Object-store bytes a job's dataset may hold, for jobs whose GPU calls are sized in bytes (vision):
    `queued_calls_per_replica` calls of the largest size per replica of each media pool, at least
    MIN_QUEUED_FEATURES_BYTES. Ray Data (below its own default share of the object store, whichever is
    less) then holds the CPU stages back instead of letting them prepare pages that no GPU will read for
    a long time. None: Ray's default."""
    total = 0
    for stage in media_stages_of(config):
        res = stage.resources(config, cluster)
        bound = call_bytes_bound(config, stage.modality, res.batch_size)
        if bound is None:
            return None
        total += bound * res.pool_size[1] * config.batching.queued_calls_per_replica
    return max(total, MIN_QUEUED_FEATURES_BYTES) if total else None


def manifest_blocks(manifest: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Small blocks so that decoding spreads over all CPU workers from the start."""
    n = manifest.num_rows
    return [manifest.slice(i, rows_per_block) for i in range(0, n, rows_per_block)] or [manifest]
