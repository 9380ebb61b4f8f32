"""``flashserve bench cpu-decode``: decode speed of the embedded model, flashserve vs transformers.

Both run in this process on the same machine, same threads, same fp32 weights (the SmolLM2 Q4_1
GGUF dequantized by each), the same prompt and the same number of greedy tokens. Runs alternate
(flashserve, transformers, flashserve, ...) and the median of each is reported, so drift in the
machine's speed hits both alike.

Decode time excludes the prompt: for transformers it is generate(N tokens) minus generate(1 token);
for flashserve it is the request's time per output token (first token to last).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="identical prompts decoded together")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output-json", default=None)


def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


def _hf_time(model, ids: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + n
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    from flashserve import LLM, SamplingParams
    from flashserve.loader import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    n, b = args.new_tokens, args.batch
    llm = LLM(device="cpu", max_model_len=1024, kv_cache_bytes=256 << 20, verbose=False)
    hf = _hf_model(default_model_path())
    text = llm.engine.apply_chat_template(PROMPT)
    prompt_ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids] * b)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    # Warm up both (allocator, kernels), and check they agree on the greedy tokens.
    ours_tokens = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0].token_ids
    with torch.inference_mode():
        ref = hf.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(prompt_ids):].tolist()
    agree = ours_tokens == ref

    ours_tpot, hf_tpot, ours_total, hf_total = [], [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate([prompt_ids] * b, params, use_tqdm=False)
        ours_total.append(time.perf_counter() - start)
        ours_tpot.append(max(o.metrics.time_per_output_token(n) for o in outs))
        total = _hf_time(hf, ids, n)
        first = _hf_time(hf, ids, 1)
        hf_total.append(total)
        hf_tpot.append((total - first) / (n - 1))
    res = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch": b,
        "new_tokens": n,
        "prompt_tokens": len(prompt_ids),
        "greedy_tokens_agree_16": agree,
        "flashserve_decode_tok_s": b / statistics.median(ours_tpot),
        "transformers_decode_tok_s": b / statistics.median(hf_tpot),
        "flashserve_e2e_s": statistics.median(ours_total),
        "transformers_e2e_s": statistics.median(hf_total),
    }
    res["decode_speedup"] = res["flashserve_decode_tok_s"] / res["transformers_decode_tok_s"]
    res["e2e_speedup"] = res["transformers_e2e_s"] / res["flashserve_e2e_s"]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"SmolLM2-135M fp32 on CPU ({res['threads']} threads), batch {b}, prompt {len(prompt_ids)}, {n} new tokens, median of {args.repeats}")
    print(f"{'':14}{'decode tok/s':>14}{'end-to-end s':>14}")
    print(f"{'flashserve':14}{res['flashserve_decode_tok_s']:14.1f}{res['flashserve_e2e_s']:14.2f}")
    print(f"{'transformers':14}{res['transformers_decode_tok_s']:14.1f}{res['transformers_e2e_s']:14.2f}")
    print(f"decode speedup {res['decode_speedup']:.2f}x, end-to-end speedup {res['e2e_speedup']:.2f}x; greedy tokens agree: {agree}")
    return 0
