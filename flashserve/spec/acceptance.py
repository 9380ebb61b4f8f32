"""Lossless acceptance of draft tokens: greedy matching and speculative (rejection) sampling.

Each of R rows verifies a token tree (``flashserve.spec.tree``; a chain is a tree). The target's
logits of every node arrive as rows of one [N_total, V] tensor, already processed exactly as
plain decoding would process them at that position (penalties counting the drafts on the path
before it, min_tokens bans at that output count: ``Sampler.process``). A walk from the root, all
rows at once on the device (no host synchronisation), emits one token per level:

* greedy rows: the target's argmax t at the current node; if a child carries t, move into it,
  otherwise stop. Plain greedy decoding emits the same tokens.
* random rows: p = the node's sampling distribution (``Sampler.distribution``: temperature,
  top-k / top-p / min-p). Children are tried in order:
    - a child sampled from the draft's distribution q (a sampled chain): accept with probability
      min(1, p(x) / q(x)), else continue from the residual norm(max(p - q, 0));
    - a deterministic candidate x (n-gram, heads, the top-k of a draft, greedy drafts): accept
      with probability p(x), else continue from p with x removed, renormalised.
  If no child is accepted, draw the token from what is left of p (the residual). Each rule
  leaves the distribution of the emitted token equal to p (Leviathan et al. 2023 / Chen et al.
  2023 for the first; sampling without replacement for the second; SpecInfer's multi-candidate
  verification is their sequence), so speculative sampling samples from the target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.layers.sampler import Sampler, SamplerOutput, SamplingRow, _row_seed, race_argmax, to_device


@dataclass
class TreeBatch:
    """Device tensors of R token trees (N = largest tree, C = most children of any node)."""

    node_rows: torch.Tensor  # [R, N] int64: row of each node in the node logits (padding: the root's row)
    tokens: torch.Tensor  # [R, N] int64: node tokens (padding 0)
    children: torch.Tensor  # [R, N, C] int64: child nodes in priority order (-1 = none)
    max_depth: int  # host: deepest draft over the rows (the walk takes max_depth + 1 levels)
    draft_probs: torch.Tensor | None = None  # [R, N, V]: q each node's child was sampled from (sampled chains)
    sampled: torch.Tensor | None = None  # [R] bool: the row's drafts were sampled from draft_probs
    chains: bool = False  # host: every tree is a chain (node i's parent is node i - 1)

    @property
    def num_rows(self) -> int:
        return self.node_rows.shape[0]


@dataclass
class Verified:
    """Result of ``verify``: ``out.token_ids`` [R, D + 1], ``out.num_tokens`` [R] (accepted drafts + 1),
    and ``path`` [R, D + 1]: path[r, 0] = 0 (root), path[r, j] = node of the j-th accepted draft."""

    out: SamplerOutput
    path: torch.Tensor


def _uniforms(sampler: Sampler, rows: list[SamplingRow], levels: int, width: int, device: torch.device) -> torch.Tensor:
    """U(0, 1) [R, levels, width]; a seeded row's from (seed, output position + level)."""
    u = torch.rand((len(rows), levels, width), generator=sampler.generator, device=device)
    for i, r in enumerate(rows):
        if r.params.seed is not None and r.params.temperature > 0:
            for level in range(levels):
                g = torch.Generator(device=device)
                g.manual_seed(_row_seed(r.params.seed, r.num_output_tokens + level) ^ 0x5BD1E995)
                u[i, level] = torch.rand(width, generator=g, device=device)
    return u


def verify(sampler: Sampler, processed: torch.Tensor, node_params: list[SamplingRow], rows: list[SamplingRow],
           trees: TreeBatch, raw: torch.Tensor | None = None, want_logprobs: int | None = None) -> Verified:
    """Walk R token trees (see the module docstring).

    processed: [N_total, V] fp32 node logits after ``Sampler.process``; node_params: the
    SamplingRow of each node row (its temperature and filters); rows: the SamplingRow of each of
    the R rows (output count before the step, for seeds); raw: [N_total, V] unprocessed logits,
    for logprobs (top ``want_logprobs``)."""
    dev = processed.device
    R, N = trees.tokens.shape
    C = trees.children.shape[2]
    levels = trees.max_depth + 1
    greedy_rows = [r.params.temperature == 0.0 for r in rows]
    if trees.chains and all(greedy_rows):
        return _greedy_chains(processed, trees, raw, want_logprobs)
    ar = torch.arange(R, device=dev)
    greedy = to_device(greedy_rows, dev, torch.bool)
    tstar = processed.argmax(dim=-1)  # [N_total] greedy choice at every node
    probs = None
    if not all(greedy_rows):
        probs = sampler.distribution(processed, node_params)  # [N_total, V]
        u = _uniforms(sampler, rows, levels, max(C, 1), dev)
    cur = torch.zeros(R, dtype=torch.int64, device=dev)
    active = torch.ones(R, dtype=torch.bool, device=dev)
    out = torch.zeros((R, levels), dtype=torch.int64, device=dev)
    path = torch.zeros((R, levels), dtype=torch.int64, device=dev)
    emit_node = torch.zeros((R, levels), dtype=torch.int64, device=dev)  # node whose logits gave out[:, s]
    num = torch.zeros(R, dtype=torch.int64, device=dev)
    for level in range(levels):
        row = trees.node_rows.gather(1, cur[:, None])[:, 0]  # [R] logits row of the current node
        kids = trees.children[ar, cur]  # [R, C]
        valid = kids >= 0
        kid_tok = trees.tokens.gather(1, kids.clamp(min=0))  # [R, C]
        # Greedy: follow the child that carries the target's argmax.
        t = tstar[row]
        match = valid & (kid_tok == t[:, None])
        accepted = match.any(dim=1)
        child = kids.gather(1, match.to(torch.int8).argmax(dim=1, keepdim=True))[:, 0]
        token = torch.where(accepted, kid_tok.gather(1, match.to(torch.int8).argmax(dim=1, keepdim=True))[:, 0], t)
        if probs is not None:
            r_acc, r_child, r_token = _sample_level(sampler, probs[row], trees, cur, kids, kid_tok, valid,
                                                    u[:, level], rows, level)
            accepted = torch.where(greedy, accepted, r_acc)
            child = torch.where(greedy, child, r_child)
            token = torch.where(greedy, token, r_token)
        out[:, level] = torch.where(active, token, out[:, level])
        emit_node[:, level] = cur
        num += active.to(torch.int64)
        go = active & accepted
        if level + 1 < levels:
            path[:, level + 1] = torch.where(go, child, path[:, level + 1])
        cur = torch.where(go, child, cur)
        active = go
    return _verified(out, num, path, trees.node_rows.gather(1, emit_node), raw, want_logprobs)


