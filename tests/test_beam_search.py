"""Beam search equals transformers' ``generate(num_beams=...)`` token for token (every kept
hypothesis and its score) on tiny architectures, with length penalties and each early-stopping
mode; beams fork with shared blocks and copied last blocks; they batch with plain requests and
survive preemption; bad input is a clear error."""

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, BeamSearchParams, SamplingParams
from flashserve.cache.block_manager import BlockManager

EOS = 2
SETTINGS = [  # (beam width, max tokens, length penalty, early stopping)
    (3, 12, 1.0, False),
    (4, 10, 0.5, True),
    (2, 14, 2.0, "never"),
    (3, 12, -0.5, False),
]


def _checkpoint(arch: str, folder, seed: int):
    """A tiny checkpoint whose EOS logit is boosted, so that hypotheses do end with EOS."""
    hf = make_tiny_checkpoint(arch, folder, seed=seed)
    with torch.no_grad():
        head = hf.get_output_embeddings().weight
        head[EOS] = head[EOS] * 2.4 + 0.05
    hf.save_pretrained(str(folder), safe_serialization=True)
    return hf


def _hf_beams(hf, prompt, width, max_tokens, lp, es):
    g = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    num_beams=width, max_new_tokens=max_tokens, do_sample=False, length_penalty=lp,
                    early_stopping=es, num_return_sequences=width, return_dict_in_generate=True, output_scores=True,
                    pad_token_id=0)
    seqs = []
    for seq in g.sequences.tolist():
        gen = seq[len(prompt):]
        seqs.append(gen[: gen.index(EOS) + 1] if EOS in gen else gen)
    return seqs, g.sequences_scores.tolist()


@pytest.mark.parametrize("arch", ["llama3_gqa", "qwen3_qknorm"])
def test_beam_search_equals_transformers(tmp_path, arch):
    hf = _checkpoint(arch, tmp_path, seed=2)
    llm = LLM(model=str(tmp_path), device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=1 << 22, verbose=False)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))] for _ in range(4)]
    stops = 0
    for width, max_tokens, lp, es in SETTINGS:
        outs = llm.beam_search(prompts, BeamSearchParams(width, max_tokens, length_penalty=lp, early_stopping=es),
                               use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            ref, ref_scores = _hf_beams(hf, prompt, width, max_tokens, lp, es)
            assert [c.token_ids for c in out.outputs] == ref
            scores = [c.cumulative_logprob / len(c.token_ids) ** lp for c in out.outputs]
            assert scores == pytest.approx(ref_scores, abs=1e-4)
            stops += sum(c.finish_reason == "stop" for c in out.outputs)
    assert stops > 0  # EOS endings were exercised
    assert llm.engine.block_manager.num_used_blocks == 0
    llm.engine.block_manager.check_invariants()


@pytest.mark.parametrize("bulk_claim_min", [64, 1])  # 1: decodes claimed at once, beams' shared blocks included
def test_beams_batch_with_plain_requests_and_survive_preemption(tmp_path, monkeypatch, bulk_claim_min):
    from flashserve.sched.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "bulk_claim_min", bulk_claim_min)
    claim, claimed = Scheduler._claim_decodes, []
    monkeypatch.setattr(Scheduler, "_claim_decodes", lambda *a: claimed.append(claim(*a)) or claimed[-1])
    _checkpoint("llama3_gqa", tmp_path, seed=3)
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 14))] for _ in range(4)]
    params = BeamSearchParams(3, 12)
    roomy = LLM(model=str(tmp_path), device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=1 << 22,
                verbose=False)
    ref = [[c.token_ids for c in o.outputs] for o in roomy.beam_search(prompts, params, use_tqdm=False)]
    # 40 blocks of 4 tokens for 4 x 3 beams plus plain requests: forks, copies and preemptions.
    tight = LLM(model=str(tmp_path), device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=40 * 2048,
                verbose=False, preemption_mode="recompute")
    engine = tight.engine
    for i, p in enumerate(prompts):
        engine.add_beam_request(f"beam-{i}", p, params)
        engine.add_request(f"plain-{i}", p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert [[c.token_ids for c in done[f"beam-{i}"].outputs] for i in range(4)] == ref
    assert all(len(done[f"plain-{i}"].outputs[0].token_ids) == 20 for i in range(4))
    assert engine.scheduler.num_preemptions > 0
    assert any(claimed) == (bulk_claim_min == 1)
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()


def test_fork_shares_full_blocks_and_copies_the_last():
    bm = BlockManager(16, 4)
    bm.allocate_slots("p", 10)  # blocks 0, 1 full; 2 holds 2 tokens
    table = bm.block_table("p")
    assert bm.fork("p", "a", 10, share_partial=True) == []
    copies = bm.fork("p", "b", 10, share_partial=False)
    assert len(copies) == 1 and copies[0][0] == table[2]
    assert bm.block_table("a") == table and bm.block_table("b")[:2] == table[:2]
    assert bm.block_table("b")[2] == copies[0][1] != table[2]
    assert bm.fork("p", "c", 8, share_partial=False) == []  # on a block boundary nothing is copied
    bm.free("p")
    assert [bm.pool.ref_counts[b] for b in table] == [4 - 1, 4 - 1, 1]  # a, b, c share 0 and 1; a owns 2
    bm.check_invariants()
    for rid in "abc":
        bm.free(rid)
    assert bm.num_used_blocks == 0


def test_bad_beam_search_input(tmp_path):
    make_tiny_checkpoint("llama_mha_tied", tmp_path, seed=1)
    llm = LLM(model=str(tmp_path), device="cpu", block_size=4, max_model_len=64, verbose=False)
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1"):
        BeamSearchParams(0, 8)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        BeamSearchParams(2, 8, early_stopping="sometimes")
    with pytest.raises(ValueError, match="needs 22 candidates per step"):
        llm.beam_search([[5, 6, 7]], BeamSearchParams(11, 8), use_tqdm=False)
    with pytest.raises(ValueError, match="past the model's context of 64 tokens"):
        llm.beam_search([[5, 6, 7]], BeamSearchParams(2, 62), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
