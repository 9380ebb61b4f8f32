"""``flashserve bench kernels``: the Triton attention kernels against torch SDPA and the
device's read-bandwidth ceiling.

What is measured (all on one device, in one run):

* read bandwidth: ``x.sum()`` over a large bf16 tensor (default 4 GiB), bytes read / median
  time. This is the ceiling decode attention is compared with.
* decode (one query token per sequence, paged KV): achieved bandwidth = (K/V bytes of every
  context token + q + out) / median time, and its fraction of the read bandwidth; torch SDPA
  with the flash and cuDNN backends on the same K/V stored contiguously ``[B, Hkv, L, D]``
  (GQA through ``enable_gqa=True``; if a backend rejects that, K/V expanded to Hq heads and
  the row says so) timed beside it, counted with the same (minimum) byte formula.
* prefill (causal, fresh prompts, paged KV): TFLOP/s = 2 * B * Hq * D * L^2 / time (the causal
  half of 4 * B * Hq * D * L^2) beside SDPA flash / cuDNN on contiguous q/k/v.
* optionally the FlashDecoding++ unified-max (asynchronised softmax) decode path against the
  synchronous online softmax.
* 8-bit KV caches (``--kv-cache-dtypes``, default ``auto,fp8,int8``): the same decode and prefill
  shapes over an int8 / fp8 cache (``flashserve.kernels.kv_quant``), bytes counted as read
  (values + fp16 scales), checked against SDPA on the dequantized K/V, with the speed-up over
  the 16-bit cache and the error against it in the note; ``--kv-decode-configs`` times other
  decode tile configurations on the 8-bit caches.

Timing: ``triton.testing.do_bench`` median with warm-up; it clears the L2 before every
repetition, and every decode working set is larger than the L2 anyway, so no input rotation is
needed. Each kernel's output is checked against SDPA (math on the same data) before it is
timed. ``--output-json`` writes every number; a short table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

TARGET_DECODE_FRACTION = 0.85  # of the measured read bandwidth, at the TARGET_DECODE_SHAPES
TARGET_DECODE_SHAPES = ((64, 4096), (256, 1024))
TARGET_PREFILL_SPEEDUP = 1.10  # over torch SDPA flash, every prefill shape
TARGET_FP8_KV_DECODE_SPEEDUP = 1.15  # fp8 over 16-bit KV cache, decode at >= 32k context
KV_IMPL = {"fp8": "triton-fp8kv", "int8": "triton-int8kv"}


def _shapes(text: str) -> list[tuple[int, int]]:
    """'1x32768,64x4096' -> [(1, 32768), (64, 4096)]."""
    out = []
    for part in text.split(","):
        if part.strip():
            b, n = part.lower().split("x")
            out.append((int(b), int(n)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-shapes", default="1x32768,64x4096,256x1024",
                        help="comma-separated BATCHxCONTEXT decode shapes")
    parser.add_argument("--prefill-shapes", default="1x2048,1x8192,4x2048",
                        help="comma-separated BATCHxPROMPT prefill shapes (B > 1: packed batch)")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--read-gib", type=float, default=4.0, help="size of the x.sum() read-bandwidth tensor")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch SDPA baselines")
    parser.add_argument("--unified-max", type=float, default=4.0,
                        help="phi for the FlashDecoding++ comparison (natural-log units of scale*q.k)")
    parser.add_argument("--no-unified", action="store_true", help="skip the unified-max comparison")
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8,int8",
                        help="comma-separated KV cache dtypes to time (auto = the --dtype cache)")
    parser.add_argument("--kv-decode-configs", default="",
                        help="extra decode tile configs for 8-bit caches, BLOCK_N:WARPS:STAGES[,...] (page-wise loads)")
    parser.add_argument("--output-json", default=None, help="write all results here")


# ---------------------------------------------------------------------------------------------
# measurement helpers


def time_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds per call (CUDA events; L2 cleared before each repetition)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def read_bandwidth(gib: float, warmup_ms: float, rep_ms: float, device: torch.device) -> dict:
    """Bytes read per second by ``x.sum()`` over a bf16 tensor of ``gib`` GiB."""
    n = int(gib * 2**30) // 2
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: x.sum(), warmup_ms, rep_ms)
    del x
    torch.cuda.empty_cache()
    return {"bytes": 2 * n, "ms": ms, "tb_s": 2 * n / ms / 1e9}


@dataclass
class PagedInputs:
    """A paged KV cache holding B sequences of L tokens (block table a random permutation),
    plus the same K/V gathered to contiguous ``[B, Hkv, L, D]`` for SDPA."""

    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, blocks_per_seq] int32

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens, self.block_tables)

    def contiguous_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V as [B, Hkv, L, D] contiguous tensors (token order of each sequence)."""
        b, nblk = self.block_tables.shape
        bs, hkv, d = self.k_cache.shape[1:]
        idx = self.block_tables.long()

        def gather(c: torch.Tensor) -> torch.Tensor:
            return c[idx].reshape(b, nblk * bs, hkv, d).transpose(1, 2).contiguous()

        return gather(self.k_cache), gather(self.v_cache)

    def quantized(self, kv_cache_dtype: str) -> tuple[PagedInputs, PagedInputs]:
        """(the same inputs over an 8-bit cache, and over its dequantized values in the
        original dtype, for the reference)."""
        from dataclasses import replace

        from flashserve.kernels import kv_quant

        kc, vc = kv_quant.quantize_caches(self.k_cache, self.v_cache, kv_quant.storage_dtype(kv_cache_dtype))
        dq = replace(self, k_cache=kv_quant.dequantize_cache(kc, self.q.dtype),
                     v_cache=kv_quant.dequantize_cache(vc, self.q.dtype))
        return replace(self, k_cache=kc, v_cache=vc), dq

    def kv_bytes_per_token_head(self) -> int:
        """K + V bytes one (token, kv head) costs to read: 2 D elements, plus 2 fp16 scales when 8-bit."""
        from flashserve.kernels import kv_quant

        d = self.k_cache.shape[3]
        extra = 2 * kv_quant.SCALE_DTYPE.itemsize if kv_quant.is_quantized(self.k_cache) else 0
        return 2 * d * self.k_cache.element_size() + extra


