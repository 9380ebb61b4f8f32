"""``flashserve bench cpu-decode``: decode speed of a GGUF model on this CPU, flashserve against
transformers and llama.cpp in the same process.

All run the same GGUF file (the embedded SmolLM2-135M-Instruct Q4_1 unless ``--model`` names
another, e.g. Gemma 3 270M's Q4_K_M), the same chat prompt (as plain text for a model without a
chat template), the same number of greedy tokens and the same thread count:

* flashserve as configured by default: the GGUF tensors kept packed, products in its native CPU
  kernels (``--quantization``/``--dtype`` change it; ``--with-fp32`` adds a run of the exact fp32
  path, ``--dtype float32``);
* transformers' ``generate`` on the GGUF dequantized to fp32 (its only way to read a GGUF);
* llama.cpp through llama-cpp-python (``pip install llama-cpp-python``, built natively on the
  machine: ``CMAKE_ARGS="-DGGML_NATIVE=ON"``; skipped with a note when not installed), which
  computes on the file's blocks with Q8 activations.

Runs alternate (flashserve, transformers, llama.cpp, ...) and the median of each is reported,
so drift in the machine's speed hits all alike. Decode time excludes the prompt: flashserve's
time per output token (first token to last); transformers' generate(N) minus generate(1); for
llama.cpp the N - 1 single-token evaluations after the first. Also reported: the time each
takes to load the model (imports excluded), and whether the greedy tokens agree with
flashserve's exact fp32 path. The CPU model is printed with the figures.
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
    p.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads for all three (default: torch's choice)")
    p.add_argument("--quantization", default="auto", help="flashserve's --quantization (default: the GGUF packed)")
    p.add_argument("--dtype", default="auto", help="flashserve's --dtype")
    p.add_argument("--with-fp32", action="store_true", help="also time flashserve's exact fp32 path")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-llama-cpp", action="store_true")
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


class LlamaCpp:
    """llama.cpp on the same GGUF, greedy decoding token by token."""

    def __init__(self, path: str, threads: int, n_ctx: int = 1024) -> None:
        from llama_cpp import Llama, llama_print_system_info

        self.system_info = llama_print_system_info().decode(errors="replace").strip()
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False)

    def greedy(self, prompt_ids: list[int], n: int) -> tuple[list[int], float]:
        """(tokens, seconds of the n - 1 decode steps after the first token)."""
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval(prompt_ids)
        tokens = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return tokens, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    from flashserve import LLM, SamplingParams
    from flashserve.bench import cpu_model
    from flashserve.loader import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    n = args.new_tokens
    path = args.model or default_model_path()
    common = dict(model=path, device="cpu", max_model_len=1024, kv_cache_bytes=256 << 20, verbose=False)
    t0 = time.perf_counter()
    llm = LLM(**common, quantization=args.quantization, dtype=args.dtype)
    load = {"flashserve": time.perf_counter() - t0}
    engines = {"flashserve": llm}
    if args.with_fp32:
        engines["flashserve fp32"] = LLM(**common, dtype="float32")
    if getattr(llm.tokenizer, "chat_template", None):
        prompt_ids = llm.tokenizer(llm.engine.apply_chat_template(PROMPT), add_special_tokens=False)["input_ids"]
    else:  # a base model (Gemma 3 270M's GGUF has no chat template): the request as plain text, after BOS
        prompt_ids = llm.tokenizer(PROMPT[0]["content"])["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    check = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    exact = engines.get("flashserve fp32") or LLM(**common, dtype="float32")
    exact_tokens = exact.generate([prompt_ids], check, use_tqdm=False)[0].token_ids
    agree = {name: e.generate([prompt_ids], check, use_tqdm=False)[0].token_ids == exact_tokens
             for name, e in engines.items()}

    hf = None
    if not args.no_transformers:
        t0 = time.perf_counter()
        hf = _hf_model(path)
        load["transformers"] = time.perf_counter() - t0
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                              do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(prompt_ids):].tolist()
        agree["transformers"] = ref == exact_tokens
    lcpp, lcpp_note = None, None
    if not args.no_llama_cpp:
        try:
            t0 = time.perf_counter()
            lcpp = LlamaCpp(path, threads)
            load["llama.cpp"] = time.perf_counter() - t0
            agree["llama.cpp"] = lcpp.greedy(prompt_ids, 16)[0] == exact_tokens
        except ImportError:
            lcpp_note = "llama-cpp-python is not installed (pip install llama-cpp-python, built natively)"

    tpot: dict[str, list[float]] = {name: [] for name in [*engines, "transformers", "llama.cpp"]}
    for _ in range(args.repeats):
        for name, e in engines.items():
            out = e.generate([prompt_ids], params, use_tqdm=False)[0]
            tpot[name].append(out.metrics.time_per_output_token(n))
        if hf is not None:
            total, first = _hf_time(hf, ids, n), _hf_time(hf, ids, 1)
            tpot["transformers"].append((total - first) / (n - 1))
        if lcpp is not None:
            tpot["llama.cpp"].append(lcpp.greedy(prompt_ids, n)[1] / (n - 1))
    tok_s = {name: 1.0 / statistics.median(v) for name, v in tpot.items() if v}
    res = {
        "model": os.path.basename(path), "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "new_tokens": n, "prompt_tokens": len(prompt_ids), "repeats": args.repeats,
        "flashserve_options": {"quantization": args.quantization, "dtype": args.dtype},
        "decode_tok_s": tok_s, "load_s": load, "greedy_16_equal_fp32_exact": agree,
    }
    if lcpp is not None:
        res["llama_cpp_system_info"] = lcpp.system_info
    if "llama.cpp" in tok_s:
        res["flashserve_over_llama_cpp"] = tok_s["flashserve"] / tok_s["llama.cpp"]
    if "transformers" in tok_s:
        res["flashserve_over_transformers"] = tok_s["flashserve"] / tok_s["transformers"]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"{os.path.basename(path)} on {res['cpu']} ({res['cpu_capability']}), {threads} threads, prompt "
          f"{len(prompt_ids)} tokens, {n} new tokens, median of {args.repeats}")
    if lcpp_note:
        print(f"llama.cpp skipped: {lcpp_note}")
    print(f"{'':18}{'decode tok/s':>14}{'load s':>9}{'greedy = fp32':>15}")
    for name, v in tok_s.items():
        print(f"{name:18}{v:14.1f}{load.get(name, float('nan')):9.2f}{str(agree.get(name, '')):>15}")
    ratios = [f"{res[k]:.2f}x {k.split('_over_')[1].replace('_', '.')}" for k in
              ("flashserve_over_llama_cpp", "flashserve_over_transformers") if k in res]
    if ratios:
        print("flashserve decode: " + ", ".join(ratios))
    return 0
