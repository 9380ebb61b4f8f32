"""Batched token sampling on the device, without host synchronisation.

Input: float32 logits [N, V], one row per request that samples this step, plus each row's
``SamplingRow`` (its SamplingParams and what the Worker knows about it). Steps, all batched (no
Python loop over the vocabulary):
  1. penalties (repetition, presence, frequency) from the token counts that ``PenaltyState``
     keeps on the device for requests that use them (updated with each sampled token on the
     device, so nothing is rebuilt from token lists);
  2. min_tokens: EOS / stop ids masked until the minimum is reached;
  3. logit bias and grammar masks (``flashserve.layers.logits_processors``);
  4. greedy rows: argmax;
  5. other rows: temperature, then top-k / top-p / min-p masks on one descending sort, then the
     exponential-race draw argmax(p / E), E ~ Exp(1). A seeded row draws E from its own generator
     seeded by (seed, output position), so it is reproducible across runs, batch compositions and
     preemptions;
  6. logprobs of the model's distribution (raw logits, log-softmax) for the sampled token and top-n.
Results stay on the device (``SamplerOutput``); the Worker copies them to the host
asynchronously, so the next step can be launched before they are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from flashserve.layers.logits_processors import LogitsProcessors
from flashserve.sampling_params import SamplingParams

_MASK = float("-inf")


class SamplingRow(NamedTuple):
    """What the sampler needs to know about one row."""

    params: SamplingParams
    num_output_tokens: int  # generated before this sample (seed position, min_tokens)
    penalty_slot: int | None  # row of the request in PenaltyState (None: no penalties)
    banned_token_ids: tuple[int, ...] = ()  # EOS / stop ids while below min_tokens
    request_id: str = ""  # keys the per-request state of the logits processors
    output_token_ids: Sequence[int] = ()  # the tokens so far, for rows with a grammar (else empty)


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """Device tensors: sampled ids [N] int64; logprob of each [N] and top-n ids/logprobs [N, k]
    (None when no row asked for logprobs). Speculative verification gives several tokens per
    row: ids [N, M], logprobs [N, M], top-n [N, M, k], and ``num_tokens`` [N] of them valid."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


