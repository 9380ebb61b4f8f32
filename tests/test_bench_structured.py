"""``flashserve bench structured`` on the embedded model: both formats decode the same number of
tokens, and the report says what the grammar costs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("llguidance")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_structured_reports_both_formats(tmp_path):
    report = tmp_path / "structured.json"
    cmd = [sys.executable, "-m", "flashserve.cli", "bench", "structured", "--device", "cpu", "--max-model-len", "256",
           "--kv-cache-bytes", str(30_000_000), "--concurrency", "1", "3", "--output-len", "12", "--input-len", "4",
           "--output-json", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert [(r["concurrency"], r["format"]) for r in data["results"]] == [
        (1, "none"), (1, "json_schema"), (3, "none"), (3, "json_schema")]
    for r in data["results"]:
        assert r["output_tok_s"] > 0 and r["decode_step_ms"] > 0 and r["decode_steps"] >= 11
    assert "slowdown" in proc.stdout and "json_schema" in proc.stdout.splitlines()[-1]
