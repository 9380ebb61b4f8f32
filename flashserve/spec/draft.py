"""Drafts from a small model run by the Worker: a separate draft model, or the target's first layers.

* ``method="draft"``: any flashserve model with the target's vocabulary (a distilled student
  from ``flashserve distill``, a smaller model of the same family). Its K/V lives in a pool of its
  own (``[layers, 2, num_blocks, block_size, Hkv, D]``) addressed by the *target's* block ids, so
  the block manager, prefix caching and preemption need nothing new: a block id means the same
  tokens in both pools. The engine sizes the pool count from the sum of both models' bytes. A
  target with several groups of layers (Gemma 3's local and global layers,
  ``flashserve.cache.kv_groups``) lends the table of its full-attention group, which keeps every
  position; a draft with windowed layers of its own (Gemma 3 drafting for Gemma 3) reads its
  windows from that one table.
* ``method="layers"``: self-speculation. The target's first L layers, its final norm and its LM
  head (early exit used as a draft). It shares the target's K/V (each layer through its own
  group's block table): the target's verification pass computes layers 0..L-1 of every accepted
  token exactly as the draft would, so the draft never catches up on anything but the newest
  token. With LoRA adapters each draft token runs its request's adapter, as the target does.

A round, for the requests that speculate this step (all at once, batched):
1. catch-up: the draft computes the tokens its cache lacks, up to the root (the last known
   token at position P); a separate draft model starts at 0 for a request the Worker has just
   (re)admitted, then needs one or two tokens per round;
2. k - 1 single-token steps extend the chain (P+1, P+2, ...). Greedy requests take the argmax
   (with ``tree_width`` W > 1 the chain has k // W tokens and each position adds the next W - 1
   most likely tokens as sibling leaves); random ones sample from the draft's own distribution
   q (temperature, top-k/top-p/min-p) and send q along for the ratio test.
After the target's verification, a separate draft's cache is valid up to the longest accepted
prefix of its chain (``on_result``).

Steps run over static buffers, replayed as CUDA graphs on GPU (decode and small mixed steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flashserve.cache.kv_groups import KVLayout
from flashserve.layers.attention_metadata import forward_context
from flashserve.layers.sampler import Sampler, SamplingRow, race_argmax
from flashserve.runner.cuda_graphs import CudaGraphs, StepBuffers
from flashserve.sched.plan import ScheduledRequest
from flashserve.spec.tree import TokenTree

DRAFT_SALT = 0x2545F4914F6CDD1D  # seeded draft sampling uses a stream independent of verification's


def draft_group(layout: KVLayout) -> int:
    """The target's group of layers whose block ids address a separate draft's K/V
    (``DraftProposer``): one that keeps every position, so a draft catching up from position 0
    (after the target's windowed groups released the old blocks) finds them all. A one-group
    target has no choice (group 0; windowed there, the draft's context is only as good as the
    window: docs/decoding.md). Several groups that all keep a window: a clear error."""
    if layout.num_groups == 1:
        return 0
    for g, group in enumerate(layout.groups):
        if group.span is None and group.kv_budget is None:
            return g
    raise ValueError("speculative method 'draft' needs a target with full-attention layers: the draft model's K/V "
                     "is addressed by the block ids of the target's layers that keep every position, and every "
                     f"layer of this target keeps a window ({layout.num_groups} groups of layers); use method "
                     "'ngram', 'layers' or 'heads', or the model's own attention")


class FirstLayers(nn.Module):
    """The target's first ``num_layers`` decoder layers + its final norm + its LM head."""

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        super().__init__()
        n = len(target.model.layers)
        if not 1 <= num_layers < n:
            raise ValueError(f"speculative 'num_layers' must be in [1, {n - 1}] for a model of {n} layers, "
                             f"got {num_layers}")
        self.target = [target]  # a list: not a submodule (no second copy in parameters())
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list) -> torch.Tensor:
        m = self.target[0].model
        hidden = m.embed(input_ids)
        ropes = [emb.lookup(positions) for emb in m.rotary]
        residual = None
        for i in range(self.num_layers):
            hidden, residual = m.layers[i](ropes[m._rope_index[i]], hidden, residual, kv_caches[i])
        hidden, _ = m.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target[0].compute_logits(hidden)


