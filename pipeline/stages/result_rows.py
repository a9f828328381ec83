"""The last stage: work rows cast to the result contract (schemas/results.py), with provenance."""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.context import RunContext
from pipeline.core.stage import Cluster, Stage, StageResources
from schemas.config import JobConfig
from schemas.results import RESULT_COLUMNS, STATUS_ERROR, STATUS_OK, result_schema
from schemas.structured import TYPED_PREFIX, typed_fields
from schemas.work_rows import WORK_COLUMNS, carried_name


class ResultRows(Stage):
    """Rows in work-row columns -> rows in the result contract (plus the passed-through columns)."""

    # the result columns a work row carries; status and provenance are made here
    reads = tuple(c for c in RESULT_COLUMNS if c in WORK_COLUMNS)
    writes = tuple(RESULT_COLUMNS)

    def __init__(self, context: RunContext):
        super().__init__(context)
        self.model_name = self.config.model.source
        self.model_revision = self.config.model.resolved_revision()
        provenance = context.model.provenance or {}
        self.model_layout = provenance.get("layout")
        self.model_weights_sha = provenance.get("weights_sha")
        self.typed = {f.name for f in typed_fields(self.config.output_schema)}
        self.schema = result_schema(context.passthrough_schema, typed_fields(self.config.output_schema))

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        # one actor; whole blocks as they come, never gathered: each block that reaches the writer is a
        # file (per task) at once, so what a kill can throw away is only what is still upstream. A block
        # here is what one GPU call finished (at most `rows_per_call` rows, written as soon as that call
        # returns: the unit is bounded by count and by the time of one call)
        return StageResources(batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = pc.if_else(pc.is_null(batch["error"]), STATUS_OK, STATUS_ERROR)
        now = datetime.now(timezone.utc)
        columns = {
            "status": status,
            "model": pa.array([self.model_name] * n, pa.string()),
            "model_revision": pa.array([self.model_revision] * n, pa.string()),
            "run_id": pa.array([self.config.run_id] * n, pa.string()),
            "model_layout": pa.array([self.model_layout] * n, pa.string()),
            "model_weights_sha": pa.array([self.model_weights_sha] * n, pa.string()),
            "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }
        arrays = []
        for field in self.schema:
            # a result column from the work row's own column; a pass-through column from its carried
            # copy (schemas/work_rows.py: PASSTHROUGH_PREFIX), never from a work column of the same name
            source = field.name if field.name in RESULT_COLUMNS else carried_name(field.name)
            if field.name in self.typed:  # a --schema property (pipeline/stages/structured_answers.py)
                source = TYPED_PREFIX + field.name
            if field.name in columns:
                arrays.append(columns[field.name])
            elif source in batch.column_names:
                arrays.append(batch[source].cast(field.type))
            else:
                arrays.append(pa.nulls(n, field.type))
        errors = pc.sum(pc.is_valid(batch["error"])).as_py() or 0
        self.counters.update(ok_rows=n - errors, error_rows=errors)
        # for progress: an input is done when its first row is (asr, or a document's page 1); its audio
        asr = pc.or_(pc.equal(batch["task"], "asr"), pc.equal(batch["task"], "prompt"))
        first_page = pc.and_(pc.equal(batch["task"], "ocr"), pc.equal(batch["page"], 1))
        self.counters["inputs_done"] += pc.sum(pc.or_(asr, first_page)).as_py() or 0
        self.counters["pages_done"] += pc.sum(pc.equal(batch["task"], "ocr")).as_py() or 0
        self.counters["audio_s_done"] += pc.sum(pc.filter(batch["duration_s"], asr)).as_py() or 0.0
        return pa.Table.from_arrays(arrays, schema=self.schema)
