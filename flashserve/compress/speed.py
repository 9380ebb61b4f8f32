"""``flashserve bench compress``: the speed 2:4 sparsity and low rank buy, against dense, same run.

Defaults: Llama-3.1-8B shapes with dummy bf16 weights (speed does not depend on the values).
Two tables:

1. GEMM: each decoder linear shape (fused qkv, o, fused gate/up, down) at M = 1 ... 4096 rows:
   dense ``F.linear``, the 2:4 kernel (``to_sparse_semi_structured``, forced on at every M to show
   where it starts to pay) and the two thin linears of low rank at the given parameter shares.
2. Model: the whole engine with every decoder linear swapped (2:4: magnitude-pruned, the sparse
   kernel used from ``PREFILL_ROWS`` rows, i.e. prefill, although the loader leaves it off since
   it did not pay; low rank: random factors of
   the rank a parameter share gives), CUDA graphs captured after the swap: prefill time of one
   prompt (prefix caching off) and batch-1 decode tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.cli import add_engine_arguments, llm_kwargs
from flashserve.compress.layers import set_low_rank, set_semi_structured
from flashserve.layers.linear import Linear

PREFILL_ROWS = 1024  # the 2:4 variant uses the sparse kernel from this many rows (prefill only)


def lowrank_rank(out_f: int, in_f: int, share: float) -> int:
    """Rank whose two factors hold ``share`` of the dense matrix's parameters."""
    return max(1, min(out_f, in_f, math.floor(share * out_f * in_f / (out_f + in_f))))


@torch.no_grad()
def to_variant(model: nn.Module, variant: str, seed: int = 0) -> None:
    """Change every decoder linear in place: ``dense`` (nothing), ``2:4`` (magnitude 2:4 pruning, then
    the 2:4 method, with its kernel where one exists), ``lowrank-S`` (random factors at parameter
    share S). The layers keep their names; only their ``quant_method`` and weights change."""
    from flashserve.compress.prune import mask_2_4

    if variant == "dense":
        return
    if variant == "2:4":
        for name, m in model.named_modules():
            if isinstance(m, Linear) and ".layers." in name:
                m.weight.mul_(mask_2_4(m.weight.abs()))
                set_semi_structured(m, PREFILL_ROWS)
        return
    if not variant.startswith("lowrank-"):
        raise ValueError(f"unknown variant {variant!r}; expected dense, 2:4 or lowrank-<share>")
    share = float(variant.removeprefix("lowrank-"))
    if not 0 < share <= 1:
        raise ValueError(f"low-rank parameter share must be in (0, 1], got {share}")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear) and ".layers." in name:
            w = m.weight
            r = lowrank_rank(m.out_features, m.in_features, share)
            # Random factors scaled so that B @ A has the dense weights' spread.
            a = torch.empty(r, m.in_features, device=w.device, dtype=w.dtype).normal_(0.0, 1.0 / math.sqrt(r), generator=gen)
            b = torch.empty(m.out_features, r, device=w.device, dtype=w.dtype).normal_(0.0, float(w.float().std()), generator=gen)
            set_low_rank(m, a, b)


def gemm_table(shapes: dict[str, tuple[int, int]], rows: list[int], shares: list[float], dtype: torch.dtype,
               device: torch.device) -> list[dict[str, Any]]:
    """Median ms of dense, 2:4 and low-rank products for each weight shape and row count."""
    from flashserve.compress.prune import mask_2_4
    from flashserve.kernels.timing import time_fn

    out = []
    for name, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02
        w24 = w * mask_2_4(w.abs())
        sparse = None
        if device.type == "cuda":
            from torch.sparse import to_sparse_semi_structured

            sparse = to_sparse_semi_structured(w24)
        factors = {s: (torch.randn(lowrank_rank(out_f, in_f, s), in_f, device=device, dtype=dtype),
                       torch.randn(out_f, lowrank_rank(out_f, in_f, s), device=device, dtype=dtype)) for s in shares}
        for m in rows:
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            row: dict[str, Any] = {"matrix": name, "shape": [out_f, in_f], "rows": m,
                                   "dense_ms": time_fn(lambda: F.linear(x, w), device=device)}
            if sparse is not None:
                row["2:4_ms"] = time_fn(lambda: F.linear(x, sparse), device=device)
            for s, (a, b) in factors.items():
                row[f"lowrank-{s}_ms"] = time_fn(lambda: F.linear(F.linear(x, a), b), device=device)
            out.append(row)
        del w, w24, sparse, factors
    return out


def sparse_bytes(model: nn.Module) -> int:
    """Device bytes of the compressed 2:4 copies (kept besides the dense weights)."""
    total = 0
    for m in model.modules():
        t = getattr(m, "sparse", None)
        if t is not None:
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names if getattr(t, n) is not None)
    return total


