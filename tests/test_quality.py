"""Quality tooling: teacher-forced scoring through the paged cache, and the comparison figures."""

import math
import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM
from flashserve.bench.quality import compare, license_corpus, read_texts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_gqa")
    return str(folder), make_tiny_checkpoint("llama3_gqa", folder, seed=3)


def _engine(folder: str, **kw) -> LLM:
    return LLM(model=folder, device="cpu", block_size=4, max_model_len=256, kv_cache_bytes=4 << 20, verbose=False, **kw)


def test_score_equals_transformers_log_softmax_across_chunks(tiny):
    folder, hf = tiny
    rng = random.Random(0)
    ids = [rng.randrange(3, 512) for _ in range(70)]
    llm = _engine(folder)
    chunks = list(llm.engine.score(ids, chunk_size=16))  # 69 rows in chunks of 16: the cache carries the context
    assert [c.shape[0] for c in chunks] == [16, 16, 16, 16, 5]
    ours = torch.cat(chunks)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert llm.engine.block_manager.num_used_blocks == 0  # scoring frees its blocks


def test_compare_against_itself_and_a_lower_precision_engine(tiny):
    folder, _ = tiny
    rng = random.Random(1)
    ids = [rng.randrange(3, 512) for _ in range(120)]
    exact = _engine(folder).engine
    same = compare(exact.score(ids, 32), exact.score(ids, 32), ids)  # two scorings in flight at once
    assert same.num_tokens == 119
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0 and same.perplexity == pytest.approx(same.reference_perplexity, rel=1e-5)
    low = _engine(folder, dtype="bfloat16").engine
    rep = compare(low.score(ids, 32), exact.score(ids, 32), ids)
    assert 0 < rep.kl_divergence < 0.05
    assert rep.top1_agreement > 0.8
    assert abs(rep.perplexity_change) < 0.05
    # Perplexity by hand from the exact engine's own log-probs.
    lp = torch.cat(list(exact.score(ids, 119)))
    nll = -lp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert rep.reference_perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_score_rejects_busy_engine_and_bad_input(tiny):
    folder, _ = tiny
    llm = _engine(folder)
    with pytest.raises(ValueError, match="chunk_size"):
        next(llm.engine.score([5, 6, 7], chunk_size=0))
    with pytest.raises(ValueError, match="context"):
        next(llm.engine.score([5] * 300))
    llm.engine.add_request("busy", [5, 6, 7])
    with pytest.raises(RuntimeError, match="idle"):
        next(llm.engine.score([5, 6, 7]))


def test_license_texts_are_read_at_run_time():
    text = read_texts()
    assert "GNU GENERAL PUBLIC LICENSE" in text
    ids = license_corpus(5000, lambda s: s.split())
    assert len(ids) == 5000
    with pytest.raises(FileNotFoundError, match="not found"):
        read_texts(["/nonexistent/text"])
