"""Prompt preparation off the engine thread: chat templates, tokenization, grammar checks.

The engine thread runs the model for every stream at once, so a request's preprocessing must
never run there (a 50 MB body tokenized there once stalled every stream for 86 s). ``Frontend``
does it on its own worker thread with its own copy of the tokenizer (the engine thread keeps
decoding with the original), after a character-length check that refuses a text which cannot
fit the context whatever its tokenization: a token covers at most ``max_token_chars`` characters
(the longest entry of the vocabulary), so more than ``max_model_len * max_token_chars``
characters never fit.

Special tokens typed into chat messages (``<|im_end|>\\n<|im_start|>system ...``) would become
real control tokens and let a user fake turns; unless ``escape_special_tokens`` is off, every
special token string in message content gets a zero-width space after its first character, so
only the template produces special tokens and the model still sees the text.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from flashserve.sampling_params import StructuredOutput, check_text

T = TypeVar("T")

ZWSP = "\u200b"


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters of text one token covers: the longest vocabulary entry
    (byte-level vocabularies spell each byte as one character; SentencePiece entries are at least
    as long as their text)."""
    vocab = tokenizer.get_vocab()
    return max(max((len(t) for t in vocab), default=1), 1)


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching the special (control) tokens' strings, longest first; None if there are none."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {tok.content for tok in decoder.values() if getattr(tok, "special", False) and len(tok.content) > 1}
    specials |= {t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and len(t) > 1}
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


class Frontend:
    """Tokenizes and templates requests on one worker thread."""

    def __init__(self, tokenizer: Any, max_model_len: int, escape_special_tokens: bool = True) -> None:
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.max_model_len = max_model_len
        self.max_prompt_chars = max_model_len * max_token_chars(tokenizer) if tokenizer is not None else None
        self.escape_special_tokens = escape_special_tokens
        self._special = special_token_pattern(tokenizer) if tokenizer is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashserve-frontend")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ checks (event loop, cheap)
    def check_text(self, name: str, text: str) -> None:
        """Valid Unicode and not longer than any prompt that could fit the context."""
        check_text(name, text)
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise ValueError(
                f"{name} has {len(text)} characters; no text longer than {self.max_prompt_chars} characters fits "
                f"the model's context of {self.max_model_len} tokens")

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; give prompts as token ids")
        return self.tokenizer

    # ------------------------------------------------------------ worker-thread work
    async def encode(self, text: str, add_special_tokens: bool = True, name: str = "prompt") -> list[int]:
        self.check_text(name, text)
        tokenizer = self._need_tokenizer()
        return await self.run(lambda: tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The model's chat template applied to ``messages`` (content escaped, see the module doc)."""
        tokenizer = self._need_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages: this model has no chat template; use /v1/completions with a prompt")
        total = 0
        for i, m in enumerate(messages):
            content = m.get("content") or ""
            self.check_text(f"messages.{i}.content", content)
            total += len(content)
        if self.max_prompt_chars is not None and total > self.max_prompt_chars:
            raise ValueError(f"messages have {total} characters in all; no prompt longer than "
                             f"{self.max_prompt_chars} characters fits the model's context of {self.max_model_len} tokens")
        if self.escape_special_tokens and self._special is not None:
            messages = [{**m, "content": self.escape(m["content"])} if isinstance(m.get("content"), str) else m
                        for m in messages]
        kwargs: dict[str, Any] = {"tools": tools} if tools else {}

        def render() -> str:
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
            except Exception as e:  # jinja errors, templates that reject a role or an order of turns
                raise ValueError(f"messages: the chat template could not render them: {e}") from None

        return await self.run(render)

    def escape(self, text: str) -> str:
        """Break every special-token string in ``text`` with a zero-width space."""
        assert self._special is not None
        return self._special.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], text)

    async def token_strings(self, ids: list[int]) -> list[str]:
        """Each token id decoded on its own (for logprobs)."""
        if not ids:
            return []
        tokenizer = self._need_tokenizer()
        return await self.run(lambda: [tokenizer.decode([i]) for i in ids])

    async def check_structured(self, structured: StructuredOutput) -> None:
        from flashserve.layers.logits_processors import validate_structured_output

        await self.run(validate_structured_output, structured)
