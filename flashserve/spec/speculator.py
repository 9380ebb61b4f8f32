"""The Worker side of speculative decoding: propose, verify, keep the accepted K/V.

The Worker calls, per step:

* ``propose(entries)``: for the plan entries with draft slots (``num_spec_tokens`` = k), the
  proposer's token tree per request (at most k drafts). Drafts are written into the request's
  row of the Worker's token table after its known tokens, and each entry is rewritten with the
  real draft count (a proposer may find fewer), so ``InputBatch.build`` lays them out like any
  other new tokens. Tree nodes are stored at their index position and rotated at their depth
  position (``adjust_inputs``); the attention backends mask a tree's nodes to their ancestors
  (``flashserve.kernels.tree_attention``). Chains need no mask: causal attention is right.
* ``verify(hidden, ...)`` instead of the sampler: the target's logits of every node, processed
  as plain decoding processes them at that position (``Sampler.process`` with the drafts on the
  path counted as generated), then ``flashserve.spec.acceptance.verify``; when every row is plain
  greedy, the argmax at every node and one launch that walks each tree
  (``flashserve.kernels.tree_accept``). Rows without drafts are roots without children: sampled
  exactly like plain decoding. Penalty counts get every
  emitted token; a tree's accepted path is copied from index to depth positions in the cache
  (all layers, each through its group's block table; values and 8-bit scales), so the cache
  holds exactly the accepted tokens.
* ``after_sampling``: proposers that draft from this step's state (heads) run here, and the
  step's cost is measured (``StepCost``, for the off-switch);
* ``on_result``: proposers that keep per-request state (a draft model's cache length) learn
  what was accepted.

A step without draft slots (every request switched off, or prompt chunks only) takes none of
these calls unless the proposer drafts from every step's state (``takes_part``): the Worker runs
it as a plain engine would. With the off-switch on, one plain decode step in
``PLAIN_TIMING_EVERY`` is timed all the same (``times_plain``, ``start_timing``, then
``after_sampling``): the off-switch's cost fit needs the one-token rows too, which steps with
drafts lack once a request drafts only when prompt lookup finds something.

Nothing here waits for the device except reading the drafts a draft model made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from flashserve.config import EngineConfig
from flashserve.kernels import kv_quant, loads
from flashserve.kernels.tree_accept import greedy_accept
from flashserve.kernels.tree_mask import TreeMask
from flashserve.layers.sampler import SamplerOutput, SamplingRow, logprobs_width, to_device
from flashserve.sched.plan import ScheduledRequest, StepCost
from flashserve.spec.acceptance import TreeBatch, verify
from flashserve.spec.tree import TokenTree

PLAIN_TIMING_EVERY = 8  # one plain decode step in this many is timed for the off-switch


@dataclass
class SpecStep:
    """What ``propose`` decided for one step."""

    entries: tuple[ScheduledRequest, ...]
    trees: dict[int, TokenTree]  # plan index -> tree (requests with drafts)
    num_drafts: np.ndarray  # [len(entries)] drafts written after each request's known tokens
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # plan index -> q [n, V] (sampled chains)
    tree_meta: TreeMask | None = None
    path: torch.Tensor | None = None  # [S, D + 1] accepted nodes per sampling row (after verify)
    num_tokens: torch.Tensor | None = None  # [S]
    last: torch.Tensor | None = None  # [S] the last token each sampling row emitted (after verify)

    def adjust_inputs(self, inp) -> None:
        """Tree nodes rotate at their depth position; build the attention masks of branching trees."""
        branching = {i: t for i, t in self.trees.items() if not t.is_chain}
        if not branching:
            return
        qsl = inp.query_start_loc
        bits = np.zeros(inp.num_tokens, dtype=np.int64)
        depths = np.zeros(inp.num_tokens, dtype=np.int32)
        tree_lens = np.zeros(inp.num_seqs, dtype=np.int32)
        for i, tree in branching.items():
            start = int(qsl[i])
            depths[start : start + tree.size] = tree.depths
            inp.positions[start : start + tree.size] = self.entries[i].start_pos + depths[start : start + tree.size]
            bits[start : start + tree.size] = tree.ancestor_bits
            tree_lens[i] = tree.size
        self.tree_meta = TreeMask.build(bits, tree_lens, inp.query_start_loc, depths=depths)


class Speculator:
    """Owns the proposer; see the module docstring."""

    def __init__(self, config: EngineConfig, worker, target_source: str) -> None:
        from flashserve.spec.proposers import build_proposer

        self.config = config.speculative
        self.worker = worker
        self.proposer = build_proposer(self.config, worker, target_source)
        self._events: tuple | None = None  # the step's start and its forward's start (timing marks)
        self._plain_steps = 0  # plain decode steps seen (``times_plain``)
        self._loads = 0  # kernels loaded before the step (``flashserve.kernels.loads``)
        self._slabs: dict[int, torch.Tensor] = {}  # layer group -> its pool rows (``_group_slabs``)
        # heads draft from the last hidden state of every step, plain ones included
        self._every_step = hasattr(self.proposer, "after_sampling")

    def kv_bytes_per_block(self) -> int:
        return getattr(self.proposer, "kv_bytes_per_block", lambda: 0)()

    def start(self, num_blocks: int) -> None:
        if hasattr(self.proposer, "start"):
            self.proposer.start(num_blocks)

    def takes_part(self, entries: tuple[ScheduledRequest, ...]) -> bool:
        """Whether a step with these plan entries goes through the speculator: it has draft slots,
        or the proposer drafts from every step."""
        return self._every_step or any(e.num_spec_tokens for e in entries)

    def times_plain(self) -> bool:
        """Whether this plain decode step is timed (one in ``PLAIN_TIMING_EVERY``, off-switch on)."""
        if not self.config.disable_by_cost:
            return False
        self._plain_steps += 1
        return self._plain_steps % PLAIN_TIMING_EVERY == 0

    # ----------------------------------------------------------------- timing (StepCost)
    def start_timing(self) -> None:
        """Mark the start of a step (before its drafting, if any, and its forward)."""
        t0 = self._mark()
        self._events = (t0, t0)
        self._loads = loads.count()

    def _mark(self):
        if self.worker.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @staticmethod
    def _elapsed(a, b) -> float:
        if isinstance(a, float):
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    # ----------------------------------------------------------------- before the forward
    def propose(self, entries: tuple[ScheduledRequest, ...]) -> tuple[tuple[ScheduledRequest, ...], SpecStep | None]:
        w = self.worker
        self.start_timing()
        spec_idx = [i for i, e in enumerate(entries) if e.num_spec_tokens > 0]
        if not spec_idx:
            return entries, None
        if getattr(self.proposer, "writes_kv", False):  # a draft model writes its K/V into this step's new blocks
            w.apply_block_updates(w.batch.append_blocks(entries))
            entries = tuple(e._replace(new_block_ids=()) if e.new_block_ids else e for e in entries)
        items = [(entries[i], w.batch.states[entries[i].request_id]) for i in spec_idx]
        trees, probs = self.proposer.propose(items)
        num_drafts = np.zeros(len(entries), dtype=np.int64)
        new_entries = list(entries)
        step = SpecStep((), {}, num_drafts)
        table = w.batch.tokens
        for j, (i, tree) in enumerate(zip(spec_idx, trees)):
            n = tree.num_drafts
            e = entries[i]
            if n == 0:
                new_entries[i] = e._replace(num_new_tokens=1, num_spec_tokens=0)
                continue
            st = items[j][1]
            table[st.slot, e.start_pos + 1 : e.start_pos + 1 + n] = tree.tokens[1:]
            num_drafts[i] = n
            new_entries[i] = e._replace(num_new_tokens=1 + n, num_spec_tokens=n)
            step.trees[i] = tree
            if probs is not None and probs[j] is not None:
                step.draft_probs[i] = probs[j]
        step.entries = tuple(new_entries)
        self._events = (self._events[0], self._mark())
        if not step.trees:
            return step.entries, None
        return step.entries, step

    # ----------------------------------------------------------------- verification
    def verify(self, hidden: torch.Tensor, inp, rows: list[SamplingRow] | None, spec: SpecStep) -> SamplerOutput:
        """The tokens of every sampling row; ``rows`` None: every row is plain greedy
        (``_verify_greedy``)."""
        if rows is None:
            return self._verify_greedy(hidden, inp, spec)
        w = self.worker
        dev = w.device
        trees, offsets, nodes = self._nodes(hidden, inp, spec)
        raw = w.model.compute_logits(nodes)  # [N_total, V]
        # Each node's SamplingRow at its output position; penalties count the drafts on its path.
        node_params: list[SamplingRow] = []
        extra_rows, extra_toks = [], []
        n_pen = 0
        for row, tree in zip(rows, trees):
            depths = tree.depths
            for node in range(tree.size):
                pos = row.num_output_tokens + depths[node]  # outputs before this node's token
                banned = row.banned_token_ids if pos < row.params.min_tokens else ()
                node_params.append(SamplingRow(row.params, pos, row.penalty_slot, banned))
                if row.penalty_slot is not None:
                    path = tree.path_tokens(node)
                    extra_rows += [n_pen] * len(path)
                    extra_toks += path
                    n_pen += 1
        extra = None
        if extra_rows:
            extra = (to_device(extra_rows, dev, torch.int64), to_device(extra_toks, dev, torch.int64))
        processed = w.sampler.process(raw, node_params, extra)
        batch = self._tree_batch(trees, offsets, spec, inp.sample_rows, raw.shape[1])
        res = verify(w.sampler, processed, node_params, rows, batch, raw, logprobs_width(rows))
        out = res.out
        self._record_penalties(rows, out)
        spec.path, spec.num_tokens = res.path, out.num_tokens
        spec.last = out.token_ids.gather(1, out.num_tokens[:, None] - 1)[:, 0]
        self._compact(inp, spec, res.path, out.num_tokens, trees)
        return out

    def _verify_greedy(self, hidden: torch.Tensor, inp, spec: SpecStep) -> SamplerOutput:
        """``verify`` for plain greedy rows (``SamplingParams.plain_greedy``): the argmax at every node
        (``Sampler.greedy``, as plain decoding), then each row's walk down its tree in one launch
        (``flashserve.kernels.tree_accept``): one upload (the trees)."""
        w = self.worker
        trees, offsets, nodes = self._nodes(hidden, inp, spec)
        M = max(t.size for t in trees)
        table = np.zeros((len(trees), 2 + 2 * M), dtype=np.int64)
        table[:, 0] = offsets
        for r, t in enumerate(trees):
            table[r, 1] = t.size
            table[r, 2 : 2 + t.size] = t.parents
            table[r, 2 + M : 2 + M + t.size] = t.tokens
        argmax = w.sampler.greedy(w.model.compute_logits(nodes)).token_ids
        width = 1 + max(max(t.depths) for t in trees)
        tokens, path, count, last = greedy_accept(argmax, w._to_device(table), width)
        spec.path, spec.num_tokens, spec.last = path, count, last
        self._compact(inp, spec, path, count, trees)
        return SamplerOutput(tokens, num_tokens=count)

    def _nodes(self, hidden: torch.Tensor, inp, spec: SpecStep) -> tuple[list[TokenTree], np.ndarray, torch.Tensor]:
        """Each sampling row's tree (a lone root without drafts), the index of its first node among
        the step's nodes, and the nodes' hidden rows: the last ``tree.size`` tokens of each row's
        query, a slice when every token of the step is a node (no prompt chunk in it)."""
        trees = [spec.trees.get(i) or TokenTree.chain(0, ()) for i in inp.sample_rows]
        sizes = np.fromiter((t.size for t in trees), np.int64, len(trees))
        offsets = np.zeros(len(trees), dtype=np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        if int(sizes.sum()) == inp.num_tokens:
            return trees, offsets, hidden[: inp.num_tokens]
        ends = inp.query_start_loc[np.asarray(inp.sample_rows, dtype=np.int64) + 1].astype(np.int64)
        rows = np.concatenate([np.arange(e - n, e) for e, n in zip(ends, sizes)])
        return trees, offsets, hidden[self.worker._to_device(rows)]

    def _tree_batch(self, trees: list[TokenTree], offsets: np.ndarray, spec: SpecStep, sample_rows: list[int],
                    vocab: int) -> TreeBatch:
        dev = self.worker.device
        S = len(trees)
        N = max(t.size for t in trees)
        kids = [t.children() for t in trees]
        C = max(1, max(len(c) for ks in kids for c in ks))
        node_rows = np.repeat(offsets[:, None], N, axis=1)
        tokens = np.zeros((S, N), dtype=np.int64)
        children = np.full((S, N, C), -1, dtype=np.int64)
        for r, (t, ks) in enumerate(zip(trees, kids)):
            node_rows[r, : t.size] += np.arange(t.size)
            tokens[r, : t.size] = t.tokens
            for node, cs in enumerate(ks):
                children[r, node, : len(cs)] = cs
        max_depth = max(max(t.depths) for t in trees)
        draft_probs = sampled = None
        if spec.draft_probs:
            draft_probs = torch.zeros((S, N, vocab), device=dev)
            flags = [False] * S
            for r, i in enumerate(sample_rows):
                q = spec.draft_probs.get(i)
                if q is not None:
                    draft_probs[r, : q.shape[0], : q.shape[1]] = q
                    flags[r] = True
            sampled = to_device(flags, dev, torch.bool)
        up = self.worker._to_device  # pinned, asynchronous: a blocking copy would wait for the forward
        return TreeBatch(up(node_rows), up(tokens), up(children), max_depth, draft_probs, sampled,
                         chains=all(t.is_chain for t in trees))

    def _record_penalties(self, rows: list[SamplingRow], out: SamplerOutput) -> None:
        """Add every emitted token to the penalty counts (rows past a row's count add nothing:
        they point at its first token with weight 0)."""
        pen = [j for j, r in enumerate(rows) if r.penalty_slot is not None]
        if not pen:
            return
        dev = self.worker.device
        p = self.worker.sampler.penalties
        idx = to_device(pen, dev, torch.int64)
        toks = out.token_ids[idx]  # [M, L]
        valid = torch.arange(toks.shape[1], device=dev)[None, :] < out.num_tokens[idx][:, None]
        toks = torch.where(valid, toks, toks[:, :1])
        slots = to_device([rows[j].penalty_slot for j in pen], dev, torch.int64)[:, None].expand_as(toks)
        p.counts.index_put_((slots.flatten(), toks.flatten()), valid.flatten().float(), accumulate=True)
        p.seen.index_put_((slots.flatten(), toks.flatten()), torch.ones_like(valid.flatten()))

    def _compact(self, inp, spec: SpecStep, path: torch.Tensor, num: torch.Tensor, trees: list[TokenTree]) -> None:
        """Copy each branching tree's accepted nodes from index to depth positions (all layers,
        each through its group's block table: ``flashserve.cache.kv_groups``)."""
        rows = [r for r, t in enumerate(trees) if t.size > 1 and not t.is_chain]
        if not rows:
            return
        w = self.worker
        dev = w.device
        bs = w.block_size
        D = path.shape[1]
        ridx = to_device(rows, dev, torch.int64)
        starts = to_device([spec.entries[inp.sample_rows[r]].start_pos for r in rows], dev, torch.int64)[:, None]
        depth = torch.arange(D, device=dev)[None, :]
        keep = depth < num[ridx][:, None]  # accepted nodes (incl. the root at depth 0)
        src_pos = starts + torch.where(keep, path[ridx], depth)  # no-op copies where nothing moves
        dst_pos = starts + depth
        slots = to_device([w.batch.states[spec.entries[inp.sample_rows[r]].request_id].slot for r in rows], dev,
                          torch.int64)[:, None].expand_as(src_pos)
        so, do = (src_pos % bs).flatten(), (dst_pos % bs).flatten()
        moves = []  # per group: (source blocks, destination blocks) [R * D]
        for table in (w.block_table, *w.group_block_tables):
            table = table.long()
            moves.append((table[slots, src_pos // bs].flatten(), table[slots, dst_pos // bs].flatten()))
        if not kv_quant.is_quantized(w.kv_pool):  # K and V of every layer of a group: one gather, one scatter
            for group, (sb, db) in enumerate(moves):
                slabs = self._group_slabs(group)  # [layers, 1]
                w.kv_pool[slabs, :, db, do] = w.kv_pool[slabs, :, sb, so]
            return
        for (k_cache, v_cache), group in zip(w.kv_caches, w.layout.layer_group):
            sb, db = moves[group]
            for cache in (k_cache, v_cache):
                cache[db, do] = cache[sb, so]
                scales = kv_quant.kv_scales(cache)  # [num_blocks, Hkv, block_size]
                scales[db, :, do] = scales[sb, :, so]

    def _group_slabs(self, group: int) -> torch.Tensor:
        """The pool rows (``KVLayout.layer_slab``) of a layer group's layers, [n, 1] on the device."""
        slabs = self._slabs.get(group)
        if slabs is None:
            layout = self.worker.layout
            rows = sorted({s for s, g in zip(layout.layer_slab, layout.layer_group) if g == group})
            slabs = self._slabs[group] = torch.tensor(rows, device=self.worker.device)[:, None]
        return slabs

    # ----------------------------------------------------------------- after sampling
    def after_sampling(self, hidden: torch.Tensor, inp, states: list, handle, spec: SpecStep | None) -> None:
        if spec is not None:
            handle.num_drafts = {spec.entries[i].request_id: int(spec.num_drafts[i]) for i in spec.trees}
        hook = getattr(self.proposer, "after_sampling", None)
        if hook is not None:
            hook(hidden, inp, states, handle, spec)
        t0, t1 = self._events
        t2 = self._mark()
        num_tokens, num_seqs, loaded = inp.num_tokens, inp.num_seqs, loads.count() != self._loads
        handle.cost = lambda: StepCost(num_tokens, num_seqs, self._elapsed(t1, t2), self._elapsed(t0, t1), loaded)

    def on_result(self, state, tokens: tuple[int, ...], handle=None, row: int = 0) -> None:
        hook = getattr(self.proposer, "on_result", None)
        if hook is not None:
            hook(state, tokens, handle, row)
