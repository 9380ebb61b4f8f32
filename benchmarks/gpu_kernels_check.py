"""GPU correctness (and optional timing) check of every flashserve Triton kernel.

Run on an H100/H200:  python benchmarks/gpu_kernels_check.py [--time] [--quick]

(a) Each kernel against its torch reference (flashserve.kernels.reference) over head dims
    64/128 (and 32/256 once each), KV block sizes 16/32, GQA ratios 1/4/8, bf16 and fp16, odd lengths, chunked
    prefill over cached context, decode with several splits, speculative verification, the
    unified-max (async softmax) fast path and its fallback. Prints a PASS/FAIL table; the exit
    status is 1 if anything failed.
(b) --time: a few timings (prefill vs torch SDPA, decode bandwidth, fused ops).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashserve.kernels import reference as ref  # noqa: E402
from flashserve.kernels.activation import silu_and_mul  # noqa: E402
from flashserve.kernels.cache_ops import store_kv  # noqa: E402
from flashserve.kernels.decode_attention import paged_decode_attention  # noqa: E402
from flashserve.kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from flashserve.kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from flashserve.kernels.rotary import rotary_embedding  # noqa: E402
from flashserve.kernels.testing import RandomPagedBatch, tolerance  # noqa: E402
from flashserve.kernels.timing import attention_bytes, time_fn  # noqa: E402
from flashserve.kernels.triton_backend import TritonAttentionBackend  # noqa: E402

DEV = torch.device("cuda")
ROWS: list[tuple[str, str, str, str, str]] = []  # (kernel, case, dtype, max err, verdict)


def dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def record(kernel: str, case: str, dtype: torch.dtype, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run fn() -> (out, expected); compare with the dtype's tolerance; add a table row."""
    try:
        out, expected = fn()
        err = (out.float() - expected.float()).abs().max().item() if out.numel() else 0.0
        ok = True
        try:
            torch.testing.assert_close(out, expected, **tolerance(dtype))
        except AssertionError:
            ok = False
        ROWS.append((kernel, case, dname(dtype), f"{err:.2e}", "PASS" if ok else "FAIL"))
    except Exception as exc:  # noqa: BLE001 - report and continue
        traceback.print_exc()
        ROWS.append((kernel, case, dname(dtype), "-", f"FAIL ({type(exc).__name__})"))


def heads(group: int) -> tuple[int, int]:
    """(num_heads, num_kv_heads) for a GQA ratio (1 = MHA, 8 = MQA-like with 1 kv head)."""
    return {1: (8, 8), 4: (16, 4), 8: (8, 1)}[group]


def attention_checks(quick: bool) -> None:
    dtypes = [torch.bfloat16, torch.float16]
    head_dims = [64, 128]
    block_sizes = [16, 32]
    groups = [1, 4, 8]
    # odd lengths; chunked prefill (context + chunk) next to a fresh prompt and a 1-token row
    prefill_lens = ([1023, 333, 77, 1], [517, 333, 77, 1])
    decode_lens = [4097, 1000, 129, 17, 1]
    spec_q = [4, 1, 3, 2, 1]
    configs = list(itertools.product(dtypes, head_dims, block_sizes, groups))
    # other power-of-two head sizes, one configuration each
    configs += [(torch.bfloat16, 32, 16, 4), (torch.bfloat16, 256, 16, 4), (torch.float16, 256, 32, 8)]
    for dtype, d, bs, g in configs:
        if quick and (bs == 32 or dtype == torch.float16) and g != 4:
            continue
        hq, hkv = heads(g)
        case = f"d{d} bs{bs} hq{hq}/kv{hkv}"
        scale = d ** -0.5

        def store_case() -> tuple[torch.Tensor, torch.Tensor]:
            b = RandomPagedBatch([301, 45], [301, 3], hq, hkv, d, bs, dtype, DEV, seed=1)
            slots = b.meta.slot_mapping.clone()
            slots[5] = -1
            kc, vc = b.k_cache.clone(), b.v_cache.clone()
            ref.store_kv_ref(b.k_new, b.v_new, kc, vc, slots)
            store_kv(b.k_new, b.v_new, b.k_cache, b.v_cache, slots)
            return torch.cat([b.k_cache, b.v_cache]), torch.cat([kc, vc])

        def prefill_case() -> tuple[torch.Tensor, torch.Tensor]:
            b = RandomPagedBatch(*prefill_lens, hq, hkv, d, bs, dtype, DEV, seed=2)
            b.store_new_with_reference()
            out = paged_prefill_attention(*b.attention_args(), max_query_len=b.meta.max_query_len, scale=scale)
            return out, ref.paged_attention_ref(*b.attention_args(), scale=scale)

        def decode_case(q_lens: list[int], splits: int | None, phi: float | None = None,
                        want_fallback: bool | None = None) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
            def run() -> tuple[torch.Tensor, torch.Tensor]:
                b = RandomPagedBatch(decode_lens, q_lens, hq, hkv, d, bs, dtype, DEV, seed=3)
                b.store_new_with_reference()
                out, flags = paged_decode_attention(
                    *b.attention_args(), max_query_len=b.meta.max_query_len,
                    max_seq_len=b.meta.max_seq_len, scale=scale, num_splits=splits,
                    unified_max=phi, return_fallback_flags=True)
                if want_fallback is not None:
                    fell_back = bool(flags.any().item())
                    assert fell_back == want_fallback, f"fallback flags {fell_back}, expected {want_fallback}"
                return out, ref.paged_attention_ref(*b.attention_args(), scale=scale)
            return run

        record("store_kv", case, dtype, store_case)
        record("prefill", case, dtype, prefill_case)
        record("decode", case + " splits=auto", dtype, decode_case([1] * 5, None))
        record("decode", case + " splits=7", dtype, decode_case([1] * 5, 7))
        record("decode-spec", case + " q=4,1,3,2,1", dtype, decode_case(spec_q, None))
        if g == 4 or not quick:
            record("decode-async", case + " fast path", dtype, decode_case([1] * 5, 16, phi=3.0, want_fallback=False))
            record("decode-async", case + " fallback", dtype, decode_case([1] * 5, 16, phi=-500.0, want_fallback=True))


def backend_checks() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for name, seq_lens, q_lens in [("prefill", [700, 65], [700, 65]), ("mixed", [900, 301], [211, 1]),
                                       ("decode", [901, 302], [1, 1]), ("spec", [905, 305], [4, 3])]:
            def run(seq_lens=seq_lens, q_lens=q_lens, dtype=dtype) -> tuple[torch.Tensor, torch.Tensor]:
                b = RandomPagedBatch(seq_lens, q_lens, 32, 8, 128, 16, dtype, DEV, seed=4)
                kc, vc = b.k_cache.clone(), b.v_cache.clone()
                ref.store_kv_ref(b.k_new, b.v_new, kc, vc, b.meta.slot_mapping)
                m = b.meta
                expected = ref.paged_attention_ref(b.q, kc, vc, m.query_start_loc, m.seq_lens, m.block_tables, 0.088)
                out = TritonAttentionBackend().forward(b.q, b.k_new, b.v_new, b.k_cache, b.v_cache, m, 0.088)
                return out, expected
            record("backend", f"{name} hq32/kv8 d128", dtype, run)


def fused_checks() -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for hidden in (2048, 4096, 5120):
            x = torch.randn(37, hidden, device=DEV, dtype=dtype, generator=gen)
            res = torch.randn(37, hidden, device=DEV, dtype=dtype, generator=gen)
            w = torch.randn(hidden, device=DEV, dtype=dtype, generator=gen)
            record("rms_norm", f"h{hidden}", dtype, lambda: (rms_norm(x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6)))

            def fused() -> tuple[torch.Tensor, torch.Tensor]:
                eo, er = ref.fused_add_rms_norm_ref(x, res, w, 1e-6)
                o, r = fused_add_rms_norm(x.clone(), res.clone(), w, 1e-6)
                return torch.cat([o, r]), torch.cat([eo, er])
            record("fused_add_rms_norm", f"h{hidden}", dtype, fused)
        for hq, hkv, d, rot in ((32, 8, 128, 128), (16, 16, 64, 64), (8, 1, 128, 64)):
            def rope(hq=hq, hkv=hkv, d=d, rot=rot) -> tuple[torch.Tensor, torch.Tensor]:
                cache = ref.build_cos_sin_cache(8192, rot, device=DEV)
                pos = torch.randint(0, 8192, (333,), device=DEV, generator=gen)
                q = torch.randn(333, hq * d, device=DEV, dtype=dtype, generator=gen)
                k = torch.randn(333, hkv, d, device=DEV, dtype=dtype, generator=gen)
                eq, ek = ref.rotary_embedding_ref(pos, q, k, cache, d)
                rotary_embedding(pos, q, k, cache, d)
                return torch.cat([q.flatten(), k.flatten()]), torch.cat([eq.flatten(), ek.flatten()])
            record("rotary_embedding", f"hq{hq}/kv{hkv} d{d} rot{rot}", dtype, rope)
        for inter in (11008, 14336, 333):
            x2 = torch.randn(129, 2 * inter, device=DEV, dtype=dtype, generator=gen)
            record("silu_and_mul", f"I{inter}", dtype, lambda x2=x2: (silu_and_mul(x2), ref.silu_and_mul_ref(x2)))


