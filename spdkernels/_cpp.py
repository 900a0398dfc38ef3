"""Loads the C++ extension ``spdkernels._C`` once (when ``spdkernels`` is imported), and says once if it is
unavailable and why.

The extension registers the CPU kernels with torch's dispatcher (csrc/ops.cpp): importing it is all there is to
do. It links the libtorch it was built against, so it is loaded only under that torch version (``_C.json``,
written by the build beside it, records the version, or why the build failed).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger("spdkernels")

_lock = threading.Lock()
_loaded = False
_error: str | None = None


def compatible(meta: dict, torch_version: str, cxx11_abi: bool) -> str | None:
    """None if an extension whose build recorded ``meta`` may be loaded into this torch, else why not."""
    if "error" in meta:
        return str(meta["error"])
    if meta.get("torch_version") != torch_version:
        return f"built for torch {meta.get('torch_version')}, this is torch {torch_version}: reinstall spdkernels"
    if bool(meta.get("cxx11_abi")) != bool(cxx11_abi):
        return f"built with _GLIBCXX_USE_CXX11_ABI={int(bool(meta.get('cxx11_abi')))}, torch uses {int(cxx11_abi)}"
    return None


def _find() -> str | None:
    """Import the extension if this torch may load it; None on success, else the reason."""
    spec = importlib.util.find_spec("spdkernels._C")
    meta = Path(__file__).with_name("_C.json")
    try:
        info = json.loads(meta.read_text()) if meta.exists() else None
    except (OSError, ValueError) as e:  # a damaged record: the extension is off, the package still imports
        return f"{meta.name} is unreadable ({e}): reinstall"
    if info is not None and not isinstance(info, dict):
        return f"{meta.name} is not a JSON object: reinstall"
    if spec is None:  # the build may have recorded why it made no extension
        why = info.get("error") if info else None
        return why or "not built (no spdkernels._C module)"
    if info is None:
        return f"{Path(spec.origin).name} has no {meta.name} beside it (the torch it was built for): reinstall"
    why = compatible(info, torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI)
    if why:
        return why
    try:
        importlib.import_module("spdkernels._C")
    except (ImportError, OSError, RuntimeError) as e:  # dlopen failed, or torch refused a registration
        return f"{type(e).__name__}: {e}"
    return None


def load() -> bool:
    """Whether the extension is loaded (its kernels registered); the reason if not is in :func:`load_error`."""
    global _loaded, _error
    if not _loaded:
        with _lock:
            if not _loaded:
                _error = _find()
                if _error:
                    log.warning("spdkernels: C++ extension spdkernels._C unavailable (%s); the cpp backend is off, "
                                "other backends still work", _error)
                _loaded = True
    return _error is None


def load_error() -> str | None:
    load()
    return _error


def _require():
    if not load():
        raise RuntimeError(f"spdkernels: the C++ extension is unavailable ({_error})")
    return torch.ops.spdkernels


# Instruction-set levels of the extension's hand-dispatched kernels (csrc/common.h, IsaLevel).
ISA_NAMES = ("baseline", "avx2", "avx512")


def isa() -> str:
    """The level the extension's hand-dispatched kernels run at here: 'baseline' (x86-64), 'avx2'
    (x86-64-v3: AVX2 + FMA) or 'avx512' (F/DQ/BW/VL). The CPU's best, unless capped by the
    ``SPDKERNELS_CPU_ISA`` environment variable (read once, by the extension) or :func:`isa_cap`."""
    return ISA_NAMES[_require()._cpu_isa_level()]


def isas_here() -> list:
    """Every level this machine can run, lowest first (the tests run each one)."""
    if not load():
        return []
    ops = torch.ops.spdkernels
    old = ops._cpu_isa_level()
    ops._cpu_set_isa_cap(len(ISA_NAMES) - 1)
    best = ops._cpu_isa_level()
    ops._cpu_set_isa_cap(old)
    return list(ISA_NAMES[:best + 1])


class isa_cap:
    """Context manager: run the extension's hand-dispatched kernels at most at level ``name``
    (one of :data:`ISA_NAMES`); the previous cap comes back on exit. Process-wide, not thread-local
    (a test and benchmark knob)."""

    def __init__(self, name: str):
        if name not in ISA_NAMES:
            raise ValueError(f"name: expected one of {ISA_NAMES}, got {name!r}")
        self.level = ISA_NAMES.index(name)

    def __enter__(self):
        ops = _require()
        self._old = ops._cpu_isa_level()
        ops._cpu_set_isa_cap(self.level)
        return self

    def __exit__(self, *exc):
        torch.ops.spdkernels._cpu_set_isa_cap(self._old)
        return False
