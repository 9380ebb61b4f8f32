"""``flashserve bench moe``: the fused MoE kernel against a loop over experts, one layer.

Shapes: one MoE layer of Qwen3-30B-A3B (128 experts, top 8, hidden 2048, expert 768) and of
Mixtral-8x7B (8 experts, top 2, hidden 4096, expert 14336), bf16, routing from random router
logits (softmax, top-k, renormalised). For each token count in ``--tokens`` (default 1, 4, 16,
256, 2048): microseconds of ``fused_moe`` (the decode GEMV path up to
``DECODE_MAX_TOKENS`` tokens, the sorted grouped GEMM above) and of ``moe_loop`` (gather the
tokens of each expert, two cuBLAS matmuls, scatter-add: what a model without a fused kernel
does), the speedup, and the fused kernel's bytes (the weights of the experts hit, once, plus
activations) over its time as a share of the read bandwidth measured in the same run. The fused
output is checked against the loop before timing. Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

SHAPES = {  # name -> (experts, top-k, hidden, expert intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="1,4,16,256,2048", help="comma-separated token counts")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--read-gib", type=float, default=4.0, help="size of the bandwidth-probe tensor")
    p.add_argument("--output-json", default=None)


def run(args: argparse.Namespace) -> int:
    from flashserve.bench.kernels import read_bandwidth, time_ms
    from flashserve.kernels.fused_moe import fused_moe, moe_loop
    from flashserve.layers.moe import route

    if not torch.cuda.is_available():
        raise SystemExit("flashserve bench moe needs a CUDA device")
    device = torch.device("cuda")
    read = read_bandwidth(args.read_gib, 25, 200, device)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        E, k, H, inter = SHAPES[name]
        gen = torch.Generator(device=device).manual_seed(0)
        w13 = torch.randn(E, 2 * inter, H, device=device, dtype=torch.bfloat16, generator=gen) * H**-0.5
        w2 = torch.randn(E, H, inter, device=device, dtype=torch.bfloat16, generator=gen) * inter**-0.5
        expert_bytes = (w13[0].numel() + w2[0].numel()) * 2
        for T in tokens:
            x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)
            weights, ids = route(torch.randn(T, E, device=device, generator=gen), k)
            fused = fused_moe(x, w13, w2, weights, ids)
            ref = moe_loop(x, w13, w2, weights, ids)
            err = (fused.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
            if err > 3e-2:
                raise SystemExit(f"{name} T={T}: fused MoE differs from the loop (max relative error {err:.3g})")
            fused_ms = time_ms(lambda: fused_moe(x, w13, w2, weights, ids), 25, 100)
            loop_ms = time_ms(lambda: moe_loop(x, w13, w2, weights, ids), 25, 100)
            hit = int(torch.unique(ids).numel())
            nbytes = hit * expert_bytes + x.numel() * 2 * 2 + T * k * inter * 2 * 2
            rows.append({"shape": name, "tokens": T, "experts_hit": hit, "fused_us": fused_ms * 1e3,
                         "loop_us": loop_ms * 1e3, "speedup": loop_ms / fused_ms,
                         "fused_tb_s": nbytes / fused_ms / 1e9, "read_share": nbytes / fused_ms / 1e9 / read["tb_s"],
                         "max_rel_err": err})
        del w13, w2
        torch.cuda.empty_cache()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device), "read_tb_s": read["tb_s"], "rows": rows}
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(f"{result['device']}, read bandwidth {read['tb_s']:.2f} TB/s (x.sum over {args.read_gib} GiB)")
    print(f"{'shape':<15} {'tokens':>6} {'hit':>4} {'fused us':>9} {'loop us':>9} {'speedup':>8} {'TB/s':>6} {'of read':>8}")
    for r in rows:
        print(f"{r['shape']:<15} {r['tokens']:>6} {r['experts_hit']:>4} {r['fused_us']:>9.1f} {r['loop_us']:>9.1f} "
              f"{r['speedup']:>7.1f}x {r['fused_tb_s']:>6.2f} {r['read_share']:>8.1%}")
    at256 = [r for r in rows if r["tokens"] == 256]
    if at256:
        print("fused vs loop at 256 tokens (target >= 3x): "
              + ", ".join(f"{r['shape']} {r['speedup']:.1f}x" for r in at256))
    return 0
