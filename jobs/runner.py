"""Run one job: validate everything on the driver, then execute the Ray Data graph and record the run.

Order matters: the manifest and the model's processor are checked before Ray starts any actor, so a bad
manifest, config or model path fails in seconds with a clear message, never after GPUs were allocated.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone

from jobs.dataset_write import write_results
from jobs.graph import build_dataset, gpu_stages_of, plan_cluster, stages_of
from jobs.progress import ProgressReporter
from jobs.run_record import run_record
from jobs.settings import Settings, from_environment
from jobs.specs import job_spec
from jobs.stall import JobStalled, stall_message, stall_reason
from jobs.table_output import commit_run, prepare_run_table, table_passthrough
from pipeline.context import RunContext, run_storage
from pipeline.core.errors import OutputError
from pipeline.core.run_state import start_run_state
from pipeline.io.manifest import read_manifest
from pipeline.io.output import io_cause, probe_output, read_results, write_run_record
from pipeline.io.resume import drop_superseded, remove_replaced, rows_to_redo
from pipeline.io.storage import StorageOptions, is_local, locate, remove_directory_markers
from pipeline.model.inputs import load_processor  # imports transformers only when called
from pipeline.model.source import describe_model
from schemas.config import JobConfig
from schemas.manifest import ManifestError, passthrough_columns, unknown_target_languages
from schemas.results import RESULT_SCHEMA
from schemas.structured import typed_fields

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init_ray(settings: Settings) -> None:
    """Join the cluster in RAY_ADDRESS, else start a local one-machine Ray (the embedded default)."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        # worker logs stay in Ray's log folder unless asked for (PHI4MM_WORKER_LOGS=1)
        if settings.ray_address:
            ray.init(address=settings.ray_address, log_to_driver=settings.worker_logs)
        else:
            # a few logical CPUs more than cores, so the CPU stages and the model actors of a small
            # machine can be scheduled side by side (they mostly wait on each other)
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=settings.worker_logs, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                         p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)}})
    # Ray Data's bars on a terminal; in `ray job logs` the progress lines (jobs/progress.py) do that job
    DataContext.get_current().enable_progress_bars = settings.progress and sys.stderr.isatty()


def with_driver_settings(config: JobConfig, storage: StorageOptions, settings: Settings) -> JobConfig:
    """What the driver's environment decides, written into the config that travels to every worker."""
    update = {}
    if storage.endpoint_url and not config.s3_endpoint:  # AWS_ENDPOINT_URL_S3 and friends
        update["s3_endpoint"] = storage.endpoint_url
    # PHI4MM_CACHE: where s3:// copies and conversions of main-branch checkpoints go; a hub id keeps
    # the hub's own cache (HF_HOME), which `cache_dir` would move
    source = config.model.source
    if settings.model_cache and not config.model.cache_dir and (not is_local(source) or os.path.isdir(source)):
        update["model"] = config.model.model_copy(update={"cache_dir": settings.model_cache})
    return config.model_copy(update=update) if update else config


def run_job(config: JobConfig, settings: Settings | None = None) -> dict:
    settings = settings or from_environment()
    started = datetime.now(timezone.utc)
    config = with_driver_settings(config, StorageOptions(endpoint_url=config.s3_endpoint), settings)
    # the run's storage, resolved once: every read below, and every worker's, goes through these options
    storage = run_storage(config)
    spec = job_spec(config)
    manifest = read_manifest(config.input, storage, suffixes=config.manifest_suffixes,
                             modified_since=config.modified_since, **spec.manifest_rules)
    # on the console whatever the log level: the first thing to compare with what the manifest should hold
    print(f"phi4mm: manifest {config.input}: {manifest.num_rows} rows read", file=sys.stderr, flush=True)
    # the checkpoint is checked where it lies (config, adapters, safetensors headers: a few MB read) and
    # refused here, before Ray starts, when the pipeline cannot use it; what it is goes into the run
    # record and every row
    provenance = describe_model(config.model.source, revision=config.model.resolved_revision(),
                                cache_dir=config.model.cache_dir, options=storage,
                                need_weights=not config.benchmark.random_weights)
    # the driver only checks the processor loads (a wrong --model fails here, before any GPU starts)
    _check_processor(RunContext.for_run(config, storage).model_dir(processor_only=True))
    _report_bad_values(manifest, config)
    # a typed column takes the place of a pass-through column of its name only where that column holds
    # nothing (a known column such as `uri` that validate_manifest added, null, to a manifest without it)
    held = {c for c in passthrough_columns(manifest.schema) if manifest[c].null_count < manifest.num_rows}
    clash = sorted({f.name for f in typed_fields(config.output_schema)} & held)
    if clash:
        raise ManifestError(f"manifest column(s) {clash} have the names of --schema properties (typed result "
                            "columns); rename the columns or the properties")
    config = spec.plan(config, manifest)
    # the output, located once and probed before Ray starts: an unwritable one fails now, not after the GPU work
    with _output_errors(config.output):
        output = locate(config.output, storage)
        probe_output(output, config.run_id)
        remove_directory_markers(output)
    passthrough_schema = table_passthrough(config, manifest.select(passthrough_columns(manifest.schema)).schema)
    # --table: checked (or created) now, before Ray: a changed column's type fails here, naming it
    table = prepare_run_table(config, storage, output, passthrough_schema)
    if config.resume:
        manifest = rows_to_redo(manifest, config, output)
        log.info("resume: %d input rows left to process", manifest.num_rows)
        if not manifest.num_rows:  # said on the console: the run record follows, Ray is not started
            print(f"phi4mm: resume: every row of {config.input} is already done in {config.output}; "
                  "nothing to run", file=sys.stderr, flush=True)

    stages: list[dict] = []
    counters: dict = {}
    gpus = 0.0
    if manifest.num_rows:  # a resume with nothing left to do starts no Ray (seconds saved, no GPU asked)
        init_ray(settings)
        import ray

        cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        gpus = float(ray.cluster_resources().get("GPU", 0))
        name, run_state = start_run_state(config.run_id)
        context = RunContext.for_run(config, storage, provenance=provenance, passthrough_schema=passthrough_schema,
                                     run_state=name)
        cluster = plan_cluster(config, cpus, gpus, manifest.num_rows, settings.autoscaling)
        progress = ProgressReporter(run_state, manifest.num_rows, settings.progress_every_s).start() \
            if settings.progress else None
        try:
            stages = _write_or_stall(config, build_dataset(config, manifest, cluster, context), output, cluster,
                                     run_state)
            counters = ray.get(run_state.snapshot.remote())
        finally:
            if progress is not None:
                progress.stop()
            ray.kill(run_state)
    with _output_errors(config.output):
        if config.resume:  # with a table, the replaced files stay until its commit has swapped them
            drop_superseded(output.path, output.fs, config.run_id, keep_replaced=table is not None)
        rows = read_results(output.path, output.fs, run_id=config.run_id) if manifest.num_rows \
            else RESULT_SCHEMA.empty_table()
        record = run_record(config.model_dump(mode="json"), rows, started, datetime.now(timezone.utc), gpus,
                            counters, model=provenance)
        record["stages"] = stages
        if table is not None:  # one snapshot with every live file of the output; retried: adds nothing
            record["table"] = commit_run(table, config, output)
        if config.resume or table is not None:
            remove_replaced(output.path, output.fs)
        write_run_record(output, record)
        remove_directory_markers(output)  # what deletes on S3 re-created (resume)
    return record


