"""Fused MoE kernel (grouped GEMM and decode GEMV paths) vs the per-expert torch loop."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, tol

from flashserve.config import ModelConfig
from flashserve.kernels.fused_moe import (ROUTER_MAX_TOKENS, fused_moe, fused_route, fused_router_route, moe_align,
                                          moe_loop)
from flashserve.kernels.utils import arrival_counters, is_interpreter
from flashserve.layers.moe import MoEMLP


def _case(T: int, E: int, k: int, H: int, inter: int, dtype: torch.dtype, device: torch.device,
          ids: torch.Tensor | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    w13 = (torch.randn(E, 2 * inter, H, generator=gen) / H**0.5).to(dtype).to(device)
    w2 = (torch.randn(E, H, inter, generator=gen) / inter**0.5).to(dtype).to(device)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=gen).softmax(-1)
    return x, w13, w2, weights.to(device), ids.to(device)


def test_align_sorts_pairs_by_expert_with_padding():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 1]])  # expert 2 has no tokens
    sorted_ids, block_expert = moe_align(ids, 4, 4)
    n = ids.numel()
    assert sorted_ids.numel() % 4 == 0 and block_expert.numel() == sorted_ids.numel() // 4
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * 4:(b + 1) * 4].tolist()
        valid = [r for r in rows if r < n]
        if e < 0:
            assert not valid
            continue
        assert all(flat[r] == e for r in valid)
        seen += valid
    assert sorted(seen) == list(range(n))  # every pair exactly once
    assert 2 not in block_expert.tolist()


@pytest.mark.parametrize("T", [1, 3, 5, 37])  # 1, 3: decode path; 5, 37: grouped GEMM
def test_fused_moe_matches_loop(device, dtype, T):
    E, k = 8, 2
    H, inter = (64, 48) if not ON_GPU else (512, 384)
    x, w13, w2, weights, ids = _case(T, E, k, H, inter, dtype, device, seed=T)
    out = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, moe_loop(x, w13, w2, weights, ids), **tol(dtype))


def test_fused_moe_uneven_loads_and_idle_experts(device, dtype):
    """Most pairs go to expert 5, a few to 0 and 6, the other experts get none; H and I not
    multiples of the tile sizes."""
    T, E, k, H, inter = 24, 8, 2, 40, 24
    ids = torch.tensor([[5, 0] if t % 7 else [6, 5] for t in range(T)])
    x, w13, w2, weights, ids = _case(T, E, k, H, inter, dtype, device, ids=ids, seed=1)
    out = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, moe_loop(x, w13, w2, weights, ids), **tol(dtype))
    # the same routing through the decode path (forced) gives the same result
    out_gemv = fused_moe(x, w13, w2, weights, ids, decode_max_tokens=T)
    torch.testing.assert_close(out_gemv, out, **tol(dtype))


def test_fused_moe_many_experts_top8(device, dtype):
    """Qwen3-MoE-like routing: 64 experts, 8 per token; most experts see 0 or 1 pair."""
    T, E, k, H, inter = 9, 64, 8, 32, 16
    x, w13, w2, weights, ids = _case(T, E, k, H, inter, dtype, device, seed=2)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), moe_loop(x, w13, w2, weights, ids), **tol(dtype))


@pytest.mark.parametrize("experts", ["dense", "int8", "fp8"])
@pytest.mark.parametrize("T", [2, 4, 5, 21])  # router inside the routing launch up to 4 tokens
def test_moe_layer_triton_matches_torch_path(device, T, experts):
    """The whole MoE layer (router, top-k, shared expert with its gate; dense or quantized experts)
    on the fused kernels equals its per-expert torch path; up to ``ROUTER_MAX_TOKENS`` tokens the
    router's Linear does not run (its product is inside the routing launch)."""
    config = ModelConfig(architecture="qwen2_moe", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64, num_experts=6,
                         num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False,
                         shared_expert_intermediate_size=40)
    torch.manual_seed(T)
    layer = MoEMLP(config, prefix="model.layers.0.mlp")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    if experts != "dense":
        from flashserve.quant.experts import OnlineExpertMethod

        OnlineExpertMethod(experts).finalize(layer.experts)
        assert layer.experts.tensors()[2] is not None
    layer.to(device)
    x = torch.randn(T, 32, device=device)
    ref = layer(x)
    layer.triton = True
    router_calls = []
    layer.gate.register_forward_hook(lambda *_: router_calls.append(1))
    torch.testing.assert_close(layer(x), ref, **tol(torch.float32))
    assert len(router_calls) == (T > ROUTER_MAX_TOKENS)


def test_moe_layer_router_of_another_method_keeps_its_linear(device):
    """A router whose Linear is not plain dense (here factorised to low rank: no ``weight`` left)
    runs its own product then the routing launch, at decode sizes too."""
    from flashserve.compress.layers import set_low_rank

    config = ModelConfig(architecture="qwen3_moe", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64, num_experts=6,
                         num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)
    torch.manual_seed(3)
    layer = MoEMLP(config, prefix="model.layers.0.mlp")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    set_low_rank(layer.gate, torch.randn(4, 32), torch.randn(6, 4))
    layer.to(device)
    x = torch.randn(2, 32, device=device)
    ref = layer(x)
    layer.triton = True
    router_calls = []
    layer.gate.register_forward_hook(lambda *_: router_calls.append(1))
    torch.testing.assert_close(layer(x), ref, **tol(torch.float32))
    assert router_calls == [1]


