"""spdkernels: kernels and a thin runtime for speculative decoding.

Ops (``torch.ops.spdkernels.*``, wrapped here with typed signatures): :func:`verify_greedy`, :func:`rejection_sample`,
:func:`tree_attention`; token-tree utilities in :mod:`spdkernels.tree`.
Backends: ``triton``, ``nki``, ``cpp``, ``torch`` (see :func:`available_backends`).
"""

from . import tree
from ._config import set_validation, validation, validation_enabled
from ._registry import (
    BACKENDS,
    BackendLimitError,
    BackendSearchError,
    BackendUnavailableError,
    KernelLimit,
    available_backends,
    forced_backend,
    set_backend,
    use_backend,
)
from .ops import rejection_sample, tree_attention, verify_greedy

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendLimitError",
    "BackendSearchError",
    "BackendUnavailableError",
    "KernelLimit",
    "available_backends",
    "forced_backend",
    "set_backend",
    "set_validation",
    "use_backend",
    "validation",
    "rejection_sample",
    "tree",
    "tree_attention",
    "validation_enabled",
    "verify_greedy",
]
