"""GPU stages: Ray Data actor classes that each hold one model replica for one modality.

A stage receives work rows (pipeline/work_items.py) as a pyarrow Table, generates for the chunks of the
rows of its modality that carry no error, and passes every other row through untouched, so no row is
ever dropped. A batch that fails is retried one item at a time; an item that still fails marks its
chunk (and so its row) as failed, with the reason.
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import JobConfig

log = logging.getLogger(__name__)


class ModelStage:
    """`__call__(batch)` -> the batch with `text`, `output_tokens`, `latency_s` (and `error`) filled."""

    modality: str = ""

    def __init__(self, config_json: str):
        from actors.engine import Phi4MMEngine
        from actors.model_files import local_model_dir

        self.config = JobConfig.model_validate_json(config_json)
        self.engine = Phi4MMEngine(local_model_dir(self.config), self.modality, self.config.model,
                                   self.config.batching)

    @classmethod
    def ray_options(cls, config: JobConfig, cluster_gpus: float, autoscaling: bool = False) -> dict:
        """Resources declared by the stage: GPUs per replica and the pool size range.

        On an autoscaling cluster the GPU nodes may not exist yet when the job starts, so the request
        comes from the config, not from the GPUs present; the pool grows as nodes join.
        """
        res = config.resources
        gpus = res.gpus_per_replica if (cluster_gpus > 0 or autoscaling) else 0.0
        if gpus > 0:
            fit = int(cluster_gpus / gpus)
            high = res.max_replicas or (max(fit, res.autoscale_max_replicas) if autoscaling else max(fit, 1))
        else:
            high = res.max_replicas or 1
        low = min(res.min_replicas, high)
        from ray.data import ActorPoolStrategy

        pool = ActorPoolStrategy(min_size=low, max_size=high) if high > low else ActorPoolStrategy(size=high)
        # a meeting's work row carries all of its chunks (an hour: ~120 x 1 MB of features)
        rows = config.batching.rows_per_call if config.job != "meetings" else max(1, config.batching.rows_per_call // 32)
        options = {"num_gpus": gpus, "compute": pool, "batch_size": rows}
        if gpus > 0 and res.accelerator_type:
            options["accelerator_type"] = res.accelerator_type
        return options

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.model_inputs import decode_item
        from pipeline.work_items import set_column

        mine = pc.and_(pc.equal(batch["modality"], self.modality), pc.is_null(batch["error"])).to_pylist()
        rows = [i for i, m in enumerate(mine) if m]
        if not rows:
            return batch
        ids = batch["id"].to_pylist()
        tasks = batch["task"].to_pylist()
        inputs = batch["chunk_inputs"].to_pylist()
        buckets = batch["chunk_bucket"].to_pylist()
        text = batch["chunk_text"].to_pylist()
        out_tokens = batch["chunk_output_tokens"].to_pylist()
        latency = batch["chunk_latency_s"].to_pylist()
        error = batch["chunk_error"].to_pylist()
        limits = self.config.generation.max_new_tokens
        todo = [(i, j) for i in rows for j in range(len(inputs[i])) if text[i][j] is None]
        gens = self.engine.generate([decode_item(inputs[i][j]) for i, j in todo],
                                    [buckets[i][j] for i, j in todo],
                                    [limits.get(tasks[i], 256) for i, _ in todo],
                                    self.config.generation.min_new_tokens)
        for (i, j), gen in zip(todo, gens):
            if isinstance(gen, Exception):
                log.warning("generation failed for %s: %s", ids[i], gen)
                error[i][j] = f"{ids[i]}: generation failed ({type(gen).__name__}: {gen})"
            else:
                text[i][j], out_tokens[i][j], latency[i][j] = gen.text, len(gen.token_ids), gen.latency_s
        for i in rows:
            inputs[i] = [None] * len(inputs[i])  # the features are spent: do not carry them on
        for name, values in (("chunk_text", text), ("chunk_output_tokens", out_tokens),
                             ("chunk_latency_s", latency), ("chunk_error", error), ("chunk_inputs", inputs)):
            batch = set_column(batch, name, values)
        return batch


class SpeechStage(ModelStage):
    modality = "speech"


class VisionStage(ModelStage):
    modality = "vision"


class TextStage(ModelStage):
    modality = "text"


STAGE_FOR_MODALITY = {"speech": SpeechStage, "vision": VisionStage, "text": TextStage}
