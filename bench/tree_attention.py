"""Benchmark of tree_attention: paged K/V, random trees, GQA 32 query heads over 8 KV heads, D=128.

Bytes moved: the K and V of every valid position (read once per KV head: the lower bound), the queries
and the output. Baseline: ``sdpa-dense``: ``torch.nn.functional.scaled_dot_product_attention`` with a
dense boolean mask over K/V already gathered into a padded [R, Hkv, L, D] batch (the gather is done before timing, which
favours the baseline), GQA through ``enable_gqa``. (The reference is not timed: at these sizes it takes
seconds per call; the tests hold every backend to it.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import spdkernels
from spdkernels import tree
from spdkernels.reference.tree_attention import gather_kv, mask_bits_to_dense

from .registry import OpBench, register
from .verify_greedy import DT


def case(R, ctx, q_len, dtype="bf16", Hq=32, Hkv=8, D=128, bs=16):
    return {"R": R, "ctx": ctx, "q_len": q_len, "dtype": dtype, "Hq": Hq, "Hkv": Hkv, "D": D, "bs": bs}


SHAPE_SETS = {
    # CPU-sized subset of the grid (about half a minute here: it is part of the main job)
    "default": [case(1, 4096, 8), case(8, 4096, 8), case(8, 512, 32), case(1, 32768, 8), case(8, 4096, 8, "fp32")],
    "cpu-full": [case(1, 4096, 8), case(8, 4096, 8), case(8, 512, 32), case(8, 4096, 64), case(1, 32768, 8),
                 case(8, 4096, 8, "fp32")],
    # the full grid (GPU)
    "gpu": [case(R, ctx, q) for R in (1, 8, 64) for ctx in (512, 4096, 32768) for q in (1, 8, 32, 64)],
    "tiny": [case(2, 100, 4, "fp32", 4, 2, 64), case(1, 300, 9, "bf16", 4, 1, 64)],
    # the runtime's calls on the embedded SmolLM2-135M (9 query / 3 KV heads, D = 64, fp32): one decoding step,
    # a verification of 4 drafts, a longer context, a batch of 8 (per-call overhead is most of these)
    "decode": [case(1, 256, 1, "fp32", 9, 3, 64), case(1, 256, 5, "fp32", 9, 3, 64), case(1, 1024, 1, "fp32", 9, 3, 64),
               case(8, 256, 1, "fp32", 9, 3, 64)],
}


def label(c):
    return f"R{c['R']}-ctx{c['ctx']}-q{c['q_len']}-{c['dtype']}-H{c['Hq']}/{c['Hkv']}-D{c['D']}"


def make_inputs(c, device):
    gen = torch.Generator().manual_seed(0)
    R, ql, bs = c["R"], c["q_len"], c["bs"]
    dt = DT[c["dtype"]]
    L = c["ctx"] + ql
    nbr = (L + bs - 1) // bs
    perm = torch.randperm(R * nbr, generator=gen).to(torch.int32)
    bt = perm.view(R, nbr)
    kc = torch.randn(R * nbr, bs, c["Hkv"], c["D"], generator=gen).to(dt)
    vc = torch.randn(R * nbr, bs, c["Hkv"], c["D"], generator=gen).to(dt)
    q = torch.randn(R * ql, c["Hq"], c["D"], generator=gen).to(dt)
    k = ql - 1
    parents = []
    for _ in range(R):  # a random tree of k nodes per request
        parents += [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(k)]
    cund = torch.arange(R + 1, dtype=torch.int32) * k
    mask = tree.build_tree_mask(torch.tensor(parents, dtype=torch.int32), cund, ql) if k else None
    cu_q = torch.arange(R + 1, dtype=torch.int32) * ql
    kv = torch.full((R,), L, dtype=torch.int32)
    args = [x.to(device) if x is not None else None for x in (q, kc, vc, bt, kv, cu_q, mask)]
    # SDPA baseline inputs, gathered and padded before timing
    Kd = torch.stack([gather_kv(kc, bt[r], L) for r in range(R)]).permute(0, 2, 1, 3).contiguous()
    Vd = torch.stack([gather_kv(vc, bt[r], L) for r in range(R)]).permute(0, 2, 1, 3).contiguous()
    dense = torch.ones(R, 1, ql, L, dtype=torch.bool)
    for r in range(R):
        dense[r, 0, :, L - ql:] = mask_bits_to_dense(mask, r * ql, ql) if mask is not None else \
            torch.ones(ql, ql, dtype=torch.bool).tril()
    sdpa = (q.view(R, ql, c["Hq"], c["D"]).transpose(1, 2).contiguous().to(device), Kd.to(device), Vd.to(device),
            dense.to(device))
    # the size bounds given, as a serving stack gives them: no host sync, so the GPU timer replays a CUDA graph
    # (without them the call reads kv_lens on the host and the capture fails: every row timed with launch overhead)
    return args, sdpa, {"max_q_len": ql, "max_kv_len": L}


def run(inputs):
    return spdkernels.tree_attention(*inputs[0], **inputs[2])


def run_sdpa(inputs):
    q, k, v, m = inputs[1]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)  # [R, Hq, ql, D]
    return o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[3])


def bytes_moved(c):
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    L = c["ctx"] + c["q_len"]
    kv = 2 * c["R"] * L * c["Hkv"] * c["D"] * elt
    qo = 2 * c["R"] * c["q_len"] * c["Hq"] * c["D"] * elt
    return kv + qo


def nki_bytes(c):
    """(bytes, None) the NKI kernel (nki_kernels/tree_attention.py) moves between HBM and SBUF: per (request,
    KV head, chunk of query tokens) the K and V of every prefix position and of the tail once, the chunk's
    queries and tree-mask rows, the outputs; or (0, why) if the case exceeds what the kernel tiles."""
    from spdkernels.nki_kernels._launch import MAX_BLOCK_SIZE, MAX_HEAD_DIM, MAX_HEAD_GROUP, MAX_QUERY_TOKENS

    if (c["D"] > MAX_HEAD_DIM or c["bs"] > MAX_BLOCK_SIZE or c["q_len"] > MAX_QUERY_TOKENS
            or c["Hq"] // c["Hkv"] > MAX_HEAD_GROUP):
        return 0, "head dim, block size, query count or query heads per KV head over the kernel's 128"
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    G = c["Hq"] // c["Hkv"]
    chunks = -(-c["q_len"] // (128 // G))  # K/V are read once per chunk of query tokens
    L = c["ctx"] + c["q_len"]
    kv = 2 * c["R"] * c["Hkv"] * chunks * L * c["D"] * elt
    qo = 2 * c["R"] * c["q_len"] * c["Hq"] * c["D"] * elt
    tables = c["R"] * (c["Hkv"] * chunks * (-(-L // c["bs"]) * 4 + c["q_len"] * (8 + 4 * c["q_len"] * G)))
    return kv + qo + tables, None


TOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


def check(out, ref):
    a, b = out.float().cpu(), ref.float().cpu()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    rel = float((a - b).norm() / b.norm().clamp(min=1e-30))
    tol = TOL["fp32"] if ref.dtype == torch.float32 else TOL["bf16"]
    return "" if rel <= tol else f"relative RMS error {rel:.2e} > {tol:.0e}"


def triton_bytes(c, sm_count=132):
    """Bytes the Triton kernel (triton_kernels/tree_attention.py) moves: K and V of every position once per KV head
    and per m-tile (a tile packs BLOCK_M rows of (query, head); longer trees or fp32's 16-32-row tiles read K/V again),
    the queries and outputs, the block table, and with split-KV the fp32 partial outputs and log-sum-exps written
    and read back by the combine kernel. ``sm_count`` sets the split choice (132: H100/H200)."""
    import triton
    from spdkernels.triton_kernels.tree_attention import _tiles

    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    R, ql, Hq, Hkv, D, bs = c["R"], c["q_len"], c["Hq"], c["Hkv"], c["D"], c["bs"]
    G = Hq // Hkv
    L = c["ctx"] + ql
    BLOCK_M, BLOCK_N, _, _ = _tiles(DT[c["dtype"]], D, bs, ql, G)
    m_tiles = triton.cdiv(ql * G, BLOCK_M)
    kv = 2 * R * L * Hkv * D * elt * m_tiles
    qo = 2 * R * ql * Hq * D * elt
    splits = max(1, min(triton.cdiv(2 * sm_count, R * Hkv * m_tiles), triton.cdiv(L, 256)))
    chunk = triton.cdiv(triton.cdiv(L, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(L, chunk)
    part = 2 * splits * R * ql * Hq * (D + 1) * 4 if splits > 1 else 0
    tables = R * Hkv * m_tiles * (-(-L // bs)) * 4
    return kv + qo + part + tables


def backend_bytes(c, ref, backend):
    if backend != "triton":
        return None
    import spdkernels

    if "triton" not in spdkernels.available_backends(op="tree_attention"):
        return None
    return triton_bytes(c)


register(OpBench("tree_attention", SHAPE_SETS, make_inputs, run, bytes_moved, check, label,
                 baselines={"sdpa-dense": run_sdpa}, bytes_for_backend=backend_bytes))
