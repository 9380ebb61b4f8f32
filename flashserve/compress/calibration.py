"""Calibration text and per-layer input statistics for activation-aware compression.

Wanda scores, activation-aware SVD and structured importance all need the second moments of
each linear layer's inputs. They are gathered layer by layer (as Wanda and SparseGPT do): the
calibration sequences' hidden states enter layer i, statistics are taken with forward pre-hooks,
the caller compresses layer i, and the compressed layer then computes layer i+1's inputs, so
every layer is fitted to the inputs it will see after the layers below it were compressed.
Two passes of the whole model in all, whatever the depth.

The default calibration text is Debian's license texts other than the GPL family
(``CALIBRATION_TEXTS``); the quality figures are measured on GPL-3 (flashserve.bench.quality),
which the calibration never sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flashserve.bench.quality import LICENSES_DIR
from flashserve.compress.packed import packed
from flashserve.layers.linear import Linear

CALIBRATION_TEXTS = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "MPL-1.1", "MPL-2.0")


def calibration_sequences(
    encode: Callable[[str], list[int]], num_seqs: int = 32, seq_len: int = 512, files: Sequence[str] = ()
) -> list[list[int]]:
    """``num_seqs`` non-overlapping windows of ``seq_len`` tokens of the calibration texts
    (``files``, or by default ``CALIBRATION_TEXTS`` in /usr/share/common-licenses)."""
    if num_seqs < 1 or seq_len < 2:
        raise ValueError(f"calibration needs num_seqs >= 1 and seq_len >= 2, got {num_seqs} and {seq_len}")
    paths = [Path(f) for f in files] or [LICENSES_DIR / name for name in CALIBRATION_TEXTS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"calibration text(s) not found: {', '.join(missing)}")
    ids: list[int] = []
    for p in paths:
        ids += encode(p.read_text(encoding="utf-8", errors="replace") + "\n\n")
    if len(ids) < num_seqs * seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, {num_seqs} x {seq_len} were asked for; "
                         "ask for fewer or shorter sequences or give more text")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(num_seqs)]


@dataclass
class InputStats:
    """Sums over the calibration tokens of one linear layer's inputs x [in] (fp64)."""

    count: int
    sq_sum: torch.Tensor  # [in], sum of x_j^2
    gram: torch.Tensor | None  # [in, in], sum of x x^T (only when asked for)

    @property
    def mean_sq(self) -> torch.Tensor:  # [in], E[x_j^2]
        return self.sq_sum / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:  # [in, in], E[x x^T]
        if self.gram is None:
            raise ValueError("the full second-moment matrix was not collected")
        return self.gram / max(self.count, 1)


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The linear projections of a decoder layer by name relative to it (e.g. ``self_attn.qkv_proj``)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, Linear)}


class _Stop(Exception):
    """Raised by the hook that captured layer 0's inputs: the rest of the model need not run."""


def first_layer_inputs(model: nn.Module, batch: Sequence[Sequence[int]],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, residual) that decoder layer 0 receives for the packed ``batch``, taken from the
    model's own forward pass (whatever it does before the layers: Gemma scales the embeddings)."""
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append((args[1], args[2]))  # layer(rope, hidden, residual, kv_cache)
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), packed(batch, device) as (ids, pos):
            model(ids, pos, None)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the model's forward pass never reached decoder layer 0")
    return captured[0]


class LayerwiseCalibration:
    """Carries calibration sequences through the decoder one layer at a time.

    ``collect(layer)`` gathers input statistics of the layer's linears on its current inputs;
    ``advance(layer)`` runs the (now compressed) layer to produce the next layer's inputs.
    """

    def __init__(self, model: nn.Module, seqs: Sequence[Sequence[int]], batch_tokens: int = 4096) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.batches: list[list[Sequence[int]]] = []
        for s in seqs:
            if not self.batches or sum(map(len, self.batches[-1])) + len(s) > batch_tokens:
                self.batches.append([])
            self.batches[-1].append(s)
        # Per batch: (hidden, residual) entering the next layer; residual None before layer 0.
        self.states = [first_layer_inputs(model, batch, self.device) for batch in self.batches]

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        return enumerate(self.model.model.layers)

    def _run(self, layer: nn.Module, keep: bool) -> None:
        new_states = []
        rotary = layer.self_attn.rotary_emb  # the rope module this layer shares with its base's layers
        with torch.no_grad():
            for batch, (hidden, residual) in zip(self.batches, self.states):
                with packed(batch, self.device) as (_, pos):
                    out = layer(rotary.lookup(pos), hidden, residual, None)
                new_states.append(out)
        if keep:
            self.states = new_states

    def collect(self, layer: nn.Module, gram: bool = False) -> dict[str, InputStats]:
        """Input statistics of every linear of ``layer`` on its current inputs (``gram``: also the
        full [in, in] second-moment sums, needed by whitened SVD)."""
        stats: dict[str, InputStats] = {}
        hooks = []

        def hook_for(name: str, in_features: int):
            acc = InputStats(0, torch.zeros(in_features, dtype=torch.float64, device=self.device),
                             torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device) if gram else None)
            stats[name] = acc

            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].detach().float().reshape(-1, in_features)  # [T, in]
                acc.count += x.shape[0]
                acc.sq_sum += x.pow(2).sum(0).double()
                if acc.gram is not None:
                    acc.gram += (x.T @ x).double()

            return hook

        for name, module in linear_modules(layer).items():
            hooks.append(module.register_forward_pre_hook(hook_for(name, module.in_features)))
        try:
            self._run(layer, keep=False)
        finally:
            for h in hooks:
                h.remove()
        return stats

    def advance(self, layer: nn.Module) -> None:
        """Run ``layer`` on the current inputs; its outputs become the next layer's inputs."""
        self._run(layer, keep=True)
