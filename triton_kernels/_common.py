"""Device functions shared by the Triton kernels."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def launch_device(t: torch.Tensor):
    """The context a launch on ``t``'s tensors needs: its CUDA device made current (Triton launches on the current
    device and its stream; tensors on another GPU would be read from the wrong one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def int32_ids(t: torch.Tensor) -> torch.Tensor:
    """Token ids for kernels that read int32: int64 ids outside the int32 range become -1 (outside every
    vocabulary) instead of wrapping to a small id that could be accepted (2**32 + 7 read as 7)."""
    if t.dtype == torch.int64:
        t = torch.where((t >= -1) & (t < 2 ** 31), t, torch.full_like(t, -1)).to(torch.int32)
    return t.contiguous()


@triton.jit
def argmax_span(base, lo, hi, BLOCK: tl.constexpr):
    """(max, int32 index) of ``base[lo:hi]`` (hi > lo), ties to the lowest index (as torch.argmax); NaN never wins,
    and a span without a value above -inf gives (-inf, lo).

    Streams the span in tiles of ``BLOCK`` keeping a lane-wise running max and its index (strict ``>``
    keeps each lane's first maximum), then reduces across lanes taking the lowest index among the
    maxima. Each element is read once."""
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    idx = lo + offs
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        up = x > best
        best = tl.where(up, x, best)
        idx = tl.where(up, cols, idx)
    m = tl.max(best, 0)
    # lanes past hi never updated and hold -inf at an index >= hi: excluded (lane 0, at lo, always qualifies)
    cand = tl.where((best == m) & (idx < hi), idx, hi)
    return m, tl.min(cand, 0).to(tl.int32)


@triton.jit
def argmax_row(base, V, BLOCK: tl.constexpr):
    """int32 argmax of the row ``base[0:V]``, ties to the lowest index (as torch.argmax); an all -inf row gives 0."""
    _, arg = argmax_span(base, 0, V, BLOCK)
    return arg


@triton.jit
def order_key(x):
    """Order-preserving int32 key of fp32 values: ``key(a) >= key(b)`` iff ``a >= b`` (no NaN); both
    zeros map to the key of +0, so comparisons of keys and of values agree."""
    b = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def finish_walk(out_row, path_row, num_ptr, r, depth, tok, max_depth):
    """Epilogue of a verification walk: the final token at ``depth``, ``num_emitted = depth + 1``, and
    the -1 padding of both output rows (written here, so the outputs need no fill)."""
    tl.store(out_row + depth, tok)
    tl.store(num_ptr + r, depth + 1)
    for d in range(0, max_depth):
        if d > depth:
            tl.store(out_row + d, -1)
        if d >= depth:
            tl.store(path_row + d, -1)
    if max_depth > depth:
        tl.store(out_row + max_depth, -1)
