"""CPU stage of `phi4mm prompt --schema` and `--extract`: each answer parsed and validated, its scalar
properties typed.

Generation was constrained to the schema (actors/grammar.py), so an answer normally parses; one that does
not (its token budget ran out mid-object), that the schema still refuses (what a grammar cannot
express, e.g. `format` or `multipleOf`), or that holds a value its typed column cannot hold as `json`
holds it (schemas/structured.py: typed_values) becomes an error row naming the row, the property and
the value, never an `ok` row with bad JSON and never a failed job: whatever goes wrong with one answer
costs that row only.
"""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.context import RunContext
from pipeline.core.stage import Cluster, Stage, StageResources
from schemas.config import JobConfig
from schemas.structured import TYPED_PREFIX, answer_json, typed_fields, typed_values
from schemas.work_rows import set_column


class StructuredAnswers(Stage):
    """Fills `json` and the typed columns (`schema:<property>`) of the ok rows of the run's structured task
    (`prompt` with --schema, `extract`), or their `error`; other rows pass through with nulls there."""

    reads = ("id", "task", "error", "text")
    writes = ("json", "error")  # and TYPED_PREFIX + each typed property

    def __init__(self, context: RunContext):
        super().__init__(context)
        from jsonschema.validators import validator_for

        schema = self.config.output_schema
        self.task = self.config.structured_task
        self.validator = validator_for(schema)(schema)
        self.fields = typed_fields(schema)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        return StageResources(batch_size=None, num_cpus=0.25)  # one actor, whole blocks: parsing only

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(list(self.reads)).to_pylist()
        answers, errors = [], []
        typed = {f.name: [] for f in self.fields}
        for row in rows:
            answer, text, values, error = None, None, {}, row["error"]
            if row["task"] == self.task and error is None:
                try:
                    answer, text, values, error = self.answer(row["id"], row["text"])
                except Exception as exc:  # noqa: BLE001 - one answer's failure costs its row, never the job
                    error = f"id {row['id']}: the answer could not be read ({type(exc).__name__}: {exc})"
                    answer = None
            for f in self.fields:
                typed[f.name].append(values.get(f.name))
            answers.append(text)
            errors.append(error)
            self.counters["schema_valid" if answer is not None else "schema_invalid"] += row["task"] == self.task
        batch = set_column(batch, "error", errors)
        batch = batch.append_column(pa.field("json", pa.string()), pa.array(answers, pa.string()))
        for f in self.fields:
            batch = batch.append_column(f.with_name(TYPED_PREFIX + f.name), pa.array(typed[f.name], f.type))
        return batch

    def answer(self, row_id: str, text: str | None) -> tuple[object, str | None, dict, str | None]:
        """(answer, its `json` text, its typed values, None) or (None, None, {}, why it is not one)."""
        answer, error = self.check(row_id, text)
        if error is not None:
            return None, None, {}, error
        values, problems = typed_values(answer, self.fields)
        written, why = answer_json(answer)
        if why:
            problems.append(why)
        if problems:
            return None, None, {}, (f"id {row_id}: the answer is valid under the schema, but " + "; ".join(problems)
                                    + ", so it is not written as an ok row")
        return answer, written, values, None

    def check(self, row_id: str, text: str | None) -> tuple[object, str | None]:
        """(the parsed answer, None) or (None, why it is not an answer under the schema)."""
        try:
            answer = json.loads(text or "")
        except RecursionError:
            return None, f"id {row_id}: the answer nests too deeply to be read as JSON"
        except ValueError as exc:
            return None, f"id {row_id}: the answer is not JSON ({exc}); raise --max-new-tokens if it was cut off"
        error = next(iter(sorted(self.validator.iter_errors(answer), key=lambda e: list(e.path))), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            return None, f"id {row_id}: the answer does not validate against the schema: {error.message}" + \
                (f" (at {where})" if where else "")
        return answer, None
