"""The machine code a Triton kernel launch becomes on a GPU that need not be here.

A batch-1 GEMV streams weights, and whether its inner loop can keep up with the memory system
depends on how many instructions the loop issues per weight, on the barriers in it, and on the
registers (which bound the programs an SM holds). Those can be read without a GPU: Triton compiles
for any CUDA target on the host, and its wheel carries ``nvdisasm`` and ``cuobjdump``. This
module records the launches a function makes (``captured_launches``: the kernel object is swapped
for a recorder, so nothing runs), compiles each for a target (``compile_launch``: sm_90 by
default, the H100 / H200), and profiles the hottest loop of the result (``loop_profile``).
``flashserve bench gemv --sass`` uses it for the GEMV tiles the fixed rules pick.

The compile mirrors what Triton's launcher does on a device: tensors become typed pointers,
integers ``i32`` (``i64`` when they do not fit), tuples element by element, pointers and
integers divisible by 16 carry that hint, and ``num_warps`` / ``num_stages`` / ``launch_pdl``
become options. Launches recorded on the CPU take the CPU's choices where a wrapper makes any
(PDL off, so no ``griddepcontrol`` instructions). It needs a Triton that is not in interpreter
mode (``TRITON_INTERPRET`` unset), since the interpreter keeps no kernels to compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterator

import torch

_POINTER = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
            torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
            torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl", "maxnreg")


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel (a ``triton.JITFunction``), its grid and its arguments."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid) if isinstance(grid, tuple) else (grid,), args, kwargs))

        return record


@contextmanager
def captured_launches(module: ModuleType, name: str) -> Iterator[list[Launch]]:
    """Within the block, launches of ``module.<name>`` are recorded in the list, not run."""
    from triton.runtime.jit import JITFunction

    kernel = getattr(module, name)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{module.__name__}.{name} is not a compilable Triton kernel ({type(kernel).__name__}); "
                           "with TRITON_INTERPRET set Triton keeps none: unset it")
    launches: list[Launch] = []
    setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        setattr(module, name, kernel)


def _arg_type(value: Any) -> tuple[str | tuple, list[tuple[int, ...]]]:
    """(Triton signature type, the paths within it of the values divisible by 16) of a runtime
    argument; a tuple's type is the tuple of its elements' types."""
    if isinstance(value, tuple):
        types = [_arg_type(v) for v in value]
        return tuple(t for t, _ in types), [(j, *path) for j, (_, paths) in enumerate(types) for path in paths]
    ty, divisible = _scalar_type(value)
    return ty, [()] if divisible else []


def _scalar_type(value: Any) -> tuple[str, bool]:
    """(Triton signature type, divisible by 16) of a tensor or number argument."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER:
            raise ValueError(f"no Triton pointer type for a {value.dtype} tensor")
        return "*" + _POINTER[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"), value % 16 == 0 and value != 0
    if isinstance(value, float):
        return "fp32", False
    raise ValueError(f"no Triton signature type for {type(value).__name__} argument {value!r}")


def compile_launch(launch: Launch, arch: int = 90):
    """Compile a recorded launch for CUDA compute capability ``arch`` (90: sm_90); returns Triton's
    compiled kernel (``.asm['cubin']``, ``.asm['ttgir']``, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    values = dict(zip(fn.arg_names, launch.args))
    options = {}
    for key, value in launch.kwargs.items():
        if key in fn.arg_names:
            values[key] = value
        elif key in _OPTIONS:
            options[key] = value
        else:
            raise ValueError(f"{fn.__name__}: unknown launch keyword {key!r}")
    missing = [a for a, p in zip(fn.arg_names, fn.params) if a not in values and not p.has_default]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for {', '.join(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values[name] if name in values else param.default
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name], divisible = _arg_type(value)
        for path in divisible:
            attrs[(i, *path)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def disassemble(kernel) -> tuple[str, int]:
    """(the SASS of a compiled kernel, its registers per thread), from the tools Triton finds
    (its bundled ones, or those its ``TRITON_*_PATH`` variables name)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return sass, int(regs.group(1)) if regs else 0


@dataclass(frozen=True)
class LoopProfile:
    """The hottest loop of a kernel's SASS (the longest span a backward branch closes)."""

    opcodes: Counter = field(default_factory=Counter)  # base opcode (``LOP3``, ``FFMA``, ...) -> count
    registers: int = 0

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())

    @property
    def barriers(self) -> int:
        return self.opcodes["BAR"]

    @property
    def shared_stores(self) -> int:
        return self.opcodes["STS"]


_INSTR = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def loop_profile(sass: str, registers: int = 0) -> LoopProfile | None:
    """Profile the longest loop in ``sass``; None when the kernel has no loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    best = None
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            span = (labels[m.group(1)], i)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        return None
    ops = Counter(m.group(1) for line in lines[best[0] : best[1] + 1] if (m := _INSTR.match(line)))
    return LoopProfile(ops, registers)


def profile_launch(launch: Launch, arch: int = 90) -> LoopProfile | None:
    """``loop_profile`` of a recorded launch compiled for ``arch``."""
    sass, regs = disassemble(compile_launch(launch, arch))
    return loop_profile(sass, regs)
