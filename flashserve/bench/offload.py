"""``flashserve bench offload``: decode speed with weights streamed from host memory, and prefix
hits served from the host KV tier, each against the host-to-device copy bandwidth of the same run.

Weights (``cpu_offload_gb``): for each fraction of the decoder-layer weights kept on the host, an
engine is built and decodes at batch 1 (and the larger ``--batch`` sizes). Every decode step
copies the offloaded bytes once, so a step cannot take less than ``offloaded bytes / pinned H2D
bandwidth``: the table gives that bound in tok/s and how close the engine gets.

Host KV tier (``kv_host_cache_gb``): in the engine without offloading, a prompt of
``--tier-prompt-len`` tokens is prefilled, a flood of other prompts evicts it from the device pool
to the host tier, and the prompt is sent again (1 new token): the time to first token with its
prefix loaded from the host, against recomputing a fresh prompt of the same length and against a
device hit, with the copy's lower bound (K/V bytes / H2D bandwidth).

Defaults: Llama-3.1-8B shapes with dummy bf16 weights, fractions 0, 0.25, 0.5, 0.75, batches 1
and 64, a 2 GiB KV pool and a 4 GiB host tier.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

import torch

from flashserve.cli import add_engine_arguments, llm_kwargs

GIB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.set_defaults(model="llama-3.1-8b", load_format="dummy", max_model_len=4096, max_num_seqs=64,
                   kv_cache_bytes=2 * GIB, max_mixed_graph_tokens=0, kv_host_cache_gb=4.0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75],
                   help="shares of the decoder-layer weights kept in host memory")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tier-prompt-len", type=int, default=2048, help="prompt of the host-tier hit (0: skip it)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--copy-gib", type=float, default=1.0, help="size of the host-to-device bandwidth probe")
    p.add_argument("--output-json", default=None)


def h2d_bandwidth(gib: float, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second of a copy from pinned host memory to the device (host memcpy on CPU)."""
    n = int(gib * GIB)
    cuda = device.type == "cuda"
    src = torch.empty(n, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times[1:])


def _release(llm) -> None:
    llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_speed(llm, batch: int, prompt_len: int, new_tokens: int, seed: int) -> float:
    """Decode tokens/s of ``batch`` requests together (batch / median time per output token)."""
    from flashserve import SamplingParams

    rng = random.Random(seed)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                        use_tqdm=False)
    tpot = statistics.median(o.metrics.time_per_output_token(new_tokens) for o in outs)
    return batch / tpot


def first_token_s(llm, prompt: list[int]) -> float:
    from flashserve import SamplingParams

    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - t0


