"""Beam search: the bookkeeping of one prompt's beams (pure Python), the rules of transformers'
``generate(num_beams=...)``.

Each live beam is an engine request that computes one token per step and reports the top
K = max(2, 1 + #EOS) x W log-probabilities of its next token (W = ``beam_width``); it is
``synchronous``, so nothing more is planned for it until the group has decided. When every live
beam has reported, ``BeamGroup.advance``:

1. scores every candidate (beam score + log-probability) and keeps the best K overall;
2. a candidate ending in EOS (or reaching ``max_tokens``) that ranks among the best W becomes a
   finished hypothesis with score ``sum of log-probabilities / length ** length_penalty``; the
   best W finished hypotheses are kept;
3. the best W candidates that did not finish become the next beams: each is a *fork* of its
   parent request plus the new token (the engine shares the parent's KV blocks and copies the
   partially filled last block, copy-on-write; the parents are retired);
4. stops when no live beam can beat the worst kept hypothesis (``early_stopping`` False: judged at
   the current length; "never": at ``max_tokens`` when the length penalty is positive; True: as
   soon as W hypotheses are finished), or at ``max_tokens``.

``tests/test_beam_search.py`` checks the result against transformers token for token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

NEG = -1.0e9  # transformers' "impossible" score


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search settings, as vLLM's ``BeamSearchParams`` (plus ``early_stopping``)."""

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never" (transformers' meanings)
    ignore_eos: bool = False
    lora: str | None = None  # the LoRA adapter every beam runs with (SamplingParams.lora)

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    @property
    def n(self) -> int:
        """Sequences returned (the server reads ``n`` and ``logprobs`` like SamplingParams')."""
        return self.beam_width

    logprobs = None
    structured_output = None  # (beam search takes no grammar; the server refuses response_format with it)

    def num_candidates(self, num_eos: int) -> int:
        """K: candidates kept per step (transformers: max(2, 1 + #EOS) x beam_width)."""
        return max(2, 1 + (0 if self.ignore_eos else num_eos)) * self.beam_width


@dataclass
class Beam:
    request_id: str
    tokens: list[int]  # generated so far
    score: float  # sum of log-probabilities
    logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]
    score: float  # with the length penalty
    cumulative_logprob: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass(frozen=True)
class Fork:
    """A next beam: ``parent`` request id plus ``token``, as request ``child``."""

    parent: str
    child: str
    token: int
    beam: Beam


class BeamGroup:
    """One prompt's beam search (see the module docstring)."""

    def __init__(self, group_id: str, prompt_token_ids: list[int], params: BeamSearchParams,
                 eos_token_ids: list[int]) -> None:
        self.group_id = group_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.k = params.num_candidates(len(self.eos))
        self.beams: dict[str, Beam] = {}
        self.reports: dict[str, list[tuple[int, float]]] = {}
        self.finished: list[Hypothesis] = []
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.step = 0  # tokens generated so far by every live beam
        self.done = False
        self._ids = 0

    def new_request_id(self) -> str:
        rid = f"{self.group_id}#beam{self._ids}"
        self._ids += 1
        return rid

    def start(self) -> Beam:
        beam = Beam(self.new_request_id(), [], 0.0)
        self.beams[beam.request_id] = beam
        return beam

    def report(self, request_id: str, top: list[tuple[int, float]]) -> None:
        """A live beam's next-token candidates (token, log-probability), best first."""
        self.reports[request_id] = top

    @property
    def ready(self) -> bool:
        return not self.done and bool(self.beams) and len(self.reports) == len(self.beams)

    def advance(self) -> list[Fork]:
        """Decide one step (needs ``ready``): finished hypotheses are kept, the next beams are
        returned as forks (empty when the search is over; then ``done``)."""
        W, K = self.params.beam_width, self.k
        cands = []  # (total score, order, parent beam, token, logprob)
        for order, (rid, beam) in enumerate(self.beams.items()):
            for token, lp in self.reports[rid][:K]:
                cands.append((beam.score + lp, order, beam, token, lp))
        cands.sort(key=lambda c: (-c[0], c[1]))
        cands = cands[:K]
        length = self.step + 1
        at_limit = length >= self.params.max_tokens
        hits = [at_limit or c[3] in self.eos for c in cands]
        # Finished hypotheses: among the best W candidates, those that stop.
        full = len(self.finished) >= W and all(h.score > NEG / 2 for h in self.finished)
        blocked = (self.params.early_stopping is True and full) or not self.improvable
        if not blocked:
            for (total, _, beam, token, lp), hit in zip(cands[:W], hits[:W]):
                if hit:
                    self.finished.append(Hypothesis(tuple(beam.tokens + [token]),
                                                    total / (length**self.params.length_penalty), total,
                                                    "stop" if token in self.eos else "length"))
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[W:]
        # Next beams: the best W candidates that did not stop.
        forks = []
        if not at_limit:
            for (total, _, beam, token, lp), hit in zip(cands, hits):
                if hit:
                    continue
                child = Beam(self.new_request_id(), beam.tokens + [token], total, beam.logprobs + [lp])
                forks.append(Fork(beam.request_id, child.request_id, token, child))
                if len(forks) == W:
                    break
        self.step = length
        self.reports.clear()
        self.beams = {f.child: f.beam for f in forks}
        if forks:
            self._update_improvable(forks[0].beam.score)
        all_finished = len(self.finished) >= W
        if (not forks or not self.improvable or (all_finished and self.params.early_stopping is True)):
            self.done = True
            self.beams = {}
            return []
        return forks

    def _update_improvable(self, best_running: float) -> None:
        p = self.params
        length = p.max_tokens if (p.early_stopping == "never" and p.length_penalty > 0) else self.step
        best = best_running / (length**p.length_penalty)
        if len(self.finished) >= p.beam_width:
            worst = min(h.score for h in self.finished)
            self.improvable = self.improvable and best > worst

    def results(self) -> list[Hypothesis]:
        """Finished hypotheses, best first (at most ``beam_width``)."""
        return list(self.finished)


