"""The batch-invariant mode's engine side (flashserve.layers.batch_invariant): what it refuses, with
clear errors before any weight is loaded or changed, and that a CPU engine takes it where its
products are row-exact (speculation then equals plain decoding bit for bit). The kernels are in
tests/kernels/test_batch_invariant.py; the GPU engine in tests/test_spec_gpu.py."""

from __future__ import annotations

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.config import EngineArgs
from flashserve.layers.batch_invariant import BatchInvariantMethod, use_batch_invariant
from flashserve.layers.linear import Linear
from flashserve.quant.base import LinearMethod


@pytest.mark.parametrize("kwargs,match", [
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 6, "tree_width": 2}), "not token trees"),
    (dict(attention="quest", kv_budget=0.5), "not 'quest'"),
    (dict(quantization="fp8-w8a8"), "fp8-w8a8"),
])
def test_refused_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(batch_invariant=True, **kwargs).engine_config()


def test_cuda_needs_the_triton_backend():
    """Checked on the resolved device (the Worker calls it before loading), so device="auto" too."""
    from flashserve.layers.batch_invariant import check_backend

    with pytest.raises(ValueError, match="triton attention backend"):
        check_backend(torch.device("cuda"), "torch")
    check_backend(torch.device("cuda"), "triton")
    check_backend(torch.device("cpu"), "torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch_invariant")
    make_tiny_checkpoint("llama3_gqa", folder, seed=4)
    return str(folder)


def test_cpu_dense_float32_is_refused(tiny):
    with pytest.raises(ValueError, match=r"dense torch.float32 products .* use bfloat16"):
        LLM(tiny, device="cpu", dtype="float32", batch_invariant=True, verbose=False)


def test_moe_is_refused(tmp_path):
    from test_moe_models import make_tiny_moe

    make_tiny_moe("mixtral", tmp_path)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        LLM(str(tmp_path), device="cpu", dtype="bfloat16", batch_invariant=True, verbose=False)


def test_cpu_bf16_speculation_equals_plain_decoding(tiny):
    prompts = [[5, 9, 13, 5, 9, 13, 5, 9], [7] * 3 + [11, 12, 13] * 4, list(range(20, 57))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3, "disable_by_cost": False}):
        llm = LLM(tiny, device="cpu", dtype="bfloat16", batch_invariant=True, verbose=False, speculative_config=spec)
        try:
            outs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            if spec is not None:
                assert llm.engine.stats().spec.num_steps > 0
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]


def test_cuda_wrapping_checks_every_layer_first():
    """A layer the mode does not cover stops the switch before any layer is wrapped."""

    class Other(LinearMethod):
        label = "lowrank"

        def apply(self, layer, x, bias):
            return x

    model = torch.nn.Sequential(Linear(8, 8, prefix="a"), Linear(8, 8, prefix="b"))
    model[1].quant_method = Other()
    with pytest.raises(ValueError, match=r"does not cover lowrank layers \(1\)"):
        use_batch_invariant(model)
    assert type(model[0].quant_method) is LinearMethod
    model[1].quant_method = LinearMethod()
    assert use_batch_invariant(model) == 2
    assert all(isinstance(m.quant_method, BatchInvariantMethod) for m in model)
