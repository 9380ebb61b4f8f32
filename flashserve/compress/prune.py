"""Pruning: unstructured (magnitude, Wanda), 2:4 semi-structured, structured heads / MLP channels.

Every method works on the decoder layers' linear projections (q, k, v, o, gate, up, down); the
embedding and LM head are kept. Scores:

* magnitude: ``|W|``; the smallest ``sparsity`` share of each Hugging Face matrix (q, k and v
  separately, although flashserve fuses them) is set to zero.
* Wanda (Sun et al., 2023): ``|W_ij| * ||X_j||``, the weight times the L2 norm of its input
  channel over the calibration tokens; compared within each output row, as the paper does.
* 2:4: in every group of 4 consecutive inputs of a row, the 2 lowest scores (magnitude or Wanda)
  are zeroed: the pattern NVIDIA's sparse tensor cores run (flashserve.compress.layers).
* heads: structured. The importance of a query head is the expected squared norm of what it adds
  to the output, ``sum_c ||W_o[:, c]||^2 E[x_c^2]`` over its columns c of o_proj; of an MLP channel
  ``||W_down[:, j]||^2 E[x_j^2]``. Every layer keeps the same number of kv groups, query heads per
  group and MLP channels (so the result is an ordinary, smaller config.json), each layer choosing
  which (Gemma 3: a number of query heads that divides the hidden size, as transformers
  requires). During calibration the removed heads / channels are zeroed (their o_proj /
  down_proj columns: exactly the function of the smaller model); the written model is sliced.

Activation statistics come from ``LayerwiseCalibration``: each layer is scored on the inputs
the already-pruned layers below it produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flashserve.compress.calibration import InputStats, LayerwiseCalibration, linear_modules
from flashserve.layers.linear import Linear, MergedLinear

METHODS = ("magnitude", "wanda", "2:4", "heads")
SCORES = ("magnitude", "wanda")


@dataclass
class PruneResult:
    """What pruning did. ``masks`` maps ``<layer module>:<shard>`` to the kept-weight mask of each
    unstructured / 2:4 matrix; ``heads`` / ``channels`` give, per layer, the kept query heads
    (grouped by kv head) and MLP channels of structured pruning."""

    method: str
    sparsity: float  # asked for
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: list[list[list[int]]] = field(default_factory=list)  # [layer][kept kv group] -> kept q heads
    channels: list[list[int]] = field(default_factory=list)  # [layer] -> kept MLP channels

    def masked_share(self) -> float | None:
        """Share of the masked matrices' weights set to zero (None without masks: structured, or 0%)."""
        if not self.masks:
            return None
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total


def check_sparsity(method: str, sparsity: float | None) -> float:
    """The sparsity to use; ValueError for an unknown method or a sparsity outside [0, 1)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "2:4":
        if sparsity is not None and sparsity != 0.5:
            raise ValueError(f"2:4 pruning removes exactly half of the weights; got --sparsity {sparsity} (omit it or give 0.5)")
        return 0.5
    if sparsity is None:
        raise ValueError(f"--method {method} needs --sparsity in [0, 1)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the share of weights removed), got {sparsity}")
    return float(sparsity)


def _shards(module: Linear) -> dict[object, tuple[int, int]]:
    """Row ranges of the Hugging Face matrices inside a (possibly fused) linear."""
    if isinstance(module, MergedLinear):
        return module.shard_offsets
    return {None: (0, module.out_features)}


def lowest_mask(scores: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Keep-mask (bool, same shape) with exactly the ``k`` lowest scores removed, over the whole
    tensor (``dim=None``) or along ``dim`` in every slice."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if dim is None:
        idx = torch.topk(scores.flatten(), k, largest=False).indices
        mask.view(-1)[idx] = False
        return mask
    idx = torch.topk(scores, k, dim=dim, largest=False).indices
    return mask.scatter(dim, idx, False)


def mask_2_4(scores: torch.Tensor) -> torch.Tensor:
    """Keep-mask of the 2 highest scores in every group of 4 consecutive inputs. [out, in]"""
    out_f, in_f = scores.shape
    if in_f % 4:
        raise ValueError(f"2:4 pruning needs an input size divisible by 4, got a {out_f}x{in_f} matrix")
    groups = scores.reshape(out_f, in_f // 4, 4)
    return lowest_mask(groups, 2, dim=2).reshape(out_f, in_f)


def weight_scores(weight: torch.Tensor, stats: InputStats | None, score: str) -> torch.Tensor:
    """|W| or Wanda's |W| * ||X_j|| for a weight [out, in]."""
    if score == "magnitude":
        return weight.abs()
    if stats is None:
        raise ValueError("Wanda scores need calibration statistics")
    return weight.abs() * stats.sq_sum.sqrt().to(weight.dtype)[None, :]


