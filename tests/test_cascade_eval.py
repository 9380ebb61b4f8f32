"""``flashserve bench cascade`` on two real models sharing SmolLM2's vocabulary and chat template (a
2-layer model and its 1-layer student): the extremes of the threshold are each model alone, the
compute saved follows from the models' matmul weights, a subset of the questions runs as asked."""

import argparse
import json

import pytest

from compress_models import tiny_smollm_vocab
from conftest_models import copy_smollm2_tokenizer
from flashserve.compress import cascade_eval
from flashserve.compress.distill import make_student
from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    large = tmp_path_factory.mktemp("cascade_large")
    tiny_smollm_vocab(large, layers=2, seed=5)
    src = load_source(str(large))
    small = tmp_path_factory.mktemp("cascade_small")
    write_model_dir(small, hf_state_dict(make_student(src.model, [1]).eval()),
                    {**src.config_json, "num_hidden_layers": 1}, None)
    copy_smollm2_tokenizer(small)
    return str(small), str(large)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cascade_eval.add_arguments(p)
    return p.parse_args(list(argv))


def test_cascade_bench_on_a_subset(models, tmp_path, capsys):
    small, large = models
    out = tmp_path / "cascade.json"
    assert cascade_eval.run(_args("--small", small, "--large", large, "--device", "cpu", "--num-questions", "6",
                                  "--max-tokens", "4", "--thresholds", "0.5", "--output-json", str(out))) == 0
    res = json.loads(out.read_text())
    assert res["questions"] == 6 and res["fitted"]["calibration_questions"] == 3
    rows = {r["threshold"]: r for r in res["thresholds"]}
    assert sorted(rows) == [0.0, 0.5, 1.0] and all(r["requests"] == 6 for r in rows.values())
    ratio = res["matmul_params"]["small"] / res["matmul_params"]["large"]
    assert 0 < ratio < 1
    assert rows[0.0]["small_share"] == 1.0 and rows[0.0]["compute_saved"] == pytest.approx(1 - ratio)
    assert rows[1.0]["small_share"] == 0.0 and rows[1.0]["exact_agreement"] == 1.0
    assert rows[1.0]["compute_saved"] == pytest.approx(0.0)
    printed = capsys.readouterr().out
    assert "answered by small" in printed and "confidence (mean_logprob)" in printed
    q = rows[0.0]["confidence_quantiles"]
    assert len(q) == 5 and q == sorted(q) and 0 < q[0] <= q[-1] <= 1 and rows[1.0]["confidence_quantiles"] is None


def test_bad_subset_is_a_clear_error(models):
    small, large = models
    with pytest.raises(ValueError, match=r"--num-questions must be in \[2, 48\]"):
        cascade_eval.run(_args("--small", small, "--large", large, "--device", "cpu", "--num-questions", "1"))