def _quantize(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    from flashserve.quant.experts import quantize_experts

    return quantize_experts(w, kind)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("T", [2, 11])  # decode path, grouped GEMM
def test_quantized_experts_match_dequantize_then_reference(device, kind, T):
    """int8 / fp8 experts (8-bit values, per-output-channel scales) through the fused kernels equal
    the torch loop on the dequantized dense weights; the scales are not all equal, so a scale
    applied to the wrong row or expert shows."""
    E, k, H, inter = 6, 2, 40, 24
    x, w13, w2, weights, ids = _case(T, E, k, H, inter, torch.float32, device, seed=10 + T)
    w13 = w13 * torch.linspace(0.5, 2.0, 2 * inter, device=device)[None, :, None]  # rows of different ranges
    q13, s13 = _quantize(w13, kind)
    q2, s2 = _quantize(w2, kind)
    assert q13.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn) and s13.shape == (E, 2 * inter)
    dense13 = q13.float() * s13[..., None]
    dense2 = q2.float() * s2[..., None]
    ref = moe_loop(x, dense13, dense2, weights, ids)
    torch.testing.assert_close(moe_loop(x, q13, q2, weights, ids, s13, s2), ref)
    torch.testing.assert_close(fused_moe(x, q13, q2, weights, ids, s13, s2), ref, rtol=1e-4, atol=1e-4)
    # and the quantization itself is close to the dense weights (one step of the 8-bit grid)
    step = (1 / 127) if kind == "int8" else (1 / 8)
    assert (dense13 - w13).abs().max() <= step * w13.abs().amax(dim=2).max()


@pytest.mark.parametrize("T", [3, 13])
def test_experts_held_elsewhere_contribute_nothing(device, T):
    """Expert parallelism: ids of -1 (experts on another rank) are skipped on both paths, and the
    result equals the full routing with those pairs' weights set to zero."""
    E, k, H, inter = 8, 3, 32, 24
    x, w13, w2, weights, ids = _case(T, E, k, H, inter, torch.float32, device, seed=20 + T)
    from flashserve.distributed.expert_parallel import local_expert_ids

    first, count = 4, 4  # rank 1 of 2
    local = local_expert_ids(ids, first, count)
    assert ((local >= 0) == (ids >= first)).all() and (local[local >= 0] == ids[local >= 0] - first).all()
    expected = moe_loop(x, w13, w2, torch.where(ids >= first, weights, 0.0), ids)
    held13, held2 = w13[first:].contiguous(), w2[first:].contiguous()
    torch.testing.assert_close(moe_loop(x, held13, held2, weights, local), expected)
    got = fused_moe(x, held13, held2, weights, local, held_elsewhere=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    sorted_ids, block_expert = moe_align(local, count, 4)
    assert set(block_expert.tolist()) <= set(range(count)) | {-1}
    held = [r for b, e in enumerate(block_expert.tolist()) if e >= 0 for r in sorted_ids[b * 4:(b + 1) * 4].tolist()]
    assert sorted(r for r in held if r < local.numel()) == torch.nonzero(local.reshape(-1) >= 0).squeeze(1).tolist()


def test_quantized_experts_need_their_scales():
    x, w13, w2, weights, ids = _case(2, 4, 2, 16, 8, torch.float32, torch.device("cpu"))
    q13, s13 = _quantize(w13, "int8")
    with pytest.raises(ValueError, match="per-output-channel scales"):
        fused_moe(x, q13, w2, weights, ids)


@pytest.mark.parametrize("scoring,renormalize,E,k", [("softmax", True, 8, 2), ("softmax", False, 60, 3),
                                                       ("sigmoid", True, 16, 8), ("softmax", True, 4, 1)])
def test_fused_route_matches_torch_routing(device, scoring, renormalize, E, k):
    from flashserve.layers.moe import route

    logits = torch.randn(7, E, generator=torch.Generator().manual_seed(E)).to(device)
    ref_w, ref_ids = route(logits, k, scoring, renormalize)
    w, ids = fused_route(logits, k, scoring, renormalize)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w)
    assert fused_route(logits[:0], k)[0].shape == (0, k)