class StepRunner:
    """One model's forward over static step buffers (and CUDA graphs on GPU): the draft's steps.
    ``num_groups``: the groups of block tables its layers read (``flashserve.cache.kv_groups``;
    a layer of group g reads the g-th table and slot mapping given to ``run``)."""

    def __init__(self, model: nn.Module, kv_caches: list, block_size: int, max_tokens: int, max_seqs: int,
                 max_blocks: int, max_seq_len: int, device: torch.device, cuda_graphs: bool,
                 max_graph_tokens: int = 64, num_groups: int = 1) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.buffers = StepBuffers(max_tokens, max_seqs, max_blocks, device, num_groups)
        self.graphs = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = CudaGraphs(model, kv_caches, self.buffers, block_size, max_seq_len, max_seqs, max_graph_tokens)
            self.graphs.capture()

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def run(self, input_ids: torch.Tensor, positions: np.ndarray, slot_mappings: list[np.ndarray],
            query_lens: np.ndarray, seq_lens: np.ndarray, request_slots: np.ndarray,
            block_tables: list[torch.Tensor], tree=None, verify_seqs: frozenset[int] = frozenset()) -> torch.Tensor:
        """Hidden states [T, hidden]. input_ids: [T] on the device; the rest host arrays: positions
        [T], query_lens / seq_lens / request_slots (rows of the block tables) [B]; per group of
        tables, the new tokens' slots [T] and the device block table ``[slots, max_blocks]``.
        ``tree``: token-tree masks (``flashserve.kernels.tree_mask.TreeMask``), run eagerly;
        ``verify_seqs``: the sequences verifying drafts (``AttentionMetadata.verify_seqs``)."""
        t, b = len(positions), len(query_lens)
        is_decode = t == b
        key = self.graphs.pick(t, b, is_decode) if self.graphs is not None and tree is None else None
        pt, pb = self.graphs.padded_shape(key) if key is not None else (t, b)
        buf = self.buffers
        n = len(slot_mappings)
        i64 = np.full((1 + n) * pt, -1, dtype=np.int64)  # positions, then each group's slots (-1: padding)
        i64[:pt] = 0
        i64[:t] = positions
        for j, slots in enumerate(slot_mappings):
            i64[(1 + j) * pt : (1 + j) * pt + t] = slots
        i32 = np.zeros(2 * pb + 1, dtype=np.int32)
        i32[1 : b + 1] = np.cumsum(query_lens)
        i32[b + 1 : pb + 1] = t
        i32[pb + 1 : pb + 1 + b] = seq_lens
        d64, d32 = self._to_device(i64), self._to_device(i32)
        buf.input_ids[:t].copy_(input_ids)
        buf.input_ids[t:pt].zero_()
        buf.positions[:pt].copy_(d64[:pt])
        rows = self._to_device(request_slots.astype(np.int64))
        for j, (slots, table, src) in enumerate(zip((buf.slot_mapping, *buf.group_slot_mapping),
                                                    (buf.block_tables, *buf.group_block_tables), block_tables)):
            slots[:pt].copy_(d64[(1 + j) * pt : (2 + j) * pt])
            torch.index_select(src, 0, rows, out=table[:b])
        buf.query_start_loc[: pb + 1].copy_(d32[: pb + 1])
        buf.seq_lens[:pb].copy_(d32[pb + 1 :])
        if key is not None:
            return self.graphs.replay(key, t)
        meta = buf.metadata(t, b, int(query_lens.max()), int(seq_lens.max()), self.block_size,
                            query_lens.tolist(), seq_lens.tolist(), is_decode)
        for m in (meta, *meta.groups):
            m.tree, m.verify_seqs = tree, verify_seqs
        with forward_context(meta):
            return self.model(buf.input_ids[:t], buf.positions[:t], self.kv_caches)


@dataclass
class DraftState:
    """A request's draft-model state on the Worker."""

    valid: int = 0  # leading positions whose draft K/V is in the draft cache
    root_pos: int = 0  # position of the last round's root
    chain: tuple[int, ...] = ()  # the last round's chain of drafts (greedy path)


@dataclass
class DraftOutput:
    """A round's drafts: one tree per request; q [R, N, V] for requests that sampled their chain."""

    trees: list[TokenTree]
    draft_probs: torch.Tensor | None
    sampled: list[bool]


