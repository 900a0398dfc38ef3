"""One registry that picks a backend per op and device (docs/contract.md section 4).

Backends, in order of preference: ``triton`` (CUDA/ROCm GPUs), ``nki`` (AWS Neuron), ``cpp`` (the C++
extension, CPU), ``torch`` (the pure-torch reference: any device, always last).

* Automatic choice: the first backend that can run on the tensors' device and implements the op. The
  choice (and why better ones were skipped) is logged once per (op, device type).
* Per input: where the automatic backend's kernel cannot take a well-formed input (a size past its tiles: it
  raises a :class:`KernelLimit` error), the call runs on the next automatic backend instead (torch at the latest),
  logged once per (op, device type, backend) as a warning. Where that backend is the forced one, the error is
  raised instead.
* ``SPDKERNELS_BACKEND=<name>`` or :func:`set_backend` forces one backend for the process, ``with
  use_backend(name):`` for a block of code in the current thread (or asyncio task) only; if the forced backend
  cannot run the op on that device the call raises :class:`BackendUnavailableError` instead of falling back.
  The choice applies to the public wrappers (``spdkernels.verify_greedy``, ...). ``torch.ops.spdkernels.*``
  runs the kernel torch's dispatcher holds for the device: the automatic choice.
* The Triton interpreter (``TRITON_INTERPRET=1``) lets the ``triton`` backend run on CPU tensors. It is
  never chosen automatically on CPU (it is orders of magnitude slower than ``cpp``); tests and
  benchmarks force it.
* Likewise ``SPDKERNELS_NKI_EMULATE=1`` lets the ``nki`` backend run its kernels on CPU tensors through the
  NumPy emulation of the NKI language (``spdkernels.testing.nki_emulator``); never chosen automatically.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("spdkernels")

BACKENDS: Tuple[str, ...] = ("triton", "nki", "cpp", "torch")

# Automatic preference per device type. ROCm devices also report device.type == "cuda" in torch.
_AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "torch"),
    "xla": ("nki", "torch"),
    "neuron": ("nki", "torch"),
    "cpu": ("cpp", "torch"),
}

_impls: Dict[str, Dict[str, Callable]] = {}
# (op, device type, forced) -> resolve's answer; (op, device type, forced, "direct") -> direct's (one dict, so that
# whatever clears resolve's answers, tests included, clears direct's with them)
_resolved: Dict[tuple, Optional[Tuple[str, Callable]]] = {}
_forced: Optional[str] = None  # set_backend: the process-wide choice
_forced_set = False
_UNSET = object()
_forced_here: contextvars.ContextVar = contextvars.ContextVar("spdkernels_backend", default=_UNSET)  # use_backend
_logged: set = set()
_lock = threading.Lock()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given device."""


class KernelLimit(Exception):
    """Base of the errors a backend raises for a well-formed input its kernel cannot take (sizes past its tiles, a
    search that cannot close). A forced backend raises them; the automatic choice runs the next backend instead
    (:func:`fallback`)."""


class BackendLimitError(KernelLimit, ValueError):
    """A well-formed input outside one backend's limits (for instance a head dim past the NKI kernel's 128
    partitions); the message names the argument."""


class BackendSearchError(KernelLimit, RuntimeError):
    """A backend's kernel could not finish for this input (the NKI top-k / top-p threshold search did not close)."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _impls.setdefault(op, {})[backend] = fn
        _resolved.clear()
        return fn

    return deco


@functools.cache
def _interpret() -> bool:
    """TRITON_INTERPRET is read once: Triton itself fixes the mode when the kernels are decorated."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton not importable ({type(e).__name__}: {e})"
    return True, ""


def _device_ok(backend: str, device_type: str) -> Tuple[bool, str]:
    """Can ``backend`` run on ``device_type`` in this process? (ok, reason if not)."""
    if backend == "torch":
        return True, ""
    if backend == "cpp":
        if device_type != "cpu":
            return False, f"the C++ extension runs on cpu tensors, not {device_type}"
        from spdkernels import _cpp

        if not _cpp.load():
            return False, f"C++ extension not loaded ({_cpp.load_error()})"
        return True, ""
    if backend == "triton":
        ok, why = _triton_importable()
        if not ok:
            return False, why
        if device_type == "cuda":
            return True, ""
        if device_type == "cpu" and _interpret():
            return True, ""
        return False, f"triton runs on cuda tensors (or cpu with TRITON_INTERPRET=1), not {device_type}"
    if backend == "nki":  # Neuron tensors with the nki package; cpu tensors through the emulation if asked
        from spdkernels.nki_kernels import backend_status

        return backend_status(device_type)
    return False, f"unknown backend {backend!r}"


