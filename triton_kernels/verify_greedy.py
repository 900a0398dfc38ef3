"""Triton verify_greedy: a tiled row argmax, then one walk per request.

Kernel 1, ``_row_argmax_kernel``: grid (N + R,), one program per logit row. It streams the row in tiles
of ``BLOCK_V`` elements keeping a lane-wise running max and its index (strict ``>`` keeps each lane's
first maximum), then reduces across lanes taking the lowest index among the maxima: ties go to the
lowest token id, as in torch.argmax. Each logit is read exactly once; the only intermediate tensor is
the int32 argmax per row.

Kernel 2, ``_greedy_walk_kernel``: grid (R,), one program per request. From the root, it looks for the
first child of the current node whose token equals the row's argmax, vectorised over ``BLOCK_K`` nodes
at a time, writes the accepted token and node, and moves on; it writes the padding itself, so the
outputs need no fill. No host sync: CUDA-graph safe for a fixed max_depth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spdkernels.ops._common import verify_outputs

from ._common import argmax_row, finish_walk

# 4096 elements per tile: 8 KB of bf16 / 16 KB of fp32 in flight per program, enough to saturate HBM
# with ~2 programs per SM at V ~ 128k; the interpreter benefits from large tiles too.
BLOCK_V = 4096
BLOCK_K = 64  # draft nodes scanned at once when searching for a matching child


@triton.jit
def _row_argmax_kernel(logits_ptr, row_stride, V, out_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + row, argmax_row(logits_ptr + row * row_stride, V, BLOCK))


@triton.jit(do_not_specialize=["max_depth", "N"])
def _greedy_walk_kernel(argmax_ptr, draft_ptr, cu_ptr, parents_ptr, out_ptr, num_ptr, path_ptr, max_depth, N,
                        IS_CHAIN: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    # offsets clamped into [0, N] and non-decreasing: with validation off a malformed cu_num_draft gives a
    # defined result, never a read outside the N + R argmax rows or the N drafts (parents and draft tokens are
    # only compared, never used as addresses)
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + r), 0), N)
    k = tl.minimum(tl.maximum(tl.load(cu_ptr + r + 1), start), N) - start
    row0 = start + r
    out_row = out_ptr + r.to(tl.int64) * (max_depth + 1)
    path_row = path_ptr + r.to(tl.int64) * max_depth
    offs = tl.arange(0, BLOCK)

    node = -1
    depth = 0
    done = 0
    best = tl.load(argmax_ptr + row0)
    for _step in range(0, max_depth):
        if done == 0:
            if IS_CHAIN:
                child = tl.where(node + 1 < k, node + 1, -1)
                if child >= 0:
                    tok = tl.load(draft_ptr + start + child).to(tl.int32)
                    child = tl.where(tok == best, child, -1)
            else:
                child = k  # first match, k if none
                for j0 in range(0, k, BLOCK):
                    j = j0 + offs
                    inb = (j < k) & (j > node)
                    par = tl.load(parents_ptr + start + j, mask=inb, other=-2)
                    tok = tl.load(draft_ptr + start + j, mask=inb, other=-1).to(tl.int32)
                    hit = inb & (par == node) & (tok == best)
                    child = tl.minimum(child, tl.min(tl.where(hit, j, k), 0))
                child = tl.where(child < k, child, -1)
            if child >= 0:
                tl.store(out_row + depth, best)
                tl.store(path_row + depth, child)
                depth += 1
                node = child
                best = tl.load(argmax_ptr + row0 + 1 + node)
            else:
                done = 1
    finish_walk(out_row, path_row, num_ptr, r, depth, best, max_depth)


def row_argmax(target_logits: torch.Tensor) -> torch.Tensor:
    """int32 [rows]: argmax of each row, ties to the lowest index."""
    rows, V = target_logits.shape
    out = torch.empty(rows, dtype=torch.int32, device=target_logits.device)
    if rows:
        _row_argmax_kernel[(rows,)](target_logits, target_logits.stride(0), V, out,
                                    BLOCK=min(BLOCK_V, triton.next_power_of_2(V)))
    return out


def verify_greedy(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    R = cu_num_draft.shape[0] - 1
    dev = target_logits.device
    out, num, path = verify_outputs(R, max_depth, dev)  # the kernels write every entry, padding included
    if R == 0:
        return out, num, path
    amax = row_argmax(target_logits)
    draft = draft_token_ids.contiguous()
    par = parents.contiguous() if parents is not None else cu_num_draft  # dummy pointer for chains
    _greedy_walk_kernel[(R,)](amax, draft, cu_num_draft.contiguous(), par, out, num, path, max_depth,
                              draft.shape[0], IS_CHAIN=parents is None, BLOCK=BLOCK_K)
    return out, num, path
