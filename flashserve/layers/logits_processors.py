"""Per-request logit processors applied inside the batched sampler: logit bias and grammars.

``LogitsProcessors(tokenizer, eos_token_ids)(logits, rows)`` takes the step's fp32 logits
[N, V] (one row per sampling request) and returns them with

1. ``logit_bias``: each row's {token id: bias} added (one batched ``index_put`` for all rows);
2. structured output: tokens the request's grammar forbids set to -inf. A grammar (a JSON
   schema, a regex or a Lark grammar, as plain text in ``SamplingParams.structured_output``) is
   compiled by llguidance into a matcher per request. Every step the matchers of the grammar rows
   fill one packed bitmask [G, ceil(V / 32)] int32 on the host (with more than 2 cores, in
   llguidance's threads without the GIL), which is copied to the device and expanded into the
   row masks there.
   ``prefetch(rows)`` starts that fill in a background thread for the next call (the Worker calls
   it as soon as the tokens the masks depend on reach the host); the call uses it when its rows
   and their outputs are the ones the prefetch saw.

State is keyed by request id and is only a cache: a matcher is advanced lazily with the tokens
the row's ``output_token_ids`` gained since it last saw them, so it survives preemption and chunked
prefill, and an evicted or lost state is rebuilt by replaying the output. Rows of requests that
have not sampled for ``_EVICT_AFTER`` calls are dropped (finished or aborted requests included),
so nothing needs to tell this module that a request ended.

A grammar is validated when the request arrives (``validate_structured_output``), so a matcher
error here means a bug; the row is then forced to end (EOS only) and the error is logged, and
the other rows of the batch are untouched.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from flashserve.sampling_params import StructuredOutput

if TYPE_CHECKING:
    from flashserve.config import EngineConfig
    from flashserve.layers.sampler import SamplingRow

logger = logging.getLogger("flashserve")

_EVICT_AFTER = 64  # sampler calls without a row before a request's state is dropped
_MAX_COMPILED = 64  # grammar texts kept compiled (LRU)
_PREFETCH_SWITCH_S = 1e-4  # the interpreter's GIL switch interval while a prefetch runs (default 5 ms)


def grammar_text(structured: StructuredOutput) -> str:
    """The llguidance grammar for a structured-output request (compact JSON: no free whitespace,
    so a model cannot pad its output with endless newlines)."""
    import llguidance

    if structured.kind == "json":
        schema = json.loads(structured.spec)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if structured.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(structured.spec)
    return llguidance.LLMatcher.grammar_from_lark(structured.spec)


def validate_structured_output(structured: StructuredOutput) -> None:
    """Raise ValueError if the schema / regex / grammar is malformed or unsupported (no tokenizer
    needed; cheap enough for the request path, run off the engine thread)."""
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured output needs the llguidance package: pip install 'flashserve[server]'") from None
    structured.validate()
    try:
        text = grammar_text(structured)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"the {structured.kind} constraint is not valid: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(text)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"the {structured.kind} constraint is not supported: {error}")


@dataclass
class _RowState:
    """One request's cached processor state."""

    last_seen: int
    bias: tuple[torch.Tensor, torch.Tensor] | None  # token ids [B] int64, biases [B] fp32, on the device
    grammar_key: tuple[str, str] | None = None  # (kind, spec) the matcher was built for
    matcher: Any = None  # llguidance.LLMatcher
    consumed: int = 0  # output tokens the matcher has consumed
    failed: bool = False