@pytest.mark.parametrize("E,k", [(8, 2), (60, 3)])
def test_fused_route_never_names_a_missing_expert(device, E, k):
    """A row of NaN logits (a padding row whose attention had no context) routes to real experts:
    arg-max over NaN scores found no lane and returned E's power of two, an expert index past the
    weights (an illegal address in the expert kernels on the GPU). Real rows are untouched."""
    from flashserve.layers.moe import route

    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(1))
    logits[1] = float("nan")
    logits[2, 3] = float("nan")
    w, ids = fused_route(logits.to(device), k)
    assert bool(((ids >= 0) & (ids < E)).all()), ids
    assert len(set(ids[1].tolist())) == k
    ref_w, ref_ids = route(logits[[0, 3]], k)
    assert torch.equal(ids[[0, 3]].long().cpu(), ref_ids)
    torch.testing.assert_close(w[[0, 3]].cpu(), ref_w)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_fused_route_breaks_ties_by_the_lowest_expert(device, scoring):
    """Equal scores rank by expert index (the arg-max keys keep the lane below the score), and the
    weights are the scores themselves: a row of three equal best logits and a row of all-equal ones."""
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0, 2.0, 1.0], [0.5] * 6], device=device)
    w, ids = fused_route(logits, 3, scoring, renormalize=False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    torch.testing.assert_close(w, scores.gather(1, ids.long()))


def _router_case(T: int, E: int, H: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x [T, H] and a router weight [E, H] of random non-zero integers in [-64, 64] over 32 and
    over 512 (6 significant bits: exact in every dtype). Every product and partial sum is a
    multiple of 2^-14 below H / 4 in size, exact in fp32, so the logits do not depend on the order
    of the sums; with up to 18 significant bits most of them round in fp16 / bf16, alike in the
    kernel and in the reference.

    Triton's interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest even), so
    there bf16 takes x in {1/2, 1} and W in {1/4, 1/2} (either sign): logits are multiples of 1/8
    below H / 2, which bf16 holds exactly for H <= 64. fp16 (numpy's rounding), and bf16 on the
    GPU, check the rounding of the logits."""
    gen = torch.Generator().manual_seed(seed)
    coarse = dtype == torch.bfloat16 and is_interpreter()

    def grid(rows: int, largest: int, denominator: int) -> torch.Tensor:
        magnitude = torch.randint(1, largest + 1, (rows, H), generator=gen)
        sign = torch.randint(0, 2, (rows, H), generator=gen) * 2 - 1
        return (magnitude * sign / denominator).to(dtype).to(device)

    return (grid(T, 2, 2), grid(E, 2, 4)) if coarse else (grid(T, 64, 32), grid(E, 64, 512))


def _rounded_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The router Linear's output: x @ W^T summed in fp32, stored in x's dtype."""
    return (x.float() @ w.float().T).to(x.dtype)


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("T", [1, 3, ROUTER_MAX_TOKENS])
@pytest.mark.parametrize("scoring,renormalize,E,k", [("softmax", True, 7, 2), ("softmax", False, 12, 8),
                                                       ("sigmoid", True, 60, 8), ("sigmoid", False, 5, 1)])
def test_fused_router_route_matches_linear_then_route(device, act_dtype, T, scoring, renormalize, E, k):
    """The router's product inside the routing launch gives ``fused_route`` of the Linear's
    logits exactly: the same ids and bit-equal weights (``_router_case``: the rounded logits are
    equal, and both kernels score them with the same code). E not a power of two (nor a multiple
    of the two experts per program), hidden 40 not a multiple of the interpreter's 16-column
    steps. Leaves the arrival counter at zero for the next launch."""
    x, w = _router_case(T, E, 40, act_dtype, device, seed=T * E)
    ref_w, ref_ids = fused_route(_rounded_logits(x, w), k, scoring, renormalize)
    got_w, got_ids = fused_router_route(x, w, k, scoring, renormalize)
    assert got_ids.dtype == torch.int32 and got_w.dtype == torch.float32 and got_w.shape == (T, k)
    assert torch.equal(got_ids, ref_ids), (got_ids, ref_ids)
    assert torch.equal(got_w, ref_w), (got_w - ref_w).abs().max()
    assert int(arrival_counters(x.device, 1)[0]) == 0


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_fused_router_route_never_names_a_missing_expert(device, scoring):
    """A token row of NaN (a padding row) routes to k distinct real experts, and a router row with
    a NaN (expert 3's logit NaN for every token) never outranks a real score: under sigmoid
    expert 3 is never picked, under softmax the row's scores are all NaN (as in ``fused_route``).
    Every row equals ``fused_route`` of the Linear's logits."""
    E, k = 9, 3
    x, w = _router_case(4, E, 40, torch.float32, device, seed=5)
    x[1] = float("nan")
    w[3, 7] = float("nan")
    got_w, got_ids = fused_router_route(x, w, k, scoring)
    ref_w, ref_ids = fused_route(_rounded_logits(x, w), k, scoring)
    assert bool(((got_ids >= 0) & (got_ids < E)).all()), got_ids
    assert all(len(set(row)) == k for row in got_ids.tolist())
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=0, atol=0)
    if scoring == "sigmoid":
        assert 3 not in got_ids[[0, 2, 3]].reshape(-1).tolist()


def test_fused_router_route_limits(device):
    x, w = _router_case(ROUTER_MAX_TOKENS + 1, 6, 16, torch.float32, device)
    with pytest.raises(ValueError, match="at most"):
        fused_router_route(x, w, 2)
    with pytest.raises(ValueError, match="does not match"):
        fused_router_route(x[:2], w.half(), 2)
    weights, ids = fused_router_route(x[:0], w, 2)
    assert weights.shape == ids.shape == (0, 2)