def timings() -> None:
    print("\nTimings (median ms; bf16, Hq32/Hkv8, d128, block 16)")
    dtype = torch.bfloat16
    hq, hkv, d = 32, 8, 128
    for n_seq, length in ((1, 4096), (4, 2048), (16, 512)):
        b = RandomPagedBatch([length] * n_seq, [length] * n_seq, hq, hkv, d, 16, dtype, DEV)
        b.store_new_with_reference()
        ms = time_fn(lambda: paged_prefill_attention(*b.attention_args(), max_query_len=length, scale=0.088))
        qs = b.q.view(n_seq, length, hq, d).transpose(1, 2)
        ks = torch.randn(n_seq, hkv, length, d, device=DEV, dtype=dtype).repeat_interleave(hq // hkv, 1)
        sdpa = time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, ks, is_causal=True))
        flops = 4 * n_seq * hq * d * length * length / 2
        print(f"  prefill {n_seq}x{length}: triton {ms:.3f} ({flops / ms / 1e9:.0f} TFLOP/s)  "
              f"torch sdpa (contiguous, repeated kv) {sdpa:.3f}")
    for n_seq, length in ((1, 8192), (1, 32768), (32, 2048), (128, 1024)):
        b = RandomPagedBatch([length] * n_seq, [1] * n_seq, hq, hkv, d, 16, dtype, DEV)
        b.store_new_with_reference()
        for phi in (None, 5.0):
            ms = time_fn(lambda: paged_decode_attention(*b.attention_args(), max_query_len=1, max_seq_len=length,
                                                        scale=0.088, unified_max=phi))
            gbs = attention_bytes(n_seq, hq, hkv, d, n_seq * length, 2) / ms / 1e6
            tag = "online " if phi is None else "unified"
            print(f"  decode {tag} {n_seq}x{length}: {ms:.3f} ms ({gbs:.0f} GB/s)")
    x = torch.randn(4096, 4096, device=DEV, dtype=dtype)
    w = torch.randn(4096, device=DEV, dtype=dtype)
    print(f"  rms_norm 4096x4096: {time_fn(lambda: rms_norm(x, w, 1e-6)):.3f} ms")
    x2 = torch.randn(4096, 2 * 14336, device=DEV, dtype=dtype)
    print(f"  silu_and_mul 4096x14336: {time_fn(lambda: silu_and_mul(x2)):.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also print a few timings")
    parser.add_argument("--quick", action="store_true", help="fewer attention configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run tests/kernels with TRITON_INTERPRET=1 instead")
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    t0 = time.time()
    attention_checks(args.quick)
    backend_checks()
    fused_checks()
    torch.cuda.synchronize()
    widths = [max(len(r[i]) for r in ROWS + [("kernel", "case", "dtype", "max|err|", "result")]) for i in range(5)]
    header = ("kernel", "case", "dtype", "max|err|", "result")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in ROWS:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    failed = sum(not r[4].startswith("PASS") for r in ROWS)
    print(f"\n{len(ROWS) - failed}/{len(ROWS)} PASS, {failed} FAIL  ({time.time() - t0:.1f} s)")
    if args.time:
        timings()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
