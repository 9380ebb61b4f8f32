"""``flashserve bench attention``: decode with windowed / selective attention at long context (GPU).

Two measurements per method, against full attention in the same run, at Llama-3.1-8B shapes
(32 query heads, 8 KV heads, head dim 128, bf16, blocks of 16):

1. decode attention: one layer's ``TritonAttentionBackend.forward`` (store the new token, Quest's
   page selection when it applies, split-KV decode) for batch 1 and 16 at ``--context`` tokens
   per sequence, replayed from a CUDA graph as decoding runs it (mean of the replays), and the K/V
   bytes it must read;
2. end to end: the whole model with dummy weights and CUDA graphs: the prompts (``--context``
   random tokens each) are prefilled once with full attention, then each method decodes
   ``--steps`` tokens per sequence from that cache (graphs recaptured per method); decode tok/s.
   The cache content is random, so these are timings, not quality.

Also the KV memory a sequence holds at that context: full / Quest keep every block; a sliding
window (+ sinks) keeps ``ceil(span / 16) + 1`` blocks plus the sinks' (``flashserve.cache.window``).
H2O and LSH run in the torch backend only and are not timed here.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from flashserve.bench.attention_quality import parse_method, set_attention

DEFAULT_METHODS = "full,sliding:6554,sinks:6550:4,quest:0.2,quest:0.1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=int, default=32768, help="tokens of context per sequence")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated (bench attention-quality syntax; 20%% of 32k = 6554 tokens)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per method (end to end)")
    p.add_argument("--model", default="llama-3.1-8b", help="bundled config for dummy weights")
    p.add_argument("--skip-e2e", action="store_true", help="kernel timings only")
    p.add_argument("--output-json", default=None)


def _kv_gib_per_seq(spec, context: int, block_size: int, bytes_per_token: int) -> float:
    blocks = -(-context // block_size)
    if spec.kind == "sliding":
        blocks = min(blocks, -(-spec.span // block_size) + 1 + -(-spec.num_sinks // block_size))
    return blocks * block_size * bytes_per_token / 2**30


def _kernel_times(methods, context: int, batch: int) -> list[float]:
    from flashserve.kernels.testing import RandomPagedBatch
    from flashserve.kernels.timing import graph_ms
    from flashserve.kernels.triton_backend import TritonAttentionBackend

    rb = RandomPagedBatch([context] * batch, [1] * batch, 32, 8, 128, 16, torch.bfloat16, torch.device("cuda"),
                          seed=batch, extra_blocks=16)
    meta = rb.meta
    times = []
    for _, spec in methods:
        backend = TritonAttentionBackend()
        if spec.kind == "quest":  # page bounds of the whole cached context, as the prefill would leave them
            state = backend.side_states.get(rb.k_cache)
            state.update(spec, rb.k_cache.flatten(0, 1), torch.arange(rb.k_cache.shape[0] * 16, device="cuda"))
        # replayed from a CUDA graph, as decoding runs it: timed with events around each call, batch 1
        # measured the host's launch work (~0.37 ms whatever the method), not the kernels
        call = lambda: backend.forward(rb.q, rb.k_new, rb.v_new, rb.k_cache, rb.v_cache, meta, 128**-0.5, spec)  # noqa: E731
        times.append(graph_ms([call] * 4))
    return times


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _e2e_tok_s(methods, context: int, batch_sizes: list[int], steps: int, model: str) -> dict[int, list[float]]:
    from flashserve.engine.llm import LLM
    from flashserve.sampling_params import SamplingParams

    llm = LLM(model=model, load_format="dummy", max_model_len=context + steps * len(methods) + 64,
              max_num_seqs=max(batch_sizes), max_mixed_graph_tokens=0, enable_prefix_caching=False, verbose=False,
              kv_cache_memory_fraction=0.8 if torch.cuda.is_available() else None)  # room for Quest's page bounds
    engine = llm.engine
    worker = engine.worker
    from flashserve.layers.attention import Attention

    base = [m.spec for m in worker.model.modules() if isinstance(m, Attention)]
    out: dict[int, list[float]] = {}
    g = torch.Generator().manual_seed(0)
    for bsz in batch_sizes:
        ids = [torch.randint(10, 1000, (context,), generator=g).tolist() for _ in range(bsz)]
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps * len(methods) + 8)
        for i, p in enumerate(ids):
            engine.add_request(f"b{bsz}-{i}", p, params)
        while engine.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
            engine.step()  # prefill with the model's full attention
        rates = []
        for _, spec in methods:
            set_attention(worker.model, base, spec)
            engine._drain()
            if worker.graphs is not None:
                worker.graphs.capture()
            for _ in range(2):
                engine.step()
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            engine._drain()
            _sync()
            rates.append(bsz * steps / (time.perf_counter() - t0))
        for i in range(bsz):
            engine.abort_request(f"b{bsz}-{i}")
        engine._drain()
        out[bsz] = rates
    set_attention(worker.model, base, base[0])
    return out


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("flashserve bench attention needs a CUDA GPU")
    methods = [(m, parse_method(m)) for m in args.methods.split(",")]
    if methods[0][1].kind != "full":
        methods.insert(0, ("full", parse_method("full")))
    unsupported = [m for m, s in methods if s.kind in ("h2o", "lsh")]
    if unsupported:
        raise SystemExit(f"{', '.join(unsupported)}: the Triton backend implements full, sliding and quest attention")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; context {args.context}, Llama-3.1-8B shapes "
          f"(32/8 heads, d128, bf16, block 16)", flush=True)
    kernel = {b: _kernel_times(methods, args.context, b) for b in batch_sizes}
    e2e = {} if args.skip_e2e else _e2e_tok_s(methods, args.context, batch_sizes, args.steps, args.model)
    per_token = 2 * 32 * 8 * 128 * 2  # K and V bytes per token, all 32 layers
    full_gib = _kv_gib_per_seq(methods[0][1], args.context, 16, per_token)
    print(f"\nbench attention done in {time.perf_counter() - t0:.0f}s\n")
    rows = []
    print("| method | batch | decode attention (us/layer) | speedup | e2e decode tok/s | speedup | KV per seq (GiB) | freed |")
    print("|---|---|---|---|---|---|---|---|")
    for b in batch_sizes:
        for j, (name, spec) in enumerate(methods):
            kv = _kv_gib_per_seq(spec, args.context, 16, per_token)
            rate = e2e.get(b, [math.nan] * len(methods))[j]
            base_rate = e2e.get(b, [math.nan])[0]
            rows.append({"method": name, "batch": b, "decode_attention_ms": kernel[b][j],
                         "attention_speedup": kernel[b][0] / kernel[b][j], "e2e_tok_s": rate,
                         "e2e_speedup": rate / base_rate, "kv_gib_per_seq": kv, "kv_freed": 1 - kv / full_gib})
            print(f"| {name} | {b} | {1000 * kernel[b][j]:.0f} | {kernel[b][0] / kernel[b][j]:.2f}x | {rate:.1f} | "
                  f"{rate / base_rate:.2f}x | {kv:.2f} | {100 * (1 - kv / full_gib):.0f}% |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "context": args.context, "rows": rows}, f, indent=2)
    return 0
