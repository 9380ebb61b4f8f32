"""``flashserve bench gemv``: the products it derives from a model's config, candidate tiles that
divide each shape and include today's rules, and the sweep itself in the interpreter (every tile
checked against the dequantized reference; a wrong result stops it)."""

from __future__ import annotations

import json

import pytest
import torch

from flashserve.bench import gemv
from flashserve.cli import main
from flashserve.kernels.quant_gemm import FMT_INT4


def test_products_of_bundled_configs():
    assert gemv.model_products("llama-3.1-8b") == {
        "qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (28672, 4096, False),
        "down": (4096, 14336, True), "lm_head": (128256, 4096, False)}
    # a mixture of experts: its experts run the fused MoE kernel, not the GEMV
    assert gemv.model_products("qwen3-30b-a3b") == {
        "qkv": (5120, 2048, False), "o": (2048, 4096, False), "lm_head": (151936, 2048, False)}


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-30b-a3b", "qwen3-0.6b"])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8", "int4"])
def test_candidates_divide_and_include_the_rule(model, fmt):
    code = gemv.FORMATS[fmt]
    dev = torch.device("cpu")
    for n, k, gated in gemv.model_products(model).values():
        cands = gemv.candidates(code, n, k, dev)
        assert cands and len(set(cands)) == len(cands)
        for c in cands:
            assert n % c.block_n == 0 and k % (c.split_k * c.block_k) == 0
            if code == FMT_INT4:
                assert c.split_k * c.block_k == k and c.block_k % gemv.INT4_GROUP == 0 and 1 <= c.programs <= n // c.block_n
        rule = gemv.rule_tile(code, n, k, gated, dev)
        assert rule in cands, (model, fmt, n, k, rule)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8", "int4"])
def test_sweep_checks_and_times_every_tile(fmt):
    row = gemv.sweep_product(fmt, 16, 512, True, torch.device("cpu"), replays=1)
    assert row["rule"] == row["timings"][0] and len(row["timings"]) == len(
        {tuple(t["tile"]) for t in row["timings"]}) > 1
    assert row["best"]["us"] <= row["rule"]["us"] and row["speedup"] >= 1.0
    assert all(0 <= t["rel_err"] < 2e-2 for t in row["timings"])


def test_sweep_stops_on_a_wrong_tile(monkeypatch):
    real = gemv._call

    def wrong_for_one_tile(fmt, x, ops, gated, cfg):
        out = real(fmt, x, ops, gated, cfg)
        return out * 1.1 if cfg is not None and cfg.block_n == 8 else out

    monkeypatch.setattr(gemv, "_call", wrong_for_one_tile)
    with pytest.raises(RuntimeError, match="relative error"):
        gemv.sweep_product("int8", 16, 512, False, torch.device("cpu"), replays=1)


def test_cli_sweeps_shapes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "gemv.json"
    assert main(["bench", "gemv", "--device", "cpu", "--shapes", "a=16x512", "--formats", "int8",
                 "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["product"] for r in res["rows"]] == ["a"] and res["rows"][0]["format"] == "int8"
    assert "int8  a" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--formats", "int3"], "unknown format"),
    (["--shapes", "a=16"], "name=NxK"),
    (["--shapes", "a=16x512:twice"], "':gated'"),
    (["--model", "nope"], "no bundled config 'nope'"),
])
def test_bad_arguments_name_the_problem(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "gemv", "--device", "cpu", *argv])


@pytest.mark.parametrize("shapes,message", [("a=16", "name=NxK"), ("a=16x512:gated", "drop ':gated' from a")])
def test_quant_kernels_reads_shapes_as_bench_gemv_does(shapes, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "quant-kernels", "--device", "cpu", "--shapes", shapes])
