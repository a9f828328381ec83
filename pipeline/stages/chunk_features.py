"""CPU stage: a long recording's chunks, cut by PrepareWork, get their model inputs here, in parallel.

Feature extraction is ~80 % of preparing audio (on this project's 2-core machine a 20-minute recording
took 0.6 s to decode, 2 s of VAD and 7.9 s of features). A call is one chunk and is prepared whole by
one PrepareWork worker; a long recording is one input but hundreds of chunks, so PrepareWork only
decodes and cuts it, its parts (pipeline/stages/regroup_parts.py) carry the chunks' samples, and this pool builds the
features block by block (a part each) on as many workers as the CPUs allow: an hour is prepared by all of them.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.model.inputs import InputBuilder
from pipeline.model.source import local_model_dir
from pipeline.model.prompts import task_instruction
from pipeline.core.stage import Cluster, Stage, StageContext, StageResources, one_thread_per_worker
from schemas.config import JobConfig
from schemas.work_rows import BatchKey, decode_item, encode_item, set_column

SAMPLES = "samples"  # BatchKey kind of a chunk that still holds its audio samples


def samples_item(audio: np.ndarray) -> tuple[BatchKey, bytes]:
    """A chunk's audio as it travels to BuildChunkInputs (float32 16 kHz samples, exact)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    return BatchKey(SAMPLES, int(audio.shape[0])), encode_item({"samples": audio})


class BuildChunkInputs(Stage):
    """Chunks that carry samples (BatchKey kind "samples") -> their model inputs; other rows pass."""

    reads = ("task", "target_language", "error", "chunk_batch_key", "chunk_inputs")
    writes = ("chunk_batch_key", "chunk_inputs", "chunk_input_tokens")

    def __init__(self, context: StageContext):
        super().__init__(context)
        one_thread_per_worker()
        self.builder = InputBuilder(local_model_dir(self.config, processor_only=True), self.config.system_prompt,
                                    audio_bucket_s=self.config.audio.batch_bucket_s)

    @classmethod
    def resources(cls, config: JobConfig, cluster: Cluster) -> StageResources:
        """Whole blocks (PrepareWork yields each part of a long recording as a block of its own, and the
        dataset's block size keeps them so: jobs/graph.py part_block_bytes), so the parts spread over the
        workers and a block of calls costs one call, not one per row. The pool: the CPUs the decoding
        pool leaves (jobs/graph.py counts its first worker as reserved). For `meetings`, whose every
        input is long and whose features are ~80 % of the CPU work, all of them from the start (a pool
        that grows from one worker trailed the parts: 8 one-hour meetings' features took 32 s on a
        16-core host); for `transcribe`, where most inputs are calls prepared whole by PrepareWork and
        only the long ones come here, it grows from one worker as parts come."""
        from pipeline.stages.prepare import PrepareWork

        decoders = PrepareWork.resources(config, cluster).pool_size[1]
        high = max(1, int(cluster.cpus - cluster.reserved_cpus - decoders) + 1)
        low = high if config.job == "meetings" else 1
        return StageResources(batch_size=None, pool_size=(low, high), num_cpus=1.0)

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
