"""``flashserve bench throughput`` end to end on the tiny dummy model, plain and ``--stream``
(every request streamed with delta outputs): both produce every request's tokens and report the
host time by phase."""

import json

import pytest

from flashserve.cli import main


@pytest.mark.parametrize("stream", [False, True])
def test_throughput_bench_runs_and_reports(tmp_path, stream):
    out = tmp_path / "res.json"
    argv = ["bench", "throughput", "--device", "cpu", "--model", "tiny-llama", "--load-format", "dummy",
            "--num-requests", "6", "--min-len", "4", "--max-len", "12", "--max-model-len", "64",
            "--output-json", str(out)] + (["--stream"] if stream else [])
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["streamed"] is stream
    assert 6 * 4 <= res["output_tokens"] <= 6 * 12 and res["output_tok_s"] > 0 and res["steps"] > 0
