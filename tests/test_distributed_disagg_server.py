"""A server over a disaggregated engine (a prefill and a decode Worker process, gloo): it answers,
then killing the decode Worker makes it answer 503 and /health names the decode worker."""

import os
import signal
import time
from pathlib import Path

import httpx

from conftest_models import _COMMON, copy_smollm2_tokenizer
from flashserve.server.testing import ServerProcess, child_pids


def _worker_pids(server_pid: int) -> list[int]:
    pids = []
    for pid in child_pids(server_pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            pids.append(pid)
    return sorted(pids)


def test_disaggregated_server_answers_then_503_when_the_decode_worker_dies(tmp_path):
    import transformers

    config = transformers.LlamaConfig(**{**_COMMON, "vocab_size": 49152, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "architectures": ["LlamaForCausalLM"]})
    config.save_pretrained(tmp_path / "model")
    copy_smollm2_tokenizer(tmp_path / "tok")
    args = ["--model", str(tmp_path / "model"), "--load-format", "dummy", "--tokenizer", str(tmp_path / "tok"),
            "--device", "cpu", "--disaggregated", "--max-model-len", "128",
            "--kv-cache-bytes", str(1 << 20), "--block-size", "4", "--log-level", "warning"]
    with ServerProcess(args) as server:
        body = {"model": str(tmp_path / "model"), "prompt": "hello there", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        ok = httpx.post(server.url("/v1/completions"), json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 8  # decoded past the hand-off
        pids = _worker_pids(server.proc.pid)
        assert len(pids) == 2, pids
        decode = pids[1]  # spawned after the prefill worker
        os.kill(decode, signal.SIGKILL)
        time.sleep(0.5)
        statuses = []
        for _ in range(3):  # the first request may be the one that finds the worker gone
            r = httpx.post(server.url("/v1/completions"), json={**body, "max_tokens": 64}, timeout=60)
            statuses.append(r.status_code)
        assert statuses[-1] == 503, statuses
        health = httpx.get(server.url("/health"), timeout=10)
        assert health.status_code == 503
        assert f"the decode worker (pid {decode}) was killed by SIGKILL" in health.text, health.text