class LogitsProcessors:
    """Applies each row's logit bias and grammar mask to a batch of logits."""

    def __init__(self, tokenizer: Any = None, eos_token_ids: Sequence[int] = ()) -> None:
        # A Hugging Face fast tokenizer, or a function that loads it (on the first grammar row);
        # needed only for grammars.
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self._states: dict[str, _RowState] = {}
        self._calls = 0
        self._ll_tokenizer: Any = None
        self._ll_vocab = 0
        self._executor: Any = None
        self._bitmask: torch.Tensor | None = None  # host staging [G, W] int32 (pinned on CUDA)
        self._copied: torch.cuda.Event | None = None  # the last copy out of the staging buffer
        self._prefetcher: Any = None  # one background thread (concurrent.futures) for prefetch()
        self._prefetched: tuple[tuple, Any] | None = None  # (rows' key, future of the filled bitmask)
        self._switch_interval: float | None = None  # the interpreter's own, while a prefetch runs

    @classmethod
    def for_engine(cls, config: EngineConfig, eos_token_ids: Sequence[int]) -> LogitsProcessors:
        """The Worker's processors: the engine's tokenizer is loaded here (in the Worker's
        process) only when the first grammar row arrives."""

        def load() -> Any:
            from flashserve.loader import default_model_path, load_tokenizer

            source = config.model if config.model is not None else default_model_path()
            return load_tokenizer(config.tokenizer or source, "auto" if config.tokenizer else config.load_format)

        return cls(load, eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits: [N, V] fp32, not modified; returns the processed logits (the same tensor when
        no row has a bias or a grammar)."""
        prefetched = self.skip()
        active = [i for i, r in enumerate(rows) if r.params.logit_bias or r.params.structured_output is not None]
        if not active:
            return logits
        states = {i: self._state(rows[i], logits.device) for i in active}
        biased = [(i, s.bias) for i, s in states.items() if s.bias is not None]
        if biased:
            row_idx = torch.cat([torch.full_like(ids, i) for i, (ids, _) in biased])
            logits = logits.index_put((row_idx, torch.cat([ids for _, (ids, _) in biased])),
                                      torch.cat([vals for _, (_, vals) in biased]), accumulate=True)
        grammar_rows = [i for i in active if rows[i].params.structured_output is not None]
        if grammar_rows:
            grammar = [(i, rows[i], states[i]) for i in grammar_rows]
            bitmask = prefetched[1] if prefetched is not None and prefetched[0] == _key(grammar) else None
            logits = self._apply_grammars(logits, grammar, bitmask)
        return logits

    def skip(self) -> tuple | None:
        """What every call does first, and all that a call for rows without a bias or a grammar
        does: count the call (states are evicted every 16 calls), take a prefetch's result, give
        the interpreter its switch interval back. Returns the prefetch (rows' key, bitmask)."""
        self._calls += 1
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:  # its thread touches the states: done before anything else here
            prefetched = (prefetched[0], prefetched[1].result())
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        if self._states and self._calls % 16 == 0:
            self._evict()
        return prefetched

    def prefetch(self, rows: list[SamplingRow], vocab_size: int) -> None:
        """Start filling the grammar masks of the next call's ``rows`` in a background thread
        (llguidance drops the GIL), so the host's other work overlaps it; the next call uses the
        result when its grammar rows and their outputs are the same, and recomputes otherwise.

        Until that call the GIL switch interval is 0.1 ms instead of 5 ms: the thread's short
        Python parts (between llguidance's calls) would otherwise wait for the engine thread's
        whole turn, and the fill would run only once the next call blocks on it, serially."""
        grammar = [(i, r, self._states.get(r.request_id)) for i, r in enumerate(rows)
                   if r.params.structured_output is not None]
        if not grammar or any(st is None for _, _, st in grammar):  # new rows: set up on the next call
            return
        if self._prefetcher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="flashserve-grammar")
        if self._switch_interval is None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(_PREFETCH_SWITCH_S)
        self._prefetched = (_key(grammar), self._prefetcher.submit(self._fill_in_thread, grammar, vocab_size))

    # ------------------------------------------------------------------ state
    def _state(self, row: SamplingRow, device: torch.device) -> _RowState:
        state = self._states.get(row.request_id)
        if state is None:
            bias = None
            if row.params.logit_bias:
                items = sorted(row.params.logit_bias.items())
                bias = (torch.tensor([t for t, _ in items], dtype=torch.int64, device=device),
                        torch.tensor([b for _, b in items], dtype=torch.float32, device=device))
            state = self._states[row.request_id] = _RowState(self._calls, bias)
        state.last_seen = self._calls
        return state

    def _evict(self) -> None:
        stale = [rid for rid, s in self._states.items() if self._calls - s.last_seen > _EVICT_AFTER]
        for rid in stale:
            del self._states[rid]

    # ------------------------------------------------------------------ grammars
    def _ensure_tokenizer(self, vocab_size: int) -> Any:
        if self._ll_tokenizer is None or self._ll_vocab != vocab_size:
            if callable(self.tokenizer) and not hasattr(self.tokenizer, "encode"):
                self.tokenizer = self.tokenizer()
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer")
            import llguidance

            hf = getattr(self.tokenizer, "hf", self.tokenizer)  # a FastTokenizer's transformers tokenizer
            self._ll_tokenizer = grammar_tokenizer(hf, vocab_size, self.eos_token_ids)
            self._ll_vocab = vocab_size
            self._executor = llguidance.LLExecutor()
        return self._ll_tokenizer

    def _matcher(self, state: _RowState, row: SamplingRow, vocab_size: int) -> Any:
        """The row's matcher for its grammar, built (or rebuilt when the cache is stale) but not
        advanced; None, with ``state.failed`` set, if it cannot be built."""
        structured = row.params.structured_output
        assert structured is not None
        key = (structured.kind, structured.spec)
        if state.matcher is None or state.grammar_key != key or state.consumed > len(row.output_token_ids):
            import llguidance

            state.grammar_key, state.consumed = key, 0
            try:
                state.matcher, state.failed = llguidance.LLMatcher(self._ensure_tokenizer(vocab_size), _compiled(structured)), False
            except Exception as e:  # no tokenizer, or a grammar that slipped past validation
                state.matcher, state.failed = None, True
                logger.error("flashserve: cannot constrain request %s (%s); ending it", row.request_id, e)
        return state.matcher

    def _advance(self, grammar_rows: list[tuple[int, SamplingRow, _RowState]]) -> None:
        """Feed each healthy matcher the output tokens it has not seen. Rows one token behind (every
        row in steady decoding) are advanced together by llguidance's pool, without the GIL."""
        one: list[tuple[Any, int]] = []
        one_rows: list[tuple[SamplingRow, _RowState]] = []
        for _, row, state in grammar_rows:
            outputs = row.output_token_ids  # a list, or a numpy row of the Worker
            if state.failed or state.consumed >= len(outputs):
                state.consumed = len(outputs)
                continue
            new = [int(t) for t in outputs[state.consumed :]]
            state.consumed = len(outputs)
            if len(new) == 1:
                one.append((state.matcher, new[0]))
                one_rows.append((row, state))
            else:
                self._check(row, state, state.matcher.consume_tokens(new))
        if one:
            ok = self._executor.consume_token_par(one) if self._parallel(len(one)) else [m.consume_token(t) for m, t in one]
            for (row, state), good in zip(one_rows, ok):
                self._check(row, state, good)

    @staticmethod
    def _check(row: SamplingRow, state: _RowState, consumed: bool) -> None:
        """Mark a row whose matcher refused its tokens, or is in error, as failed (it is ended).
        The last token may be an EOS the grammar already accepted: the request ends with it."""
        if not consumed:
            state.failed = True
            logger.error("flashserve: request %s left its grammar (%s); ending it", row.request_id,
                         state.matcher.get_error())
        elif state.matcher.is_error():
            state.failed = True
            logger.error("flashserve: grammar of request %s failed (%s); ending it", row.request_id,
                         state.matcher.get_error())

    @staticmethod
    def _parallel(rows: int) -> bool:
        """Whether llguidance's pool advances the matchers and fills the masks. Its calls drop the
        GIL, so the engine thread keeps running beside a prefetch. Waking the pool costs ~0.1 ms,
        which a prefetch hides. On the H200, using it for a single row took the dense batch-1
        grammar step from 1.29x to 1.11x of plain decoding (it had been used from 8 rows on).
        On 2 cores the calls stay inline: the engine thread and torch use both cores."""
        return rows > 0 and (os.cpu_count() or 1) > 2

    def _fill_in_thread(self, grammar_rows: list[tuple[int, SamplingRow, _RowState]], vocab: int) -> torch.Tensor:
        with torch.inference_mode():  # the staging buffer may be an inference tensor (the Worker's)
            return self._fill_masks(grammar_rows, vocab)

    def _fill_masks(self, grammar_rows: list[tuple[int, SamplingRow, _RowState]], vocab: int) -> torch.Tensor:
        """The rows' packed masks in the host staging buffer [>= G, ceil(V / 32)] int32."""
        words = (vocab + 31) // 32
        g = len(grammar_rows)
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < g or bitmask.shape[1] != words:
            bitmask = torch.empty((max(g, 8), words), dtype=torch.int32, pin_memory=torch.cuda.is_available())
            self._bitmask = bitmask
        if self._copied is not None:  # the previous step's copy may still be reading the buffer
            self._copied.synchronize()
        matchers = [self._matcher(state, row, vocab) for _, row, state in grammar_rows]
        self._advance(grammar_rows)
        jobs = []
        for j, ((_, _, state), matcher) in enumerate(zip(grammar_rows, matchers)):
            if state.failed:
                bitmask[j].zero_()
                for t in self.eos_token_ids:
                    bitmask[j, t // 32] |= _bit(t % 32)
            else:
                jobs.append((matcher, j))
        if self._parallel(len(jobs)):  # rows j of the buffer filled by llguidance's pool, without the GIL
            self._executor.unsafe_compute_mask_ptr(jobs, bitmask.data_ptr(), words * 4, bitmask.shape[0])
        else:
            for matcher, j in jobs:
                matcher.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), words * 4)
        return bitmask

    def _apply_grammars(self, logits: torch.Tensor, grammar_rows: list[tuple[int, SamplingRow, _RowState]],
                        bitmask: torch.Tensor | None = None) -> torch.Tensor:
        vocab = logits.shape[1]
        g = len(grammar_rows)
        if bitmask is None:
            bitmask = self._fill_masks(grammar_rows, vocab)
        device_mask = bitmask[:g].to(logits.device, non_blocking=True)
        if logits.device.type == "cuda":  # steps overlap: the next fill waits for this copy only
            self._copied = torch.cuda.Event()
            self._copied.record()
        allowed = unpack_bitmask(device_mask, vocab)  # [G, V] bool
        rows = [i for i, _, _ in grammar_rows]
        if rows == list(range(logits.shape[0])):  # every row constrained: one pass, no gather
            return torch.where(allowed, logits, float("-inf"))
        index = torch.tensor(rows, device=logits.device)
        return logits.index_put((index,), torch.where(allowed, logits[index], float("-inf")))