def _prune_linear(module: Linear, stats: InputStats | None, method: str, score: str, sparsity: float,
                  prefix: str, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights of one linear in place and record a mask per HF matrix."""
    w = module.weight.data
    for sid, (offset, size) in _shards(module).items():
        rows = w.narrow(0, offset, size)  # [size, in], a view
        if method == "2:4":
            mask = mask_2_4(weight_scores(rows, stats, score))
        elif method == "magnitude":
            mask = lowest_mask(rows.abs(), round(sparsity * rows.numel()), dim=None)
        else:  # wanda: compare within each output row
            mask = lowest_mask(weight_scores(rows, stats, "wanda"), round(sparsity * rows.shape[1]), dim=1)
        rows.mul_(mask)
        masks[prefix if sid is None else f"{prefix}:{sid}"] = mask.cpu()


# Architectures whose transformers config refuses a hidden size that is not a multiple of the
# query heads (Gemma3TextConfig does, although Gemma sets head_dim itself): a structurally pruned
# directory with such a head count would not load (not even its tokenizer, which transformers
# reads through config.json), so the kept head count must divide the hidden size.
_HEADS_DIVIDE_HIDDEN = ("gemma3",)


def head_grid(num_heads: int, num_kv_heads: int, keep_share: float, divides: int | None = None) -> tuple[int, int]:
    """(kv groups kept, query heads kept per group) whose product is nearest to
    ``keep_share * num_heads`` (at least one head; ties keep more kv groups); with ``divides``,
    only products that divide it."""
    group = num_heads // num_kv_heads
    target = keep_share * num_heads
    options = [(kv, g) for kv in range(1, num_kv_heads + 1) for g in range(1, group + 1)
               if divides is None or divides % (kv * g) == 0]
    return min(options, key=lambda o: (abs(o[0] * o[1] - target), -o[0]))


def _choose_heads(o_proj: Linear, stats: InputStats, num_kv: int, group: int, head_dim: int,
                  keep_kv: int, keep_g: int) -> list[list[int]]:
    """Kept query heads, grouped by kept kv group (both in ascending order)."""
    contrib = o_proj.weight.data.pow(2).sum(0) * stats.mean_sq.to(o_proj.weight.dtype)  # [H * D]
    head_score = contrib.reshape(num_kv, group, head_dim).sum(-1)  # [Hkv, G]
    top = head_score.topk(keep_g, dim=1)  # best keep_g heads of each group
    groups = top.values.sum(1).topk(keep_kv).indices.sort().values.tolist()
    return [sorted(g * group + i for i in top.indices[g].tolist()) for g in groups]


def prune_model(model: nn.Module, method: str, sparsity: float | None, calibration: list[list[int]] | None = None,
                score: str = "wanda") -> PruneResult:
    """Prune ``model`` in place (weights zeroed); returns the masks / kept structure.

    ``calibration``: token-id sequences, needed by Wanda, by 2:4 with Wanda scores and by heads.
    """
    sparsity = check_sparsity(method, sparsity)
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORES)}")
    result = PruneResult(method, sparsity)
    if sparsity == 0.0:
        return result  # nothing to remove: the model stays exactly as it was
    needs_stats = method in ("wanda", "heads") or (method == "2:4" and score == "wanda")
    if needs_stats and not calibration:
        raise ValueError(f"--method {method} needs calibration text")
    cfg = model.config
    divides = cfg.hidden_size if cfg.architecture in _HEADS_DIVIDE_HIDDEN else None
    keep_kv, keep_g = head_grid(cfg.num_heads, cfg.num_kv_heads, 1.0 - sparsity, divides)
    keep_ch = max(1, round((1.0 - sparsity) * cfg.intermediate_size))
    calib = LayerwiseCalibration(model, calibration) if needs_stats else None
    for i, layer in enumerate(model.model.layers):
        stats = calib.collect(layer) if calib is not None else {}
        if method == "heads":
            attn, mlp = layer.self_attn, layer.mlp
            group = cfg.num_heads // cfg.num_kv_heads
            kept = _choose_heads(attn.o_proj, stats["self_attn.o_proj"], cfg.num_kv_heads, group, cfg.head_dim, keep_kv, keep_g)
            cols = torch.zeros(cfg.num_heads, dtype=torch.bool)
            cols[[h for g in kept for h in g]] = True
            attn.o_proj.weight.data.mul_(cols.repeat_interleave(cfg.head_dim).to(attn.o_proj.weight))
            ch_score = mlp.down_proj.weight.data.pow(2).sum(0) * stats["mlp.down_proj"].mean_sq.to(mlp.down_proj.weight.dtype)
            channels = ch_score.topk(keep_ch).indices.sort().values
            ch_mask = torch.zeros(cfg.intermediate_size, dtype=torch.bool, device=channels.device)
            ch_mask[channels] = True
            mlp.down_proj.weight.data.mul_(ch_mask.to(mlp.down_proj.weight))
            result.heads.append(kept)
            result.channels.append(channels.tolist())
        else:
            for name, module in linear_modules(layer).items():
                _prune_linear(module, stats.get(name), method, score, sparsity, f"model.layers.{i}.{name}", result.masks)
        if calib is not None:
            calib.advance(layer)
    return result


def slim_state_dict(tensors: dict[str, torch.Tensor], config_json: dict[str, Any], result: PruneResult,
                    head_dim: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Slice a structurally pruned model's HF tensors to its kept heads and channels; returns the
    smaller tensors and the config.json with the new head counts and MLP width."""
    out = dict(tensors)
    num_heads = int(config_json["num_attention_heads"])
    group = num_heads // int(config_json.get("num_key_value_heads") or num_heads)
    for i, (kept, channels) in enumerate(zip(result.heads, result.channels)):
        p = f"model.layers.{i}."
        q_heads = torch.tensor([h for g in kept for h in g])
        kv_heads = torch.tensor([g[0] // group for g in kept])

        def rows(heads: torch.Tensor) -> torch.Tensor:  # row indices of whole heads
            return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()

        for proj, idx in (("q_proj", rows(q_heads)), ("k_proj", rows(kv_heads)), ("v_proj", rows(kv_heads))):
            for leaf in ("weight", "bias"):
                name = f"{p}self_attn.{proj}.{leaf}"
                if name in out:
                    out[name] = out[name].index_select(0, idx).contiguous()
        out[f"{p}self_attn.o_proj.weight"] = out[f"{p}self_attn.o_proj.weight"].index_select(1, rows(q_heads)).contiguous()
        ch = torch.tensor(channels)
        for proj in ("gate_proj", "up_proj"):
            out[f"{p}mlp.{proj}.weight"] = out[f"{p}mlp.{proj}.weight"].index_select(0, ch).contiguous()
        out[f"{p}mlp.down_proj.weight"] = out[f"{p}mlp.down_proj.weight"].index_select(1, ch).contiguous()
    cfg = dict(config_json)
    if result.heads:
        cfg["num_key_value_heads"] = len(result.heads[0])
        cfg["num_attention_heads"] = len(result.heads[0]) * len(result.heads[0][0])
        cfg["head_dim"] = head_dim
        cfg["intermediate_size"] = len(result.channels[0])
    return out, cfg
