"""``flashserve bench cascade``: what a small-then-large cascade saves and what it changes.

On a fixed set of short questions (flashserve.compress.prompts.CASCADE_QUESTIONS, greedy; through
each model's chat template, or as plain ``Question: ...\\nAnswer:`` completions when a model has
none, as a pretrained base model such as Gemma 3 270M), the large model's own answers are the
reference. For each threshold the cascade (flashserve.engine.cascade) really runs and reports:
the share of requests the small model answered, the share of answers identical to the large
model's (exact token ids, and the mean share of the large answer's tokens matched before the
first difference), the compute saved against the large model alone (matmul FLOPs: 2 x weights of
the linears and LM head per token, prompt and generated tokens, the small model counted on every
request) and the wall time against the large model alone. A threshold fitted on the first half
of the questions (``--fit-target``) is then measured on the second half.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from flashserve.compress.prompts import CASCADE_QUESTIONS

PLAIN_PROMPT = "Question: {}\nAnswer:"  # the questions as completions, for models without a chat template


def make_requests(small: Any, large: Any, questions: Sequence[str]) -> tuple[list[Any], bool]:
    """(requests, whether they are chat conversations): conversations when both models have a
    chat template, else plain completion prompts."""
    if all(getattr(m.engine.tokenizer, "chat_template", None) for m in (small, large)):
        return [[{"role": "user", "content": q}] for q in questions], True
    return [PLAIN_PROMPT.format(q) for q in questions], False


def ask(model: Any, requests: list[Any], params: Any, chat: bool) -> list[Any]:
    """Answers of an ``LLM`` or a ``CascadeLLM`` to chat conversations or plain prompts."""
    return model.chat(requests, params, use_tqdm=False) if chat else model.generate(requests, params, use_tqdm=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", required=True, help="the small model (a directory, e.g. from flashserve distill)")
    p.add_argument("--large", default=None, help="the large model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rule", default="mean_logprob", choices=["mean_logprob", "min_margin"])
    p.add_argument("--thresholds", default="0.4,0.6,0.8", help="comma-separated thresholds in [0, 1]")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--num-questions", type=int, default=len(CASCADE_QUESTIONS),
                   help=f"the first N of the {len(CASCADE_QUESTIONS)} fixed questions (a smaller run on a slow machine)")
    p.add_argument("--fit-target", type=float, default=0.9, help="agreement the fitted threshold must reach on the calibration half")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output-json", default=None)


def matmul_params(llm: Any) -> int:
    """Weights multiplied per token: the decoder linears and the LM head (not the embedding lookup)."""
    from flashserve.compress.layers import LowRankMethod
    from flashserve.layers.linear import Linear

    total = 0
    for m in llm.engine.worker.model.modules():  # counted from shapes, whatever the storage (GGUF blocks, ...)
        if isinstance(m, Linear):
            method = m.quant_method
            total += method.rank * (m.in_features + m.out_features) if isinstance(method, LowRankMethod) \
                else m.in_features * m.out_features
    return total


def prefix_share(a: list[int], ref: list[int]) -> float:
    """Share of ``ref``'s tokens that ``a`` matches before their first difference."""
    n = 0
    for x, y in zip(a, ref):
        if x != y:
            break
        n += 1
    return n / max(len(ref), 1)


