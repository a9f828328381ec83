"""CPU stage (the "features pool"): a long recording's chunks, cut by PrepareAudio, get their model inputs
here, in parallel; it counts them as `chunks_built`.

Feature extraction is ~80 % of preparing audio (on this project's 2-core machine a 20-minute recording
took 0.6 s to decode, 2 s of VAD and 7.9 s of features). A call is one chunk and is prepared whole by
one PrepareAudio worker; a long recording is one input but hundreds of chunks, so PrepareAudio only
decodes and cuts it, its parts (pipeline/stages/regroup_parts.py) carry the chunks' samples, and this pool builds the
features block by block (a part each) on as many workers as the CPUs allow: an hour is prepared by all of them.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.context import RunContext
from pipeline.core.stage import Cluster, Stage, StageResources, one_thread_per_worker
from pipeline.media.audio import SAMPLE_RATE
from pipeline.model.inputs import SAMPLES, InputBuilder
from pipeline.model.prompts import task_instruction
from schemas.config import JobConfig
from schemas.work_rows import decode_item, encode_item, set_column

class BuildChunkFeatures(Stage):
    """Chunks that carry samples (BatchKey kind "samples") -> their model inputs; other rows pass."""

    reads = ("task", "target_language", "error", "chunk_batch_key", "chunk_inputs")
    writes = ("chunk_batch_key", "chunk_inputs", "chunk_input_tokens")
    cpu_share = "spare"

    def __init__(self, context: RunContext):
        super().__init__(context)
        one_thread_per_worker()
        # loaded on first use: only recordings longer than a chunk get their features here, and most
        # runs of calls have none
        self.builder = InputBuilder(context.model_dir(processor_only=True), self.config.system_prompt,
                                    audio_bucket_s=self.config.audio.batch_bucket_s, load_now=False)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster, start_whole: bool = False) -> StageResources:
        """Whole blocks (PrepareAudio yields each part of a long recording as a block of its own, and the
        dataset's block size keeps them so: `dataset_block_bytes`), so the parts spread over the
        workers and a block of calls costs one call, not one per row. The pool: the CPUs the decoding
        pool leaves (`cluster.prepare_workers`; jobs/graph.py counts this pool's first worker as
        reserved). `start_whole` (the meetings job, whose every input is long and whose features are
        ~80 % of the CPU work): all of them from the start (a pool that grows from one worker trailed
        the parts: 8 one-hour meetings' features took 32 s on a 16-core host); otherwise (transcribe,
        where most inputs are calls prepared whole by PrepareAudio and only the long ones come here) it
        grows from one worker as parts come."""
        high = max(1, int(cluster.cpus - cluster.reserved_cpus - cluster.prepare_workers) + 1)
        low = high if start_whole else 1
        return StageResources(batch_size=None, pool_size=(low, high), num_cpus=1.0)

    @classmethod
    def dataset_block_bytes(cls, config: JobConfig) -> int:
        """Half a full part's samples (`audio.part_chunks` chunks of `max_chunk_s` at 16 kHz float32: 15 MB
        at the defaults).

        Ray Data merges the blocks a stage yields until they pass its target block size (128 MiB by
        default), so the parts PrepareAudio yields one by one reached this pool four to a block, in few
        calls on few workers (measured: 60 parts of 8 one-hour meetings in 16 calls). Under half a part,
        every part leaves as a block of its own and the features pool takes one part per call; blocks of
        short calls are cut to ~15 MB (a dozen calls' features), which the speech pool's calls gather again."""
        return config.audio.part_chunks * int(config.audio.max_chunk_s * SAMPLE_RATE) * 4 // 2

    def process(self, batch: pa.Table) -> pa.Table:
        keys = batch["chunk_batch_key"].to_pylist()
        todo = [i for i, row_keys in enumerate(keys) if any(k["kind"] == SAMPLES for k in row_keys)]
        if not todo:
            return batch
        inputs = batch["chunk_inputs"].to_pylist()
        tokens = batch["chunk_input_tokens"].to_pylist()
        tasks, targets = batch["task"].to_pylist(), batch["target_language"].to_pylist()
        for i in todo:
            instruction = task_instruction(tasks[i], targets[i])
            for j, key in enumerate(keys[i]):
                if key["kind"] != SAMPLES:
                    continue
                built = self.builder.audio(decode_item(inputs[i][j])["samples"], instruction)
                keys[i][j], inputs[i][j], tokens[i][j] = built.batch_key._asdict(), encode_item(built.inputs), \
                    built.input_tokens
                self.counters["chunks_built"] += 1
        for name, values in (("chunk_batch_key", keys), ("chunk_inputs", inputs), ("chunk_input_tokens", tokens)):
            batch = set_column(batch, name, values)
        return batch
