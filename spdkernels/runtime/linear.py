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
    C = _cpp.load()
    if C is None:
        return F.linear(x, w, b)
    if x.stride(1) != 1:
        x = x.contiguous()
    N, K = w.shape
    if b is not None:
        b = b.contiguous()  # keep a reference: the kernel reads it after this line
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)  # the CPU path
    if M:
        C.skinny_linear_f32(x.data_ptr(), x.stride(0), w.data_ptr(), 0 if b is None else b.data_ptr(),
                            y.data_ptr(), N, M, N, K, _cpp.num_threads())
    return y
