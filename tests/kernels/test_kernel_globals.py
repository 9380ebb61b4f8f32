"""Every Triton kernel reads module-level constants only as ``tl.constexpr``: the compiler refuses
any other global, while the interpreter the CPU tests run in accepts it (an H200 run once failed
to compile a kernel that passed here: a plain float constant)."""

from __future__ import annotations

import importlib
import pkgutil

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import flashserve.kernels as kernels

PLAIN = (int, float, bool, str, bytes, tuple, list, dict, set, frozenset)


def _kernels():
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and obj.fn.__module__ == module.__name__:
                yield module, name, obj


def test_kernels_read_module_constants_only_as_constexpr():
    found = list(_kernels())
    assert len(found) > 20  # every kernel module was imported
    bad = []
    for module, name, fn in found:
        for used in fn.fn.__code__.co_names:  # globals (and attribute names, which the lookup skips)
            value = vars(module).get(used)
            if isinstance(value, PLAIN) and not isinstance(value, tl.constexpr):
                bad.append(f"{module.__name__}.{name} reads {used} = {value!r}")
    assert not bad, "wrap module constants read by kernels in tl.constexpr(...): " + "; ".join(bad)
