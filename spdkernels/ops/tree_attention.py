"""tree_attention: attention of the verification forward pass over a paged KV cache.

Backends: ``triton`` (one flash-attention kernel, split-KV for small batches), ``cpp`` (the same algorithm on
the CPU, csrc/tree_attention.cpp), ``torch`` (per request:
gather the pages, pack the query heads of each KV head into one matrix, one
``scaled_dot_product_attention`` call with a boolean mask; syncs with the host for the lengths). The
readable oracle is ``spdkernels.reference.tree_attention``.

On CPU tensors the op's kernel is C++ (csrc/ops.cpp, once the extension is loaded): the static checks and the
kernel with no Python on the way, tens of microseconds less a call at decoding size than the Python kernel it
replaced (bench/results/README.md; a decoding step of a 30-layer model calls it 30 times). It sends fp64 to the torch
backend through the private op ``_tree_attention_torch`` defined here. On every other device, and on CPU without
the extension, the kernel is the Python one below.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from spdkernels import _registry
from spdkernels import _validate as V
from spdkernels._library import LIB, define_op, inference_only
from spdkernels.ops._common import call_op, op_kernel
from spdkernels.reference.tree_attention import allowed_mask, gather_kv, request_spans

OP = "tree_attention"


# float64 runs on the torch backend only: the runtime's exactness tests use it (DESIGN section 3 lists the
# kernel dtypes: fp16, bf16, fp32).
DTYPES = V.FLOAT_DTYPES + (torch.float64,)


def _check_static(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask) -> None:
    V.check_tensor("q", q, 3, DTYPES)
    dev = q.device
    V.check_tensor("k_cache", k_cache, 4, (q.dtype,), dev, "q")
    V.check_tensor("v_cache", v_cache, 4, (q.dtype,), dev, "q")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        V.fail("v_cache", f"expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    T, Hq, D = q.shape
    nb, bs, Hkv, Dk = k_cache.shape
    if Dk != D:
        V.fail("k_cache", f"head dim {Dk} differs from q's {D}")
    if D < 1:
        V.fail("q", "head dim must be >= 1, got 0")
    if Hkv < 1 or Hq % Hkv:
        V.fail("k_cache", f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if bs < 1 or bs & (bs - 1):
        V.fail("k_cache", f"block size must be a power of two, got {bs}")
    V.check_tensor("cu_q_lens", cu_q_lens, 1, (torch.int32,), dev, "q")
    if cu_q_lens.shape[0] < 1:
        V.fail("cu_q_lens", "expected shape [R + 1], got an empty tensor")
    R = cu_q_lens.shape[0] - 1
    V.check_tensor("block_table", block_table, 2, (torch.int32,), dev, "q")
    if block_table.shape[0] != R:
        V.fail("block_table", f"expected shape [R, max_blocks] with R = {R}, got {tuple(block_table.shape)}")
    V.check_tensor("kv_lens", kv_lens, 1, (torch.int32,), dev, "q")
    if kv_lens.shape[0] != R:
        V.fail("kv_lens", f"expected shape [R] = [{R}], got {tuple(kv_lens.shape)}")
    if tree_mask is not None:
        V.check_tensor("tree_mask", tree_mask, 2, (torch.int32,), dev, "q")
        if tree_mask.shape[0] != T:
            V.fail("tree_mask", f"expected shape [T, W] with T = {T}, got {tuple(tree_mask.shape)}")
        if tree_mask.shape[1] < 1:
            V.fail("tree_mask", f"expected at least one 32-bit word per query, got shape {tuple(tree_mask.shape)}")


def _check_values(q, k_cache, block_table, kv_lens, cu_q_lens, tree_mask) -> None:
    cu, q_len = _check_layout(q, k_cache, block_table, kv_lens, cu_q_lens, tree_mask)
    if tree_mask is not None and q.shape[0]:
        req = torch.repeat_interleave(torch.arange(len(cu) - 1), q_len)
        local = torch.arange(q.shape[0]) - torch.tensor(cu[:-1])[req]
        j = torch.arange(tree_mask.shape[1] * 32)
        bits = ((tree_mask.cpu().long()[:, j // 32] >> (j % 32)) & 1).bool()
        if not bool(bits[torch.arange(q.shape[0]), local].all()):
            V.fail("tree_mask", "every query must see itself (its own bit set)")
        if bool((bits & (j[None, :] > local[:, None])).any()):
            V.fail("tree_mask", "a query sees a later query of its request or a position past its request "
                   "(ancestors come first: nodes are in topological order)")


def _check_layout(q, k_cache, block_table, kv_lens, cu_q_lens, tree_mask):
    """The checks that keep every index in bounds (run with validation off too by the torch backend; the
    cpp kernel makes them in C++). Returns ``(cu as a list, q_len)``."""
    cu = cu_q_lens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        V.fail("cu_q_lens", f"must start at 0 and be non-decreasing, got {cu[:8]}")
    if cu[-1] != q.shape[0]:
        V.fail("cu_q_lens", f"last entry must equal the number of query tokens {q.shape[0]}, got {cu[-1]}")
    q_len = torch.tensor(cu).diff()
    lens = kv_lens.cpu()
    if bool((lens < q_len).any()):
        r = int((lens < q_len).nonzero()[0, 0])
        V.fail("kv_lens", f"request {r} has kv_len {int(lens[r])} < its {int(q_len[r])} query tokens (kv_lens "
               "include the query tokens)")
    nb, bs = k_cache.shape[:2]
    need = (lens.long() + bs - 1) // bs  # (int64: an int32 kv_len near 2**31 wrapped negative and skipped the check)
    if bool((need > block_table.shape[1]).any()):
        V.fail("block_table", f"has {block_table.shape[1]} columns, fewer than the {int(need.max())} blocks a "
               "request needs")
    cols = torch.arange(block_table.shape[1])
    used = block_table.cpu()[cols[None, :] < need[:, None]]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= nb):
        V.fail("block_table", f"points outside the cache (blocks in [0, {nb})): got values in "
               f"[{int(used.min())}, {int(used.max())}]")
    if tree_mask is not None and q.shape[0]:
        max_q = int(q_len.max())
        W = (max_q + 31) // 32
        if tree_mask.shape[1] < W:
            V.fail("tree_mask", f"needs ceil(max_q_len / 32) = {W} words per query, got {tree_mask.shape[1]}")
    return cu, q_len


def _check_sizes(max_q_len, max_kv_len, num_splits) -> None:
    for name, v in (("max_q_len", max_q_len), ("max_kv_len", max_kv_len), ("num_splits", num_splits)):
        if v is not None and (not isinstance(v, (int, torch.SymInt)) or isinstance(v, bool)):
            V.fail(name, f"expected an int or None, got {type(v).__name__}")
        if isinstance(v, int) and v < (1 if name == "num_splits" else 0):
            V.fail(name, f"expected >= {1 if name == 'num_splits' else 0}, got {v}")


def _check_size_values(kv_lens, cu_q_lens, max_q_len, max_kv_len) -> None:
    """With validation on: the size arguments bound the batch they describe (a host sync, as every value check)."""
    if max_q_len is not None and cu_q_lens.shape[0] > 1 and int(cu_q_lens.diff().max()) > max_q_len:
        V.fail("max_q_len", f"{max_q_len} is smaller than the longest request's {int(cu_q_lens.diff().max())} "
               "query tokens")
    if max_kv_len is not None and kv_lens.numel() and int(kv_lens.max()) > max_kv_len:
        V.fail("max_kv_len", f"{max_kv_len} is smaller than the largest kv_len {int(kv_lens.max())}")


def _check_all_static(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale, max_q_len=None,
                      max_kv_len=None, num_splits=None) -> None:
    _check_static(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask)
    _check_sizes(max_q_len, max_kv_len, num_splits)


def _check_all_values(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale, max_q_len=None,
                      max_kv_len=None, num_splits=None) -> None:
    _check_values(q, k_cache, block_table, kv_lens, cu_q_lens, tree_mask)
    _check_size_values(kv_lens, cu_q_lens, max_q_len, max_kv_len)


def _run(name, impl, q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale, max_q_len=None,
         max_kv_len=None, num_splits=None):
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.dtype == torch.float64:
        return _torch_impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, float(scale))
    if name == "triton":  # the one backend whose launch depends on the sizes (grid, tiles, KV splits)
        return impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, float(scale), max_q_len,
                    max_kv_len, num_splits)
    return impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, float(scale))


def _fake(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale, max_q_len=None, max_kv_len=None,
          num_splits=None):
    _check_static(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask)
    _check_sizes(max_q_len, max_kv_len, num_splits)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # dense, as every backend returns it


define_op("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor kv_lens, "
          "Tensor cu_q_lens, Tensor? tree_mask, float? scale, SymInt? max_q_len=None, SymInt? max_kv_len=None, "
          "int? num_splits=None) -> Tensor", op_kernel(OP, _check_all_static, _run), _fake)


# ---- backends --------------------------------------------------------------------------------------

@_registry.register(OP, "torch")
def _torch_impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale):
    """Per request: the query heads sharing a KV head are stacked into one [G * q_len, D] matrix, so K/V
    are neither repeated nor copied per query head; one SDPA call per request with a boolean mask that is
    all-true over the prefix and the tree bits over the last q_len columns."""
    _check_layout(q, k_cache, block_table, kv_lens, cu_q_lens, tree_mask)  # always: it indexes with them
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # dense (every row is written: q_len > 0 each)
    for r, q0, ql, L in request_spans(cu_q_lens, kv_lens):
        k = gather_kv(k_cache, block_table[r], L).permute(1, 0, 2)  # [Hkv, L, D]
        v = gather_kv(v_cache, block_table[r], L).permute(1, 0, 2)
        qr = q[q0:q0 + ql].view(ql, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * ql, D)
        mask = allowed_mask(tree_mask, q0, ql, L).to(q.device)
        o = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask.repeat(G, 1), scale=scale)
        out[q0:q0 + ql] = o.view(Hkv, G, ql, D).permute(2, 0, 1, 3).reshape(ql, Hq, D)
    return out


def _torch_backend_op(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale):
    """The private op ``_tree_attention_torch``: the static checks and the torch backend. The C++ CPU kernel of the
    public op calls it for fp64 tensors, which only this backend runs."""
    _check_static(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask)
    return _torch_impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale)


LIB.define("_tree_attention_torch(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor kv_lens, "
           "Tensor cu_q_lens, Tensor? tree_mask, float scale) -> Tensor")
LIB.impl("_tree_attention_torch", _torch_backend_op, "CompositeExplicitAutograd")
LIB.impl("_tree_attention_torch", inference_only(torch.ops.spdkernels._tree_attention_torch.default), "Autograd",
         with_keyset=True)


def _call(overload, q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale, max_q_len, max_kv_len,
          num_splits):
    """The public function's argument checks and policy around ``overload``: the op (bench/forward_steps.py passes
    an op of the same schema with the former Python CPU kernel, to time what the C++ kernel saves)."""
    V.check_tensor("q", q, 3, DTYPES)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        V.fail("scale", f"expected a finite positive float, got {scale!r}")
    _check_sizes(max_q_len, max_kv_len, num_splits)
    return call_op(OP, overload, (q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask,
                                  None if scale is None else float(scale), max_q_len, max_kv_len, num_splits),
                   _check_all_static, _check_all_values, _run)


@_registry.register(OP, "cpp")
def _cpp_impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale):
    """csrc/tree_attention.cpp: flash-attention style over the pages in place, one work item per (request,
    KV head) with its query heads packed, the KV range split across threads when items are fewer than
    threads. No host sync. The caches are read through their block / slot / head strides (e.g. K and V views of
    one fused cache, no copy); only a head dim that is not unit-stride is copied."""
    return torch.ops.spdkernels._cpu_tree_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask,
                                                    scale)


@_registry.register(OP, "triton")
def _triton_impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale, max_q_len=None,
                 max_kv_len=None, num_splits=None):
    """Sync-free (CUDA-graph safe) when ``max_q_len`` and ``max_kv_len`` are given."""
    from spdkernels.triton_kernels import tree_attention as k
    from spdkernels.triton_kernels._common import launch_device

    with launch_device(q):  # (the kernel reads kv_lens / cu_q_lens one element after another: dense copies)
        return k.tree_attention(q, k_cache, v_cache, block_table, kv_lens.contiguous(), cu_q_lens.contiguous(),
                                tree_mask, scale, num_splits=num_splits, max_kv_len=max_kv_len, max_q_len=max_q_len)


@_registry.register(OP, "nki")
def _nki_impl(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale):
    from spdkernels.nki_kernels import _launch

    return _launch.tree_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale)


# ---- public wrapper --------------------------------------------------------------------------------

def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    tree_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    *,
    max_q_len: Optional[int] = None,
    max_kv_len: Optional[int] = None,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """Attention of the query tokens of each request (its root plus its draft nodes) to the committed
    prefix and to their own ancestors in the token tree, over a paged KV cache.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16/fp32, ragged by ``cu_q_lens`` (float64 too, always on the torch
            backend: for exactness tests).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, same dtype as ``q``; block_size a power
            of two; ``Hq % Hkv == 0`` (GQA/MQA).
        block_table: int32 ``[R, max_blocks]``: request r's position p lives in block
            ``block_table[r, p // block_size]``, slot ``p % block_size``.
        kv_lens: int32 ``[R]``: valid KV positions of each request, **including** its query tokens, whose
            K/V are already written at the last ``q_len`` positions.
        cu_q_lens: int32 ``[R + 1]``: query offsets (``cu_q_lens[0] == 0``, non-decreasing).
        tree_mask: int32 ``[T, ceil(max_q_len / 32)]``: bit j of query i set = query i sees local query
            j of its request (see :func:`spdkernels.tree.build_tree_mask`); ``None`` = causal chain.
            Every query sees every position before its request's query tokens.
        scale: softmax scale, default ``1 / sqrt(D)``.
        out: optional ``[T, Hq, D]`` tensor to write the result into (a copy: the op itself is
            functional).
        max_q_len, max_kv_len: upper bounds of the query tokens of one request and of ``kv_lens`` (checked with
            validation on). Without them the Triton backend reads them from the device (a host sync); with
            them and validation off, the op launches without any host sync, so it can be captured in a CUDA
            graph (the bounds then fix the launch: capture with the largest sizes the graph will replay).
        num_splits: the Triton backend's split of the KV range (default: from the GPU's SM count and
            ``max_kv_len``).

    Returns:
        ``[T, Hq, D]`` like ``q``.

    Raises:
        ValueError: naming the argument: shapes, dtypes, devices; with validation on also
            ``kv_lens`` shorter than the query count, block tables pointing outside the cache or too
            narrow, malformed masks (a query not seeing itself, or seeing a later query).
    """
    res = _call(torch.ops.spdkernels.tree_attention.default, q, k_cache, v_cache, block_table, kv_lens, cu_q_lens,
                tree_mask, scale, max_q_len, max_kv_len, num_splits)
    if out is not None:
        V.check_tensor("out", out, 3, (q.dtype,), q.device, "q")
        if out.shape != q.shape:
            V.fail("out", f"expected shape {tuple(q.shape)}, got {tuple(out.shape)}")
        out.copy_(res)
        return out
    return res
