"""Decode steps of a decoder layer on the CPU in few calls, same bits.

At batch-1 decode on the CPU a step of SmolLM2-135M (GGUF kept packed) spent about as long on
~90 small ops and their Python frames per layer (module calls, norms, rope, casts around each
product, the attention backend's per-sequence bookkeeping, K/V gathers) as on the layer's four
products. ``CpuDecodeLayer`` is a forward for such a layer that computes a decode step with the
same arithmetic:

* where the four products are flashserve's native GGUF kernel (``CpuGGUFWeight``; a product may
  be several matrices, e.g. q and k of one type and v of another), the whole step is one native
  call (``cpu_native.DecodeLayer``): norms, products, rope and the K/V writes, each row's
  attention over its sequence's cache rows read in place (consecutive blocks or not), the
  residual adds and the gate, each the very function the general forward calls on fp32 CPU
  tensors (``cpu_native.rms_norm``, ``attention``, ``silu_mul`` or ``gelu_tanh_mul``, the
  products). The layer is described to it as data: its norms by role (before and after each
  block, the per-head q and k norms; ``blocks.BlockNorms``), the gate's activation and the
  attention window, so Qwen3's and Gemma 3's layers (q/k norms; Gemma's norms after the blocks,
  GELU and sliding-window layers, each group of layers with its own rope base and KV-cache group)
  take it as Llama's do. Products with LoRA adapters (``flashserve.lora``, fp32) take it too: each
  row adds its own adapter's delta, with the values of ``cpu_native.lora_add``, which the adapted
  layers' general forward adds;
* otherwise (torch's int4 op; plain Llama-family layers without adapters only) about 25 torch
  ops: the products called directly on bf16 activations (the op's only fast input), widened only
  where fp32 math follows; q and k rotated without concatenating them (adjacent in the qkv
  output), or rotated and stored in one native call for an fp32 qkv product
  (``cpu_native.rope_store``); a sequence whose KV blocks are consecutive (checked once per step)
  attended over a view of the cache instead of gathered copies; each row's attention the call
  ``grouped_attention`` makes for one query.

Every value equals the general forward's bit for bit (tests/test_cpu_decode.py), so greedy
tokens, the exact speculative verification and the agreement with the fp32 path are untouched.
A verification step is decode rows too: each drafted token (of a chain, or a token tree's node)
attends as its decode step would, over the keys that step would see (what
``flashserve.layers.attention_rows`` does in the general forward); chains take the native call,
trees the torch form (or, for layers it does not cover, the general forward). Other steps
(prompts, chunks, per-request attention options), activations other than fp32 and 8-bit or empty
KV caches take the layer's general forward. ``use_cpu_decode_layers`` installs it on every layer
that qualifies (``CpuDecodeLayer.supports``); the Worker calls it for the torch backend.

Where every layer of a model takes the one native call, the per-layer Python around those calls
(module calls, each layer's checks and metadata, argument packing: ~1 ms of a SmolLM2 token) goes
too: ``CpuDecodeStack`` stands in for the model's layer loop (``blocks.LayerStack.run_layers``) and
computes a step that each layer would compute in its native call in one native call for the
whole stack (``cpu_native.DecodeStack``: each layer's description, its step and its caches as
data; the residual stream carried from layer to layer as the calls one by one carry it, so the
same bits). Any other step, or a stack whose layers changed since, runs the layers one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter, is_

import numpy as np
import torch
from torch import nn

from flashserve.kernels import cpu_native
from flashserve.layers.activation import SiluAndMul, silu_and_mul
from flashserve.layers.attention import TorchAttentionBackend, context_slots, grouped_attention
from flashserve.layers.attention_metadata import AttentionMetadata, get_forward_context
from flashserve.layers.attention_rows import ancestors, node_key_rows
from flashserve.layers.linear import Linear
from flashserve.layers.norm import RMSNorm, rms_norm
from flashserve.layers.rotary import RopeInputs
from flashserve.lora.layers import LoRAMethod
from flashserve.models import blocks
from flashserve.models.blocks import GatedGeluTanhMLP, GatedSiluMLP, GeluTanhAndMul
from flashserve.models.llama import KVCache
from flashserve.quant.base import PackedLinearMethod
from flashserve.quant.packed import CpuGGUFWeight, Int4Weight, PackedWeight

_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
_BF16 = torch.bfloat16
_MEMO_KEY = "cpu_decode_context"


def _lora(linear: Linear) -> LoRAMethod | None:
    """The layer's LoRA adapters (``flashserve.lora``), where it has some."""
    return linear.quant_method if isinstance(linear.quant_method, LoRAMethod) else None


