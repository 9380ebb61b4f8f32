"""flashserve's lean GGUF reader agrees with gguf-py's ``GGUFReader`` on metadata and tensors
(the embedded SmolLM2 file and a tiny written file), and names a truncated file."""

from __future__ import annotations

import numpy as np
import pytest

from conftest_models import make_tiny_checkpoint, write_tiny_gguf
from flashserve.loader.gguf_file import GGUFFile
from flashserve.loader.gguf_loader import open_gguf


def _same(path) -> None:
    from gguf import GGUFReader

    ours, theirs = GGUFFile(path), GGUFReader(str(path))
    header = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # GGUFReader's own entries
    assert list(ours.fields) == [k for k in theirs.fields if k not in header]
    for key, field in theirs.fields.items():
        if key in header:
            continue
        expect = field.contents()
        got = ours.fields[key].contents()
        if isinstance(expect, float):
            assert got == pytest.approx(expect), key
        else:
            assert got == expect, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and tuple(a.shape) == tuple(int(d) for d in b.shape)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype and a.n_bytes == b.n_bytes
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_tiny_file_matches_gguf_reader(tmp_path):
    hf = make_tiny_checkpoint("llama3_gqa", tmp_path / "hf", seed=1)
    write_tiny_gguf(hf, tmp_path / "m.gguf", "Q4_1")
    _same(tmp_path / "m.gguf")


@pytest.mark.slow
def test_embedded_smollm2_matches_gguf_reader():
    from flashserve.loader import default_model_path

    _same(default_model_path())


def test_truncated_file_is_named(tmp_path):
    hf = make_tiny_checkpoint("llama_mha_tied", tmp_path / "hf", seed=1)
    write_tiny_gguf(hf, tmp_path / "m.gguf", "Q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="cut.gguf .*runs past the end"):
        open_gguf(tmp_path / "cut.gguf")
