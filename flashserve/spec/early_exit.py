"""Confidence-based early exit (CALM-style), a lossy decoding mode of its own.

For decode steps (one new token per sequence) the model runs layer by layer; at each exit
layer (``EarlyExitConfig.exit_layers``, default every second layer from the middle on) the
sequences still running test their confidence:

* ``measure="softmax"``: the largest probability of the LM head (final norm + head) on the
  layer's residual stream >= threshold: accurate, but each test costs an LM-head product;
* ``measure="hidden"``: the cosine similarity between the residual stream after this layer and
  after the previous one >= threshold (the state has saturated): nearly free.

A sequence that exits takes its token from that layer's state (final norm, LM head). The later
layers still need its K/V, for the tokens after it: they are computed from the exit state
(CALM's state propagation: layer j's K/V of the token = layer j's input norm, q/k/v projection,
k-norm and rope applied to the exit state), which skips their attention and MLP. Steps other than
pure decode steps run the full model. The Worker runs this mode eagerly (no CUDA graphs: which
layers run depends on the data), and each exit test reads the decision on the host.

Quality: ``flashserve bench quality --early-exit-config '{...}' --chunk-size 1`` scores text
token by token through this forward against the full model (perplexity, KL, top-1 agreement);
``layers_per_token`` reports the compute actually spent.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.config import EarlyExitConfig
from flashserve.layers.attention import store_kv
from flashserve.layers.attention_metadata import AttentionMetadata, forward_context, get_forward_context


def default_exit_layers(num_layers: int) -> tuple[int, ...]:
    """Every second layer count from the middle on (the full depth is not an exit)."""
    return tuple(range(num_layers // 2, num_layers, 2))


def _sub_metadata(meta: AttentionMetadata, rows: list[int], device: torch.device) -> AttentionMetadata:
    """The metadata of a subset of a decode step's sequences (one token each), with the same
    subset of every group's block tables and slots (models with several KV groups, Gemma 3)."""
    idx = torch.tensor(rows, device=device)
    n = len(rows)
    seq_cpu = [meta.seq_lens_cpu[i] for i in rows]
    return AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
        seq_lens=meta.seq_lens.index_select(0, idx), block_tables=meta.block_tables.index_select(0, idx),
        slot_mapping=meta.slot_mapping.index_select(0, idx), max_query_len=1, max_seq_len=max(seq_cpu),
        query_lens_cpu=[1] * n, seq_lens_cpu=seq_cpu, block_size=meta.block_size, is_decode=True,
        groups=tuple(_sub_metadata(g, rows, device) for g in meta.groups))


