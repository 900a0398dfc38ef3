"""Process-wide switches: argument validation that needs a host sync.

Checks of shapes, dtypes and devices are always made (they are free). Checks that read tensor values
(`cu_num_draft` monotone, `parents` in topological order, token ids in range, NaN in logits, ...) need a
device->host sync and a pass over the data; they are on by default and can be switched off for
production with ``spdkernels.set_validation(False)`` or ``SPDKERNELS_VALIDATE=0``.
"""

from __future__ import annotations

import contextlib
import os

_validation = os.environ.get("SPDKERNELS_VALIDATE", "1").strip().lower() not in ("0", "false", "off", "no")


def set_validation(enabled: bool) -> None:
    """Switch the value checks (host syncs) on or off for the whole process."""
    global _validation
    _validation = bool(enabled)
    from spdkernels import _cpp  # the C++ CPU kernels run calls themselves only with validation off

    _cpp.refresh_fast_paths()


def validation_enabled() -> bool:
    return _validation


@contextlib.contextmanager
def validation(enabled: bool):
    """Context manager form of :func:`set_validation`."""
    old = _validation
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(old)