def make_inputs(batch: int, ctx: int, q_len: int, hq: int, hkv: int, d: int, block_size: int,
                dtype: torch.dtype, device: torch.device, seed: int = 0) -> PagedInputs:
    """Random inputs on the device (ctx a multiple of block_size); each sequence has ``ctx``
    context tokens, the last ``q_len`` of which are this step's queries."""
    assert ctx % block_size == 0
    gen = torch.Generator(device=device).manual_seed(seed)
    nblk = ctx // block_size
    num_blocks = batch * nblk
    table = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32).view(batch, nblk)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, device=device, dtype=dtype, generator=gen)
    q = torch.randn(batch * q_len, hq, d, device=device, dtype=dtype, generator=gen)
    qsl = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * q_len
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    return PagedInputs(q, k_cache, v_cache, qsl, seq_lens, table)


def sdpa_runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, causal: bool,
                scale: float) -> tuple[Callable[[], torch.Tensor] | None, str]:
    """A closure running torch SDPA with one backend ('flash' | 'cudnn' | 'math') on
    q [B, Hq, Lq, D], k/v [B, Hkv, L, D]; GQA via enable_gqa, else expanded K/V.
    Returns (fn or None, how GQA was done / why it is unavailable)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "math": SDPBackend.MATH}[backend]
    f = torch.nn.functional.scaled_dot_product_attention
    rep = q.shape[1] // k.shape[1]
    errors = []
    for mode in ("enable_gqa", "expanded_kv"):
        if mode == "enable_gqa":
            kk, vv, extra = k, v, {"enable_gqa": rep > 1}
        else:
            kk = k.repeat_interleave(rep, dim=1).contiguous()
            vv = v.repeat_interleave(rep, dim=1).contiguous()
            extra = {}

        def fn(kk=kk, vv=vv, extra=extra) -> torch.Tensor:
            with sdpa_kernel([sdp]):
                return f(q, kk, vv, is_causal=causal, scale=scale, **extra)

        try:
            fn()
            torch.cuda.synchronize()
            return fn, mode
        except RuntimeError as exc:  # backend does not support this combination
            errors.append(f"{mode}: {str(exc).splitlines()[0][:120]}")
    return None, "unavailable (" + "; ".join(errors) + ")"


@dataclass
class Row:
    kind: str  # decode | prefill | decode-unified
    batch: int
    length: int
    impl: str
    ms: float | None = None
    tb_s: float | None = None
    frac_read: float | None = None
    tflops: float | None = None
    rel_err: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# benchmarks


def _kv_dtypes(args: argparse.Namespace) -> list[str]:
    """The 8-bit cache dtypes asked for (``auto``, the 16-bit cache, is always timed)."""
    names = [n.strip() for n in args.kv_cache_dtypes.split(",") if n.strip()]
    bad = [n for n in names if n not in ("auto", *KV_IMPL)]
    if bad:
        raise ValueError(f"--kv-cache-dtypes: unknown {', '.join(bad)}; choose from auto, fp8, int8")
    return [n for n in names if n != "auto"]


def _decode_configs(text: str) -> list:
    """'64:4:3,128:8:3' -> [DecodeConfig(64, 4, 3, paged=True), ...]."""
    from flashserve.kernels.decode_attention import DecodeConfig

    out = []
    for part in text.split(","):
        if part.strip():
            bn, warps, stages = (int(x) for x in part.split(":"))
            out.append(DecodeConfig(bn, warps, stages, paged=True))
    return out


def _decode_reference(inp: PagedInputs, scale: float) -> torch.Tensor | None:
    """SDPA (math for small shapes, flash / cuDNN for big ones) on the inputs' contiguous K/V."""
    batch, hq, d = inp.seq_lens.shape[0], inp.q.shape[1], inp.q.shape[2]
    k, v = inp.contiguous_kv()
    q4 = inp.q.view(batch, 1, hq, d).transpose(1, 2)  # [B, Hq, 1, D]
    fn = sdpa_runner(q4, k, v, "math", False, scale)[0] if batch * k.shape[2] <= 2**18 else None
    if fn is None:  # big shapes: reference = flash/cudnn on the same data
        fn = sdpa_runner(q4, k, v, "flash", False, scale)[0] or sdpa_runner(q4, k, v, "cudnn", False, scale)[0]
    return fn().transpose(1, 2).reshape(batch, hq, d) if fn else None