def _verified(out: torch.Tensor, num: torch.Tensor, path: torch.Tensor, src: torch.Tensor, raw: torch.Tensor | None,
              want_logprobs: int | None) -> Verified:
    """The result, with logprobs of the emitted tokens (``src`` [R, levels]: the logits row each
    came from) and the top ``want_logprobs`` when asked."""
    logprobs = top_ids = top_vals = None
    if want_logprobs is not None and raw is not None:
        R, levels = out.shape
        lp = raw.float().log_softmax(dim=-1)  # [N_total, V]
        logprobs = lp[src, out]  # [R, levels]
        top_vals, top_ids = lp[src.flatten()].topk(max(want_logprobs, 1), dim=-1)
        top_vals = top_vals.view(R, levels, -1)
        top_ids = top_ids.view(R, levels, -1)
    return Verified(SamplerOutput(out, logprobs, top_ids, top_vals, num), path)


def _greedy_chains(processed: torch.Tensor, trees: TreeBatch, raw: torch.Tensor | None,
                   want_logprobs: int | None) -> Verified:
    """``verify`` for greedy chains without the level-by-level walk (a handful of launches, not a
    dozen per level: a verification step waits for them). Chain node j's argmax is the token
    emitted at level j; the walk stops at the first draft that differs from its parent's argmax."""
    dev = processed.device
    levels = trees.max_depth + 1
    node_rows = trees.node_rows[:, :levels]
    tstar = processed.argmax(dim=-1)[node_rows]  # [R, levels] argmax at each chain node
    drafts = trees.tokens[:, 1:levels]
    match = (trees.children[:, : levels - 1, 0] >= 0) & (drafts == tstar[:, :-1])
    num = 1 + match.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [R] accepted drafts + 1
    depth = torch.arange(levels, device=dev)[None, :]
    emitted = depth < num[:, None]
    out = torch.where(emitted, tstar, 0)
    path = torch.where(emitted, depth, 0)
    src = node_rows.gather(1, torch.minimum(depth, num[:, None] - 1))  # past the last: its row, as the walk
    return _verified(out, num, path, src, raw, want_logprobs)


def _sample_level(sampler: Sampler, p: torch.Tensor, trees: TreeBatch, cur: torch.Tensor, kids: torch.Tensor,
                  kid_tok: torch.Tensor, valid: torch.Tensor, u: torch.Tensor, rows: list[SamplingRow],
                  level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of speculative sampling for every row: (accepted [R], child [R], token [R])."""
    R = p.shape[0]
    dev = p.device
    ar = torch.arange(R, device=dev)
    p = p.clone()  # [R, V] normalised
    accepted = torch.zeros(R, dtype=torch.bool, device=dev)
    child = torch.zeros(R, dtype=torch.int64, device=dev)
    token = torch.zeros(R, dtype=torch.int64, device=dev)
    q = trees.draft_probs[ar, cur] if trees.draft_probs is not None else None  # [R, V]
    for j in range(kids.shape[1]):
        x = kid_tok[:, j]
        ok = valid[:, j] & ~accepted
        px = p[ar, x]
        if q is not None and j == 0:
            # A sampled child (the first and only child of a sampled chain node): ratio test.
            qx = q[ar, x]
            samp = trees.sampled & ok
            take_s = u[:, j] * qx <= px
            resid = (p - q).clamp(min=0.0)
            resid = resid / resid.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        else:
            samp = torch.zeros_like(ok)
            take_s = torch.zeros_like(ok)
            resid = p
        take_d = u[:, j] < px  # deterministic candidate: accept with probability p(x)
        take = ok & torch.where(samp, take_s, take_d)
        accepted |= take
        child = torch.where(take, kids[:, j], child)
        token = torch.where(take, x, token)
        # Rejected: continue from the residual.
        reject = ok & ~take
        removed = p.clone()
        removed[ar, x] = 0.0
        removed = removed / removed.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        nxt = torch.where(samp[:, None], resid, removed)
        p = torch.where(reject[:, None], nxt, p)
    noise = sampler.exponential_noise(tuple(p.shape), rows, dev, position_offset=level)
    drawn = race_argmax(p, noise)
    token = torch.where(accepted, token, drawn)
    return accepted, child, token
