"""``flashserve bench lora`` end to end on the tiny dummy model (CPU): random adapters written
for its projections, served in more slots than adapters or taking turns in fewer, both engines
measured and their ratio reported."""

import json

import pytest

from flashserve.cli import main


@pytest.mark.parametrize("slots", [["--max-loras", "3"], ["--max-loras", "1", "--max-cpu-loras", "2"]],
                         ids=["idle-slots", "taking-turns"])
def test_lora_bench_runs_and_reports(tmp_path, slots):
    out = tmp_path / "res.json"
    argv = ["bench", "lora", "--device", "cpu", "--model", "tiny-llama", "--load-format", "dummy",
            "--max-model-len", "64", "--adapters", "2", "--rank", "4", *slots, "--num-requests", "6",
            "--min-len", "4", "--max-len", "12", "--prompt-len", "8", "--new-tokens", "8", "--output-json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert (res["adapters"], res["rank"], res["max_loras"]) == (2, 4, int(slots[1]))
    for run in ("base", "lora"):
        assert res[run]["decode_tok_s"] > 0 and res[run]["output_tok_s"] > 0
    assert res["ratio"]["decode_tok_s"] == res["lora"]["decode_tok_s"] / res["base"]["decode_tok_s"]
