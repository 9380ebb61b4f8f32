"""``flashserve bench latency``: batch-1 decode speed and bandwidth utilisation.

Decoding one sequence reads every weight once per token, plus the sequence's K/V. Utilisation is
(weight bytes + mean KV bytes per token) / time per token / the device's read bandwidth measured
in the same run (a large reduction). The embedding table is not counted as read (one row is), the
LM head is. Defaults: Llama-3.1-8B shapes with dummy bf16 weights, prompt 128, 256 new tokens.
Also reported: host time per decode step (building inputs and launching) next to its device
time, and the CUDA-graph capture time. ``--profile N`` (CUDA) then traces N more decode steps with
``torch.profiler`` and tabulates their kernels by name (calls and microseconds per step, share of
the step's kernel time) and the device time between kernels: where a step goes besides the
products.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from flashserve.cli import add_engine_arguments, llm_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.set_defaults(model="llama-3.1-8b", load_format="dummy", max_model_len=4096, max_num_seqs=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-gib", type=float, default=4.0, help="size of the bandwidth-probe tensor")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="trace this many more decode steps (CUDA) and print their kernels by name")
    p.add_argument("--output-json", default=None)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoded token: every weight as stored (quantized weights with their scales)
    except the embedding table, unless it is the LM head's (``flashserve.quant.weight_bytes``);
    of a mixture-of-experts layer only the ``k`` experts a token is routed to."""
    from flashserve.layers.moe import inactive_expert_bytes
    from flashserve.quant import weight_bytes as stored_weight_bytes

    return stored_weight_bytes(model) - inactive_expert_bytes(model)


