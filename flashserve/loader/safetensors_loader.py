"""Stream (name, tensor) pairs from a Hugging Face safetensors checkpoint.

Memory-mapped through ``safe_open``; never unpickles (.bin/.pt checkpoints are refused) and
never runs remote code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle(folder: Path) -> None:
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickled[:3])}); flashserve does not "
            "load pickle files (they can run arbitrary code). Convert the model to safetensors."
        )


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint files of ``folder``: the shards named by the index, or model.safetensors,
    or every ``*.safetensors``. Raises FileNotFoundError/ValueError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model directory not found: {folder}")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt safetensors index {index}: {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"safetensors shard listed in {index.name} is missing: {f}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    _refuse_pickle(folder)
    raise FileNotFoundError(f"no safetensors checkpoint (model.safetensors or {INDEX_FILE}) in {folder}")


def iterate_safetensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, cpu tensor)`` for every tensor of the checkpoint, file by file."""
    for path in safetensors_files(folder):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError: truncated or not a safetensors file
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"corrupt tensor {name!r} in safetensors file {path}: {e}") from e
                yield name, tensor


def safetensors_tensor_names(folder: str | Path) -> set[str]:
    """Names of every tensor of the checkpoint (headers only; nothing is read)."""
    names: set[str] = set()
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names.update(f.keys())
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    return names


def read_quantization_config(folder: str | Path) -> dict | None:
    """The quantization a checkpoint declares: ``quantization_config`` of config.json, or the
    older AutoGPTQ ``quantize_config.json`` / AutoAWQ ``quant_config.json`` files."""
    folder = Path(folder)
    for name, method in (("config.json", None), ("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt {path}: {e}") from e
        qc = data.get("quantization_config") if method is None else data
        if isinstance(qc, dict):
            return {"quant_method": method, **qc} if method else qc
    return None