def measure(cascade: Any, conversations: list, params: Any, reference: list, costs: tuple[int, int],
            large_seconds: float, chat: bool = True) -> dict[str, Any]:
    """Run the cascade on ``conversations`` (plain prompts when not ``chat``) and compare with the
    large model's ``reference`` answers."""
    from flashserve.engine.cascade import CascadeCounters

    cascade.counters = CascadeCounters()
    t0 = time.perf_counter()
    outs = ask(cascade, conversations, params, chat)
    wall = time.perf_counter() - t0
    c = cascade.counters
    conf = sorted(o.confidence for o in outs if o.confidence is not None)
    baseline = sum(len(r.prompt_token_ids) + len(r.token_ids) for r in reference) * costs[1]
    spent = c.small_tokens * costs[0] + c.large_tokens * costs[1]
    return {
        "threshold": cascade.rule.threshold,
        "requests": len(outs),
        "small_share": c.small / len(outs),
        "exact_agreement": sum(o.output.token_ids == r.token_ids for o, r in zip(outs, reference)) / len(outs),
        "prefix_agreement": sum(prefix_share(o.output.token_ids, r.token_ids) for o, r in zip(outs, reference)) / len(outs),
        "compute_saved": 1.0 - spent / baseline,
        "wall_s": wall,
        "wall_saved": 1.0 - wall / large_seconds,
        # the small model's confidences (min, quartiles, max): where thresholds that split the requests lie
        "confidence_quantiles": [conf[round(q * (len(conf) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)] if conf else None,
    }


def run(args: argparse.Namespace) -> int:
    from flashserve.engine.cascade import CascadeLLM, ConfidenceRule
    from flashserve.engine.llm import LLM
    from flashserve.sampling_params import SamplingParams

    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if not 2 <= args.num_questions <= len(CASCADE_QUESTIONS):
        raise ValueError(f"--num-questions must be in [2, {len(CASCADE_QUESTIONS)}] (half calibrate the fitted "
                         f"threshold, half test it), got {args.num_questions}")
    for t in thresholds:
        ConfidenceRule(args.rule, t)  # validates
    common = dict(device=args.device, dtype=args.dtype, max_model_len=512, max_num_seqs=64, verbose=False)
    small, large = LLM(args.small, **common), LLM(args.large, **common)
    costs = (2 * matmul_params(small), 2 * matmul_params(large))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    conversations, chat = make_requests(small, large, CASCADE_QUESTIONS[: args.num_questions])
    ask(large, conversations[:4], params, chat)  # warm-up
    t0 = time.perf_counter()
    reference = ask(large, conversations, params, chat)
    large_s = time.perf_counter() - t0
    cascade = CascadeLLM(small, large, ConfidenceRule(args.rule, 0.0))
    rows = []
    for t in [0.0, *thresholds, 1.0]:
        cascade.rule = ConfidenceRule(args.rule, t)
        rows.append(measure(cascade, conversations, params, reference, costs, large_s, chat))
    half = len(conversations) // 2
    cascade.rule = ConfidenceRule(args.rule, 0.0)
    calib = [small.engine.apply_chat_template(c) for c in conversations[:half]] if chat else conversations[:half]
    fitted = cascade.fit_threshold(calib, params, args.fit_target, add_special_tokens=not chat)  # a template holds the BOS
    t0 = time.perf_counter()
    ask(large, conversations[half:], params, chat)
    fit_row = measure(cascade, conversations[half:], params, reference[half:], costs, time.perf_counter() - t0, chat)
    res = {"small": args.small, "large": args.large or "SmolLM2-135M-Instruct", "rule": args.rule,
           "prompts": "chat template" if chat else "plain: " + PLAIN_PROMPT,
           "max_tokens": args.max_tokens, "questions": len(conversations), "matmul_params": {"small": costs[0] // 2, "large": costs[1] // 2},
           "large_alone_s": large_s, "thresholds": rows,
           "fitted": {"target_agreement": args.fit_target, "threshold": fitted, "calibration_questions": half, **fit_row}}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"cascade {res['small']} -> {res['large']}, rule {args.rule}, {len(conversations)} questions "
          f"({'through the chat template' if chat else 'as plain completion prompts'}), "
          f"matmul weights {costs[0] / 2e6:.0f}M / {costs[1] / 2e6:.0f}M; large alone {large_s:.1f}s")
    spread = rows[0]["confidence_quantiles"]  # threshold 0: the small model answered every question
    print(f"small model's confidence ({args.rule}) over the questions: min {spread[0]:.3f}, quartiles "
          f"{spread[1]:.3f} / {spread[2]:.3f} / {spread[3]:.3f}, max {spread[4]:.3f}")
    print("| threshold | answered by small | exact agreement | prefix agreement | compute saved | wall time | wall saved |")
    print("|---|---|---|---|---|---|---|")
    for r in rows + [fit_row]:
        label = f"{r['threshold']:.3f}" + (" (fitted, test half)" if r is fit_row else "")
        print(f"| {label} | {100 * r['small_share']:.0f}% | {100 * r['exact_agreement']:.0f}% | {100 * r['prefix_agreement']:.0f}% | "
              f"{100 * r['compute_saved']:+.0f}% | {r['wall_s']:.1f}s | {100 * r['wall_saved']:+.0f}% |")
    return 0
