"""``flashserve bench disagg``: KV hand-off time per block, then TTFT/TPOT disaggregated vs colocated.

Hand-off: a second process plays the decode Worker; both hold a KV pool of the model's shapes
(``[layers, 2, blocks, block_size, kv_heads, head_dim]``, random contents) and run the engine's
own ``KVLink`` (gather -> send -> recv -> scatter; gloo on CPU, NCCL between two GPUs, gloo
through host memory when both are on one GPU). The time of one hand-off of n blocks runs from the
sender's gather to the receiver's acknowledgement after its scatter (so it includes one small
gloo message back), median of ``--repeats``.

Serving: the same random requests (prompt ids, greedy, ``ignore_eos``) through a colocated engine
and a disaggregated one, all at once; per-request TTFT (arrival to first token) and TPOT (first
to last token, per token) medians and p90s, and the tokens of the two compared.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing as mp
import random
import statistics
import time

import torch
import torch.distributed as dist

from flashserve.cli import add_engine_arguments, llm_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.set_defaults(model="llama-3.1-8b", load_format="dummy", max_model_len=2048)
    p.add_argument("--blocks", default="1,16,64,256", help="blocks per hand-off, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--requests", type=int, default=32, help="serving comparison: requests (0 skips it)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--output-json", default=None)


def _pool(model_config, num_blocks: int, block_size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    mc = model_config
    g = torch.Generator(device="cpu").manual_seed(0)
    pool = torch.randn(mc.num_layers, 2, num_blocks, block_size, mc.num_kv_heads, mc.head_dim, generator=g)
    return pool.to(dtype=dtype, device=device)


def _receiver(port: int, devices: dict, model_config, num_blocks: int, block_size: int, dtype: torch.dtype,
              sizes: list[int], repeats: int) -> None:
    from flashserve.distributed.disagg import DECODE, make_kv_link

    timeout = datetime.timedelta(seconds=300)
    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout)
    if devices[DECODE].startswith("cuda"):
        torch.cuda.set_device(devices[DECODE])
    link = make_kv_link(store, DECODE, devices, timeout)
    ack = dist.ProcessGroupGloo(dist.PrefixStore("ack", store), 1, 2, timeout)
    pool = _pool(model_config, num_blocks, block_size, dtype, devices[DECODE]).zero_()
    rng = random.Random(1)
    for n in sizes:
        for _ in range(repeats + 1):
            link.recv(pool, tuple(rng.sample(range(num_blocks), n)))
            if pool.is_cuda:
                torch.cuda.synchronize()
            ack.send([torch.zeros(1)], 0, 0).wait()


def handoff(args: argparse.Namespace, model_config, dtype: torch.dtype, devices: dict) -> list[dict]:
    """Median seconds per hand-off of each size in ``--blocks``."""
    from flashserve.distributed.disagg import PREFILL, make_kv_link

    sizes = [int(x) for x in args.blocks.split(",")]
    num_blocks = max(sizes) * 2
    timeout = datetime.timedelta(seconds=300)
    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
    proc = mp.get_context("spawn").Process(target=_receiver, daemon=True,
                                           args=(store.port, devices, model_config, num_blocks, args.block_size,
                                                 dtype, sizes, args.repeats))
    proc.start()
    try:
        if devices[PREFILL].startswith("cuda"):
            torch.cuda.set_device(devices[PREFILL])
        link = make_kv_link(store, PREFILL, devices, timeout)
        ack = dist.ProcessGroupGloo(dist.PrefixStore("ack", store), 0, 2, timeout)
        pool = _pool(model_config, num_blocks, args.block_size, dtype, devices[PREFILL])
        block_bytes = pool[:, :, 0].numel() * pool.element_size()
        rng = random.Random(2)
        rows = []
        for n in sizes:
            times = []
            for i in range(args.repeats + 1):  # the first one warms the connection up
                blocks = tuple(rng.sample(range(num_blocks), n))
                if pool.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                link.send(pool, blocks)
                ack.recv([torch.empty(1)], 1, 0).wait()
                if i:
                    times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            rows.append({"blocks": n, "ms": s * 1e3, "us_per_block": s / n * 1e6,
                         "gb_s": n * block_bytes / s / 1e9, "block_bytes": block_bytes})
        return rows
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()


def _serve(kwargs: dict, prompts: list[list[int]], new_tokens: int) -> tuple[dict, list[list[int]]]:
    from flashserve import LLM, SamplingParams

    llm = LLM(**kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    finally:
        llm.engine.shutdown()
        del llm  # the colocated Worker's weights and pool live in this process: free them for the next run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ttft = sorted(o.metrics.time_to_first_token for o in outs)
    tpot = sorted(o.metrics.time_per_output_token(new_tokens) for o in outs)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    return ({"ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p90": pct(ttft, 0.9), "tpot_ms_p50": pct(tpot, 0.5),
             "tpot_ms_p90": pct(tpot, 0.9), "output_tok_s": len(outs) * new_tokens / wall},
            [o.outputs[0].token_ids for o in outs])


def run(args: argparse.Namespace) -> int:
    from flashserve.bench import cpu_model
    from flashserve.config import EngineArgs
    from flashserve.distributed.disagg import DECODE, PREFILL, side_devices
    from flashserve.loader import load_model_config
    from flashserve.runner.worker import resolve_dtype

    kwargs = llm_kwargs(args)
    kwargs["disaggregated"] = False
    config = EngineArgs(**kwargs).engine_config()
    devices = side_devices(config)
    model_config = load_model_config(args.model, args.load_format)
    dtype = resolve_dtype(args.dtype, torch.device(devices[PREFILL]))
    where = (torch.cuda.get_device_name(devices[PREFILL]) if devices[PREFILL].startswith("cuda")
             else f"cpu ({cpu_model()})")
    transport = ("nccl" if devices[PREFILL] != devices[DECODE] else "gloo via host memory") \
        if devices[PREFILL].startswith("cuda") else "gloo"
    res = {"model": args.model, "device": where, "prefill_device": devices[PREFILL],
           "decode_device": devices[DECODE], "transport": transport, "dtype": str(dtype).removeprefix("torch."),
           "date": datetime.date.today().isoformat(), "handoff": handoff(args, model_config, dtype, devices)}
    if args.requests > 0:
        rng = random.Random(0)
        prompts = [[rng.randrange(100, model_config.vocab_size) for _ in range(args.prompt_len)]
                   for _ in range(args.requests)]
        kwargs["verbose"] = False
        colocated, ref = _serve(kwargs, prompts, args.new_tokens)
        disagg, got = _serve({**kwargs, "disaggregated": True}, prompts, args.new_tokens)
        res["serving"] = {"requests": args.requests, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                          "colocated": colocated, "disaggregated": disagg,
                          "same_tokens": sum(a == b for a, b in zip(ref, got))}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    print(f"KV hand-off, {args.model} ({res['handoff'][0]['block_bytes'] / 2**20:.2f} MiB per block of "
          f"{args.block_size} tokens), {transport}, {where}:")
    print(f"{'blocks':>7} {'ms':>9} {'us/block':>9} {'GB/s':>7}")
    for r in res["handoff"]:
        print(f"{r['blocks']:>7} {r['ms']:>9.3f} {r['us_per_block']:>9.1f} {r['gb_s']:>7.2f}")
    if "serving" in res:
        s = res["serving"]
        print(f"{s['requests']} requests x {s['prompt_len']} prompt + {s['new_tokens']} new tokens "
              f"(same tokens: {s['same_tokens']}/{s['requests']}):")
        print(f"{'engine':>14} {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} {'TPOT p90':>9} {'tok/s':>8}")
        for name in ("colocated", "disaggregated"):
            m = s[name]
            print(f"{name:>14} {m['ttft_ms_p50']:>9.1f} {m['ttft_ms_p90']:>9.1f} {m['tpot_ms_p50']:>9.2f} "
                  f"{m['tpot_ms_p90']:>9.2f} {m['output_tok_s']:>8.1f}")
    return 0