class BeamSearchDriver:
    """Runs beam groups inside the engine loop (``LLMEngine`` calls ``collect`` for every beam
    request that got its token, then ``advance``). Beam requests are ordinary engine requests:
    greedy, ``logprobs`` = K, ``synchronous`` (planned only after the group decided), so beams of
    many prompts batch with each other and with plain requests."""

    def __init__(self, core, eos_token_ids: list[int], decode, lora_load: Mapping[str, int] | None = None) -> None:
        self.core = core
        self.eos_token_ids = eos_token_ids
        self.decode = decode  # token ids -> text
        self.lora_load = lora_load if lora_load is not None else {}  # each served LoRA adapter's load (Request)
        self.groups: dict[str, BeamGroup] = {}
        self._group_of: dict[str, str] = {}  # live beam request id -> group id
        self._prompts: dict[str, str | None] = {}

    def owns(self, request_id: str) -> bool:
        return request_id in self._group_of

    @property
    def live_ids(self):
        """The live beam requests' ids, a set-like view (``rid in live_ids`` is ``owns(rid)``)."""
        return self._group_of.keys()

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def _request(self, group: BeamGroup, request_id: str, tokens: list[int]):
        from flashserve.request import Request
        from flashserve.sampling_params import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True, logprobs=group.k,
                                num_speculative_tokens=0, lora=group.params.lora)
        req = Request(request_id, group.prompt_token_ids, params, self.eos_token_ids, synchronous=True,
                      lora_load=self.lora_load.get(params.lora, 0))
        req.output_token_ids = list(tokens)
        self._group_of[request_id] = group.group_id
        return req

    def add(self, group_id: str, prompt_token_ids: list[int], prompt: str | None, params: BeamSearchParams) -> None:
        if group_id in self.groups:
            raise ValueError(f"request id {group_id!r} is already in use")
        group = BeamGroup(group_id, prompt_token_ids, params, self.eos_token_ids)
        if group.k > 20:
            raise ValueError(f"beam_width {params.beam_width} needs {group.k} candidates per step "
                             f"(max(2, 1 + {len(group.eos)} EOS ids) x beam_width); at most 20 are supported")
        self.groups[group_id] = group
        self._prompts[group_id] = prompt
        self.core.add_request(self._request(group, group.start().request_id, []))

    def collect(self, request) -> None:
        """A beam request's step came back: its last token's top-K log-probabilities."""
        group = self.groups[self._group_of[request.request_id]]
        request.awaiting_result = True  # nothing more is planned for it: the group decides its fate
        _, top = request.output_logprobs[-1]
        group.report(request.request_id, [(int(t), float(lp)) for t, lp in top])

    def abort(self, group_id: str) -> bool:
        group = self.groups.pop(group_id, None)
        if group is None:
            return False
        self._retire(list(group.beams))
        self._prompts.pop(group_id, None)
        return True

    def _retire(self, request_ids: list[str]) -> None:
        from flashserve.request import RequestStatus

        for rid in request_ids:
            self._group_of.pop(rid, None)
            self.core.finish_request(rid, RequestStatus.FINISHED_ABORTED)

    def advance(self) -> list:
        """Decide every group whose beams all reported; RequestOutputs of the groups that finished."""
        from flashserve.request import CompletionOutput, RequestOutput

        outputs = []
        for gid, group in list(self.groups.items()):
            if not group.ready:
                continue
            parents = list(group.beams)
            requests = self.core.scheduler.requests
            forks = group.advance()
            took_block: set[str] = set()
            for f in forks:  # the first child of a parent takes over its last block, the others copy it
                child = self._request(group, f.child, f.beam.tokens)
                self.core.fork(requests[f.parent], child, share_partial=f.parent not in took_block)
                took_block.add(f.parent)
            metrics = requests[parents[0]].metrics if parents else None
            self._retire(parents)
            if group.done:
                del self.groups[gid]
                comps = []
                for i, h in enumerate(group.results()):  # the group's only output: all of it is new
                    text = self.decode(list(h.tokens))
                    comps.append(CompletionOutput(index=i, text=text, token_ids=list(h.tokens),
                                                  finish_reason=h.finish_reason, text_delta=text,
                                                  num_new_tokens=len(h.tokens),
                                                  cumulative_logprob=h.cumulative_logprob))
                outputs.append(RequestOutput(gid, self._prompts.pop(gid, None), group.prompt_token_ids, comps,
                                             True, metrics))
        return outputs
