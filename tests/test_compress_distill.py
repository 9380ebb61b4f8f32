"""Distillation: student initialisation, a few steps lower the held-out KL, the saved student
loads and generates, the draft-acceptance arithmetic, the command end to end."""

import json
import random
import subprocess
import sys

import pytest
import torch

from compress_models import tiny_smollm_vocab
from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.compress.distill import (Sample, TrainConfig, batch_loss, generate_samples, heldout_kl, make_student,
                                         select_layers, sparsity_masks, tokens_per_step, train)
from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir
from flashserve.compress.packed import packed_logits


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    make_tiny_checkpoint("llama_mha_tied", folder, seed=2)
    return str(folder)


def test_select_layers():
    spread = select_layers(30, 15)
    assert len(spread) == 15 and spread[0] == 0 and spread[-1] == 29 and spread == sorted(set(spread))
    assert select_layers(30, 8, "first") == list(range(8))
    assert select_layers(4, 1) == [0] and select_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"deeper than its teacher \(4 layers\)"):
        select_layers(4, 5)
    with pytest.raises(ValueError, match="at least 1 layer"):
        select_layers(4, 0)


def test_tokens_per_step_is_greedy_speculative_arithmetic():
    T, F = True, False
    assert tokens_per_step([[T, T, F, T, T, T, T, T]], 4) == 8 / 2  # 2 accepted + 1, then 4 accepted + 1
    assert tokens_per_step([[F] * 5], 4) == 1.0  # every step yields only the target's token
    assert tokens_per_step([[T] * 10], 4) == 5.0
    assert tokens_per_step([[T] * 10, [F] * 2], 2) == 12 / (4 + 2)


def test_a_few_steps_lower_the_heldout_kl_and_the_student_serves(teacher, tmp_path):
    rng = random.Random(0)
    llm = LLM(teacher, device="cpu", max_model_len=128, kv_cache_bytes=8 << 20, verbose=False)
    train_set = generate_samples(llm, [[rng.randrange(3, 512) for _ in range(6)] for _ in range(8)], 24, 32, 1.0)
    val_set = generate_samples(llm, [[rng.randrange(3, 512) for _ in range(6)] for _ in range(4)], 8, 32, 1.0)
    assert all(s.prompt_len == 6 and len(s.token_ids) > 6 for s in train_set)
    src = load_source(teacher)
    student = make_student(src.model, [1])
    assert len(student.model.layers) == 1 and len(src.model.model.layers) == 2  # the teacher is untouched
    history = train(student, src.model, train_set, val_set,
                    TrainConfig(mode="white", steps=12, batch_tokens=512, lr=3e-3, eval_every=12), log=lambda s: None)
    assert history[-1]["heldout_kl"] < 0.9 * history[0]["heldout_kl"]
    assert heldout_kl(student, src.model, val_set, 512) == pytest.approx(history[-1]["heldout_kl"], rel=1e-5)
    assert heldout_kl(src.model, src.model, val_set, 512) == pytest.approx(0.0, abs=1e-6)
    # Black box: cross-entropy on the sampled tokens, no teacher needed for the loss.
    ce, n = batch_loss(student, None, train_set[:2], "black")
    assert n == sum(len(s.token_ids) - 6 for s in train_set[:2]) and ce.item() > 0

    write_model_dir(tmp_path / "student", hf_state_dict(student), {**src.config_json, "num_hidden_layers": 1}, None,
                    {"tool": "flashserve distill"})
    served = LLM(str(tmp_path / "student"), device="cpu", max_model_len=128, kv_cache_bytes=8 << 20, verbose=False)
    assert served.engine.model_config.num_layers == 1
    seq = val_set[0].token_ids
    with torch.no_grad():
        ref = packed_logits(student, [seq]).log_softmax(-1)[:-1]
    torch.testing.assert_close(torch.cat(list(served.engine.score(seq, 16))), ref, atol=2e-4, rtol=1e-4)
    out = served.generate([seq[:6]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 8


def test_pruned_weights_stay_zero_while_training(teacher):
    from flashserve.compress.prune import prune_model

    rng = random.Random(1)
    src = load_source(teacher)
    prune_model(src.model, "magnitude", 0.5)
    student = make_student(src.model, [0, 1])
    masks = sparsity_masks(student)
    assert len(masks) == 2 * 4 and all(m.float().mean() == 0.5 for m in masks.values())  # fused qkv, o, gate_up, down
    data = [Sample([rng.randrange(3, 512) for _ in range(24)], 4) for _ in range(6)]
    before = {p: p.detach().clone() for p in masks}
    train(student, src.model, data, [], TrainConfig(mode="black", steps=3, batch_tokens=256, lr=1e-2, eval_every=3),
          log=lambda s: None, masks=masks)
    for p, m in masks.items():
        assert (p[~m] == 0).all() and not torch.equal(p, before[p])


def test_samples_need_tokens():
    with pytest.raises(ValueError, match="exceeds --batch-tokens"):
        train(torch.nn.Linear(1, 1), None, [Sample(list(range(20)), 2)], [], TrainConfig(mode="black", steps=1, batch_tokens=8))
    with pytest.raises(ValueError, match="--mode must be white or black"):
        TrainConfig(mode="grey")


@pytest.mark.slow
def test_distill_command_end_to_end(tmp_path):
    tiny_smollm_vocab(tmp_path / "teacher", layers=4)
    cmd = [sys.executable, "-m", "flashserve.cli", "distill", "--model", str(tmp_path / "teacher"), "--device", "cpu"]
    r = subprocess.run(cmd + ["--layers", "5", "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "deeper than its teacher (4 layers)" in r.stderr
    small = ["--samples", "6", "--gen-tokens", "8", "--heldout", "3", "--steps", "2", "--batch-tokens", "1024",
             "--eval-every", "2", "--eval-tokens", "48", "--data", str(tmp_path / "data.json")]
    r = subprocess.run(cmd + ["--layers", "2", *small, "--output", str(tmp_path / "student"),
                              "--output-json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["student_layers"] == 2 and res["layers_from_teacher"] == [0, 3] and res["training_samples"] == 6
    assert [h["step"] for h in res["history"]] == [0, 2] and res["quality"]["num_tokens"] == 47
    assert res["acceptance"]["distilled"] >= 1.0 and res["acceptance"]["baseline"] >= 1.0
    assert res["acceptance"]["baseline_draft"] == "teacher's first 2 layers"
    assert (tmp_path / "data.json").is_file()  # the generated text, reusable by the next run
    reply = LLM(str(tmp_path / "student"), device="cpu", max_model_len=256, verbose=False).chat(
        [{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert reply.token_ids  # the teacher's tokenizer and chat template came along
