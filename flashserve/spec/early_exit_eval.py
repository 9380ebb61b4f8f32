"""``flashserve bench early-exit``: what confidence-based early exit costs and saves, on real text.

One engine (the model at its own quantization: the embedded SmolLM2 stays a packed Q4_1 GGUF)
scores a text token by token (``LLMEngine.score`` with one-token chunks: the decode path that
early exit replaces), first with the full model (the reference), then once per threshold through
``EarlyExitModel`` on the same weights and cache. Per threshold: perplexity, KL(full || early
exit) and top-1 agreement with the full model (``flashserve.bench.quality.compare``), the share
of tokens that left before the last layer, the layers fully computed per token, and the decode
matmul work per token against the full model's, counting what early exit adds: a "softmax" test
is one LM-head product per token per exit layer tested, and every layer after an exit still
computes the token's q/k/v projection for its K/V.

Quality is measured with the reference's own tokens (teacher forcing): an exited token's K/V
feeds every later position, so errors accumulate as they would when generating.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

from flashserve.config import EarlyExitConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flashserve.cli import add_engine_arguments

    add_engine_arguments(p)  # --early-exit-config sets the measure and exit layers; --thresholds the rest
    p.add_argument("--thresholds", default="0.95,0.9,0.8,0.6", help="comma-separated confidence thresholds in (0, 1]")
    p.add_argument("--text", action="append", default=[], help="text file to score (repeatable; default: Debian's GPL-3)")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens of the text scored")
    p.add_argument("--output-json", default=None)


def _thresholds(value: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--thresholds must be comma-separated numbers, got {value!r}") from None
    if not out:
        raise ValueError("--thresholds is empty")
    for t in out:
        EarlyExitConfig(threshold=t)  # (0, 1], else a clear error
    return out


def matmul_macs(config) -> dict[str, int]:
    """Multiply-accumulates per token of one decoder layer's linears, of its q/k/v projection
    alone, and of the LM head (from the model's shapes; attention over the context not counted)."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    qkv = h * (q + 2 * kv)
    return {"layer": qkv + q * h + 3 * h * config.intermediate_size, "qkv": qkv, "head": h * config.vocab_size}


def sweep(engine, ids: list[int], thresholds: list[float]) -> list[dict]:
    """Score ``ids`` token by token with the full model, then through early exit at each threshold
    (the engine's early-exit measure and exit layers); one row per threshold."""
    from flashserve.bench.quality import compare
    from flashserve.spec.early_exit import EarlyExitModel

    worker = engine.worker
    if worker is None or worker.early_exit is None:
        raise ValueError("bench early-exit needs an in-process engine built with an early_exit_config")
    mc = engine.model_config
    macs = matmul_macs(mc)
    full_macs = mc.num_layers * macs["layer"] + macs["head"]
    exit_model = worker.early_exit
    worker.early_exit = None  # the reference: the full model, token by token
    try:
        reference = [chunk.clone() for chunk in engine.score(ids, chunk_size=1)]
        rows = []
        for t in thresholds:
            ee = worker.early_exit = EarlyExitModel(worker.model, replace(exit_model.config, threshold=t))
            t0 = time.perf_counter()
            rep = compare(engine.score(ids, chunk_size=1), reference, ids)
            n = ee.tokens
            propagated = sum(c * (mc.num_layers - layer) for layer, c in ee.exits_at.items())  # layers: K/V only
            tests = ee.tests if ee.config.measure == "softmax" else 0
            work = ee.layers_run * macs["layer"] + propagated * macs["qkv"] + (tests + n) * macs["head"]
            rows.append({"threshold": t, "tokens": rep.num_tokens, "perplexity": rep.perplexity,
                         "reference_perplexity": rep.reference_perplexity,
                         "perplexity_change": rep.perplexity_change, "kl": rep.kl_divergence,
                         "top1_agreement": rep.top1_agreement, "exit_share": ee.exit_share,
                         "layers_per_token": ee.layers_per_token, "exits_at": dict(sorted(ee.exits_at.items())),
                         "tests_per_token": ee.tests / n, "work_vs_full": work / (n * full_macs),
                         "seconds": round(time.perf_counter() - t0, 1)})
    finally:
        worker.early_exit = exit_model
    return rows


def run_sweep(args: argparse.Namespace) -> dict:
    from flashserve.bench import cpu_model
    from flashserve.bench.quality import read_texts
    from flashserve.cli import llm_kwargs
    from flashserve.engine.llm import LLM

    thresholds = _thresholds(args.thresholds)
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    kwargs = llm_kwargs(args)
    base = EarlyExitConfig.parse(kwargs.get("early_exit_config")) or EarlyExitConfig()
    kwargs["early_exit_config"] = asdict(replace(base, threshold=thresholds[0]))
    engine = LLM(**kwargs, verbose=False).engine
    ids = engine.encode(read_texts(args.text))[: min(args.max_tokens, engine.max_model_len - 1)]
    t0 = time.perf_counter()
    rows = sweep(engine, ids, thresholds)
    exits = sorted(engine.worker.early_exit.exits)
    engine.shutdown()
    return {"model": kwargs.get("model") or "SmolLM2-135M-Instruct (embedded)", "quantization": kwargs.get("quantization"),
            "measure": base.measure, "exit_layers": exits, "num_layers": engine.model_config.num_layers,
            "device": str(engine.device), "cpu": cpu_model() if engine.device.type == "cpu" else None,
            "tokens": len(ids) - 1, "texts": args.text or ["GPL-3"], "seconds": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def print_sweep(res: dict) -> None:
    print(f"early exit ({res['measure']}, exit layers {res['exit_layers']} of {res['num_layers']}), "
          f"{res['tokens']} tokens of {', '.join(res['texts'])}, device {res['device']}"
          f"{' (' + res['cpu'] + ')' if res['cpu'] else ''}, {res['date']}")
    print(f"{'threshold':>9} {'ppl':>8} {'change':>8} {'KL':>7} {'top-1':>6} {'exited':>7} {'layers':>6} "
          f"{'work':>5}  exits per layer")
    for r in res["rows"]:
        print(f"{r['threshold']:>9g} {r['perplexity']:>8.3f} {100 * r['perplexity_change']:>+7.1f}% {r['kl']:>7.4f} "
              f"{100 * r['top1_agreement']:>5.1f}% {100 * r['exit_share']:>6.1f}% {r['layers_per_token']:>6.2f} "
              f"{100 * r['work_vs_full']:>4.0f}%  {r['exits_at']}")
    print(f"full model: perplexity {res['rows'][0]['reference_perplexity']:.3f}, {res['num_layers']} layers, "
          f"work 100% (work: decode matmul MACs per token against the full model's)")


def run(args: argparse.Namespace) -> int:
    res = run_sweep(args)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print_sweep(res)
    return 0