def available_backends(device: torch.device | str | None = None, op: Optional[str] = None) -> List[str]:
    """Backends that can run here: on ``device`` (default: every device this process has), and
    implementing ``op`` when given. Order is the preference order."""
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    out = []
    for b in BACKENDS:
        if op is not None and b not in _impls.get(op, {}):
            continue
        if any(_device_ok(b, t)[0] for t in types):
            out.append(b)
    return out


def set_backend(name: Optional[str]) -> None:
    """Force ``name`` for every op in the process (``None`` restores the automatic choice and the env
    variable). A ``use_backend`` block in progress keeps its own choice."""
    global _forced, _forced_set
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    with _lock:
        _forced, _forced_set = name, name is not None


def forced_backend() -> Optional[str]:
    """The forced backend: this context's use_backend if any, else set_backend's, else ``SPDKERNELS_BACKEND``
    (read once)."""
    here = _forced_here.get()
    if here is not _UNSET:
        return here
    if _forced_set:
        return _forced
    return _env_backend()


@functools.cache
def _env_backend() -> Optional[str]:
    env = os.environ.get("SPDKERNELS_BACKEND", "").strip()
    if not env:
        return None
    if env not in BACKENDS:
        raise ValueError(f"SPDKERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Context manager: force ``name`` inside the block (``None``: automatic), for this thread / task only."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    token = _forced_here.set(name)
    try:
        yield
    finally:
        _forced_here.reset(token)


def resolve(op: str, device: torch.device, forced=_UNSET) -> Tuple[str, Callable]:
    """The (backend name, implementation) that runs ``op`` for tensors on ``device``: the forced backend
    (``forced``, by default :func:`forced_backend`), or the automatic choice when none is forced.

    Cached per (op, device type, forced backend): availability is probed once, not on every call.
    """
    key = (op, device.type, forced_backend() if forced is _UNSET else forced)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve(op, device.type, key[2])
    return hit


def direct(op: str, device: torch.device, forced: str) -> Optional[Tuple[str, Callable]]:
    """For a forced backend: its (name, implementation) to call directly, or None where it is the automatic choice
    for ``device`` (the dispatcher's kernel, which makes its own argument checks, is then the call). Cached."""
    key = (op, device.type, forced, "direct")
    hit = _resolved.get(key, _UNSET)
    if hit is _UNSET:
        chosen = resolve(op, device, forced)
        hit = _resolved[key] = None if chosen[0] == resolve(op, device, None)[0] else chosen
    return hit


def fallback(op: str, device: torch.device, failed: str, err: KernelLimit) -> Tuple[str, Callable]:
    """The automatic choice after ``failed`` (the automatic backend for ``device``) refused an input with ``err``:
    the next backend in the automatic order that can run (torch at the latest). Logged once per (op, device type,
    backend). The caller re-raises ``err`` where ``failed`` is the forced backend: a forced backend never falls
    back."""
    order = _AUTO_ORDER.get(device.type, ("torch",))
    impls = _impls.get(op, {})
    later = order[order.index(failed) + 1:] if failed in order else ("torch",)
    for b in later:
        if b in impls and _device_ok(b, device.type)[0]:
            key = (op, device.type, failed, "fallback")
            with _lock:
                first = key not in _logged
                _logged.add(key)
            if first:  # (a warning: the next backend may be much slower on this device)
                log.warning("spdkernels: %s on %s: backend %r cannot take an input (%s); such inputs run on %r",
                            op, device.type, failed, err, b)
            return b, impls[b]
    raise err


def _resolve(op: str, dtype_: str, forced: Optional[str]) -> Tuple[str, Callable]:
    impls = _impls.get(op, {})
    if forced is not None:
        if forced not in impls:
            raise BackendUnavailableError(f"backend {forced!r} (forced) does not implement {op}")
        ok, why = _device_ok(forced, dtype_)
        if not ok:
            raise BackendUnavailableError(f"backend {forced!r} (forced) cannot run {op} on {dtype_}: {why}")
        return forced, impls[forced]
    skipped = []
    for b in _AUTO_ORDER.get(dtype_, ("torch",)):
        if b not in impls:
            skipped.append(f"{b}: no implementation")
            continue
        ok, why = _device_ok(b, dtype_)
        if ok:
            key = (op, dtype_)
            if key not in _logged:
                _logged.add(key)
                log.info("spdkernels: %s on %s uses backend %r%s", op, dtype_, b,
                         f" (skipped {'; '.join(skipped)})" if skipped else "")
            return b, impls[b]
        skipped.append(f"{b}: {why}")
    raise BackendUnavailableError(f"no backend can run {op} on {dtype_}: {'; '.join(skipped)}")