def grammar_tokenizer(hf: Any, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> Any:
    """llguidance's tokenizer for a Hugging Face fast tokenizer, checked to read each token as the
    bytes the tokenizer decodes it to.

    llguidance learns the bytes of every token from the tokenizer's JSON, its decoder included.
    Some converters give a byte-level BPE (GPT-2 style) a SentencePiece decoder chain around its
    byte-level step (transformers 5.17 does so for SmolLM2's GGUF); llguidance then reads 'Ġthe'
    as those letters rather than ' the', and every mask constrains the wrong text. A byte-level
    pre-tokenizer means the vocabulary is byte-level, so the chain is replaced by its byte-level
    step. A sample of the vocabulary is then compared with the tokenizer's own decoding, and a
    tokenizer llguidance still misreads is refused."""
    import llguidance

    backend = copy.copy(hf.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    spec["decoder"] = _byte_level_decoder(spec) or spec.get("decoder")
    eos = list(eos_token_ids) or hf.eos_token_id
    ll = llguidance.LLTokenizer(json.dumps(spec), n_vocab=vocab_size, eos_token=eos)
    special = set(hf.all_special_ids)
    sample = [i for i in range(0, min(vocab_size, len(hf)), max(1, vocab_size // 4000)) if i not in special]
    checked = [(i, ll.decode_bytes([i]), text) for i in sample if "\ufffd" not in (text := hf.decode([i]))]
    wrong = [(i, got, text) for i, got, text in checked if got != text.encode()]
    if len(wrong) > len(checked) // 100:
        i, got, text = wrong[0]
        raise ValueError(f"the grammar library reads {len(wrong)} of {len(checked)} sampled tokens as other bytes than "
                         f"the tokenizer decodes them to (token {i}: {got!r}, decoded {text!r}); structured output "
                         "would constrain the wrong text with this tokenizer")
    return ll


def _byte_level_decoder(spec: dict) -> dict | None:
    """The byte-level step of a decoder chain, when the pre-tokenizer is byte-level (else None)."""
    def steps(node: dict | None, key: str) -> list[dict]:
        if not node:
            return []
        return [x for child in node.get(key, []) for x in steps(child, key)] if node.get("type") == "Sequence" else [node]

    if not any(n.get("type") == "ByteLevel" for n in steps(spec.get("pre_tokenizer"), "pretokenizers")):
        return None
    chain = steps(spec.get("decoder"), "decoders")
    byte_level = [n for n in chain if n.get("type") == "ByteLevel"]
    return byte_level[0] if byte_level and len(chain) > 1 else None


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[G, W] int32 packed masks (bit k of word w is token 32 * w + k) -> [G, V] bool, on the
    bitmask's device. Unpacked byte-wise (little-endian words: byte j of word w holds tokens
    32w + 8j ... 32w + 8j + 7), so the intermediate is uint8, a quarter of an int32 unpack."""
    assert sys.byteorder == "little"
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [G, 4W]
    return (as_bytes.unsqueeze(-1) & _bits(bitmask.device)).ne(0).view(bitmask.shape[0], -1)[:, :vocab_size]  # [G, 4W, 8] -> [G, V]


@functools.lru_cache(maxsize=8)
def _bits(device: torch.device) -> torch.Tensor:
    """[8] uint8 single-bit bytes on ``device`` (made once, not copied to the device every step)."""
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], device=device, dtype=torch.uint8)


def _key(grammar_rows: list[tuple[int, SamplingRow, _RowState]]) -> tuple:
    """What a prefetched mask was computed for: each grammar row's place, request and output length."""
    return tuple((i, row.request_id, len(row.output_token_ids)) for i, row, _ in grammar_rows)


def _bit(k: int) -> int:
    """Bit k of an int32 word as a Python int that fits int32 (bit 31 is the sign bit)."""
    return -(1 << 31) if k == 31 else 1 << k


@functools.lru_cache(maxsize=_MAX_COMPILED)
def _compiled(structured: StructuredOutput) -> str:
    return grammar_text(structured)
