"""The engine: one step loop that schedules, runs the model, samples, detokenizes.

    step():
        plan   = scheduler.schedule()
        result = runner.execute(plan)
        progressed = scheduler.update(plan, result)
        return outputs(progressed)          # detokenize, stop strings, RequestOutput

Requests enter through ``add_request``, which validates everything a caller can get wrong and
raises ``ValueError`` naming the problem and the limit, so a bad request never reaches the loop.
A request with ``n > 1`` runs as n child sequences (child i seeded with seed + i) and reports as
one ``RequestOutput``.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from collections.abc import Iterator
from typing import Any

import torch

from flashserve.cache.block_manager import BlockManager
from flashserve.config import EngineConfig
from flashserve.engine.detokenizer import DecodeState, Detokenizer
from flashserve.layers.fused import use_triton_ops
from flashserve.request import CompletionOutput, Request, RequestMetrics, RequestOutput, RequestStatus
from flashserve.runner.host_weights import pack_weights_in_huge_pages
from flashserve.runner.kv_cache import allocate_kv_pool, plan_kv_pool
from flashserve.runner.model_runner import ModelRunner
from flashserve.runner.swap import HostSwapSpace
from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import RunnerOutput
from flashserve.sched.policy import make_policy
from flashserve.sched.preemption import PreemptionCostModel
from flashserve.sched.scheduler import Scheduler

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


@dataclass
class _Parent:
    """Groups the n child sequences of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]
    completions: dict[str, CompletionOutput] = field(default_factory=dict)
    metrics: RequestMetrics | None = None  # of the child that progressed last


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class LLMEngine:
    def __init__(self, config: EngineConfig, verbose: bool = True) -> None:
        from flashserve.layers.attention import get_attention_backend
        from flashserve.loader import default_model_path, load_model, load_tokenizer

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        source = config.model if config.model is not None else default_model_path()
        self.model_name = config.model or "SmolLM2-135M-Instruct"
        backend_name = config.attention_backend
        if backend_name == "auto":
            backend_name = "triton" if self.device.type == "cuda" else "torch"
        self.attn_backend = get_attention_backend(backend_name)
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(source, config.load_format)
        if self.tokenizer is None:
            logger.warning("flashserve: %s has no tokenizer files; the engine takes prompts as token ids only", source)
        self.model, self.model_config = load_model(source, config.load_format, self.dtype, self.device, self.attn_backend,
                                                   quantization=config.quantization, dense_gguf=config.dtype != "auto")
        if self.device.type == "cpu":
            pack_weights_in_huge_pages(self.model)  # fewer TLB misses when streaming the weights
        load_s = time.perf_counter() - t0

        mc = self.model_config
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        sched_cfg = config.scheduler
        if not sched_cfg.enable_chunked_prefill and sched_cfg.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit one step.
            sched_cfg = replace(sched_cfg, max_num_batched_tokens=self.max_model_len)
        block_size = config.cache.block_size
        useful_blocks = sched_cfg.max_num_seqs * -(-self.max_model_len // block_size)
        pool_plan = plan_kv_pool(mc, config.cache, self.dtype, self.device, self.max_model_len, useful_blocks,
                                 reserve_bytes=self._activation_reserve(sched_cfg.max_num_batched_tokens, sched_cfg.max_num_seqs))
        kv_pool = allocate_kv_pool(mc, pool_plan, self.dtype, self.device)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)  # dummy weights may have no tokenizer
        self.eos_token_ids = sorted(set(mc.eos_token_ids) | ({tok_eos} - {None}))
        num_host_blocks = config.cache.swap_space_bytes // pool_plan.bytes_per_block
        self.block_manager = BlockManager(pool_plan.num_blocks, block_size, config.cache.enable_prefix_caching,
                                          num_host_blocks)
        cost_model = PreemptionCostModel.for_model(mc, self.dtype.itemsize, self.device.type)
        self.scheduler = Scheduler(sched_cfg, self.block_manager, make_policy(sched_cfg.policy), self.max_model_len,
                                   cost_model)
        self.runner = ModelRunner(self.model, kv_pool, block_size, self.device, self.eos_token_ids, config.seed)
        self.runner.swap_space = HostSwapSpace(kv_pool, num_host_blocks) if num_host_blocks else None
        self.graph_capture_seconds: float | None = None
        if backend_name == "triton":
            use_triton_ops(self.model)  # fused norm / rotary / SiLU kernels
            self.attn_backend.max_seq_len_cap = self.max_model_len  # decode splits sized for graphs
            if config.cuda_graphs and self.device.type == "cuda":
                self.graph_capture_seconds = self.runner.capture_cuda_graphs(sched_cfg.max_num_seqs, self.max_model_len)
        self.detokenizer = Detokenizer(self.tokenizer)
        self._decode_states: dict[str, DecodeState] = {}
        self._parents: dict[str, _Parent] = {}
        self._child_parent: dict[str, str] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._score_ids = itertools.count()
        if verbose:
            logger.warning(
                "flashserve: %s on %s (%s, %s attention), loaded in %.1fs; KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); max_model_len %d",
                self.model_name, self.device, str(self.dtype).removeprefix("torch."), backend_name, load_s,
                pool_plan.num_blocks, block_size, pool_plan.num_tokens,
                pool_plan.num_blocks * pool_plan.bytes_per_block / 2**30, self.max_model_len,
            )
            if self.graph_capture_seconds is not None:
                logger.warning("flashserve: captured decode CUDA graphs for batch sizes up to %d in %.1fs",
                               self.runner.graphs.max_batch, self.graph_capture_seconds)

    def _activation_reserve(self, max_tokens: int, max_seqs: int) -> int:
        """Device bytes kept out of the KV budget for one step's activations and logits."""
        if self.device.type != "cuda":
            return 0
        mc = self.model_config
        elem = self.dtype.itemsize
        acts = max_tokens * (4 * mc.hidden_size + 3 * mc.intermediate_size) * elem * 2
        logits = max_seqs * mc.vocab_size * 4 * 4
        return acts + logits + (512 << 20)

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

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but the model's context is {self.max_model_len} tokens "
                f"(prompt plus at least one generated token); shorten the prompt"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        add_special_tokens: bool = True,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. Raises ValueError for any invalid input; nothing is queued then.

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
        self.validate_prompt(token_ids)
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        parent = _Parent(request_id, text, token_ids, child_ids)
        for i, cid in enumerate(child_ids):
            child_params = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else params.seed + i
            )
            req = Request(cid, token_ids, child_params, self.eos_token_ids, prompt=text)
            self.scheduler.add_request(req)
            self._child_parent[cid] = request_id
            self._decode_states[cid] = self.detokenizer.new_state(token_ids, params.skip_special_tokens, params.stop)
            parent.completions[cid] = CompletionOutput(index=i, text="", token_ids=[], finish_reason=None,
                                                       logprobs=[] if params.logprobs is not None else None)
        self._parents[request_id] = parent
        self.prompt_tokens_total += len(token_ids) * params.n

    def abort_request(self, request_id: str) -> bool:
        """Abort a request (all its child sequences) and free its KV blocks. False if unknown."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return False
        for cid in parent.child_ids:
            self.scheduler.finish_request(cid, RequestStatus.FINISHED_ABORTED)
            self._decode_states.pop(cid, None)
            self._child_parent.pop(cid, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    # ----------------------------------------------------------------- the loop
    def step(self) -> list[RequestOutput]:
        """One iteration; returns an output for every request that got new tokens or finished."""
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan) if not plan.is_empty else RunnerOutput(sampled={})
        progressed = self.scheduler.update(plan, result)
        touched: dict[str, None] = {}
        for req in progressed:
            self.generation_tokens_total += 1
            self._process(req)
            touched[self._child_parent[req.request_id]] = None
        return [self._parent_output(pid) for pid in touched]

    def _process(self, req: Request) -> None:
        """Detokenize the new token, apply stop strings, update the child's CompletionOutput."""
        state = self._decode_states[req.request_id]
        parent = self._parents[self._child_parent[req.request_id]]
        comp = parent.completions[req.request_id]
        self.detokenizer.append(state, req.output_token_ids[-1:])
        if state.stopped_on is not None and not req.is_finished:
            req.stop_reason = state.stopped_on
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            self.detokenizer.flush(state)
        comp.text_delta = self.detokenizer.take_delta(state, req.is_finished)
        comp.text = state.text[: state.emitted]
        comp.num_new_tokens = len(req.output_token_ids) - len(comp.token_ids)
        comp.token_ids = list(req.output_token_ids)
        if comp.logprobs is not None and req.output_logprobs:
            lp, top = req.output_logprobs[-1]
            comp.logprobs.append((req.output_token_ids[-1], lp, top))
        if req.is_finished:
            comp.finish_reason = req.status.value
            comp.stop_reason = req.stop_reason
        parent.metrics = req.metrics

    def _parent_output(self, parent_id: str) -> RequestOutput:
        parent = self._parents[parent_id]
        finished = all(c.finish_reason is not None for c in parent.completions.values())
        outputs = [replace(c, logprobs=None if c.logprobs is None else list(c.logprobs)) for c in parent.completions.values()]
        for c in parent.completions.values():
            c.text_delta, c.num_new_tokens = "", 0
        out = RequestOutput(
            request_id=parent_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            metrics=parent.metrics,
        )
        if finished:
            del self._parents[parent_id]
            for cid in parent.child_ids:
                self._decode_states.pop(cid, None)
                self._child_parent.pop(cid, None)
        return out

    def score(self, token_ids: list[int], chunk_size: int = 512) -> Iterator[torch.Tensor]:
        """Teacher-forced log-probabilities of a token sequence, for quality measurements.

        Yields, chunk by chunk, fp32 tensors [n, V] whose row j is the model's next-token
        distribution after token j (rows for every token but the last, in order). The sequence
        runs through the paged KV cache like a chunked prompt, so whatever the cache stores
        (a quantized or windowed KV) is what later chunks read. Needs the engine to be idle.
        """
        self.validate_prompt(token_ids)
        if self.has_unfinished_requests():
            raise RuntimeError("score() needs an idle engine; finish or abort the running requests first")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        bm, rid = self.block_manager, f"__score__{next(self._score_ids)}"
        if bm.allocate_slots(rid, len(token_ids)) is None:
            raise ValueError(f"{len(token_ids)} tokens do not fit the KV cache ({bm.num_free_blocks} free blocks "
                             f"of {bm.block_size} tokens); score a shorter text or give the cache more memory")
        try:
            table = bm.block_table(rid)
            for start in range(0, len(token_ids) - 1, chunk_size):
                chunk = token_ids[start : min(start + chunk_size, len(token_ids) - 1)]
                yield self.runner.score_chunk(chunk, start, table)
        finally:
            bm.free(rid)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
        )
