"""The graph's actors fit the host they run on: on a many-GPU host every GPU replica gets its CPU.

Ray Data reserves one CPU for each GPU actor. If the decoding pool took every CPU, a 4-GPU host would
start two or three replicas and the fourth GPU would sit idle (or the job would stall), which is what
the first 4-GPU scaling plan would have hit with `cpus - 3` prepare workers.
"""
from __future__ import annotations

import pytest

from jobs.graph import gpu_stages_of, plan_cluster, prepare_pool_size, stages_of
from pipeline.stages.prepare_audio import PrepareAudio
from pipeline.core.stage import Cluster
from schemas.config import JobConfig

ROWS = 100_000  # a large manifest: the pool is bounded by the CPUs, not the rows


def cpu_demand(config: JobConfig, cpus: int, gpus: int) -> tuple[int, int]:
    """(CPUs the graph's actors reserve, GPU replicas) when the job runs alone on a host."""
    prepare = prepare_pool_size(config, cpus, gpus, ROWS, autoscaling=False)
    cluster = plan_cluster(config, cpus, gpus, ROWS, autoscaling=False)
    per_worker = PrepareAudio.resources(config, cluster).num_cpus  # a fraction each when the pool is lifted
    replicas = 0
    for stage in gpu_stages_of(config):
        replicas += stage.resources(config, Cluster(cpus=cpus, gpus=gpus)).pool_size[1]
    # ResultRows, PrepareFromTranscripts (one CPU each), AssembleChunks (a quarter CPU after each GPU stage);
    # for audio: the first BuildChunkFeatures worker (one CPU) and RegroupParts (a quarter)
    single_actors = 1 + (1.5 if "summarize" in config.tasks else 0.25) + (1.25 if config.job != "ocr" else 0)
    return prepare * per_worker + replicas + single_actors, replicas


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("cpus_per_gpu", [8, 16])
def test_every_gpu_replica_fits_beside_the_decoding_pool(gpus, cpus_per_gpu):
    cpus = gpus * cpus_per_gpu
    config = JobConfig(job="transcribe", input="m.parquet", output="out")
    demand, replicas = cpu_demand(config, cpus, gpus)
    assert replicas == gpus  # one replica per GPU
    assert demand <= cpus - 1  # and one CPU stays free for the driver and Ray itself
    # the decoding pool still gets nearly everything else (the driver, ResultRows, the features pool's
    # first worker and three quarter-CPU actors: 4.5 CPUs besides the replicas' own)
    assert prepare_pool_size(config, cpus, gpus, ROWS, autoscaling=False) >= cpus - gpus - 5


def test_meetings_count_the_speech_and_the_summary_replicas():
    config = JobConfig(job="meetings", input="m.parquet", output="out",
                       resources={"gpus_per_replica": 0.5})  # both pools share the 4 GPUs
    demand, replicas = cpu_demand(config, 64, 4)
    assert replicas == 16  # 8 speech + 8 text replicas
    assert demand <= 63


def test_small_manifest_small_pool():
    config = JobConfig(job="ocr", input="m.parquet", output="out")
    assert prepare_pool_size(config, 64, 4, rows=6, autoscaling=False) == 3


def test_meetings_features_pool_takes_what_the_decoding_pool_leaves_from_the_start():
    """8 one-hour meetings on a 16-core, 1-GPU host: 4 decoding workers (one per two inputs) and every
    CPU they and the other actors leave for the features pool, started at once (features are ~80 % of
    preparing audio); together they fit the host's CPUs. A transcribe job's pool grows from one."""
    config = JobConfig(job="meetings", input="m.parquet", output="out")
    cluster = plan_cluster(config, 16, 1, 8, autoscaling=False)
    decoders = PrepareAudio.resources(config, cluster)
    features = features_pool(config, cluster)
    assert decoders.pool_size == (4, 4) and features.pool_size[0] == features.pool_size[1] >= 4
    reserved_besides_features = cluster.reserved_cpus - 1  # its first worker is counted there
    assert reserved_besides_features + 4 * decoders.num_cpus + features.pool_size[1] <= 16
    calls = JobConfig(job="transcribe", input="m.parquet", output="out")
    assert features_pool(calls, plan_cluster(calls, 16, 1, 8, autoscaling=False)).pool_size[0] == 1


def features_pool(config: JobConfig, cluster: Cluster):
    """The features pool as the job's spec declares it (with the job's options)."""
    from pipeline.stages.chunk_features import BuildChunkFeatures

    return next(s for s in stages_of(config) if s.stage is BuildChunkFeatures).resources(config, cluster)
