"""``flashserve bench structured``: what grammar-constrained decoding costs, in process (no server).

For each ``--concurrency`` C and each format, C requests with distinct prompts decode
``--output-len`` tokens together. "none" ignores EOS; "json_schema" follows a schema that cannot
end before ``--output-len`` (an object holding an array of at least 10,000 short strings), so both
decode exactly the same number of tokens and differ only by the grammar work: advancing each
request's matcher, filling the packed bitmask on the host and masking the logits on the device.
Reported per run: the mean decode step (the engine's host timings of pure decode steps: planning,
launch, the wait for the device and the outputs, i.e. the loop's period),
output tokens/s over the whole run, and the ratio to "none" at the same concurrency.

    flashserve bench structured --concurrency 1 64 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

from flashserve.bench.serve import LONG_SCHEMA, random_prompts
from flashserve.cli import add_engine_arguments, llm_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64], help="requests decoding together")
    p.add_argument("--formats", nargs="+", default=["none", "json_schema"], choices=["none", "json_schema"])
    p.add_argument("--input-len", type=int, default=32, help="words per random prompt")
    p.add_argument("--output-len", type=int, default=128, help="tokens each request decodes")
    p.add_argument("--output-json", default=None)


def measure(llm: Any, prompts: list[str], fmt: str, output_len: int) -> dict[str, Any]:
    import torch

    from flashserve.sampling_params import SamplingParams, StructuredOutput

    structured = StructuredOutput("json", json.dumps(LONG_SCHEMA)) if fmt == "json_schema" else None
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=structured is None,
                            structured_output=structured)
    engine = llm.engine
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=structured is None,
                                             structured_output=structured), use_tqdm=False)  # warm-up, grammar setup
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    engine.timings = []
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    steps = [t.host_s + t.wait_s for t in engine.timings if t.num_tokens == t.num_seqs]
    engine.timings = None
    tokens = [len(o.token_ids) for o in outs]
    if any(n != output_len for n in tokens):
        raise RuntimeError(f"{fmt}: outputs of {sorted(set(tokens))} tokens, expected {output_len} each")
    if structured is not None and not outs[0].text.startswith('{"notes":["'):
        raise RuntimeError(f"json_schema output does not follow the schema: {outs[0].text[:80]!r}")
    return {"format": fmt, "concurrency": len(prompts), "seconds": elapsed, "output_tok_s": sum(tokens) / elapsed,
            "decode_steps": len(steps), "decode_step_ms": 1000 * statistics.mean(steps) if steps else None}


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'conc':>5} {'format':<12} {'tok/s':>9} {'step ms':>8} {'steps':>6} {'x step':>7} {'slowdown':>8}",
             "-" * 60]
    for r in results:
        base = next(b for b in results if b["concurrency"] == r["concurrency"] and b["format"] == results[0]["format"])
        x_step = r["decode_step_ms"] / base["decode_step_ms"] if r["decode_step_ms"] and base["decode_step_ms"] else None
        lines.append(f"{r['concurrency']:>5} {r['format']:<12} {r['output_tok_s']:>9.1f} "
                     f"{r['decode_step_ms'] or 0:>8.2f} {r['decode_steps']:>6} "
                     f"{'-' if x_step is None else f'{x_step:.2f}':>7} {base['output_tok_s'] / r['output_tok_s']:>8.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if min(args.concurrency) < 1 or args.output_len < 1 or args.input_len < 1:
        print("flashserve bench structured: --concurrency, --output-len and --input-len must be >= 1", file=sys.stderr)
        return 2
    import torch

    from flashserve.engine.llm import LLM

    llm = LLM(**{**llm_kwargs(args), "max_num_seqs": max(args.max_num_seqs, max(args.concurrency))}, verbose=False)
    if llm.tokenizer is None:
        print("flashserve bench structured: the model needs a tokenizer (grammars are compiled against it)", file=sys.stderr)
        return 2
    engine = llm.engine
    results = []
    for concurrency in args.concurrency:
        prompts = random_prompts(concurrency, args.input_len, random.Random(concurrency))
        for fmt in args.formats:
            results.append(measure(llm, prompts, fmt, args.output_len))
            print(f"concurrency {concurrency} {fmt}: {results[-1]['output_tok_s']:.1f} tok/s", file=sys.stderr)
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    report = {"model": engine.model_name, "device": device, "dtype": str(engine.dtype).removeprefix("torch."),
              "output_len": args.output_len, "input_len": args.input_len, "results": results}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"{engine.model_name} on {device} ({report['dtype']}), {args.output_len} tokens per request")
    print(format_table(results))
    return 0
