"""Under torchrun (2 processes on this host, gloo, the rendezvous multi-host runs use): rank 0
runs the command line, rank 1 follows it, and the text equals one process's."""

import subprocess
import sys
from pathlib import Path

import torch

from conftest_models import _COMMON, copy_smollm2_tokenizer


def test_torchrun_tensor_parallel_generate_equals_one_process(tmp_path):
    import transformers

    config = transformers.LlamaConfig(**{**_COMMON, "vocab_size": 49152, "num_attention_heads": 4,
                                         "num_key_value_heads": 2})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    copy_smollm2_tokenizer(tmp_path)
    args = ["generate", "--model", str(tmp_path), "--device", "cpu", "--max-model-len", "128",
            "--kv-cache-bytes", str(1 << 20), "--max-tokens", "12", "--temperature", "0", "The sky is"]
    one = subprocess.run([sys.executable, "-m", "flashserve.cli", *args], capture_output=True, text=True, timeout=240)
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "flashserve.distributed.launch", *args,
                          "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout.strip() == one.stdout.strip()