def _cpu_parts(linear: Linear) -> list[PackedWeight] | None:
    """The weights of a linear layer whose parts (outputs concatenated) are each one plain CPU
    product (its forward the one chosen at build: ``Int4Weight._cpu_forward`` or
    ``CpuGGUFWeight``'s), else None. Under LoRA adapters, those of the base product, where the
    adapters are ones the native call adds (``LoRAMethod.native``)."""
    lora = _lora(linear)
    method = linear.quant_method if lora is None else lora.base if lora.native is not None else None
    if linear.bias is not None or linear.parallel is not None or not isinstance(method, PackedLinearMethod):
        return None
    parts = list(linear.packed_parts)
    for w in parts:
        if "forward" not in w.__dict__:  # no CPU build-time forward: permuted, padded or CUDA
            return None
        if type(w) is not CpuGGUFWeight and not (type(w) is Int4Weight and w.planes == 1):
            return None  # subclasses feed x differently (Q6_K)
    return parts


def _product(w: PackedWeight) -> Callable[[torch.Tensor], torch.Tensor]:
    """fp32 ``x [T, K]`` -> ``x @ W^T`` as the weight's forward computes it, without its casts."""
    if type(w) is CpuGGUFWeight:
        return cpu_native.bind(w.planes, w.qtype)  # fp32 out
    packed, group, scale_zeros = w.packed, w.group, w.scale_zeros
    return lambda x: _INT4_MM(x.to(_BF16), packed, group, scale_zeros)  # bf16 out


