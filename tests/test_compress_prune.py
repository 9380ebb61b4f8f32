"""Pruning: exact masks, Wanda's activation-aware scores, 0% is the original, pruned directories
load in flashserve and in transformers (the oracle), structured pruning slices exactly."""

import random
import subprocess
import sys

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir
from flashserve.compress.packed import packed, packed_logits
from flashserve.compress.prune import check_sparsity, head_grid, prune_model, slim_state_dict
from flashserve.compress.layers import is_2_4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune_src")
    make_tiny_checkpoint("llama3_gqa", folder, seed=5)
    return str(folder)


def _ids(n, length, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(length)] for _ in range(n)]


CALIB = _ids(6, 48, 0)
TEST = _ids(2, 40, 1)


def _engine(folder):
    return LLM(folder, device="cpu", max_model_len=128, kv_cache_bytes=4 << 20, verbose=False).engine


def _hf_logits(folder, seqs):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])


def test_unstructured_and_2_4_masks_are_exact(tiny):
    src = load_source(tiny)
    before = {n: p.clone() for n, p in src.model.named_parameters()}
    res = prune_model(src.model, "magnitude", 0.3)
    assert len(res.masks) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for name, mask in res.masks.items():
        removed = (~mask).sum().item()
        assert removed == round(0.3 * mask.numel()), name  # the sparsity of every matrix
    w0 = before["model.layers.0.self_attn.qkv_proj.weight"][:128]  # the q rows
    m0 = res.masks["model.layers.0.self_attn.qkv_proj:q"]
    assert w0[m0].abs().min() >= w0[~m0].abs().max()  # magnitude keeps the largest
    assert (src.model.model.layers[0].self_attn.qkv_proj.weight[:128][~m0] == 0).all()

    src = load_source(tiny)
    res = prune_model(src.model, "wanda", 0.5, CALIB)
    for name, mask in res.masks.items():
        assert ((~mask).sum(1) == round(0.5 * mask.shape[1])).all(), name  # per output row
    src = load_source(tiny)
    res = prune_model(src.model, "2:4", None, CALIB)
    for layer in src.model.model.layers:
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            w = m.weight
            assert is_2_4(w) and ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    assert res.masked_share() == 0.5


def test_wanda_scores_weights_by_input_norms(tiny):
    """Layer 0's q/k/v inputs do not depend on any pruning: recompute Wanda's choice by hand."""
    src = load_source(tiny)
    model = src.model
    with torch.no_grad(), packed(CALIB, torch.device("cpu")) as (ids, _):
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))  # [T, hidden]
    norms = x.pow(2).sum(0).sqrt()
    w = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    res = prune_model(model, "wanda", 0.5, CALIB)
    score = w.abs() * norms[None, :]
    kth = score.sort(dim=1).values[:, 32 - 1 : 32]  # the 32nd lowest of 64 per row
    expected = score > kth
    got = torch.cat([res.masks[f"model.layers.0.self_attn.qkv_proj:{s}"] for s in "qkv"])
    assert torch.equal(got, expected)
    assert not torch.equal(expected, w.abs() > w.abs().sort(dim=1).values[:, 31:32])  # differs from magnitude


def test_zero_sparsity_is_the_original_and_pruned_dirs_match_transformers(tiny, tmp_path):
    src = load_source(tiny)
    prune_model(src.model, "wanda", 0.0, CALIB)
    write_model_dir(tmp_path / "p0", hf_state_dict(src.model), src.config_json, None, {"method": "wanda", "sparsity": 0.0})
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    orig, p0 = LLM(tiny, device="cpu", verbose=False), LLM(str(tmp_path / "p0"), device="cpu", verbose=False)
    assert [o.token_ids for o in orig.generate(TEST, params, use_tqdm=False)] == \
        [o.token_ids for o in p0.generate(TEST, params, use_tqdm=False)]

    src = load_source(tiny)
    prune_model(src.model, "wanda", 0.5, CALIB)
    with torch.no_grad():
        in_memory = packed_logits(src.model, TEST)
    write_model_dir(tmp_path / "w50", hf_state_dict(src.model), src.config_json, None, {"method": "wanda", "sparsity": 0.5})
    ours = torch.cat([torch.cat(list(_engine(str(tmp_path / "w50")).score(s, 16))) for s in TEST])
    hf = _hf_logits(str(tmp_path / "w50"), TEST).log_softmax(-1)
    rows = torch.cat([torch.arange(i * 40, i * 40 + 39) for i in range(len(TEST))])  # score() omits each last token
    torch.testing.assert_close(ours, hf[rows], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ours, in_memory.log_softmax(-1)[rows], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ours, _hf_logits(tiny, TEST).log_softmax(-1)[rows], atol=1e-2)  # pruning changed it


def test_structured_heads_slice_exactly(tiny, tmp_path):
    assert head_grid(8, 2, 0.5) == (2, 2) and head_grid(9, 3, 0.7) == (3, 2) and head_grid(9, 3, 0.0) == (1, 1)
    src = load_source(tiny)
    res = prune_model(src.model, "heads", 0.5, CALIB)
    assert [len(g) for g in res.heads[0]] == [2, 2] and len(res.channels[0]) == 64
    for kept in res.heads:  # each kept head belongs to its kv group (4 query heads per group)
        assert all(h // 4 == g[0] // 4 for g in kept for h in g)
    with torch.no_grad():
        zeroed = packed_logits(src.model, TEST)
    tensors, cfg = slim_state_dict(hf_state_dict(src.model), src.config_json, res, src.config.head_dim)
    write_model_dir(tmp_path / "heads", tensors, cfg, None, {"method": "heads"})
    slim = load_source(str(tmp_path / "heads"))
    assert (slim.config.num_heads, slim.config.num_kv_heads, slim.config.intermediate_size) == (4, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(packed_logits(slim.model, TEST), zeroed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_hf_logits(str(tmp_path / "heads"), TEST), zeroed, atol=1e-4, rtol=1e-4)


def test_bad_sparsity_and_missing_calibration():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            check_sparsity("magnitude", bad)
    with pytest.raises(ValueError, match="removes exactly half"):
        check_sparsity("2:4", 0.3)
    with pytest.raises(ValueError, match="unknown pruning method"):
        check_sparsity("random", 0.5)
    with pytest.raises(ValueError, match="needs calibration text"):
        prune_model(torch.nn.Module(), "wanda", 0.5, None)


def test_output_never_overwrites_the_source(tiny, tmp_path):
    from flashserve.compress.model_io import check_output

    with pytest.raises(ValueError, match="is the source model itself"):
        check_output(tiny + "/", tiny)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder that holds no model"):
        write_model_dir(tmp_path, {}, {}, None)


@pytest.mark.slow
def test_cli_prunes_the_embedded_model_and_refuses_bad_input(tmp_path):
    cmd = [sys.executable, "-m", "flashserve.cli", "compress", "prune"]
    r = subprocess.run(cmd + ["--method", "magnitude", "--sparsity", "1", "--output", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "sparsity must be in [0, 1)" in r.stderr
    r = subprocess.run(cmd + ["--method", "magnitude", "--sparsity", "0.3", "--device", "cpu", "--eval-tokens", "64",
                              "--output", str(tmp_path / "m30")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "decoder linear weights kept (70.0%)" in r.stdout and "top-1 agreement" in r.stdout
    out = LLM(str(tmp_path / "m30"), device="cpu", max_model_len=256, verbose=False)
    reply = out.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert reply.token_ids and reply.text  # the tokenizer and chat template came along
