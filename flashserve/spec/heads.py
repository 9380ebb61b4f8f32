"""Medusa-style parallel drafting heads: from one hidden state, guess the next k tokens at once.

The target's final hidden state h at position t gives token t + 1 through its LM head; head i
(i = 0 .. n-1) maps h to a state whose LM-head logits predict token t + 2 + i. A head is one
residual block, ``h + SiLU(W h + b)``, and all heads share the target's LM head (frozen), so a
head costs one hidden x hidden matrix, and the file is small. Heads are trained by
``flashserve train-heads`` on the target's own generations (``flashserve.spec.train_heads``) and
saved as safetensors, by default beside the model (``default_heads_path``), with metadata: the
target's shapes and a fingerprint of its LM head (heads trained for another model are refused),
and each head's measured top-k accuracy.

As a proposer: after every sampling step the heads read the hidden state of the request's last
accepted position (the state that produced the token just emitted) and keep their top-W guesses
on the host; the next step drafts them: a chain of the heads' top-1 tokens, or with
``tree_width`` W > 1 a tree of the W best tokens per head, the most probable paths first
(probabilities: the heads' own softmax). This is the blockwise-parallel drafting of Stern et al.
(2018) with Medusa's (Cai et al. 2024) heads and trees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flashserve.spec.tree import TokenTree, best_first_tree

HEADS_FORMAT = "flashserve-medusa-1"
MAX_TREE_WIDTH_STORED = 8  # top-W candidates kept per head per step


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: every head predicts like the LM head
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """hidden [N, H] -> head states [n_heads, N, H] (fed to the target's LM head)."""

    def __init__(self, num_heads: int, hidden_size: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([ResBlock(hidden_size) for _ in range(num_heads)])

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(hidden) for head in self.heads])


def default_heads_path(model_source: str) -> Path:
    """Where ``flashserve train-heads`` saves heads for a model, and where the engine looks:
    ``<model folder>/flashserve_heads.safetensors`` or ``<model>.gguf.heads.safetensors``."""
    p = Path(model_source)
    return p / "flashserve_heads.safetensors" if p.is_dir() else p.with_name(p.name + ".heads.safetensors")


