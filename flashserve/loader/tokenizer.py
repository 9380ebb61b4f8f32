"""Tokenizers: a HF directory (AutoTokenizer, no remote code) or the tokenizer embedded in a GGUF.

Converting a GGUF tokenizer with transformers takes ~10 s, so the converted tokenizer (chat
template included) is saved once under ``$FLASHSERVE_CACHE`` (default ``~/.cache/flashserve``)
in ``tokenizers/<sha256 of path, size, mtime, transformers version>`` and reloaded from there in
well under a second.
A cached tokenizer of the generic class (or of a class whose ``tokenizer.json`` holds its whole
pipeline, as Gemma's) is loaded through the ``tokenizers`` library directly
(``tokenizer_fast.FastTokenizer``: importing transformers alone costs ~1 s of CPU), or else
through ``PreTrainedTokenizerFast`` itself: ``AutoTokenizer`` first indexes every model of
transformers (~1.5 s of CPU time here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from flashserve.loader.tokenizer_fast import GENERIC_FAST_CLASSES, FastTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cache_root() -> Path:
    """Root of flashserve's user cache."""
    env = os.environ.get("FLASHSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flashserve"


def converter_version() -> str:
    """The installed transformers' version (it converts GGUF tokenizers), read from the package
    metadata without importing transformers; "none" when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def gguf_tokenizer_cache_dir(gguf_path: str | Path) -> Path:
    """Cache folder for the converted tokenizer of one GGUF file, keyed by path, size, mtime and
    the converting transformers' version (conversions differ between versions)."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{converter_version()}".encode()).hexdigest()[:32]
    return cache_root() / "tokenizers" / key


def _load_cached(cache: Path) -> Any:
    """A tokenizer saved by ``load_gguf_tokenizer``; the generic class without AutoTokenizer."""
    config = json.loads((cache / "tokenizer_config.json").read_text())
    if FastTokenizer.usable(config) and (cache / "tokenizer.json").is_file():
        return FastTokenizer(cache, config)  # no transformers import (~1 s of CPU)
    if config.get("tokenizer_class") in GENERIC_FAST_CLASSES and (cache / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(cache))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cache))


def load_gguf_tokenizer(gguf_path: str | Path) -> Any:
    """The tokenizer (with chat template) stored in a GGUF file, converted once then cached."""
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    cache = gguf_tokenizer_cache_dir(path)
    if (cache / "tokenizer_config.json").is_file():
        try:
            return _load_cached(cache)
        except Exception:  # a broken cache entry: rebuild it below
            shutil.rmtree(cache, ignore_errors=True)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ValueError(f"cannot read the tokenizer of GGUF file {path}: {e}") from e
    check_gguf_bos(tokenizer, path)
    try:  # write to a temp dir, then rename: concurrent loaders never see a half-written cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # read-only home: still usable, just not cached
    return tokenizer


def check_gguf_bos(tokenizer: Any, path: str | Path) -> None:
    """Refuse a converted tokenizer that drops the BOS token its GGUF file says to add: without
    it a model such as Gemma 3 reads every prompt badly. (transformers 5.17 converts Gemma 3's
    GGUF tokenizer that way, with wrong merges too; 5.24 converts it correctly.)"""
    from flashserve.loader.gguf_file import GGUFFile

    fields = GGUFFile(path).fields
    add_bos, bos_field = fields.get("tokenizer.ggml.add_bos_token"), fields.get("tokenizer.ggml.bos_token_id")
    if add_bos is None or bos_field is None or not add_bos.contents():
        return
    bos, ids = int(bos_field.contents()), tokenizer.encode("Hello")
    if not ids or ids[0] != bos:
        raise ValueError(f"transformers {converter_version()} converted the tokenizer of GGUF file {path} without "
                         f"the BOS token (id {bos}) the file says to add (it encodes 'Hello' as {ids}); "
                         "use transformers 5.24 or later, or a tokenizer directory (--tokenizer)")


def load_hf_tokenizer(folder: str | Path) -> Any:
    """AutoTokenizer of a HF model directory (trust_remote_code is never enabled)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model directory not found: {folder}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {folder}")
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
