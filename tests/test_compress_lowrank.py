"""Low-rank factorisation: full rank is the original, whitening is fitted to the inputs, the
written directory serves the factorised model, bad ranks are refused."""

import json
import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.compress.calibration import InputStats
from flashserve.compress.lowrank import check_rule, factorise, lowrank_model, rank_for
from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir
from flashserve.compress.packed import packed_logits
from flashserve.compress.layers import is_low_rank


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lowrank_src")
    make_tiny_checkpoint("qwen2_bias", folder, seed=7)  # q/k/v biases, tied embeddings
    return str(folder)


def _ids(n, length, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(length)] for _ in range(n)]


CALIB, TEST = _ids(6, 48, 0), _ids(2, 40, 1)


@pytest.mark.parametrize("scaling", ["none", "diag", "whiten"])
def test_full_rank_is_the_original(tiny, scaling):
    src = load_source(tiny)
    with torch.no_grad():
        ref = packed_logits(src.model, TEST)
    ranks = lowrank_model(src.model, rank=64, scaling=scaling, calibration=CALIB)  # every matrix has min dim 64
    assert set(ranks.values()) == {64}
    assert is_low_rank(src.model.model.layers[1].mlp.down_proj)
    with torch.no_grad():
        torch.testing.assert_close(packed_logits(src.model, TEST), ref, atol=5e-5, rtol=1e-5)


def test_whitening_minimises_the_error_on_the_inputs():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    x = torch.randn(2000, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    x[:, :4] *= 20  # a few outlier channels, as in real hidden states
    stats = InputStats(x.shape[0], x.pow(2).sum(0), x.T @ x)
    errors = {}
    for scaling in ("none", "diag", "whiten"):
        a, b = factorise(w, stats, scaling, rank=8)
        assert a.shape == (8, 32) and b.shape == (48, 8)
        errors[scaling] = ((x @ (w - b @ a).T).norm() / (x @ w.T).norm()).item()
    assert errors["whiten"] < errors["diag"] < errors["none"]
    assert errors["whiten"] < 0.8 * errors["none"]


def test_rank_rules():
    assert rank_for(960, 576, None, 0.8, None, None) == int(0.8 * 960 * 576 / 1536)
    assert rank_for(64, 64, None, 1.0, None, None) == 32  # a share of the parameters, not of the rank
    sv = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    assert rank_for(4, 4, sv, None, None, 9 / 14) == 1
    assert rank_for(4, 4, sv, None, None, 0.92) == 2  # 13/14 = 0.929
    assert rank_for(4, 4, sv, None, None, 1.0) == 3
    with pytest.raises(ValueError, match=r"rank 65 is larger than .* a 64x128 matrix has rank at most 64"):
        rank_for(64, 128, None, None, 65, None)
    for kwargs, msg in [({}, "exactly one"), ({"ratio": 0.5, "rank": 4}, "exactly one"), ({"ratio": 1.5}, r"\(0, 1\]"),
                        ({"ratio": 0.0}, r"\(0, 1\]"), ({"rank": 0}, ">= 1"), ({"energy": 2.0}, r"\(0, 1\]")]:
        with pytest.raises(ValueError, match=msg):
            check_rule(kwargs.get("ratio"), kwargs.get("rank"), kwargs.get("energy"))


def test_rank_larger_than_a_matrix_is_refused_before_any_work(tiny):
    src = load_source(tiny)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.qkv_proj.*rank at most 64"):
        lowrank_model(src.model, rank=65, scaling="none")
    assert not any(is_low_rank(m) for m in src.model.modules())


def test_written_directory_serves_the_factorised_model(tiny, tmp_path):
    src = load_source(tiny)
    ranks = lowrank_model(src.model, ratio=0.5, scaling="whiten", calibration=CALIB)
    assert ranks["model.layers.0.self_attn.qkv_proj"] == int(0.5 * 128 * 64 / 192)
    with torch.no_grad():
        in_memory = packed_logits(src.model, TEST).log_softmax(-1)
    write_model_dir(tmp_path / "lr", hf_state_dict(src.model), src.config_json, None, {"low_rank": ranks})
    cfg = json.loads((tmp_path / "lr" / "config.json").read_text())
    assert cfg["compression"]["low_rank"] == ranks
    llm = LLM(str(tmp_path / "lr"), device="cpu", max_model_len=128, kv_cache_bytes=4 << 20, verbose=False)
    gate_up = llm.engine.worker.model.model.layers[0].mlp.gate_up_proj
    assert is_low_rank(gate_up) and gate_up.weight_a.shape == (ranks["model.layers.0.mlp.gate_up_proj"], 64)
    rows = torch.cat([torch.arange(i * 40, i * 40 + 39) for i in range(len(TEST))])
    served = torch.cat([torch.cat(list(llm.engine.score(s, 16))) for s in TEST])
    torch.testing.assert_close(served, in_memory[rows], atol=2e-4, rtol=1e-4)
    out = llm.generate(TEST[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 8
    with pytest.raises(ValueError, match="already factorised"):
        lowrank_model(load_source(str(tmp_path / "lr")).model, ratio=0.5, scaling="none")
