"""``flashserve bench throughput``: offline throughput on random requests.

The workload follows nano-vllm's benchmark: N requests (default 256) with prompt and output
lengths drawn uniformly from [100, 1024], random token ids, EOS ignored; throughput is output
tokens over the wall time of the whole run, prefill included.

Also reported: the device's idle share of the run (gaps between one step's last kernel and the
next step's first, from CUDA events; the host planning the next step shows up here when it is
slower than the device), and the host time per step (scheduling, launch and output processing,
the wait for the device excluded) over the steps that run 200 or more sequences, whole and by
phase (scheduling; the Worker's part up to the launch; outputs: update, stop checks,
detokenization), and the launch phase split into the Worker's own host work (plan application,
inputs, sampling rows) and the time inside the model, sampler and speculator calls (on CUDA their
kernel launches, on CPU the computation itself; ``StepTiming.compute_s``). The engine is
warmed up first (``LLMEngine.warm_up``) and the Triton cache's state at start is printed.
``--stream`` streams every request with delta outputs, as the server's engine thread does, so the
outputs phase includes detokenizing and building an output for every request at every step.
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
    p.set_defaults(model="qwen3-0.6b", load_format="dummy", max_model_len=2048)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--stream", action="store_true",
                   help="stream every request as the server does (an output each step, delta outputs) instead of "
                        "reporting it once at the end, so the outputs phase shows the per-token cost of serving")
    p.add_argument("--output-json", default=None)


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outputs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outputs


def run(args: argparse.Namespace) -> int:
    from flashserve import LLM, SamplingParams
    from flashserve.engine.warm_up import triton_cache_state

    cache = triton_cache_state()
    llm = LLM(**llm_kwargs(args))
    engine = llm.engine
    warm_s = engine.warm_up()
    prompts, out_lens = workload(args.num_requests, args.min_len, args.max_len, engine.model_config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    preempt0 = engine.scheduler.num_preemptions
    worker = engine.worker
    if worker is not None:
        worker.timings = []
    engine.timings = []
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if args.stream:
        gen = _streamed(engine, prompts, params)
    else:
        gen = sum(len(o.token_ids) for o in llm.generate(prompts, params, use_tqdm=False))
    elapsed = time.perf_counter() - start
    assert gen == sum(out_lens), "every request must produce exactly its max_tokens"
    crowded = [t for t in engine.timings if t.num_seqs >= 200]
    busy = [t.host_s for t in crowded]
    res = {
        "model": args.model,
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "dtype": str(engine.dtype).removeprefix("torch."),
        "triton_cache_at_start": cache,
        "warm_up_s": warm_s,
        "async_scheduling": engine.config.async_scheduling,
        "streamed": args.stream,
        "num_requests": args.num_requests,
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": gen,
        "seconds": elapsed,
        "output_tok_s": gen / elapsed,
        "total_tok_s": (gen + sum(len(p) for p in prompts)) / elapsed,
        "steps": len(engine.timings),
        "host_ms_per_step_200plus_seqs": statistics.median(busy) * 1e3 if busy else None,
        # a multi-step plan (--num-scheduler-steps) pays one host turn for several model steps
        "model_steps_per_plan_200plus_seqs": statistics.median(t.model_steps for t in crowded) if crowded else None,
        "host_ms_per_model_step_200plus_seqs": statistics.median(t.host_s / t.model_steps for t in crowded) * 1e3
        if crowded else None,
        "host_ms_by_phase_200plus_seqs": {  # medians: scheduling, plan to launch, outputs (update, detokenize)
            phase: statistics.median(getattr(t, f"{phase}_s") for t in crowded) * 1e3
            for phase in ("schedule", "launch", "finish")} if crowded else None,
        "launch_ms_split_200plus_seqs": launch_split(engine.timings, worker.timings) if worker is not None else None,
        "device_idle_share": device_idle_share(worker.timings) if worker is not None else None,
        "graph_steps_share": sum(t.graph for t in worker.timings) / len(worker.timings) if worker else None,
        "device_by_step_kind": step_breakdown(worker.timings) if worker is not None else None,
        "preemptions": engine.scheduler.num_preemptions - preempt0,
        "kv_blocks": engine.block_manager.num_blocks,
        "max_num_seqs": engine.scheduler.config.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler.config.max_num_batched_tokens,
        "speculative": spec.as_dict() if (spec := engine.stats().spec) is not None else None,  # acceptance length
    }
    if worker is not None:
        worker.timings = None
    engine.timings = None
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    idle = res["device_idle_share"]
    print(f"{args.model}: {gen} output tokens in {elapsed:.1f}s = {res['output_tok_s']:.0f} output tok/s "
          f"({res['total_tok_s']:.0f} tok/s with prompts), {res['preemptions']} preemptions; device idle "
          f"{'n/a' if idle is None else f'{idle:.1%}'}; Triton cache {cache} at start")
    return 0


def _streamed(engine, prompts: list[list[int]], params: list) -> int:
    """Run every request streamed with delta outputs (as ``AsyncLLMEngine`` does for the server,
    without the HTTP side); the number of tokens the outputs carried."""
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{i}", prompt, sp, delta=True)
    gen = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            gen += sum(c.num_new_tokens for c in out.outputs)
    return gen


def launch_split(host: list, steps: list, min_seqs: int = 200) -> dict[str, float] | None:
    """Medians over the engine steps of ``min_seqs`` or more sequences of the Worker's host
    preparation (``StepTiming.prep_s``) and its model / sampler calls (``compute_s``), in ms. Each
    engine step that launched work (``num_seqs`` > 0) made one Worker step, in order."""
    launched = [t for t in host if t.num_seqs > 0]
    if len(launched) != len(steps):
        return None
    pairs = [w for h, w in zip(launched, steps) if h.num_seqs >= min_seqs]
    if not pairs:
        return None
    return {"worker_prep": statistics.median(w.prep_s for w in pairs) * 1e3,
            "model_and_sampler": statistics.median(w.compute_s for w in pairs) * 1e3}


def step_breakdown(timings: list) -> dict | None:
    """Per step kind (decode / mixed, graph or eager): steps, device ms and the device's idle ms
    just before them, to tell host-bound phases from device-bound ones."""
    steps = [t for t in timings if t.start is not None]
    if len(steps) < 2:
        return None
    steps[-1].end.synchronize()
    out: dict[str, dict[str, float]] = {}
    for prev, t in zip(steps, steps[1:]):
        kind = f"{'decode' if t.is_decode else 'mixed'}-{'graph' if t.graph else 'eager'}"
        row = out.setdefault(kind, {"steps": 0, "device_ms": 0.0, "idle_ms_before": 0.0, "host_ms": 0.0})
        row["steps"] += 1
        row["device_ms"] += t.start.elapsed_time(t.end)
        row["idle_ms_before"] += max(0.0, prev.end.elapsed_time(t.start))
        row["host_ms"] += t.host_s * 1e3
    return out


def device_idle_share(timings: list) -> float | None:
    """Share of the device timeline (first step's start to last step's end) between steps."""
    steps = [t for t in timings if t.start is not None]
    if len(steps) < 2:
        return None
    steps[-1].end.synchronize()
    span = steps[0].start.elapsed_time(steps[-1].end)
    gaps = sum(max(0.0, a.end.elapsed_time(b.start)) for a, b in zip(steps, steps[1:]))
    return gaps / span if span > 0 else None
