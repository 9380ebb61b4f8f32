"""``flashserve bench lora``: what serving LoRA adapters costs, against the base model in the same run.

Writes ``--adapters`` random adapters of rank ``--rank`` (PEFT format) for the model's projections
into a temporary folder, then measures, first with the base engine and then with an engine serving
the adapters: batch-1 decode tok/s (the first adapter's request) and offline throughput on the
``bench throughput`` workload (requests take the adapters in turn, every (N+1)-th the base model),
each after a warm-up. Prints both, and the ratio adapters / base. Random adapters: speed only.
``--max-loras`` (slots beyond the adapters, every projection adapted) measures what idle slots
cost: on a GPU each adapted layer's masked product runs over every slot; fewer slots than
adapters, with ``--max-cpu-loras``, what taking turns in the slots costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from flashserve.bench.throughput import workload
from flashserve.cli import add_engine_arguments, llm_kwargs

PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.set_defaults(model="qwen3-0.6b", load_format="dummy", max_model_len=2048)
    p.add_argument("--adapters", type=int, default=4, help="adapters served at once")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default=PROJECTIONS, help="comma-separated module names the adapters adapt")
    p.add_argument("--num-requests", type=int, default=256, help="throughput workload size")
    p.add_argument("--min-len", type=int, default=100, help="throughput workload: shortest prompt and output")
    p.add_argument("--max-len", type=int, default=1024, help="throughput workload: longest prompt and output")
    p.add_argument("--prompt-len", type=int, default=128, help="batch-1 prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="batch-1 decode length")
    p.add_argument("--output-json", default=None)


def write_random_adapters(model: torch.nn.Module, folder: Path, count: int, rank: int, targets: set[str],
                          seed: int = 0) -> dict[str, str]:
    """``count`` PEFT adapters of ``rank`` for every projection of ``model`` named in ``targets``
    (N(0, 1/in) A, N(0, 0.01) B); returns {name: folder}."""
    from safetensors.torch import save_file

    from flashserve.layers.linear import Linear

    shapes = {p.name: (m.in_features, p.size) for m in model.modules() if isinstance(m, Linear)
              for p in m.partitions if p.name.rsplit(".", 1)[-1] in targets}
    if not shapes:
        raise ValueError(f"the model has no linear layer named {sorted(targets)}")
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for i in range(count):
        state = {}
        for name, (k, n) in shapes.items():
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, k, generator=g) * k**-0.5
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.01
        out = folder / f"adapter{i}"
        out.mkdir()
        save_file(state, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(targets), "bias": "none"}))
        paths[f"adapter{i}"] = str(out)
    return paths


def measure(llm, names: list[str | None], args: argparse.Namespace) -> dict:
    """Batch-1 decode tok/s (``names[0]``'s) and the throughput workload's output tok/s (requests
    cycling through ``names``)."""
    from flashserve import SamplingParams

    engine = llm.engine
    engine.warm_up()
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(min(100, vocab // 2), vocab) for _ in range(args.prompt_len)]
    one = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, lora=names[0])
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, lora=names[0]), use_tqdm=False)
    tpot = llm.generate([prompt], one, use_tqdm=False)[0].metrics.time_per_output_token(args.new_tokens)
    prompts, lens = workload(args.num_requests, args.min_len, args.max_len, vocab)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, lora=names[i % len(names)])
              for i, n in enumerate(lens)]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = sum(len(o.token_ids) for o in llm.generate(prompts, params, use_tqdm=False))
    return {"decode_tok_s": 1.0 / tpot, "output_tok_s": out / (time.perf_counter() - start)}


def run(args: argparse.Namespace) -> int:
    from flashserve import LLM
    from flashserve.engine.warm_up import triton_cache_state

    cache = triton_cache_state()
    kwargs = llm_kwargs(args)
    kwargs.pop("lora_modules", None)
    slots = {k: kwargs.pop(k, None) for k in ("max_loras", "max_lora_rank", "max_cpu_loras")}  # the served engine's
    targets = set(args.targets.split(","))
    with tempfile.TemporaryDirectory(prefix="flashserve-lora-") as tmp:
        llm = LLM(**kwargs)
        if llm.engine.worker is None:
            raise SystemExit("bench lora needs the Worker in this process (--executor inproc)")
        adapters = write_random_adapters(llm.engine.worker.model, Path(tmp), args.adapters, args.rank, targets)
        base = measure(llm, [None], args)
        device = llm.engine.device
        llm.engine.shutdown()
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # adapters beyond the slots (--max-cpu-loras) are added later and take turns in the slots
        first = dict(list(adapters.items())[: slots["max_loras"] or len(adapters)])
        llm = LLM(**kwargs, **slots, lora_modules=first)
        for name in adapters.keys() - first.keys():
            llm.add_lora(name, adapters[name])
        served = measure(llm, [*adapters, None], args)
    res = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "triton_cache_at_start": cache, "adapters": args.adapters, "rank": args.rank, "targets": sorted(targets),
           **slots,
           "base": base, "lora": served,
           "ratio": {k: served[k] / base[k] for k in base}}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    room = f" in {slots['max_loras']} slots" if slots["max_loras"] else ""
    print(f"{args.model}, {args.adapters} adapters of rank {args.rank}{room}: batch-1 decode "
          f"{served['decode_tok_s']:.1f} "
          f"against {base['decode_tok_s']:.1f} tok/s ({res['ratio']['decode_tok_s']:.3f}x); throughput "
          f"{served['output_tok_s']:.0f} against {base['output_tok_s']:.0f} output tok/s "
          f"({res['ratio']['output_tok_s']:.3f}x); Triton cache {cache} at start")
    return 0
