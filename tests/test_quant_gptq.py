"""Tiny GPTQ and AWQ checkpoints, written here in those formats' own packing (int32 words of eight
4-bit values, zero points, fp16 scales, act-order g_idx), load into flashserve and compute what
the dequantized model computes; bad checkpoints fail before anything is allocated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest_models import PagedKVCache, make_tiny_checkpoint
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.quant.packed import PackedWeight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output column AWQ_ORDER[i] of its 8


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _quantize(w: torch.Tensor, group: int, g_idx: torch.Tensor, sym: bool, min_zero: int):
    """Asymmetric (or symmetric, zero 8) 4-bit quantization of ``w [N, K]`` per group of columns."""
    n, k = w.shape
    groups = k // group
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    q = torch.empty(n, k, dtype=torch.int64)
    for gi in range(groups):
        cols = (g_idx == gi).nonzero().squeeze(1)
        block = w[:, cols]
        if sym:
            s = block.abs().amax(1).clamp_min(1e-6) / 7.5
            z = torch.full((n,), 8, dtype=torch.int64)
        else:
            lo, hi = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
            s = ((hi - lo) / 15).clamp_min(1e-6)
            z = torch.round(-lo / s).clamp(min_zero, 15).long()
        s = s.half().float()  # the checkpoint stores fp16 scales
        q[:, cols] = torch.clamp(torch.round(block / s[:, None]) + z[:, None], 0, 15).long()
        scales[gi], zeros[gi] = s, z
    dense = (q - zeros[g_idx].t()).float() * scales[g_idx].t()
    return q, zeros, scales.half(), dense


def _pack_gptq(q, zeros, scales, g_idx, v1: bool) -> dict[str, torch.Tensor]:
    n, k = q.shape
    qt = q.t()  # [K, N]: input column k of output n in bits 4 * (k % 8) of word [k // 8, n]
    qweight = sum(qt[j::8] << (4 * j) for j in range(8))
    stored = (zeros - 1) if v1 else zeros  # the original gptq format stores zero - 1
    qzeros = sum(stored[:, j::8] << (4 * j) for j in range(8))  # output n in bits 4 * (n % 8)
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": scales, "g_idx": g_idx.to(torch.int32)}


def _pack_awq(q, zeros, scales) -> dict[str, torch.Tensor]:
    qt = q.t()  # [K, N], packed along N: nibble i of word w holds column 8 w + AWQ_ORDER[i]
    qweight = sum(qt[:, AWQ_ORDER[i] :: 8] << (4 * i) for i in range(8))
    qzeros = sum(zeros[:, AWQ_ORDER[i] :: 8] << (4 * i) for i in range(8))
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": scales}


def write_quantized_checkpoint(hf, folder: Path, kind: str, group: int, act_order: str = "none",
                               sym: bool = False, v1: bool = True, seed: int = 0) -> torch.nn.Module:
    """Re-save a tiny HF checkpoint with every decoder linear in GPTQ (``kind="gptq"``) or AWQ
    packing. ``act_order``: "none", "shared" (one permutation per input, as GPTQ produces for
    q/k/v and gate/up) or "each" (every tensor its own). Returns the oracle: ``hf`` with the
    dequantized weights."""
    import copy

    g = torch.Generator().manual_seed(seed)
    state = load_file(str(folder / "model.safetensors"))
    oracle = copy.deepcopy(hf)
    params = dict(oracle.named_parameters())
    shared: dict[int, torch.Tensor] = {}
    for name in list(state):
        if not any(f".{lin}." in name for lin in LINEARS) or not name.endswith(".weight"):
            continue
        w = state.pop(name).float()
        n, k = w.shape
        gsize = k if group == -1 else group
        if act_order == "none":
            g_idx = torch.arange(k) // gsize
        else:
            key = hash((name.split(".")[2], k, name.split(".")[-2] if act_order == "each" else ""))
            if key not in shared:
                order = torch.randperm(k, generator=g)
                shared[key] = torch.empty(k, dtype=torch.long)
                shared[key][order] = torch.arange(k) // gsize
            g_idx = shared[key]
        q, zeros, scales, dense = _quantize(w, gsize, g_idx, sym, min_zero=1 if v1 else 0)
        packed = _pack_gptq(q, zeros, scales, g_idx, v1) if kind == "gptq" else _pack_awq(q, zeros, scales)
        base = name[: -len(".weight")]
        state.update({f"{base}.{key_}": t.contiguous() for key_, t in packed.items()})
        params[name].data.copy_(dense)
    save_file(state, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    qc = {"quant_method": kind, "bits": 4, "group_size": group}
    qc.update({"desc_act": act_order != "none", "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
              if kind == "gptq" else {"zero_point": True, "version": "gemm"})
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    return oracle.eval()


def _load(folder, **kw):
    from flashserve.loader import load_model

    return load_model(str(folder), "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend(),
                      quantization=kw.pop("quantization", "auto"), **kw)


def _logits(model, config, ids):
    return PagedKVCache(config, num_blocks=16, block_size=4).step(model, [(0, ids)])[0]


CASES = [
    ("gptq", 32, "none", False, True),  # gptq v1 (zero - 1 stored), asymmetric
    ("gptq", 32, "shared", True, False),  # gptq_v2, symmetric, act-order shared by q/k/v and gate/up
    ("gptq", 32, "each", False, True),  # act-order differing between shards: kept apart
    ("gptq", -1, "none", False, False),  # one group per output channel
    ("awq", 32, "none", False, True),
]


@pytest.mark.parametrize("kind,group,act_order,sym,v1", CASES)
def test_checkpoint_matches_dequantized_model(tmp_path, kind, group, act_order, sym, v1):
    hf = make_tiny_checkpoint("llama3_gqa", tmp_path, seed=5)
    oracle = write_quantized_checkpoint(hf, tmp_path, kind, group, act_order, sym, v1)
    model, config = _load(tmp_path)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert len(qkv.packed_parts) == (3 if act_order == "each" else 1)
    assert qkv.quant_method.label == kind and model.lm_head.quant_method.label == "dense"
    ids = torch.randint(3, config.vocab_size, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = _logits(model, config, ids)
    with torch.no_grad():
        expect = oracle(torch.tensor([ids])).logits[0, -1]
    # CPU: bf16 activations into the int4 kernel, everything else fp32
    assert (ours - expect).abs().max() <= 0.03 * expect.abs().max()
    for part in model.modules():  # the same arithmetic in dense torch ops (another summation order:
        if isinstance(part, PackedWeight):  # an fp32 sum can round to the neighbouring bf16 value)
            part.forward = part.reference
    torch.testing.assert_close(_logits(model, config, ids), ours, atol=0.01 * ours.abs().max().item(), rtol=0)


def test_missing_scales_and_unsupported_bits_fail_before_allocation(tmp_path, monkeypatch):
    import flashserve.loader as loader

    hf = make_tiny_checkpoint("llama_mha_tied", tmp_path / "ok", seed=1)
    write_quantized_checkpoint(hf, tmp_path / "ok", "gptq", 32)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before the error")

    monkeypatch.setattr(loader, "build_model", no_allocation)
    bad = tmp_path / "noscales"
    shutil.copytree(tmp_path / "ok", bad)
    state = load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.scales"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.mlp\.down_proj\.scales"):
        _load(bad)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="only 4-bit GPTQ"):
        _load(tmp_path / "ok")
    cfg["quantization_config"]["bits"] = 4
    cfg["quantization_config"]["group_size"] = 48
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="group size 48 does not divide in_features 64"):
        _load(tmp_path / "ok")
    with pytest.raises(ValueError, match="GPTQ-quantized; load it with quantization='gptq'"):
        _load(tmp_path / "ok", quantization="int8")
