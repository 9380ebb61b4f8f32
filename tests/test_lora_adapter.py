"""The PEFT LoRA adapter loader (flashserve.lora.adapter) against adapters written by peft itself
for a tiny llama checkpoint: tensors, scaling (plain, rslora, rank/alpha patterns), key mapping
(merging the loaded weights by hand reproduces PEFT's logits), the .bin format and every refusal.
CPU only."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest_lora import ALL_LINEAR, edited_adapter, greedy_tokens, peft_oracle, write_peft_adapter
from conftest_models import make_tiny_checkpoint
from flashserve.lora.adapter import LoRAAdapter, load_adapter

pytest.importorskip("peft")

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": dict(seed=1),
    "rslora": dict(seed=2, r=8, alpha=4, targets=("q_proj", "v_proj"), use_rslora=True),
    "patterns": dict(
        seed=3,
        rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, "model.layers.1.mlp.up_proj": 16},
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("base")
    return folder, make_tiny_checkpoint("llama3_gqa", folder, seed=0)


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_peft_adapter(base[0], root / name, **kw) for name, kw in VARIANTS.items()}


def _peft_scalings(oracle: torch.nn.Module) -> dict[str, float]:
    """PEFT's own scaling per adapted module, keyed by the checkpoint module name."""
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m.scaling["default"] for n, m in oracle.named_modules() if hasattr(m, "lora_A")
            and "default" in getattr(m, "scaling", {})}


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_equal_peft_tensors_times_scaling(base, adapter_dirs, variant: str) -> None:
    folder = adapter_dirs[variant]
    adapter = load_adapter(variant, folder)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    scalings = _peft_scalings(peft_oracle(base[0], folder))
    assert set(adapter.weights) == set(scalings)
    base_params = dict(base[1].named_parameters())
    for module, (a, b) in adapter.weights.items():
        assert f"{module}.weight" in base_params
        for t in (a, b):
            assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
        torch.testing.assert_close(a, saved[f"base_model.model.{module}.lora_A.weight"], rtol=0, atol=0)
        torch.testing.assert_close(b, saved[f"base_model.model.{module}.lora_B.weight"] * scalings[module])
    if variant == "patterns":  # the overrides did apply (and differ from alpha / r = 2)
        assert scalings["model.layers.0.self_attn.q_proj"] == 4.0 and scalings["model.layers.1.self_attn.q_proj"] == 2.0
        assert scalings["model.layers.0.mlp.down_proj"] == 8 / 6 and scalings["model.layers.0.self_attn.v_proj"] == 0.75
        assert scalings["model.layers.1.mlp.up_proj"] == 4.0 and scalings["model.layers.0.mlp.up_proj"] == 2.0
    if variant == "rslora":
        assert set(scalings.values()) == {4 / 8**0.5}


