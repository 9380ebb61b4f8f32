"""``flashserve bench throughput`` end to end on the tiny dummy model, plain, ``--stream`` (every
request streamed with delta outputs) and with multi-step plans: each produces every request's
tokens and reports the host time by phase."""

import json

import pytest

from flashserve.cli import main


@pytest.mark.parametrize("stream, steps", [(False, 1), (True, 1), (True, 4)])
def test_throughput_bench_runs_and_reports(tmp_path, stream, steps):
    out = tmp_path / "res.json"
    argv = ["bench", "throughput", "--device", "cpu", "--model", "tiny-llama", "--load-format", "dummy",
            "--num-requests", "6", "--min-len", "4", "--max-len", "12", "--max-model-len", "64",
            "--num-scheduler-steps", str(steps), "--output-json", str(out)] + (["--stream"] if stream else [])
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["streamed"] is stream
    assert 6 * 4 <= res["output_tokens"] <= 6 * 12 and res["output_tok_s"] > 0 and res["steps"] > 0
    if steps > 1:  # fewer plans than the longest request's tokens
        assert res["steps"] < 12