def to_device(data: list | tuple, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a device tensor, without blocking the host (pinned, asynchronous copy)."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class PenaltyState:
    """Per-request token statistics on the device, for requests with penalties.

    ``counts[slot, t]``: how often token t was generated; ``seen[slot, t]``: t occurs in the
    prompt or the output (the repetition penalty's set). Rows are allocated when a request with
    penalties arrives and grow in chunks; sampled tokens are added on the device.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self._free: list[int] = []

    def add(self, prompt_token_ids: tuple[int, ...], output_token_ids: tuple[int, ...]) -> int:
        if not self._free:
            old = self.counts.shape[0]
            grow = max(8, old)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab_size)])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grow, self.vocab_size)])
            self._free.extend(range(old + grow - 1, old - 1, -1))
        slot = self._free.pop()
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        # Scalar values (`x[idx] = True`) would be copied to the device synchronously: fill instead.
        if prompt_token_ids:
            self.seen[slot].index_fill_(0, to_device(prompt_token_ids, self.device, torch.int64), True)
        if output_token_ids:
            out = to_device(output_token_ids, self.device, torch.int64)
            self.counts[slot].index_add_(0, out, torch.ones(len(output_token_ids), device=self.device))
            self.seen[slot].index_fill_(0, out, True)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add one sampled token per row: ``slots`` [M] int64, ``tokens`` [M] int64 (device)."""
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
        self.seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))

    def apply(self, logits: torch.Tensor, rows: list[SamplingRow], penalised: list[int],
              extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Penalties of the rows ``penalised`` (indices into ``rows``) applied to ``logits`` [N, V].
        ``extra``: tokens generated after what the state holds, as (index into ``penalised`` [P],
        token [P]) (speculative verification: the drafts before each verified position)."""
        dev = logits.device
        idx = to_device(penalised, dev, torch.int64)
        slots = to_device([rows[i].penalty_slot for i in penalised], dev, torch.int64)
        params = [rows[i].params for i in penalised]
        rep = to_device([p.repetition_penalty for p in params], dev, torch.float32)[:, None]
        pres = to_device([p.presence_penalty for p in params], dev, torch.float32)[:, None]
        freq = to_device([p.frequency_penalty for p in params], dev, torch.float32)[:, None]
        sub = logits[idx]  # [M, V]
        counts = self.counts[slots][:, : sub.shape[1]]
        seen = self.seen[slots][:, : sub.shape[1]]
        if extra is not None:
            counts.index_put_(extra, torch.ones_like(extra[1], dtype=counts.dtype), accumulate=True)
            seen.index_put_(extra, torch.ones_like(extra[1], dtype=torch.bool))
        factor = torch.where(seen, rep, torch.ones_like(sub))
        sub = torch.where(sub > 0, sub / factor, sub * factor)
        sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        return logits.index_copy(0, idx, sub)


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
    remove[:, 0].fill_(False)  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, _MASK)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Samples one token per row; owns the unseeded generator and the penalty statistics."""

    def __init__(self, device: torch.device, vocab_size: int, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.penalties = PenaltyState(vocab_size, device)
        self.logits_processors = LogitsProcessors()  # the Worker gives it the tokenizer (grammars)

    def process(self, logits: torch.Tensor, rows: list[SamplingRow],
                extra_penalty_tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """fp32 logits [N, V] with penalties, min_tokens bans, logit bias and grammar masks applied (a new tensor if any
        applies). ``extra_penalty_tokens``: see ``PenaltyState.apply``."""
        logits = logits.float()
        raw = logits
        penalised = [i for i, r in enumerate(rows) if r.penalty_slot is not None]
        if penalised:
            logits = self.penalties.apply(logits, rows, penalised, extra_penalty_tokens)
        banned = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids]
        if banned:
            if logits is raw:
                logits = logits.clone()
            idx = to_device(banned, logits.device, torch.int64)
            logits.index_put_((idx[:, 0], idx[:, 1]), torch.full_like(idx[:, 0], _MASK, dtype=logits.dtype))
        logits = self.logits_processors(logits, rows)  # logit bias, grammars
        return logits

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        raw = logits.float()
        dev = logits.device
        penalised = [i for i, r in enumerate(rows) if r.penalty_slot is not None]
        logits = self.process(raw, rows)

        greedy = [r.params.greedy for r in rows]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            tokens = torch.where(to_device(greedy, dev, torch.bool), tokens, self._sample(logits, rows))
        if penalised:
            pen = to_device(penalised, dev, torch.int64)
            slots = to_device([rows[i].penalty_slot for i in penalised], dev, torch.int64)
            self.penalties.record(slots, tokens[pen])

        want = logprobs_width(rows)
        if want is None:
            return SamplerOutput(tokens)
        logprobs = raw.log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
        top_vals, top_ids = logprobs.topk(want, dim=-1)
        return SamplerOutput(tokens, chosen, top_ids, top_vals)

    def greedy(self, logits: torch.Tensor) -> SamplerOutput:
        """``__call__`` for rows that are all ``SamplingParams.plain_greedy``: their argmax, with no per-row
        work on the host (the logits processors still count the call, for their evictions)."""
        logits = self.logits_processors(logits.float(), ())
        return SamplerOutput(logits.argmax(dim=-1))

    def greedy_sampled(self, token_ids: torch.Tensor) -> SamplerOutput:
        """``greedy`` for rows whose argmax a CUDA graph took already (``CudaGraphs.sampled``)."""
        self.logits_processors.skip()
        return SamplerOutput(token_ids)

    @staticmethod
    def distribution(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The probabilities [N, V] a random row draws from: processed logits (``process``) divided
        by the temperature, top-k / top-p / min-p masked, softmax. (Greedy rows: temperature 1.)"""
        dev = logits.device
        temp = to_device([1.0 if r.params.greedy else r.params.temperature for r in rows], dev, torch.float32)
        scaled = logits / temp[:, None]
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.min_p > 0.0 for r in rows):
            top_k = to_device([r.params.top_k for r in rows], dev, torch.int64)
            top_p = to_device([r.params.top_p for r in rows], dev, torch.float32)
            min_p = to_device([r.params.min_p for r in rows], dev, torch.float32)
            scaled = top_k_top_p_min_p_mask(scaled, top_k, top_p, min_p)
        return scaled.softmax(dim=-1)

    def exponential_noise(self, shape: tuple[int, int], rows: list[SamplingRow], device: torch.device,
                          position_offset: int = 0, salt: int = 0) -> torch.Tensor:
        """Exp(1) noise [N, V] for the race argmax(p / E): a seeded row's from its own generator
        seeded by (seed, output position + ``position_offset``) (``salt``: an independent stream,
        e.g. a draft model's), the rest from the sampler's."""
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        noise.exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.params.seed is not None and not r.params.greedy:
                g = torch.Generator(device=device)
                g.manual_seed(_row_seed(r.params.seed, r.num_output_tokens + position_offset) ^ salt)
                noise[i].exponential_(generator=g)
        return noise

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Random draw for every row (greedy rows' results are discarded by the caller)."""
        probs = self.distribution(logits, rows)
        noise = self.exponential_noise(tuple(probs.shape), rows, probs.device)
        return race_argmax(probs, noise)


def logprobs_width(rows: Sequence[Any]) -> int | None:
    """How many top logprobs a step returns per row (rows: anything with ``params``): the most
    any row asked for, at least 1; None when no row asked."""
    want = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
    return None if want is None else max(want, 1)


def race_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race argmax(p / E) over the last dimension. A draw E of exactly 0 is raised
    to the smallest normal float first: otherwise a token of probability 0 (masked by a grammar or
    top-k) gives 0 / 0 = NaN, and argmax picks NaN."""
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def _row_seed(seed: int, position: int) -> int:
    """A per-(seed, output position) generator seed, mixed so nearby seeds do not correlate."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF
