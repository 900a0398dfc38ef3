"""Triton tree attention over a paged KV cache: flash attention with GQA packing and split-KV.

Kernel ``_tree_attn_kernel``, grid (R * m_tiles, Hkv, splits):

* **Packing.** The q_len query tokens of a request and the G = Hq / Hkv query heads that share one KV
  head form the rows of one tile (row m = query m // G, head h * G + m % G), so each K/V block is read
  once per KV head, not once per query head. Long trees spill into more m-tiles.
* **Paged K/V.** Positions are streamed in tiles of ``BLOCK_N <= block_size``, so a tile lies in one page: one
  scalar block-table load per tile, 64-bit arithmetic for the page base only, int32 in-page offsets. The caches
  are read through their strides (block, slot, head; unit-stride head dim), so K and V views of a fused or
  padded cache are used in place, not copied. Tile sizes and warps per dtype and head dim: ``_tiles``.
  Scores in fp32 (``tl.dot``; fp32 inputs use IEEE precision, not TF32), online
  softmax in base 2 with the scale folded in.
* **Masking.** Chunks entirely inside the committed prefix need no mask. Only chunks that reach the last
  q_len positions read the tree bits (or apply the causal chain rule when there is no mask).
* **Split-KV (flash-decoding).** When R * Hkv * m_tiles programs cannot fill the GPU, the KV range is
  split; each split writes its normalised partial output and log-sum-exp, and ``_combine_kernel``
  merges them. With one split the kernel writes the output directly.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# sizes that change from step to step (token count, tiles, chunk, block-table width, mask words) are not specialised on
# (Triton would compile a variant for each value's divisibility by 16 and for 1)
@triton.jit(do_not_specialize=["n_rows", "m_tiles", "chunk", "bt_stride", "mask_stride", "T", "num_blocks",
                                "max_blocks", "mask_words"])
def _tree_attn_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, kvlen_ptr, cuq_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr,
                      qk_scale, bt_stride, mask_stride, m_tiles, chunk, n_rows,
                      k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, T, num_blocks, max_blocks, mask_words,
                      Hq: tl.constexpr, Hkv: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                      SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid0 = tl.program_id(0)
    r = pid0 // m_tiles
    mt = pid0 % m_tiles
    h = tl.program_id(1)
    s = tl.program_id(2)
    # Index guards, always on (validation off included) and free of host syncs: the query offsets clamped into
    # [0, T], the query count to the mask's 32 * mask_words bits (a mask column j = pos - P stays below q_len,
    # whatever kv_len is), block-table columns into [0, max_blocks), block ids into [0, num_blocks) (in-page
    # offsets are in range by construction). A well-formed batch is unchanged; a malformed one never reads or
    # writes outside q, the caches, the block table, the mask or the output (rows of queries cut off are left
    # unwritten). (Clamping kv_len instead of the columns made ptxas spill the fp32 specialisations.)
    q0 = tl.minimum(tl.maximum(tl.load(cuq_ptr + r), 0), T)
    ql = tl.minimum(tl.maximum(tl.load(cuq_ptr + r + 1), q0), T) - q0
    if HAS_MASK:
        ql = tl.minimum(ql, 32 * mask_words)
    L = tl.load(kvlen_ptr + r)
    P = L - ql  # committed prefix
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // G  # local query
    head = h * G + rows % G
    row_ok = qi < ql
    if mt * BLOCK_M < ql * G:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q_off = ((q0 + qi).to(tl.int64) * Hq + head) * D
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo = s * chunk
        hi = tl.minimum(lo + chunk, tl.minimum(L, max_blocks * BS))  # (a kv_len past the table: bounded work)
        bt_row = bt_ptr + r.to(tl.int64) * bt_stride
        n = tl.arange(0, BLOCK_N)
        # in-page offsets (int32: a page's elements fit) of this KV head's rows of a tile
        k_in = (n % BS) * k_ss + h * k_sh
        v_in = (n % BS) * v_ss + h * v_sh
        for start in range(lo, hi, BLOCK_N):
            pos = start + n
            pos_ok = pos < hi
            if BLOCK_N <= BS:
                # tiles start at multiples of BLOCK_N (the chunks do): a tile lies in one page, whose block id is
                # one scalar load; 64-bit arithmetic only for the page's base
                blk = tl.load(bt_row + tl.minimum(start // BS, max_blocks - 1))
                blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1).to(tl.int64)
                k_rows = k_ptr + (blk * k_sb + (start % BS) * k_ss) + k_in
                v_rows = v_ptr + (blk * v_sb + (start % BS) * v_ss) + v_in
            else:  # pages smaller than a tile (block size < 16): one block id per position
                blk_v = tl.load(bt_row + tl.minimum(pos // BS, max_blocks - 1), mask=pos_ok, other=0)
                blk_v = tl.minimum(tl.maximum(blk_v, 0), num_blocks - 1).to(tl.int64)
                k_rows = k_ptr + (blk_v * k_sb + k_in)
                v_rows = v_ptr + (blk_v * v_sb + v_in)
            k = tl.load(k_rows[:, None] + d[None, :], mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = sc * qk_scale
            ok = pos_ok[None, :] & row_ok[:, None]
            if start + BLOCK_N > P:  # the tile reaches the query tokens: tree bits apply there
                j = pos - P
                if HAS_MASK:
                    jc = tl.maximum(j, 0)  # prefix columns (j < 0) see everything; a clamped index keeps the shift
                    word = tl.load(mask_ptr + (q0 + qi).to(tl.int64)[:, None] * mask_stride + (jc // 32)[None, :],
                                   mask=row_ok[:, None] & (j >= 0)[None, :] & pos_ok[None, :], other=0)
                    see = ((word >> (jc % 32)[None, :]) & 1) != 0  # shift in [0, 32): never negative (UB in LLVM)
                else:
                    see = j[None, :] <= qi[:, None]
                ok = ok & ((j < 0)[None, :] | see)
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_rows[:, None] + d[None, :], mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        o_off = ((q0 + qi).to(tl.int64) * Hq + head) * D
        if SPLIT:
            tok = (q0 + qi).to(tl.int64) * Hq + head  # [T * Hq] index
            tl.store(part_ptr + (s * n_rows + tok)[:, None] * D + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(lse_ptr + s * n_rows + tok, lse, mask=row_ok)
        else:
            tl.store(out_ptr + o_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["n_rows", "S"])
def _combine_kernel(part_ptr, lse_ptr, out_ptr, n_rows, S, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """out[row] = sum_s 2^(lse_s - max) * part_s / sum_s 2^(lse_s - max), per (token, head) row."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + sp * n_rows + row, mask=sp < S, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)
    part = tl.load(part_ptr + (sp * n_rows + row)[:, None] * D + d[None, :], mask=(sp < S)[:, None] & (d < D)[None, :],
                   other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def _interpreting() -> bool:
    """Under TRITON_INTERPRET=1, tl.dot on bf16 operands gives garbage (numpy has no bf16), so the
    interpreter path computes bf16 tiles in fp32; compiled kernels keep bf16 tensor-core dots."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_facts(index: int) -> tuple:
    """(SM count, compute capability) of CUDA device ``index``, read once: every launch asks for them."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, (props.major, props.minor)


def _index(device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _sm_count(device) -> int:
    if device.type == "cuda":
        return _cuda_facts(_index(device))[0]
    return 4


def _capability(device) -> tuple:
    """The NVIDIA GPU's compute capability; (0, 0) elsewhere (ROCm, the interpreter: no register cap applies)."""
    if device.type == "cuda" and torch.version.hip is None:
        return _cuda_facts(_index(device))[1]
    return (0, 0)


def _tiles(dtype, D: int, BS: int, max_q_len: int, G: int, capability: tuple = (0, 0)):
    """(BLOCK_M, BLOCK_N, num_warps) per dtype and head dim, chosen from bench/compile_check.py's ptxas reports: no
    spill on sm_90 or sm_80. fp32 scores use IEEE FMA dots, not tensor cores, so q, the accumulator and the K/V
    tiles all live in registers: fp32 with D=128 needs BLOCK_M=16 (sm_80 spilled 216-440 B at 32 rows on 4 or 8
    warps). BLOCK_N <= BS keeps each tile of positions inside one page (BS >= 16); 16 is tl.dot's smallest tile.
    maxnreg: a register cap for ptxas, or None. fp32 with D=128 on sm_80: ptxas' own target (96 registers) spilled
    24 B in the tree variant; capped at 128 none spills. On sm_90 the same cap makes ptxas use all 128 and spill
    72-116 B, while without it ~110 registers suffice: the cap is for sm_80 only (the compile check's targets are
    sm_80 and sm_90; other GPUs get ptxas' own choice)."""
    fp32 = dtype == torch.float32
    rows_max = (32 if D <= 64 else 16) if fp32 else 64
    BLOCK_M = max(16, min(rows_max, triton.next_power_of_2(max_q_len * G)))
    BLOCK_N = (32 if fp32 else 64) if D <= 64 else (16 if fp32 else 32)
    BLOCK_N = max(16, min(BLOCK_N, BS))
    num_warps = 8 if D > 64 and not fp32 and BLOCK_M >= 64 else 4
    maxnreg = 128 if fp32 and D > 64 and capability == (8, 0) else None
    return BLOCK_M, BLOCK_N, num_warps, maxnreg


def tree_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale, num_splits=None,
                   max_kv_len=None, max_q_len=None):
    """``num_splits`` / ``max_kv_len`` / ``max_q_len`` default from the inputs (a host sync for the lengths); pass
    them to stay sync-free (CUDA graphs). The K/V caches are read through their strides (a cache laid out
    [num_blocks, block_size, Hkv, D] with any block/slot/head strides, e.g. K and V views of one fused cache);
    only a head dim that is not unit-stride is copied."""
    q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    T, Hq, D = q.shape
    nb, BS, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    R = cu_q_lens.shape[0] - 1
    out = torch.empty_like(q)
    if R == 0 or T == 0:
        return out
    if max_q_len is None:
        max_q_len = int(cu_q_lens.diff().max())
    if max_kv_len is None:
        max_kv_len = int(kv_lens.max())
    max_kv_len = max(max_kv_len, 1)  # (an upper bound may be raised; 0 would make the split width 0)
    max_q_len = max(max_q_len, 1)
    BLOCK_M, BLOCK_N, num_warps, maxnreg = _tiles(q.dtype, D, BS, max_q_len, G, _capability(q.device))
    m_tiles = triton.cdiv(max_q_len * G, BLOCK_M)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if num_splits is None:  # enough programs for ~2 waves; each split at least 256 positions
        programs = R * Hkv * m_tiles
        num_splits = max(1, min(triton.cdiv(2 * _sm_count(q.device), programs), triton.cdiv(max_kv_len, 256)))
    chunk = triton.cdiv(triton.cdiv(max_kv_len, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_kv_len, chunk)
    split = num_splits > 1
    mask = tree_mask.contiguous() if tree_mask is not None else cu_q_lens
    part = torch.empty((num_splits, T * Hq, D), dtype=torch.float32, device=q.device) if split else out
    lse = torch.empty((num_splits, T * Hq), dtype=torch.float32, device=q.device) if split else out
    bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    grid = (R * m_tiles, Hkv, num_splits)
    _tree_attn_kernel[grid](q, k_cache, v_cache, bt, kv_lens, cu_q_lens, mask, out, part, lse,
                            scale * LOG2E, bt.stride(0), mask.stride(0) if tree_mask is not None else 0, m_tiles, chunk,
                            T * Hq, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
                            v_cache.stride(1), v_cache.stride(2), T, nb, bt.shape[1],
                            tree_mask.shape[1] if tree_mask is not None else 1,
                            Hq=Hq, Hkv=Hkv, G=G, D=D, BLOCK_D=BLOCK_D, BS=BS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                            HAS_MASK=tree_mask is not None, SPLIT=split, IEEE=q.dtype == torch.float32,
                            UPCAST=_interpreting() and q.dtype == torch.bfloat16, num_warps=num_warps,
                            **({"maxnreg": maxnreg} if maxnreg else {}))
    if split:
        _combine_kernel[(T * Hq,)](part, lse, out, T * Hq, num_splits, D=D, BLOCK_D=BLOCK_D,
                                   BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out