def bench_decode(args: argparse.Namespace, read_tb_s: float, device: torch.device, dtype: torch.dtype) -> list[Row]:
    from flashserve.kernels.decode_attention import paged_decode_attention

    hq, hkv, d, bs = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    scale = d ** -0.5
    rows: list[Row] = []
    for batch, ctx in _shapes(args.decode_shapes):
        inp = make_inputs(batch, ctx, 1, hq, hkv, d, bs, dtype, device, seed=batch + ctx)
        q_bytes = 2 * inp.q.numel() * inp.q.element_size()  # q in, out
        nbytes = batch * ctx * hkv * inp.kv_bytes_per_token_head() + q_bytes
        k, v = inp.contiguous_kv()
        q4 = inp.q.view(batch, 1, hq, d).transpose(1, 2)  # [B, Hq, 1, D]
        ref = _decode_reference(inp, scale)

        def add(impl: str, fn: Callable[[], torch.Tensor], out_of: Callable[[torch.Tensor], torch.Tensor],
                note: str = "", kind: str = "decode", ref: torch.Tensor | None = ref, nbytes: int = nbytes) -> Row:
            err = rel_err(out_of(fn()), ref) if ref is not None else None
            ms = time_ms(fn, args.warmup_ms, args.rep_ms)
            row = Row(kind, batch, ctx, impl, ms=ms, tb_s=nbytes / ms / 1e9,
                      frac_read=nbytes / ms / 1e9 / read_tb_s, rel_err=err, note=note)
            rows.append(row)
            return row

        def triton_fn(inp: PagedInputs, phi: float | None = None, config=None) -> Callable[[], torch.Tensor]:
            return lambda: paged_decode_attention(*inp.args(), max_query_len=1, max_seq_len=ctx,
                                                  scale=scale, unified_max=phi, config=config)

        base = add("triton", triton_fn(inp), lambda o: o, note=f"{str(dtype).removeprefix('torch.')} KV")
        base_out = triton_fn(inp)()
        for kv in _kv_dtypes(args):
            qinp, dq = inp.quantized(kv)
            qref = _decode_reference(dq, scale)
            qbytes = batch * ctx * hkv * qinp.kv_bytes_per_token_head() + q_bytes
            del dq
            for cfg in [None, *_decode_configs(args.kv_decode_configs)]:
                fn = triton_fn(qinp, config=cfg)
                tag = "" if cfg is None else f" bn{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"
                err_16 = rel_err(fn(), base_out)
                row = add(KV_IMPL[kv] + tag, fn, lambda o: o, ref=qref, nbytes=qbytes)
                row.note = f"{base.ms / row.ms:.2f}x the 16-bit KV; err vs it {err_16:.1e}"
                row.extra = {"kv_cache_dtype": kv, "speedup_vs_16bit_kv": base.ms / row.ms, "err_vs_16bit_kv": err_16}
            del qinp, qref
            torch.cuda.empty_cache()
        if not args.no_unified:
            _, flags = paged_decode_attention(*inp.args(), max_query_len=1, max_seq_len=ctx, scale=scale,
                                              unified_max=args.unified_max, return_fallback_flags=True)
            fell = int(flags.sum().item()) if flags is not None else 0
            add("triton-unified", triton_fn(inp, args.unified_max), lambda o: o,
                note=f"phi={args.unified_max}, {fell} programs fell back", kind="decode-unified")
        if not args.no_torch:
            for backend in ("flash", "cudnn"):
                fn, how = sdpa_runner(q4, k, v, backend, False, scale)
                if fn is None:
                    rows.append(Row("decode", batch, ctx, f"sdpa-{backend}", note=how))
                    continue
                add(f"sdpa-{backend}", fn, lambda o: o.transpose(1, 2).reshape(batch, hq, d), note=how)
        del inp, k, v
        torch.cuda.empty_cache()
    return rows


