"""Tensor and pipeline parallelism: one Worker per rank, driven by rank 0 inside the engine process.

Rank 0 (the driver) is this process: it holds a Worker like the in-process executor does, and
mirrors every call it makes on it (``execute``, ``result``, ``score_chunk``, and ``check_lora`` /
``set_lora``, which every rank answers) to ranks 1..N-1 over a gloo control group, so every rank
applies the same plans in the same order and keeps the same persistent batch. The model's own
collectives (all-reduce after row-parallel layers, the vocabulary all-gather) run on a separate
group: NCCL on CUDA, gloo on CPU. The tensor ranks gather all logits and sample with the same
seed, so each appends the same tokens; only the driver's are returned. With pipeline stages
(``pipeline_parallel_size``) each stage holds its layers only and hands hidden states and
residual to the next over point-to-point send/recv; the last stage samples and sends the token
ids back to the earlier stages (``flashserve.distributed.pipeline``), so a stage returns from
``execute`` once its part is launched and the engine keeps several micro-batches in flight (see
docs/distributed.md).

Ranks are started with torch.multiprocessing (spawn) on this host; ``flashserve.distributed.launch``
starts them under torchrun instead (several hosts), where rank 0 runs the engine.

Failures: a rank that exits (crash, kill) makes the next collective or send fail; a rank that
hangs makes it time out after ``distributed_timeout_s``. Either way the executor names the rank
and its state (exit code / signal, stopped, or not answering), stops the other ranks and refuses
further work; ``dead_reason`` keeps the message for the server's /health. A rank that fails ends
its process at once (``exit_failed``), and a ``DeathWatch`` kills the survivors of a rank that
ended if the engine is still blocked on them a few seconds later.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist

from flashserve.config import EngineConfig, ModelConfig
from flashserve.distributed.parallel_state import ParallelContext, check_tensor_parallel, kv_head_split, parallel_scope
from flashserve.distributed.process_executor import LoRACall, LoRACalls, _Channel, run_lora_call
from flashserve.sched.plan import SchedulerOutput, WorkerOutput

_SHUTDOWN = "shutdown"
# Environment every rank starts with: NVLink multicast stays off (NCCL's NVLS and symmetric memory).
RANK_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def local_model_config(model_config: ModelConfig, ctx: ParallelContext) -> ModelConfig:
    """The shapes one rank's KV pool holds: its stage's layers, its share of the KV heads."""
    kv_heads, _ = kv_head_split(model_config.num_kv_heads, ctx.tp_size)
    start, end = ctx.layer_range(model_config.num_layers)
    return dataclasses.replace(model_config, num_heads=model_config.num_heads // ctx.tp_size, num_kv_heads=kv_heads,
                               num_layers=end - start, layer_types=model_config.layer_types[start:end]
                               if model_config.layer_types is not None else None)


def rank_device(config: EngineConfig, rank: int) -> str:
    """``cuda:<local rank>`` on GPUs (one device per rank), ``cpu`` on CPU; every rank on GPU N
    when the device is given as ``cuda:N`` (``shares_one_gpu``)."""
    from flashserve.runner.worker import resolve_device

    device = resolve_device(config.device)
    if device.type != "cuda":
        return "cpu"
    if device.index is not None:
        return str(device)
    local = int(os.environ.get("LOCAL_RANK", rank))
    return f"cuda:{local}"


def shares_one_gpu(config: EngineConfig) -> bool:
    """All ranks on one GPU (``device="cuda:N"``, for tests on a one-GPU machine): NCCL refuses
    two ranks on one device, so the model's groups are gloo and hand-offs between pipeline
    stages go through host memory."""
    from flashserve.runner.worker import resolve_device

    device = resolve_device(config.device)
    return device.type == "cuda" and device.index is not None


def check_parallel_config(config: EngineConfig, model_config: ModelConfig) -> None:
    """Clear errors before any process starts: shapes that do not split, more ranks than devices."""
    tp, world = config.tensor_parallel_size, config.world_size
    from flashserve.runner.worker import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda" and not shares_one_gpu(config):
        count = torch.cuda.device_count()
        if world > count:
            raise ValueError(f"{_sizes(config)} needs {world} GPUs (one per rank), but this host has {count}")
    # CPU ranks share the cores (each takes cores // world threads)
    check_tensor_parallel(model_config, tp, config.pipeline_parallel_size)


def _sizes(config: EngineConfig) -> str:
    s = f"tensor_parallel_size={config.tensor_parallel_size}"
    if config.pipeline_parallel_size > 1:
        s += f" x pipeline_parallel_size={config.pipeline_parallel_size}"
    return s


def _store_timeout(timeout_s: float) -> datetime.timedelta:
    """Rendezvous waits for every rank to start (spawning and importing torch take seconds), so it
    gets at least two minutes whatever the (possibly short) timeout of the collectives."""
    return datetime.timedelta(seconds=max(timeout_s, 120.0))


def process_state(store: dist.Store, rank: int, process: mp.Process | None, timeout_s: float) -> str:
    """What became of a rank's process: the traceback it recorded in the store, its exit code or
    signal, 'stopped' (SIGSTOP), or silent for ``timeout_s``. ``process`` None: started elsewhere
    (torchrun), nothing more to see from here."""
    key = f"failure/{rank}"
    try:
        if store.check([key]):
            return "failed:\n" + store.get(key).decode()
    except Exception:
        pass
    if process is None:
        return "did not answer"
    process.join(timeout=0.5)
    if process.exitcode is not None:
        if process.exitcode < 0:
            return f"(pid {process.pid}) was killed by {signal.Signals(-process.exitcode).name}"
        return f"(pid {process.pid}) exited with code {process.exitcode}"
    try:
        with open(f"/proc/{process.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return f"(pid {process.pid}) is stopped"
    except OSError:
        pass
    return f"(pid {process.pid}) did not answer within {timeout_s:g} s"


def _make_groups(store: dist.Store, rank: int, world: int, timeout: datetime.timedelta, device: str,
                 tp: int = 1, shared: bool = False) -> tuple[dist.ProcessGroup, ParallelContext]:
    """(control group: gloo; this rank's ParallelContext: world and tensor-parallel groups, NCCL
    on CUDA, gloo on CPU or when all ranks ``shared`` one GPU), on prefixes of one store.

    Every rank first waits on the store (with its long start-up timeout) until all have arrived,
    so the groups' own ``timeout`` only has to cover the collectives."""
    store.set(f"arrived/{rank}", "1")
    store.wait([f"arrived/{r}" for r in range(world)])
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, world, timeout)

    def group(prefix: str, r: int, n: int) -> dist.ProcessGroup:
        if device.startswith("cuda") and not shared:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            return dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), r, n, opts)
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), r, n, timeout)

    pp_rank, tp_rank = divmod(rank, tp)
    world_group = group("world", rank, world)
    tp_group = world_group if tp == world else group(f"tp{pp_rank}", tp_rank, tp)
    # pipeline stages: the last stage's sampled ids travel back on a group of their own
    result_group = group("results", rank, world) if tp < world else None
    return control, ParallelContext(tp_rank=tp_rank, tp_size=tp, tp_group=tp_group, pp_rank=pp_rank,
                                    pp_size=world // tp, world_group=world_group, result_group=result_group,
                                    p2p_through_host=shared)


