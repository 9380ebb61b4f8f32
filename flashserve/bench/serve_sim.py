"""``flashserve bench serve-sim``: replay a Poisson arrival trace against the real engine.

The clock is simulated but the work is real: each engine step advances the clock by the step's
measured wall time, and requests are injected when the clock passes their arrival time (idle
gaps are skipped). So TTFT, job completion time (JCT) and inter-token latency (ITL) include
queueing exactly as a server would see it, without sleeping through idle time.

Trace: Poisson arrivals at ``--rate`` requests per simulated second; prompt lengths uniform in
``[--prompt-min, --prompt-max]`` with a ``--long-prompt-frac`` share of ``--long-prompt``-token
prompts; output lengths heavy tailed (Pareto with shape ``--pareto-alpha``, scale
``--output-min``, clipped at ``--output-max``), generated with ``ignore_eos`` so every run does
the same work. ``max_tokens`` is the true output length, so ``sjf`` is an oracle here; ``mlfq``
knows nothing about lengths. ``priority`` gets random priorities 0..3.

Modes: ``policies`` (default) runs each ``--policies`` entry; ``chunking`` runs FCFS with and
without chunked prefill (ITL of running streams while long prompts arrive); ``prefix`` runs
with and without prefix caching on a shared-system-prompt trace (``--shared-prefix`` tokens).

Without ``--model`` a tiny random Llama (4 layers, hidden 256) runs on the CPU in about a
minute. On a GPU: ``--model qwen3-0.6b --load-format dummy`` (see docs/scheduling.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
}


@dataclass
class TraceRequest:
    arrival: float
    prompt: list[int]
    output_len: int
    priority: int


@dataclass
class RunResult:
    name: str
    num_requests: int
    makespan_s: float
    throughput_tok_s: float
    ttft_mean: float
    ttft_p50: float
    ttft_p99: float
    jct_mean: float
    jct_p50: float
    jct_p99: float
    itl_mean: float
    itl_p99: float
    preemptions: int
    swap_outs: int
    prefix_hit_rate: float
    prefill_tokens_computed: int
    extra: dict = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model dir/config (default: a tiny random Llama written to a temp dir)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mode", default="policies", choices=["policies", "chunking", "prefix"])
    p.add_argument("--policies", default="fcfs,sjf,mlfq", help="comma-separated (fcfs, priority, sjf, mlfq)")
    p.add_argument("--num-requests", type=int, default=120)
    p.add_argument("--rate", type=float, default=None, help="arrivals per simulated second (default: calibrated to ~90%% load)")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=1024)
    p.add_argument("--long-prompt-frac", type=float, default=0.05)
    p.add_argument("--output-min", type=int, default=8)
    p.add_argument("--output-max", type=int, default=384)
    p.add_argument("--pareto-alpha", type=float, default=1.1)
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens of a system prompt shared by every request")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--preemption-mode", default="auto", choices=["recompute", "swap", "auto"])
    p.add_argument("--swap-space-bytes", type=int, default=256 << 20)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def make_trace(args: argparse.Namespace, vocab: int, rate: float) -> list[TraceRequest]:
    rng = random.Random(args.seed)
    prefix = [rng.randrange(3, vocab) for _ in range(args.shared_prefix)]
    t = 0.0
    trace = []
    for _ in range(args.num_requests):
        t += rng.expovariate(rate)
        n = args.long_prompt if rng.random() < args.long_prompt_frac else rng.randint(args.prompt_min, args.prompt_max)
        prompt = prefix + [rng.randrange(3, vocab) for _ in range(n)]
        out = min(args.output_max, int(args.output_min * rng.paretovariate(args.pareto_alpha)))
        trace.append(TraceRequest(t, prompt, max(1, out), rng.randrange(4)))
    return trace


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def build_llm(args: argparse.Namespace, model: str, load_format: str, **overrides):
    from flashserve.engine.llm import LLM

    kw = dict(
        model=model, load_format=load_format, device=args.device, dtype=args.dtype, seed=args.seed,
        block_size=args.block_size, kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_chunked_prefill=not args.no_chunked_prefill, enable_prefix_caching=not args.no_prefix_caching,
        preemption_mode=args.preemption_mode, swap_space_bytes=args.swap_space_bytes, verbose=False,
    )
    kw.update(overrides)
    return LLM(**kw)


def warmup_trace(trace: list[TraceRequest], n: int = 24) -> list[TraceRequest]:
    """The first ``n`` requests plus the longest prompt, all arriving at once, outputs capped."""
    longest = max(trace, key=lambda t: len(t.prompt))
    picked = trace[:n] + ([longest] if longest not in trace[:n] else [])
    return [replace(t, arrival=0.0, output_len=min(t.output_len, 16)) for t in picked]


def replay(llm, trace: list[TraceRequest], name: str) -> RunResult:
    """Run the trace on a fresh engine; the simulated clock advances by measured step times."""
    from flashserve.sampling_params import SamplingParams

    eng = llm.engine
    pending = list(enumerate(trace))
    clock = 0.0
    first: dict[str, float] = {}
    last_tok: dict[str, float] = {}
    done: dict[str, float] = {}
    itls: list[float] = []
    arrival: dict[str, float] = {}
    out_tokens = 0
    bm = eng.block_manager
    q0, h0 = bm.prefix_queries, bm.prefix_hits
    pre0, swap0 = eng.scheduler.num_preemptions, eng.scheduler.num_swap_outs
    while pending or eng.has_unfinished_requests():
        if not eng.has_unfinished_requests() and pending[0][1].arrival > clock:
            clock = pending[0][1].arrival  # idle: jump to the next arrival
        while pending and pending[0][1].arrival <= clock:
            i, tr = pending.pop(0)
            rid = f"{name}-{i}"
            sp = SamplingParams(temperature=0, max_tokens=tr.output_len, ignore_eos=True, priority=tr.priority)
            eng.add_request(rid, tr.prompt, sp)
            arrival[rid] = tr.arrival
        t0 = time.perf_counter()
        outs = eng.step()
        clock += time.perf_counter() - t0
        for o in outs:
            n = sum(c.num_new_tokens for c in o.outputs)
            out_tokens += n
            rid = o.request_id
            if rid not in first:
                first[rid] = clock
            else:
                itls.append(clock - last_tok[rid])
            last_tok[rid] = clock
            if o.finished:
                done[rid] = clock
    computed = sum(len(t.prompt) for t in trace) - (bm.prefix_hits - h0)
    ttft = [first[r] - arrival[r] for r in arrival]
    jct = [done[r] - arrival[r] for r in arrival]
    makespan = max(done.values()) - trace[0].arrival
    queries = bm.prefix_queries - q0
    return RunResult(
        name=name, num_requests=len(trace), makespan_s=makespan, throughput_tok_s=out_tokens / makespan,
        ttft_mean=statistics.fmean(ttft), ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99),
        jct_mean=statistics.fmean(jct), jct_p50=_pct(jct, 50), jct_p99=_pct(jct, 99),
        itl_mean=statistics.fmean(itls) if itls else float("nan"), itl_p99=_pct(itls, 99),
        preemptions=eng.scheduler.num_preemptions - pre0, swap_outs=eng.scheduler.num_swap_outs - swap0,
        prefix_hit_rate=(bm.prefix_hits - h0) / queries if queries else 0.0, prefill_tokens_computed=computed,
    )


def calibrate_rate(llm, args: argparse.Namespace, vocab: int) -> float:
    """Arrival rate giving ~90% load: time a closed batch of trace-like requests, then scale."""
    probe = argparse.Namespace(**{**vars(args), "num_requests": 24, "seed": args.seed + 1000})
    trace = make_trace(probe, vocab, rate=1e9)  # all at once
    from flashserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm.generate([t.prompt for t in trace],
                 [SamplingParams(temperature=0, max_tokens=t.output_len, ignore_eos=True) for t in trace], use_tqdm=False)
    per_request = (time.perf_counter() - t0) / len(trace)
    return 0.9 / per_request


def _fmt_table(results: list[RunResult]) -> str:
    head = ("run", "TTFT mean", "p50", "p99", "JCT mean", "p50", "p99", "ITL mean", "p99", "tok/s", "preempt", "swaps", "hit%")
    rows = [head]
    for r in results:
        rows.append((r.name, f"{r.ttft_mean:.3f}", f"{r.ttft_p50:.3f}", f"{r.ttft_p99:.3f}", f"{r.jct_mean:.3f}",
                     f"{r.jct_p50:.3f}", f"{r.jct_p99:.3f}", f"{r.itl_mean * 1e3:.1f}ms", f"{r.itl_p99 * 1e3:.1f}ms",
                     f"{r.throughput_tok_s:.1f}", str(r.preemptions), str(r.swap_outs), f"{100 * r.prefix_hit_rate:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    model, load_format = args.model, args.load_format
    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="flashserve-serve-sim-")
        Path(tmp.name, "config.json").write_text(json.dumps(TINY_CONFIG))
        model, load_format = tmp.name, "dummy"
        if args.kv_cache_bytes is None:
            args.kv_cache_bytes = 64 << 20
    probe_llm = build_llm(args, model, load_format)
    vocab = probe_llm.engine.model_config.vocab_size
    rate = args.rate or calibrate_rate(probe_llm, args, vocab)
    del probe_llm
    trace = make_trace(args, vocab, rate)
    print(f"serve-sim: {args.num_requests} requests, Poisson {rate:.2f} req/s, outputs Pareto(alpha={args.pareto_alpha}) "
          f"in [{args.output_min}, {args.output_max}], {100 * args.long_prompt_frac:.0f}% {args.long_prompt}-token prompts, "
          f"max_num_seqs {args.max_num_seqs}, budget {args.max_num_batched_tokens} tokens/step")

    if args.mode == "policies":
        runs = [(p, dict(policy=p)) for p in args.policies.split(",")]
    elif args.mode == "chunking":
        runs = [("fcfs-chunked", dict(enable_chunked_prefill=True)), ("fcfs-unchunked", dict(enable_chunked_prefill=False))]
    else:
        runs = [("prefix-cache", dict(enable_prefix_caching=True)), ("no-prefix-cache", dict(enable_prefix_caching=False))]
    # Warm-up replay (untimed): compiles the kernels for every shape class of the trace (long and
    # short prompts, mixed steps), so the first measured policy does not pay for JIT compilation.
    warm = build_llm(args, model, load_format)
    replay(warm, warmup_trace(trace), "warmup")
    del warm
    results = []
    for name, overrides in runs:
        llm = build_llm(args, model, load_format, **overrides)
        res = replay(llm, trace, name)
        sched = llm.engine.scheduler
        res.extra["rank_preemptions"] = getattr(sched, "num_rank_preemptions", 0)
        res.extra["recomputes"] = sched.num_recomputes
        if args.mode == "policies" and hasattr(sched.policy, "num_promotions"):
            res.extra["starvation_promotions"] = sched.policy.num_promotions
        results.append(res)
        print(f"  {name}: done in {res.makespan_s:.1f} simulated s", flush=True)
        del llm
    print(_fmt_table(results))
    print("(seconds of simulated time = measured engine step time; ITL in ms)")
    for r in results:
        if r.preemptions:
            print(f"  {r.name}: {r.extra['rank_preemptions']} of {r.preemptions} preemptions by rank, "
                  f"{r.extra['recomputes']} by recompute")
    if args.json:
        Path(args.json).write_text(json.dumps({"rate": rate, "args": vars(args), "results": [asdict(r) for r in results]}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0
