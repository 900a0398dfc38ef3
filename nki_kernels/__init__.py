"""NKI (AWS Trainium/Inferentia) kernels, installed as ``spdkernels.nki_kernels``.

One kernel file per op (``verify_greedy.py``, ``rejection_sample.py``, ``tree_attention.py``), written in the
NKI language of the ``nki`` package (0.3 and later) and importing nothing but ``nki``, ``nki.language``,
``nki.isa``, ``nki.typing`` and ``numpy``; ``_launch.py`` is the host side (layouts, launches).

Where they run:

* on Neuron (xla) tensors, when the ``nki`` package of the Neuron package index imports: ``@nki.jit``;
* on CPU tensors with ``SPDKERNELS_NKI_SIMULATE=1`` and that package installed: its simulator,
  ``nki.simulate(kernel)``;
* on CPU tensors with ``SPDKERNELS_NKI_EMULATE=1`` (or inside :func:`emulation`): the project's NumPy
  emulation of the NKI subset the kernels use (``spdkernels.testing.nki_emulator``), which checks the hardware
  limits. It is a test harness, like ``TRITON_INTERPRET=1`` for the Triton kernels.

The Neuron packages come from the Neuron package index, never from PyPI (PyPI's ``nki`` and ``neuronx-cc``
are placeholders that raise ``ImportError("WRONG PACKAGE")``), so the import is guarded and the package never
depends on them. Kernel modules are imported only when a kernel runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional, Tuple

_override: Optional[bool] = None
_lock = threading.Lock()


@functools.cache
def nki_available() -> Tuple[bool, str]:
    try:
        import nki  # noqa: F401
        import nki.language  # noqa: F401
    except Exception as e:  # ImportError, including PyPI's "WRONG PACKAGE" placeholder
        return False, f"nki not importable ({type(e).__name__}: {e})"
    return True, ""


def emulation_enabled() -> bool:
    """Whether the ``nki`` backend runs on CPU tensors through the NumPy emulation."""
    if _override is not None:
        return _override
    return os.environ.get("SPDKERNELS_NKI_EMULATE", "0") == "1"


def simulator_enabled() -> bool:
    """Whether CPU tensors go to the official ``nki.simulate`` (needs the ``nki`` package)."""
    return os.environ.get("SPDKERNELS_NKI_SIMULATE", "0") == "1" and not emulation_enabled()


@contextlib.contextmanager
def emulation(on: bool = True):
    """Switch the emulation on (or off) inside the block, whatever ``SPDKERNELS_NKI_EMULATE`` says."""
    global _override
    from spdkernels import _registry

    with _lock:
        old, _override = _override, on
    _registry._resolved.clear()
    try:
        yield
    finally:
        with _lock:
            _override = old
        _registry._resolved.clear()


def backend_status(device_type: str) -> Tuple[bool, str]:
    """(can the nki backend run on ``device_type`` here, why not)."""
    if device_type == "cpu":
        if emulation_enabled():
            return True, ""
        if simulator_enabled():
            ok, why = nki_available()
            return (True, "") if ok else (False, f"SPDKERNELS_NKI_SIMULATE=1 but {why}")
        return False, ("nki runs on Neuron (xla) tensors, not cpu (SPDKERNELS_NKI_EMULATE=1 runs the kernels on "
                       "cpu tensors through the NumPy emulation)")
    ok, why = nki_available()
    if not ok:
        return False, why
    if device_type not in ("xla", "neuron"):
        return False, f"nki runs on Neuron (xla) tensors, not {device_type}"
    return True, ""