def exit_failed(store: dist.Store, rank: int) -> NoReturn:
    """End a rank's process after an exception: record its traceback under ``failure/<rank>`` for
    the engine's message, print it, and leave with ``os._exit(1)``. A normal interpreter exit
    tears the gloo groups down with work still posted to a dead peer and can hang there, keeping
    open the connections whose closing tells the engine this rank is gone."""
    text = traceback.format_exc()
    try:
        store.set(f"failure/{rank}", text)
    finally:
        sys.stderr.write(text)
        sys.stderr.flush()
        os._exit(1)


class DeathWatch:
    """When one of the engine's Worker processes ends on its own, the others are of no further use;
    if the engine has not failed ``grace_s`` later (it may be blocked on a survivor that is
    waiting on the dead one), the survivors are killed, so the engine's pending receive ends at
    once instead of after ``distributed_timeout_s``. ``first`` is the rank that ended first."""

    def __init__(self, processes: dict[int, mp.Process], failed: Callable[[], bool], grace_s: float = 5.0) -> None:
        self.processes = processes
        self.failed = failed
        self.grace_s = grace_s
        self.first: int | None = None
        if len(processes) > 1:
            threading.Thread(target=self._run, name="flashserve-death-watch", daemon=True).start()

    def _run(self) -> None:
        by_sentinel = {p.sentinel: r for r, p in self.processes.items()}
        self.first = by_sentinel[mp.connection.wait(list(by_sentinel))[0]]
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if self.failed():
                return
            time.sleep(0.05)
        for p in self.processes.values():
            if p.is_alive():
                p.kill()


