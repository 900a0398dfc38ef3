"""Pieces shared by the ops: the output layout of the verification ops, and the call path of every public
wrapper (the policy: value validation and a forced backend)."""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from spdkernels import _config, _library, _registry


def verify_outputs(R: int, max_depth: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``(output_token_ids [R, max_depth+1], num_emitted [R], accepted_path [R, max_depth])``,
    int32: every backend writes all entries, padding included."""
    return (torch.empty((R, max_depth + 1), dtype=torch.int32, device=device),
            torch.empty((R,), dtype=torch.int32, device=device),
            torch.empty((R, max_depth), dtype=torch.int32, device=device))


def call_op(op: str, overload, args: tuple, check_static: Callable, check_values: Callable, run: Callable):
    """A public wrapper's call of ``op`` with ``args``, under this thread's policy.

    With validation on, the static checks and the value checks (host syncs) run first. Then, when the backend
    to use is the automatic choice for the device (none forced, or the forced one is that choice), the call goes
    through torch's dispatcher (``overload``: on CPU the C++ kernel without Python, which checks its arguments
    itself); when another backend is forced, ``run(name, impl, *args)`` calls it directly after the static checks.
    Under ``torch.compile`` the call is the dispatcher op as traced: no policy (value checks cannot run on fake
    tensors, and a forced backend is not applied: the compiled graph holds the op).

    A schema error raised by the dispatcher (a non-tensor argument, a float max_depth) is turned into the static
    checks' ValueError naming the argument."""
    if torch.compiler.is_compiling():
        return overload(*args)
    forced = _registry.forced_backend()
    validate = _config.validation_enabled()
    if validate:
        check_static(*args)
        check_values(*args)
    if forced is not None:  # (the common case, none forced, needs no lookup: the dispatcher's kernel is the choice)
        try:
            chosen = _registry.direct(op, args[0].device, forced)
        except (AttributeError, _registry.BackendUnavailableError):  # a bad argument is named first
            check_static(*args)
            raise
        if chosen is not None:  # another backend than the dispatcher's kernel: called directly
            if not validate:  # first: a bad argument is a ValueError naming it, not a backend error
                check_static(*args)
            if op in _library.FLOAT_OUTPUTS:  # (the op's Autograd kernel is not on this path)
                _library.refuse_derivatives(overload, args)
            return run(chosen[0], chosen[1], *args)
    try:
        return overload(*args)
    except RuntimeError:
        check_static(*args)
        raise


PYTHON_KERNELS: dict = {}  # op -> its Python kernel (the dispatcher's kernel wherever the C++ extension has none)


def op_kernel(op: str, check_static: Callable, run: Callable) -> Callable:
    """The Python kernel of ``op`` for torch's dispatcher: static checks, then the automatic backend for the
    tensors' device (the one the dispatcher stands for), or the next one where that backend's kernel cannot take
    the input (:class:`spdkernels.KernelLimit`; unless that backend is the forced one, which then raises it)."""

    def kernel(*args):
        check_static(*args)
        name, impl = _registry.resolve(op, args[0].device, None)
        try:
            return run(name, impl, *args)
        except _registry.KernelLimit as e:  # a well-formed input past the kernel's limits: the next backend runs it
            if _registry.forced_backend() == name:  # the forced backend's own error: a forced backend never falls back
                raise
            name, impl = _registry.fallback(op, args[0].device, name, e)
            return run(name, impl, *args)

    PYTHON_KERNELS[op] = kernel

    kernel.__name__ = f"{op}_kernel"
    return kernel
