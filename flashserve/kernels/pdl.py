"""Programmatic dependent launch (Hopper and later) for the small kernels of a decode step.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it on the stream is
still finishing, so its launch and set-up overlap that kernel's tail instead of following it.
Such a kernel must wait (``griddepcontrol.wait``) before it reads anything an earlier kernel
wrote: every kernel here does so first thing (``wait_for_prior``), so what it computes is
unchanged and only the gap between kernels shrinks. Kernels call ``wait_for_prior(PDL)`` at
their start and launchers pass ``**launch_args(device)``.

A kernel launched with ``launch_args(device, early=True)`` also lets the kernel after it launch at
once (``griddepcontrol.launch_dependents`` before its wait), not only when it ends: that kernel's
programs take the SM slots this one leaves and, if they read data no earlier kernel writes (the
int4 GEMV reads its first weights), do so before their own wait. Rotary, decode attention, the
activation and the KV-cache write launch early; norms only where the model's products prefer it
(``PackedWeight.early_inputs``): on an H100, batch-1 Llama-3.1-8B int4 went 347.3 -> 363.5 tok/s
with the first four and -> 373.9 with the norms too, while early norms took int8 from 286 to 280
(docs/quantization.md).

On by default on CUDA devices of compute capability 9.0 and later; ``FLASHSERVE_PDL=0`` turns
it off; never in Triton's interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from flashserve.kernels.utils import is_interpreter

ENABLED = os.environ.get("FLASHSERVE_PDL", "1") not in ("", "0")
EARLY = 2  # the PDL flag of a kernel that launches its dependents at its start


@triton.jit
def wait_for_prior(PDL: tl.constexpr):
    """With PDL: block until the kernels before this one finished and their writes are visible;
    with ``PDL == EARLY``, first let the next kernel launch."""
    if PDL == 2:  # EARLY
        gdc_launch_dependents()
    if PDL:
        gdc_wait()


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch."""
    if not ENABLED or device.type != "cuda" or is_interpreter():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device, early: bool = False) -> dict:
    """The launch keywords: the kernel's ``PDL`` flag (0 off, 1 on, ``EARLY`` on and launching its
    dependents at its start) and Triton's ``launch_pdl`` option."""
    on = enabled(device)
    return {"PDL": (EARLY if early else 1) if on else 0, "launch_pdl": on}