def _build_worker(config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                  eos_token_ids: tuple[int, ...], ctx: ParallelContext):
    from flashserve.runner.worker import Worker

    device = rank_device(config, ctx.rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    # CUDA graphs would capture the NCCL collectives; they stay off until that is tested on GPUs.
    cfg = dataclasses.replace(config, device=device, cuda_graphs=config.cuda_graphs and ctx.world_size == 1)
    with parallel_scope(ctx):
        return Worker(cfg, local_model_config(model_config, ctx), max_model_len, eos_token_ids)


def run_rank(store: dist.Store, rank: int, world: int, timeout_s: float, config: EngineConfig,
             model_config: ModelConfig, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
    """Ranks 1..N-1: build the Worker, then repeat what the driver does until it says stop."""
    timeout = datetime.timedelta(seconds=timeout_s)
    device = rank_device(config, rank)
    control, ctx = _make_groups(store, rank, world, timeout, device, config.tensor_parallel_size,
                                shares_one_gpu(config))
    chan = _Channel(control, 0)
    try:
        worker = _build_worker(config, model_config, max_model_len, eos_token_ids, ctx)
    except Exception:
        exit_failed(store, rank)
    handles: dict[int, Any] = {}
    while True:
        try:
            msg = chan.recv()
        except RuntimeError:  # the driver exited without saying shutdown (its process ended)
            return
        try:
            if msg == _SHUTDOWN:
                return
            kind, arg = msg
            if kind == "execute":
                handles[arg.step_id] = worker.execute(arg)
            elif kind == "result":
                handles.pop(arg).result()
            elif kind == "score":
                worker.score_chunk(*arg)
            elif kind == "lora":  # answered: a refused adapter is the driver's ValueError
                chan.send(run_lora_call(worker, arg))
        except Exception:
            exit_failed(store, rank)


def _spawned_rank(port: int, rank: int, world: int, timeout_s: float, threads: int, config: EngineConfig,
                  model_config: ModelConfig, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
    """Entry point of a rank started by the executor (torch.multiprocessing, spawn)."""
    os.environ.update(RANK_ENV)
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=_store_timeout(timeout_s))
    run_rank(store, rank, world, timeout_s, config, model_config, max_model_len, eos_token_ids)


class _DriverHandle:
    def __init__(self, executor: DistributedExecutor, step_id: int, local: Any) -> None:
        self.executor = executor
        self.step_id = step_id
        self.local = local
        self.wait_s = 0.0
        self._result: WorkerOutput | None = None

    def result(self) -> WorkerOutput:
        if self._result is None:
            ex = self.executor
            self._result = ex._guard(lambda: (ex._broadcast(("result", self.step_id)), self.local.result())[1])
            self.wait_s = self.local.wait_s
        return self._result


class DistributedExecutor(LoRACalls):
    """Rank 0 of a tensor-parallel group, in the engine process (see the module docstring)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: tuple[int, ...], store: dist.Store | None = None) -> None:
        check_parallel_config(config, model_config)
        self.world = world = config.world_size
        self.tp = config.tensor_parallel_size
        self.timeout_s = timeout_s = config.distributed_timeout_s
        self.dead_reason: str | None = None
        self._watch: DeathWatch | None = None
        self.processes: list[mp.Process] = []
        self._closed = False
        os.environ.update(RANK_ENV)
        timeout = datetime.timedelta(seconds=timeout_s)
        device = rank_device(config, 0)
        self._threads = torch.get_num_threads()
        threads = max(1, (os.cpu_count() or 1) // world) if device == "cpu" else self._threads
        if store is None:
            from flashserve.distributed.launch import publish_engine, torchrun_store

            store = torchrun_store()
            if store is not None:  # under torchrun: the other ranks wait for this
                if int(os.environ.get("WORLD_SIZE", world)) != world:
                    raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but {_sizes(config)} "
                                     f"needs {world}")
                publish_engine(store, config, model_config, max_model_len, eos_token_ids)
        if store is None:  # start ranks 1..N-1 on this host
            store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=_store_timeout(timeout_s),
                                  wait_for_workers=False)
            ctx = mp.get_context("spawn")
            for rank in range(1, world):
                p = ctx.Process(target=_spawned_rank, name=f"flashserve-rank{rank}", daemon=True,
                                args=(store.port, rank, world, timeout_s, threads, config, model_config,
                                      max_model_len, eos_token_ids))
                p.start()
                self.processes.append(p)
        self._store = store
        torch.set_num_threads(threads)
        try:
            self._wait_for_ranks(store)
            control, ctx = _make_groups(store, 0, world, timeout, device, self.tp, shares_one_gpu(config))
            self._peers = [_Channel(control, r) for r in range(1, world)]
            self.worker = self._guard(lambda: _build_worker(config, model_config, max_model_len, eos_token_ids, ctx))
        except BaseException:
            self.shutdown()
            raise
        self.info = self.worker.info
        self._watch = DeathWatch(dict(enumerate(self.processes, start=1)),
                                 lambda: self.dead_reason is not None or self._closed)

    def _wait_for_ranks(self, store: dist.Store) -> None:
        """Wait until every spawned rank has reached the store, failing at once if one exits."""
        keys = [f"arrived/{r}" for r in range(1, self.world)]
        deadline = time.monotonic() + _store_timeout(self.timeout_s).total_seconds()
        while self.processes:
            if store.check(keys):
                return
            for rank, p in enumerate(self.processes, start=1):
                if p.exitcode is not None:
                    raise RuntimeError(f"{self._rank_name(rank)} {self._rank_state(rank)} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tensor-parallel ranks did not start within {_store_timeout(self.timeout_s)}")
            time.sleep(0.05)

    # ----------------------------------------------------------------- failure handling
    def _rank_state(self, rank: int) -> str:
        """What became of a rank: its exit code / signal, 'stopped', or 'alive'."""
        process = self.processes[rank - 1] if rank - 1 < len(self.processes) else None
        return process_state(self._store, rank, process, self.timeout_s)

    def _fail(self, cause: BaseException) -> RuntimeError:
        first = self._watch.first if self._watch else None  # the rank that ended first leads
        states = {r: self._rank_state(r) for r in sorted(range(1, self.world), key=lambda r: r != first)}
        shown = {r: s for r, s in states.items() if "did not answer" not in s} or states
        what = "; ".join(f"{self._rank_name(r)} {s}" for r, s in shown.items())
        self.dead_reason = f"{what}; the engine has shut down its {self.world} ranks"
        self.shutdown()
        return RuntimeError(f"{self.dead_reason} (rank 0 saw: {str(cause).splitlines()[0] if str(cause) else cause!r})")

    def _rank_name(self, rank: int) -> str:
        if self.world == self.tp:
            return f"tensor-parallel rank {rank}"
        return f"rank {rank} (pipeline stage {rank // self.tp}, tensor-parallel rank {rank % self.tp})"

    def _check_open(self) -> None:
        if self.dead_reason is not None:
            raise RuntimeError(f"the distributed engine is down: {self.dead_reason}")
        if self._closed:
            raise RuntimeError("the distributed engine was shut down; start a new engine")

    def _guard(self, fn):
        self._check_open()
        try:
            return fn()
        except RuntimeError as e:  # gloo / NCCL: a peer closed its connection, or a timeout
            if self.dead_reason is not None or self._closed:
                raise
            raise self._fail(e) from None

    def _broadcast(self, msg: object) -> None:
        # not waited for: a rank still busy with an earlier plan (a later pipeline stage) takes
        # the message when it gets to it, while this rank goes on with its own part
        for chan in self._peers:
            chan.send(msg, wait=False)

    # ----------------------------------------------------------------- the executor interface
    def execute(self, plan: SchedulerOutput) -> _DriverHandle:
        local = self._guard(lambda: (self._broadcast(("execute", plan)), self.worker.execute(plan))[1])
        return _DriverHandle(self, plan.step_id, local)

    def score_chunk(self, token_ids: list[int], start_pos: int, block_ids: list[int]) -> torch.Tensor:
        args = (list(token_ids), start_pos, list(block_ids))
        return self._guard(lambda: (self._broadcast(("score", args)), self.worker.score_chunk(*args))[1])

    def _lora(self, call: LoRACall) -> None:
        """``call`` on every rank (each checks or writes its own layers' slices); ValueError with
        the first refusal once every rank has answered."""
        def run():
            self._broadcast(("lora", call))
            replies = [run_lora_call(self.worker, call)] + [chan.recv() for chan in self._peers]
            return next((r.error for r in replies if r.error is not None), None)

        error = self._guard(run)
        if error is not None:
            raise ValueError(error)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.dead_reason is None:
            for chan in getattr(self, "_peers", []):
                try:
                    chan.send(_SHUTDOWN)
                except RuntimeError:
                    pass
        deadline = time.monotonic() + (10 if self.dead_reason is None else 0)  # after a failure: kill at once
        for p in self.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        torch.set_num_threads(self._threads)
