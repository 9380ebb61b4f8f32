"""The compression tools on a tiny random Gemma 3 (local and global layers with their own rope
bases, q/k norms, four ``1 + w`` norms per layer, scaled embeddings, a query scale that is not
head_dim ** -0.5, tied embeddings).

Every directory is written with the config.json the tools make for a GGUF source
(``hf_config_json``), as for the real Gemma 3 270M. Oracles: the compressed model in memory (the
written directory must serve the same logits), transformers (dense results), the source itself
(0% pruning, full rank), and a plain forward pass (the layer-by-layer calibration inputs).
The cascade bench runs on two such models without a chat template (the real GGUF has none).
"""

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from conftest_models import copy_smollm2_tokenizer, make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.compress import cascade_eval
from flashserve.compress.calibration import LayerwiseCalibration, linear_modules
from flashserve.compress.distill import Sample, TrainConfig, make_student, student_config_json, train
from flashserve.compress.lowrank import lowrank_model
from flashserve.compress.model_io import hf_config_json, hf_state_dict, load_source, write_model_dir
from flashserve.compress.packed import packed_logits
from flashserve.compress.prune import head_grid, prune_model, slim_state_dict
from flashserve.loader.hf_config import model_config_from_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3_src")
    make_tiny_checkpoint("gemma3", folder, seed=11)  # layers: sliding (window 8), full, sliding
    return str(folder)


def _ids(n, length, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(length)] for _ in range(n)]


CALIB, TEST = _ids(6, 40, 0), _ids(2, 36, 1)  # longer than the window of 8
ROWS = torch.cat([torch.arange(i * 36, i * 36 + 35) for i in range(len(TEST))])  # score() omits each last token


def _write(folder, model, config_json, compression=None, tensors=None):
    write_model_dir(folder, tensors if tensors is not None else hf_state_dict(model), config_json, None, compression)
    return str(folder)


def _scores(folder):
    engine = LLM(folder, device="cpu", max_model_len=128, kv_cache_bytes=4 << 20, verbose=False).engine
    return torch.cat([torch.cat(list(engine.score(s, 16))) for s in TEST])


def _hf_log_probs(folder):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return torch.cat([hf(torch.tensor([s])).logits[0] for s in TEST]).log_softmax(-1)[ROWS]


def _log_probs(model):
    with torch.no_grad():
        return packed_logits(model, TEST).log_softmax(-1)[ROWS]


def test_config_json_keeps_gemma3_fields(tiny):
    src = load_source(tiny)
    written = hf_config_json(src.config)
    assert written["model_type"] == "gemma3_text" and written["sliding_window"] == 8
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert written["query_pre_attn_scalar"] == 24 and written["rope_local_base_freq"] == 10000.0
    assert model_config_from_hf(written) == src.config  # what the loader builds from it is the source's config


def test_calibration_inputs_are_the_forward_pass_inputs(tiny):
    """Layer by layer, each linear's calibration inputs are what it sees in a whole forward pass
    (scaled embeddings in, each layer with its own rope base and window)."""
    model = load_source(tiny).model
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, m in linear_modules(layer).items():
            hooks.append(m.register_forward_pre_hook(
                lambda _m, args, key=f"{i}.{name}": seen.__setitem__(key, args[0].detach().pow(2).sum(0))))
    with torch.no_grad():
        packed_logits(model, CALIB)
    for h in hooks:
        h.remove()
    calib = LayerwiseCalibration(model, CALIB)
    for i, layer in calib.layers():
        stats = calib.collect(layer)
        for name, st in stats.items():
            torch.testing.assert_close(st.sq_sum.float(), seen[f"{i}.{name}"], rtol=1e-4, atol=1e-4)
        calib.advance(layer)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "heads"])
