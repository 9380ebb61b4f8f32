"""Kernel-test setup: run Triton in its interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, hence here (conftest.py is
imported before the test modules).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cuda when available (full-size shapes, half precisions), else cpu (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # ``dtype`` parameter: fp32 everywhere; fp16/bf16 too on a GPU.
    if "dtype" in metafunc.fixturenames:
        dtypes = [torch.float32]
        if torch.cuda.is_available():
            dtypes += [torch.float16, torch.bfloat16]
        metafunc.parametrize("dtype", dtypes, ids=[str(d).removeprefix("torch.") for d in dtypes])
