"""The Worker: one device's model, KV pool, sampler, CUDA graphs and persistent batch.

It executes the plans EngineCore sends (``flashserve.sched.plan``) and keeps per-request state
between them (``flashserve.runner.input_batch``). ``execute`` launches a step and returns a
``StepHandle`` at once; ``StepHandle.result()`` waits for that step's sampled tokens. The engine
launches step N+1 before it asks for step N's result, so the device never waits for the host:
step N+1's inputs take the tokens step N sampled straight from the device.

Inputs go into static device buffers (``flashserve.runner.cuda_graphs.StepBuffers``): pure
decode steps, small mixed steps and small token-tree verifications replay a captured CUDA graph,
larger steps run eager. The only host synchronisation in a step is ``result()``; the copies of
sampled tokens (and logprobs) to pinned host memory are queued right after sampling, so
``result()`` waits for its own step only.

The same Worker serves in-process engines and worker processes (``flashserve.distributed``).
On a pipeline stage before the last, ``execute`` returns once the stage's activations are posted
and ``result()`` receives the step's tokens from the last stage (``flashserve.distributed.pipeline``).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from itertools import repeat
from typing import Any, NamedTuple
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from flashserve.cache.kv_groups import kv_layout
from flashserve.config import EngineConfig, ModelConfig
from flashserve.kernels.tree_mask import TreeMask
from flashserve.layers.attention import Attention
from flashserve.distributed.parallel_state import current_parallel
from flashserve.layers.attention_metadata import forward_context
from flashserve.layers.logits_processors import LogitsProcessors
from flashserve.layers.sampler import Sampler, SamplerOutput, SamplingRow
from flashserve.runner.cuda_graphs import CudaGraphs, StepBuffers
from flashserve.runner.input_batch import BlockUpdates, InputBatch, StepInputs
from flashserve.runner.kv_cache import allocate_kv_pool, plan_kv_pool
from flashserve.runner.swap import HostSwapSpace, apply_block_copies
from flashserve.sched.plan import DecodeBatch, SampledTokens, SchedulerOutput, StepCost, WorkerOutput

_request_id, _slot = operator.attrgetter("request_id"), operator.attrgetter("slot")
_params, _penalty_slot = operator.attrgetter("params"), operator.attrgetter("penalty_slot")


def later_rows(rows: list[SamplingRow], states: list, j: int) -> list[SamplingRow]:
    """The sampling rows of model step ``j`` of a multi-step batch whose step 0 samples ``rows``:
    each row ``j`` outputs further on (its seed position), its EOS / stop ids banned while that is
    below its min_tokens."""
    if j == 0:
        return rows
    return [r._replace(num_output_tokens=r.num_output_tokens + j,
                       banned_token_ids=st.banned if r.num_output_tokens + j < r.params.min_tokens else ())
            for r, st in zip(rows, states)]


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


@dataclass(frozen=True)
class WorkerInfo:
    """What a Worker reports once it is ready (the engine sizes its block manager from it)."""

    device: str
    dtype: str
    attention_backend: str
    num_blocks: int
    block_size: int
    bytes_per_block: int
    num_host_blocks: int
    load_seconds: float
    graph_capture_seconds: float | None
    max_decode_graph_batch: int | None
    weight_bytes: int
    num_host_cache_blocks: int = 0  # the prefix cache's host tier, host blocks after the swap slots
    offloaded_weight_bytes: int = 0  # weights kept in host memory and streamed in (cpu_offload_gb)
    # Pipeline stages whose steps overlap: the engine may keep this many plans (on disjoint
    # requests) in flight. 1: one micro-batch at a time (one stage, or speculation / early exit).
    pipeline_stages: int = 1


@dataclass
class StepTiming:
    """Where one step's time went (recorded only when ``Worker.timings`` is a list)."""

    num_tokens: int
    is_decode: bool
    graph: bool
    host_s: float  # host time to apply the plan, build inputs and launch the forward and sampling
    start: torch.cuda.Event | None = None  # device timeline of the step (CUDA)
    end: torch.cuda.Event | None = None
    # Of host_s, the time inside the model's forward, the sampler and the speculator's draft and
    # verification calls: launching their kernels on CUDA (nothing waits for the device), running
    # them on CPU. The rest (``prep_s``) is the Worker's own host work.
    compute_s: float = 0.0
    model_steps: int = 1  # forwards the step ran (a multi-step decode batch's num_steps)

    @property
    def prep_s(self) -> float:
        """Host time of the plan's application, the inputs (built and written into the step's
        buffers) and the sampling rows: ``host_s`` outside the model, sampler and speculator calls."""
        return self.host_s - self.compute_s

    @property
    def gpu_ms(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


@dataclass
class StepHandle:
    """A launched step; ``result()`` waits for its sampled tokens (once)."""

    step_id: int
    request_ids: list[str]  # of the sampling rows, in row order
    out: SamplerOutput | None
    states: list = field(default_factory=list)  # the RequestState of each row at launch
    num_drafts: dict[str, int] | None = None  # drafts verified per request (speculative steps)
    speculative: bool = False  # the speculator took part (``Speculator.takes_part``)
    timed: bool = False  # a plain step the speculator times (``Speculator.times_plain``)
    cost: Callable[[], StepCost] | None = None  # the step's measured cost, read after the event
    wait_s: float = 0.0  # time result() waited for the device
    host: dict[str, torch.Tensor] = field(default_factory=dict)
    event: torch.cuda.Event | None = None
    comms: list = field(default_factory=list)  # sends not waited for yet (pipeline stages)
    packet: Any = None  # a pipeline stage before the last: the posted receive of the step's tokens
    worker: Worker | None = None
    slots: np.ndarray | None = None  # [S] the batch slot of each row at launch
    generations: np.ndarray | None = None  # [S] those slots' InputBatch.generation at launch
    lens: np.ndarray | None = None  # [S] tokens of each row (a multi-step batch; None: one model step)
    _result: WorkerOutput | None = None

    def result(self) -> WorkerOutput:
        if self._result is None:
            self._result = self.worker._finish(self) if self.worker is not None else WorkerOutput(self.step_id, {})
        return self._result


class _DeferredStep(NamedTuple):
    """A launched step whose sampling waits for the tokens of ``previous`` (grammar masks)."""

    handle: StepHandle
    hidden: torch.Tensor  # [T, hidden] the forward's output
    inp: StepInputs
    spec: Any  # the speculator's step data, or None
    previous: StepHandle  # the step in flight when this one was launched


class Worker:
    """Owns the model, the KV pool, the sampler and the request states of one device."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: tuple[int, ...]) -> None:
        from flashserve.layers.attention import get_attention_backend
        from flashserve.layers.fused import use_triton_ops
        from flashserve.models.cpu_decode import use_cpu_decode_layers
        from flashserve.loader import default_model_path, load_model
        from flashserve.runner.host_weights import pack_weights_in_huge_pages

        self.config = config
        self.parallel = current_parallel()  # this rank's place (one rank outside flashserve.distributed)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.max_model_len = max_model_len
        backend_name = config.attention_backend
        if backend_name == "auto":
            backend_name = "triton" if self.device.type == "cuda" else "torch"
        if config.batch_invariant:
            from flashserve.layers.batch_invariant import check_backend

            check_backend(self.device, backend_name)  # the device resolved: also for device="auto"
        self.attn_backend = get_attention_backend(backend_name, max_seq_len_cap=max_model_len,
                                                  batch_invariant=config.batch_invariant)
        t0 = time.perf_counter()
        source = config.model if config.model is not None else default_model_path()
        if config.cpu_offload_gb > 0:
            from flashserve.runner.offload import check_offload_modes

            check_offload_modes(config)
        self.model, _ = load_model(source, config.load_format, self.dtype, self.device, self.attn_backend, config.seed,
                                   quantization=config.quantization, dense_gguf=config.dtype != "auto",
                                   attention=config.attention, cpu_offload_gb=config.cpu_offload_gb)
        self.offload = getattr(self.model, "_host_weights", None)  # offloaded layers (cpu_offload_gb)
        if self.device.type == "cpu":  # fewer TLB misses when streaming the weights (not the staging views)
            pack_weights_in_huge_pages(self.model, skip=self.offload.streamed() if self.offload is not None else ())
        self.lora = None  # the LoRA adapter slots (flashserve.lora), before the KV pool is sized
        if config.lora_modules or config.max_loras is not None:
            from flashserve.lora.adapter import load_adapter
            from flashserve.lora.layers import install_adapters

            adapters = [load_adapter(name, path) for name, path in config.lora_modules]
            self.lora = install_adapters(self.model, adapters, self.dtype, self.device, config.max_loras,
                                         config.max_lora_rank)
        load_s = time.perf_counter() - t0

        sched, cache = config.scheduler, config.cache
        self.block_size = cache.block_size
        # Layers of different memory kinds keep separate block tables over one pool whose blocks hold
        # ``slab`` layers each (flashserve.cache.kv_groups); one kind: every layer, one table.
        self.layout = layout = kv_layout(model_config)
        from flashserve.cache.kv_groups import check_host_tier

        check_host_tier(layout, int(cache.kv_host_cache_gb > 0))
        self.speculator = None
        if config.speculative is not None:  # its draft model (if any) loads before the KV pool is sized
            from flashserve.spec.speculator import Speculator

            self.speculator = Speculator(config, self, source)
        slab_config = replace(model_config, num_layers=layout.slab, layer_types=None)
        useful_blocks = layout.num_groups * sched.max_num_seqs * -(-max_model_len // cache.block_size)
        plan = plan_kv_pool(slab_config, cache, self.dtype, self.device, max_model_len, useful_blocks,
                            reserve_bytes=self._activation_reserve(model_config, sched.max_num_batched_tokens,
                                                                   sched.max_num_seqs),
                            extra_bytes_per_block=self.speculator.kv_bytes_per_block() if self.speculator else 0)
        # every tensor-parallel rank holds the same number of blocks (the smallest budget)
        plan = replace(plan, num_blocks=self.parallel.all_reduce_min(plan.num_blocks))
        self._check_fits_one_sequence(plan.num_blocks, max_model_len, sched.max_num_batched_tokens)
        self.kv_pool = allocate_kv_pool(slab_config, plan, self.dtype, self.device)
        self.kv_caches = [(self.kv_pool[j, 0], self.kv_pool[j, 1]) for j in layout.layer_slab]
        attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer, group in zip(attention_layers, layout.layer_group):
            layer.kv_group = group
        num_host_blocks = cache.swap_space_bytes // plan.bytes_per_block
        # the prefix cache's host tier shares the swap space's host tensor, after the swap slots
        num_cache_blocks = int(cache.kv_host_cache_gb * 2**30) // plan.bytes_per_block
        if cache.kv_host_cache_gb > 0 and num_cache_blocks == 0:
            raise ValueError(f"kv_host_cache_gb={cache.kv_host_cache_gb} holds no KV block of {plan.bytes_per_block} "
                             f"bytes; give at least {plan.bytes_per_block / 2**30:.6f} GiB")
        total_host = num_host_blocks + num_cache_blocks
        self.swap_space = HostSwapSpace(self.kv_pool, total_host) if total_host else None
        self.sampler = Sampler(self.device, model_config.vocab_size, config.seed)
        self.sampler.logits_processors = LogitsProcessors.for_engine(config, eos_token_ids)
        self.max_blocks = -(-max_model_len // self.block_size)
        self.batch = InputBatch(max_model_len, self.block_size, tuple(eos_token_ids), layout.num_groups)
        self.block_table = torch.zeros(0, self.max_blocks, dtype=torch.int32, device=self.device)
        self.group_block_tables = [self.block_table.clone() for _ in range(layout.num_groups - 1)]
        # token trees replay graphs of their own (tree-masked attention: the Triton backend's kernel)
        trees = (config.speculative is not None and config.speculative.tree_width > 1 and backend_name == "triton"
                 and config.cuda_graphs and self.device.type == "cuda" and not config.batch_invariant)
        self.buffers = StepBuffers(sched.max_num_batched_tokens, sched.max_num_seqs, self.max_blocks, self.device,
                                   layout.num_groups, trees, lora=self.lora is not None)
        if self.lora is not None:
            self.lora.batch.ids = self.buffers.lora_ids
            self._index_lora()
        self._pin = self.device.type == "cuda"
        self._prev_tokens: torch.Tensor | None = None  # sampled ids of the last launched step [S]
        self._prev_rows = np.full(0, -1, dtype=np.int64)  # per batch slot: its row in _prev_tokens (-1: none)
        self._last_handle: StepHandle | None = None  # the step launched last (maybe still in flight)
        # A step whose grammar masks need the tokens of the step before it: its forward is launched,
        # its sampling waits for the next execute() or its result() (see execute).
        self._deferred: _DeferredStep | None = None
        self.timings: list[StepTiming] | None = None  # set to [] to record per-step timings (benchmarks)
        self._compute_s = 0.0  # time in model, sampler and speculator calls since execute() began
        self.graphs: CudaGraphs | None = None
        if config.batch_invariant:
            from flashserve.layers.batch_invariant import use_batch_invariant

            use_batch_invariant(self.model, kernels=self.device.type == "cuda")
        if backend_name == "triton":
            use_triton_ops(self.model)  # fused norm / rotary / SiLU kernels
            if config.cuda_graphs and self.device.type == "cuda":
                # greedy graphs take the argmax too; pipeline stages hand the logits around instead
                head = self.model.compute_logits if self.parallel.pp_size == 1 else None
                self.graphs = CudaGraphs(self.model, self.kv_caches, self.buffers, self.block_size, max_model_len,
                                         sched.max_num_seqs, config.max_mixed_graph_tokens, head)
                self.graphs.capture()
        else:  # int4 CPU layers: decode steps in few ops (flashserve.models.cpu_decode)
            use_cpu_decode_layers(self.model)
        from flashserve.quant import stored_bytes

        weights = stored_bytes(self.model)  # quantized weights live in buffers
        if self.speculator is not None:
            self.speculator.start(plan.num_blocks)
        self.early_exit = None
        if config.early_exit is not None:
            from flashserve.spec.early_exit import EarlyExitModel

            self.early_exit = EarlyExitModel(self.model, config.early_exit)
        # Pipeline stages: the last samples and sends the tokens back (flashserve.distributed.pipeline),
        # so stages overlap on micro-batches; speculation and early exit keep every rank sampling.
        self.stage_results = None
        if self.parallel.pp_size > 1 and self.speculator is None and self.early_exit is None:
            from flashserve.distributed.pipeline import StageResults

            self.stage_results = StageResults(self.parallel, self.device)
        self.info = WorkerInfo(
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."), attention_backend=backend_name,
            num_blocks=plan.num_blocks, block_size=self.block_size, bytes_per_block=plan.bytes_per_block,
            num_host_blocks=num_host_blocks, load_seconds=load_s,
            graph_capture_seconds=self.graphs.capture_seconds if self.graphs else None,
            max_decode_graph_batch=self.graphs.decode_sizes[-1] if self.graphs else None, weight_bytes=weights,
            num_host_cache_blocks=num_cache_blocks,
            offloaded_weight_bytes=self.offload.host_bytes if self.offload is not None else 0,
            pipeline_stages=self.parallel.pp_size if self.stage_results is not None else 1)

    def _check_fits_one_sequence(self, num_blocks: int, max_model_len: int, max_step_tokens: int) -> None:
        """With several groups of layers, one sequence of ``max_model_len`` needs the whole context
        in each full group and a window plus one step's tokens in each windowed one."""
        if self.layout.num_groups == 1:
            return  # plan_kv_pool checked it
        bs = self.block_size
        whole = -(-max_model_len // bs)
        need = sum(whole if g.span is None else min(whole, -(-g.span // bs) + 1 + -(-g.sinks // bs)
                                                     + -(-max_step_tokens // bs))
                   for g in self.layout.groups)
        if num_blocks < need:
            raise ValueError(f"the KV cache holds {num_blocks} blocks of {self.layout.slab} layers x {bs} tokens, but "
                             f"one sequence of max_model_len={max_model_len} tokens needs {need} over the model's "
                             f"{self.layout.num_groups} groups of layers; raise the KV cache budget or lower max_model_len")

    def _activation_reserve(self, mc: ModelConfig, max_tokens: int, max_seqs: int) -> int:
        """Device bytes kept out of the KV budget for one step's activations and logits."""
        if self.device.type != "cuda":
            return 0
        elem = self.dtype.itemsize
        acts = max_tokens * (4 * mc.hidden_size + 3 * mc.intermediate_size) * elem * 2
        logits = max_seqs * mc.vocab_size * 4 * 4
        return acts + logits + (512 << 20)

    # ----------------------------------------------------------------- plan application
    def _apply_plan_state(self, plan: SchedulerOutput) -> None:
        for rid in plan.finished_ids:
            state = self.batch.remove(rid)
            if state is not None and state.penalty_slot is not None:
                self.sampler.penalties.release(state.penalty_slot)
        for new in plan.new_requests:
            pslot = self.sampler.penalties.add(new.prompt_token_ids, new.output_token_ids) \
                if new.params.has_penalty else None
            self.batch.add(new, pslot)
        if self.batch.num_slots > self.block_table.shape[0]:  # more request slots: grow the device tables
            def grow(table: torch.Tensor) -> torch.Tensor:
                grown = torch.zeros(self.batch.num_slots, self.max_blocks, dtype=torch.int32, device=self.device)
                grown[: table.shape[0]] = table
                return grown

            self.block_table = grow(self.block_table)
            self.group_block_tables = [grow(t) for t in self.group_block_tables]
        if plan.block_copies:  # swap preemption moves, before the forward
            apply_block_copies(self.kv_pool, self.swap_space, plan.block_copies)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def apply_block_updates(self, updates: tuple[BlockUpdates | None, tuple[BlockUpdates | None, ...]]) -> None:
        """Scatter (slot, column, block id) updates into the device block tables: group 0's, then
        the other groups' (``InputBatch.append_blocks``)."""
        main, groups = updates
        for table, upd in zip((self.block_table, *self.group_block_tables), (main, *groups)):
            if upd is not None:
                flat, blk = upd
                table.view(-1).index_copy_(0, self._to_device(flat), self._to_device(blk))

    def _upload(self, inp: StepInputs, pad_tokens: int, pad_seqs: int, tree: TreeMask | None = None) -> None:
        """Write a step's inputs into the static buffers, padded to ``pad_tokens`` tokens and
        ``pad_seqs`` sequences (padding owns nothing and stores nothing). Everything but the
        table updates of layer groups 1, 2, ... travels in two host arrays (one upload each):
        int64 token inputs (the groups' cache slots too), sequence slots, the in-flight tokens'
        scatter and the block-table update's indices; int32 sequence inputs and the update's
        block ids. ``tree``: a tree graph's step, whose token-tree masks (on the host) go into the
        buffers' tree rows too."""
        buf = self.buffers
        t, b = inp.num_tokens, inp.num_seqs
        scatter = inp.prev_scatter if inp.prev_scatter is not None else ()
        p = len(scatter[0]) if scatter else 0
        flat, blk = inp.block_updates if inp.block_updates is not None else ((), ())
        u = len(flat)
        tr = buf.tree_row  # token rows: ids, positions, slots of each layer group [, adapters] [, tree bits, depths]
        rows, seq_rows = (tr, 2) if tree is None else (tr + 2, 3)
        o = rows * pad_tokens + b  # the int64 array: token inputs, slots, scatter (index, row), table indices
        i64 = np.empty(o + 2 * p + u, dtype=np.int64)
        tokens = i64[: rows * pad_tokens].reshape(rows, pad_tokens)
        tokens[:, t:] = 0
        tokens[2:tr, t:] = -1
        tokens[0, :t] = inp.input_ids
        tokens[1, :t] = inp.positions
        tokens[2, :t] = inp.slot_mapping
        for g, slots in enumerate(inp.group_slot_mapping):
            tokens[3 + g, :t] = slots
        if buf.lora_ids is not None:  # each token's LoRA adapter
            tokens[buf.slot_rows_end, :t] = inp.token_lora if inp.token_lora is not None else -1
            self.lora.batch.set_step(inp.token_lora)
        i64[rows * pad_tokens : o] = inp.slots
        if p:
            i64[o : o + p], i64[o + p : o + 2 * p] = scatter
        i64[o + 2 * p :] = flat
        s = seq_rows * (pad_seqs + 1)  # the int32 array: query starts, context lengths (and one 0), table ids
        i32 = np.empty(s + u, dtype=np.int32)
        seqs = i32[:s].reshape(seq_rows, pad_seqs + 1)
        seqs[0, : b + 1] = inp.query_start_loc
        seqs[0, b + 1 :] = t
        seqs[1:, b:] = 0
        seqs[1, :b] = inp.seq_lens
        if tree is not None:
            tokens[tr, :t], tokens[tr + 1, :t] = tree.bits.numpy(), tree.depths.numpy()
            seqs[2, :b] = tree.tree_lens.numpy()
        i32[s:] = blk
        d64, d32 = self._to_device(i64), self._to_device(i32)
        buf.token_inputs[:rows, :pad_tokens].copy_(d64[: rows * pad_tokens].view(rows, pad_tokens))
        buf.seq_inputs[:seq_rows, : pad_seqs + 1].copy_(d32[:s].view(seq_rows, pad_seqs + 1))
        if u:
            self.block_table.view(-1).index_copy_(0, d64[o + 2 * p :], d32[s:])
        self.apply_block_updates((None, inp.group_block_updates))
        seq_slots = d64[rows * pad_tokens : o]
        torch.index_select(self.block_table, 0, seq_slots, out=buf.block_tables[:b])
        for table, out in zip(self.group_block_tables, buf.group_block_tables):
            torch.index_select(table, 0, seq_slots, out=out[:b])
        if p:  # tokens the step in flight sampled, straight from the device
            buf.input_ids.index_copy_(0, d64[o : o + p], self._prev_tokens.index_select(0, d64[o + p : o + 2 * p]))

    def _forward(self, inp: StepInputs, tree=None, verify_seqs: frozenset[int] = frozenset(),
                 greedy: bool = False) -> tuple[torch.Tensor, tuple[str, int] | None]:
        """Hidden states [T, hidden] of the step's new tokens, and the graph that ran (None:
        eager). ``tree``: the token-tree masks of a verification step
        (``flashserve.kernels.tree_attention``), on the host: a tree graph's buffers get them, an
        eager step moves them to the device once; ``verify_seqs``: the sequences verifying drafts
        (``AttentionMetadata.verify_seqs``); ``greedy``: a decode step whose rows are all plain
        greedy, which a greedy graph samples too (``CudaGraphs.sampled``)."""
        t, b = inp.num_tokens, inp.num_seqs
        eager = ((tree is not None and not self.buffers.trees) or (self.early_exit is not None and inp.is_decode)
                 or inp.seq_attention is not None)  # data-dependent passes; per-request attention: launches per option
        key = self.graphs.pick(t, b, inp.is_decode, tree is not None, greedy) \
            if self.graphs is not None and not eager else None
        if key is not None:
            pt, pb = self.graphs.padded_shape(key)
            self._upload(inp, pt, pb, tree)
            c0 = time.perf_counter()
            hidden = self.graphs.replay(key, t)
            self._compute_s += time.perf_counter() - c0
            return hidden, key
        self._upload(inp, t, b)
        query_lens = np.diff(inp.query_start_loc).tolist()
        seq_lens = inp.seq_lens.tolist()
        meta = self.buffers.metadata(t, b, max(query_lens), max(seq_lens), self.block_size, query_lens, seq_lens,
                                     inp.is_decode)
        if tree is not None:
            tree = tree.to(self.device)  # once: every layer's attention reads it
        for m in (meta, *meta.groups):  # every group of layers verifies the same drafts
            m.seq_attention, m.tree, m.verify_seqs = inp.seq_attention, tree, verify_seqs
        model = self.early_exit if self.early_exit is not None and inp.is_decode else self.model
        c0 = time.perf_counter()
        with forward_context(meta):
            hidden = model(self.buffers.input_ids[:t], self.buffers.positions[:t], self.kv_caches)
        del meta, m  # part of the forward: what the attention backend memoised in it is freed here
        self._compute_s += time.perf_counter() - c0
        return hidden, None

    # ----------------------------------------------------------------- steps
    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepHandle:
        """Apply the plan and launch its step; the handle's ``result()`` waits for the tokens."""
        self._sample_deferred()  # before the plan changes the batch the deferred step was built from
        t0 = time.perf_counter()
        self._compute_s = 0.0
        self._apply_plan_state(plan)
        if not plan.num_seqs:
            return StepHandle(plan.step_id, [], None)
        entries, decodes, spec = plan.requests, plan.decodes, None
        if decodes is not None and decodes.num_steps > 1:
            return self._execute_steps(plan, decodes, t0)
        # A step without draft slots runs as in a plain engine (unless the proposer sees every step).
        speculative = self.speculator is not None and self.speculator.takes_part(plan.entries)
        # some plain decode steps are timed all the same (the off-switch's cost fit)
        timed = (not speculative and self.speculator is not None and plan.num_tokens == plan.num_seqs
                 and self.speculator.times_plain())
        if speculative:  # drafts into the token table, entries with the real draft counts
            c0 = time.perf_counter()
            entries, spec = self.speculator.propose(plan.entries)
            decodes = None
            self._compute_s += time.perf_counter() - c0
        elif timed:
            self.speculator.start_timing()
        inp = self.batch.build(entries, self._prev_rows, spec.num_drafts if spec is not None else None, decodes)
        if spec is not None:
            spec.adjust_inputs(inp)
        timing = self._start_timing(StepTiming(inp.num_tokens, inp.is_decode, False, 0.0))
        # the sampling rows' states (every row's when each samples: a decode step) and ids, by C-level maps
        rows = inp.sample_rows
        states = inp.states if len(rows) == len(inp.states) else list(map(inp.states.__getitem__, rows))
        handle = StepHandle(plan.step_id, list(map(_request_id, states)), None, states, speculative=speculative,
                            timed=timed, worker=self, slots=inp.sample_slots,
                            generations=self.batch.generation[inp.sample_slots])
        # a plain decode step whose rows are all plain greedy: a greedy graph takes the argmax too
        # (no speculator sees the step; the last stage samples only where there is one stage)
        greedy = (spec is None and not timed and inp.is_decode and self.stage_results is None
                  and self.batch.all_plain(inp.sample_slots))
        hidden, key = self._forward(inp, *((spec.tree_meta, frozenset(spec.trees)) if spec is not None else ()),
                                    greedy=greedy)
        timing.graph = key is not None
        handle.comms = self.parallel.take_sends()
        if inp.sample_rows:
            if self.stage_results is not None and not self.stage_results.samples:
                handle.packet = self.stage_results.expect(states)  # the last stage samples
            elif self.batch.grammar_waits(inp.sample_slots):
                # A grammar mask needs the token the step in flight samples. Sampling now would make
                # the device wait for the host's whole turn (outputs, scheduling, inputs) after
                # it; deferred to the next execute(), the host does that turn while this forward runs.
                self._deferred = _DeferredStep(handle, hidden, inp, spec, self._last_handle)
                handle.timed = False  # sampled during the next step: its span is not this step's cost
            else:
                self._sample(handle, hidden, inp, spec, self.graphs.sampled(key, inp.num_seqs) if key else None)
        return self._launched(handle, timing, t0)

    def _start_timing(self, timing: StepTiming) -> StepTiming:
        """A step's timing record, with device events around it when timings are kept on CUDA."""
        if self.timings is not None and self._pin:
            timing.start, timing.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            timing.start.record()
        return timing

    def _launched(self, handle: StepHandle, timing: StepTiming, t0: float) -> StepHandle:
        """Close a launched step's timing (host time since ``t0``) and make it the last step."""
        if timing.end is not None:
            timing.end.record()
        timing.host_s = time.perf_counter() - t0
        timing.compute_s = self._compute_s
        if self.timings is not None:
            self.timings.append(timing)
        self._last_handle = handle
        return handle

    def _execute_steps(self, plan: SchedulerOutput, decodes: DecodeBatch, t0: float) -> StepHandle:
        """Launch a multi-step decode batch: ``decodes.num_steps`` forwards and samples in a row
        (no row has a grammar), each step's input tokens the ones the step before sampled, on the
        device (``InputBatch.later_steps``); its handle answers with every step's tokens (and
        logprobs). Penalty counts are kept on the device as each step samples, and a seeded row
        draws by its output position, so its tokens are those one-step plans give."""
        batch = self.batch
        inp = batch.build((), self._prev_rows, None, decodes)
        # rows that are all plain greedy take the argmax alone; the others sample from their rows
        rows = None if batch.all_plain(inp.slots) else self._sampling_rows(inp.states)
        lens = decodes.lens
        batch.num_tokens[inp.slots] += lens - 1  # build() counted one token per row
        timing = self._start_timing(StepTiming(decodes.num_tokens, True, False, 0.0, model_steps=decodes.num_steps))
        handle = StepHandle(plan.step_id, list(map(_request_id, inp.states)), None, inp.states, worker=self,
                            slots=inp.sample_slots, generations=batch.generation[inp.sample_slots], lens=lens)
        b, steps = inp.num_seqs, decodes.num_steps
        later = batch.later_steps(inp, lens, steps)
        outs, key, staged = [], None, None
        for j in range(steps):
            if j == 0:
                hidden, key = self._forward(inp, greedy=rows is None)
                timing.graph = key is not None
                if key is not None:  # the later steps replay the same graph: their inputs travel now, at once
                    staged = (self._to_device(np.concatenate((later[0][:, None], later[1]), axis=1)),
                              self._to_device(later[2]))
            elif key is not None:
                hidden = self._replay_later(key, staged, j - 1, b)
            else:
                hidden, _ = self._forward(batch.step_inputs(inp, *(a[j - 1] for a in later)))
            c0 = time.perf_counter()
            sampled = self.graphs.sampled(key, b) if key is not None else None
            if sampled is not None:  # kept apart from the graph's buffer, which the next replay rewrites
                out = self.sampler.greedy_sampled(sampled.clone())
            else:
                logits = self.model.compute_logits(hidden[:b])
                out = self.sampler.greedy(logits) if rows is None else self.sampler(logits, later_rows(rows, inp.states, j))
            self._prev_tokens = out.token_ids
            self._compute_s += time.perf_counter() - c0
            outs.append(out)
        # [S, steps] ids (and logprobs), [S, steps, n] top-n, as speculative verification gives them
        handle.out = SamplerOutput(*(None if getattr(outs[0], f) is None else torch.stack([getattr(o, f) for o in outs], 1)
                                     for f in ("token_ids", "logprobs", "top_ids", "top_logprobs")))
        self._queue_results(handle)
        return self._launched(handle, timing, t0)

    def _replay_later(self, key: tuple[str, int], staged: tuple[torch.Tensor, torch.Tensor], i: int,
                      num_seqs: int) -> torch.Tensor:
        """Replay a multi-step batch's decode graph for its later step ``i`` (of ``InputBatch.later_steps``,
        staged on the device): only the positions, cache slots, context lengths and input tokens
        (the step before's, on the device) change in the buffers step 0 filled."""
        buf = self.buffers
        rows, seq_lens = staged
        buf.token_inputs[1 : buf.slot_rows_end, :num_seqs].copy_(rows[i])
        buf.seq_lens[:num_seqs].copy_(seq_lens[i])
        buf.input_ids[:num_seqs].copy_(self._prev_tokens)
        c0 = time.perf_counter()
        hidden = self.graphs.replay(key, num_seqs)
        self._compute_s += time.perf_counter() - c0
        return hidden

    def _sample(self, handle: StepHandle, hidden: torch.Tensor, inp: StepInputs, spec: Any,
                sampled: torch.Tensor | None = None) -> None:
        """Launch the sampling (or draft verification) of a step whose forward is launched;
        ``sampled``: the ids a greedy graph took already."""
        states = handle.states
        # rows that are all plain greedy need no SamplingRow (Sampler.greedy, Speculator._verify_greedy)
        plain = self.batch.all_plain(handle.slots)
        rows = None if plain else self._sampling_rows(states)
        c0 = time.perf_counter()
        if sampled is not None:
            handle.out = self.sampler.greedy_sampled(sampled)
            self._prev_tokens = sampled
        elif spec is None:
            # pipeline micro-batches: the logits stay on the last stage, only its tokens travel
            head = self.model.compute_logits if self.stage_results is None else self.model.stage_logits
            last = inp.logits_indices  # ascending: the rows 0..S-1 when it ends at S-1 (a decode step)
            logits = head(hidden[: len(last)] if last[-1] == len(last) - 1 else hidden[self._to_device(last)])
            handle.out = self.sampler.greedy(logits) if plain else self.sampler(logits, rows)
            self._prev_tokens = handle.out.token_ids
        else:  # verify every sampling row's drafts (a row without drafts samples as above)
            handle.out = self.speculator.verify(hidden, inp, rows, spec)
            self._prev_tokens = spec.last
        if handle.speculative or handle.timed:
            self.speculator.after_sampling(hidden, inp, states, handle, spec)
        self._compute_s += time.perf_counter() - c0
        self._queue_results(handle)

    def _queue_results(self, handle: StepHandle) -> None:
        """After a step's sampling is launched: note which row of ``_prev_tokens`` holds each
        slot's newest token (the next step's inputs read it on the device), and queue the copies
        of the sampled tokens to the host (``result()`` waits for them)."""
        prev = self._prev_rows  # rewritten in place (build() has read it): a new array only when the batch grew
        if len(prev) != self.batch.num_slots:
            prev = self._prev_rows = np.empty(self.batch.num_slots, dtype=np.int64)
        prev.fill(-1)
        prev[handle.slots] = np.arange(len(handle.slots))
        handle.host.update({name: self._to_host(getattr(handle.out, name))
                            for name in ("token_ids", "logprobs", "top_ids", "top_logprobs", "num_tokens")
                            if getattr(handle.out, name) is not None})
        if self.stage_results is not None:
            handle.comms += self.stage_results.publish(handle.out)
        if self._pin:
            handle.event = torch.cuda.Event()
            handle.event.record()

    def _sampling_rows(self, states: list) -> list[SamplingRow]:
        """One SamplingRow per state, made from C (``tuple.__new__`` over zipped columns); the
        columns are array work over the batch's per-slot counts, with Python only for the rare
        rows below their min_tokens (banned ids) or with a grammar (their tokens so far)."""
        batch = self.batch
        slots = np.fromiter(map(_slot, states), np.int64, len(states))
        num_output = batch.num_tokens[slots] - batch.num_prompt[slots] - 1  # generated before this sample
        banned = [()] * len(states)
        for i in np.flatnonzero(num_output < batch.min_tokens[slots]).tolist():
            banned[i] = states[i].banned
        outputs = [()] * len(states)
        for i in np.flatnonzero(batch.grammar[slots]).tolist():
            st = states[i]
            outputs[i] = batch.tokens[st.slot, st.num_prompt_tokens : st.num_known]
        columns = zip(map(_params, states), num_output.tolist(), map(_penalty_slot, states), banned,
                      map(_request_id, states), outputs)
        return list(map(tuple.__new__, repeat(SamplingRow), columns))

    def _sample_deferred(self) -> None:
        """Sample the deferred grammar step, once the previous step's tokens are on the host (the
        engine has read them by now; the device is still busy with the deferred step's forward)."""
        if self._deferred is None:
            return
        handle, hidden, inp, spec, previous = self._deferred
        self._deferred = None
        previous.result()
        self._sample(handle, hidden, inp, spec)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if not self._pin:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def _finish(self, handle: StepHandle) -> WorkerOutput:
        """Wait for a step's tokens, record them in the request states, return them."""
        if self._deferred is not None and self._deferred.handle is handle:
            self._sample_deferred()
        if handle.packet is not None:  # a pipeline stage before the last: the tokens come from it
            handle.host, handle.packet = self.stage_results.collect(handle.packet), None
        for work in handle.comms:  # complete by now: the last stage received this step's activations
            work.wait()
        handle.comms = []
        if not handle.host:
            return WorkerOutput(handle.step_id, {})
        if handle.event is not None:
            t0 = time.perf_counter()
            handle.event.synchronize()
            handle.wait_s = time.perf_counter() - t0
        tokens = handle.host["token_ids"].tolist() if handle.lens is None else None
        logprobs = handle.host.get("logprobs")
        lp = logprobs.tolist() if logprobs is not None else None
        top_ids = handle.host["top_ids"].tolist() if lp is not None else None
        top_vals = handle.host["top_logprobs"].tolist() if lp is not None else None
        counts = handle.host["num_tokens"].tolist() if "num_tokens" in handle.host else None
        plain = counts is None and lp is None and not handle.speculative
        if plain:  # (a multi-step batch has no drafts)
            tokens = self._record_plain(handle, tokens)
            sampled = {}
        elif handle.lens is not None:  # a multi-step batch with logprobs: row j's first lens[j] tokens
            rows, counts = handle.host["token_ids"].tolist(), handle.lens.tolist()
            sampled = self._record(handle, rows, lp, top_ids, top_vals, counts)
            tokens = [t for row, n in zip(rows, counts) for t in row[:n]]
        else:
            sampled = self._record(handle, tokens, lp, top_ids, top_vals, counts)
        if self._deferred is not None and self._deferred.previous is handle:
            # The deferred grammar step can now have its masks filled: in a background thread,
            # while the engine processes these tokens and plans the next step.
            self.sampler.logits_processors.prefetch(self._sampling_rows(self._deferred.handle.states),
                                                    self.sampler.penalties.vocab_size)
        return WorkerOutput(handle.step_id, sampled, handle.cost() if handle.cost is not None else None,
                            tokens if plain or handle.lens is not None else None)

    def _record_plain(self, handle: StepHandle, tokens: list[int] | None) -> list[int]:
        """``_record`` for the common step: one token per row (``tokens``), no logprobs, no drafts,
        or a multi-step batch's [S, steps] ids, of which each row's first ``lens`` are its own. The
        token table and the rows' counts are written at once, and the answer is the token list
        itself (``WorkerOutput.tokens``; a multi-step batch's row after row): nothing is made per row."""
        ids = handle.host["token_ids"].numpy()
        # not the rows whose request left (its slot's generation moved on) while the step ran
        alive = self.batch.generation[handle.slots] == handle.generations
        rows = slice(None) if alive.all() else alive
        if handle.lens is None:
            self.batch.append_one(handle.slots[rows], ids[rows])
            return tokens
        self.batch.append_steps(handle.slots[rows], ids[rows], handle.lens[rows])
        return ids[np.arange(ids.shape[1]) < handle.lens[:, None]].tolist()

    def _record(self, handle: StepHandle, tokens: list, lp: list | None, top_ids: list | None, top_vals: list | None,
                counts: list[int] | None) -> dict[str, SampledTokens]:
        """Record a step's tokens in the request states (and the speculator's), and give each
        row's answer with its logprobs and draft count."""
        drafts = handle.num_drafts
        sampled: dict[str, SampledTokens] = {}
        for j, (rid, state) in enumerate(zip(handle.request_ids, handle.states)):
            if counts is None:  # one token per row: [S] ids, [S] logprobs, [S, n] top
                toks = (tokens[j],)
                lps = None if lp is None else ((lp[j], top_ids[j], top_vals[j]),)
            else:  # verified drafts or a multi-step batch: [S, M] ids, [S, M] logprobs, [S, M, n] top; counts[j] of them
                toks = tuple(tokens[j][: counts[j]])
                lps = None if lp is None else tuple(zip(lp[j], top_ids[j], top_vals[j]))[: counts[j]]
            if self.batch.states.get(rid) is state:  # not if it left (or its id was reused) while the step ran
                self.batch.append(state, toks, counted=handle.lens is not None)
                if handle.speculative:
                    self.speculator.on_result(state, toks, handle, j)
            k = state.params.logprobs
            entry = None
            if k is not None and lps is not None:
                entry = tuple((v, tuple(zip(ids[:k], vals[:k]))) for v, ids, vals in lps)
            sampled[rid] = SampledTokens(toks, entry, drafts.get(rid, 0) if drafts else 0)
        return sampled

    def _lora_slots(self):
        if self.lora is None:
            raise ValueError("this engine serves no LoRA adapters; start it with lora_modules or max_loras")
        return self.lora

    def check_lora(self, adapter) -> None:
        """ValueError, naming the problem, unless this Worker's adapter slots take ``adapter``
        (``flashserve.lora.layers.AdapterSlots.check``)."""
        self._lora_slots().check(adapter)

    @torch.inference_mode()
    def set_lora(self, slot: int, adapter) -> None:
        """Put ``adapter`` (checked) in LoRA slot ``slot``, or clear the slot (None); new requests
        name adapters by the slots' current names. Writes the slot in place, stream-ordered after
        the steps already launched."""
        self._lora_slots().write(slot, adapter)
        self._index_lora()

    def _index_lora(self) -> None:
        """The slot of each adapter by name, as new requests look it up (``InputBatch.lora_index``)."""
        self.batch.lora_index = {name: i for i, name in enumerate(self.lora.names) if name is not None}

    @torch.inference_mode()
    def score_chunk(self, token_ids: list[int], start_pos: int, block_ids: list[int] | list[list[int]]) -> torch.Tensor:
        """Log-probabilities [n, V] (fp32, on the device) of the token after each of ``token_ids``,
        which sit at positions ``start_pos ...`` of a sequence whose K/V before ``start_pos`` is in
        ``block_ids`` (one table per group of layers when the model has several); their own K/V is
        written to the cache (so a later chunk reads it back). Eager, outside the persistent batch;
        the Worker must be idle."""
        return self.model.compute_logits(self.hidden_chunk(token_ids, start_pos, block_ids)).log_softmax(dim=-1)

    @torch.inference_mode()
    def hidden_chunk(self, token_ids: list[int], start_pos: int, block_ids: list[int] | list[list[int]]) -> torch.Tensor:
        """Final hidden states [n, hidden] of ``token_ids`` (as ``score_chunk``, before the LM head)."""
        from flashserve.layers.attention_metadata import AttentionMetadata

        bs = self.block_size
        n = len(token_ids)
        positions = np.arange(start_pos, start_pos + n, dtype=np.int64)
        tables = block_ids if block_ids and isinstance(block_ids[0], list) else [block_ids]

        def meta(block_table: list[int], groups=()) -> AttentionMetadata:
            table = np.maximum(np.asarray(block_table, dtype=np.int64), 0)
            slots = table[positions // bs] * bs + positions % bs
            return AttentionMetadata(
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
                seq_lens=torch.tensor([start_pos + n], dtype=torch.int32, device=self.device),
                block_tables=torch.as_tensor(table, dtype=torch.int32, device=self.device)[None],
                slot_mapping=self._to_device(slots), max_query_len=n,
                max_seq_len=start_pos + n, query_lens_cpu=[n], seq_lens_cpu=[start_pos + n], block_size=bs,
                is_decode=n == 1, groups=groups)

        meta = meta(tables[0], tuple(meta(t) for t in tables[1:]))
        model = self.early_exit if self.early_exit is not None and n == 1 else self.model
        with forward_context(meta):
            hidden = model(self._to_device(np.asarray(token_ids, dtype=np.int64)), self._to_device(positions),
                           self.kv_caches)
        for work in self.parallel.take_sends():  # a pipeline stage's hand-off to the next
            work.wait()
        return hidden