class EarlyExitModel(nn.Module):
    """Wraps a Llama-family model (Gemma 3 included: its scaled embedding, several KV groups):
    ``forward`` as the model's (final-normed hidden states, here
    from each sequence's exit layer) for decode steps; ``compute_logits`` is the model's."""

    def __init__(self, model: nn.Module, config: EarlyExitConfig) -> None:
        super().__init__()
        self.target = [model]  # not a submodule: no second copy in parameters()
        n = len(model.model.layers)
        exits = config.exit_layers or default_exit_layers(n)
        bad = [e for e in exits if e >= n]
        if bad:
            raise ValueError(f"exit_layers must be below the model's {n} layers, got {bad[0]}")
        self.exits = set(exits)
        self.config = config
        self.tokens = 0  # decode tokens computed through this forward
        self.layers_run = 0  # full layers they ran (the rest only got K/V)
        self.exits_at: dict[int, int] = {}  # exit layer (layers run) -> tokens that left there
        self.tests = 0  # confidence tests (rows tested at exit layers; "softmax": one LM-head product each)

    @property
    def exit_share(self) -> float:
        """Share of the decode tokens that left before the last layer."""
        return sum(self.exits_at.values()) / self.tokens if self.tokens else 0.0

    @property
    def layers_per_token(self) -> float:
        return self.layers_run / self.tokens if self.tokens else 0.0

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target[0].compute_logits(hidden)

    def _confident(self, state: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """[n] bool: which rows (residual streams [n, H]) are confident enough to exit."""
        m = self.target[0]
        if self.config.measure == "hidden":
            if prev is None:
                return torch.zeros(state.shape[0], dtype=torch.bool, device=state.device)
            return torch.cosine_similarity(state.float(), prev.float(), dim=-1) >= self.config.threshold
        probs = m.compute_logits(m.model.norm(state)).softmax(dim=-1)
        return probs.max(dim=-1).values >= self.config.threshold

    def _propagate_kv(self, layer: nn.Module, state: torch.Tensor, rope, meta: AttentionMetadata,
                      kv_cache) -> None:
        """Layer ``layer``'s K/V of exited tokens, from their exit states [n, H]."""
        attn = layer.self_attn
        x = layer.input_layernorm(state.clone())
        qkv = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        T = state.shape[0]
        q = q.reshape(T, attn.num_heads, attn.head_dim)
        k = k.reshape(T, attn.num_kv_heads, attn.head_dim)
        _, k = attn.rotary_emb(rope, q.contiguous(), k.contiguous(), attn.q_norm, attn.k_norm)
        store_kv(k.reshape(T, attn.num_kv_heads, attn.head_dim), v.reshape(T, attn.num_kv_heads, attn.head_dim),
                 kv_cache[0], kv_cache[1], meta.for_group(attn.attn.kv_group).slot_mapping)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list) -> torch.Tensor:
        m = self.target[0].model
        meta = get_forward_context()
        dev = input_ids.device
        T = input_ids.shape[0]
        if T != meta.num_seqs:  # not a pure decode step: the full model
            return self.target[0](input_ids, positions, kv_caches)
        hidden = m.embed(input_ids)
        out = torch.empty(T, hidden.shape[-1], dtype=hidden.dtype, device=dev)  # (a packed embedding has no .weight)
        residual = None
        active = list(range(T))
        sub_meta = meta
        ropes = [emb.lookup(positions) for emb in m.rotary]
        exited: list[tuple[list[int], torch.Tensor, AttentionMetadata, list]] = []  # rows, states, meta, ropes
        prev_state = None
        for i, layer in enumerate(m.layers):
            for rows, state, e_meta, e_ropes in exited:
                with forward_context(e_meta):
                    self._propagate_kv(layer, state, e_ropes[m._rope_index[i]], e_meta, kv_caches[i])
            if not active:  # every token has left: the remaining layers only get their K/V
                continue
            with forward_context(sub_meta):
                hidden, residual = layer(ropes[m._rope_index[i]], hidden, residual, kv_caches[i])
            self.layers_run += len(active)
            check = i + 1 in self.exits
            need_prev = self.config.measure == "hidden" and i + 2 in self.exits
            if not (check or need_prev):
                continue
            state = hidden + residual  # [n, H] the residual stream after layer i
            if check:
                keep = self._confident(state, prev_state).tolist()
                self.tests += len(keep)
                leave = [j for j, c in enumerate(keep) if c]
                if leave:
                    stay = [j for j, c in enumerate(keep) if not c]
                    rows = [active[j] for j in leave]
                    self.exits_at[i + 1] = self.exits_at.get(i + 1, 0) + len(rows)
                    sel = torch.tensor(leave, device=dev)
                    out[torch.tensor(rows, device=dev)] = m.norm(state.index_select(0, sel)).to(out.dtype)
                    exited.append((rows, state.index_select(0, sel), _sub_metadata(meta, rows, dev),
                                   [emb.lookup(positions[rows]) for emb in m.rotary]))
                    active = [active[j] for j in stay]
                    if not active:
                        continue
                    sel = torch.tensor(stay, device=dev)
                    hidden, residual, state = (t.index_select(0, sel) for t in (hidden, residual, state))
                    sub_meta = _sub_metadata(meta, active, dev)
                    ropes = [emb.lookup(positions[active]) for emb in m.rotary]
            prev_state = state if need_prev else None
        if active:
            final, _ = m.norm(hidden, residual)
            out[torch.tensor(active, device=dev)] = final.to(out.dtype)
        self.tokens += T
        return out
