"""``linear(x, w, b)`` for the runtime's forward passes: the C++ skinny GEMM (csrc/linear.cpp) for fp32
CPU inputs with few rows (decode, verification, drafting), ``torch.nn.functional.linear`` otherwise."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from spdkernels import _cpp

# Above this many rows (prefill), BLAS's blocked GEMM wins.
SKINNY_MAX_ROWS = 48


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [M, K] @ w[N, K]^T (+ b)``."""
    M = x.shape[0]
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or M > SKINNY_MAX_ROWS
            or w.dtype != torch.float32 or not w.is_contiguous() or x.requires_grad):
        return F.linear(x, w, b)
    if not _cpp.load():
        return F.linear(x, w, b)
    return torch.ops.spdkernels._cpu_skinny_linear.default(x, w, b)
