"""``flashserve compress``: prune or factorise a model and write it as a model directory.

    flashserve compress prune   [--model M] --method magnitude|wanda|2:4|heads [--sparsity S] --output DIR
    flashserve compress lowrank [--model M] (--ratio R | --rank K | --energy E) --output DIR

M defaults to the embedded SmolLM2. Each prints what it wrote and the result's quality against
M on Debian's GPL-3 text (``--eval-tokens 0`` skips that). The directory loads with
``LLM(DIR)`` and ``flashserve serve --model DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="source model: HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="directory to write (created; an existing model there is replaced)")
    p.add_argument("--device", default="auto", help="where to compute: auto, cpu, cuda (the weights are written to disk either way)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights")
    p.add_argument("--calibration-seqs", type=int, default=32, help="calibration sequences (Debian license texts other than the GPL family)")
    p.add_argument("--calibration-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--calibration-text", action="append", default=[], help="calibration text file instead of the defaults (repeatable)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="score the result on this many GPL-3 tokens against the source (0: skip)")
    p.add_argument("--output-json", default=None, help="also write the summary here")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tool", required=True)
    pr = sub.add_parser("prune", help="magnitude / Wanda unstructured, 2:4 semi-structured, or structured heads and MLP channels")
    _common(pr)
    pr.add_argument("--method", required=True, choices=["magnitude", "wanda", "2:4", "heads"])
    pr.add_argument("--sparsity", type=float, default=None, help="share of weights (heads: of heads and MLP channels) removed, in [0, 1)")
    pr.add_argument("--score", default="wanda", choices=["wanda", "magnitude"], help="scores that pick the 2 of every 4 weights (--method 2:4)")
    lr = sub.add_parser("lowrank", help="truncated (activation-aware) SVD, served as two thin linears")
    _common(lr)
    lr.add_argument("--ratio", type=float, default=None, help="share of each matrix's parameters to keep, in (0, 1]")
    lr.add_argument("--rank", type=int, default=None, help="the same rank for every matrix")
    lr.add_argument("--energy", type=float, default=None, help="keep this share of each (scaled) matrix's squared singular values")
    lr.add_argument("--scaling", default="whiten", choices=["whiten", "diag", "none"], help="activation-aware scaling of the SVD")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but CUDA is not available on this machine")
    return device


def calibration_for(src: Any, args: argparse.Namespace) -> list[list[int]]:
    from flashserve.compress.calibration import calibration_sequences

    if src.tokenizer is None:
        raise ValueError(f"{src.path} has no tokenizer; calibration text cannot be encoded")
    return calibration_sequences(lambda s: src.tokenizer.encode(s, add_special_tokens=False),
                                 args.calibration_seqs, args.calibration_len, args.calibration_text)


def compress(args: argparse.Namespace) -> dict[str, Any]:
    """Run one tool; returns the summary that ``run`` prints (the model is written to ``args.output``)."""
    from flashserve.compress.model_io import (check_output, count_parameters, hf_state_dict, load_source, refuse_low_rank,
                                              write_model_dir)

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    src = load_source(args.model, device)
    check_output(args.output, src.path)
    refuse_low_rank(src, f"compress {args.tool}")
    params_before = count_parameters(src.model)
    linear_before = count_parameters(src.model, decoder_linears_only=True)
    summary: dict[str, Any] = {"tool": args.tool, "source": src.path, "output": args.output}
    compression: dict[str, Any] = {"tool": f"flashserve compress {args.tool}", "source": src.path}
    config_json = src.config_json
    if args.tool == "prune":
        from flashserve.compress.prune import check_sparsity, prune_model, slim_state_dict

        sparsity = check_sparsity(args.method, args.sparsity)
        needs = args.method in ("wanda", "heads") or (args.method == "2:4" and args.score == "wanda")
        calib = calibration_for(src, args) if needs and sparsity > 0 else None
        result = prune_model(src.model, args.method, sparsity, calib, args.score)
        tensors = hf_state_dict(src.model)
        compression.update(method=args.method, sparsity=sparsity)
        if args.method == "2:4":
            compression.update(semi_structured="2:4", score=args.score)
        if args.method == "heads" and result.heads:
            tensors, config_json = slim_state_dict(tensors, config_json, result, src.config.head_dim)
        linear_after = sum(t.numel() for n, t in tensors.items() if ".layers." in n and "_proj." in n and n.endswith("weight"))
        if result.masks:
            linear_after -= sum(int((~m).sum()) for m in result.masks.values())
        summary.update(method=args.method, sparsity=sparsity, zeroed_share_of_masked=result.masked_share())
    else:
        from flashserve.compress.lowrank import check_rule, lowrank_model

        check_rule(args.ratio, args.rank, args.energy)
        calib = calibration_for(src, args) if args.scaling != "none" else None
        ranks = lowrank_model(src.model, args.ratio, args.rank, args.energy, args.scaling, calib)
        tensors = hf_state_dict(src.model)
        compression.update(low_rank=ranks, scaling=args.scaling, ratio=args.ratio, rank=args.rank, energy=args.energy)
        linear_after = count_parameters(src.model, decoder_linears_only=True)
        summary.update(scaling=args.scaling, ratio=args.ratio, rank=args.rank, energy=args.energy,
                       min_rank=min(ranks.values()), max_rank=max(ranks.values()))
    if args.calibration_text:
        compression["calibration_text"] = list(args.calibration_text)
    save_dtype = getattr(torch, args.save_dtype)
    out = write_model_dir(args.output, tensors, config_json, src.tokenizer, compression, save_dtype)
    params_after = params_before - linear_before + linear_after
    summary.update(decoder_linear_params=linear_after, decoder_linear_params_source=linear_before,
                   linear_param_share=linear_after / linear_before, params=params_after, params_source=params_before,
                   compress_seconds=time.perf_counter() - t0)
    del src
    print(f"wrote {out}: {linear_after / 1e6:.2f}M of the source's {linear_before / 1e6:.2f}M decoder linear weights kept "
          f"({100 * linear_after / linear_before:.1f}%), {params_after / 1e6:.1f}M parameters in all, "
          f"{summary['compress_seconds']:.1f}s", flush=True)
    if args.eval_tokens > 0:
        from flashserve.compress.evaluate import quality_summary

        summary["quality"] = quality_summary(args.model, str(out), args.eval_tokens, str(device))
    return summary


def run_tool(tool: Callable[[argparse.Namespace], dict], args: argparse.Namespace, name: str) -> int:
    """Run a compression command: its summary to ``--output-json``; a user mistake (ValueError,
    FileNotFoundError) is one error line and exit code 2."""
    try:
        summary = tool(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"flashserve {name}: error: {e}", file=sys.stderr)
        return 2
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_tool(compress, args, f"compress {args.tool}")
