"""Quality of a compressed model against its source, with ``flashserve.bench.quality``.

Both models run as ordinary engines (``LLM(path)``, so the written directory is what is
measured) and read the same text teacher-forced: by default Debian's GPL-3, the first
``max_tokens`` tokens. ``ReferenceScores`` keeps the reference's log-probabilities so a sweep
over many candidates scores the reference once (fp32, ``max_tokens x vocab x 4`` bytes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flashserve.bench.quality import QualityReport, compare, read_texts

KV_BYTES_PER_TOKEN_MARGIN = 2  # the KV pool holds twice the scored text (headroom for block rounding)


def quality_engine(model: str | None, max_tokens: int, device: str = "auto", dtype: str = "auto"):
    """An LLMEngine sized to score ``max_tokens`` tokens (one sequence, no CUDA graphs); dense
    weights in the device's default dtype unless ``dtype`` says otherwise."""
    from flashserve.engine.llm import LLM
    from flashserve.loader import load_model_config

    from flashserve.runner.worker import resolve_device

    if dtype == "auto":  # explicit, so a GGUF source is dequantized as the tools read it (not kept packed)
        dtype = "bfloat16" if resolve_device(device).type == "cuda" else "float32"
    cfg = load_model_config(model)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    max_len = min(cfg.max_position_embeddings, max_tokens + 1)
    return LLM(model, device=device, dtype=dtype, max_num_seqs=1, cuda_graphs=False, verbose=False, max_model_len=max_len,
               kv_cache_bytes=KV_BYTES_PER_TOKEN_MARGIN * per_token * (max_len + 64)).engine


class ReferenceScores:
    """The reference model's teacher-forced log-probabilities of a text, computed once."""

    def __init__(self, model: str | None, max_tokens: int = 2048, texts: Sequence[str] = (), device: str = "auto",
                 chunk_size: int = 512, dtype: str = "auto") -> None:
        if max_tokens < 2:
            raise ValueError(f"quality needs at least 2 tokens of text, got max_tokens={max_tokens}")
        engine = quality_engine(model, max_tokens, device, dtype)
        limit = engine.max_model_len - 1
        self.model = model
        self.device, self.dtype, self.chunk_size = device, dtype, chunk_size
        self.token_ids = engine.encode(read_texts(texts))[: min(limit, max_tokens)]
        self.chunks = [c.cpu() for c in engine.score(self.token_ids, chunk_size)]
        self.vocab = engine.tokenizer.get_vocab() if engine.tokenizer is not None else None

    def evaluate(self, candidate: str) -> QualityReport:
        """Perplexity, KL and top-1 agreement of the model at ``candidate`` against the reference."""
        engine = quality_engine(candidate, len(self.token_ids), self.device, self.dtype)
        if self.vocab is not None and engine.tokenizer is not None and engine.tokenizer.get_vocab() != self.vocab:
            raise ValueError(f"{candidate} has a different tokenizer from the reference; quality compares token ids")
        report = compare(engine.score(self.token_ids, self.chunk_size), self.chunks, self.token_ids)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return report


def decode_weights(model: str | None) -> int:
    """Weights a decode step multiplies per token (decoder projections and LM head), as stored: a
    model pruned without structure still stores, reads and multiplies every zero."""
    from flashserve.loader import load_model_config, resolve_load_format

    path, fmt = resolve_load_format(model)
    if fmt == "safetensors":
        from safetensors import safe_open

        from flashserve.loader.safetensors_loader import safetensors_files

        total, head = 0, 0
        for f in safetensors_files(path):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    n = math.prod(h.get_slice(name).get_shape())
                    if "_proj." in name and not name.endswith("bias"):
                        total += n
                    elif name == "lm_head.weight" or (name == "model.embed_tokens.weight" and not head):
                        head = n  # a tied head is the embedding
        return total + head
    c = load_model_config(path, fmt)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size


def quality_summary(model: str | None, candidate: str, max_tokens: int, device: str) -> dict:
    """A written model's quality against its source (``max_tokens`` of text), printed and returned
    as a summary entry (the report's fields and the relative perplexity change)."""
    report = ReferenceScores(model, max_tokens, device=device).evaluate(candidate)
    print(format_report(report))
    return {**report.__dict__, "perplexity_change": report.perplexity_change}


def format_report(report: QualityReport) -> str:
    return (f"{report.num_tokens} tokens: perplexity {report.perplexity:.3f} vs source {report.reference_perplexity:.3f} "
            f"({100 * report.perplexity_change:+.1f}%), KL {report.kl_divergence:.4f} nats, "
            f"top-1 agreement {100 * report.top1_agreement:.1f}%")
