"""GPU tests (run on the device host: `pytest -m gpu`): the CUDA-graph decoder against generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.prompts import task_instruction

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_graph_decoder_equals_generate_on_tiny_model(tiny_model):
    """float32 on the GPU: the captured decode step must give generate's tokens exactly."""
    from actors.engine import Phi4MMEngine
    from pipeline.model_inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig

    builder = InputBuilder(tiny_model)
    rng = np.random.default_rng(11)
    built = [builder.audio((0.1 * rng.standard_normal(16000 * 4)).astype(np.float32),
                           task_instruction(*[("asr", None), ("translate", "fr")][k % 2])) for k in range(10)]
    cfg = ModelConfig(source=tiny_model, dtype="float32")
    reference = Phi4MMEngine(tiny_model, "speech", cfg, BatchingConfig(decoder="generate"))
    fast = Phi4MMEngine(tiny_model, "speech", cfg, BatchingConfig(decoder="static", decode_slots=4,
                                                                  max_batch_size=4), model=reference.model)
    want = [reference.generate_batch([b.inputs], 16)[0].token_ids for b in built]
    got = fast.generate([b.inputs for b in built], [b.bucket for b in built], [16] * len(built))
    assert fast._decoder.graph is not None  # the step really ran as a CUDA graph
    fused = fast._decoder.fast_prefill  # and the prefill ran through the compiled decoder layers
    assert fused is not None and fused.compiled and not fused._eager_fallback
    assert [g.token_ids for g in got] == want


def test_compiled_prefill_with_left_padding_equals_generate(tiny_model):
    """Prompts of different lengths share a prefill batch (left padding, masked attention)."""
    from actors.engine import Phi4MMEngine
    from pipeline.model_inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig

    builder = InputBuilder(tiny_model)
    texts = [builder.text(task_instruction("summarize", transcript="word " * (4 + 13 * k))) for k in range(6)]
    cfg = ModelConfig(source=tiny_model, dtype="float32")
    reference = Phi4MMEngine(tiny_model, "text", cfg, BatchingConfig(decoder="generate"))
    fast = Phi4MMEngine(tiny_model, "text", cfg, BatchingConfig(decoder="static", decode_slots=8,
                                                                max_batch_size=6), model=reference.model)
    want = [reference.generate_batch([t.inputs], 12)[0].token_ids for t in texts]
    got = fast.generate([t.inputs for t in texts], [t.bucket for t in texts], [12] * len(texts))
    fused = fast._decoder.fast_prefill
    assert fused is not None and fused.compiled and not fused._eager_fallback
    assert [g.token_ids for g in got] == want