def test_zero_pruning_is_the_source(tiny, tmp_path, method):
    src = load_source(tiny)
    prune_model(src.model, method, 0.0, CALIB)
    out = _write(tmp_path / method, src.model, hf_config_json(src.config), {"method": method, "sparsity": 0.0})
    torch.testing.assert_close(_scores(out), _scores(tiny), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,sparsity", [("magnitude", 0.5), ("wanda", 0.5), ("2:4", None)])
def test_pruned_gemma3_serves_the_pruned_model_and_matches_transformers(tiny, tmp_path, method, sparsity):
    src = load_source(tiny)
    res = prune_model(src.model, method, sparsity, CALIB)
    assert res.masked_share() == 0.5
    compression = {"method": method, "sparsity": 0.5, **({"semi_structured": "2:4"} if method == "2:4" else {})}
    out = _write(tmp_path / "p", src.model, hf_config_json(src.config), compression)
    ours, in_memory = _scores(out), _log_probs(src.model)
    torch.testing.assert_close(ours, in_memory, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ours, _hf_log_probs(out), atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ours, _scores(tiny), atol=1e-2)  # pruning changed the model


def test_structured_heads_on_gemma3(tiny, tmp_path):
    # transformers' Gemma 3 config wants heads that divide the hidden size: 3 of 4 heads would not load
    assert head_grid(4, 1, 0.7) == (1, 3) and head_grid(4, 1, 0.7, divides=64) == (1, 2)
    src = load_source(tiny)
    res = prune_model(src.model, "heads", 0.3, CALIB)
    assert [len(g) for g in res.heads[0]] == [2] and len(res.channels[0]) == 90  # 2 of 4 heads, 90 of 128 channels
    zeroed = _log_probs(src.model)
    tensors, cfg = slim_state_dict(hf_state_dict(src.model), hf_config_json(src.config), res, src.config.head_dim)
    out = _write(tmp_path / "heads", None, cfg, {"method": "heads"}, tensors)
    slim = load_source(out)
    assert (slim.config.num_heads, slim.config.num_kv_heads, slim.config.intermediate_size) == (2, 1, 90)
    assert slim.config.layer_types == src.config.layer_types and slim.config.attention_scale == src.config.attention_scale
    torch.testing.assert_close(_scores(out), zeroed, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(_hf_log_probs(out), zeroed, atol=2e-4, rtol=1e-4)


def test_lowrank_gemma3_full_rank_is_the_source_and_a_factorised_one_serves(tiny, tmp_path):
    src = load_source(tiny)
    reference = _log_probs(src.model)
    lowrank_model(src.model, rank=64, scaling="whiten", calibration=CALIB)  # every matrix has min dim 64
    torch.testing.assert_close(_log_probs(src.model), reference, atol=5e-5, rtol=1e-5)

    src = load_source(tiny)
    ranks = lowrank_model(src.model, ratio=0.5, scaling="whiten", calibration=CALIB)
    out = _write(tmp_path / "lr", src.model, hf_config_json(src.config), {"low_rank": ranks, "scaling": "whiten"})
    ours = _scores(out)
    torch.testing.assert_close(ours, _log_probs(src.model), atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ours, reference, atol=1e-2)
    llm = LLM(out, device="cpu", max_model_len=128, kv_cache_bytes=4 << 20, verbose=False)
    gen = llm.generate([TEST[0][:20]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert len(gen.token_ids) == 16  # decoding past the window of 8 with the paged cache


def test_gemma3_student_keeps_each_layers_attention_and_trains(tiny, tmp_path):
    src = load_source(tiny)
    student = make_student(src.model, [1, 2])  # the global layer (rope 1e5) then a local one (rope 1e4, window 8)
    assert [s.attention.kind for s in student.config.layer_types] == ["full", "sliding"]
    cfg = student_config_json(hf_config_json(src.config), src.config, [1, 2])
    assert cfg["num_hidden_layers"] == 2 and cfg["layer_types"] == ["full_attention", "sliding_attention"]
    rng = random.Random(3)
    data = [Sample([rng.randrange(3, 512) for _ in range(24)], 4) for _ in range(6)]
    history = train(student, src.model, data, data[:2],
                    TrainConfig(mode="white", steps=4, batch_tokens=256, lr=3e-3, eval_every=4), log=lambda s: None)
    assert history[-1]["heldout_kl"] < history[0]["heldout_kl"]
    out = _write(tmp_path / "student", student, cfg, {"tool": "flashserve distill"})
    torch.testing.assert_close(_scores(out), _log_probs(student), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(_hf_log_probs(out), _log_probs(student), atol=2e-4, rtol=1e-4)


def _without_chat_template(folder):
    """The SmolLM2 tokenizer minus its chat template (a base model's tokenizer, as Gemma 3 270M's GGUF)."""
    copy_smollm2_tokenizer(folder)
    for f in Path(folder).glob("chat_template.*"):
        f.unlink()
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))


def test_cascade_bench_uses_plain_prompts_without_a_chat_template(tmp_path):
    large = tmp_path / "large"
    make_tiny_checkpoint("gemma3", large, seed=4, vocab_size=49152)
    _without_chat_template(large)
    src = load_source(str(large))
    assert not src.tokenizer.chat_template
    small = _write(tmp_path / "small", make_student(src.model, [0]).eval(),
                   student_config_json(src.config_json, src.config, [0]))
    _without_chat_template(small)
    p = argparse.ArgumentParser()
    cascade_eval.add_arguments(p)
    out = tmp_path / "cascade.json"
    args = p.parse_args(["--small", small, "--large", str(large), "--device", "cpu", "--num-questions", "2",
                         "--max-tokens", "3", "--thresholds", "0.5", "--output-json", str(out)])
    assert cascade_eval.run(args) == 0
    res = json.loads(out.read_text())
    assert res["prompts"] == "plain: " + cascade_eval.PLAIN_PROMPT
    rows = {r["threshold"]: r for r in res["thresholds"]}
    assert rows[0.0]["small_share"] == 1.0 and rows[1.0]["small_share"] == 0.0 and rows[1.0]["exact_agreement"] == 1.0