class DraftProposer:
    """See the module docstring. ``shares_kv``: the draft is the target's first layers."""

    writes_kv = True  # drafting writes K/V into the step's new blocks: their ids go to the device first

    def __init__(self, name: str, model: nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
                 shares_kv: bool, tree_width: int, worker) -> None:
        self.name = name
        self.model = model
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.shares_kv = shares_kv
        self.tree_width = tree_width
        self.worker = worker
        self.runner: StepRunner | None = None
        self.groups: tuple[int, ...] = (0,)  # the Worker's groups of layers whose tables the draft reads (start)

    def kv_bytes_per_block(self) -> int:
        if self.shares_kv:
            return 0
        w = self.worker
        return 2 * self.num_layers * w.block_size * self.num_kv_heads * self.head_dim * w.dtype.itemsize

    def start(self, num_blocks: int) -> None:
        w = self.worker
        if self.shares_kv:  # the target's first layers, each through its own group's table
            caches = w.kv_caches[: self.num_layers]
            self.groups = tuple(range(w.layout.num_groups))
        else:  # every draft layer through one target table that keeps every position
            self.groups = (draft_group(w.layout),)
            shape = (self.num_layers, 2, num_blocks, w.block_size, self.num_kv_heads, self.head_dim)
            alloc = torch.zeros if w.device.type == "cuda" else torch.empty
            self.pool = alloc(shape, dtype=w.dtype, device=w.device)
            caches = [(self.pool[i, 0], self.pool[i, 1]) for i in range(self.num_layers)]
        sched = w.config.scheduler
        self.runner = StepRunner(self.model, caches, w.block_size, sched.max_num_batched_tokens, sched.max_num_seqs,
                                 w.max_blocks, w.max_model_len, w.device,
                                 w.config.cuda_graphs and w.attn_backend.name == "triton",
                                 num_groups=len(self.groups))

    # ----------------------------------------------------------------- a round
    def _run(self, ids: torch.Tensor, positions: np.ndarray, query_lens: np.ndarray, seq_lens: np.ndarray,
             request_slots: np.ndarray) -> torch.Tensor:
        """One draft step through the Worker's tables of ``self.groups`` (host tables for the new
        tokens' slots, device tables for the attention; read at each step, as the Worker grows them)."""
        w = self.worker
        bs = w.block_size
        host = (w.batch.block_table, *w.batch.group_tables)
        device = (w.block_table, *w.group_block_tables)
        token_slots = np.repeat(request_slots, query_lens)
        slot_maps = [host[g][token_slots, positions // bs].astype(np.int64) * bs + positions % bs for g in self.groups]
        if self.shares_kv and w.lora is not None:  # the target's adapted layers: each token's LoRA adapter
            self._set_lora(w.batch.lora[token_slots])
        return self.runner.run(ids, positions, slot_maps, query_lens, seq_lens, request_slots,
                               [device[g] for g in self.groups])

    def _set_lora(self, token_lora: np.ndarray) -> None:
        """Point the target's LoRA layers at the draft step's tokens (``flashserve.lora``): their
        adapters into the Worker's adapter row, which the layers (and their captured graphs) read.
        The Worker writes the row again for its own step, after the drafts."""
        lora = self.worker.lora.batch
        lora.ids[: len(token_lora)].copy_(torch.from_numpy(token_lora))
        lora.set_step(token_lora if (token_lora >= 0).any() else None)

    def propose(self, items: list[tuple[ScheduledRequest, object]]) -> tuple[list[TokenTree], list | None]:
        """One tree per request, and per request q [n, V] of a sampled chain (else None)."""
        out = self._round(items, self.worker.sampler)
        if out.draft_probs is None:
            return out.trees, None
        return out.trees, [out.draft_probs[i, : t.num_drafts] if s else None
                           for i, (t, s) in enumerate(zip(out.trees, out.sampled))]

    def _round(self, items: list[tuple[ScheduledRequest, object]], sampler: Sampler) -> DraftOutput:
        w = self.worker
        dev = w.device
        table = w.batch.tokens
        R = len(items)
        greedy = [st.params.temperature == 0.0 for _, st in items]
        width = [self.tree_width if g else 1 for g in greedy]
        k = [e.num_spec_tokens for e, _ in items]
        chain_len = [kk if wd == 1 else max(1, kk // wd) for kk, wd in zip(k, width)]
        roots = [e.start_pos for e, _ in items]
        # 1. catch-up to the root, one prefill-like step for every request.
        starts = []
        for (e, st), root in zip(items, roots):
            ds = st.spec if isinstance(st.spec, DraftState) else None
            starts.append(root if self.shares_kv else min(ds.valid if ds is not None else 0, root))
        slots = np.array([st.slot for _, st in items], dtype=np.int64)
        logits = self._catch_up(starts, roots, slots)  # [R, V] at each root
        # 2. extend the chains.
        rows = [SamplingRow(st.params, st.num_output_tokens, None) for _, st in items]
        max_c = max(chain_len)
        max_w = max(width)
        chain = torch.zeros((R, max_c), dtype=torch.int64, device=dev)
        alts = torch.zeros((R, max_c, max(max_w - 1, 1)), dtype=torch.int64, device=dev)
        probs = torch.zeros((R, max_c, logits.shape[1]), device=dev) if not all(greedy) else None
        active = list(range(R))
        for j in range(max_c):
            sub_rows = [rows[i] for i in active]
            idx = torch.as_tensor(active, device=dev)
            best = logits.argmax(dim=-1)
            if max_w > 1:
                top = logits.topk(max_w, dim=-1).indices
                best = top[:, 0]
                alts[idx, j] = top[:, 1:]
            if probs is not None and not all(greedy[i] for i in active):
                q = Sampler.distribution(logits, sub_rows)
                noise = sampler.exponential_noise(tuple(q.shape), sub_rows, dev, position_offset=j, salt=DRAFT_SALT)
                drawn = race_argmax(q, noise)
                is_greedy = torch.as_tensor([greedy[i] for i in active], device=dev)
                best = torch.where(is_greedy, best, drawn)
                probs[idx, j] = q
            chain[idx, j] = best
            active = [i for i in active if j + 1 < chain_len[i]]
            if not active:
                break
            # Feed the new draft at position root + 1 + j for the requests that continue.
            pos = np.array([roots[i] + 1 + j for i in active], dtype=np.int64)
            feed = chain[torch.as_tensor(active, device=dev), j]
            ones = np.ones(len(active), dtype=np.int64)
            hidden = self._run(feed, pos, ones, pos + 1, slots[active])
            logits = self.model.compute_logits(hidden)
        chain_h = chain.cpu().tolist()
        alts_h = alts.cpu().tolist() if max_w > 1 else None
        trees = []
        for i, ((_, st), root) in enumerate(zip(items, roots)):
            root_tok = int(table[st.slot, root])
            c = chain_h[i][: chain_len[i]]
            if width[i] > 1:
                chains = [c] + [c[:j] + [a] for j in range(len(c)) for a in alts_h[i][j][: width[i] - 1]]
                tree = TokenTree.from_chains(root_tok, chains, k[i])
            else:
                tree = TokenTree.chain(root_tok, c)
            trees.append(tree)
            if not self.shares_kv:
                st.spec = DraftState(valid=root + 1, root_pos=root, chain=tuple(c))
        return DraftOutput(trees, probs, [not g for g in greedy])

    def _catch_up(self, starts: list[int], roots: list[int], slots: np.ndarray) -> torch.Tensor:
        """Compute positions start .. root of every request (in passes that fit the step buffers);
        logits [R, V] at each root."""
        dev = self.worker.device
        table = self.worker.batch.tokens
        cap = max(1, self.runner.buffers.max_tokens // len(roots))
        pos = list(starts)
        hidden_last: list[torch.Tensor | None] = [None] * len(roots)
        while any(p <= r for p, r in zip(pos, roots)):
            rows = [i for i, (p, r) in enumerate(zip(pos, roots)) if p <= r]
            ends = [min(roots[i], pos[i] + cap - 1) for i in rows]
            positions = np.concatenate([np.arange(pos[i], e + 1) for i, e in zip(rows, ends)]).astype(np.int64)
            lens = np.array([e - pos[i] + 1 for i, e in zip(rows, ends)], dtype=np.int64)
            sub = slots[rows]
            ids = torch.from_numpy(table[np.repeat(sub, lens), positions].astype(np.int64)).to(dev)
            hidden = self._run(ids, positions, lens, np.array(ends, dtype=np.int64) + 1, sub)
            last = np.cumsum(lens) - 1
            for j, (i, e) in enumerate(zip(rows, ends)):
                if e == roots[i]:
                    hidden_last[i] = hidden[int(last[j])]
                pos[i] = e + 1
        return self.model.compute_logits(torch.stack(hidden_last))

    def on_result(self, state, tokens: tuple[int, ...], handle=None, row: int = 0) -> None:
        """A separate draft's cache holds the root and the chain drafts it fed itself (all but
        the last); it stays valid up to where the accepted tokens leave that chain."""
        ds = state.spec
        if self.shares_kv or not isinstance(ds, DraftState) or not ds.chain:
            return
        fed = ds.chain[:-1]
        m = 0
        while m < len(fed) and m < len(tokens) - 1 and tokens[m] == fed[m]:
            m += 1
        ds.valid = ds.root_pos + 1 + m
