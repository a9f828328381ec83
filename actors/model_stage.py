"""GPU stages: Ray Data actor classes that each hold one model replica for one modality (the text pool,
which also combines a long transcript's section answers, is actors/text_stage.py).

A stage receives work rows (schemas/work_rows.py) as a pyarrow Table, generates for the chunks of the
rows of its modality that carry no error, and passes every other row through untouched, so no row is
ever dropped. A batch that fails is retried one item at a time; an item that still fails marks its
chunk (and so its row) as failed, with the reason.
"""
from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.compute as pc

from actors.warm_up import warm_up_replica
from pipeline.context import RunContext
from pipeline.core.stage import Cluster, Stage, StageResources
from pipeline.model.inputs import max_page_feature_bytes
from schemas.config import JobConfig
from schemas.tasks import STRUCTURED_TASKS
from schemas.work_rows import BatchKey, decode_item, set_column

log = logging.getLogger(__name__)


class ModelStage(Stage):
    """Fills `chunk_text`, `chunk_output_tokens`, `chunk_output_ids`, `chunk_latency_s` (or `chunk_error`)
    of its modality's rows, and empties their `chunk_inputs` (the features are spent: they are not carried on)."""

    modality: str = ""
    reads = ("id", "task", "target_language", "page", "part", "modality", "error", "chunk_batch_key",
             "chunk_inputs", "chunk_text")
    writes = ("chunk_text", "chunk_output_tokens", "chunk_output_ids", "chunk_latency_s", "chunk_error",
              "chunk_inputs")

    def __init__(self, context: RunContext):
        # imported here, on the replica: the driver builds the graph from this class without loading
        # torch and transformers (~0.9 GB resident, 4.6 s of imports on the 2-core machine)
        from actors.engine import Phi4MMEngine

        super().__init__(context)
        self.engine = Phi4MMEngine(context.model_dir(), self.modality, self.config.model,
                                   self.config.batching, random_weights=self.config.benchmark.random_weights)
        self.answer_grammar = answer_grammar(self.config)
        # a GPU replica (one per GPU, not per core) keeps its heap for the next call, which would otherwise
        # fault the pages of its host-side buffers in again
        self.release_heap = self.engine.device.type != "cuda"
        warm_up_replica(self.engine, self.config, self.modality, self.answer_grammar,  # compile, capture, cache
                        call_items=call_rows(self.config, self.modality, on_gpu=self.engine.device.type == "cuda"))

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster, rows_per_call: int | None = None) -> StageResources:
        """GPUs per replica, the pool size range, and rows per call (`rows_per_call`: a job's own size,
        e.g. the meetings job's parts; else `rows_per_call()` below).

        On an autoscaling cluster the GPU nodes may not exist yet when the job starts, so the request
        comes from the config, not from the GPUs present; the pool grows as nodes join.
        """
        res = config.resources
        gpus = res.gpus_per_replica if (cluster.gpus > 0 or cluster.autoscaling) else 0.0
        if gpus > 0:
            fit = int(cluster.gpus / gpus)
            high = res.max_replicas or (max(fit, res.autoscale_max_replicas) if cluster.autoscaling
                                        else max(fit, 1))
        else:
            high = res.max_replicas or 1
        low = min(res.min_replicas, high)
        rows = rows_per_call or call_rows(config, cls.modality, on_gpu=gpus > 0)
        return StageResources(batch_size=rows, pool_size=(low, high),
                              num_gpus=gpus,
                              accelerator_type=res.accelerator_type if gpus > 0 else None)

    def process(self, batch: pa.Table) -> pa.Table:
        mine = pc.and_(pc.equal(batch["modality"], self.modality), pc.is_null(batch["error"])).to_pylist()
        rows = [i for i, m in enumerate(mine) if m]
        if not rows:
            return batch
        cols = {name: batch[name].to_pylist() for name in (
            "id", "task", "target_language", "page", "part", "chunk_batch_key", "chunk_text",
            "chunk_output_tokens", "chunk_output_ids", "chunk_latency_s", "chunk_error")}
        cols["chunk_inputs"] = chunk_inputs_of(batch, set(rows))
        key = {i: (cols["id"][i], cols["task"][i], cols["target_language"][i], cols["page"][i], cols["part"][i])
               for i in rows}
        # rows that were in a call whose worker died (a retried batch): one at a time from here on, so
        # the one that kills its worker is found and the others finish (pipeline/core/run_state.py: RunState)
        died = self.journal("deaths", [key[i] for i in rows]) or {}
        groups = [[i] for i in rows] if died else [rows]
        if died:
            log.warning("%s: %d row(s) of this batch were in a call whose worker died; running its %d rows "
                        "one at a time", self.stage_name, len(died), len(rows))
        limit = self.config.resources.poison_after_deaths
        for group in groups:
            _, alone = died.get(key[group[0]], (0, 0)) if len(group) == 1 else (0, 0)
            if alone >= limit:
                i = group[0]
                reason = (f"{cols['id'][i]}: killed its worker {alone} time{'s' if alone > 1 else ''} (the process "
                          f"died while generating for it alone), not run again")
                cols["chunk_error"][i] = [e or (reason if t is None else None)
                                          for e, t in zip(cols["chunk_error"][i], cols["chunk_text"][i])]
                self.counters["poison_rows"] += 1
                log.error("%s", reason)
                continue
            self.journal("begin", [key[i] for i in group])
            try:
                self.generate_rows(group, cols)
            finally:  # not reached when the process dies: that is what the journal is for
                self.journal("end", [key[i] for i in group])
        for i in rows:
            cols["chunk_inputs"][i] = [None] * len(cols["chunk_inputs"][i])
        for name in ModelStage.writes:
            batch = set_column(batch, name, cols[name])
        return batch

    def generate_rows(self, rows: list[int], cols: dict) -> None:
        """Generate every chunk of `rows` still without text, in one engine call; fill `cols` in place."""
        ids, tasks, inputs, text = cols["id"], cols["task"], cols["chunk_inputs"], cols["chunk_text"]
        if self.config.benchmark.exit_worker_on_ids and \
                {ids[i] for i in rows} & set(self.config.benchmark.exit_worker_on_ids):
            os._exit(1)  # test-only fault injection (BenchmarkConfig.exit_worker_on_ids)
        limits = self.config.generation.max_new_tokens
        todo = [(i, j) for i in rows for j in range(len(inputs[i])) if text[i][j] is None]
        keys = [BatchKey(**cols["chunk_batch_key"][i][j]) for i, j in todo]
        max_new = [limits.get(tasks[i], 256) for i, _ in todo]
        min_new = self.config.benchmark.min_new_tokens
        per_30s = self.config.benchmark.new_tokens_per_30s
        if per_30s:  # benchmarks: tokens in proportion to the audio (its bucket: one budget per batch key)
            max_new = [max(1, -(-per_30s * k.size // 3000)) if k.kind == "audio" else m for k, m in zip(keys, max_new)]
            min_new = max(max_new, default=0)
        grammars = [self.answer_grammar if constrained(tasks[i], len(inputs[i])) else None for i, _ in todo] \
            if self.answer_grammar else None
        gens = self.engine.generate([decode_item(inputs[i][j]) for i, j in todo], keys, max_new, min_new, grammars)
        for (i, j), gen in zip(todo, gens):
            if isinstance(gen, Exception):
                log.warning("generation failed for %s: %s", ids[i], gen)
                cols["chunk_error"][i][j] = f"{ids[i]}: generation failed ({type(gen).__name__}: {gen})"
                self.counters["generation_errors"] += 1
            else:
                text[i][j] = gen.text
                cols["chunk_output_tokens"][i][j], cols["chunk_latency_s"][i][j] = len(gen.token_ids), gen.latency_s
                cols["chunk_output_ids"][i][j] = gen.token_ids
                self.counters["output_tokens"] += len(gen.token_ids)
        self.counters["items"] += len(todo)
        for name, value in self.engine.stats.items():  # cumulative: pushed as differences
            self.counters[f"engine_{name}"] = value


def chunk_inputs_of(batch: pa.Table, mine: set[int]) -> list[list]:
    """Each row's chunk inputs: for the rows in `mine` (this stage generates for them), views into the
    block's own buffers, decoded only when the call runs, so a call's features are not copied into
    Python bytes first (a vision call of 48 Letter pages carries 1.5 GB of them); for the other rows,
    which pass through, their bytes."""
    out: list[list] = []
    for chunk in batch["chunk_inputs"].chunks:
        for k in range(len(chunk)):
            row = chunk[k]
            out.append([v.as_buffer() for v in row.values] if len(out) in mine and row.is_valid else row.as_py())
    return out


def answer_grammar(config: JobConfig) -> str | None:
    """The llguidance grammar of the run's JSON Schema (the prompt job's --schema, or --extract; bounded:
    schemas/structured.py), or None."""
    schema = config.output_schema
    if schema is None:
        return None
    from actors.grammar import json_schema_grammar
    from schemas.structured import generation_schema

    return json_schema_grammar(generation_schema(schema, *config.output_bounds))


def constrained(task: str, chunks: int) -> bool:
    """Whether a chunk of a row of `task` (with `chunks` chunks) is generated under the answer grammar:
    prompt answers; an extract row's one chunk (its extraction prompt over the whole transcript). The
    several chunks of a long transcript's extract row are notes on its sections, answered freely; the
    answer is extracted from them after (TextStage)."""
    return task in STRUCTURED_TASKS and (task == "prompt" or chunks == 1)


class SpeechStage(ModelStage):
    modality = "speech"


class VisionStage(ModelStage):
    modality = "vision"


def call_rows(config: JobConfig, modality: str, on_gpu: bool = True) -> int:
    """Work rows per GPU call of a modality's pool, sized by what the rows carry (a job may set its own:
    the meetings job's spec gives `meeting_rows_per_call`, its rows being parts of up to 16 chunks).

    Speech: `rows_per_call` (512 rows of 30 s chunks, ~1 MB of features each). Vision: as many pages as
    the call's features budget `vision_call_bytes` holds at the largest a page can be (schemas/config.py),
    so a call of full-page scans stays within it whatever the pages; on a CPU replica at most
    `cpu_vision_rows_per_call`. Text prompts carry token ids only.
    """
    batching = config.batching
    if modality == "vision":
        fit = batching.vision_call_bytes // max_page_feature_bytes(config.image.dynamic_hd)
        if not on_gpu:
            fit = min(fit, batching.cpu_vision_rows_per_call)
        return max(1, min(batching.rows_per_call, fit))
    return batching.rows_per_call


def call_bytes_bound(config: JobConfig, modality: str, rows: int) -> int | None:
    """The most prepared features a call of `rows` rows of the modality carries (None: not bounded here)."""
    if modality == "vision":
        return rows * max_page_feature_bytes(config.image.dynamic_hd)
    return None
