"""Mixture-of-experts decoders on the Llama decoder: Mixtral, Qwen2-MoE and Qwen3-MoE.

Their attention is Llama's (Qwen2-MoE: q/k/v bias; Qwen3-MoE: q/k norm), and their MLP is the
``"moe"`` layer kind (``flashserve.layers.moe.MoEMLP``) on the layers the config makes sparse
(``ModelConfig.layer_types``), so the model class only adds the checkpoint names of the experts:

* per-expert tensors, ``...mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`` (Qwen) or
  ``...block_sparse_moe.experts.{j}.{w1,w3,w2}.weight`` (Mixtral), load into expert ``j``'s
  slice of the stacked ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``;
* stacked tensors ``...mlp.experts.gate_up_proj`` / ``down_proj`` (transformers >= 5) load whole;
* Mixtral's ``block_sparse_moe`` is this decoder's ``mlp``.

A checkpoint that lacks any expert's tensor is refused, naming the layer, expert and projection.
"""

from __future__ import annotations

import re

from flashserve.layers.moe import EXPERT_PROJECTIONS
from flashserve.models.llama import LlamaForCausalLM
from flashserve.models.registry import register_model

_PER_EXPERT = re.compile(r"^(?P<mlp>.*)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


@register_model("mixtral", "qwen2_moe", "qwen3_moe")
class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-family causal LM whose sparse layers route tokens to experts."""

    def checkpoint_target(self, name: str) -> tuple[str, object]:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        match = _PER_EXPERT.match(name)
        if match is not None and match["proj"] in EXPERT_PROJECTIONS:
            stacked, part = EXPERT_PROJECTIONS[match["proj"]]
            return f"{match['mlp']}.experts.{stacked}", (int(match["expert"]), part)
        if ".experts." in name:  # already stacked
            return name, None
        return super().checkpoint_target(name)
