"""``flashserve bench gemv``: the batch-1 GEMV tiles of one model's products, swept on this device.

For each product of a decode step of ``--model`` (a bundled config: qkv, o, gate/up, the down
projection with SiLU-and-mul folded in, the LM head; mixtures of experts only the attention
products and the LM head, their experts run the fused MoE kernel) and each format in
``--formats`` (bf16: ``dense_gemv``; int8 / fp8 per channel and int4 with groups of 128:
``quant_gemv.wq_gemv``), it times the tile the fixed rules pick (``dense_gemv_config``,
``gemv_config``) and every candidate tile that divides the shape. Calls are timed in a CUDA graph
over distinct copies of the weight (at least 256 MiB in all, five times the H100's and H200's
50 MB L2, so each call reads device memory and the launch boundaries of a decode step are in the
time), and reported as us per call and as a share of the read bandwidth measured in the same run
(``x.sum()``).
Each candidate's output is checked against the dequantized reference before it is timed. The
table gives, per (format, product), the rule's tile and the fastest one; ``--output-json`` keeps
every timing, for revising the rules on a new device. The random weights are codes drawn
uniformly, so the timings do not depend on a quantizer.

On CPU (Triton's interpreter, ``TRITON_INTERPRET=1``; ``--shapes`` with small products) the same
checks run and the times are wall clock: useful only to test the sweep itself.

``--sass`` needs no GPU and no interpreter: it compiles the rule's tile of every product for sm_90
(``kernels.sass``) and reports the kernel's hottest loop: instructions per thread and iteration,
warp instructions per 1,000 weights, barriers and shared-memory stores in it, and registers per
thread (which bound the programs an SM holds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashserve.kernels import quant_reference as ref
from flashserve.kernels.dense_gemv import dense_gemv, dense_gemv_config
from flashserve.kernels.quant_gemm import FMT_DENSE, FMT_FP8, FMT_INT4, FMT_INT8
from flashserve.kernels.quant_gemv import GemvConfig, gemv_config, wq_gemv
from flashserve.kernels.utils import is_interpreter, num_sms

FORMATS = {"bf16": FMT_DENSE, "int8": FMT_INT8, "int4": FMT_INT4, "fp8": FMT_FP8}
INT4_GROUP = 128
CHAIN_BYTES = 256 << 20  # weights per timed graph, at least (CUDA)
TILE_ELEMS = (2048, 32768)  # candidate tiles hold this many weights per step, at least / at most


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu needs TRITON_INTERPRET=1)")
    p.add_argument("--model", default="llama-3.1-8b", help="a bundled config whose products are swept")
    p.add_argument("--shapes", default=None, help="name=NxK[:gated],... instead of the model's products")
    p.add_argument("--formats", default="bf16,int8,fp8,int4", help=f"comma-separated, of {', '.join(FORMATS)}")
    p.add_argument("--replays", type=int, default=5, help="CUDA: graph replays timed per candidate")
    p.add_argument("--output-json", default=None)
    p.add_argument("--sass", action="store_true",
                   help="compile each rule tile for sm_90 and profile its loop (no GPU; TRITON_INTERPRET unset)")


def model_products(name: str) -> dict[str, tuple[int, int, bool]]:
    """``{product: (N, K, gated)}`` of one decode step of a bundled config."""
    from flashserve.loader import bundled_config_names, load_model_config

    if name not in bundled_config_names():
        raise ValueError(f"no bundled config {name!r}; known: {', '.join(bundled_config_names())}")
    c = load_model_config(name, "dummy")
    hidden, q_width = c.hidden_size, c.num_heads * c.head_dim
    out = {"qkv": (q_width + 2 * c.num_kv_heads * c.head_dim, hidden, False), "o": (hidden, q_width, False)}
    if not c.num_experts:
        out |= {"gate_up": (2 * c.intermediate_size, hidden, False), "down": (hidden, c.intermediate_size, True)}
    out["lm_head"] = (c.vocab_size, hidden, False)
    return out


def parse_shapes(text: str) -> dict[str, tuple[int, int, bool]]:
    out = {}
    for part in text.split(","):
        try:
            name, spec = part.split("=")
            nk, _, flag = spec.lower().partition(":")
            n, k = (int(v) for v in nk.split("x"))
        except ValueError:
            raise ValueError(f"--shapes takes name=NxK[:gated],..., got {part!r}") from None
        if flag not in ("", "gated"):
            raise ValueError(f"--shapes: the only flag is ':gated', got {part!r}")
        out[name] = (n, k, flag == "gated")
    return out


def candidates(fmt: int, n: int, k: int, device: torch.device) -> list[GemvConfig]:
    """Every tile of the searched family that divides ``N x K`` (int4: K in 2^a slices of whole groups)."""
    lo, hi = TILE_ELEMS
    out = []
    if fmt == FMT_INT4:
        for bn in (8, 16, 32, 64):
            for ks in (128, 256, 512, 1024, 2048):
                split = k // ks
                if n % bn or k % ks or ks % INT4_GROUP or split > 64 or not lo <= bn * ks <= 4 * hi:
                    continue
                warps = min(4, max(1, bn * ks // 8192))
                for per_sm in (2, 4, 8):
                    out.append(GemvConfig(bn, ks, split, warps, 1, max(1, min(n // bn, per_sm * num_sms(device) // split))))
        return sorted(set(out))
    for bn in (2, 4, 8, 16, 32, 64):
        for bk in (256, 512, 1024, 2048, 4096):
            splits = (1,) if fmt == FMT_DENSE or k < 8192 else (1, 2, 4, 8)
            for split in splits:
                if n % bn or k % (split * bk) or not lo <= bn * bk <= hi:
                    continue
                for warps in (4, 8):
                    out.append(GemvConfig(bn, bk, split, warps, 3))
    return out


def weights(fmt: int, n: int, k: int, device: torch.device, gen: torch.Generator) -> tuple[tuple, torch.Tensor]:
    """(the kernel's operands, the dequantized fp32 weight) of random codes."""
    if fmt == FMT_DENSE:
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        return (w,), w.float()
    scales = torch.rand(n, generator=gen, device=device) * 0.002 + 0.001
    if fmt == FMT_INT8:
        q = torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8)
        return (q, scales, None), ref.dequantize_int8(q, scales)
    if fmt == FMT_FP8:
        q = (torch.randn(n, k, generator=gen, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        return (q, scales, None), ref.dequantize_fp8(q, scales)
    u = torch.randint(0, 16, (n, k), generator=gen, device=device, dtype=torch.uint8)
    packed = ref.pack_int4(u)
    group_scales = torch.rand(n, k // INT4_GROUP, generator=gen, device=device) * 0.004 + 0.001
    return (packed, group_scales, None), ref.dequantize_int4(packed, group_scales, None, INT4_GROUP)


def tile_name(cfg: GemvConfig) -> str:
    """``rows x columns [/ K slices] w warps [s stages] [p programs]``."""
    text = f"{cfg.block_n}x{cfg.block_k}" + (f"/{cfg.split_k}" if cfg.split_k > 1 else "") + f" w{cfg.num_warps}"
    return text + (f" p{cfg.programs}" if cfg.programs else f" s{cfg.num_stages}")


def _group(fmt: int) -> int:
    return INT4_GROUP if fmt == FMT_INT4 else 0


def rule_tile(fmt: int, n: int, k: int, gated: bool, device: torch.device) -> GemvConfig | None:
    """The tile the fixed rules pick for this product, or None where the GEMV declines it."""
    return dense_gemv_config(n, k, device, gated) if fmt == FMT_DENSE else gemv_config(n, k, fmt, _group(fmt), device)


def _call(fmt: int, x: torch.Tensor, ops: tuple, gated: bool, cfg: GemvConfig | None) -> torch.Tensor | None:
    if fmt == FMT_DENSE:
        return dense_gemv(x, ops[0], gated=gated, config=cfg)
    return wq_gemv(x, *ops, fmt, _group(fmt), cfg, gated=gated)


def _time_us(calls: list[Callable[[], object]], device: torch.device, replays: int) -> float:
    if device.type == "cuda":
        from flashserve.kernels.timing import graph_ms

        return 1e3 * graph_ms(calls, replays)
    from flashserve.kernels.timing import time_fn

    return 1e3 * time_fn(calls[0], warmup=1, iters=3, device=device)


def sweep_product(fmt_name: str, n: int, k: int, gated: bool, device: torch.device, replays: int) -> dict | None:
    """The rule's tile and every candidate for one product, or None where the GEMV declines it."""
    fmt = FORMATS[fmt_name]
    rule = rule_tile(fmt, n, k, gated, device)
    if rule is None:
        return None
    gen = torch.Generator(device=device).manual_seed(n * 31 + k)
    ops, dense = weights(fmt, n, k, device, gen)
    x = torch.randn(1, 2 * k if gated else k, generator=gen, device=device).to(torch.bfloat16)
    xf = F.silu(x[:, :k].float()).to(x.dtype).float() * x[:, k:].float() if gated else x.float()
    expect = xf @ dense.t()
    del dense
    nbytes = sum(t.numel() * t.element_size() for t in ops if t is not None)
    copies = max(2, min(64, math.ceil(CHAIN_BYTES / nbytes))) if device.type == "cuda" else 1
    chain = [ops] + [tuple(t.clone() if t is not None else None for t in ops) for _ in range(copies - 1)]
    timings = []
    for cfg in [rule] + [c for c in candidates(fmt, n, k, device) if c != rule]:
        out = _call(fmt, x, ops, gated, cfg)
        err = float((out.float() - expect).norm() / expect.norm())
        if not err < 2e-2:
            raise RuntimeError(f"{fmt_name} {n}x{k} tile {tuple(cfg)}: relative error {err:.3g} against the "
                               "dequantized reference")
        us = _time_us([lambda o=o: _call(fmt, x, o, gated, cfg) for o in chain], device, replays)
        timings.append({"tile": list(cfg), "name": tile_name(cfg), "us": us, "rel_err": err})
    best = min(timings, key=lambda t: t["us"])
    return {"format": fmt_name, "n": n, "k": k, "gated": gated, "bytes": nbytes, "rule": timings[0],
            "best": best, "speedup": timings[0]["us"] / best["us"], "timings": timings}


def empty_operands(fmt: int, n: int, k: int) -> tuple:
    """The kernel's operands for an ``N x K`` product, allocated and not filled (CPU)."""
    if fmt == FMT_DENSE:
        return (torch.empty(n, k, dtype=torch.bfloat16),)
    if fmt == FMT_INT4:
        return (torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(n, k // INT4_GROUP), None)
    return (torch.empty(n, k, dtype=torch.int8 if fmt == FMT_INT8 else torch.float8_e4m3fn), torch.empty(n), None)


def sass_product(fmt_name: str, n: int, k: int, gated: bool, arch: int = 90) -> dict | None:
    """The loop profile (``kernels.sass``) of the rule's tile for one product compiled for ``arch``,
    or None where the GEMV declines it."""
    from flashserve.kernels import dense_gemv as dense_module, quant_gemv as quant_module, sass

    fmt = FORMATS[fmt_name]
    cpu = torch.device("cpu")
    rule = rule_tile(fmt, n, k, gated, cpu)
    if rule is None:
        return None
    module, name = ((dense_module, "_gemv_dense_kernel") if fmt == FMT_DENSE else
                    (quant_module, "_gemv_int4_kernel" if fmt == FMT_INT4 else "_gemv_byte_kernel"))
    x = torch.empty(1, 2 * k if gated else k, dtype=torch.bfloat16)
    with sass.captured_launches(module, name) as launches:
        _call(fmt, x, empty_operands(fmt, n, k), gated, rule)
    prof = sass.profile_launch(launches[0], arch)
    if prof is None:
        return {"format": fmt_name, "n": n, "k": k, "gated": gated, "tile": tile_name(rule), "loop": None}
    per_kilo = prof.instructions * rule.num_warps * 1000 / (rule.block_n * rule.block_k)
    return {"format": fmt_name, "n": n, "k": k, "gated": gated, "tile": tile_name(rule),
            "loop": {"instructions": prof.instructions, "warp_instructions_per_1k_weights": per_kilo,
                     "barriers": prof.barriers, "shared_stores": prof.shared_stores,
                     "registers": prof.registers, "opcodes": dict(prof.opcodes.most_common())}}


def _run_sass(fmts: list[str], products: dict, output_json: str | None) -> int:
    if is_interpreter():
        raise SystemExit("bench gemv --sass compiles the kernels for sm_90: unset TRITON_INTERPRET")
    rows = []
    for fmt in fmts:
        for name, (n, k, gated) in products.items():
            row = sass_product(fmt, n, k, gated)
            if row is None:
                print(f"{fmt:5s} {name:8s} {n}x{k}: no batch-1 GEMV tile divides it")
                continue
            row["product"] = name
            rows.append(row)
            loop = row["loop"]
            if loop is None:
                print(f"{fmt:5s} {name:8s} {n:>6}x{k:<6} {row['tile']:16s} no loop in the kernel")
                continue
            print(f"{fmt:5s} {name:8s} {n:>6}x{k:<6} {row['tile']:16s} loop {loop['instructions']:5d} instructions, "
                  f"{loop['warp_instructions_per_1k_weights']:6.1f} warp instr / 1k weights, "
                  f"{loop['barriers']} barriers, {loop['shared_stores']} shared stores, {loop['registers']} registers",
                  flush=True)
    if output_json:
        with open(output_json, "w") as f:
            json.dump({"target": "sm_90", "date": datetime.date.today().isoformat(), "rows": rows}, f, indent=1)
    return 0


def run(args: argparse.Namespace) -> int:
    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise SystemExit(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    try:
        products = parse_shapes(args.shapes) if args.shapes else model_products(args.model)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.sass:
        return _run_sass(fmts, products, args.output_json)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    if device.type == "cpu" and not is_interpreter():
        raise SystemExit("bench gemv on CPU runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    read_tb_s = None
    if device.type == "cuda":
        from flashserve.bench.kernels import read_bandwidth

        read_tb_s = read_bandwidth(4.0, 25.0, 100.0, device)["tb_s"]
    rows = []
    for fmt in fmts:
        for name, (n, k, gated) in products.items():
            row = sweep_product(fmt, n, k, gated, device, args.replays)
            if row is None:
                print(f"{fmt:5s} {name:8s} {n}x{k}: no batch-1 GEMV tile divides it (F.linear / the flat GEMM runs)")
                continue
            row["product"] = name
            rows.append(row)
            share = lambda us: "" if read_tb_s is None else f" {row['bytes'] / us / 1e6 / read_tb_s:6.1%}"  # noqa: E731
            print(f"{fmt:5s} {name:8s} {n:>6}x{k:<6} rule {row['rule']['name']:16s} "
                  f"{row['rule']['us']:9.2f} us{share(row['rule']['us'])} | best {row['best']['name']:16s} "
                  f"{row['best']['us']:9.2f} us{share(row['best']['us'])} ({row['speedup']:.3f}x, "
                  f"{len(row['timings'])} tiles)", flush=True)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
           "read_tb_s": read_tb_s, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "model": None if args.shapes else args.model, "rows": rows}
    print(f"{res['device']}" + (f", read bandwidth {read_tb_s:.2f} TB/s" if read_tb_s else "")
          + f", {res['date']}, torch {res['torch']}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
