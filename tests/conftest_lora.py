"""Test helpers for LoRA: PEFT adapters for the tiny checkpoints of conftest_models, and the PEFT
reference model.

Import from tests as ``from conftest_lora import ...`` (like conftest_models).

* ``write_peft_adapter(model_dir, folder, seed)`` writes a PEFT LoRA adapter with random, non-zero
  A and B for the checkpoint in ``model_dir`` (``peft.LoraConfig`` options pass through).
* ``load_base(model_dir)`` is the base model alone (fp32, eval, eager attention).
* ``peft_oracle(model_dir, adapter_dir)`` is the transformers model with the adapter applied by
  PEFT (fp32, eval, eager attention): the reference for logits and greedy tokens.
* ``greedy_tokens(model, prompt_ids, n)`` greedy-decodes n tokens from a transformers / PEFT model
  with plain full forwards.
* ``edited_adapter(src, dst, config=, tensors=)`` copies an adapter folder, editing its config or
  tensors in place (bad adapters for the refusal tests).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_STD = 0.1  # N(0, 0.1) A and B: the greedy tokens change clearly, logits stay moderate


def load_base(model_dir: str | Path) -> torch.nn.Module:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    model.config._attn_implementation = "eager"
    return model.float().eval()


@torch.no_grad()
def write_peft_adapter(
    model_dir: str | Path,
    folder: str | Path,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8,
    targets: Sequence[str] = ALL_LINEAR,
    **config: Any,
) -> Path:
    """Write a PEFT LoRA adapter (``r``, ``alpha``, ``targets``, further ``peft.LoraConfig`` options
    in ``config``) for the checkpoint in ``model_dir`` to ``folder``, every lora_A / lora_B weight
    N(0, LORA_STD) from a generator seeded with ``seed``. Returns the folder."""
    import peft

    model = peft.get_peft_model(
        load_base(model_dir), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config)
    )
    g = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if ".lora_A." in name or ".lora_B." in name:
            param.copy_(LORA_STD * torch.randn(param.shape, generator=g))
    folder = Path(folder)
    model.save_pretrained(str(folder))
    return folder


def peft_oracle(model_dir: str | Path, adapter_dir: str | Path) -> torch.nn.Module:
    """The base model of ``model_dir`` with the PEFT adapter in ``adapter_dir`` (fp32, eval, eager)."""
    import peft

    return peft.PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).eval()


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompt_ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt_ids``: argmax of the last position's logits of a full
    forward, repeated (no ``generate``, so no generation defaults apply)."""
    ids = list(prompt_ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def edited_adapter(src: Path, dst: Path, config: Callable[[dict], None] | None = None,
                   tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of adapter ``src`` at ``dst`` with its config JSON and / or tensors edited in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "adapter_config.json").read_text())
        config(data)
        (dst / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(str(dst / "adapter_model.safetensors"))
        tensors(state)
        save_file(state, str(dst / "adapter_model.safetensors"))
    return dst
