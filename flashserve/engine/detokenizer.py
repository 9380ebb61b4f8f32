"""Incremental detokenization and stop-string detection.

Decoding a token on its own is wrong for byte-level BPE (a multi-byte character can span several
tokens) and for tokenizers that drop a leading space. So each step decodes a short window that
starts a few tokens back (``prefix_offset``), and emits only what the window adds beyond the text
that was already emitted (``read_offset``); a window ending in U+FFFD is an incomplete character
and waits for more tokens. With a fast tokenizer that rule runs inside the tokenizers library
(``tokenizers.decoders.DecodeStream``, one call per token: about 0.5 us against two 3 us
``decode`` calls; with 256 running sequences on a 2-core CPU the outputs phase of a step went from
3.4 to 2.4 ms);
other tokenizers run it here. Stop strings are searched in the newly emitted text plus just enough
of the old text to catch a string spanning tokens; the stop string itself is not returned.

The text is kept as a folded head and a short tail (``DecodeState.text``): once more than
``_FOLD`` characters were handed out, they move into the head (the held-back characters stay, and
with them every place a later stop string could start), so appending a token copies the tail
only, not the whole text so far (a 4,000-token stream paid ~5 us more per token at its end than at
its start for that copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_WINDOW = 5  # tokens of left context for each incremental decode
_FOLD = 1024  # characters handed out before the tail is folded into the head


@dataclass
class DecodeState:
    """Per-sequence detokenizer state."""

    skip_special_tokens: bool
    stop: list[str] = field(default_factory=list)
    text: str = ""  # the text decoded after ``head`` (cut before the stop string once one is hit)
    emitted: int = 0  # characters of ``text`` already handed to the caller
    head: str = ""  # text handed out before ``text`` (moved here by take_delta)
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    stopped_on: str | None = None  # the stop string that ended the sequence, if any
    stream: Any = None  # the tokenizers library's DecodeStream, when the tokenizer has one
    num_read: int = 0  # output tokens of the sequence appended so far (the caller's count)


def _stream_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer when this tokenizers version streams
    with a context (``DecodeStream(ids=...)``); None otherwise."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        DecodeStream(ids=[], skip_special_tokens=False)
    except (ImportError, TypeError):
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


class Detokenizer:
    def __init__(self, tokenizer: Any, stream: bool = True) -> None:
        """``stream=False`` keeps the decoding windows here even for a fast tokenizer."""
        self.tokenizer = tokenizer
        self._backend = _stream_backend(tokenizer) if stream and tokenizer is not None else None

    def new_state(self, prompt_tail: list[int], skip_special_tokens: bool, stop: list[str]) -> DecodeState:
        """State for a sequence; ``prompt_tail`` (the last prompt tokens) gives the first window context."""
        tail = prompt_tail[-_WINDOW:]
        state = DecodeState(
            skip_special_tokens=skip_special_tokens,
            stop=list(stop),
            tokens=list(tail),
            prefix_offset=0,
            read_offset=len(tail),
        )
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            state.stream = DecodeStream(ids=list(tail), skip_special_tokens=skip_special_tokens)
        return state

    def _decode(self, ids: list[int], skip: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    def append(self, state: DecodeState, new_tokens: list[int], armed_from: int = 0) -> int:
        """Add tokens to ``state.text``; cut it at a stop string and set ``state.stopped_on``.
        Stop strings are searched in the text the tokens from index ``armed_from`` on add (before
        it ``min_tokens`` holds them back: ``StopChecker.stop_strings_armed_from``). Returns how
        many of ``new_tokens`` it took: all, or those up to the one that completed a stop string
        (the later ones, from a step that brought several, plain decoding never makes)."""
        if self.tokenizer is None:  # token-id-only models (dummy weights without a tokenizer)
            return len(new_tokens)
        for i, token in enumerate(new_tokens):
            if state.stopped_on is not None:
                return i
            state.tokens.append(token)
            if state.stream is not None:
                delta = state.stream.step(self._backend, token)
                if delta is None:  # an incomplete character, or nothing new yet
                    continue
            else:
                prefix = self._decode(state.tokens[state.prefix_offset : state.read_offset], state.skip_special_tokens)
                full = self._decode(state.tokens[state.prefix_offset :], state.skip_special_tokens)
                if len(full) <= len(prefix) or full.endswith("\ufffd"):
                    continue
                delta = full[len(prefix) :]
            self._add_text(state, delta, i >= armed_from)
            # the window flush() decodes from: the tokens of the text emitted last
            state.prefix_offset = state.read_offset
            state.read_offset = len(state.tokens)
            # Keep the token list short: only the window matters from here on.
            if state.prefix_offset > 4 * _WINDOW:
                drop = state.prefix_offset - _WINDOW
                state.tokens = state.tokens[drop:]
                state.prefix_offset -= drop
                state.read_offset -= drop
        return len(new_tokens)

    def _add_text(self, state: DecodeState, delta: str, armed: bool) -> None:
        old_len = len(state.text)
        state.text += delta
        if not state.stop or not armed:
            return
        # A stop string may start inside the old text: search from just far enough back.
        search_from = max(0, old_len - max(len(s) for s in state.stop) + 1)
        hits = [(idx, s) for s in state.stop if (idx := state.text.find(s, search_from)) != -1]
        if hits:
            idx, s = min(hits)
            state.stopped_on = s
            state.text = state.text[:idx]

    def flush(self, state: DecodeState, armed: bool = True) -> None:
        """At the end of a sequence, add what was held back (e.g. a trailing incomplete character);
        ``armed``: whether stop strings count in it (the last token reached ``min_tokens``)."""
        if self.tokenizer is None or state.stopped_on is not None or state.read_offset >= len(state.tokens):
            return
        prefix = self._decode(state.tokens[state.prefix_offset : state.read_offset], state.skip_special_tokens)
        full = self._decode(state.tokens[state.prefix_offset :], state.skip_special_tokens)
        state.read_offset = len(state.tokens)
        if len(full) > len(prefix):
            self._add_text(state, full[len(prefix) :], armed)

    @staticmethod
    def take_delta(state: DecodeState, finished: bool) -> str:
        """Text not yet handed out. While running, the last (longest stop - 1) characters are held
        back, since they might begin a stop string; so streamed text always equals the final text."""
        end = len(state.text)
        if not finished and state.stop:
            end = max(state.emitted, end - (max(len(s) for s in state.stop) - 1))
        delta = state.text[state.emitted : end]
        state.emitted = end
        if end > _FOLD:  # what is held back covers where a stop string found later could start
            state.head += state.text[:end]
            state.text = state.text[end:]
            state.emitted = 0
        return delta

    @staticmethod
    def emitted_text(state: DecodeState) -> str:
        """All the text handed out so far."""
        return state.head + state.text[: state.emitted]