def _write_or_stall(config: JobConfig, ds, output, cluster, run_state) -> list[dict]:
    """write_results, under Ray Data's no-progress guard set to `resources.stall_timeout_s` (None: off):
    a run that stops moving ends as JobStalled, naming the stage that holds the work (jobs/stall.py)."""
    from ray.data.exceptions import ExecutionTimeoutError

    stall_s = config.resources.stall_timeout_s
    ds.context.execution_no_progress_timeout_s = stall_s if stall_s else -1
    try:
        return write_results(ds, output, config.run_id, write_delay_s=config.benchmark.write_delay_s)
    except ExecutionTimeoutError as exc:
        log.debug("Ray Data stopped the run: %s", exc)
        try:
            reason = _where_it_waits(config, cluster, run_state)
        except Exception as why:  # noqa: BLE001 - the stop matters more than its explanation
            reason = f"where it waits could not be told ({type(why).__name__}: {why})"
        raise JobStalled(stall_message(stall_s, reason)) from None


def _where_it_waits(config: JobConfig, cluster, run_state) -> str:
    """jobs/stall.py's stall_reason for this run's graph, counters, journal and nodes."""
    import ray

    stages = stages_of(config)
    resources = {s.stage.stage_name: s.resources(config, cluster) for s in stages}
    counters = ray.get(run_state.snapshot.remote(), timeout=30)
    in_flight = {s.stage.stage_name: ray.get(run_state.calls_in_flight.remote(s.stage.stage_name), timeout=30)
                 for s in gpu_stages_of(config)}
    return stall_reason([s.stage.stage_name for s in stages], resources, counters, in_flight, ray.nodes())


def _report_bad_values(manifest, config: JobConfig) -> None:
    """Bad values found on the driver that cost one output of their row each (an error row naming the
    value, made by the first stage), not the run: said once, here, before Ray starts."""
    if "translate" not in config.tasks:
        return
    for code, ids in unknown_target_languages(manifest).items():
        shown = ", ".join(ids[:10]) + (f" ... and {len(ids) - 10} more" if len(ids) > 10 else "")
        log.warning("target_language %r is not a known language code: the translation of %d row(s) "
                    "(ids %s) will be an error row; their other outputs are made as usual", code, len(ids), shown)


@contextmanager
def _output_errors(uri: str):
    """I/O failures on the output (after the write itself) as one OutputError naming it."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified: only I/O errors are turned into OutputError
        cause = io_cause(exc)
        if cause is None:
            raise
        raise OutputError(f"output {uri}: {type(cause).__name__}: {cause}") from exc


# the check in a process of its own: loading the processor imports torch and transformers, ~0.9 GB that
# the driver would otherwise hold for the whole run (measured on the 2-core machine) and never use again
_PROCESSOR_CHECK = """
import sys
from pipeline.model.inputs import load_processor  # imports transformers only when called
try:
    load_processor(sys.argv[1])
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__, file=sys.stderr)
    sys.exit(3)
"""
PROCESSOR_CHECK_TIMEOUT_S = 300


def _check_processor(model_dir: str) -> None:
    """Refuse a model whose processor (tokenizer, image processor, feature extractor) does not load.

    In this process when transformers is loaded here already (nothing is saved by a child then: a
    test session, or a notebook), else in a child process that exits once it has answered."""
    if "transformers" in sys.modules:
        try:
            load_processor(model_dir)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"--model {model_dir}: cannot load the processor/tokenizer ({exc})") from exc
        return
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p))
    try:
        done = subprocess.run([sys.executable, "-c", _PROCESSOR_CHECK, model_dir], env=env, capture_output=True,
                              text=True, timeout=PROCESSOR_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"--model {model_dir}: loading the processor/tokenizer took over "
                         f"{PROCESSOR_CHECK_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ValueError(f"--model {model_dir}: cannot load the processor/tokenizer "
                         f"({lines[-1] if lines else f'exit code {done.returncode}'})")
