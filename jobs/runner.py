"""Run one job: validate everything on the driver, then execute the Ray Data graph and record the run.

Order matters: the manifest and the model's processor are checked before Ray starts any actor, so a bad
manifest, config or model path fails in seconds with a clear message, never after GPUs were allocated.
"""
from __future__ import annotations

import logging
import os
from datetime import datetime, timezone

from schemas.config import JobConfig

log = logging.getLogger(__name__)


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS, else start a local one-machine Ray (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    # worker logs stay in Ray's log folder unless asked for (PHI4MM_WORKER_LOGS=1)
    worker_logs = os.environ.get("PHI4MM_WORKER_LOGS", "") not in ("", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=worker_logs)
    else:
        # a few logical CPUs more than cores, so the CPU stages and the model actors of a small machine
        # can be scheduled side by side (they mostly wait on each other)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=worker_logs,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}})
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("PHI4MM_PROGRESS", ""))


def run_job(config: JobConfig) -> dict:
    from actors.model_source import resolve_model
    from pipeline.graph import build_dataset
    from pipeline.read import read_manifest
    from pipeline.storage import StorageOptions, pyarrow_filesystem
    from pipeline.write import read_results, run_record, write_results, write_run_record
    from schemas.manifest import passthrough_columns

    started = datetime.now(timezone.utc)
    storage = StorageOptions(endpoint_url=config.s3_endpoint)
    if storage.endpoint_url and not config.s3_endpoint:  # from the driver's environment: ship it to workers
        config = config.model_copy(update={"s3_endpoint": storage.endpoint_url})
    manifest = read_manifest(config.input, storage, suffixes=config.manifest_suffixes,
                             modified_since=config.modified_since)
    # the driver only checks the processor loads (a wrong --model fails here, before any GPU starts)
    model_dir = resolve_model(config.model.source, revision=config.model.resolved_revision(),
                              cache_dir=config.model.cache_dir, options=storage, processor_only=True)
    _check_processor(model_dir)
    passthrough_schema = manifest.select(passthrough_columns(manifest.schema)).schema
    if config.resume:
        from pipeline.resume import rows_to_redo

        manifest = rows_to_redo(manifest, config, storage)
        log.info("resume: %d input rows left to process", manifest.num_rows)

    init_ray()
    import ray

    out_fs, out_path = pyarrow_filesystem(config.output, storage)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    stages: list[dict] = []
    if manifest.num_rows:
        ds = build_dataset(config, manifest, config.model.source,
                           config.model.resolved_revision(), passthrough_schema)
        stages = write_results(ds, out_path, config.run_id, filesystem=out_fs)
    if config.resume:
        from pipeline.resume import drop_superseded

        drop_superseded(out_path, out_fs, config.run_id)
    rows = read_results(out_path, out_fs, run_id=config.run_id) if manifest.num_rows else _empty()
    record = run_record(config.model_dump(mode="json"), rows, started, datetime.now(timezone.utc), gpus)
    record["stages"] = stages
    write_run_record(config.output, record, _fsspec(config.output, storage))
    return record


def _check_processor(model_dir: str) -> None:
    from pipeline.model_inputs import load_processor

    try:
        load_processor(model_dir)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"--model {model_dir}: cannot load the processor/tokenizer ({exc})") from exc


def _fsspec(uri: str, storage):
    from pipeline.storage import fsspec_filesystem

    return fsspec_filesystem(uri, storage)[0]


def _empty():

    from schemas.results import RESULT_SCHEMA

    return RESULT_SCHEMA.empty_table()
