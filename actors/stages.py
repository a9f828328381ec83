"""GPU stages: Ray Data actor classes that each hold one model replica for one modality.

A stage receives work items (pipeline/work_items.py) as a pyarrow Table, generates for the rows of its
modality that carry no error, and passes every other row through untouched, so no row is ever dropped.
A batch that fails is retried one row at a time; a row that still fails becomes an error row.
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
        options = {"num_gpus": gpus, "compute": pool, "batch_size": config.batching.rows_per_call}
        if gpus > 0 and res.accelerator_type:
            options["accelerator_type"] = res.accelerator_type
        return options

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.model_inputs import decode_item

        mine = pc.and_(pc.equal(batch["modality"], self.modality), pc.is_null(batch["error"])).to_pylist()
        rows = [i for i, m in enumerate(mine) if m]
        n = batch.num_rows
        text: list[str | None] = batch["text"].to_pylist()
        out_tokens: list[int | None] = batch["output_tokens"].to_pylist()
        latency: list[float | None] = batch["latency_s"].to_pylist()
        error: list[str | None] = batch["error"].to_pylist()
        if rows:
            blobs = batch["model_inputs"].to_pylist()
            buckets = batch["bucket"].to_pylist()
            tasks = batch["task"].to_pylist()
            ids = batch["id"].to_pylist()
            limits = self.config.generation.max_new_tokens
            gens = self.engine.generate([decode_item(blobs[i]) for i in rows], [buckets[i] for i in rows],
                                        [limits.get(tasks[i], 256) for i in rows],
                                        self.config.generation.min_new_tokens)
            for i, gen in zip(rows, gens):
                if isinstance(gen, Exception):
                    log.warning("generation failed for %s: %s", ids[i], gen)
                    error[i] = f"{ids[i]}: generation failed ({type(gen).__name__}: {gen})"
                else:
                    text[i], out_tokens[i], latency[i] = gen.text, len(gen.token_ids), gen.latency_s
        batch = batch.drop_columns(["model_inputs"]).append_column("model_inputs", pa.nulls(n, pa.binary()))
        for name, values, typ in (("text", text, pa.string()), ("output_tokens", out_tokens, pa.int64()),
                                  ("latency_s", latency, pa.float64()), ("error", error, pa.string())):
            batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, typ))
        return batch


class SpeechStage(ModelStage):
    modality = "speech"


class VisionStage(ModelStage):
    modality = "vision"


class TextStage(ModelStage):
    modality = "text"


STAGE_FOR_MODALITY = {"speech": SpeechStage, "vision": VisionStage, "text": TextStage}
