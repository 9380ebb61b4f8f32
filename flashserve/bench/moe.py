"""``flashserve bench moe``: the fused MoE kernel against a loop over experts, one layer.

Shapes: one MoE layer of Qwen3-30B-A3B (128 experts, top 8, hidden 2048, expert 768) and of
Mixtral-8x7B (8 experts, top 2, hidden 4096, expert 14336), bf16 activations, routing from random
router logits (softmax, top-k, renormalised). For each token count in ``--tokens`` (default 1, 4,
16, 256, 2048) and expert format in ``--experts`` (bf16, int8, fp8: weight-only per output
channel): microseconds of ``fused_moe`` (the decode path up to ``DECODE_MAX_TOKENS`` tokens, the
sorted grouped GEMM above) called eagerly and replayed in a CUDA graph (as the engine's decode
steps run it), and of ``moe_loop`` on the bf16 weights (gather the tokens of each expert, two
cuBLAS matmuls, scatter-add: what a model without a fused kernel does), the speedup (eager
against eager), and the fused kernel's bytes (the weights of the experts hit, once, plus
activations) over its graph time as a share of the read bandwidth measured in the same run. The
graph replays several routings in turn (disjoint experts at batch 1), so the weights are not
served from L2. The fused output is checked against the loop on the same (dequantized) weights
before timing.

``--sweep`` first times candidate launch parameters for each shape (decode at ``--sweep-tokens``'
smallest count, grouped GEMM at each count above ``DECODE_MAX_TOKENS``), prints the best per shape as
``TUNED_GEMM`` / ``TUNED_GEMV`` entries of ``flashserve.kernels.fused_moe`` (to paste there), and
uses them for the table that follows. Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from flashserve.kernels.timing import graph_ms

SHAPES = {  # name -> (experts, top-k, hidden, expert intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
GRAPH_ROUTINGS = 8  # routings replayed in turn by the graph timing


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="1,4,16,256,2048", help="comma-separated token counts")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--experts", default="bf16,int8,fp8",
                   help="comma-separated expert formats for the fused kernel: bf16, int8, fp8")
    p.add_argument("--sweep", action="store_true", help="tune the launch parameters per shape first")
    p.add_argument("--sweep-tokens", default="1,256", help="token counts of the sweep: decode, grouped GEMM")
    p.add_argument("--read-gib", type=float, default=4.0, help="size of the bandwidth-probe tensor")
    p.add_argument("--output-json", default=None)


class Layer:
    """One MoE layer's random weights in every requested format, and routings to replay."""

    def __init__(self, name: str, formats: list[str], device: torch.device) -> None:
        from flashserve.quant.experts import quantize_experts

        self.name = name
        self.E, self.k, self.H, self.inter = SHAPES[name]
        gen = torch.Generator(device=device).manual_seed(0)
        self.gen = gen
        self.device = device
        w13 = torch.randn(self.E, 2 * self.inter, self.H, device=device, dtype=torch.bfloat16, generator=gen)
        w13 *= self.H**-0.5
        w2 = torch.randn(self.E, self.H, self.inter, device=device, dtype=torch.bfloat16, generator=gen)
        w2 *= self.inter**-0.5
        self.weights = {"bf16": (w13, w2, None, None)}
        for fmt in formats:
            if fmt != "bf16":
                (q13, s13), (q2, s2) = quantize_experts(w13, fmt), quantize_experts(w2, fmt)
                self.weights[fmt] = (q13, q2, s13, s2)

    def expert_bytes(self, fmt: str) -> int:
        w13, w2, s13, s2 = self.weights[fmt]
        return sum(t[0].numel() * t.element_size() for t in (w13, w2, s13, s2) if t is not None)

    def routings(self, T: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``n`` (x, weights, ids); at batch 1 each takes experts the previous ones did not."""
        from flashserve.layers.moe import route

        out = []
        perm = torch.randperm(self.E, generator=torch.Generator().manual_seed(T))
        for i in range(n):
            x = torch.randn(T, self.H, device=self.device, dtype=torch.bfloat16, generator=self.gen)
            weights, ids = route(torch.randn(T, self.E, device=self.device, generator=self.gen), self.k)
            if T == 1:
                start = (i * self.k) % self.E
                ids = perm[start:start + self.k].view(1, self.k).to(self.device)
            out.append((x, weights, ids))
        return out


def sweep(layer: Layer, tokens: list[int], fmt: str = "bf16") -> dict:
    """Time candidate launches; install the best in the tuned tables; return what was found."""
    from flashserve.kernels import fused_moe as fm

    w13, w2, s13, s2 = layer.weights[fmt]
    key3 = (layer.E, layer.H, layer.inter)
    found: dict = {"shape": layer.name}
    T = min(tokens)
    cases = layer.routings(T, GRAPH_ROUTINGS)

    def decode_us(cfg: tuple) -> float:
        calls = [lambda c=c: fm.fused_moe(c[0], w13, w2, c[1], c[2], s13, s2, gemv=cfg) for c in cases]
        return graph_ms(calls) * 1e3

    heuristic = fm.gemv_configs(T, layer.k, layer.E, layer.H, layer.inter, layer.device)
    base_us = decode_us(heuristic)
    gu_best, dn = heuristic
    best_us = base_us
    for gu in GEMV_CANDIDATES:  # gate/up first, with the heuristic down launch
        us = decode_us((gu, dn))
        if us < best_us:
            gu_best, best_us = gu, us
    dn_best = dn
    tile = fm.next_power_of_2(layer.k)  # the down launch holds the token's k experts' tiles at once
    for cand in [c for c in DOWN_CANDIDATES if tile * c.block_n * c.block_k <= 2 * fm.DOWN_TILE * c.num_warps // 4]:
        us = decode_us((gu_best, cand))
        if us < best_us:
            dn_best, best_us = cand, us
    fm.TUNED_GEMV[key3] = (gu_best, dn_best)
    found["decode"] = {"tokens": T, "heuristic_us": base_us, "best_us": best_us,
                       "entry": f"{key3}: ({gu_best!r}, {dn_best!r}),"}

    found["gemm"] = [_sweep_gemm(layer, T, w13, w2, s13, s2) for T in tokens if T > fm.DECODE_MAX_TOKENS]
    return found


def _sweep_gemm(layer: Layer, T: int, w13, w2, s13, s2) -> dict:
    from flashserve.bench.kernels import time_ms
    from flashserve.kernels import fused_moe as fm

    x, weights, ids = layer.routings(T, 1)[0]
    bucket = fm.rows_bucket(T * layer.k, layer.E)
    key4 = (layer.E, layer.H, layer.inter, bucket)
    fm.TUNED_GEMM.pop(key4, None)
    heuristic_cfg = fm.gemm_config(T * layer.k, layer.E, layer.H, layer.inter)

    def gemm_us(cfg: fm.GemmConfig) -> float:
        return time_ms(lambda: fm.fused_moe(x, w13, w2, weights, ids, s13, s2, gemm=cfg), 10, 40) * 1e3

    base = gemm_us(heuristic_cfg)
    best_cfg, best = heuristic_cfg, base
    for cfg in GEMM_CANDIDATES:
        try:
            us = gemm_us(cfg)
        except Exception as e:  # a launch the device cannot hold (shared memory): skip it
            print(f"  {layer.name} T={T} {cfg}: {type(e).__name__}")
            continue
        if us < best:
            best_cfg, best = cfg, us
    fm.TUNED_GEMM[key4] = best_cfg
    return {"tokens": T, "heuristic_us": base, "best_us": best, "entry": f"{key4}: {best_cfg!r},"}


def _candidates() -> tuple[list, list]:
    from flashserve.kernels.fused_moe import GemmConfig, GemvConfig

    gemm = [GemmConfig(*c) for c in [
        (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
        (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3)]]
    gemv = [GemvConfig(*c) for c in [
        (8, 256, 4), (8, 512, 4), (16, 128, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 4),
        (32, 256, 8), (64, 128, 8)]]
    down = [GemvConfig(*c) for c in [
        (4, 128, 4), (4, 256, 4), (8, 64, 4), (8, 128, 4), (8, 256, 4), (8, 512, 4), (16, 64, 4), (16, 128, 4),
        (16, 128, 8), (16, 256, 8), (32, 64, 8), (8, 1024, 8)]]
    return gemm, gemv, down


GEMM_CANDIDATES, GEMV_CANDIDATES, DOWN_CANDIDATES = _candidates()


def run(args: argparse.Namespace) -> int:
    from flashserve.bench.kernels import read_bandwidth, time_ms
    from flashserve.kernels.fused_moe import DECODE_MAX_TOKENS, dequantize_experts, fused_moe, moe_loop

    if not torch.cuda.is_available():
        raise SystemExit("flashserve bench moe needs a CUDA device")
    device = torch.device("cuda")
    formats = args.experts.split(",")
    for fmt in formats:
        if fmt not in ("bf16", "int8", "fp8"):
            raise SystemExit(f"unknown expert format {fmt!r}; known: bf16, int8, fp8")
    read = read_bandwidth(args.read_gib, 25, 200, device)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows, found = [], []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        layer = Layer(name, formats, device)
        if args.sweep:
            found.append(sweep(layer, [int(t) for t in args.sweep_tokens.split(",")]))
        w13, w2 = layer.weights["bf16"][:2]
        for T in tokens:
            cases = layer.routings(T, GRAPH_ROUTINGS if T <= DECODE_MAX_TOKENS else 1)
            x, weights, ids = cases[0]
            loop_ms = time_ms(lambda: moe_loop(x, w13, w2, weights, ids), 25, 100)
            for fmt in formats:
                q13, q2, s13, s2 = layer.weights[fmt]
                fused = fused_moe(x, q13, q2, weights, ids, s13, s2)
                ref = moe_loop(x, dequantize_experts(q13, s13, torch.bfloat16),
                               dequantize_experts(q2, s2, torch.bfloat16), weights, ids)
                err = (fused.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                if err > 3e-2:
                    raise SystemExit(f"{name} T={T} {fmt}: fused MoE differs from the loop (max relative error {err:.3g})")
                fused_ms = time_ms(lambda: fused_moe(x, q13, q2, weights, ids, s13, s2), 25, 100)
                graph = graph_ms([lambda c=c: fused_moe(c[0], q13, q2, c[1], c[2], s13, s2) for c in cases])
                hit = int(torch.unique(ids).numel())
                nbytes = hit * layer.expert_bytes(fmt) + x.numel() * 2 * 2 + T * layer.k * layer.inter * 2 * 2
                rows.append({"shape": name, "tokens": T, "experts": fmt, "experts_hit": hit, "fused_us": fused_ms * 1e3,
                             "fused_graph_us": graph * 1e3, "loop_us": loop_ms * 1e3, "speedup": loop_ms / fused_ms,
                             "fused_tb_s": nbytes / graph / 1e9, "read_share": nbytes / graph / 1e9 / read["tb_s"],
                             "max_rel_err": err})
        del layer
        torch.cuda.empty_cache()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device), "read_tb_s": read["tb_s"], "sweep": found, "rows": rows}
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    if found:
        print("best launches per shape (bf16; paste into flashserve/kernels/fused_moe.py):")
        for f in found:
            for table, r in [("TUNED_GEMV", f["decode"])] + [("TUNED_GEMM", g) for g in f["gemm"]]:
                print(f"  {table}  {r['entry']:<72} # {f['shape']} T={r['tokens']}: {r['best_us']:.1f} us, "
                      f"heuristic {r['heuristic_us']:.1f} us")
    print(f"{result['device']}, read bandwidth {read['tb_s']:.2f} TB/s (x.sum over {args.read_gib} GiB); "
          "loop on bf16 experts; speedup eager vs eager; TB/s over the graph time")
    print(f"{'shape':<15} {'tokens':>6} {'experts':>7} {'hit':>4} {'fused us':>9} {'graph us':>9} {'loop us':>9} "
          f"{'speedup':>8} {'TB/s':>6} {'of read':>8}")
    for r in rows:
        print(f"{r['shape']:<15} {r['tokens']:>6} {r['experts']:>7} {r['experts_hit']:>4} {r['fused_us']:>9.1f} "
              f"{r['fused_graph_us']:>9.1f} {r['loop_us']:>9.1f} {r['speedup']:>7.1f}x {r['fused_tb_s']:>6.2f} "
              f"{r['read_share']:>8.1%}")
    at256 = [r for r in rows if r["tokens"] == 256]
    if at256:
        print("fused vs bf16 loop at 256 tokens (target >= 3x): "
              + ", ".join(f"{r['shape']} {r['experts']} {r['speedup']:.1f}x" for r in at256))
    return 0
