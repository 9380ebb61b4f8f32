"""``flashserve bench quant-kernels``: quantized matmuls against dense ones on this device.

CUDA (default shapes: every linear of a Llama-3.1-8B layer and its LM head): for each M in
``--m`` (default 1, 4, 16 and a prefill 2048) times bf16 cuBLAS (``F.linear``), flashserve's
int8, int4 (group 128) and fp8 weight-only kernels (the fused kernel; for M >= 256 also
dequantize + cuBLAS), fp8 W8A8 (per-token fp8 activations + ``torch._scaled_mm``) and, with
``--gguf``, the GGUF Q4_K / Q8_0 kernels. Each row gives microseconds per call, the bytes the
call must read (weights with their scales, activations) over the time as GB/s and as a share of
the device's read bandwidth measured in the same run (``x.sum()`` over 4 GiB), and the speedup
over bf16. A summary adds the four layer linears x 32 layers + the LM head at M = 1: the
linear part of one batch-1 decode step, and the tok/s it allows. Every kernel's output is
checked against dequantize-then-matmul before it is timed. ``--sweep`` also tries 48 launch
configurations (block N, block K, split-K, pipeline stages) for M <= 16 and prints the best per
(format, shape, M), for tuning the fixed table in ``flashserve.kernels.quant_gemm.matmul_config``
(minutes: restrict it with ``--m 1 --shapes ...``).

CPU (``--device cpu``; default shapes: SmolLM2-135M's layers and LM head, and the layers of a
1B model): torch's CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) with
bf16 activations (and with fp32 ones, the scalar fallback) and flashserve's native GGUF kernel
(``cpu_native``, Q4_1 and Q8_0 blocks, where it runs) against dense fp32 / bf16 ``F.linear``,
best of several repeats (the machine may be shared). Run it again with
``ATEN_CPU_CAPABILITY=avx2`` to see the AVX2 kernels on an AVX-512 machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashserve.bench import cpu_model
from flashserve.bench.gemv import parse_shapes
from flashserve.kernels import quant_reference as ref

LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
            "lm_head": (128256, 4096)}
LLAMA_8B_LAYERS = 32
SMOLLM2 = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ONE_B = {"1b.qkv": (3072, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--m", default=None, help="comma-separated rows (default: 1,4,16,2048 on CUDA, 1,4 on CPU)")
    p.add_argument("--shapes", default=None, help="name=NxK,... (default: Llama-3.1-8B on CUDA, SmolLM2 + 1B on CPU)")
    p.add_argument("--gguf", action="store_true", help="also time the GGUF Q4_K and Q8_0 kernels (CUDA)")
    p.add_argument("--sweep", action="store_true", help="search launch configurations for M <= 16 (CUDA)")
    p.add_argument("--read-gib", type=float, default=4.0)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--repeats", type=int, default=7, help="CPU: best of this many timing runs")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (1 is steadier on a shared machine)")
    p.add_argument("--output-json", default=None)


def _shapes(text: str | None, default: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """``--shapes`` as ``bench gemv`` reads it, without its ``:gated`` products."""
    if not text:
        return dict(default)
    try:
        shapes = parse_shapes(text)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    gated = [name for name, (_, _, g) in shapes.items() if g]
    if gated:
        raise SystemExit(f"--shapes: this bench times plain products only; drop ':gated' from {', '.join(gated)}")
    return {name: (n, k) for name, (n, k, _) in shapes.items()}


def _rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    return float((out.double() - expect.double()).norm() / expect.double().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------- CUDA
def _cuda_candidates(n: int, k: int, device: torch.device, gguf: bool) -> dict[str, dict]:
    """name -> {fn(x) builder, bytes of the stored weight, dense fp32 weight for the check}."""
    from flashserve.kernels.quant_gemm import FMT_FP8, FMT_INT4, FMT_INT8, wq_dequantize, wq_matmul

    w = torch.randn(n, k, device=device) * 0.02
    out: dict[str, dict] = {}
    wb = w.bfloat16()
    out["bf16"] = {"fn": lambda x: F.linear(x, wb), "bytes": 2 * n * k, "dense": wb.float()}
    q8, s8 = ref.quantize_int8(w)
    out["int8"] = {"fn": lambda x: wq_matmul(x, q8, s8, None, FMT_INT8), "bytes": n * k + 4 * n,
                   "dense": ref.dequantize_int8(q8, s8),
                   "deq": lambda x: F.linear(x, wq_dequantize(q8, s8, None, FMT_INT8, k, dtype=x.dtype))}
    u, s4, _ = ref.quantize_int4(w, 128, zero_point=False)
    p4 = ref.pack_int4(u)
    out["int4-g128"] = {"fn": lambda x: wq_matmul(x, p4, s4, None, FMT_INT4, 128), "bytes": n * k // 2 + 4 * n * k // 128,
                        "dense": ref.dequantize_int4(p4, s4, None, 128),
                        "deq": lambda x: F.linear(x, wq_dequantize(p4, s4, None, FMT_INT4, k, 128, x.dtype))}
    q8f, sf = ref.quantize_fp8(w)
    out["fp8"] = {"fn": lambda x: wq_matmul(x, q8f, sf, None, FMT_FP8), "bytes": n * k + 4 * n,
                  "dense": ref.dequantize_fp8(q8f, sf),
                  "deq": lambda x: F.linear(x, wq_dequantize(q8f, sf, None, FMT_FP8, k, dtype=x.dtype))}

    def w8a8(x: torch.Tensor) -> torch.Tensor:
        xq, xs = ref.quantize_fp8(x)
        return torch._scaled_mm(xq, q8f.t(), scale_a=xs[:, None], scale_b=sf.view(1, -1), out_dtype=x.dtype)

    out["fp8-w8a8"] = {"fn": w8a8, "bytes": n * k + 4 * n, "dense": ref.dequantize_fp8(q8f, sf), "loose": True}
    if gguf:
        from flashserve.kernels.quant_gguf import gguf_dequantize, gguf_matmul

        for qtype in ("Q4_K", "Q8_0"):
            raw = ref.random_gguf_blocks(qtype, n, k, seed=1, scale=0.002).to(device)
            out[f"gguf-{qtype}"] = {"fn": lambda x, r=raw, t=qtype: gguf_matmul(x, r, t), "bytes": raw.numel(),
                                    "dense": ref.gguf_dequantize(raw, qtype),
                                    "deq": lambda x, r=raw, t=qtype: F.linear(x, gguf_dequantize(r, t, k, x.dtype))}
    return out


def _sweep(fmt_name: str, x: torch.Tensor, n: int, k: int) -> tuple[str, float]:
    """Best (config, us) of a grid of launch configurations for the flat GEMM."""
    from flashserve.bench.kernels import time_ms
    from flashserve.kernels.quant_gemm import FMT_FP8, FMT_INT4, FMT_INT8, MatmulConfig, wq_matmul

    fmt = {"int8": FMT_INT8, "int4-g128": FMT_INT4, "fp8": FMT_FP8}[fmt_name]
    wt = torch.randn(n, k, device=x.device) * 0.02
    if fmt == FMT_INT4:
        u, s, _ = ref.quantize_int4(wt, 128, False)
        w = ref.pack_int4(u)
    elif fmt == FMT_INT8:
        w, s = ref.quantize_int8(wt)
    else:
        w, s = ref.quantize_fp8(wt)
    best = ("", float("inf"))
    for bn in (32, 64, 128):
        for bk in (128, 256):
            for split in (1, 2, 4, 8):
                for warps, stages in ((4, 3), (4, 4)):
                    cfg = MatmulConfig(16, bn, bk, split, warps, stages)
                    try:
                        us = 1e3 * time_ms(lambda: wq_matmul(x, w, s, None, fmt, 128, cfg), 5, 20)
                    except Exception:  # noqa: BLE001 - a configuration the compiler refuses
                        continue
                    if us < best[1]:
                        best = (f"BN={bn} BK={bk} split={split} warps={warps} stages={stages}", us)
    return best


def run_cuda(args: argparse.Namespace, device: torch.device) -> dict:
    from flashserve.bench.kernels import read_bandwidth, time_ms
    from flashserve.quant.packed import DEQUANT_MIN_M

    ms_list = [int(v) for v in (args.m or "1,4,16,2048").split(",")]
    shapes = _shapes(args.shapes, LLAMA_8B)
    read = read_bandwidth(args.read_gib, args.warmup_ms, args.rep_ms, device)
    rows, sweeps = [], []
    for name, (n, k) in shapes.items():
        cands = _cuda_candidates(n, k, device, args.gguf)
        for m in ms_list:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            base_us = None
            for fmt, c in cands.items():
                paths = [("fused", c["fn"])]
                if "deq" in c and m >= 256:
                    paths.append(("dequant+cuBLAS", c["deq"]))
                for path, fn in paths:
                    if fmt == "bf16":
                        path = "cuBLAS"
                    expect = x.float() @ c["dense"].t()
                    err = _rel_err(fn(x), expect)
                    bound = 0.08 if c.get("loose") else 0.02
                    if err > bound:
                        raise RuntimeError(f"{fmt} {path} at {name} M={m}: relative error {err:.3g} > {bound}")
                    us = 1e3 * time_ms(lambda: fn(x), args.warmup_ms, args.rep_ms)
                    nbytes = c["bytes"] + 2 * m * k + 2 * m * n
                    base_us = us if fmt == "bf16" else base_us
                    rows.append({"shape": name, "n": n, "k": k, "m": m, "format": fmt, "path": path, "us": us,
                                 "gb_s": nbytes / us / 1e3, "read_fraction": nbytes / us / 1e6 / read["tb_s"],
                                 "speedup_vs_bf16": base_us / us, "rel_err": err})
            if args.sweep and m <= 16:
                for fmt in ("int8", "int4-g128", "fp8"):
                    cfg, us = _sweep(fmt, x, n, k)
                    sweeps.append({"shape": name, "m": m, "format": fmt, "best_config": cfg, "us": us})
        del cands
        torch.cuda.empty_cache()
    summary = {}
    if 1 in ms_list and all(s in shapes for s in LLAMA_8B):
        for fmt in {r["format"] for r in rows}:
            t = {r["shape"]: r["us"] for r in rows if r["m"] == 1 and r["format"] == fmt and r["path"] in ("fused", "cuBLAS")}
            if len(t) == len(LLAMA_8B):
                step = LLAMA_8B_LAYERS * (t["qkv"] + t["o"] + t["gate_up"] + t["down"]) + t["lm_head"]
                summary[fmt] = {"linear_us_per_token": step, "tok_s_bound": 1e6 / step}
    return {"device": torch.cuda.get_device_name(device), "read_tb_s": read["tb_s"], "dequant_min_m": DEQUANT_MIN_M,
            "rows": rows, "decode_step_linears": summary, "sweeps": sweeps}


# ---------------------------------------------------------------------------------------------- CPU
def _best_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        iters = 0
        t0 = time.perf_counter()
        while True:
            fn()
            iters += 1
            if time.perf_counter() - t0 > 0.05:
                break
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def run_cpu(args: argparse.Namespace) -> dict:
    from flashserve.kernels import cpu_native
    from flashserve.kernels.quant_cpu import cpu_int4_matmul, cpu_int8_matmul, pack_int4_for_cpu, scale_zeros_for_cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    ms_list = [int(v) for v in (args.m or "1,4").split(",")]
    shapes = _shapes(args.shapes, {**SMOLLM2, **ONE_B})
    rows = []
    for name, (n, k) in shapes.items():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) * 0.02
        wb = w.bfloat16()
        q8, s8 = ref.quantize_int8(w)
        s8b = s8.bfloat16()
        natives = {}  # the GGUF types of SmolLM2's file through flashserve's own CPU kernel
        if k % 32 == 0 and cpu_native.available():
            natives = {q: cpu_native.split_blocks(ref.random_gguf_blocks(q, n, k, seed=1), q) for q in ("Q4_1", "Q8_0")}
        packs = {}
        for group in (32, 64, 128):
            if k % group == 0:
                u, s, z = ref.quantize_int4(w, group, zero_point=True)
                packs[group] = (pack_int4_for_cpu(u), scale_zeros_for_cpu(s, z))
        for m in ms_list:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            cands: dict[str, tuple[Callable[[], object], int]] = {
                "fp32 dense": (lambda: F.linear(x, w), 4 * n * k),
                "bf16 dense": (lambda: F.linear(xb, wb), 2 * n * k),
                "int8 (bf16 act)": (lambda: cpu_int8_matmul(xb, q8, s8b), n * k),
                "int8 (fp32 act)": (lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8), n * k),
            }
            for group, (p, sz) in packs.items():
                cands[f"int4-g{group} (bf16 act)"] = (lambda p=p, sz=sz, gr=group: cpu_int4_matmul(xb, p, gr, sz),
                                                      n * k // 2 + 4 * n * k // group)
            if 32 in packs:
                p, sz = packs[32]
                cands["int4-g32 (fp32 act)"] = (
                    lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, 32, sz.float()), n * k // 2 + 8 * n * k // 32)
            for qtype, planes in natives.items():
                cands[f"native {qtype} (int16 act)"] = (lambda w=planes, q=qtype: cpu_native.matmul(x, w, q),
                                                        n * k // 32 * cpu_native.BLOCK_BYTES[qtype])
            base = None
            for label, (fn, nbytes) in cands.items():
                us = _best_us(fn, args.repeats)
                base = us if label == "fp32 dense" else base
                rows.append({"shape": name, "n": n, "k": k, "m": m, "format": label, "us": us,
                             "gb_s": nbytes / us / 1e3, "speedup_vs_fp32": base / us})
    return {"device": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "rows": rows}


def run(args: argparse.Namespace) -> int:
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    res = run_cuda(args, device) if device.type == "cuda" else run_cpu(args)
    res["date"] = datetime.date.today().isoformat()
    res["torch"] = torch.__version__
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    if device.type == "cuda":
        print(f"{res['device']}, read bandwidth {res['read_tb_s']:.2f} TB/s, {res['date']}, torch {res['torch']}")
        for s in res["sweeps"]:
            print(f"sweep {s['format']:>10} {s['shape']:>8} M={s['m']:<5} best {s['us']:8.1f} us  {s['best_config']}")
        print(f"{'shape':>8} {'M':>5} {'format':>12} {'path':>15} {'us':>9} {'GB/s':>8} {'of read':>8} {'vs bf16':>8}")
        for r in res["rows"]:
            print(f"{r['shape']:>8} {r['m']:>5} {r['format']:>12} {r['path']:>15} {r['us']:9.1f} {r['gb_s']:8.0f} "
                  f"{r['read_fraction']:8.1%} {r['speedup_vs_bf16']:7.2f}x")
        for fmt, s in sorted(res["decode_step_linears"].items(), key=lambda kv: kv[1]["linear_us_per_token"]):
            print(f"batch-1 decode, Llama-3.1-8B linears only: {fmt:>10} {s['linear_us_per_token'] / 1e3:7.2f} ms/token "
                  f"-> at most {s['tok_s_bound']:6.0f} tok/s")
    else:
        print(f"{res['device']}, torch CPU capability {res['cpu_capability']}, {res['threads']} threads, {res['date']}")
        print(f"{'shape':>12} {'M':>3} {'format':>25} {'us':>9} {'GB/s':>7} {'vs fp32':>8}")
        for r in res["rows"]:
            print(f"{r['shape']:>12} {r['m']:>3} {r['format']:>25} {r['us']:9.1f} {r['gb_s']:7.1f} {r['speedup_vs_fp32']:7.2f}x")
    return 0
