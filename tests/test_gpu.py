"""GPU tests (run on the device host: `pytest -m gpu`): the CUDA-graph decoder against generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.prompts import task_instruction

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def generate_both_ways(tiny_model, modality: str, built: list, new: int, slots: int, batch: int):
    """float32 on the GPU: generate's tokens one item at a time, and the static engine's for all items
    (CUDA-graph decode, compiled prefill); returns (want, got, the static engine)."""
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    cfg = ModelConfig(source=tiny_model, dtype="float32")
    reference = Phi4MMEngine(tiny_model, modality, cfg, BatchingConfig(decoder="generate"))
    fast = Phi4MMEngine(tiny_model, modality, cfg, BatchingConfig(decoder="static", decode_slots=slots,
                                                                  max_batch_size=batch), model=reference.model)
    want = [reference.generate_batch([b.inputs], new)[0].token_ids for b in built]
    got = fast.generate([b.inputs for b in built], [b.batch_key for b in built], [new] * len(built))
    fused = fast._decoder.fast_prefill  # the prefill ran through the compiled decoder layers
    assert fused is not None and fused.compiled and not fused._eager_fallback
    return want, [g.token_ids for g in got], fast


def test_cuda_graph_decoder_equals_generate_on_tiny_model(tiny_model):
    """The captured decode step and the compiled prefill must give generate's tokens exactly."""
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model)
    rng = np.random.default_rng(11)
    built = [builder.audio((0.1 * rng.standard_normal(16000 * 4)).astype(np.float32),
                           task_instruction(*[("asr", None), ("translate", "fr")][k % 2])) for k in range(10)]
    want, got, fast = generate_both_ways(tiny_model, "speech", built, 16, slots=4, batch=4)
    assert fast._decoder.graph is not None  # the step really ran as a CUDA graph
    assert got == want


def test_compiled_prefill_with_left_padding_equals_generate(tiny_model):
    """Prompts of different lengths share a prefill batch (left padding, masked attention)."""
    from pipeline.model.inputs import InputBuilder

    builder = InputBuilder(tiny_model)
    texts = [builder.text(task_instruction("summarize", transcript="word " * (4 + 13 * k))) for k in range(6)]
    want, got, _ = generate_both_ways(tiny_model, "text", texts, 12, slots=8, batch=6)
    assert got == want