def decode_contexts(meta: AttentionMetadata, block_size: int) -> list[int | torch.Tensor] | None:
    """Where each sequence's context lies in the flattened cache: the first slot of its tokens
    when its blocks are consecutive, else the flat slots [S] to gather; None when a new token has
    no slot (it must not be stored: the general path). Derived once per step (``meta.memo``) and
    KV-cache group; the block tables read as numpy (a torch op costs ~10 us in a step's cache-cold
    Python, and Gemma 3 has six groups)."""
    if _MEMO_KEY not in meta.memo:
        contexts: list[int | torch.Tensor] | None = None
        if TorchAttentionBackend._valid_slots(meta) is None:
            contexts = []
            tables = meta.block_tables.numpy()
            for i, seq_len in enumerate(meta.seq_lens_cpu):
                blocks = tables[i, : -(-seq_len // block_size)]
                if (blocks == blocks[0] + np.arange(len(blocks))).all():
                    contexts.append(int(blocks[0]) * block_size)
                else:
                    contexts.append(context_slots(blocks, seq_len, block_size, meta.block_tables.device))
        meta.memo[_MEMO_KEY] = contexts
    return meta.memo[_MEMO_KEY]


def native_step(meta: AttentionMetadata, contexts: list[int | torch.Tensor], rope: RopeInputs) -> tuple:
    """What ``cpu_native.DecodeLayer`` reads in every layer of this step with these rope tables
    (``meta.memo``; one entry per rope base, which holds ``rope``, so its id stays its own)."""
    key = ("cpu_native_step", id(rope))
    if key not in meta.memo:
        meta.memo[key] = rope, cpu_native.DecodeLayer.step(contexts, meta.seq_lens_cpu, meta.query_lens_cpu,
                                                           meta.slot_mapping, rope.cos_full, rope.sin_signed)
    return meta.memo[key][1]


def _rows_as_decodes(meta: AttentionMetadata) -> bool:
    """Whether every new token of the step attends as a one-token decode step would: a decode
    step, or one whose longer queries are all verified drafts (``verify_seqs``: each row attends
    as ``flashserve.layers.attention_rows`` does). Derived once per step (``meta.memo``)."""
    if meta.is_decode:
        return True
    key = "cpu_decode_rows"
    if key not in meta.memo:
        meta.memo[key] = all(n == 1 or i in meta.verify_seqs for i, n in enumerate(meta.query_lens_cpu))
    return meta.memo[key]


def _decode_step_contexts(meta: AttentionMetadata, rope: RopeInputs,
                          block_size: int) -> list[int | torch.Tensor] | None:
    """Each sequence's context rows (``decode_contexts``) where a step's rows of this KV-cache group
    are decode rows the CPU decode layer computes with these rope tables (no per-request attention
    options, rope's full tables), else None: the conditions a layer's call and the stack's share."""
    if not _rows_as_decodes(meta) or meta.seq_attention is not None or rope.cos_full is None:
        return None
    return decode_contexts(meta, block_size)


# The MLPs whose forward is ``down(act_fn(gate_up(x)))``, and their gates as cpu_native names them.
_GATED_MLPS = (GatedSiluMLP, GatedGeluTanhMLP)
_ACTIVATIONS = {SiluAndMul: "silu", GeluTanhAndMul: "gelu_tanh"}


def _norms(layer: nn.Module) -> dict[str, RMSNorm]:
    """The layer's RMSNorms by ``cpu_native.NORMS`` role: where its ``block_norms`` put them, and
    the per-head q and k norms of its attention where it has them."""
    norms = {role: getattr(layer, name) for role, name in layer.block_norms._asdict().items() if name is not None}
    if layer.self_attn.q_norm is not None:
        norms["q"], norms["k"] = layer.self_attn.q_norm, layer.self_attn.k_norm
    return norms


def _linears(layer: nn.Module) -> tuple[Linear, Linear, Linear, Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


class CpuDecodeLayer:
    """The forward of one decoder layer (installed as its ``forward``): decode and verification
    steps in few ops, every other step through the layer's general forward.

    The layer is read as data: its norms by role (the layer's ``block_norms``, its attention's q/k
    norms), its MLP's activation, its attention window. A plain Llama-family layer (full attention,
    no q/k norms, no norms after the blocks, SwiGLU, one matrix a product) takes the one native call
    where its products are native, else the torch form; any other (Qwen3's q/k norms, Gemma 3's
    post-norms, GELU and sliding windows, a qkv product of several matrices) takes the native call
    only, and its steps that the call does not take (token trees) the general forward."""

    def __init__(self, layer: nn.Module) -> None:
        attn = layer.self_attn
        self.general = layer.forward
        self.attn = attn.attn  # its kv_group is set by the Worker after loading, read per step
        parts = [_cpu_parts(lin) for lin in _linears(layer)]
        # A part whose forward is replaced later (tests swap in ``reference``) sends steps to the
        # general forward, which calls it.
        self.part_forwards = [(w, w.forward) for ws in parts for w in ws]
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.attn.scale
        norms = _norms(layer)
        loras = [_lora(lin) for lin in _linears(layer)]
        # each row's adapter, where products have LoRA adapters (one LoRABatch serves every layer)
        self.lora_batch = next((lora.batch for lora in loras if lora is not None), None)
        # The whole step in one native call where every product is native and attention is too.
        self.native = None
        if self._native_parts(parts, self.head_dim) and all(n.weight.dtype == torch.float32 for n in norms.values()):
            spec = attn.attn.spec
            self.native = cpu_native.DecodeLayer(
                [[(w.planes, w.qtype) for w in ws] for ws in parts], {r: (n.weight, n.eps) for r, n in norms.items()},
                self.heads, self.kv_heads, self.head_dim, self.scale, _ACTIVATIONS[type(layer.mlp.act_fn)],
                spec.span if spec.kind == "sliding" else 0, [None if lora is None else lora.native for lora in loras])
        self.torch_form = self._plain(layer) and all(len(ws) == 1 for ws in parts) and self.lora_batch is None
        if self.torch_form:  # the products called directly, the rest in torch ops (``_decode``)
            self.qkv, self.o, self.gate_up, self.down = (_product(ws[0]) for ws in parts)
            self.norm1, self.norm2 = ((norms[r].weight, norms[r].eps) for r in ("attn_in", "mlp_in"))
            self.qk_size = attn.q_size + attn.kv_size  # q then k in the qkv output, v after
            native = type(parts[0][0]) is CpuGGUFWeight  # its qkv product is fp32, as the native rope takes it
            self.rope_store = self._native_rope_store if native else self._rope_store

    @staticmethod
    def _plain(layer: nn.Module) -> bool:
        """A Llama-family layer as ``_decode`` computes it: full attention, no q/k norms, norms only
        before the blocks, SwiGLU."""
        names = layer.block_norms
        return (layer.self_attn.attn.spec.kind == "full" and layer.self_attn.q_norm is None
                and names.attn_out is None and names.mlp_out is None and type(layer.mlp.act_fn) is SiluAndMul)

    @staticmethod
    def _native_parts(parts: list[list[PackedWeight] | None], head_dim: int) -> bool:
        """Whether ``cpu_native.DecodeLayer`` takes these products and heads."""
        return (all(ws is not None and len(ws) <= cpu_native.MAX_PARTS and all(type(w) is CpuGGUFWeight for w in ws)
                    for ws in parts)
                and head_dim % 8 == 0 and head_dim <= cpu_native.MAX_HEAD_DIM)

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        """A decoder layer that describes its norms (``block_norms``) with a gated MLP of a known
        activation, full or sliding-window attention (no dilation, no sinks) on the torch backend,
        whole-head rope, PyTorch elementwise ops and plain CPU products: native ones for the one
        call, or a plain Llama-family layer with one matrix a product for the torch form."""
        if getattr(layer, "block_norms", None) is None or type(getattr(layer, "mlp", None)) not in _GATED_MLPS \
                or type(layer.mlp.act_fn) not in _ACTIVATIONS:
            return False
        attn = layer.self_attn
        spec = attn.attn.spec
        fused = (attn.rotary_emb, layer.mlp.act_fn, *_norms(layer).values())
        if (spec.kind not in ("full", "sliding") or spec.dilation != 1 or spec.num_sinks
                or not isinstance(attn.attn.backend, TorchAttentionBackend)
                or attn.rotary_emb.rotary_dim != attn.head_dim or any(getattr(m, "triton", False) for m in fused)):
            return False
        parts = [_cpu_parts(lin) for lin in _linears(layer)]
        if any(ws is None for ws in parts):
            return False
        plain = (CpuDecodeLayer._plain(layer) and all(len(ws) == 1 for ws in parts)
                 and not any(_lora(lin) for lin in _linears(layer)))
        return plain or CpuDecodeLayer._native_parts(parts, attn.head_dim)

    def __call__(
        self,
        rope: RopeInputs,
        hidden: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        meta = get_forward_context().for_group(self.attn.kv_group)
        if (kv_cache is None or hidden.dtype != torch.float32 or kv_cache[0].dtype != torch.float32
                or kv_cache[0].numel() == 0 or any(w.forward is not f for w, f in self.part_forwards)):
            return self.general(rope, hidden, residual, kv_cache)
        contexts = _decode_step_contexts(meta, rope, kv_cache[0].shape[1])
        if contexts is None:
            return self.general(rope, hidden, residual, kv_cache)
        if self.native is not None and meta.tree is None and hidden.is_contiguous() \
                and (residual is None or residual.is_contiguous()):
            k_flat, v_flat = (c.view(-1, self.kv_heads, self.head_dim) for c in kv_cache)
            return self.native(native_step(meta, contexts, rope), hidden, residual, k_flat, v_flat,
                               None if self.lora_batch is None else self.lora_batch.ids)
        if not self.torch_form:
            return self.general(rope, hidden, residual, kv_cache)
        return self._decode(rope, hidden, residual, kv_cache, meta, contexts)

    def _rope_store(self, qkv: torch.Tensor, rope: RopeInputs, k_flat: torch.Tensor, v_flat: torch.Tensor,
                    slots: torch.Tensor) -> torch.Tensor:
        """Rope on q and k together, ``x * [cos, cos] + swap_halves(x) * [-sin, sin]`` (``rotate_q_k``),
        k and v written to the cache rows ``slots``; returns q (and k) ``[T, H (+ Hkv), D]``."""
        T, H, Hkv, D = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        x = qkv[:, : self.qk_size].float().view(T, H + Hkv, D)
        x = x * rope.cos_full + x.unflatten(-1, (2, -1)).flip(-2).flatten(-2) * rope.sin_signed
        k_flat.index_copy_(0, slots, x[:, H:])
        v_flat.index_copy_(0, slots, qkv[:, self.qk_size :].view(T, Hkv, D).float())
        return x

    def _native_rope_store(self, qkv: torch.Tensor, rope: RopeInputs, k_flat: torch.Tensor, v_flat: torch.Tensor,
                           slots: torch.Tensor) -> torch.Tensor:
        """``_rope_store``'s values in one native call, for an fp32 qkv product; returns q ``[T, H, D]``."""
        return cpu_native.rope_store(qkv, self.heads, rope.cos_full, rope.sin_signed, k_flat, v_flat, slots)

    def _decode(self, rope: RopeInputs, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVCache,
                meta: AttentionMetadata, contexts: list[int | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        T = hidden.shape[0]  # one new token per sequence, or a verification's drafted tokens too
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        residual = hidden if residual is None else hidden + residual  # [T, hidden] fp32
        h = rms_norm(residual, *self.norm1)
        qkv = self.qkv(h)  # [T, (H + 2 Hkv) D] bf16 or fp32
        k_flat, v_flat = kv_cache[0].view(-1, Hkv, D), kv_cache[1].view(-1, Hkv, D)
        x = self.rope_store(qkv, rope, k_flat, v_flat, meta.slot_mapping)  # [T, H (+ Hkv), D], q first
        outs = []
        row = 0
        tree = meta.tree
        for i, (ctx, seq_len, n) in enumerate(zip(contexts, meta.seq_lens_cpu, meta.query_lens_cpu)):
            if isinstance(ctx, int):  # consecutive blocks: the cache rows themselves
                keys, values = k_flat[ctx : ctx + seq_len], v_flat[ctx : ctx + seq_len]
            else:
                keys, values = k_flat.index_select(0, ctx), v_flat.index_select(0, ctx)
            bits = tree.bits[row : row + n].tolist() if tree is not None and tree.tree_lens_cpu[i] else None
            cached = seq_len - n
            for j in range(n):  # each row over the keys its decode step sees (attention_rows.decode_rows)
                if bits is None:  # a chain: the positions up to its own
                    k_j, v_j = keys[: cached + j + 1], values[: cached + j + 1]
                else:  # a tree node: the cached context, then its ancestors (itself included)
                    idx = node_key_rows(cached, ancestors(bits[j], n), keys.device)
                    k_j, v_j = keys.index_select(0, idx), values.index_select(0, idx)
                outs.append(grouped_attention(x[row : row + 1, :H], k_j, v_j, self.scale).view(1, H * D))
                row += 1
        attn_out = outs[0] if T == 1 else torch.cat(outs)  # [T, H D] fp32
        residual = self.o(attn_out) + residual  # bf16 (int4 op) or fp32 + fp32: the exact fp32 sum
        h = rms_norm(residual, *self.norm2)
        act = silu_and_mul(self.gate_up(h).float())  # [T, 2 I] -> [T, I]
        return self.down(act).float(), residual


_FORWARD, _KV_GROUP = attrgetter("forward"), attrgetter("kv_group")
_HOOKS = attrgetter("_forward_hooks", "_forward_pre_hooks")  # a module's, as nn.Module keeps them


class CpuDecodeStack:
    """The step of a model's whole layer stack (installed as its ``run_layers``, ``blocks.LayerStack``)
    where every layer is a ``CpuDecodeLayer`` with the one native call: a step that each layer would
    compute in that call (decode rows, no token tree, no per-request attention options, fp32 caches
    and activations, no product or layer forward swapped since, no module hooks) runs all layers in
    one native call (``cpu_native.DecodeStack``), the same bits as the calls one by one; any other
    step runs the layers one by one, as before.

    The stack is described as data once: the layers' descriptions, and which step each layer reads
    (one per KV-cache group and rope base: ``native_step``, shared with the per-layer calls), derived
    again only when the layers' KV-cache groups change."""

    def __init__(self, stack: blocks.LayerStack, layers: list[CpuDecodeLayer]) -> None:
        self.general = stack.run_layers
        self.stack = stack
        self.modules = list(stack.layers)  # the stack must hold them still, their forwards ``layers``
        self.layers = layers
        self.rope_index = list(stack._rope_index)
        self.attns = [layer.attn for layer in layers]
        self.weights, self.forwards = zip(*(pair for layer in layers for pair in layer.part_forwards))
        self.native = cpu_native.DecodeStack([layer.native for layer in layers])
        self.lora_batch = next((layer.lora_batch for layer in layers if layer.lora_batch is not None), None)
        self._plans: dict[tuple[int, ...], tuple[list[tuple[int, int, int]], object]] = {}
        self._caches: tuple = (None, (), None)  # the kv_caches list seen last, its entries, their addresses

    def __call__(self, ropes: list[RopeInputs], hidden: torch.Tensor, residual: torch.Tensor | None,
                 kv_caches: list[KVCache] | None) -> tuple[torch.Tensor, torch.Tensor]:
        caches = self._cache_pointers(kv_caches) if self._unchanged(hidden, residual) else None
        steps = None if caches is None else self._steps(ropes, kv_caches)
        if steps is None:
            return self.general(ropes, hidden, residual, kv_caches)
        return self.native(steps[1], steps[0], caches, hidden, residual,
                           None if self.lora_batch is None else self.lora_batch.ids)

    def _unchanged(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the first layer's call would take these rows (fp32, contiguous) and every layer
        is still what the stack describes: the stack's layers the same, each with its forward, its
        products' forwards (tests swap in others), no forward hooks (the one call would skip them)."""
        layers = self.stack.layers
        return (hidden.dtype == torch.float32 and hidden.is_contiguous()
                and (residual is None or residual.is_contiguous())
                and len(layers) == len(self.modules) and all(map(is_, layers, self.modules))
                and all(map(is_, map(_FORWARD, self.modules), self.layers))
                and all(map(is_, map(_FORWARD, self.weights), self.forwards))
                and not any(map(any, map(_HOOKS, self.modules)))
                and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))

    def _cache_pointers(self, kv_caches: list[KVCache] | None) -> tuple | None:
        """The layers' caches as ``cpu_native.DecodeStack`` reads them, or None where a layer's call
        would not take its cache (none, empty, not fp32); derived again only for other caches."""
        if not kv_caches:
            return None
        seen, entries, pointers = self._caches
        if kv_caches is seen and len(kv_caches) == len(entries) and all(map(is_, kv_caches, entries)):
            return pointers
        pointers = None
        if len(kv_caches) == len(self.layers) and all(
                c is not None and all(x.dtype == torch.float32 and x.numel() and x.is_contiguous() for x in c)
                for c in kv_caches):
            pointers = self.native.caches([k.view(-1) for k, _ in kv_caches], [v.view(-1) for _, v in kv_caches])
        self._caches = (kv_caches, tuple(kv_caches), pointers)
        return pointers

    def _plan(self) -> tuple[list[tuple[int, int, int]], object]:
        """The steps of the stack, (KV-cache group, rope base, a layer of theirs) each, and the step
        each layer reads (``cpu_native.DecodeStack.step_of``), for the layers' current groups."""
        groups = tuple(map(_KV_GROUP, self.attns))
        if groups not in self._plans:
            keys = list(dict.fromkeys(zip(groups, self.rope_index)))
            firsts = [list(zip(groups, self.rope_index)).index(key) for key in keys]
            step_of = [keys.index(key) for key in zip(groups, self.rope_index)]
            self._plans[groups] = ([(*key, first) for key, first in zip(keys, firsts)], self.native.step_of(step_of))
        return self._plans[groups]

    def _steps(self, ropes: list[RopeInputs], kv_caches: list[KVCache]) -> tuple[object, list[tuple]] | None:
        """(which step each layer reads, the steps) for this forward pass, or None where a layer's
        native call would not take it (a token tree, or ``_decode_step_contexts`` says no)."""
        pairs, step_of = self._plan()
        context = get_forward_context()
        steps = []
        for group, rope_i, first in pairs:
            meta, rope = context.for_group(group), ropes[rope_i]
            block_size = kv_caches[first][0].shape[1]
            contexts = None if meta.tree is not None else _decode_step_contexts(meta, rope, block_size)
            if contexts is None:
                return None
            steps.append(native_step(meta, contexts, rope))
        return step_of, steps


def use_cpu_decode_layers(model: nn.Module, stack: bool = True) -> int:
    """Give every decoder layer of ``model`` that ``CpuDecodeLayer.supports`` that forward, and
    (``stack``) every layer stack (``blocks.LayerStack``) whose layers all take the one native call
    a ``CpuDecodeStack``; returns how many layers were switched. Call it once the weights are final
    (loaded and packed, LoRA adapters installed)."""
    n = 0
    for module in model.modules():
        if CpuDecodeLayer.supports(module) and not isinstance(module.__dict__.get("forward"), CpuDecodeLayer):
            module.forward = CpuDecodeLayer(module)
            n += 1
    for module in model.modules():
        if stack and isinstance(module, blocks.LayerStack) and not isinstance(module.__dict__.get("run_layers"),
                                                                              CpuDecodeStack):
            layers = [layer.__dict__.get("forward") for layer in module.layers]
            if layers and all(isinstance(f, CpuDecodeLayer) and f.native is not None for f in layers):
                module.run_layers = CpuDecodeStack(module, layers)
    return n
