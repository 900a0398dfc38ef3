"""Triton verify_greedy: a tiled row argmax over row chunks, then one walk per request.

Kernel 1, ``_chunk_argmax_kernel``: grid (N + R, S), one program per chunk of a logit row: the rows are cut into
``S`` chunks of whole ``BLOCK_V`` tiles so that about ``ARGMAX_PROGRAMS`` programs stream the logits (one program
per row left an H200 at 45% of its copy bandwidth at R = 64, k = 4, V = 128256: 320 programs, too few loads in
flight). A program keeps a lane-wise running max and its index (strict ``>`` keeps each lane's first maximum) and
writes its chunk's max and the lowest index among the maxima. Each logit is read exactly once.

Kernel 2, ``_greedy_walk_kernel``: grid (R,), one program per request. It takes a row's argmax from the row's S
chunk results when it reaches the row (the largest max, and among equal ones the lowest index: ties go to the
lowest token id, as in torch.argmax), looks for the first child of the current node whose token equals it,
vectorised over ``BLOCK_K`` nodes at a time, writes the accepted token and node, and moves on; it writes the
padding itself, so the outputs need no fill. No host sync: CUDA-graph safe for a fixed max_depth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spdkernels.ops._common import verify_outputs

from ._common import argmax_span, finish_walk

# 4096 elements per tile: 8 KB of bf16 / 16 KB of fp32 per program and iteration; the interpreter benefits from
# large tiles too
BLOCK_V = 4096
# programs the argmax aims for (rows x chunks), about 8 per SM of an H100/H200 (132 SMs): a fixed number, not
# the device's, so that the chunking, and the tests of it under the interpreter, do not depend on the machine
ARGMAX_PROGRAMS = 1024
BLOCK_K = 64  # draft nodes scanned at once when searching for a matching child


@triton.jit
def _chunk_argmax_kernel(logits_ptr, row_stride, V, chunk, val_ptr, idx_ptr, BLOCK: tl.constexpr):
    """Chunk c of row r (columns [c * chunk, min((c + 1) * chunk, V))): its max and argmax at [r * S + c]."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    S = tl.num_programs(1)
    lo = c * chunk
    m, arg = argmax_span(logits_ptr + row * row_stride, lo, tl.minimum(lo + chunk, V), BLOCK)
    tl.store(val_ptr + row * S + c, m)
    tl.store(idx_ptr + row * S + c, arg)


@triton.jit
def _row_argmax(val_ptr, idx_ptr, row, S, SP: tl.constexpr):
    """A row's argmax from its S chunk results: the largest max, the lowest index among equal ones (all chunks
    -inf: chunk 0's index, 0). SP: S rounded up to a power of two."""
    c = tl.arange(0, SP)
    ok = c < S
    v = tl.load(val_ptr + row * S + c, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + row * S + c, mask=ok, other=2147483647)
    m = tl.max(v, 0)
    return tl.min(tl.where(ok & (v == m), i, 2147483647), 0)


@triton.jit(do_not_specialize=["max_depth", "N"])
def _greedy_walk_kernel(val_ptr, idx_ptr, S, draft_ptr, cu_ptr, parents_ptr, out_ptr, num_ptr, path_ptr, max_depth, N,
                        IS_CHAIN: tl.constexpr, BLOCK: tl.constexpr, SP: tl.constexpr):
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
    best = _row_argmax(val_ptr, idx_ptr, row0, S, SP)
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
                best = _row_argmax(val_ptr, idx_ptr, row0 + 1 + node, S, SP)
            else:
                done = 1
    finish_walk(out_row, path_row, num_ptr, r, depth, best, max_depth)


def argmax_chunks(rows: int, V: int):
    """(S, chunk): rows cut into S chunks of ``chunk`` columns (whole tiles), about ARGMAX_PROGRAMS programs."""
    block = min(BLOCK_V, triton.next_power_of_2(V))
    tiles = triton.cdiv(V, block)
    per_chunk = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(ARGMAX_PROGRAMS, max(rows, 1)))))
    chunk = per_chunk * block
    return triton.cdiv(V, chunk), chunk


def verify_greedy(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    R = cu_num_draft.shape[0] - 1
    dev = target_logits.device
    out, num, path = verify_outputs(R, max_depth, dev)  # the kernels write every entry, padding included
    if R == 0:
        return out, num, path
    rows, V = target_logits.shape
    S, chunk = argmax_chunks(rows, V)
    val = torch.empty(rows * S, dtype=torch.float32, device=dev)  # rows = N + R >= 1 (checked by the op)
    idx = torch.empty(rows * S, dtype=torch.int32, device=dev)
    if rows:
        _chunk_argmax_kernel[(rows, S)](target_logits, target_logits.stride(0), V, chunk, val, idx,
                                        BLOCK=min(BLOCK_V, triton.next_power_of_2(V)))
    draft = draft_token_ids.contiguous()
    par = parents.contiguous() if parents is not None else cu_num_draft  # dummy pointer for chains
    _greedy_walk_kernel[(R,)](val, idx, S, draft, cu_num_draft.contiguous(), par, out, num, path, max_depth,
                              draft.shape[0], IS_CHAIN=parents is None, BLOCK=BLOCK_K,
                              SP=triton.next_power_of_2(S))
    return out, num, path
