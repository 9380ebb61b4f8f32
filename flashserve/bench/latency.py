"""``flashserve bench latency``: batch-1 decode speed and bandwidth utilisation.

Decoding one sequence reads every weight once per token, plus the sequence's K/V. Utilisation is
(weight bytes + mean KV bytes per token) / time per token / the device's read bandwidth measured
in the same run (a large reduction). The embedding table is not counted as read (one row is), the
LM head is. Defaults: Llama-3.1-8B shapes with dummy bf16 weights, prompt 128, 256 new tokens.
Also reported: host time per decode step (building inputs and launching) next to its device
time, and the CUDA-graph capture time.
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
        host_ms.append(statistics.median(t.host_s for t in engine.timings if t.num_tokens == 1) * 1e3)
        decode = [t for t in worker.timings if t.is_decode] if worker is not None else []
        if decode and decode[0].start is not None:
            gpu_ms.append(statistics.median(t.gpu_ms for t in decode))
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
    if read is not None:
        res["read_tb_s"] = read["tb_s"]
        res["bandwidth_utilisation"] = res["achieved_tb_s"] / read["tb_s"]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    util = f", {res['bandwidth_utilisation']:.1%} of {res['read_tb_s']:.2f} TB/s read bandwidth" if read else ""
    print(f"batch-1 decode {res['decode_tok_s']:.1f} tok/s ({res['achieved_tb_s']:.2f} TB/s{util}); per step: "
          f"host {res['host_ms_per_decode_step']:.2f} ms, device {res['gpu_ms_per_decode_step'] or float('nan'):.2f} ms; "
          f"Triton cache {cache} at start")
    return 0