def test_rank_and_target_modules(adapter_dirs) -> None:
    plain = load_adapter("plain", adapter_dirs["plain"])
    assert isinstance(plain, LoRAAdapter) and plain.name == "plain" and plain.path == str(adapter_dirs["plain"])
    assert plain.rank == 4 and plain.target_modules == frozenset(ALL_LINEAR) and len(plain.weights) == 2 * 7
    rslora = load_adapter("rs", adapter_dirs["rslora"])
    assert rslora.rank == 8 and rslora.target_modules == {"q_proj", "v_proj"}
    patterns = load_adapter("pat", adapter_dirs["patterns"])
    assert patterns.rank == 6
    assert patterns.weights["model.layers.0.self_attn.q_proj"][0].shape == (2, 64)
    assert patterns.weights["model.layers.1.mlp.down_proj"][1].shape == (64, 6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_weights_reproduce_peft_logits(base, adapter_dirs, variant: str) -> None:
    """W + B @ A (scaling already in B) merged into the base model gives PEFT's logits."""
    adapter = load_adapter(variant, adapter_dirs[variant])
    oracle = peft_oracle(base[0], adapter_dirs[variant])
    merged = copy.deepcopy(base[1])
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for module, (a, b) in adapter.weights.items():
            params[f"{module}.weight"] += b @ a
    prompt = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got, plain = (m(input_ids=prompt).logits for m in (oracle, merged, base[1]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - plain).abs().max() > 0.5  # the adapter matters
    if variant == "plain":  # and changes the greedy tokens, which merging reproduces
        ids = prompt[0].tolist()
        assert greedy_tokens(merged, ids, 6) == greedy_tokens(oracle, ids, 6) != greedy_tokens(base[1], ids, 6)


def _assert_same(x: LoRAAdapter, y: LoRAAdapter) -> None:
    assert x.rank == y.rank and x.target_modules == y.target_modules and x.weights.keys() == y.weights.keys()
    for k in x.weights:
        assert all(torch.equal(s, t) for s, t in zip(x.weights[k], y.weights[k]))


def test_bin_format_and_adapter_named_keys(adapter_dirs, tmp_path: Path) -> None:
    good = load_adapter("p", adapter_dirs["patterns"])
    bin_dir = edited_adapter(adapter_dirs["patterns"], tmp_path / "bin")
    torch.save(load_file(str(bin_dir / "adapter_model.safetensors")), bin_dir / "adapter_model.bin")
    (bin_dir / "adapter_model.safetensors").unlink()
    _assert_same(load_adapter("p", bin_dir), good)

    def rename(state: dict[str, torch.Tensor]) -> None:  # "...lora_A.weight" -> "...lora_A.default.weight"
        for k in list(state):
            state[k.replace(".weight", ".default.weight")] = state.pop(k)

    _assert_same(load_adapter("p", edited_adapter(adapter_dirs["patterns"], tmp_path / "named", tensors=rename)), good)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _set(**fields: Any) -> Callable[[dict], None]:
    return lambda config: config.update(fields)


def _pop(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


def _put(key: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, torch.zeros(shape))


REFUSALS: dict[str, tuple[dict[str, Callable], str]] = {
    "peft_type": (dict(config=_set(peft_type="IA3")), r"peft_type 'IA3' is not supported.*supported: plain LoRA"),
    "dora": (dict(config=_set(use_dora=True)), r"DoRA .*not supported"),
    "bias": (dict(config=_set(bias="lora_only")), r"bias='lora_only'.*not supported"),
    "lora_bias": (dict(config=_set(lora_bias=True)), r"lora_bias.*not supported"),
    "modules_to_save": (dict(config=_set(modules_to_save=["score"])), r"modules_to_save.*not supported"),
    "fan_in_fan_out": (dict(config=_set(fan_in_fan_out=True)), r"fan_in_fan_out.*not supported"),
    "target_lm_head": (dict(config=_set(target_modules=["q_proj", "lm_head"])), r"embeddings or the LM head"),
    "target_embed": (dict(config=_set(target_modules=["embed_tokens"])), r"embeddings or the LM head"),
    "embedding_weight": (dict(tensors=_put("base_model.model.model.embed_tokens.lora_embedding_A", (4, 512))),
                         r"lora_embedding_A.*embeddings or the LM head.*not supported"),
    "lm_head_weight": (dict(tensors=_put("base_model.model.lm_head.lora_A.weight", (4, 64))),
                       r"lm_head.*embeddings or the LM head.*not supported"),
    "no_lora_B": (dict(tensors=_pop(f"{Q0}.lora_B.weight")), r"model\.layers\.0\.self_attn\.q_proj.*no lora_B"),
    "no_lora_A": (dict(tensors=_pop(f"{Q0}.lora_A.weight")), r"q_proj.*no lora_A"),
    "rank_mismatch": (dict(tensors=_put(f"{Q0}.lora_B.weight", (128, 3))), r"lora_A \(4, 64\) and lora_B \(128, 3\)"),
    "a_not_2d": (dict(tensors=_put(f"{Q0}.lora_A.weight", (256,))), r"expected A \[r, in_features\]"),
    "config_r": (dict(config=_set(r=8)), r"rank 4 in its weights but r=8"),
    "rank_pattern": (dict(config=_set(rank_pattern={"q_proj": 2})), r"q_proj.*rank 4 in its weights but r=2"),
    "unexpected_key": (dict(tensors=_put(f"{Q0}.lora_magnitude_vector", (128,))), r"unexpected weight"),
    "no_weights": (dict(tensors=lambda state: state.clear()), r"no LoRA weights"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(adapter_dirs, tmp_path: Path, case: str) -> None:
    edits, message = REFUSALS[case]
    bad = edited_adapter(adapter_dirs["plain"], tmp_path / case, **edits)
    with pytest.raises(ValueError, match=message) as info:
        load_adapter("bad", bad)
    assert "LoRA adapter 'bad'" in str(info.value)


def test_missing_files_and_bad_names(adapter_dirs, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"directory {tmp_path / 'nowhere'} does not exist"):
        load_adapter("x", tmp_path / "nowhere")
    no_config = edited_adapter(adapter_dirs["plain"], tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no adapter_config.json in {no_config}"):
        load_adapter("x", no_config)
    no_weights = edited_adapter(adapter_dirs["plain"], tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"no adapter_model.safetensors or adapter_model.bin in {no_weights}"):
        load_adapter("x", no_weights)
    broken = edited_adapter(adapter_dirs["plain"], tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter("x", broken)
    for name in ("", "my adapter", "tab\t"):
        with pytest.raises(ValueError, match="must be non-empty and contain no whitespace"):
            load_adapter(name, adapter_dirs["plain"])
