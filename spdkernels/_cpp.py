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
