"""Proposers by method name, built for a Worker, and the compatibility checks run before any
weights load (``check_speculative``).

A proposer drafts for the requests that speculate this step:
``propose(items) -> (trees, draft_probs)`` with ``items`` = (plan entry, the Worker's
RequestState) per request: one ``TokenTree`` each (rooted at the request's last known token, at
most ``entry.num_spec_tokens`` drafts) and, for requests whose chain was sampled from a draft
distribution, q [num_drafts, V] (else None). Optional hooks: ``kv_bytes_per_block()``,
``start(num_blocks)``, ``after_sampling(hidden, inp, states, handle, spec)``,
``on_result(state, tokens, handle, row)``; and ``writes_kv = True`` for a proposer that writes
K/V into the step's new blocks while drafting (their ids reach the device before ``propose``;
otherwise they travel with the step's other inputs).
"""

from __future__ import annotations

from flashserve.config import ModelConfig, SpeculativeConfig
from flashserve.spec.ngram import NgramProposer
from flashserve.spec.tree import TokenTree


class _Ngram:
    """Prompt lookup over the Worker's token table."""

    name = "ngram"

    def __init__(self, config: SpeculativeConfig, worker) -> None:
        self.worker = worker
        self.lookup = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max, config.tree_width)

    def propose(self, items) -> tuple[list[TokenTree], None]:
        table = self.worker.batch.tokens
        return [self.lookup.propose_one(table[st.slot, : st.num_known], e.num_spec_tokens) for e, st in items], None


def default_num_layers(num_layers: int) -> int:
    """Layers of a self-speculation draft when not given: a quarter of the model (at least 1)."""
    return max(1, num_layers // 4)


def build_proposer(config: SpeculativeConfig, worker, target_source: str):
    """The proposer of ``config.method`` for ``worker`` (its model is loaded)."""
    if config.method == "ngram":
        return _Ngram(config, worker)
    if config.method == "layers":
        from flashserve.spec.draft import DraftProposer, FirstLayers

        mc = worker.model.config
        n = config.num_layers or default_num_layers(mc.num_layers)
        return DraftProposer("layers", FirstLayers(worker.model, n), n, mc.num_kv_heads, mc.head_dim, True,
                             config.tree_width, worker)
    if config.method == "draft":
        from flashserve.loader import load_model
        from flashserve.spec.draft import DraftProposer

        model, dc = load_model(config.model, config.load_format, worker.dtype, worker.device, worker.attn_backend,
                               worker.config.seed)
        check_vocab(dc, worker.model.config, config.model)
        if worker.attn_backend.name == "triton":
            from flashserve.layers.fused import use_triton_ops

            use_triton_ops(model)
        return DraftProposer("draft", model, dc.num_layers, dc.num_kv_heads, dc.head_dim, False, config.tree_width,
                             worker)
    if config.method == "heads":
        from flashserve.spec.heads import HeadsProposer

        return HeadsProposer(config, worker, target_source)
    raise ValueError(f"unknown speculative method {config.method!r}")


def check_vocab(draft: ModelConfig, target: ModelConfig, name: str | None) -> None:
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"the draft model {name} has a vocabulary of {draft.vocab_size} tokens, the target "
                         f"{target.vocab_size}; a draft must share the target's vocabulary (and tokenizer)")


def check_speculative(config: SpeculativeConfig, target: ModelConfig, tokenizer, max_model_len: int) -> None:
    """Refuse a speculative configuration that cannot work with this target, before any weights
    load: a draft with another vocabulary or tokenizer, a draft for a target whose groups of layers all
    keep a window, too many layers for self-speculation."""
    if config.method == "draft":
        from flashserve.cache.kv_groups import kv_layout
        from flashserve.loader import load_model_config, load_tokenizer
        from flashserve.spec.draft import draft_group

        draft_group(kv_layout(target))

        check_vocab(load_model_config(config.model, config.load_format), target, config.model)
        draft_tok = load_tokenizer(config.model, config.load_format)
        if tokenizer is not None and draft_tok is not None and draft_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the draft model {config.model} has another tokenizer than the target; "
                             f"its token ids would mean other text")
    if config.method == "layers":
        n = config.num_layers or default_num_layers(target.num_layers)
        if not 1 <= n < target.num_layers:
            raise ValueError(f"speculative 'num_layers' must be in [1, {target.num_layers - 1}] for a model of "
                             f"{target.num_layers} layers, got {n}")
    if config.num_speculative_tokens >= max_model_len - 1:
        raise ValueError(f"num_speculative_tokens ({config.num_speculative_tokens}) must be smaller than the "
                         f"context ({max_model_len} tokens) minus one")