def bench_prefill(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    from flashserve.kernels.prefill_attention import paged_prefill_attention

    hq, hkv, d, bs = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    scale = d ** -0.5
    rows: list[Row] = []
    for batch, length in _shapes(args.prefill_shapes):
        inp = make_inputs(batch, length, length, hq, hkv, d, bs, dtype, device, seed=7 * batch + length)
        flops = 2.0 * batch * hq * d * length * length  # causal half of 4*B*H*D*L^2
        q4 = inp.q.view(batch, length, hq, d).transpose(1, 2).contiguous()  # [B, Hq, L, D]

        def reference(inp: PagedInputs) -> torch.Tensor | None:
            k, v = inp.contiguous_kv()
            fn = sdpa_runner(q4, k, v, "flash", True, scale)[0] or sdpa_runner(q4, k, v, "cudnn", True, scale)[0]
            return fn().transpose(1, 2).reshape(batch * length, hq, d) if fn else None

        ref = reference(inp)

        def add(impl: str, fn: Callable[[], torch.Tensor], out_of: Callable[[torch.Tensor], torch.Tensor],
                note: str = "", ref: torch.Tensor | None = ref) -> Row:
            err = rel_err(out_of(fn()), ref) if ref is not None else None
            ms = time_ms(fn, args.warmup_ms, args.rep_ms)
            rows.append(Row("prefill", batch, length, impl, ms=ms, tflops=flops / ms / 1e9, rel_err=err, note=note))
            return rows[-1]

        def triton_fn(inp: PagedInputs) -> Callable[[], torch.Tensor]:
            return lambda: paged_prefill_attention(*inp.args(), max_query_len=length, scale=scale)

        base = add("triton", triton_fn(inp), lambda o: o, note="paged KV" + (", packed batch" if batch > 1 else ""))
        for kv in _kv_dtypes(args):
            qinp, dq = inp.quantized(kv)
            row = add(KV_IMPL[kv], triton_fn(qinp), lambda o: o, ref=reference(dq))
            row.note = f"{base.ms / row.ms:.2f}x the 16-bit KV"
            del qinp, dq
            torch.cuda.empty_cache()
        if not args.no_torch:
            k, v = inp.contiguous_kv()
            for backend in ("flash", "cudnn"):
                fn, how = sdpa_runner(q4, k, v, backend, True, scale)
                if fn is None:
                    rows.append(Row("prefill", batch, length, f"sdpa-{backend}", note=how))
                    continue
                add(f"sdpa-{backend}", fn, lambda o: o.transpose(1, 2).reshape(batch * length, hq, d), note=how)
            del k, v
        del inp, q4
        torch.cuda.empty_cache()
    return rows


def small_reference_checks(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Ragged shapes (odd lengths, partial pages, several splits) against the torch reference,
    on the 16-bit cache and on each 8-bit cache (stored by the Triton kernel, which must write
    the reference's bytes)."""
    from flashserve.kernels import kv_quant
    from flashserve.kernels.cache_ops import store_kv
    from flashserve.kernels.decode_attention import paged_decode_attention
    from flashserve.kernels.prefill_attention import paged_prefill_attention
    from flashserve.kernels.reference import paged_attention_ref, store_kv_ref
    from flashserve.kernels.testing import RandomPagedBatch

    hq, hkv, d, bs = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    out = []
    for kv in ["auto", *_kv_dtypes(args)]:
        for name, seq_lens, q_lens in [("decode", [4097, 1000, 129, 17, 1], [1] * 5),
                                       ("spec-decode", [905, 305, 33], [4, 3, 1]),
                                       ("prefill", [1023, 333, 77, 1], [1023, 333, 77, 1]),
                                       ("chunked-prefill", [1500, 600], [517, 600])]:
            b = RandomPagedBatch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device, seed=len(name))
            m = b.meta
            case = name if kv == "auto" else f"{name} {kv}"
            if kv == "auto":
                b.store_new_with_reference()
            else:
                kvd = kv_quant.storage_dtype(kv)
                dense_k, dense_v = b.k_cache, b.v_cache
                b.k_cache, b.v_cache = kv_quant.quantize_caches(dense_k, dense_v, kvd)
                ref_k, ref_v = kv_quant.quantize_caches(dense_k, dense_v, kvd)
                store_kv_ref(b.k_new, b.v_new, ref_k, ref_v, m.slot_mapping)
                store_kv(b.k_new, b.v_new, b.k_cache, b.v_cache, m.slot_mapping)
                if name == "decode":
                    same = all(torch.equal(x.float(), y.float()) and torch.equal(kv_quant.kv_scales(x), kv_quant.kv_scales(y))
                               for x, y in ((b.k_cache, ref_k), (b.v_cache, ref_v)))
                    out.append({"case": f"store {kv} (bit-exact)", "rel_err": 0.0 if same else float("nan"), "ok": same})
            if "decode" in name:
                o = paged_decode_attention(*b.attention_args(), max_query_len=m.max_query_len,
                                           max_seq_len=m.max_seq_len, scale=d ** -0.5)
            else:
                o = paged_prefill_attention(*b.attention_args(), max_query_len=m.max_query_len, scale=d ** -0.5)
            err = rel_err(o, paged_attention_ref(*b.attention_args(), scale=d ** -0.5))
            out.append({"case": case, "rel_err": err, "ok": err < 2e-2})
    return out


# ---------------------------------------------------------------------------------------------
# report


def _fmt(x: float | None, spec: str) -> str:
    """Format a number, or a right-aligned '-' of the same width when absent."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(int(spec.split(".")[0]))
    return format(x, spec)


def targets(rows: list[Row], read_tb_s: float) -> list[dict]:
    """The issue's targets, evaluated on this run's rows."""
    by = {(r.kind, r.batch, r.length, r.impl): r for r in rows}
    res = []
    for b, n in TARGET_DECODE_SHAPES:
        t = by.get(("decode", b, n, "triton"))
        if t is None or t.ms is None:
            continue
        res.append({"target": f"decode {b}x{n} >= {TARGET_DECODE_FRACTION:.0%} of read BW",
                    "value": f"{t.frac_read:.1%}", "met": t.frac_read >= TARGET_DECODE_FRACTION})
        c = by.get(("decode", b, n, "sdpa-cudnn"))
        if c is not None and c.ms is not None:
            res.append({"target": f"decode {b}x{n} not slower than cuDNN",
                        "value": f"{t.ms * 1e3:.1f} vs {c.ms * 1e3:.1f} us", "met": t.ms <= c.ms})
    for r in rows:
        if r.kind == "prefill" and r.impl == "triton" and r.ms is not None:
            f = by.get(("prefill", r.batch, r.length, "sdpa-flash"))
            if f is not None and f.ms is not None:
                sp = f.ms / r.ms
                res.append({"target": f"prefill {r.batch}x{r.length} >= {TARGET_PREFILL_SPEEDUP}x SDPA flash",
                            "value": f"{sp:.2f}x", "met": sp >= TARGET_PREFILL_SPEEDUP})
        if r.kind == "decode" and r.impl == KV_IMPL["fp8"] and r.length >= 32768 and r.ms is not None:
            sp = r.extra["speedup_vs_16bit_kv"]
            res.append({"target": f"decode {r.batch}x{r.length} fp8 KV >= {TARGET_FP8_KV_DECODE_SPEEDUP}x 16-bit KV",
                        "value": f"{sp:.2f}x", "met": sp >= TARGET_FP8_KV_DECODE_SPEEDUP})
    return res


def print_table(result: dict) -> None:
    rb = result["read_bandwidth"]
    print(f"\n== flashserve bench kernels  {result['device']}  torch {result['torch']}  triton {result['triton']}"
          f"  {result['date']}")
    print(f"read bandwidth (x.sum over {rb['bytes'] / 2**30:.1f} GiB bf16): {rb['tb_s']:.2f} TB/s")
    print(f"{'kind':<15}{'shape':>10}  {'impl':<15}{'us':>9}{'TB/s':>7}{'%read':>7}{'TFLOP/s':>9}{'relerr':>9}  note")
    for r in result["rows"]:
        print(f"{r['kind']:<15}{str(r['batch']) + 'x' + str(r['length']):>10}  {r['impl']:<15}"
              f"{_fmt(r['ms'] and r['ms'] * 1e3, '9.1f')}{_fmt(r['tb_s'], '7.2f')}"
              f"{_fmt(r['frac_read'] and 100 * r['frac_read'], '7.1f')}{_fmt(r['tflops'], '9.0f')}"
              f"{_fmt(r['rel_err'], '9.1e')}  {r['note'][:60]}")
    for t in result["targets"]:
        print(f"target: {t['target']:<45} {t['value']:>18}  {'MET' if t['met'] else 'MISSED'}")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("flashserve bench kernels: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    result: dict = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "flashserve bench kernels " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "kernels"] else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k != "output_json"},
        "timing": "triton.testing.do_bench median, L2 cleared per repetition",
    }
    result["checks"] = small_reference_checks(args, device, dtype)
    rb = read_bandwidth(args.read_gib, args.warmup_ms, args.rep_ms, device)
    result["read_bandwidth"] = rb
    rows = bench_decode(args, rb["tb_s"], device, dtype) if args.decode_shapes else []
    rows += bench_prefill(args, device, dtype) if args.prefill_shapes else []
    result["rows"] = [asdict(r) for r in rows]
    result["targets"] = targets(rows, rb["tb_s"])
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    for c in result["checks"]:
        print(f"check {c['case']:<16} rel err {c['rel_err']:.2e}  {'ok' if c['ok'] else 'FAIL'}")
    print_table(result)
    bad_err = any(r.rel_err is not None and r.rel_err > 2e-2 for r in rows)
    return 1 if bad_err or not all(c["ok"] for c in result["checks"]) else 0
