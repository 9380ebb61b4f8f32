"""``flashserve bench compress-quality``: quality of every compression setting, one table.

Each setting runs the real tool (``flashserve compress prune`` / ``lowrank``) into a temporary
directory, then that directory is loaded as an ordinary engine and scored against the source on
the same text (flashserve.compress.evaluate; the reference is scored once). Settings are
``prune/<magnitude|wanda|heads>/<sparsity>``, ``prune/2:4/<magnitude|wanda>`` and
``lowrank/<whiten|diag|none>/<parameter share>``; ``--dirs`` adds existing model directories
(e.g. distilled students) to the same table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SETTINGS = (
    "prune/magnitude/0.3,prune/magnitude/0.5,prune/magnitude/0.7,prune/2:4/magnitude,"
    "prune/wanda/0.3,prune/wanda/0.5,prune/wanda/0.7,prune/2:4/wanda,"
    "prune/heads/0.3,prune/heads/0.5,"
    "lowrank/none/0.8,lowrank/none/0.6,lowrank/none/0.4,"
    "lowrank/whiten/0.8,lowrank/whiten/0.6,lowrank/whiten/0.4"
)


def tool_args(setting: str, model: str | None, output: str, device: str, calib_seqs: int, calib_len: int) -> argparse.Namespace:
    """The ``flashserve compress`` arguments of one setting string."""
    parts = setting.split("/")
    common = dict(model=model, output=output, device=device, save_dtype="float32", calibration_seqs=calib_seqs,
                  calibration_len=calib_len, calibration_text=[], eval_tokens=0, output_json=None)
    if len(parts) == 3 and parts[0] == "prune" and parts[1] == "2:4":
        return argparse.Namespace(tool="prune", method="2:4", sparsity=None, score=parts[2], **common)
    if len(parts) == 3 and parts[0] == "prune":
        return argparse.Namespace(tool="prune", method=parts[1], sparsity=float(parts[2]), score="wanda", **common)
    if len(parts) == 3 and parts[0] == "lowrank":
        return argparse.Namespace(tool="lowrank", scaling=parts[1], ratio=float(parts[2]), rank=None, energy=None, **common)
    raise ValueError(f"cannot read setting {setting!r}: expected prune/<method>/<sparsity>, prune/2:4/<score> or lowrank/<scaling>/<share>")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="source model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated settings (see the module doc)")
    p.add_argument("--dirs", default="", help="comma-separated model directories to score as well")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of GPL-3 scored")
    p.add_argument("--calibration-seqs", type=int, default=16)
    p.add_argument("--calibration-len", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", default=None, help="keep the written models under this folder instead of deleting them")
    p.add_argument("--output-json", default=None)


def text_scatter(points: list[tuple[float, float, str]], width: int = 64, height: int = 18) -> str:
    """A plain-text scatter plot: x linear, y logarithmic (y > 0), each point drawn as its label's
    first character; the legend lists the labels."""
    xs, ys = [p[0] for p in points], [math.log10(max(p[1], 1e-6)) for p in points]
    x0, x1 = min(xs + [0.0]), max(xs + [1.0])
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
    y1 = y1 if y1 > y0 else y0 + 1
    grid = [[" "] * width for _ in range(height)]
    marks = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    for i, (x, y) in enumerate(zip(xs, ys)):
        col = round((x - x0) / (x1 - x0) * (width - 1))
        row = height - 1 - round((y - y0) / (y1 - y0) * (height - 1))
        grid[row][col] = marks[i % len(marks)]
    lines = []
    for r, cells in enumerate(grid):
        label = f"{10 ** (y1 - r * (y1 - y0) / (height - 1)):9.3g} |" if r % 3 == 0 else " " * 10 + "|"
        lines.append(label + "".join(cells))
    lines.append(" " * 10 + "+" + "-" * width)
    lines.append(" " * 11 + f"{x0:<{width // 2}.2f}{x1:>{width - width // 2}.2f}")
    lines += [f"  {marks[i % len(marks)]}: {p[2]}" for i, p in enumerate(points)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from flashserve.compress.cli import compress
    from flashserve.compress.evaluate import ReferenceScores, decode_weights

    settings = [s for s in args.settings.split(",") if s]
    dirs = [d for d in args.dirs.split(",") if d]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="flashserve-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    for s in settings:  # every setting readable before anything runs
        tool_args(s, args.model, "", args.device, 1, 2)
    t0 = time.perf_counter()
    ref = ReferenceScores(args.model, args.eval_tokens, device=args.device)
    source_weights = decode_weights(args.model)
    rows: list[dict[str, Any]] = []
    try:
        for s in settings:
            out = root / s.replace("/", "_").replace(":", "-")
            summary = compress(tool_args(s, args.model, str(out), args.device, args.calibration_seqs, args.calibration_len))
            report = ref.evaluate(str(out))
            rows.append({"setting": s, "linear_param_share": summary["linear_param_share"], "params": summary["params"],
                         "decode_weight_share": decode_weights(str(out)) / source_weights,
                         "compress_seconds": summary["compress_seconds"], **report.__dict__,
                         "perplexity_change": report.perplexity_change})
            print(f"{s}: perplexity {report.perplexity:.3f} ({100 * report.perplexity_change:+.1f}%), KL {report.kl_divergence:.4f}, "
                  f"top-1 {100 * report.top1_agreement:.1f}%", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        for d in dirs:
            report = ref.evaluate(d)
            rows.append({"setting": d, "decode_weight_share": decode_weights(d) / source_weights, **report.__dict__,
                         "perplexity_change": report.perplexity_change})
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res = {"model": args.model or "SmolLM2-135M-Instruct", "eval_tokens": len(ref.token_ids),
           "reference_perplexity": rows[0]["reference_perplexity"] if rows else float("nan"), "calibration": [args.calibration_seqs, args.calibration_len],
           "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t0, "rows": rows}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"\n{res['model']}, {res['eval_tokens']} tokens of GPL-3 (reference perplexity {res['reference_perplexity']:.3f})")
    print("| setting | decoder linear weights kept | weights read per decoded token | perplexity | change | KL (nats) | top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kept = f"{100 * r['linear_param_share']:.0f}%" if "linear_param_share" in r else ""
        print(f"| {r['setting']} | {kept} | {100 * r['decode_weight_share']:.0f}% | {r['perplexity']:.3f} | "
              f"{100 * r['perplexity_change']:+.1f}% | {r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.1f}% |")
    if rows:
        print("\nKL against the source (nats, log scale) vs weights read per decoded token (share of the source):")
        print(text_scatter([(r["decode_weight_share"], r["kl_divergence"], r["setting"]) for r in rows]))
    return 0

