"""Where this node finds the checkpoint: resolved once per node by whichever stage needs it first."""
from __future__ import annotations

from schemas.config import JobConfig


def local_model_dir(config: JobConfig, processor_only: bool = False) -> str:
    """A local folder holding the checkpoint (hub snapshot, s3:// copy, or the folder given).

    CPU stages ask for `processor_only`: the tokenizer and processor files, not the ~11 GB of weights.
    """
    from actors.model_source import resolve_model
    from pipeline.storage import StorageOptions

    return resolve_model(config.model.source, revision=config.model.resolved_revision(),
                         cache_dir=config.model.cache_dir, options=StorageOptions(endpoint_url=config.s3_endpoint),
                         processor_only=processor_only)
