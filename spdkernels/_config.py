"""Argument validation that needs a host sync: a process-wide default and a context-local override.

Checks of shapes, dtypes and devices are always made (they are free), and so are the index checks that keep
every kernel's reads and writes in bounds. Checks that read tensor values for the contract itself
(`cu_num_draft` monotone, `parents` in topological order, token ids in range, NaN in logits, ...) need a
device->host sync and a pass over the data; the public wrappers (``spdkernels.verify_greedy``, ...) make them by
default. Switch them off for production with ``spdkernels.set_validation(False)`` or ``SPDKERNELS_VALIDATE=0``
(the process-wide default), or for a block of code with ``with spdkernels.validation(False):``, which applies
to the current thread (or asyncio task) only. Calls of ``torch.ops.spdkernels.*`` themselves, and calls traced
by ``torch.compile``, make only the always-on checks.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

_default = os.environ.get("SPDKERNELS_VALIDATE", "1").strip().lower() not in ("0", "false", "off", "no")
_override: contextvars.ContextVar = contextvars.ContextVar("spdkernels_validation", default=None)


def _flag(enabled) -> bool:
    if not isinstance(enabled, (bool, int)) or isinstance(enabled, int) and enabled not in (0, 1):
        raise ValueError(f"enabled: expected True or False, got {enabled!r}")  # ("false" is truthy; None is not False)
    return bool(enabled)


def set_validation(enabled: bool) -> None:
    """Switch the value checks on or off for the whole process (every thread without its own setting)."""
    global _default
    _default = _flag(enabled)


def validation_enabled() -> bool:
    v = _override.get()
    return _default if v is None else v


@contextlib.contextmanager
def validation(enabled: bool):
    """Context manager: value checks on or off inside the block, for this thread / task only."""
    token = _override.set(_flag(enabled))
    try:
        yield
    finally:
        _override.reset(token)
