"""What every stage of a run is built with: the run's `RunContext`, made once on the driver and shipped
to every worker (Ray pickles it; `JobConfig` and `StorageOptions` are plain pydantic models).

- `config`: the job's whole config, as the driver settled it (environment read once, prompt pools planned);
- `storage`: the one `StorageOptions` of the run (endpoint, the `inputs` timeouts): the manifest, every
  input's fetch, the model copy on each node, resume and the run record all read through it;
- `model`: the checkpoint reference (source, resolved revision, cache folder, provenance);
- `passthrough_schema`: the manifest's own columns, carried to every result row;
- `run_state`: the name of the run's RunState actor (counters, journal, parts); None without a run.

The output's `Location` stays on the driver (jobs/runner.py): no worker writes outside Ray Data's write.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.io.storage import StorageOptions
from pipeline.model.source import ModelRef
from schemas.config import JobConfig


def run_storage(config: JobConfig) -> StorageOptions:
    """The run's storage options: the endpoint (the config's, else the environment's, read here) and the
    `inputs` timeouts, used by every read of the run."""
    return StorageOptions(endpoint_url=config.s3_endpoint, connect_timeout_s=config.inputs.connect_timeout_s,
                          read_timeout_s=config.inputs.read_timeout_s)


@dataclass(frozen=True)
class RunContext:
    config: JobConfig
    storage: StorageOptions
    model: ModelRef
    passthrough_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    run_state: str | None = None

    @classmethod
    def for_run(cls, config: JobConfig, storage: StorageOptions | None = None, *, provenance: dict | None = None,
                passthrough_schema: pa.Schema | None = None, run_state: str | None = None) -> "RunContext":
        return cls(config, storage or run_storage(config), ModelRef.of(config, provenance),
                   passthrough_schema if passthrough_schema is not None else pa.schema([]), run_state)

    @classmethod
    def for_tests(cls, config: JobConfig, passthrough_schema: pa.Schema | None = None) -> "RunContext":
        """A context without a run (no RunState actor: counters stay on the stage object)."""
        return cls.for_run(config, passthrough_schema=passthrough_schema)

    def model_dir(self, processor_only: bool = False) -> str:
        """The checkpoint's local folder on this node (copied once per node from s3://, through `storage`)."""
        return self.model.local_dir(self.storage, processor_only=processor_only)
