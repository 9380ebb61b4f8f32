"""``flashserve bench quality``: what a lossy option costs, measured on real text.

A candidate engine (any engine options: a quantization, a KV-cache dtype, a pruned model
directory, an attention window) and a reference engine (the same model without those options,
or ``--reference-model``) read the same token sequence, teacher-forced, chunk by chunk through
their paged KV caches (``LLMEngine.score``). Reported per engine: perplexity of the text; and for
the candidate against the reference: mean KL(reference || candidate) of the next-token
distributions and the share of positions whose most likely token agrees (top-1 agreement).

The default text is the license texts that Debian's base-files package installs
(``/usr/share/common-licenses``), read at run time; ``--text FILE`` (repeatable) picks others.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LICENSES_DIR = Path("/usr/share/common-licenses")
DEFAULT_TEXTS = ("GPL-3",)


@dataclass(frozen=True)
class QualityReport:
    """Quality of a candidate against a reference over ``num_tokens`` predicted positions."""

    num_tokens: int
    perplexity: float  # candidate
    reference_perplexity: float
    kl_divergence: float  # mean over positions of KL(reference || candidate), nats
    top1_agreement: float  # share of positions where both argmaxes agree

    @property
    def perplexity_change(self) -> float:
        """Relative change of the candidate's perplexity over the reference's."""
        return self.perplexity / self.reference_perplexity - 1.0


def read_texts(paths: Sequence[str] = ()) -> str:
    """Concatenate the given files, or by default the license texts named in ``DEFAULT_TEXTS``."""
    files = [Path(p) for p in paths] or [LICENSES_DIR / name for name in DEFAULT_TEXTS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"text file(s) not found: {', '.join(missing)}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def license_corpus(min_tokens: int, encode) -> list[int]:
    """Token ids of Debian's license texts concatenated (sorted by name) until at least
    ``min_tokens`` tokens are reached; raises if the folder does not hold enough text."""
    ids: list[int] = []
    for f in sorted(LICENSES_DIR.glob("*")):
        if f.is_file():
            ids += encode(f.read_text(encoding="utf-8", errors="replace") + "\n\n")
            if len(ids) >= min_tokens:
                return ids[:min_tokens]
    raise ValueError(f"{LICENSES_DIR} holds only {len(ids)} tokens of text, {min_tokens} were asked for")


def compare(candidate: Iterable[torch.Tensor], reference: Iterable[torch.Tensor], token_ids: list[int]) -> QualityReport:
    """Accumulate perplexities, KL and top-1 agreement over two streams of [n, V] log-prob chunks
    (``LLMEngine.score`` of the same ``token_ids``)."""
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for cand, ref in zip(candidate, reference, strict=True):
        n = cand.shape[0]
        if ref.shape[0] != n:
            raise ValueError(f"score chunks differ in length ({n} vs {ref.shape[0]}); use the same chunk size")
        cand, ref = cand.float(), ref.to(cand.device).float()
        vocab = min(cand.shape[1], ref.shape[1])  # padded vocabularies: compare the real ids
        cand, ref = cand[:, :vocab], ref[:, :vocab]
        target = torch.tensor(token_ids[count + 1 : count + 1 + n], device=cand.device)
        nll -= cand.gather(1, target[:, None]).sum().item()
        ref_nll -= ref.gather(1, target[:, None]).sum().item()
        kl += (ref.exp() * (ref - cand)).sum().item()
        agree += (cand.argmax(1) == ref.argmax(1)).sum().item()
        count += n
    if count == 0:
        raise ValueError("the text has fewer than two tokens; nothing to score")
    return QualityReport(count, math.exp(nll / count), math.exp(ref_nll / count), kl / count, agree / count)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flashserve.cli import add_engine_arguments

    add_engine_arguments(p)
    p.add_argument("--reference-model", default=None, help="reference model (default: --model without the lossy options)")
    p.add_argument("--reference-dtype", default="auto", help="dtype of the reference engine")
    p.add_argument("--text", action="append", default=[], help="text file to score (repeatable; default: Debian's GPL-3 text)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens (default: the model's context)")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per teacher-forced chunk")
    p.add_argument("--output-json", default=None)


def run(args: argparse.Namespace) -> int:
    from flashserve.cli import llm_kwargs
    from flashserve.engine.llm import LLM

    kwargs = llm_kwargs(args)
    ref_kwargs = {**kwargs, "model": args.reference_model or args.model, "dtype": args.reference_dtype}
    for key, plain in (("quantization", "none"), ("kv_cache_dtype", "auto"), ("early_exit_config", None)):  # lossy options the reference drops
        if key in ref_kwargs:
            ref_kwargs[key] = plain
    t0 = time.perf_counter()
    cand = LLM(**kwargs, verbose=False).engine
    ref = LLM(**ref_kwargs, verbose=False).engine
    limit = min(cand.max_model_len, ref.max_model_len) - 1
    ids = cand.encode(read_texts(args.text))[: min(limit, args.max_tokens or limit)]
    report = compare(cand.score(ids, args.chunk_size), ref.score(ids, args.chunk_size), ids)
    res = {"candidate": kwargs, "reference": ref_kwargs, "texts": args.text or list(DEFAULT_TEXTS),
           **asdict(report), "perplexity_change": report.perplexity_change, "seconds": time.perf_counter() - t0}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"{report.num_tokens} tokens; perplexity {report.perplexity:.4f} vs reference {report.reference_perplexity:.4f} "
          f"({100 * report.perplexity_change:+.2f}%); KL {report.kl_divergence:.5f} nats; "
          f"top-1 agreement {100 * report.top1_agreement:.2f}%")
    return 0
