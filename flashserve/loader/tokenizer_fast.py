"""A cached generic tokenizer through the ``tokenizers`` library directly, without transformers.

Importing transformers costs about a second of CPU time, most of ``LLM()``'s start on the
embedded model. A tokenizer folder of the generic fast class (``tokenizer.json`` plus
``tokenizer_config.json``, as ``load_gguf_tokenizer`` caches it) needs only the Rust
``tokenizers`` library for what the engine calls on every request (encode, decode, vocabulary,
special tokens) and jinja2 for the chat template, rendered the way transformers renders it
(sandboxed, ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``, the special tokens as variables). Anything else (``llguidance`` needs a real
``PreTrainedTokenizerFast``, ``save_pretrained``, ...) loads the transformers tokenizer of the
same folder on first use (``hf``) and is delegated to it.

``FastTokenizer.usable(config)`` says which folders qualify: the generic class or one whose saved
``tokenizer.json`` holds its whole pipeline (``PIPELINE_CLASSES``: Gemma's, whose class otherwise
costs ~3 s of a 262k-token vocabulary's start; tests compare the two on real text), no
``add_bos_token`` / ``add_eos_token`` override (transformers rewrites the post-processor for
those) and no tokenization-space clean-up.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

GENERIC_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# tokenizer classes whose saved tokenizer.json encodes and decodes exactly as the class does
PIPELINE_CLASSES = ("GemmaTokenizer",)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _content(token: Any) -> str | None:
    """A special token as the config stores it: a string or ``{"content": ...}``."""
    if isinstance(token, dict):
        return token.get("content")
    return token


class FastTokenizer:
    """The subset of a Hugging Face fast tokenizer the engine uses, on ``tokenizers.Tokenizer``."""

    @staticmethod
    def usable(config: dict[str, Any]) -> bool:
        return (config.get("tokenizer_class") in GENERIC_FAST_CLASSES + PIPELINE_CLASSES
                and not any(k in config for k in ("add_bos_token", "add_eos_token"))
                and not config.get("clean_up_tokenization_spaces", False))

    def __init__(self, folder: str | Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.config = config
        self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        template = self.folder / "chat_template.jinja"
        self.chat_template: str | None = template.read_text() if template.is_file() else config.get("chat_template")
        self.special_tokens_map = {k: _content(config[k]) for k in SPECIAL_KEYS if config.get(k) is not None}
        for key, value in self.special_tokens_map.items():
            setattr(self, key, value)
        self.added_tokens_decoder = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        extra = [_content(t) for t in config.get("additional_special_tokens", []) or []]
        extra += [_content(t) for t in (config.get("extra_special_tokens") or {}).values()] \
            if isinstance(config.get("extra_special_tokens"), dict) else []
        self.all_special_tokens = list(dict.fromkeys([*self.special_tokens_map.values(), *extra]))
        self._compiled: Any = None
        self._hf: Any = None

    # ids of the special tokens (None when the config names none)
    def _id(self, key: str) -> int | None:
        token = self.special_tokens_map.get(key)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self._tok.token_to_id(t) for t in self.all_special_tokens) if i is not None]

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            ids: Any = self.encode(text, add_special_tokens)
            mask: Any = [1] * len(ids)
        else:
            ids = [e.ids for e in self._tok.encode_batch(text, add_special_tokens=add_special_tokens)]
            mask = [[1] * len(i) for i in ids]
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if clean_up_tokenization_spaces:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=True)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(self, conversation: list[dict[str, Any]], tokenize: bool = True,
                            add_generation_prompt: bool = False, chat_template: str | None = None,
                            **kwargs: Any) -> str | list[int]:
        """The prompt of ``conversation``; token ids when ``tokenize`` (no special tokens added,
        as transformers does for a rendered template)."""
        source = chat_template or self.chat_template
        if not source:
            raise ValueError("this tokenizer has no chat template")
        template = self._template(source)
        text = template.render(messages=conversation, add_generation_prompt=add_generation_prompt,
                               **self.special_tokens_map, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self, source: str) -> Any:
        if self._compiled is not None and self._compiled[0] == source:
            return self._compiled[1]
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        compiled = env.from_string(source)
        self._compiled = (source, compiled)
        return compiled

    @property
    def _tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` itself, under transformers' name for it (the detokenizer
        streams with it), so asking for it does not load transformers."""
        return self._tok

    @property
    def hf(self) -> Any:
        """The transformers tokenizer of the same folder (loaded on first use), of its own class."""
        if self._hf is None:
            if self.config.get("tokenizer_class") in GENERIC_FAST_CLASSES:
                from transformers import PreTrainedTokenizerFast as loader
            else:
                from transformers import AutoTokenizer as loader

            self._hf = loader.from_pretrained(str(self.folder))
        return self._hf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_hf", "_tok", "_compiled", "config", "folder"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["config"])  # type: ignore[misc]

    def __deepcopy__(self, memo: dict) -> FastTokenizer:
        return FastTokenizer(self.folder, self.config)