def model_speed(kwargs: dict[str, Any], variant: str, prompt_lens: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Prefill ms per prompt length and batch-1 decode tok/s of the engine with ``variant`` linears."""
    from flashserve import LLM, SamplingParams

    llm = LLM(**{**kwargs, "enable_prefix_caching": False, "executor": "inproc"}, verbose=False)
    engine = llm.engine
    worker = engine.worker
    to_variant(worker.model, variant)
    if worker.graphs is not None:
        worker.graphs.capture()  # the graphs of the dense layers replay the old kernels: capture again
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    res: dict[str, Any] = {"variant": variant, "weight_gib": sum(p.numel() * p.element_size() for p in worker.model.parameters()) / 2**30,
                           "sparse_copy_gib": sparse_bytes(worker.model) / 2**30}
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for n in prompt_lens:
        prompt = [rng.randrange(100, vocab) for _ in range(n)]
        llm.generate([prompt], one, use_tqdm=False)  # warm-up (and the 2:4 kernel's first call)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.generate([prompt], one, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        res[f"prefill_{n}_ms"] = statistics.median(times) * 1e3
    prompt = [rng.randrange(100, vocab) for _ in range(128)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    tpots = [llm.generate([prompt], params, use_tqdm=False)[0].metrics.time_per_output_token(new_tokens) for _ in range(repeats)]
    res["decode_tok_s"] = 1.0 / statistics.median(tpots)
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.set_defaults(model="llama-3.1-8b", load_format="dummy", max_model_len=8192, max_num_seqs=8, kv_cache_bytes=4 << 30)
    p.add_argument("--variants", default="dense,2:4,lowrank-0.6,lowrank-0.4")
    p.add_argument("--prompt-lens", default="1024,4096", help="prefill lengths (tokens), comma-separated")
    p.add_argument("--gemm-rows", default="1,16,256,1024,4096", help="rows (tokens) of the GEMM table")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM table")
    p.add_argument("--output-json", default=None)


def run(args: argparse.Namespace) -> int:
    from flashserve.runner.worker import resolve_device, resolve_dtype
    from flashserve.loader import load_model_config

    kwargs = llm_kwargs(args)
    variants = [v for v in args.variants.split(",") if v]
    prompt_lens = [int(n) for n in args.prompt_lens.split(",") if n]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = load_model_config(args.model, args.load_format)
    shares = [float(v.removeprefix("lowrank-")) for v in variants if v.startswith("lowrank-")]
    res: dict[str, Any] = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d")}
    if not args.no_gemm:
        q = cfg.num_heads * cfg.head_dim
        shapes = {"qkv": (q + 2 * cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size), "o": (cfg.hidden_size, q),
                  "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size)}
        res["gemm"] = gemm_table(shapes, [int(m) for m in args.gemm_rows.split(",") if m], shares, dtype, device)
    res["model_runs"] = [model_speed(kwargs, v, prompt_lens, args.new_tokens, args.repeats) for v in variants]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    if "gemm" in res:
        cols = [k for k in res["gemm"][0] if k.endswith("_ms") and k != "dense_ms"]
        print("| matrix | rows | dense ms | " + " | ".join(f"{c[:-3]} (x dense)" for c in cols) + " |")
        print("|---|---|---|" + "---|" * len(cols))
        for r in res["gemm"]:
            print(f"| {r['matrix']} {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | {r['dense_ms']:.3f} | "
                  + " | ".join(f"{r[c]:.3f} ({r['dense_ms'] / r[c]:.2f}x)" for c in cols) + " |")
    dense = next((r for r in res["model_runs"] if r["variant"] == "dense"), None)
    print(f"\n{res['model']} ({res['dtype']}, {res['device']}, {res['date']})")
    print("| variant | weights GiB (+ 2:4 copy) | " + " | ".join(f"prefill {n} ms" for n in prompt_lens) + " | decode tok/s |")
    print("|---|---|" + "---|" * len(prompt_lens) + "---|")
    for r in res["model_runs"]:
        def rel(key: str, inverse: bool = False) -> str:
            if dense is None or r is dense:
                return ""
            x = dense[key] / r[key] if not inverse else r[key] / dense[key]
            return f" ({x:.2f}x)"
        copy = f" (+{r['sparse_copy_gib']:.2f})" if r["sparse_copy_gib"] else ""
        print(f"| {r['variant']} | {r['weight_gib']:.2f}{copy} | "
              + " | ".join(f"{r[f'prefill_{n}_ms']:.1f}{rel(f'prefill_{n}_ms')}" for n in prompt_lens)
              + f" | {r['decode_tok_s']:.1f}{rel('decode_tok_s', inverse=True)} |")
    return 0
