"""Host side of the NKI backend: the layouts the kernels read, and the launch on a Neuron device, on the
official simulator (``nki.simulate``) or on the project's NumPy emulation.

The kernels take requests on the partitions and a request's slots on the free axis, so that a tree walk never
needs data-dependent control flow. The layouts below are index tables built with torch ops on the inputs'
device (no logits are copied). Sizing them reads two small integers on the host (a sync): the largest draft
count of the batch (``verify_greedy``/``rejection_sample``) and the longest query of the batch
(``tree_attention``), which are compile-time shapes of the kernels.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from spdkernels.nki_kernels import emulation_enabled, simulator_enabled

from spdkernels import _validate as V
from spdkernels._registry import BackendLimitError, BackendSearchError

FP32_EXACT_INT = 2**24  # ids are carried in fp32 inside the kernels: exact below this


# ---- running a kernel ----------------------------------------------------------------------------------

def _mode(device: torch.device) -> str:
    if device.type == "cpu":
        if emulation_enabled():
            return "emulate"
        if simulator_enabled():
            return "simulate"
        raise RuntimeError("nki kernels on cpu tensors need SPDKERNELS_NKI_EMULATE=1 or SPDKERNELS_NKI_SIMULATE=1")
    return "device"


def kernel(stem: str, name: str, mode: str):
    if mode == "emulate":
        from spdkernels.testing.nki_emulator import load_kernel_module

        return getattr(load_kernel_module(stem), name)
    return getattr(importlib.import_module(f"spdkernels.nki_kernels.{stem}"), name)


def _to_emulator(x):
    from spdkernels.testing.nki_emulator import HBM

    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        return HBM(x.float().numpy(), "bfloat16")
    if x.dtype in (torch.float32, torch.float16, torch.int32, torch.uint8):
        return HBM(x.numpy())
    raise TypeError(f"no NKI dtype for {x.dtype}")


def run(stem: str, name: str, args: Sequence, device: torch.device, out_dtypes: Sequence[torch.dtype]):
    """Run kernel ``name`` of ``nki_kernels/<stem>.py`` on ``args`` (tensors and compile-time constants);
    returns its outputs as torch tensors on ``device`` with ``out_dtypes``."""
    mode = _mode(device)
    fn = kernel(stem, name, mode)
    if mode == "emulate":
        from spdkernels.testing.nki_emulator import emulate

        outs = emulate(fn)(*[_to_emulator(a) for a in args])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return tuple(torch.from_numpy(np.ascontiguousarray(o)).to(dt) for o, dt in zip(outs, out_dtypes))
    if mode == "simulate":
        import nki

        outs = nki.simulate(fn)(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
    else:
        outs = fn(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
    outs = outs if isinstance(outs, tuple) else (outs,)
    return tuple(torch.as_tensor(o).to(device=device, dtype=dt) for o, dt in zip(outs, out_dtypes))


# ---- the per-request layout of draft batches ------------------------------------------------------------

@dataclass
class RequestLayout:
    K: int  # slots for nodes per request (max k_r, at least 1)
    row_idx: torch.Tensor  # int32 [R, K + 1]: logit row of slot s (s = 0 root, 1 + i node i); OOB = rows
    tokens: torch.Tensor  # int32 [R, K]: draft token of local node i (-1 padding)
    parents: torch.Tensor  # int32 [R, K]: local parent (-1 root; -2 padding: matches nothing)
    node_idx: torch.Tensor  # int32 [R, K]: global node index (OOB = N padding)
    node_r: torch.Tensor  # int64 [N]: request of each node
    local: torch.Tensor  # int64 [N]: local index of each node


def request_layout(cu_num_draft: torch.Tensor, draft_token_ids: torch.Tensor, parents: Optional[torch.Tensor],
                   rows: int, bonus_rows: bool = False) -> RequestLayout:
    """``bonus_rows``: the layout with given bonus tokens (``[N, V]`` rows, request r's at ``cu[r] ..``): slot
    ``k_r`` (after the last draft) has no row and is out of range like the slots past it."""
    dev = cu_num_draft.device
    cu = cu_num_draft.to(torch.int64)
    R = cu.shape[0] - 1
    N = draft_token_ids.shape[0]
    ks = cu[1:] - cu[:-1]
    K = max(1, int(ks.max()) if R else 1)  # host sync: a compile-time shape of the kernels
    node_r = torch.repeat_interleave(torch.arange(R, device=dev), ks, output_size=N)
    local = torch.arange(N, device=dev) - cu[node_r]
    tok = torch.full((R, K), -1, dtype=torch.int32, device=dev)
    t = draft_token_ids
    if t.dtype == torch.int64:  # ids past the int32 range are outside every vocabulary: -1, not a wrapped small id
        t = torch.where((t >= -1) & (t < 2 ** 31), t, torch.full_like(t, -1))
    tok[node_r, local] = t.to(torch.int32)
    par = torch.full((R, K), -2, dtype=torch.int32, device=dev)
    par[node_r, local] = (parents.to(torch.int32) if parents is not None else (local - 1).to(torch.int32))
    nidx = torch.full((R, K), N, dtype=torch.int32, device=dev)
    nidx[node_r, local] = torch.arange(N, device=dev, dtype=torch.int32)
    slots = torch.arange(K + 1, device=dev)
    if bonus_rows:
        row = cu[:-1, None] + slots[None, :]
        row_idx = torch.where(slots[None, :] < ks[:, None], row, rows).to(torch.int32)
    else:
        row = cu[:-1, None] + torch.arange(R, device=dev)[:, None] + slots[None, :]
        row_idx = torch.where(slots[None, :] <= ks[:, None], row, rows).to(torch.int32)
    return RequestLayout(K, row_idx, tok, par, nidx, node_r, local)


def _check_indices(target_logits, draft_token_ids, cu_num_draft, parents, tokens: bool = True) -> None:
    """The index checks of the torch backend, made whatever the validation setting: the
    launchers read the batch on the host anyway (its sizes are the kernels' compile-time shapes), so they cost no
    extra synchronisation, and a malformed batch is a ValueError naming the argument, never a layout built from
    out-of-range offsets."""
    # always: with validation on the public wrapper has checked the values, but a direct torch.ops call or a
    # compiled graph makes only the static checks (and another thread may switch validation meanwhile)
    V.check_draft_batch_indices(target_logits, draft_token_ids, cu_num_draft, parents, tokens=tokens)


def _limit(arg: str, msg: str) -> None:
    """A well-formed input past the kernels' limits: BackendLimitError (a ValueError naming ``arg``), on which the
    automatic backend choice runs the torch backend instead; a forced ``nki`` raises it."""
    raise BackendLimitError(f"{arg}: {msg}")


def _check_nodes(K: int) -> None:
    """``K``: the layout's largest draft count (read on the host once, by request_layout)."""
    if K > MAX_DRAFT_NODES:
        _limit("cu_num_draft", f"a request has {K} draft nodes; the NKI kernels take at most {MAX_DRAFT_NODES} "
               "(their slot tables live in SBUF)")


def _check_vocab(target_logits: torch.Tensor) -> None:
    if target_logits.shape[1] >= FP32_EXACT_INT:
        _limit("target_logits", f"the NKI kernels carry token ids in fp32: V must be < 2**24, got "
               f"{target_logits.shape[1]}")


# ---- verify_greedy --------------------------------------------------------------------------------------

def verify_greedy(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    from spdkernels.ops._common import verify_outputs

    R = cu_num_draft.shape[0] - 1
    dev = target_logits.device
    if R == 0:
        return verify_outputs(0, max_depth, dev)
    _check_indices(target_logits, draft_token_ids, cu_num_draft, parents, tokens=False)
    _check_vocab(target_logits)
    lay = request_layout(cu_num_draft, draft_token_ids, parents, target_logits.shape[0])
    _check_nodes(lay.K)
    out, num, path = run("verify_greedy", "verify_greedy_kernel",
                         (target_logits.contiguous(), lay.row_idx, lay.tokens, lay.parents, int(max_depth)),
                         dev, (torch.int32, torch.int32, torch.int32))
    return out, num[:, 0].contiguous(), path[:, :max_depth].contiguous()


# ---- tree_attention -------------------------------------------------------------------------------------

MAX_HEAD_DIM = 128  # D is the contraction (partitions) of Q K^T and the partitions of Q^T, K^T
MAX_BLOCK_SIZE = 128  # a block's V rows land on the partitions of one P.V chunk
MAX_QUERY_TOKENS = 128  # the tail (a request's own query tokens) is one tile on the partitions
MAX_HEAD_GROUP = 128  # the query heads of one KV head, for one query token, lie on the partitions of a tile
MAX_DRAFT_NODES = 2048  # draft nodes per request: the slot tables [128, K + 1] live in SBUF (past ~2500 they overflow)


def tree_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, scale):
    T, Hq, D = q.shape
    nb, bs, Hkv, _ = k_cache.shape
    dev = q.device
    R = cu_q_lens.shape[0] - 1
    # the torch backend's layout checks, always (a host read the launcher makes anyway; see _check_indices), then
    # the kernel's limits (a malformed layout is named first: past a limit the automatic choice runs torch)
    from spdkernels.ops.tree_attention import _check_layout

    _check_layout(q, k_cache, block_table, kv_lens, cu_q_lens, tree_mask)
    if T == 0 or R == 0:
        return torch.empty_like(q)
    if Hq // Hkv > MAX_HEAD_GROUP:
        _limit("q", f"{Hq // Hkv} query heads per KV head exceed the NKI kernel's {MAX_HEAD_GROUP} (one query token's "
               "heads share the partitions of a tile)")
    if D > MAX_HEAD_DIM:
        _limit("q", f"head dim {D} exceeds the {MAX_HEAD_DIM} partitions the NKI kernel tiles it on")
    if bs > MAX_BLOCK_SIZE:
        _limit("k_cache", f"block size {bs} exceeds the NKI kernel's {MAX_BLOCK_SIZE} (one P.V chunk)")
    cu = cu_q_lens.to(torch.int64)
    q_len = cu[1:] - cu[:-1]
    Qmax = int(q_len.max())  # host sync: the tail tile's compile-time width
    if Qmax > MAX_QUERY_TOKENS:
        _limit("cu_q_lens", f"a request has {Qmax} query tokens; the NKI kernel takes at most {MAX_QUERY_TOKENS}")
    Qmax = max(Qmax, 1)
    lens = kv_lens.to(torch.int64)
    prefix = lens - q_len
    j = torch.arange(Qmax, device=dev)
    inq = j[None, :] < q_len[:, None]
    q_rows = torch.where(inq, cu[:-1, None] + j[None, :], T).to(torch.int32)
    MB = block_table.shape[1]
    pos = prefix[:, None] + j[None, :]
    col = (pos // bs).clamp(0, MB - 1)
    blk = block_table.to(torch.int64).gather(1, col)
    kv_rows = torch.where(inq, blk * bs + pos % bs, nb * bs).to(torch.int32)
    cols = torch.arange(MB, device=dev)
    bt_rows = torch.where(cols[None, :] * bs < prefix[:, None], block_table.to(torch.int64) * bs,
                          nb * bs).to(torch.int32)
    # the tree mask as 0/1 per (query token, local query token j) of its request
    req = torch.repeat_interleave(torch.arange(R, device=dev), q_len, output_size=T)
    local = torch.arange(T, device=dev) - cu[req]
    if tree_mask is None:
        bits = j[None, :] <= local[:, None]
    else:
        words = tree_mask.to(torch.int64)[:, (j // 32).clamp(max=tree_mask.shape[1] - 1)]
        bits = ((words >> (j % 32)[None, :]) & 1).bool() & (j[None, :] < tree_mask.shape[1] * 32)
    bits = bits & (j[None, :] < q_len[req][:, None])
    (out,) = run("tree_attention", "tree_attention_kernel",
                 (q.reshape(T, Hq * D), k_cache.reshape(nb * bs, Hkv * D), v_cache.reshape(nb * bs, Hkv * D),
                  bt_rows, kv_rows[:, :, None], q_rows[:, :, None], prefix.to(torch.float32)[:, None],
                  bits.to(torch.float32), Hq, Hkv, bs, float(scale)), dev, (q.dtype,))
    return out.view(T, Hq, D)


# ---- rejection_sample -----------------------------------------------------------------------------------

MAX_FLAT_INDEX = 2**31 - 1  # the kernel addresses scratch and draft rows by int32 element indices

_M0, _M1, _W0, _W1, _MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox_uniforms(seed: torch.Tensor, offset: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """The contract's coins (``spdkernels.reference.philox_uniform``) for int64 tensors, with torch ops on their
    device: Philox4x32-10 keyed by the seed, counter (index, stream, offset lo, offset hi), ((x >> 9) + 0.5) / 2^23.
    The 32 x 32 -> 64-bit products wrap in int64; their words are recovered with shifts and masks."""
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    c0, c1 = index.to(torch.int64) & _MASK, torch.full_like(seed, stream)
    c2, c3 = offset & _MASK, (offset >> 32) & _MASK
    for i in range(10):
        if i:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = c0 * _M0, c2 * _M1
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK) ^ c1 ^ k0, p1 & _MASK, ((p0 >> 32) & _MASK) ^ c3 ^ k1, p0 & _MASK
    return (((c0 >> 9).to(torch.float64) + 0.5) / 8388608.0).to(torch.float32)


def rejection_sample(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                     uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False):
    from spdkernels.ops._common import verify_outputs

    R = cu_num_draft.shape[0] - 1
    dev = target_logits.device
    if R == 0:
        return verify_outputs(0, max_depth, dev)
    rows, Vv = target_logits.shape
    _check_indices(target_logits, draft_token_ids, cu_num_draft, parents)
    _check_vocab(target_logits)
    N = draft_token_ids.shape[0]
    if max(R, N) * Vv > MAX_FLAT_INDEX:
        _limit("target_logits", f"the NKI rejection_sample kernel addresses rows by int32 element indices: "
               f"max(R, N) * V must be < 2**31, got {max(R, N)} * {Vv}")
    has_bonus = bonus_token_ids is not None  # (chains only: the op refuses parents with bonus tokens)
    if rows == 0:  # no draft at all (bonus layout): a stand-in row, absent from the layout (so never read)
        target_logits = torch.zeros(1, Vv, dtype=target_logits.dtype, device=dev)
        rows = 1
    lay = request_layout(cu_num_draft, draft_token_ids, parents, rows, bonus_rows=has_bonus)
    _check_nodes(lay.K)
    K = lay.K
    if uniforms is None:
        off = offset if offset is not None else torch.zeros_like(seed)
        u_nodes = philox_uniforms(seed[lay.node_r], off[lay.node_r], lay.local, 0)
        u_final = philox_uniforms(seed, off, torch.zeros_like(seed), 1)
        uniforms = torch.cat([u_nodes, u_final])
    coins = torch.full((R, K + 1), 0.5, dtype=torch.float32, device=dev)
    coins[lay.node_r, lay.local] = uniforms[:N].float()
    coins[:, K] = uniforms[N:].float()
    temp = (temperature if temperature is not None else torch.ones(R, device=dev)).float()
    tk = (top_k if top_k is not None else torch.zeros(R, device=dev)).float()
    tp = (top_p if top_p is not None else torch.ones(R, device=dev)).float()
    sampled = temp > 0
    any_k = bool(((tk > 0) & (tk < Vv) & sampled).any())  # host sync: skip the searches nobody needs
    any_p = bool(((tp < 1) & sampled).any())
    dp = draft_probs.contiguous() if draft_probs is not None else torch.zeros(1, Vv, device=dev)
    # bonus tokens carried in fp32 like every id in the kernel (exact below 2**24 > V; validation keeps them in [0, V))
    bonus = (bonus_token_ids.to(torch.float32)[:, None] if has_bonus else torch.zeros(R, 1, device=dev))
    out, num, path, conv = run(
        "rejection_sample", "rejection_sample_kernel",
        (target_logits.contiguous(), lay.row_idx, lay.tokens, lay.parents, lay.node_idx, coins, temp[:, None],
         tk[:, None], tp[:, None], dp, dp.view(-1, 1), int(max_depth), int(draft_probs is not None), int(any_k),
         int(any_p), int(parents is None), bonus.contiguous(), int(has_bonus), int(bool(target_is_probs))),
        dev, (torch.int32, torch.int32, torch.int32, torch.int32))
    if not bool(conv.all()):
        # a search fed NaN or inf never closes: name the input (validation off lets it through) before blaming the
        # search; this costs nothing unless a search failed
        rows = (~conv[:, 0].bool()).nonzero()[:, 0]
        for r in rows.tolist():
            if not bool(torch.isfinite(temp[r])):
                raise ValueError(f"temperature: request {r} has a non-finite temperature ({float(temp[r])})")
            for i in sorted({int(x) for x in lay.row_idx[r].tolist() if 0 <= int(x) < target_logits.shape[0]}):
                row = target_logits[i]
                if torch.isnan(row).any() or torch.isposinf(row).any() or not torch.isfinite(row).any():
                    raise ValueError(f"target_logits: row {i} (request {r}) holds NaN or +inf or no finite value; "
                                     "the top-k / top-p search cannot order it (validation is off)")
        raise BackendSearchError("rejection_sample (nki): the top-k/top-p threshold search did not close within "
                                 "its passes for a row (logits too close together); no result is returned")
    return out, num[:, 0].contiguous(), path[:, :max_depth].contiguous()
