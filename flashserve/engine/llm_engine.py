"""The engine: EngineCore plans, a Worker computes, the output processor turns tokens into text.

    step():
        plan_n   = core.schedule()                  # pure Python; incremental, immutable plan
        handle_n = executor.execute(plan_n)         # launched on the device, not waited for
        done     = core.update(plan_n-1, handle_n-1.result())   # tokens of the previous step
        return outputs(done)                        # detokenize, stop strings, RequestOutput

With ``async_scheduling`` (the default) step N+1 is planned and launched before step N's tokens
are read, so the device never idles while the host schedules; otherwise each step is planned,
run and read in turn. Both give the same tokens.

With pipeline stages that overlap (``WorkerInfo.pipeline_stages`` = P > 1) the loop keeps P
plans in flight (P + 1 with ``async_scheduling`` on CUDA), each a micro-batch of disjoint requests
(``EngineCore``'s ``micro_batches``): stage 0 runs micro-batch N+1 while the next stage runs N,
and a step reads the tokens of the oldest plan only.

Requests enter through ``add_request``, which validates everything a caller can get wrong and
raises ``ValueError`` naming the problem and the limit, so a bad request never reaches the loop.
A request with ``n > 1`` runs as n child sequences (child i seeded with seed + i) and reports as
one ``RequestOutput``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flashserve.cache.kv_groups import make_block_manager
from flashserve.config import EngineConfig, default_max_num_batched_tokens
from flashserve.engine.core import EngineCore
from flashserve.engine.detokenizer import DecodeState, Detokenizer
from flashserve.engine.executor import Handle, make_executor
from flashserve.request import CompletionOutput, Request, RequestMetrics, RequestOutput, RequestStatus
from flashserve.sampling_params import SamplingParams, validate_for_model
from flashserve.sched.plan import SchedulerOutput
from flashserve.sched.preemption import PreemptionCostModel

logger = logging.getLogger("flashserve")


@dataclass
class EngineStats:
    """A snapshot for progress bars, /metrics and benchmarks."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_host_hits: int = 0  # of the hits, tokens brought back from the host KV tier
    num_rank_preemptions: int = 0
    spec: Any = None  # flashserve.spec.controller.SpecStats when speculating
    lora: Any = None  # flashserve.lora.registry.LoRAStats when serving LoRA adapters


@dataclass(frozen=True)
class HostTiming:
    """Host time of one ``step()`` (recorded when ``LLMEngine.timings`` is a list)."""

    num_seqs: int
    num_tokens: int
    schedule_s: float  # EngineCore.schedule
    launch_s: float  # the Worker applying the plan, building inputs, launching (or sending the plan)
    finish_s: float  # update, stop checks, detokenization, outputs
    wait_s: float  # waiting for the device's tokens (not host work)
    model_steps: int = 1  # model steps the plan ran (a multi-step plan's num_steps)

    @property
    def host_s(self) -> float:
        return self.schedule_s + self.launch_s + self.finish_s