def host_tier_hit(llm, prompt_len: int, repeats: int, seed: int) -> dict:
    """Time to first token of a prompt whose prefix comes back from the host tier, against a fresh
    prompt (recompute) and a device hit."""
    from flashserve import SamplingParams

    engine = llm.engine
    bm, vocab = engine.block_manager, engine.model_config.vocab_size
    rng = random.Random(seed)
    pool_tokens = bm.num_blocks * bm.block_size
    flood_n = -(-pool_tokens * 5 // 4 // prompt_len)  # enough to evict every cached block once
    fresh = lambda: [rng.randrange(100, vocab) for _ in range(prompt_len)]  # noqa: E731
    first_token_s(llm, fresh())  # warm-up
    rows = {"recompute_s": [], "host_hit_s": [], "device_hit_s": []}
    hits = 0
    for _ in range(repeats):
        prompt = fresh()
        rows["recompute_s"].append(first_token_s(llm, prompt))
        for i in range(0, flood_n, 8):
            llm.generate([fresh() for _ in range(min(8, flood_n - i))],
                         SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
        before = bm.host_tier_hits
        rows["host_hit_s"].append(first_token_s(llm, prompt))
        hits += bm.host_tier_hits - before
        rows["device_hit_s"].append(first_token_s(llm, prompt))
    res = {k: statistics.median(v) for k, v in rows.items()}
    res["host_hit_tokens_per_repeat"] = hits / repeats
    res["prompt_len"] = prompt_len
    return res


def run(args: argparse.Namespace) -> int:
    from flashserve import LLM
    from flashserve.bench import cpu_model
    from flashserve.runner.offload import layer_sizes

    kwargs = llm_kwargs(args)
    tier_gb = kwargs.pop("kv_host_cache_gb")
    kwargs.pop("cpu_offload_gb")
    rows, tier, total, bw, device_name = [], None, None, None, None
    for fraction in sorted(set(args.fractions)):
        t0 = time.perf_counter()
        if total is None and fraction > 0:
            raise ValueError("--fractions must start with 0 (the engine that measures the layer sizes)")
        gb = fraction * total / GIB if fraction > 0 else 0.0
        llm = LLM(**kwargs, cpu_offload_gb=gb, kv_host_cache_gb=tier_gb if fraction == 0 else 0.0)
        worker, device = llm.engine.worker, llm.engine.device
        build_s = time.perf_counter() - t0
        if total is None:
            total = sum(layer_sizes(worker.model))
            bw = h2d_bandwidth(args.copy_gib, device)
            device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"
        llm.engine.warm_up()
        offloaded = worker.info.offloaded_weight_bytes
        for batch in args.batch:
            decode_speed(llm, batch, args.prompt_len, 4, seed=1)  # warm-up at this batch
            tok_s = statistics.median(decode_speed(llm, batch, args.prompt_len, args.new_tokens, seed=2 + r)
                                      for r in range(args.repeats))
            bound = batch * bw / offloaded if offloaded else None
            rows.append({"fraction": fraction, "offloaded_gib": offloaded / GIB, "batch": batch, "tok_s": tok_s,
                         "copy_bound_tok_s": bound, "of_bound": tok_s / bound if bound else None,
                         "build_s": build_s})
            print(json.dumps(rows[-1]), flush=True)
        if fraction == 0 and args.tier_prompt_len and tier_gb > 0:
            tier = host_tier_hit(llm, args.tier_prompt_len, args.repeats, seed=7)
            cfg = llm.engine.model_config
            kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * llm.engine.dtype.itemsize
            tier["copy_bound_s"] = tier["host_hit_tokens_per_repeat"] * kv_bytes / bw
            print(json.dumps(tier), flush=True)
        _release(llm)
    res = {"model": args.model, "device": device_name, "dtype": args.dtype, "h2d_gb_s": bw / 1e9,
           "decoder_layer_gib": total / GIB, "decode": rows, "host_tier": tier}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"\n{args.model} on {device_name}; pinned host-to-device copy {bw / 1e9:.1f} GB/s; "
          f"decoder layers {total / GIB:.2f} GiB")
    if tier is not None:
        print(f"host-tier prefix hit ({tier['prompt_len']} tokens, {tier['host_hit_tokens_per_repeat']:.0f} from host): "
              f"TTFT {tier['host_hit_s'] * 1e3:.1f} ms vs recompute {tier['recompute_s'] * 1e3:.1f} ms, device hit "
              f"{tier['device_hit_s'] * 1e3:.1f} ms (copy bound {tier['copy_bound_s'] * 1e3:.1f} ms)")
    print(f"{'offloaded':>10} {'GiB':>6} {'batch':>5} {'tok/s':>9} {'copy-bound tok/s':>17} {'of bound':>8}")
    for r in rows:
        bound = f"{r['copy_bound_tok_s']:.1f}" if r["copy_bound_tok_s"] else "-"
        share = f"{r['of_bound']:.0%}" if r["of_bound"] else "-"
        print(f"{r['fraction']:>10.0%} {r['offloaded_gib']:>6.2f} {r['batch']:>5} {r['tok_s']:>9.1f} {bound:>17} {share:>8}")
    return 0
