"""Detect host synchronisation in Python code that launches device work (CUDA-graph safety), on any machine.

A CUDA graph cannot contain a host synchronisation: reading a device value on the host (``.item()``,
``int(t)``, ``bool(t)``, ``.tolist()``) or an op whose output shape depends on device values (``nonzero``,
boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``unique``, ...). On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` catches them; without one, :func:`no_host_sync` catches the same
calls made from Python (the launchers, wrappers and checks of the ops are Python), so the launch code of the
GPU backends, run on CPU tensors (e.g. under the Triton interpreter), is checked by the CPU test suite::

    with no_host_sync():
        spdkernels.tree_attention(..., max_q_len=8, max_kv_len=512)   # raises HostSyncError if it syncs

It checks the Python around the kernels, not the kernels themselves, and not the Triton interpreter (which
reads the tensors on the host by design): pass ``allow=`` the modules whose calls are exempt.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Sequence

import torch

__all__ = ["HostSyncError", "no_host_sync"]


class HostSyncError(RuntimeError):
    """A host synchronisation inside :func:`no_host_sync`."""


# Tensor methods that read device values on the host, and functions whose output shape depends on them
_METHODS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__", "__array__", "nonzero",
            "masked_select", "unique", "unique_consecutive")
_FUNCTIONS = ("nonzero", "masked_select", "unique", "unique_consecutive", "equal")


def _caller_allowed(allow: Sequence[str]) -> bool:
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if any(mod == a or mod.startswith(a + ".") for a in allow):
            return True
        f = f.f_back
    return False


@contextlib.contextmanager
def no_host_sync(allow: Sequence[str] = ("triton",)) -> Iterator[None]:
    """Raise :class:`HostSyncError` at the first host synchronisation made from Python inside the block (see the
    module docstring); calls made (directly or not) from the modules in ``allow`` are let through."""
    saved = []

    def guard(owner, name, what, orig):
        def f(*a, **kw):
            if not _caller_allowed(allow):
                raise HostSyncError(f"host synchronisation: {what}")
            return orig(*a, **kw)
        saved.append((owner, name, orig))
        setattr(owner, name, f)

    def guard_index(owner, name, orig):
        def f(self, idx, *rest):
            items = idx if isinstance(idx, tuple) else (idx,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items) and not _caller_allowed(allow):
                raise HostSyncError(f"host synchronisation: boolean-mask indexing (Tensor.{name})")
            return orig(self, idx, *rest)
        saved.append((owner, name, orig))
        setattr(owner, name, f)

    def guard_repeat(owner, name, orig):
        def f(*a, **kw):
            if kw.get("output_size") is None and not _caller_allowed(allow):
                raise HostSyncError("host synchronisation: repeat_interleave without output_size")
            return orig(*a, **kw)
        saved.append((owner, name, orig))
        setattr(owner, name, f)

    try:
        for m in _METHODS:
            guard(torch.Tensor, m, f"Tensor.{m}()", getattr(torch.Tensor, m))
        for fn in _FUNCTIONS:
            guard(torch, fn, f"torch.{fn}()", getattr(torch, fn))
        for name in ("__getitem__", "__setitem__"):
            guard_index(torch.Tensor, name, getattr(torch.Tensor, name))
        guard_repeat(torch.Tensor, "repeat_interleave", torch.Tensor.repeat_interleave)
        guard_repeat(torch, "repeat_interleave", torch.repeat_interleave)
        yield
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)
