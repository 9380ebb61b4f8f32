"""Kernel-test setup: run Triton in its interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, hence here (conftest.py is
imported before the test modules).
"""

from __future__ import annotations

import os
import platform

# The interpreter computes tl.dot with numpy's matmul (OpenBLAS). OpenBLAS picks its kernels by
# CPU, and its AVX2/FMA ("Haswell") ones give a row other bits when it sits elsewhere in a tile,
# which the batch-invariance tests would take for the kernel's fault (2-core AMD EPYC, AVX2 only:
# 3 failures; Intel AVX-512 hosts and the AVX kernels pass). One kernel family on every x86 host;
# numpy reads this when first imported, which is here (tests/kernels is collected first).
if platform.machine() in ("x86_64", "AMD64"):
    os.environ.setdefault("OPENBLAS_CORETYPE", "Sandybridge")

import torch  # noqa: E402

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