def model_fingerprint(model: nn.Module) -> str:
    """A short digest of the target's shapes and a few rows of its LM head (rounded to bf16, so
    the same weights loaded in fp32 or bf16 agree; a packed head's values as its kernels use them)."""
    weight = model.lm_head.dense_weight()
    rows = sorted({0, 1, weight.shape[0] // 2, weight.shape[0] - 1})
    sample = weight[rows].detach().to(torch.bfloat16).view(torch.int16).cpu().numpy()
    h = hashlib.sha256(sample.tobytes())
    h.update(str((tuple(weight.shape), len(model.model.layers))).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class HeadsMetadata:
    num_heads: int
    hidden_size: int
    vocab_size: int
    fingerprint: str
    accuracy: list[list[float]]  # [head][j]: share of positions whose target is in the head's top j + 1
    model: str = ""

    def to_strings(self) -> dict[str, str]:
        return {"format": HEADS_FORMAT, "num_heads": str(self.num_heads), "hidden_size": str(self.hidden_size),
                "vocab_size": str(self.vocab_size), "fingerprint": self.fingerprint,
                "accuracy": json.dumps(self.accuracy), "model": self.model}

    @staticmethod
    def from_strings(meta: dict[str, str], path: Path) -> HeadsMetadata:
        if meta.get("format") != HEADS_FORMAT:
            raise ValueError(f"{path} is not a flashserve heads file (format {meta.get('format')!r}, "
                             f"expected {HEADS_FORMAT!r})")
        return HeadsMetadata(int(meta["num_heads"]), int(meta["hidden_size"]), int(meta["vocab_size"]),
                             meta["fingerprint"], json.loads(meta["accuracy"]), meta.get("model", ""))


def save_heads(heads: MedusaHeads, meta: HeadsMetadata, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(tensors, str(path), metadata=meta.to_strings())


def load_heads(path: str | Path, model: nn.Module, device: torch.device, dtype: torch.dtype
               ) -> tuple[MedusaHeads, HeadsMetadata]:
    """Heads for ``model``; raises ValueError when the file is missing or made for another model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no drafting heads at {path}; train them with `flashserve train-heads` "
                         f"or give speculative_config 'heads': <file>")
    with safe_open(str(path), "pt") as f:
        meta = HeadsMetadata.from_strings(f.metadata() or {}, path)
    cfg = model.config
    if (meta.hidden_size, meta.vocab_size) != (cfg.hidden_size, cfg.vocab_size) or \
            meta.fingerprint != model_fingerprint(model):
        raise ValueError(f"the heads in {path} were trained for another model ({meta.model or 'unknown'}: hidden "
                         f"{meta.hidden_size}, vocabulary {meta.vocab_size}, fingerprint {meta.fingerprint}); this "
                         f"model has hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size}, fingerprint "
                         f"{model_fingerprint(model)}; train heads for it with `flashserve train-heads`")
    heads = MedusaHeads(meta.num_heads, meta.hidden_size)
    heads.load_state_dict(load_file(str(path)))
    return heads.to(device=device, dtype=dtype).eval().requires_grad_(False), meta


@dataclass
class HeadsState:
    """A request's head guesses from its last step: ids / probs [n_heads][W]."""

    ids: list[list[int]]
    probs: list[list[float]]


class HeadsProposer:
    name = "heads"

    def __init__(self, config, worker, target_source: str) -> None:
        path = Path(config.heads) if config.heads else default_heads_path(target_source)
        self.worker = worker
        self.heads, self.meta = load_heads(path, worker.model, worker.device, worker.dtype)
        self.width = config.tree_width
        k = config.num_speculative_tokens
        if config.tree_width == 1 and k > self.meta.num_heads:
            raise ValueError(f"num_speculative_tokens ({k}) exceeds the {self.meta.num_heads} heads in {path}; "
                             f"a chain of drafts takes one token per head (use tree_width > 1 for more nodes)")
        self.keep = min(max(self.width, 1), MAX_TREE_WIDTH_STORED)

    def after_sampling(self, hidden: torch.Tensor, inp, states: list, handle, spec) -> None:
        """Guess the next tokens of every sampling row from the state of its last accepted position."""
        w = self.worker
        if spec is not None and spec.path is not None:  # rows of the accepted nodes' hidden states
            qsl = torch.as_tensor(inp.query_start_loc[inp.sample_rows], device=w.device)
            last = spec.path.gather(1, (spec.num_tokens - 1)[:, None])[:, 0]
            sizes = torch.as_tensor([spec.trees[i].size if i in spec.trees else 1 for i in inp.sample_rows],
                                    device=w.device)
            idx = torch.where(sizes > 1, qsl + last, torch.as_tensor(inp.logits_indices, device=w.device))
        else:
            idx = w._to_device(inp.logits_indices)
        states_h = self.heads(hidden[idx])  # [n, S, H]
        n, S = states_h.shape[:2]
        probs = w.model.compute_logits(states_h.flatten(0, 1)).softmax(dim=-1)  # [n * S, V]
        top_p, top_i = probs.topk(self.keep, dim=-1)
        handle.host["heads_ids"] = w._to_host(top_i.view(n, S, -1).transpose(0, 1).contiguous())
        handle.host["heads_probs"] = w._to_host(top_p.view(n, S, -1).transpose(0, 1).float().contiguous())

    def on_result(self, state, tokens: tuple[int, ...], handle, row: int) -> None:
        if handle is None or "heads_ids" not in handle.host:
            return
        state.spec = HeadsState(handle.host["heads_ids"][row].tolist(), handle.host["heads_probs"][row].tolist())

    def propose(self, items) -> tuple[list[TokenTree], None]:
        table = self.worker.batch.tokens
        trees = []
        for e, st in items:
            root = int(table[st.slot, st.num_known - 1])
            hs = st.spec if isinstance(st.spec, HeadsState) else None
            if hs is None:
                trees.append(TokenTree.chain(root, ()))
            elif self.width == 1:
                trees.append(TokenTree.chain(root, [ids[0] for ids in hs.ids[: e.num_spec_tokens]]))
            else:
                cands = [ids[: self.width] for ids in hs.ids]
                probs = [list(np.asarray(p[: self.width], dtype=np.float64)) for p in hs.probs]
                trees.append(best_first_tree(root, cands, probs, e.num_spec_tokens))
        return trees, None
