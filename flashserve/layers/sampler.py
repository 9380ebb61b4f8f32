"""Batched token sampling on the device.

Input: float32 logits [N, V], one row per request that samples this step, plus each row's
SamplingParams. Steps, all batched (no Python loop over the vocabulary):
  1. penalties (repetition, presence, frequency) from token counts;
  2. min_tokens: EOS / stop ids masked until the minimum is reached;
  3. greedy rows: argmax;
  4. other rows: temperature, then top-k / top-p / min-p masks on one descending sort, then the
     exponential-race draw argmax(p / E), E ~ Exp(1). A seeded row draws E from its own generator
     seeded by (seed, output position), so it is reproducible across runs, batch compositions and
     preemptions;
  5. logprobs of the model's distribution (raw logits, log-softmax) for the sampled token and top-n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.sampling_params import SamplingParams

_MASK = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Presence / frequency penalties on output tokens, repetition penalty on prompt+output tokens.

    logits: [N, V] float32, modified in place and returned.
    """
    vocab = logits.shape[1]
    device = logits.device
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device, dtype=logits.dtype)
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=device, dtype=logits.dtype)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device, dtype=logits.dtype)
    out_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)  # [N, V]
    if bool((rep != 1.0).any()):
        seen = _token_counts([r.prompt_token_ids for r in rows], vocab, device) + out_counts > 0
        factor = torch.where(seen, rep[:, None], torch.ones_like(logits))
        logits = torch.where(logits > 0, logits / factor, logits * factor)
    logits -= freq[:, None] * out_counts
    logits -= pres[:, None] * (out_counts > 0).to(logits.dtype)
    return logits


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, V] float32 counts of each token id per row."""
    counts = torch.zeros(len(token_lists), vocab, device=device, dtype=torch.float32)
    lengths = [len(t) for t in token_lists]
    if sum(lengths) == 0:
        return counts
    ids = torch.tensor([t for tokens in token_lists for t in tokens], device=device, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), torch.tensor(lengths, device=device))
    counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return counts


def top_k_top_p_min_p_mask(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (set to -inf) the tokens that top-k, top-p and min-p exclude.

    logits: [N, V] (already divided by temperature); top_k: [N] int (<= 0 = off);
    top_p: [N] float (1 = off); min_p: [N] float (0 = off). Returns the masked logits.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = ranks >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the token crossing p is kept).
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    # min-p: drop tokens less likely than min_p times the most likely one.
    remove |= probs < (min_p[:, None] * probs[:, :1])
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, _MASK)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Samples one token per row. Stateless apart from the unseeded generator."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        n = logits.shape[0]
        logits = logits.float()
        raw = logits
        if any(_has_penalty(r.params) for r in rows):
            logits = apply_penalties(logits.clone(), rows)
        banned = [(i, t) for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens
                  for t in set(r.eos_token_ids) | set(r.params.stop_token_ids)]
        if banned:
            if logits is raw:
                logits = logits.clone()
            idx = torch.tensor(banned, device=logits.device)
            logits[idx[:, 0], idx[:, 1]] = _MASK

        greedy = [r.params.temperature == 0.0 for r in rows]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            tokens = torch.where(torch.tensor(greedy, device=logits.device), tokens, self._sample(logits, rows))

        want = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
        token_list = tokens.tolist()
        if want is None:
            return SamplerOutput(token_list, [None] * n, [None] * n)
        logprobs = raw.log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        top_vals, top_ids = logprobs.topk(max(want, 1), dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        out_lp: list[float | None] = []
        out_top: list[list[tuple[int, float]] | None] = []
        for i, r in enumerate(rows):
            k = r.params.logprobs
            out_lp.append(chosen[i] if k is not None else None)
            out_top.append(list(zip(top_ids[i][:k], top_vals[i][:k])) if k is not None else None)
        return SamplerOutput(token_list, out_lp, out_top)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Random draw for every row (greedy rows' results are discarded by the caller)."""
        dev = logits.device
        temp = torch.tensor([r.params.temperature or 1.0 for r in rows], device=dev)
        top_k = torch.tensor([r.params.top_k for r in rows], device=dev)
        top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
        min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
        scaled = logits / temp[:, None]
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.min_p > 0.0 for r in rows):
            scaled = top_k_top_p_min_p_mask(scaled, top_k, top_p, min_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.params.seed is not None and r.params.temperature > 0:
                g = torch.Generator(device=dev)
                g.manual_seed(_row_seed(r.params.seed, len(r.output_token_ids)))
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _row_seed(seed: int, position: int) -> int:
    """A per-(seed, output position) generator seed, mixed so nearby seeds do not correlate."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF
