"""Disaggregated prefill and decode: two Worker processes of the same model, KV blocks sent between them.

Three processes: the engine process (rank 0, the router), a prefill Worker (rank 1) and a decode
Worker (rank 2), each Worker with its own KV pool. The router plays ``EngineCore`` for
``LLMEngine`` (``DisaggregatedCore``): it keeps two schedulers, one per pool, and puts every
request through both:

1. *Reserve*: a request leaves the router's queue only when the decode pool can hold its prompt
   (its decode-side blocks are allocated then, reusing the decode side's cached prefix blocks),
   so a finished prefill never waits for room.
2. *Prefill*: the prefill scheduler runs the prompt (chunked, batched with other prompts) as a
   request of ``max_tokens=1`` and samples the first token there.
3. *Hand-off*: with the next plan, the prefill Worker gathers the request's blocks
   ``pool[:, :, blocks]`` (``[layers, K/V, n, block_size, kv_heads, head_dim]``) into one tensor
   and sends it with torch.distributed ``send`` to the decode Worker, which ``recv``s it and
   scatters it into the reserved blocks (cached prefix blocks are not sent). The request then
   enters the decode scheduler as running, its prompt in the cache and its first token known,
   exactly like a request swapped back in.
4. *Decode* continues there; a decode-side preemption drops or swaps the KV as usual (a
   recomputed request is recomputed on the decode Worker).

The plan of one engine step is a ``DisaggPlan``: the hand-offs, the prefill side's plan and the
decode side's plan (each the same immutable ``SchedulerOutput`` a colocated Worker runs); the
engine's overlapped loop is unchanged. Each Worker answers step N after launching step N+1, as in
``flashserve.distributed.process_executor``.

Transport: the KV group is gloo on CPU and NCCL when the two Workers are on different GPUs. Two
ranks on one GPU cannot share an NCCL communicator (NCCL refuses a duplicate device), so on one
GPU the blocks go through host memory over gloo. An 8-bit KV cache keeps its scales inside the
pool's storage as a strided view, which this hand-off does not carry: refused.

Failures: a Worker that exits or fails makes the router's next send or receive fail (or the
other Worker's, in a hand-off: it then fails too); the router names the side and its state
(exit code or signal, the traceback it recorded, stopped, or silent past
``distributed_timeout_s``), stops both Workers and refuses further work; ``dead_reason`` is what
the server's /health reports. A Worker whose process ends while the router is blocked on the
other is followed by the other a few seconds later (``DeathWatch``).
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from flashserve.cache.block_manager import BlockManager
from flashserve.config import EngineConfig, ModelConfig, SchedulerConfig
from flashserve.distributed.executor import RANK_ENV, DeathWatch, _store_timeout, exit_failed, process_state
from flashserve.distributed.process_executor import (
    _FLUSH,
    _SHUTDOWN,
    LoRACall,
    LoRACalls,
    PlanServer,
    _Channel,
    _Score,
    lora_round_trip,
)
from flashserve.engine.executor import PendingResult
from flashserve.request import Request, RequestStatus
from flashserve.sched.plan import SchedulerOutput, WorkerOutput
from flashserve.sched.policy import make_policy
from flashserve.sched.preemption import PreemptionCostModel
from flashserve.sched.scheduler import Scheduler, StepTokens
from flashserve.sched.stop import StopChecker

PREFILL, DECODE = 1, 2  # ranks of the two Workers (the router is rank 0)
SIDE_NAMES = {PREFILL: "prefill worker", DECODE: "decode worker"}


# --------------------------------------------------------------------------- plans
class KVTransfer(NamedTuple):
    """One request's hand-off: the prefill side's blocks and the decode side's, pairwise."""

    request_id: str
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DisaggPlan:
    """One engine step: hand-offs first (before either side's plan), then each side's plan."""

    step_id: int
    prefill: SchedulerOutput
    decode: SchedulerOutput
    transfers: tuple[KVTransfer, ...] = ()

    @property
    def requests(self) -> tuple:
        return self.prefill.entries + self.decode.entries

    @property
    def num_seqs(self) -> int:
        return self.prefill.num_seqs + self.decode.num_seqs

    @property
    def num_tokens(self) -> int:
        return self.prefill.num_tokens + self.decode.num_tokens

    @property
    def is_empty(self) -> bool:
        return self.prefill.is_empty and self.decode.is_empty and not self.transfers


@dataclass(frozen=True, slots=True)
class DisaggOutput:
    step_id: int
    prefill: WorkerOutput
    decode: WorkerOutput


# --------------------------------------------------------------------------- the router (no torch)
class DecodeScheduler(Scheduler):
    """The decode side's scheduler: also admits requests whose prompt KV arrived from the prefill side."""

    def admit_prefilled(self, request: Request) -> None:
        """``request`` holds its blocks in this block manager (reserved by the router, now filled
        with the prompt's K/V) and its first token; it runs from its next step on."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._enter(request)
        request.num_computed_tokens = request.num_prompt_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._admitted_at[request.request_id] = self.step_count


@dataclass
class _SchedulerView:
    """What the engine, the server and the benches read from ``engine.scheduler``, over both sides."""

    core: DisaggregatedCore
    config: SchedulerConfig

    @property
    def requests(self) -> dict[str, Request]:
        return self.core.requests

    @property
    def running(self) -> list[Request]:
        return self.core.decode.running

    @property
    def num_running(self) -> int:
        return self.core.prefill.num_running + self.core.decode.num_running

    @property
    def num_waiting(self) -> int:
        return len(self.core.queue) + self.core.prefill.num_waiting + self.core.decode.num_waiting

    @property
    def num_preemptions(self) -> int:
        return self.core.prefill.num_preemptions + self.core.decode.num_preemptions

    @property
    def num_rank_preemptions(self) -> int:
        return self.core.prefill.num_rank_preemptions + self.core.decode.num_rank_preemptions

    @property
    def num_swap_outs(self) -> int:
        return self.core.prefill.num_swap_outs + self.core.decode.num_swap_outs


@dataclass
class DisaggregatedCore:
    """``EngineCore``'s interface over a prefill scheduler and a decode scheduler (module docstring)."""

    config: SchedulerConfig
    prefill_blocks: BlockManager
    decode_blocks: BlockManager
    max_model_len: int
    cost_model: PreemptionCostModel | None = None
    requests: dict[str, Request] = field(default_factory=dict)  # every unfinished request, by id
    queue: list[Request] = field(default_factory=list)  # waiting for a decode-side reservation
    _prefilling: dict[str, Request] = field(default_factory=dict)  # on the prefill side (as a copy)
    _ready: list[tuple[Request, tuple[int, ...]]] = field(default_factory=list)  # first token known
    _decode_hits: dict[str, int] = field(default_factory=dict)  # prompt blocks the decode side had cached
    _steps: int = 0
    num_transfers: int = 0
    blocks_transferred: int = 0

    def __post_init__(self) -> None:
        self.prefill = Scheduler(self.config, self.prefill_blocks, make_policy(self.config.policy), self.max_model_len,
                                 self.cost_model)
        self.decode = DecodeScheduler(self.config, self.decode_blocks, make_policy(self.config.policy),
                                      self.max_model_len, self.cost_model)
        self.block_manager = self.decode_blocks  # stats and score() read the decode side
        self.scheduler = _SchedulerView(self, self.config)
        self.stop = StopChecker(self.max_model_len)

    # ----------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.queue.append(request)

    def fork(self, parent: Request, child: Request, share_partial: bool) -> None:
        raise ValueError("beam search is not supported with disaggregated prefill and decode; "
                         "run it on a colocated engine")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Retire a request wherever it is: queued, prefilling, waiting for its hand-off, decoding."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if self.decode.finish_request(request_id, status) is not None:
            return request
        if request in self.queue:
            self.queue.remove(request)
        if request_id in self._prefilling:
            self.prefill.finish_request(request_id, status)
            del self._prefilling[request_id]
        self._ready = [(r, src) for r, src in self._ready if r is not request]
        self.decode_blocks.free(request_id)  # its reservation
        self._decode_hits.pop(request_id, None)
        request.status = status
        request.metrics.finished_time = time.monotonic()
        return request

    # ----------------------------------------------------------------- one step
    def _reserve(self) -> None:
        """Move queued requests (in order) to the prefill side while the decode side can hold
        their prompts and seat them."""
        seats = self.config.max_num_seqs - self.decode.num_running - self.decode.num_waiting
        seats -= len(self._prefilling) + len(self._ready)
        while self.queue and seats > 0:
            request = self.queue[0]
            bm = self.decode_blocks
            hit = bm.lookup_prefix(request.request_id, request.prompt_token_ids, request.prefix_salt)
            if bm.allocate_slots(request.request_id, request.num_prompt_tokens, hit) is None:
                return
            bm.record_query(request.num_prompt_tokens)
            self._decode_hits[request.request_id] = len(hit.blocks)  # already on the decode side: not sent
            self.queue.pop(0)
            params = dataclasses.replace(request.params, max_tokens=1)
            copy = Request(request.request_id, request.prompt_token_ids, params, request.eos_token_ids,
                           prompt=request.prompt, arrival_time=request.arrival_time, lora_load=request.lora_load)
            self._prefilling[request.request_id] = request
            self.prefill.add_request(copy)
            seats -= 1

    def schedule(self) -> DisaggPlan:
        self._steps += 1
        transfers = []
        for request, src in self._ready:
            rid = request.request_id
            dst = self.decode_blocks.block_table(rid)
            skip = self._decode_hits.pop(rid)
            transfers.append(KVTransfer(rid, src[skip: len(dst)], tuple(dst[skip:])))
            self.decode.admit_prefilled(request)
            self.num_transfers += 1
            self.blocks_transferred += len(dst) - skip
        self._ready.clear()
        self._reserve()
        decode = self.decode.schedule()
        prefill = self.prefill.schedule()
        return DisaggPlan(self._steps, prefill, decode, tuple(transfers))

    def update(self, plan: DisaggPlan, result: DisaggOutput) -> StepTokens:
        """Apply both sides' tokens; a request whose first token arrived is handed off next step
        (unless that token stopped it). Returns the requests that got tokens, with the tokens
        each kept and those the stop checks retired (as ``EngineCore.update``)."""
        progressed = StepTokens([], [], [])
        for copy, n in self.prefill.update(plan.prefill, result.prefill):
            rid = copy.request_id
            src = tuple(self.prefill_blocks.block_table(rid))
            # Its blocks are free for later prefill plans: the hand-off (next plan) reaches the
            # prefill Worker before any of them, so it reads them first.
            self.prefill.finish_request(rid, RequestStatus.FINISHED_LENGTH)
            request = self._prefilling.pop(rid, None)
            if request is None:
                continue
            request.output_token_ids.extend(copy.output_token_ids)
            request.output_logprobs.extend(copy.output_logprobs)
            request.metrics.first_scheduled_time = copy.metrics.first_scheduled_time
            request.metrics.first_token_time = copy.metrics.first_token_time
            request.metrics.num_preemptions += copy.metrics.num_preemptions
            request.metrics.num_cached_prompt_tokens = copy.metrics.num_cached_prompt_tokens  # prefill's hit
            status = self.stop.check(request, n)
            if status is not None:
                self.finish_request(rid, status)
                progressed.finished.append(request)
            elif len(src) < self.prefill_blocks.blocks_needed(request.num_prompt_tokens):
                # Preempted (recompute) while its last chunk ran: its KV is gone. The decode side
                # recomputes it, as after a decode-side preemption.
                self.decode_blocks.free(rid)
                self._decode_hits.pop(rid, None)
                self.decode.add_request(request)
            else:
                self._ready.append((request, src))
            progressed.requests.append(request)
            progressed.counts.append(n)
        for request, n in self.decode.update(plan.decode, result.decode):
            progressed.requests.append(request)
            progressed.counts.append(self.stop.retire(request, n, self.finish_request, progressed.finished))
        return progressed


# --------------------------------------------------------------------------- KV hand-off (torch)
def _rows(pool: torch.Tensor) -> torch.Tensor:
    """The pool as [layers * 2, blocks, block elements]: a block of one layer's K or V is one
    contiguous row, so gathers and scatters copy whole rows (the 6-D index_select is 2-3x slower
    on CPU)."""
    return pool.view(pool.shape[0] * pool.shape[1], pool.shape[2], -1)


def gather_blocks(pool: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """The blocks' K/V as one contiguous tensor [layers, 2, n, block_size, kv_heads, head_dim]."""
    idx = torch.tensor(blocks, dtype=torch.long, device=pool.device)
    return _rows(pool).index_select(1, idx).view(block_shape(pool, len(blocks)))


def scatter_blocks(pool: torch.Tensor, blocks: tuple[int, ...], data: torch.Tensor) -> None:
    """Write ``data`` (as ``gather_blocks`` returns it) into ``blocks`` of ``pool``."""
    idx = torch.tensor(blocks, dtype=torch.long, device=pool.device)
    rows = data.to(pool.device).reshape(pool.shape[0] * pool.shape[1], len(blocks), -1)
    _rows(pool).index_copy_(1, idx, rows)


def block_shape(pool: torch.Tensor, n: int) -> tuple[int, ...]:
    return (pool.shape[0], pool.shape[1], n, *pool.shape[3:])


class KVLink:
    """Block tensors between the two Workers: ``send`` on the prefill side, ``recv`` on the decode
    side, in the same order (each side applies the hand-offs of a plan in plan order)."""

    def __init__(self, group: dist.ProcessGroup, peer: int, staging: bool) -> None:
        self.group = group
        self.peer = peer
        self.staging = staging  # gloo with CUDA pools: through host memory

    def send(self, pool: torch.Tensor, blocks: tuple[int, ...]) -> None:
        data = gather_blocks(pool, blocks)
        if self.staging:
            data = data.cpu()
        self.group.send([data], self.peer, 0).wait()

    def recv(self, pool: torch.Tensor, blocks: tuple[int, ...]) -> None:
        device = "cpu" if self.staging else pool.device
        data = torch.empty(block_shape(pool, len(blocks)), dtype=pool.dtype, device=device)
        self.group.recv([data], self.peer, 0).wait()
        scatter_blocks(pool, blocks, data)


def make_kv_link(store: dist.Store, rank: int, devices: dict[int, str], timeout: datetime.timedelta) -> KVLink:
    """The 2-rank KV group of the two Workers (``rank``: PREFILL or DECODE)."""
    nccl = devices[PREFILL].startswith("cuda") and devices[PREFILL] != devices[DECODE]
    me, peer = rank - PREFILL, DECODE - rank
    prefix = dist.PrefixStore("kv", store)
    if nccl:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return KVLink(dist.ProcessGroupNCCL(prefix, me, 2, opts), peer, staging=False)
    return KVLink(dist.ProcessGroupGloo(prefix, me, 2, timeout), peer,
                  staging=devices[rank].startswith("cuda"))


# --------------------------------------------------------------------------- the Worker processes
def side_devices(config: EngineConfig) -> dict[int, str]:
    """CPU: both on the CPU; CUDA: prefill on GPU 0 and decode on GPU 1, or both on the one GPU."""
    from flashserve.runner.worker import resolve_device

    device = resolve_device(config.device)
    if device.type != "cuda":
        return {PREFILL: "cpu", DECODE: "cpu"}
    if device.index is not None or torch.cuda.device_count() < 2:
        name = f"cuda:{device.index or 0}"
        return {PREFILL: name, DECODE: name}
    return {PREFILL: "cuda:0", DECODE: "cuda:1"}


def side_config(config: EngineConfig, devices: dict[int, str], rank: int) -> EngineConfig:
    """One Worker's config: its device; on a GPU both Workers share, half the default KV fraction each."""
    cache = config.cache
    if devices[PREFILL] == devices[DECODE] and devices[rank].startswith("cuda") and cache.kv_cache_bytes is None:
        from flashserve.runner.kv_cache import DEFAULT_GPU_FRACTION

        fraction = (cache.kv_cache_memory_fraction or DEFAULT_GPU_FRACTION) / 2
        cache = dataclasses.replace(cache, kv_cache_memory_fraction=fraction)
    return dataclasses.replace(config, device=devices[rank], cache=cache)


def _side_main(port: int, rank: int, timeout_s: float, threads: int, config: EngineConfig,
               model_config: ModelConfig, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
    """Entry point of a Worker process: build the Worker, then run the router's messages in order."""
    os.environ.update(RANK_ENV)
    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, 3, False, timeout=_store_timeout(timeout_s))
    store.set(f"arrived/{rank}", "1")
    store.wait([f"arrived/{r}" for r in range(3)])
    try:
        chan = _Channel(dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, 3, timeout), 0)
        devices = side_devices(config)
        cfg = side_config(config, devices, rank)
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)
        from flashserve.runner.worker import Worker

        worker = Worker(cfg, model_config, max_model_len, eos_token_ids)
        link = make_kv_link(store, rank, devices, timeout)
        chan.send(worker.info)
        server = PlanServer(worker, chan)
        with torch.inference_mode():
            while True:
                try:
                    msg = chan.recv()
                except RuntimeError:  # the router exited without saying shutdown
                    return
                if isinstance(msg, KVTransfer):
                    if rank == PREFILL:
                        link.send(worker.kv_pool, msg.src_blocks)
                    else:
                        link.recv(worker.kv_pool, msg.dst_blocks)
                elif not server.handle(msg):
                    return
    except Exception:
        exit_failed(store, rank)


class _Side:
    """The router's end of one Worker: its channel and the steps it has not answered yet."""

    def __init__(self, rank: int, chan: _Channel) -> None:
        self.rank = rank
        self.chan = chan
        self.last_sent: int | None = None
        self.outputs: dict[int, WorkerOutput] = {}

    def execute(self, plan: SchedulerOutput) -> None:
        self.chan.send(plan)
        self.last_sent = plan.step_id

    def result(self, step_id: int) -> WorkerOutput:
        if self.last_sent == step_id:  # no newer plan will make the Worker answer: ask
            self.chan.send(_FLUSH)
            self.last_sent = None
        while step_id not in self.outputs:
            out = self.chan.recv()
            self.outputs[out.step_id] = out
        return self.outputs.pop(step_id)


def check_disaggregated(config: EngineConfig, model_config: ModelConfig) -> None:
    """Clear errors, before any process starts, for what disaggregation does not combine with."""
    from flashserve.cache.kv_groups import kv_layout

    if config.world_size > 1:
        raise ValueError("disaggregated prefill/decode runs one Worker per side; it does not combine with "
                         f"tensor_parallel_size={config.tensor_parallel_size} or "
                         f"pipeline_parallel_size={config.pipeline_parallel_size}")
    if config.executor != "inproc":
        raise ValueError(f"disaggregated prefill/decode starts its own Worker processes; leave executor='inproc' "
                         f"(got executor={config.executor!r})")
    if config.speculative is not None or config.early_exit is not None:
        raise ValueError("disaggregated prefill/decode does not combine with speculative decoding or early exit")
    if config.cache.kv_cache_dtype != "auto":
        raise ValueError(f"disaggregated prefill/decode cannot hand off an 8-bit KV cache "
                         f"(kv_cache_dtype={config.cache.kv_cache_dtype!r}: its scales are not sent); "
                         "use kv_cache_dtype='auto'")
    if config.attention is not None:
        raise ValueError(f"disaggregated prefill/decode hands off full-attention KV only; attention="
                         f"{config.attention.kind!r} keeps other state (leave attention='auto')")
    if config.cache.kv_host_cache_gb > 0:
        raise ValueError(f"disaggregated prefill/decode keeps each side's prefix cache on its device only; "
                         f"kv_host_cache_gb={config.cache.kv_host_cache_gb} is not supported with it (use 0)")
    if kv_layout(model_config).num_groups > 1:
        raise ValueError("disaggregated prefill/decode does not support models whose layers keep different KV "
                         "spans (e.g. Gemma 3's local and global layers, or a sliding-window attention option)")


class DisaggregatedExecutor(LoRACalls):
    """Starts the prefill and decode Workers and drives them (module docstring)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: tuple[int, ...]) -> None:
        check_disaggregated(config, model_config)
        self.timeout_s = timeout_s = config.distributed_timeout_s
        self.dead_reason: str | None = None
        self._watch: DeathWatch | None = None
        self._closed = False
        self.processes: dict[int, mp.Process] = {}
        self.sides: dict[int, _Side] = {}
        os.environ.update(RANK_ENV)
        self._store = store = dist.TCPStore("127.0.0.1", 0, 3, True, timeout=_store_timeout(timeout_s),
                                            wait_for_workers=False)
        threads = max(1, (os.cpu_count() or 1) // 2)
        ctx = mp.get_context("spawn")
        for rank in (PREFILL, DECODE):
            p = ctx.Process(target=_side_main, name=f"flashserve-{SIDE_NAMES[rank].replace(' ', '-')}", daemon=True,
                            args=(store.port, rank, timeout_s, threads, config, model_config, max_model_len,
                                  eos_token_ids))
            p.start()
            self.processes[rank] = p
        try:
            self._wait_for_sides()
            control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), 0, 3,
                                            datetime.timedelta(seconds=timeout_s))
            self.sides = {r: _Side(r, _Channel(control, r)) for r in (PREFILL, DECODE)}
            self.prefill_info = self._guard(self.sides[PREFILL].chan.recv)
            self.info = self._guard(self.sides[DECODE].chan.recv)
        except BaseException:
            self.shutdown()
            raise
        self._watch = DeathWatch(self.processes, lambda: self.dead_reason is not None or self._closed)

    def make_core(self, config: SchedulerConfig, model_config: ModelConfig, max_model_len: int,
                  enable_prefix_caching: bool, cost_model: PreemptionCostModel | None) -> DisaggregatedCore:
        """The router over both Workers' pools (block managers sized from their infos)."""
        pi, di = self.prefill_info, self.info
        return DisaggregatedCore(config, BlockManager(pi.num_blocks, pi.block_size, enable_prefix_caching,
                                                      pi.num_host_blocks),
                                 BlockManager(di.num_blocks, di.block_size, enable_prefix_caching, di.num_host_blocks),
                                 max_model_len, cost_model)

    def _wait_for_sides(self) -> None:
        keys = [f"arrived/{r}" for r in (PREFILL, DECODE)]
        self._store.set("arrived/0", "1")
        deadline = time.monotonic() + _store_timeout(self.timeout_s).total_seconds()
        while not self._store.check(keys):
            for rank, p in self.processes.items():
                if p.exitcode is not None:
                    raise RuntimeError(f"the {SIDE_NAMES[rank]} {process_state(self._store, rank, p, self.timeout_s)} "
                                       "while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the prefill and decode workers did not start within {_store_timeout(self.timeout_s)}")
            time.sleep(0.05)

    # ----------------------------------------------------------------- failures
    def _fail(self, cause: BaseException) -> RuntimeError:
        states = {r: process_state(self._store, r, p, self.timeout_s) for r, p in self.processes.items()}
        # The side whose process ended first leads (the death watch saw it); then a signal beats an
        # exit (the other side may exit on its broken connection), which beats a traceback (a
        # failed hand-off), which beats silence.
        first = self._watch.first if self._watch else None
        order = sorted(states, key=lambda r: (r != first, "killed by" not in states[r],
                                              not states[r].startswith("(pid"), "did not answer" in states[r]))
        shown = [r for r in order if "did not answer" not in states[r]] or order
        what = "; ".join(f"the {SIDE_NAMES[r]} {states[r]}" for r in shown)
        self.dead_reason = f"{what}; the disaggregated engine has shut down both workers"
        self.shutdown()
        return RuntimeError(f"{self.dead_reason} (the router saw: {str(cause).splitlines()[0] if str(cause) else cause!r})")

    def _guard(self, fn):
        if self.dead_reason is not None:
            raise RuntimeError(f"the disaggregated engine is down: {self.dead_reason}")
        if self._closed:
            raise RuntimeError("the disaggregated engine was shut down; start a new engine")
        try:
            return fn()
        except RuntimeError as e:  # gloo: a peer closed its connection, or a timeout
            if self.dead_reason is not None or self._closed:
                raise
            raise self._fail(e) from None

    # ----------------------------------------------------------------- the executor interface
    def execute(self, plan: DisaggPlan | SchedulerOutput):
        if isinstance(plan, SchedulerOutput):  # a plan for both Workers (LLMEngine.warm_up)
            self._guard(lambda: self.sides[PREFILL].execute(plan))
            self._guard(lambda: self.sides[PREFILL].result(plan.step_id))
            self._guard(lambda: self.sides[DECODE].execute(plan))
            return PendingResult(lambda: self._guard(lambda: self.sides[DECODE].result(plan.step_id)))

        def send() -> None:
            for t in plan.transfers:  # before the plans: the hand-offs read blocks a later prefill may reuse
                self.sides[PREFILL].chan.send(t)
                self.sides[DECODE].chan.send(t)
            self.sides[PREFILL].execute(plan.prefill)
            self.sides[DECODE].execute(plan.decode)

        self._guard(send)
        return PendingResult(lambda: self._guard(lambda: DisaggOutput(
            plan.step_id, self.sides[PREFILL].result(plan.prefill.step_id), self.sides[DECODE].result(plan.decode.step_id))))

    def score_chunk(self, token_ids: list[int], start_pos: int, block_ids: list[int]) -> torch.Tensor:
        side = self.sides[DECODE]

        def run() -> torch.Tensor:
            if side.last_sent is not None:
                side.result(side.last_sent)
            side.chan.send(_Score(list(token_ids), start_pos, list(block_ids)))
            return side.chan.recv()

        return self._guard(run)

    def _lora(self, call: LoRACall) -> None:
        """``call`` on both Workers (the same model: the same answer); ValueError with a refusal."""
        def run() -> list[str]:
            errors = []
            for side in self.sides.values():
                flush, side.last_sent = side.last_sent is not None, None
                try:
                    lora_round_trip(side.chan.send, side.chan.recv, call, flush, side.outputs)
                except ValueError as e:
                    errors.append(str(e))
            return errors

        errors = self._guard(run)
        if errors:
            raise ValueError(errors[0])

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.dead_reason is None:
            for side in self.sides.values():
                try:
                    side.chan.send(_SHUTDOWN)
                except RuntimeError:
                    pass
        deadline = time.monotonic() + (10 if self.dead_reason is None else 0)  # after a failure: kill at once
        for p in self.processes.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
