"""``flashserve bench decoding``: the per-method table on SmolLM2 (greedy outputs of every method
identical to plain decoding's, acceptance lengths counted) and the verification cost curve
(chains through the step runner, trees through the tree-masked attention) on a tiny model."""

import argparse

import pytest

from conftest_models import make_tiny_checkpoint
from flashserve.bench import decoding


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    decoding.add_arguments(p)
    return p.parse_args(list(argv))


def test_cost_curve_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    from flashserve.layers import attention

    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=2)
    args = _args("--cost-curve", "--model", str(tmp_path), "--device", "cpu", "--block-size", "4",
                 "--context", "24", "--cost-batch-sizes", "1,3", "--chain-ks", "1,3", "--tree-sizes", "4,9",
                 "--repeats", "2")
    verified = []  # rows attended as the engine verifies drafts (attention_rows), not as a prompt chunk
    rows = attention.decode_rows
    monkeypatch.setattr(attention, "decode_rows", lambda q, *a, **kw: verified.append(q.shape[0]) or rows(q, *a, **kw))
    res = decoding.run_cost_curve(args)
    assert set(verified) == {2, 4, 9}  # chains of 1 and 3 drafts, trees of 4 and 9 nodes
    shapes = [(r["batch"], r["shape"], r["tokens"]) for r in res["rows"]]
    assert shapes == [(b, s, n) for b in (1, 3) for s, n in
                      (("decode", 1), ("chain", 2), ("chain", 4), ("tree", 4), ("tree", 9))]
    assert all(r["ms"] > 0 for r in res["rows"])
    decoding.print_cost_curve(res)
    assert "x decode" in capsys.readouterr().out


def test_bad_methods_are_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'medusa'"):
        decoding.spec_config("medusa", 4, None, None, True)
    with pytest.raises(ValueError, match="needs --draft-model"):
        decoding.spec_config("draft", 4, None, None, True)
    assert decoding.spec_config("layers-tree", 3, None, None, False) == {
        "method": "layers", "tree_width": 2, "num_speculative_tokens": 6, "disable_by_cost": False}
    assert decoding.spec_config("ngram", 4, None, None, True, '{"prompt_lookup_min": 2}')["prompt_lookup_min"] == 2
    with pytest.raises(ValueError, match="must be a JSON object"):
        decoding.spec_config("ngram", 4, None, None, True, "[2]")
    with pytest.raises(ValueError, match="--cell-runs must be >= 1"):
        decoding.run_methods(_args("--methods", "ngram", "--cell-runs", "0"))
    with pytest.raises(ValueError, match="prompt_lookup_min"):  # checked before any model loads
        decoding.run_methods(_args("--methods", "ngram", "--spec-options", '{"prompt_lookup_min": 0}'))


def test_loop_share_counts_repeated_ngrams():
    assert decoding.loop_share([list(range(40))]) == 0.0  # never repeats
    loop = [7, 8, 9] * 12  # a period-3 loop: every 8-gram after the first three repeats
    assert decoding.loop_share([loop]) == pytest.approx((len(loop) - 7 - 3) / (len(loop) - 7))
    assert decoding.loop_share([list(range(40)), loop]) == pytest.approx(26 / 62)
    assert decoding.loop_share([[1, 2, 3]]) == 0.0  # shorter than an 8-gram: nothing counted


def test_bench_prompts_of_a_chat_model_go_through_its_template():
    """SmolLM2-Instruct has a chat template, which writes the special tokens itself."""
    from flashserve import LLM

    engine = LLM(device="cpu", verbose=False, max_model_len=256).engine
    prompts, special = decoding.bench_prompts(engine, ["Why is the sky blue?"])
    assert not special and prompts == [engine.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}])]
    assert "Why is the sky blue?" in prompts[0] and prompts[0] != "Why is the sky blue?"
    engine.shutdown()


def test_method_table_on_smollm2(capsys, monkeypatch):
    from flashserve import LLM

    args = _args("--device", "cpu", "--methods", "ngram,layers-tree", "--batch-sizes", "1,3", "--kinds", "code",
                 "--num-prompts", "3", "--batch1-prompts", "1", "--new-tokens", "10", "--no-off-switch",
                 "--max-model-len", "512", "--cell-runs", "2")
    calls = []  # the engine of every generate call
    generate = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, *a, **kw: calls.append(self) or generate(self, *a, **kw))
    res = decoding.run_methods(args)
    # the methods take turns: each run of a cell goes through the three engines in order
    timed = calls[-(2 * 3 + 2 * 3):]  # the batch-3 cell: two runs, one call per engine; before it batch 1's
    assert len(set(map(id, timed[:3]))) == 3 and [id(c) for c in timed[3:6]] == [id(c) for c in timed[:3]]
    rows = {(r["method"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(m, b) for m in ("none", "ngram", "layers-tree") for b in (1, 3)}
    for (m, _), r in rows.items():
        assert r["identical"] == 1.0, r  # lossless: token for token what plain decoding gives
        runs = r["runs_tokens_per_s"]
        assert len(runs) == 2 and abs(r["tokens_per_s"] - sum(runs) / 2) < 0.02, r  # the median of two runs
        assert r["acceptance_length"] >= 1.0
        assert 0 < r["drafts_per_step"] <= (8 if m == "layers-tree" else 4) if r["verify_steps"] else True, r
        assert 0.0 <= r["loops"] <= 1.0 and r["loops"] == rows["none", r["batch"]]["loops"], r
        assert (r["verify_steps"] > 0) == (m == "layers-tree") or m == "ngram", r  # layers always drafts
    decoding.print_methods(res)
    assert "speedup" in capsys.readouterr().out
