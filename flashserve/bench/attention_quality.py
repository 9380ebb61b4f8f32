"""``flashserve bench attention-quality``: perplexity of each attention kind against its KV budget
on real text (Debian's license texts, concatenated), one engine for every method.

The model is loaded once; for each method the layers the model gives full attention get that
method's ``AttentionSpec`` (its own windowed layers, e.g. Gemma 3's local ones, keep theirs) and
the text is scored teacher-forced through the paged cache (``LLMEngine.score``). Reported per
method: the share of the context each query attends to or keeps, averaged over positions (the
KV budget), perplexity, its change against full attention, and top-1 agreement with it.

Methods (comma separated): ``full``, ``sliding:W``, ``sinks:W:N`` (window + N sinks),
``dilated:W:D:N`` (window of W keys every D-th, N sinks), ``h2o:R[:N]``, ``quest:R[:N]``
(budget R in (0, 1], N sinks), ``lsh:B[:W]`` (B buckets, local window W, default 64).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from flashserve.bench import cpu_model
from flashserve.config import AttentionSpec

DEFAULT_METHODS = ("full,sliding:1024,sinks:1024:4,dilated:512:2:4,h2o:0.1,h2o:0.2,h2o:0.5,"
                   "quest:0.1,quest:0.2,quest:0.5,lsh:4,lsh:8,lsh:16")


def parse_method(text: str) -> AttentionSpec:
    """One method of the --methods list as an AttentionSpec (ValueError naming a bad one)."""
    name, *args = text.split(":")
    try:
        nums = [float(a) for a in args]
        if name == "full" and not nums:
            return AttentionSpec()
        if name == "sliding" and len(nums) == 1:
            return AttentionSpec("sliding", int(nums[0]))
        if name == "sinks" and len(nums) == 2:
            return AttentionSpec("sliding", int(nums[0]), num_sinks=int(nums[1]))
        if name == "dilated" and len(nums) == 3:
            return AttentionSpec("sliding", int(nums[0]), dilation=int(nums[1]), num_sinks=int(nums[2]))
        if name in ("h2o", "quest") and len(nums) in (1, 2):
            return AttentionSpec(name, kv_budget=nums[0], num_sinks=int(nums[1]) if len(nums) > 1 else 0)
        if name == "lsh" and len(nums) in (1, 2):
            return AttentionSpec("lsh", sliding_window=int(nums[1]) if len(nums) > 1 else 64, num_buckets=int(nums[0]))
    except ValueError as e:
        raise ValueError(f"bad attention method {text!r}: {e}") from e
    raise ValueError(f"bad attention method {text!r}; see `flashserve bench attention-quality --help`")


def budget(spec: AttentionSpec, num_tokens: int, block_size: int) -> float:
    """Mean over positions of the share of its context a query attends to (lsh: expected)."""
    total = 0.0
    for p in range(num_tokens):
        n = p + 1
        if spec.kind == "sliding":
            seen = min(n, spec.sliding_window * spec.dilation) / spec.dilation
            seen += min(spec.num_sinks, max(0, n - spec.span))
        elif spec.kind == "h2o":
            seen = min(n, max(math.ceil(spec.kv_budget * n), spec.num_sinks + 1))
        elif spec.kind == "quest":
            pages = -(-n // block_size)
            seen = min(n, max(math.ceil(spec.kv_budget * pages), 1) * block_size)
        elif spec.kind == "lsh":
            local = min(n, spec.sliding_window)
            seen = local + (n - local) / spec.num_buckets
        else:
            seen = n
        total += min(seen, n) / n
    return total / num_tokens


def set_attention(model: torch.nn.Module, base: list[AttentionSpec], spec: AttentionSpec) -> None:
    """Give ``spec`` to the attention layers whose model spec is full attention."""
    from flashserve.layers.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer, own in zip(layers, base):
        layer.spec = replace(spec, rope_theta=own.rope_theta) if own.kind == "full" else own
    for layer in layers:
        if hasattr(layer.backend, "side_states"):
            from flashserve.layers.sparse_attention import SideStates

            layer.backend.side_states = SideStates()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods (see the module doc)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens of text (default: the model's context - 1)")
    p.add_argument("--chunk-size", type=int, default=64, help="tokens per teacher-forced step (h2o evicts per step)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="write perplexity against KV budget to this image (needs matplotlib)")
    p.add_argument("--from-json", nargs="+", default=None,
                   help="plot / tabulate earlier --output-json files (one per model) instead of running")


def plot(runs: list[dict], path: str) -> None:
    """Perplexity against KV budget, one panel per model, one series per attention kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        full = next(r["perplexity"] for r in run["results"] if r["kind"] == "full")
        series: dict[str, list[dict]] = {}
        for r in run["results"]:
            label = r["method"].split(":")[0]
            series.setdefault(label, []).append(r)
        for label, rows in series.items():
            rows.sort(key=lambda r: r["kv_budget"])
            ax.plot([r["kv_budget"] for r in rows], [r["perplexity"] for r in rows], "o-" if len(rows) > 1 else "o",
                    label=label)
        ax.axhline(full, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("KV budget (share of the context attended)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{Path(run['model']).name}, {run['tokens']} tokens ({run['device']})")  # the file, not its folder
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: list[dict]) -> str:
    """Markdown table of one run, changes against its first (full attention) row."""
    full = results[0]["perplexity"]
    lines = [f"| method | KV budget | perplexity | vs {results[0]['method']} | top-1 agreement |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['kv_budget']:.3f} | {r['perplexity']:.3f} | "
                     f"{100 * (r['perplexity'] / full - 1):+.1f}% | {100 * r['top1_agreement']:.1f}% |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from flashserve.bench.quality import license_corpus
    from flashserve.engine.llm import LLM
    from flashserve.layers.attention import Attention

    if args.from_json:
        runs = []
        for name in args.from_json:
            with open(name) as f:
                runs.append(json.load(f))
        for run_ in runs:
            print(f"\n{run_['model']}, {run_['tokens']} tokens, chunk {run_['chunk_size']}, {run_['device']} "
                  f"{run_['cpu'] if run_['device'] == 'cpu' else ''}\n{table(run_['results'])}")
        if args.plot:
            plot(runs, args.plot)
        return 0
    methods = [(m, parse_method(m)) for m in args.methods.split(",")]
    t0 = time.perf_counter()
    llm = LLM(args.model, device=args.device, attention_backend="torch", max_model_len=args.max_tokens and
              args.max_tokens + 1, verbose=False)
    engine = llm.engine
    worker = engine.worker
    if worker is None:
        raise ValueError("attention-quality needs the in-process executor")
    n = min(args.max_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
    bos = engine.model_config.bos_token_id
    ids = license_corpus(n, lambda text: engine.encode(text, add_special_tokens=False))
    if bos is not None:
        ids = [bos] + ids[: n - 1]
    base = [m.spec for m in worker.model.modules() if isinstance(m, Attention)]
    print(f"{engine.model_name}: {len(ids)} tokens of license text, chunk {args.chunk_size}, "
          f"{sum(b.kind == 'full' for b in base)}/{len(base)} layers take the method; "
          f"{engine.device.type} {cpu_model() if engine.device.type == 'cpu' else torch.cuda.get_device_name()}")
    results, ref_top = [], None
    for name, spec in methods:
        set_attention(worker.model, base, spec)
        t1, c1 = time.perf_counter(), time.process_time()
        nll, top, count = 0.0, [], 0
        for logp in engine.score(ids, args.chunk_size):
            target = torch.tensor(ids[count + 1 : count + 1 + logp.shape[0]], device=logp.device)
            nll -= logp.gather(1, target[:, None]).sum().item()
            top.append(logp.argmax(1).cpu())
            count += logp.shape[0]
        top_ids = torch.cat(top)
        if ref_top is None:
            ref_top = top_ids
        row = {"method": name, "kind": spec.kind, "kv_budget": budget(spec, len(ids), engine.info.block_size),
               "perplexity": math.exp(nll / count), "top1_agreement": float((top_ids == ref_top).float().mean()),
               "seconds": time.perf_counter() - t1, "cpu_seconds": time.process_time() - c1}
        results.append(row)
        print(f"  {name:18s} budget {row['kv_budget']:6.3f}  ppl {row['perplexity']:9.3f}  "
              f"top-1 {100 * row['top1_agreement']:6.2f}%  ({row['seconds']:.0f}s wall, {row['cpu_seconds']:.0f}s CPU)", flush=True)
    print("\n" + table(results))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": engine.model_name, "tokens": len(ids), "chunk_size": args.chunk_size,
                       "device": engine.device.type, "cpu": cpu_model(), "seconds": time.perf_counter() - t0,
                       "results": results}, f, indent=2)
    if args.plot:
        plot([{"model": engine.model_name, "tokens": len(ids), "device": engine.device.type, "results": results}],
             args.plot)
    return 0
