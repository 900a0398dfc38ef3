"""Loads the optional C++ extension ``spdkernels._C`` lazily, once, and says once if it is missing; and
``spdkernels/_C_ops.so``, the same kernels registered with torch's dispatcher in C++ (:func:`load_ops`)."""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("spdkernels")

# dtype codes shared with csrc/common.h
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INT_CODES = {torch.int32: 0, torch.int64: 1}

_lock = threading.RLock()  # load_ops holds it while it calls load()
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
                # (import_module: loaded while spdkernels itself is still initialising, a missing _C reads
                # "No module named", not a circular-import guess)
                _module = importlib.import_module("spdkernels._C")
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


# ---- _C_ops: the CPU kernels registered with torch's dispatcher in C++ -------------------------------
# csrc/torch_ops/dispatch.cpp registers a C++ CPU kernel for these ops. It runs a well-formed call itself only
# while its "fast" flag is on, which this module keeps equal to: value validation off and the cpp backend
# chosen for the op on CPU (refresh_fast_paths, called whenever either setting changes). Every other call goes
# to the op's Python kernel through its twin op spdkernels::_<op>_python.
OPS_ABI_VERSION = 3  # must match spd_ops_abi_version() in csrc/torch_ops/dispatch.cpp
FAST_OPS = ("rejection_sample", "verify_greedy")

_ops = None
_ops_error: str | None = None
_ops_loaded = False


def ops_compatible(meta: dict, torch_version: str, cxx11_abi: bool) -> str | None:
    """None if a _C_ops built with ``meta`` (its _C_ops.json) may be loaded into this torch, else why not:
    the library links libtorch, whose C++ ABI changes between versions."""
    if meta.get("torch_version") != torch_version:
        return f"built for torch {meta.get('torch_version')}, this is torch {torch_version}"
    if bool(meta.get("cxx11_abi")) != bool(cxx11_abi):
        return f"built with _GLIBCXX_USE_CXX11_ABI={int(bool(meta.get('cxx11_abi')))}, torch uses {int(cxx11_abi)}"
    return None


def load_ops():
    """The ctypes handle of ``spdkernels/_C_ops.so`` after loading it into torch's dispatcher, or None (the
    reason is in :func:`ops_load_error`; the ops then keep their Python CPU path). ``SPDKERNELS_NO_C_OPS=1``
    keeps it unloaded. Called once by ``spdkernels.ops`` after the ops are defined."""
    global _ops, _ops_error, _ops_loaded
    if _ops_loaded:
        return _ops
    with _lock:
        if _ops_loaded:
            return _ops
        try:
            _ops = _load_ops()
        except (OSError, RuntimeError) as e:  # dlopen failed (a missing symbol), or torch refused a registration
            _ops_error = f"{type(e).__name__}: {e}"
        if _ops is None:
            log.info("spdkernels: _C_ops not loaded (%s); the ops use their Python CPU path", _ops_error)
        _ops_loaded = True
    refresh_fast_paths()
    return _ops


def _load_ops():
    global _ops_error
    if os.environ.get("SPDKERNELS_NO_C_OPS", "0") not in ("", "0"):
        _ops_error = "SPDKERNELS_NO_C_OPS is set"
        return None
    C = load()
    if C is None:
        _ops_error = f"no _C ({_error})"
        return None
    path = Path(C.__file__).with_name("_C_ops.so")
    meta = path.with_name("_C_ops.json")
    if not (path.exists() and meta.exists()):
        _ops_error = f"{path.name} not built (the build found no torch, or SPDKERNELS_SKIP_TORCH_OPS was set)"
        return None
    why = ops_compatible(json.loads(meta.read_text()), torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI)
    if why:
        _ops_error = f"{path.name} {why}: rebuild with pip install"
        return None
    torch.ops.load_library(str(path))  # registers the CPU kernels (each sends every call to Python until set)
    lib = ctypes.CDLL(str(path))
    lib.spd_ops_abi_version.restype = ctypes.c_int
    if lib.spd_ops_abi_version() != OPS_ABI_VERSION:
        _ops_error = f"{path.name} has C interface version {lib.spd_ops_abi_version()}, expected {OPS_ABI_VERSION}"
        return None
    lib.spd_ops_set_entry.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.spd_ops_set_fast.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.spd_ops_get_fast.argtypes = [ctypes.c_char_p]
    lib.spd_ops_calls.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.spd_ops_calls.restype = ctypes.c_int64
    entries = C.entry_points()
    for op in FAST_OPS:
        if lib.spd_ops_set_entry(op.encode(), entries[op]) != 0:
            _ops_error = f"{path.name} does not know op {op}"
            return None
    return lib


def ops_load_error() -> str | None:
    load_ops()
    return _ops_error


def refresh_fast_paths() -> None:
    """Set each C++ CPU kernel's fast flag from the current validation setting and backend choice."""
    lib = _ops
    if lib is None:
        return
    from spdkernels import _config, _registry

    cpu = torch.device("cpu")
    for op in FAST_OPS:
        on = False
        if not _config.validation_enabled():
            try:
                on = _registry.resolve(op, cpu)[0] == "cpp"
            except _registry.BackendUnavailableError:
                pass
        lib.spd_ops_set_fast(op.encode(), int(on))


def fast_path(op: str) -> bool:
    """Whether well-formed CPU calls of ``op`` run in the C++ dispatcher kernel (without Python) right now."""
    lib = load_ops()
    return lib is not None and lib.spd_ops_get_fast(op.encode()) == 1


def op_calls(op: str) -> tuple:
    """(calls sent to Python, calls run in C++) by ``op``'s C++ CPU kernel since _C_ops was loaded; (0, 0)
    without _C_ops."""
    lib = load_ops()
    if lib is None:
        return 0, 0
    return lib.spd_ops_calls(op.encode(), 0), lib.spd_ops_calls(op.encode(), 1)