@dataclass
class _Parent:
    """Groups the n child sequences of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]
    stream: bool = True  # an output every step it progresses (False: only when it finishes)
    delta: bool = False  # outputs carry the step's progress only (LLMEngine.add_request)
    completions: dict[str, CompletionOutput] = field(default_factory=dict)
    metrics: RequestMetrics | None = None  # of the child that progressed last


def _snapshot(c: CompletionOutput, delta: bool) -> CompletionOutput:
    """The output of one choice now; ``c`` starts its next delta. The lists that keep growing
    are copied, or (``delta``) handed over and started afresh."""
    logprobs = c.logprobs
    out = CompletionOutput(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, logprobs, c.text_delta,
                           c.num_new_tokens, c.cumulative_logprob)
    if delta:
        c.token_ids = []
        if logprobs is not None:
            c.logprobs = []
    elif logprobs is not None:
        out.logprobs = list(logprobs)
    c.text_delta, c.num_new_tokens = "", 0
    return out


class LLMEngine:
    def __init__(self, config: EngineConfig, verbose: bool = True) -> None:
        from flashserve.loader import default_model_path, load_model_config, load_tokenizer

        self.config = config
        source = config.model if config.model is not None else default_model_path()
        self.model_name = config.model or "SmolLM2-135M-Instruct"
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(config.tokenizer or source, "auto" if config.tokenizer else config.load_format)
        if self.tokenizer is None:
            logger.warning("flashserve: %s has no tokenizer files; the engine takes prompts as token ids only", source)
        self.model_config = mc = load_model_config(source, config.load_format).with_attention(config.attention)
        if self.tokenizer is not None and len(self.tokenizer) > mc.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is "
                             f"{mc.vocab_size}; give a tokenizer made for this model")
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        sched_cfg = config.scheduler
        if sched_cfg.max_num_batched_tokens is None:  # the user left it: a budget that suits the device
            from flashserve.runner.worker import resolve_device

            budget = default_max_num_batched_tokens(resolve_device(config.device).type)
            sched_cfg = replace(sched_cfg, max_num_batched_tokens=budget)
        if not sched_cfg.enable_chunked_prefill and sched_cfg.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit one step.
            sched_cfg = replace(sched_cfg, max_num_batched_tokens=self.max_model_len)
        config = self.config = replace(config, scheduler=sched_cfg)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)  # dummy weights may have no tokenizer
        self.eos_token_ids = sorted(set(mc.eos_token_ids) | ({tok_eos} - {None}))
        if config.speculative is not None:  # refuse an incompatible draft before any weights load
            from flashserve.spec.proposers import check_speculative

            check_speculative(config.speculative, mc, self.tokenizer, self.max_model_len)
        self.executor = make_executor(config, mc, self.max_model_len, tuple(self.eos_token_ids))
        info = self.info = self.executor.info
        self.lora = None  # the served LoRA adapters and their slots (flashserve.lora.registry)
        if config.lora_modules or config.max_loras is not None:
            from flashserve.lora.registry import LoRARegistry

            slots = config.max_loras or len(config.lora_modules)
            self.lora = LoRARegistry(self.executor, config.lora_modules, slots, config.max_cpu_loras or slots)
        self.device = torch.device(info.device)
        self.speculation = None
        if config.speculative is not None:
            from flashserve.spec.controller import SpeculationController

            # a CUDA Worker launches and returns: the host's next turn runs beside the device
            self.speculation = SpeculationController(config.speculative, host_overlaps=self.device.type == "cuda")
        self.dtype = getattr(torch, info.dtype)
        # Plans in flight while a step launches: one per pipeline stage that overlaps (1 without
        # stages), plus one with async scheduling where launching does not wait for the device.
        # A CPU stage computes inside execute(): there an extra micro-batch would only split the
        # batch further (each stage reads its weights once more per round) and hide nothing.
        stages = info.pipeline_stages
        self._depth = stages + int(config.async_scheduling and (stages == 1 or self.device.type == "cuda"))
        kv_elem = self.dtype.itemsize if config.cache.kv_cache_dtype == "auto" else 1  # an 8-bit KV cache
        cost_model = PreemptionCostModel.for_model(mc, kv_elem, self.device.type)
        if hasattr(self.executor, "make_core"):  # disaggregated prefill/decode: a router over two pools
            self.core = self.executor.make_core(sched_cfg, mc, self.max_model_len, config.cache.enable_prefix_caching,
                                                cost_model)
            self.block_manager = self.core.block_manager
        else:
            self.block_manager = make_block_manager(mc, info.num_blocks, info.block_size,
                                                    config.cache.enable_prefix_caching, info.num_host_blocks,
                                                    info.num_host_cache_blocks)
            self.core = EngineCore(sched_cfg, self.block_manager, self.max_model_len, cost_model, self.speculation,
                                   micro_batches=self._depth if info.pipeline_stages > 1 else 1)
        self.scheduler = self.core.scheduler
        self.graph_capture_seconds = info.graph_capture_seconds
        self.detokenizer = Detokenizer(self.tokenizer)
        self._decode_states: dict[str, DecodeState] = {}
        self._parents: dict[str, _Parent] = {}
        self._child_parent: dict[str, str] = {}
        # child ids processed every step they get tokens: their parent streams, or they have stop
        # strings to look for in their text as it grows (the others only when they finish)
        self._followed: set[str] = set()
        self._inflight: deque[tuple[SchedulerOutput, Handle]] = deque()  # launched, tokens not read, oldest first
        from flashserve.spec.beam import BeamSearchDriver

        self.beams = BeamSearchDriver(self.core, self.eos_token_ids, self._decode_all,
                                      self.lora.loads if self.lora is not None else None)
        self.timings: list[HostTiming] | None = None  # set to [] to record per-step host timings
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._score_ids = itertools.count()
        if verbose:
            logger.warning(
                "flashserve: %s on %s (%s, %s attention), ready in %.1fs; KV cache: %d blocks x %d tokens = %d tokens "
                "(%.2f GiB); max_model_len %d",
                self.model_name, info.device, info.dtype, info.attention_backend, time.perf_counter() - t0,
                info.num_blocks, info.block_size, info.num_blocks * info.block_size,
                info.num_blocks * info.bytes_per_block / 2**30, self.max_model_len,
            )
            if info.graph_capture_seconds is not None:
                logger.warning("flashserve: captured CUDA graphs (decode up to batch %d, mixed steps up to %d tokens) "
                               "in %.1fs", info.max_decode_graph_batch, config.max_mixed_graph_tokens,
                               info.graph_capture_seconds)

    @property
    def worker(self):
        """The in-process Worker (None when it runs in another process)."""
        return getattr(self.executor, "worker", None)

    # ----------------------------------------------------------------- requests
    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"the model {self.model_name!r} has no tokenizer; give prompts as token ids")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the model {self.model_name!r} has no chat template; use a plain completion prompt")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                        scoring: bool = False) -> None:
        """ValueError naming the problem; ``scoring``: the sequence is only scored (``score``), so it
        may fill the whole context."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if scoring and n > self.max_model_len:
            raise ValueError(f"the sequence has {n} tokens, but the model's context is {self.max_model_len} tokens")
        if not scoring and n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but the model's context is {self.max_model_len} tokens "
                f"(prompt plus at least one generated token); shorten the prompt"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params is not None:
            validate_for_model(params, n, vocab, self.max_model_len)
            self._check_lora(params.lora)

    def _check_lora(self, name: str | None) -> None:
        """ValueError unless ``name`` is None or one of the adapters this engine serves."""
        if self.lora is not None:
            self.lora.check(name)
        elif name is not None:
            raise ValueError(f"unknown LoRA adapter {name!r}; this engine serves none (lora_modules, add_lora)")

    @property
    def lora_names(self) -> tuple[str, ...]:
        """The LoRA adapters requests may name now."""
        return self.lora.names if self.lora is not None else ()

    def add_lora(self, name: str, path: str) -> None:
        """Serve the PEFT LoRA adapter in folder ``path`` as ``name`` to the requests queued from
        now on: in a free slot at once, else (with ``max_cpu_loras`` above ``max_loras``) in host
        memory, moved into a slot when requests need it. ValueError (FileNotFoundError for a
        missing folder), naming the problem, where it cannot be served: no LoRA slots (start the
        engine with ``max_loras``), as many adapters as the engine serves, a name in use, an
        adapter of another model or of a rank above ``max_lora_rank``, or modules the engine does
        not adapt; nothing changes then."""
        if self.lora is None:
            raise ValueError("this engine has no LoRA adapter slots; start it with max_loras (--max-loras) to load "
                             "adapters while serving")
        self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Stop serving LoRA adapter ``name`` (freeing its slot). ValueError for a name not served,
        or while unfinished requests (beam searches included) use it: they keep it until they end."""
        self._check_lora(name)
        self.lora.remove(name, self._lora_users(name))

    def _lora_users(self, name: str) -> int:
        """Unfinished requests in the scheduler and beam searches that run LoRA adapter ``name``."""
        return (sum(r.params.lora == name for r in self.scheduler.requests.values())
                + sum(g.params.lora == name for g in self.beams.groups.values()))

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        add_special_tokens: bool = True,
        prompt_token_ids: list[int] | None = None,
        stream: bool = True,
        delta: bool = False,
    ) -> None:
        """Queue a request. Raises ValueError for any invalid input; nothing is queued then.

        ``stream=False``: ``step`` reports the request only once, when it finishes (batch
        generation needs no per-step outputs, which cost host time at large batches).
        ``delta=True`` (a stream): each output carries only what was added since the previous
        one: ``token_ids`` and ``logprobs`` of the new tokens, ``text_delta``, and an empty
        ``text``; the reader keeps the totals (``AsyncLLMEngine`` does), and the engine copies
        nothing that grows with the output.

        ``prompt_token_ids``, when given with a text prompt, is its already-encoded form."""
        params = params or SamplingParams()
        params.validate()
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            if not prompt:
                raise ValueError("the prompt is empty; give at least one character")
            token_ids = prompt_token_ids if prompt_token_ids is not None else self.encode(prompt, add_special_tokens)
        else:
            text = None
            token_ids = list(prompt)
            if any(not isinstance(t, int) for t in token_ids):
                raise ValueError("prompt token ids must be integers")
        self.validate_prompt(token_ids, params)
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        parent = _Parent(request_id, text, token_ids, child_ids, stream, delta and stream)
        for i, cid in enumerate(child_ids):
            child_params = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else params.seed + i
            )
            req = Request(cid, token_ids, child_params, self.eos_token_ids, prompt=text,
                          lora_load=self.lora.loads[params.lora] if params.lora is not None else 0)
            if self.lora is None or self.lora.admits(req):  # else it waits for a slot for its adapter
                self.core.add_request(req)
            self._child_parent[cid] = request_id
            self._decode_states[cid] = self.detokenizer.new_state(token_ids, params.skip_special_tokens, params.stop)
            if stream or params.stop:
                self._followed.add(cid)
            parent.completions[cid] = CompletionOutput(index=i, text="", token_ids=[], finish_reason=None,
                                                       logprobs=[] if params.logprobs is not None else None)
        self._parents[request_id] = parent
        self.prompt_tokens_total += len(token_ids) * params.n

    def add_beam_request(self, request_id: str, prompt: str | list[int], params, add_special_tokens: bool = True,
                         prompt_token_ids: list[int] | None = None) -> None:
        """Queue a beam search (``flashserve.spec.beam.BeamSearchParams``); it reports once, when
        it finishes: one CompletionOutput per kept hypothesis, best first. ValueError for bad input."""
        if request_id in self._parents or self.beams.owns(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.config.disaggregated:  # beams fork on the decode side only; not built
            raise ValueError("beam search is not supported with disaggregated prefill and decode; "
                             "run it on a colocated engine")
        if isinstance(prompt, str):
            token_ids = prompt_token_ids if prompt_token_ids is not None else self.encode(prompt, add_special_tokens)
        else:
            token_ids = list(prompt)
        self.validate_prompt(token_ids)
        self._check_lora(params.lora)
        if params.lora is not None and not self.lora.resident(params.lora, self._lora_users):
            raise ValueError(f"beam search needs LoRA adapter {params.lora!r} in a slot, and every slot's adapter is "
                             "in use; retry once requests finish, or start the engine with a larger max_loras")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens and beam search may add max_tokens="
                             f"{params.max_tokens}, past the model's context of {self.max_model_len} tokens")
        self.beams.add(request_id, token_ids, prompt if isinstance(prompt, str) else None, params)
        self.prompt_tokens_total += len(token_ids)

    def _decode_all(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def abort_request(self, request_id: str) -> bool:
        """Abort a request (all its child sequences) and free its KV blocks. False if unknown."""
        if self.beams.abort(request_id):
            return True
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return False
        if self.lora is not None:
            self.lora.drop(parent.child_ids)
        for cid in parent.child_ids:
            self.core.finish_request(cid, RequestStatus.FINISHED_ABORTED)
            self._decode_states.pop(cid, None)
            self._child_parent.pop(cid, None)
            self._followed.discard(cid)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or self.beams.has_unfinished()

    def warm_up(self) -> float:
        """Compile every kernel variant a step can hit (``flashserve.engine.warm_up``) before the
        first request pays for it; returns the seconds taken. Needs an idle engine."""
        from flashserve.engine.warm_up import warm_up_plans

        self._drain()
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() needs an idle engine")
        start = time.perf_counter()
        mc, sched = self.model_config, self.scheduler.config
        for plan in warm_up_plans(self.block_manager.num_blocks, self.block_manager.block_size, mc.vocab_size,
                                  sched.max_num_batched_tokens, self.max_model_len, self.config.max_mixed_graph_tokens):
            self.executor.execute(plan).result()
        return time.perf_counter() - start

    def _drain(self) -> None:
        """Read the steps still in flight (their requests have all finished: nothing to report)."""
        while self._inflight:
            plan, handle = self._inflight.popleft()
            self._outputs(plan, handle.result())

    # ----------------------------------------------------------------- the loop
    def step(self) -> list[RequestOutput]:
        """One iteration; returns an output for every request that got new tokens or finished.

        With async scheduling, the tokens returned are those of the step launched by the previous
        call (this call launches the next one first)."""
        t0 = time.perf_counter()
        if self.lora is not None and self.lora.waiting:  # requests whose adapters get a slot now
            for request in self.lora.release(self._lora_users):
                self.core.add_request(request)
        plan = self.core.schedule()
        t1 = time.perf_counter()
        handle = self.executor.execute(plan) if not plan.is_empty else None
        t2 = time.perf_counter()
        if handle is not None:
            self._inflight.append((plan, handle))
        # the oldest plan's tokens: once the pipeline is full, or when nothing new could be launched
        done = self._inflight.popleft() if len(self._inflight) >= self._depth or (handle is None and self._inflight) \
            else None
        outputs = self._outputs(done[0], done[1].result()) if done is not None else []
        if self.timings is not None:
            wait = done[1].wait_s if done is not None else 0.0
            self.timings.append(HostTiming(plan.num_seqs, plan.num_tokens, t1 - t0, t2 - t1,
                                           time.perf_counter() - t2 - wait, wait,
                                           plan.decodes.num_steps if plan.decodes is not None else 1))
        return outputs

    def _outputs(self, plan: SchedulerOutput, result) -> list[RequestOutput]:
        touched: dict[str, None] = {}
        beams = self.beams
        beam_ids, followed = beams.live_ids, self._followed
        progress = self.core.update(plan, result)
        if beam_ids or followed:
            generated = 0
            for req, n in progress:
                rid = req.request_id
                if rid in beam_ids:  # a beam's candidates: the group decides below
                    beams.collect(req)
                    continue
                generated += n
                # A request nobody streams is detokenized when it finishes, unless a stop string
                # must be looked for in its text as it grows.
                if rid in followed or req.status.finished:
                    self._visit(req, touched)
        else:  # nobody streams or has stop strings: only the requests that finished are visited
            generated = progress.num_tokens
            for req in progress.finished:
                self._visit(req, touched)
        self.generation_tokens_total += generated
        outputs = [out for pid in touched if (out := self._parent_output(pid)) is not None]
        if beams.has_unfinished():
            outputs += beams.advance()
        return outputs

    def _visit(self, req: Request, touched: dict[str, None]) -> None:
        """Process a request's new tokens (``_process``) and mark its parent for an output."""
        rid = req.request_id
        parent = self._parents[self._child_parent[rid]]
        self._process(req, self._decode_states[rid], parent)
        touched[parent.request_id] = None

    def _process(self, req: Request, state: DecodeState, parent: _Parent) -> None:
        """Detokenize the output tokens not read yet, apply stop strings, update the child's
        CompletionOutput."""
        comp = parent.completions[req.request_id]
        start = state.num_read
        new_tokens = req.output_token_ids[start:]
        state.num_read += len(new_tokens)
        kept = self.detokenizer.append(state, new_tokens, self.core.stop.stop_strings_armed_from(req, start))
        cut = kept < len(new_tokens)
        if cut:  # a stop string ended before the step's last token: plain decoding never makes the rest
            del req.output_token_ids[start + kept :]
            del req.output_logprobs[start + kept :]
            new_tokens = new_tokens[:kept]
            state.num_read = start + kept
        if state.stopped_on is not None and (cut or not req.is_finished):
            req.stop_reason = state.stopped_on
            if req.is_finished:  # its length or stop id came after the stop string
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                self.core.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            # what flush adds belongs to the last token: armed when that one is
            self.detokenizer.flush(state, self.core.stop.stop_strings_armed_from(req, len(req.output_token_ids) - 1) == 0)
        comp.text_delta = self.detokenizer.take_delta(state, req.is_finished)
        comp.num_new_tokens += len(new_tokens)
        if parent.delta:
            comp.token_ids += new_tokens
        elif parent.stream or req.is_finished:  # an unstreamed request's output is read when it finishes
            comp.text = self.detokenizer.emitted_text(state)
            comp.token_ids = list(req.output_token_ids)
        if comp.logprobs is not None:
            for token, (lp, top) in zip(new_tokens, req.output_logprobs[start:]):
                comp.logprobs.append((token, lp, list(top)))
        if req.is_finished:
            comp.finish_reason = req.status.value
            comp.stop_reason = req.stop_reason
        parent.metrics = req.metrics

    def _parent_output(self, parent_id: str) -> RequestOutput | None:
        parent = self._parents[parent_id]
        finished = all(c.finish_reason is not None for c in parent.completions.values())
        if not parent.stream and not finished:
            return None
        outputs = [_snapshot(c, parent.delta) for c in parent.completions.values()]
        out = RequestOutput(
            request_id=parent_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            metrics=parent.metrics,
            num_cached_tokens=parent.metrics.num_cached_prompt_tokens if parent.metrics else 0,
        )
        if finished:
            del self._parents[parent_id]
            for cid in parent.child_ids:
                self._decode_states.pop(cid, None)
                self._child_parent.pop(cid, None)
                self._followed.discard(cid)
        return out

    def score(self, token_ids: list[int], chunk_size: int = 512) -> Iterator[torch.Tensor]:
        """Teacher-forced log-probabilities of a token sequence, for quality measurements.

        Yields, chunk by chunk, fp32 tensors [n, V] whose row j is the model's next-token
        distribution after token j (rows for every token but the last, in order). The sequence
        runs through the paged KV cache like a chunked prompt, so whatever the cache stores
        (a quantized or windowed KV) is what later chunks read. Needs the engine to be idle.
        """
        self.validate_prompt(token_ids, scoring=True)
        self._drain()
        if self.has_unfinished_requests():
            raise RuntimeError("score() needs an idle engine; finish or abort the running requests first")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        bm, rid = self.block_manager, f"__score__{next(self._score_ids)}"
        if bm.allocate_slots(rid, len(token_ids)) is None:
            raise ValueError(f"{len(token_ids)} tokens do not fit the KV cache ({bm.num_free_blocks} free blocks "
                             f"of {bm.block_size} tokens); score a shorter text or give the cache more memory")
        if bm.host_tier is not None:  # blocks it evicted are overwritten now, outside any plan
            bm.host_tier.cancel_saves()
        try:
            tables = bm.block_tables(rid)
            table = tables[0] if len(tables) == 1 else tables
            for start in range(0, len(token_ids) - 1, chunk_size):
                chunk = token_ids[start : min(start + chunk_size, len(token_ids) - 1)]
                yield self.executor.score_chunk(chunk, start, table)
        finally:
            bm.free(rid)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            # requests waiting for a slot for their LoRA adapter wait too
            num_waiting=self.scheduler.num_waiting + (len(self.lora.waiting) if self.lora is not None else 0),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prefix_cache_host_hits=bm.host_tier_hits,
            num_rank_preemptions=self.scheduler.num_rank_preemptions,
            spec=replace(self.speculation.stats) if self.speculation is not None else None,
            lora=self.lora.stats() if self.lora is not None else None,
        )

    def shutdown(self) -> None:
        """Stop the Worker (a no-op for an in-process one)."""
        self.executor.shutdown()
