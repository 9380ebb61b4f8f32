"""How many kernels this process has loaded onto a device, so timings can leave out the steps that
paid for a load.

Triton compiles a kernel (or reads it from its disk cache) and loads it on the first launch of
each specialization; torch.compile's generated kernels load the same way. The step that does so
takes up to seconds longer than the same step will again, so a cost model fed with it learns a
price that never recurs: on the H200 with an empty Triton cache, the speculation controller's
first verification steps paid the compiles and every request was switched off for good. The
speculator compares ``count()`` before and after a step (``StepCost.loaded_kernels``) and the
controller drops such a step's timings.
"""

from __future__ import annotations

import triton

_count = 0


def _on_load(*_args, **_kwargs) -> None:
    global _count
    _count += 1


triton.knobs.runtime.kernel_load_end_hook.add(_on_load)


def count() -> int:
    """Kernels loaded so far (never decreases)."""
    return _count
