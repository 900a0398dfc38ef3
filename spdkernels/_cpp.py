"""Loads the optional C++ extension ``spdkernels._C`` lazily, once, and says once if it is missing."""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("spdkernels")

# dtype codes shared with csrc/common.h
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INT_CODES = {torch.int32: 0, torch.int64: 1}

_lock = threading.Lock()
_module = None
_error: str | None = None
_loaded = False


def load():
    """The extension module, or None (the reason is in :func:`load_error`)."""
    global _module, _error, _loaded
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                from spdkernels import _C  # type: ignore[attr-defined]

                _module = _C
            except ImportError as e:
                _error = f"{type(e).__name__}: {e}"
                log.warning("spdkernels: C++ extension spdkernels._C unavailable (%s); "
                            "the cpp backend is off, other backends still work", _error)
            _loaded = True
    return _module


def load_error() -> str | None:
    load()
    return _error


def num_threads() -> int:
    """Threads for the extension's OpenMP loops: follow torch.set_num_threads."""
    return max(1, torch.get_num_threads())


# Instruction-set levels of the extension's hand-dispatched kernels (csrc/common.h, IsaLevel).
ISA_NAMES = ("baseline", "avx2", "avx512")


def isa() -> str:
    """The level the extension's hand-dispatched kernels run at here: 'baseline' (x86-64), 'avx2'
    (x86-64-v3: AVX2 + FMA) or 'avx512' (F/DQ/BW/VL). The CPU's best, unless capped by the
    ``SPDKERNELS_CPU_ISA`` environment variable (read once, by the extension) or :func:`isa_cap`."""
    C = load()
    if C is None:
        raise RuntimeError(f"spdkernels: the C++ extension is unavailable ({_error})")
    return ISA_NAMES[C.isa_level()]


def isas_here() -> list:
    """Every level this machine can run, lowest first (the tests run each one)."""
    C = load()
    if C is None:
        return []
    old = C.isa_level()
    C.set_isa_cap(len(ISA_NAMES) - 1)
    best = C.isa_level()
    C.set_isa_cap(old)
    return list(ISA_NAMES[:best + 1])


class isa_cap:
    """Context manager: run the extension's hand-dispatched kernels at most at level ``name``
    (one of :data:`ISA_NAMES`); the previous cap comes back on exit. Process-wide, not thread-local."""

    def __init__(self, name: str):
        if name not in ISA_NAMES:
            raise ValueError(f"name: expected one of {ISA_NAMES}, got {name!r}")
        self.level = ISA_NAMES.index(name)

    def __enter__(self):
        C = load()
        if C is None:
            raise RuntimeError(f"spdkernels: the C++ extension is unavailable ({_error})")
        self._old = C.isa_level()
        C.set_isa_cap(self.level)
        return self

    def __exit__(self, *exc):
        load().set_isa_cap(self._old)
        return False
