"""A server over a tensor-parallel engine (gloo, 2 processes): killing a rank makes the server
answer 503, /health says which rank died, and the server keeps running (no hang)."""

import os
import signal
import time
from pathlib import Path

import httpx

from conftest_models import _COMMON, copy_smollm2_tokenizer
from flashserve.server.testing import ServerProcess, child_pids


def _rank_pid(server_pid: int) -> int:
    for pid in child_pids(server_pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            return pid
    raise AssertionError("no rank process found")


def test_dead_rank_gives_503_and_health_says_why(tmp_path):
    import transformers

    # random weights of a tiny config with SmolLM2's vocabulary, and SmolLM2's tokenizer
    config = transformers.LlamaConfig(**{**_COMMON, "vocab_size": 49152, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "architectures": ["LlamaForCausalLM"]})
    config.save_pretrained(tmp_path / "model")
    copy_smollm2_tokenizer(tmp_path / "tok")
    args = ["--model", str(tmp_path / "model"), "--load-format", "dummy", "--tokenizer", str(tmp_path / "tok"),
            "--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len", "128",
            "--kv-cache-bytes", str(1 << 20), "--block-size", "4", "--log-level", "warning"]
    with ServerProcess(args) as server:
        body = {"model": str(tmp_path / "model"), "prompt": "hello there", "max_tokens": 4, "temperature": 0}
        ok = httpx.post(server.url("/v1/completions"), json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        os.kill(_rank_pid(server.proc.pid), signal.SIGKILL)
        time.sleep(0.5)
        statuses = []
        for _ in range(3):  # the first request may be the one that finds the rank gone
            r = httpx.post(server.url("/v1/completions"), json={**body, "max_tokens": 64}, timeout=60)
            statuses.append(r.status_code)
        assert statuses[-1] == 503, statuses
        health = httpx.get(server.url("/health"), timeout=10)
        assert health.status_code == 503
        assert "tensor-parallel rank 1" in health.text and "SIGKILL" in health.text, health.text