def kv_bytes_per_token(cfg, context: float, elem: int) -> float:
    """K and V of every layer over ``context`` tokens."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem * context


def _kernels(llm, prompt: list[int], tokens: int) -> tuple[dict[str, list[float]], float]:
    """Kernel durations (us) by name while generating ``tokens`` tokens, and the first-to-last span."""
    from torch.profiler import ProfilerActivity, profile

    from flashserve import SamplingParams

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events) if events else 0.0
    return by_name, span


def profile_steps(llm, prompt: list[int], steps: int) -> dict:
    """Kernels of ``steps`` decode steps by name (calls and us per step) and the device time between
    kernels: a run of ``steps + 1`` tokens less a run of one token (the prompt's step alone)."""
    prompt_only, prompt_span = _kernels(llm, prompt, 1)
    both, span = _kernels(llm, prompt, steps + 1)
    return step_kernels(both, span, prompt_only, prompt_span, steps)


def step_kernels(both: dict[str, list[float]], span: float, prompt_only: dict[str, list[float]],
                 prompt_span: float, steps: int) -> dict:
    """The per-step table of ``profile_steps`` from the two runs' kernel times by name and spans."""
    rows = []
    for name, times in both.items():
        before = prompt_only.get(name, [])
        calls, us = len(times) - len(before), sum(times) - sum(before)
        if calls > 0:
            rows.append({"kernel": name, "calls_per_step": calls / steps, "us_per_call": us / calls,
                         "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in rows)
    per_step_span = (span - prompt_span) / steps
    return {"steps": steps, "kernels_per_step": sum(r["calls_per_step"] for r in rows), "kernel_us_per_step": busy,
            "span_us_per_step": per_step_span, "idle_us_per_step": per_step_span - busy, "kernels": rows}


def format_profile(prof: dict) -> str:
    """The profile as a short table: the 25 kernels that take most time per step, then the totals."""
    if not prof["kernels"]:
        return "the profiler recorded no kernels"
    total = prof["kernel_us_per_step"]
    lines = [f"{'kernel':<70} {'calls':>6} {'us/call':>8} {'us/step':>8} {'share':>6}"]
    for r in prof["kernels"][:25]:
        lines.append(f"{r['kernel'][:70]:<70} {r['calls_per_step']:>6.1f} {r['us_per_call']:>8.2f} "
                     f"{r['us_per_step']:>8.1f} {r['us_per_step'] / total:>6.1%}")
    lines.append(f"per step: {prof['kernels_per_step']:.0f} kernels, {total:.0f} us in kernels, "
                 f"{prof['idle_us_per_step']:.0f} us between them ({prof['span_us_per_step']:.0f} us first to last)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from flashserve import LLM, SamplingParams
    from flashserve.engine.warm_up import triton_cache_state

    cache = triton_cache_state()
    llm = LLM(**llm_kwargs(args))
    engine = llm.engine
    worker = engine.worker
    device = engine.device
    warm_s = engine.warm_up()
    read = None
    if device.type == "cuda":
        from flashserve.bench.kernels import read_bandwidth

        read = read_bandwidth(args.read_gib, 25, 200, device)
    rng = random.Random(0)
    prompt = [rng.randrange(100, engine.model_config.vocab_size) for _ in range(args.prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up

    tpots, e2es, host_ms, gpu_ms = [], [], [], []
    for _ in range(args.repeats):
        engine.timings = []
        if worker is not None:  # None: the Worker runs in another process (--executor process)
            worker.timings = []
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        e2es.append(time.perf_counter() - start)
        tpots.append(out.metrics.time_per_output_token(args.new_tokens))
        # per model step (a multi-step plan, --num-scheduler-steps, runs several)
        host_ms.append(statistics.median(t.host_s / t.model_steps for t in engine.timings
                                         if t.num_tokens <= t.model_steps) * 1e3)
        decode = [t for t in worker.timings if t.is_decode] if worker is not None else []
        if decode and decode[0].start is not None:
            gpu_ms.append(statistics.median(t.gpu_ms / t.model_steps for t in decode))
    engine.timings = None
    if worker is not None:
        worker.timings = None

    cfg = engine.model_config
    elem = engine.dtype.itemsize
    tpot = statistics.median(tpots)
    mean_ctx = args.prompt_len + args.new_tokens / 2
    # (rank 0's shard under tensor / pipeline parallelism; all stored bytes for a Worker in another process)
    weights = weight_bytes(worker.model) if worker is not None else engine.info.weight_bytes
    bytes_per_token = weights + kv_bytes_per_token(cfg, mean_ctx, elem)
    res = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quantization": args.quantization,
        "triton_cache_at_start": cache,
        "warm_up_s": warm_s,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "decode_tok_s": 1.0 / tpot,
        "time_per_output_token_ms": tpot * 1e3,
        "e2e_s": statistics.median(e2es),
        "bytes_per_token": bytes_per_token,
        "achieved_tb_s": bytes_per_token / tpot / 1e12,
        "host_ms_per_decode_step": statistics.median(host_ms),
        "gpu_ms_per_decode_step": statistics.median(gpu_ms) if gpu_ms else None,
        "cuda_graphs": worker is not None and worker.graphs is not None,
        "executor": args.executor,
        "world_size": args.tensor_parallel_size * args.pipeline_parallel_size,
        "graph_capture_s": engine.graph_capture_seconds,
        "speculative": spec.as_dict() if (spec := engine.stats().spec) is not None else None,  # acceptance length
    }
    if args.profile and device.type == "cuda":
        res["profile"] = profile_steps(llm, prompt, args.profile)
    if read is not None:
        res["read_tb_s"] = read["tb_s"]
        res["bandwidth_utilisation"] = res["achieved_tb_s"] / read["tb_s"]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "profile"}, indent=2))
    if "profile" in res:
        print(format_profile(res["profile"]))
    util = f", {res['bandwidth_utilisation']:.1%} of {res['read_tb_s']:.2f} TB/s read bandwidth" if read else ""
    print(f"batch-1 decode {res['decode_tok_s']:.1f} tok/s ({res['achieved_tb_s']:.2f} TB/s{util}); per step: "
          f"host {res['host_ms_per_decode_step']:.2f} ms, device {res['gpu_ms_per_decode_step'] or float('nan'):.2f} ms; "
          f"Triton cache {cache} at start")
    return 0
