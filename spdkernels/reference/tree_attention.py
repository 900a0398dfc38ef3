"""Reference tree attention over a paged KV cache (docs/contract.md section 3): the oracle of the tests.

For each request: gather its K/V pages into a contiguous [L, Hkv, D] sequence, build the dense boolean
mask (every query sees the committed prefix; among the last ``q_len`` positions it sees the query tokens
whose bits are set, or the causal chain without a mask), repeat K/V over the query heads of each KV
head, and run plain softmax attention in fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def mask_bits_to_dense(tree_mask: Optional[torch.Tensor], q0: int, q_len: int) -> torch.Tensor:
    """bool [q_len, q_len]: may local query i see local query j (rows q0 .. q0 + q_len of tree_mask)."""
    if tree_mask is None:
        return torch.ones(q_len, q_len, dtype=torch.bool).tril()
    j = torch.arange(q_len)
    words = tree_mask[q0:q0 + q_len].cpu().long()[:, j // 32]  # [q_len, q_len]
    return ((words >> (j % 32)) & 1).bool()


def request_spans(cu_q_lens: torch.Tensor, kv_lens: torch.Tensor):
    """(r, first query row, q_len, kv_len) of every request with query tokens (a host sync)."""
    cu, lens = cu_q_lens.tolist(), kv_lens.tolist()
    for r in range(len(cu) - 1):
        if cu[r + 1] > cu[r]:
            yield r, cu[r], cu[r + 1] - cu[r], lens[r]


def allowed_mask(tree_mask: Optional[torch.Tensor], q0: int, q_len: int, L: int) -> torch.Tensor:
    """bool [q_len, L]: the whole prefix, then the tree (or causal) bits over the last q_len positions."""
    allowed = torch.ones(q_len, L, dtype=torch.bool)
    allowed[:, L - q_len:] = mask_bits_to_dense(tree_mask, q0, q_len)
    return allowed


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, L: int) -> torch.Tensor:
    """[L, Hkv, D]: the first L positions of one request's pages."""
    bs = cache.shape[1]
    nb = (L + bs - 1) // bs
    return cache[block_table_row[:nb].long()].reshape(nb * bs, *cache.shape[2:])[:L]


def tree_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask=None, scale=None):
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros_like(q)
    for r, q0, ql, L in request_spans(cu_q_lens, kv_lens):
        k = gather_kv(k_cache, block_table[r], L).float().repeat_interleave(G, dim=1)  # [L, Hq, D]
        v = gather_kv(v_cache, block_table[r], L).float().repeat_interleave(G, dim=1)
        allowed = allowed_mask(tree_mask, q0, ql, L)
        s = torch.einsum("qhd,khd->hqk", q[q0:q0 + ql].float(), k) * scale
        s = s.masked_fill(~allowed.to(s.device), float("-inf"))
        o = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
        out[q0:q0 + ql] = o.to(q.dtype)
    return out
