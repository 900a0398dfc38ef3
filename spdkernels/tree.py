"""Token-tree utilities (docs/contract.md section 3): masks, positions, KV compaction, layout conversions and
tree builders.

Our layout: a ragged batch of draft trees as ``parents: int32 [N]`` (local parent index, -1 = root,
topological order) and ``cu_num_draft: int32 [R + 1]``; the query tokens of request ``r`` are
``[root, node_0, ..., node_{k_r - 1}]`` (``q_len = k_r + 1``), so ``cu_q_lens = cu_num_draft + arange``.

Device ops (``build_tree_mask``, ``tree_positions``, ``compact_kv``) are vectorised torch code with no
host sync when their size arguments are given; the conversions to other stacks' layouts are host-side
helpers (they run once per batch shape, or on CPU metadata).
"""

from __future__ import annotations

import heapq
from typing import List, Optional, Sequence, Tuple

import torch

from . import _config
from . import _validate as V

# ---- masks and positions -------------------------------------------------------------------------------


def _chain_parents(cu_num_draft: torch.Tensor, N: Optional[int] = None) -> torch.Tensor:
    N = int(cu_num_draft[-1]) if N is None else N
    starts = torch.repeat_interleave(cu_num_draft[:-1], cu_num_draft.diff(), output_size=N)
    return (torch.arange(N, device=cu_num_draft.device) - starts - 1).to(torch.int32)


def _query_layout(parents, cu_num_draft, N: Optional[int] = None):
    """For the N + R query tokens: owning request, local query index, and the query index of the parent
    (-1 for roots). Query index = local node index + 1; the root is query 0. ``N`` (the number of draft nodes)
    is read from ``parents`` or given; otherwise from ``cu_num_draft`` (a host sync)."""
    dev = cu_num_draft.device
    R = cu_num_draft.shape[0] - 1
    k = cu_num_draft.diff()
    if parents is not None:
        N = parents.shape[0]
    elif N is None:
        N = int(cu_num_draft[-1])
    T = N + R
    cu_q = cu_num_draft + torch.arange(R + 1, device=dev, dtype=torch.int32)
    req = torch.repeat_interleave(torch.arange(R, device=dev), k + 1, output_size=T)
    local = torch.arange(T, device=dev) - cu_q[req]
    is_root = local == 0
    par = parents if parents is not None else _chain_parents(cu_num_draft, N)
    node = (cu_num_draft[req] + local - 1).clamp(min=0)  # global node index (garbage for roots)
    if par.numel() == 0:  # no draft nodes at all: every query is a root
        return req, local, torch.full_like(local, -1), cu_q
    par_q = torch.where(is_root, torch.full_like(local, -1), par.long()[node] + 1)  # parent's local query idx
    return req, local, par_q, cu_q


def _check_layout(parents, cu_num_draft, max_q_len, num_draft_tokens) -> None:
    """Dtypes and shapes always; with validation on also the values (a host sync): ``cu_num_draft`` from 0,
    non-decreasing, ending at N; parents earlier nodes of their request; ``max_q_len`` covering every request's
    root and drafts (a smaller one drops the root from the last rows' masks, and their depths)."""
    V.check_tensor("cu_num_draft", cu_num_draft, 1, (torch.int32,))
    if cu_num_draft.shape[0] < 1:
        V.fail("cu_num_draft", "expected R + 1 >= 1 entries, got none")
    if parents is not None:
        V.check_tensor("parents", parents, 1, (torch.int32,), cu_num_draft.device, "cu_num_draft")
        if num_draft_tokens is not None and parents.shape[0] != num_draft_tokens:
            V.fail("num_draft_tokens", f"expected len(parents) = {parents.shape[0]}, got {num_draft_tokens}")
    if max_q_len is not None and (not V.is_int(max_q_len) or max_q_len < 1):
        V.fail("max_q_len", f"expected an int >= 1, got {max_q_len!r}")
    if not _config.validation_enabled():
        return
    cu = cu_num_draft.long()
    N = int(cu[-1])
    if num_draft_tokens is not None and num_draft_tokens != N:
        V.fail("num_draft_tokens", f"expected cu_num_draft[-1] = {N}, got {num_draft_tokens}")
    if parents is None:
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            V.fail("cu_num_draft", f"expected cumulative draft counts from 0, non-decreasing, got {cu.tolist()[:16]}")
    else:
        if parents.shape[0] != N:
            V.fail("parents", f"expected N = cu_num_draft[-1] = {N} entries, got {parents.shape[0]}")
        # cu from 0 and non-decreasing, every parent -1 or an earlier node of its request: the ops' own check
        V.check_draft_batch_indices(torch.empty(0, 1), parents, cu_num_draft, parents, tokens=False)
    longest = int(cu.diff().max()) + 1 if cu.shape[0] > 1 else 1
    if max_q_len is not None and max_q_len < longest:
        V.fail("max_q_len", f"expected at least the longest request's root + drafts = {longest}, got {max_q_len}")


def build_tree_mask(parents: Optional[torch.Tensor], cu_num_draft: torch.Tensor,
                    max_q_len: Optional[int] = None, num_draft_tokens: Optional[int] = None) -> torch.Tensor:
    """int32 ``[N + R, ceil(max_q_len / 32)]``: bit j of query i set iff local query j is query i itself
    or one of its ancestors (the root included). ``max_q_len=None`` costs a host sync, and so does a chain
    (``parents=None``) without ``num_draft_tokens`` (N); with both and validation off, no host sync (CUDA-graph
    safe). With validation on, as the ops, the values are checked (``ValueError`` naming the argument)."""
    _check_layout(parents, cu_num_draft, max_q_len, num_draft_tokens)
    req, local, par_q, cu_q = _query_layout(parents, cu_num_draft, num_draft_tokens)
    if max_q_len is None:
        max_q_len = int(cu_num_draft.diff().max()) + 1 if cu_num_draft.shape[0] > 1 else 1
    W = max(1, (max_q_len + 31) // 32)
    T = local.shape[0]
    bits = torch.zeros(T, W * 32, dtype=torch.bool, device=cu_num_draft.device)
    rows = torch.arange(T, device=cu_num_draft.device)
    cur = local.clone()  # walk up the ancestors: at most max_q_len steps
    alive = torch.ones(T, dtype=torch.bool, device=cu_num_draft.device)
    for _ in range(max_q_len):
        bits[rows, cur] |= alive  # (no boolean-mask indexing: no host sync)
        parent_local = par_q[cu_q[req] + cur]  # par_q indexed by global query index
        alive = alive & (parent_local >= 0)
        cur = torch.where(alive, parent_local, cur)
    return pack_bool_mask(bits)


def pack_bool_mask(dense: torch.Tensor) -> torch.Tensor:
    """bool ``[T, W*32]`` (W = columns / 32, padded up) -> int32 ``[T, W]`` bit words (bit j of word j // 32)."""
    T, C = dense.shape
    W = max(1, (C + 31) // 32)
    padded = torch.zeros(T, W * 32, dtype=torch.int64, device=dense.device)
    padded[:, :C] = dense.long()
    weights = (1 << torch.arange(32, device=dense.device, dtype=torch.int64))
    words = (padded.view(T, W, 32) * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bool_mask(tree_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """int32 bit words ``[T, W]`` -> bool ``[T, q_len]``."""
    j = torch.arange(q_len, device=tree_mask.device)
    return ((tree_mask.long()[:, j // 32] >> (j % 32)) & 1).bool()


def dense_to_tree_mask(dense: torch.Tensor) -> torch.Tensor:
    """Dense boolean masks -> our bit words. ``dense``: bool ``[T, max_q_len]`` (row i: which local
    queries of its own request query i may see)."""
    V.check_tensor("dense", dense, 2, (torch.bool,))
    return pack_bool_mask(dense)


def tree_mask_to_dense(tree_mask: torch.Tensor, max_q_len: int) -> torch.Tensor:
    """Our bit words -> bool ``[T, max_q_len]``."""
    return unpack_bool_mask(tree_mask, max_q_len)


def tree_positions(parents: Optional[torch.Tensor], cu_num_draft: torch.Tensor, start_pos: torch.Tensor,
                   max_q_len: Optional[int] = None, num_draft_tokens: Optional[int] = None) -> torch.Tensor:
    """int64 ``[N + R]``: RoPE position of every query token: ``start_pos[r] + depth`` (root depth 0). Host
    syncs as :func:`build_tree_mask`."""
    V.check_tensor("start_pos", start_pos, 1, (torch.int32, torch.int64))
    if start_pos.shape[0] != cu_num_draft.shape[0] - 1:
        V.fail("start_pos", f"expected shape [R] = [{cu_num_draft.shape[0] - 1}], got {tuple(start_pos.shape)}")
    mask = build_tree_mask(parents, cu_num_draft, max_q_len, num_draft_tokens)
    depth = unpack_bool_mask(mask, mask.shape[1] * 32).sum(-1) - 1  # ancestors incl. root, minus itself
    req, _, _, _ = _query_layout(parents, cu_num_draft, num_draft_tokens)
    return start_pos.long()[req] + depth


# ---- KV compaction --------------------------------------------------------------------------------------


def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
               cu_q_lens: torch.Tensor, accepted_path: torch.Tensor, sync_free: bool = False) -> torch.Tensor:
    """After verification, move the K/V of each request's accepted nodes to the slots right after its
    root, in place, and return the new ``kv_lens`` (prefix + root + accepted nodes).

    Before: request r's query tokens ``[root, node_0, ...]`` sit at positions ``P .. P + q_len - 1``
    (``P = kv_lens[r] - q_len``). ``accepted_path[r, d]`` (local node index, -1 padded, as the
    verification ops return it) moves from ``P + 1 + path[d]`` to ``P + 1 + d``. Sources are gathered
    before anything is written, so overlapping moves are safe. ``sync_free``: as :func:`compact_kv_moves`."""
    V.check_tensor("block_table", block_table, 2, (torch.int32, torch.int64))
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.check_tensor(name, cache, None, None, block_table.device, "block_table")
    src, dst, new_lens = compact_kv_moves(block_table, kv_lens, cu_q_lens, accepted_path, k_cache.shape[1],
                                          sync_free)
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, *cache.shape[2:])
        flat[dst] = flat[src]  # advanced indexing: the right side is a copy
    return new_lens


def compact_kv_moves(block_table: torch.Tensor, kv_lens: torch.Tensor, cu_q_lens: torch.Tensor,
                     accepted_path: torch.Tensor, block_size: int, sync_free: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The moves behind :func:`compact_kv` as flat slot indices (``block * block_size + offset``):
    ``(src, dst, new_kv_lens)``. A cache with several layers (``[layers, num_blocks * block_size, ...]``)
    applies the same moves to every layer with one indexed copy. One host sync (selecting the valid moves);
    ``sync_free=True`` returns all ``R * max_depth`` moves instead, each unused one a copy of the request's root
    slot onto itself (a slot no real move reads or writes), so no host sync is needed (CUDA-graph safe, with
    validation off: with it on, kv_lens past the block table and accepted nodes past a request's drafts are
    named, a host sync)."""
    V.check_tensor("block_table", block_table, 2, (torch.int32, torch.int64))
    dev = block_table.device
    V.check_tensor("kv_lens", kv_lens, 1, (torch.int32, torch.int64), dev, "block_table")
    V.check_tensor("cu_q_lens", cu_q_lens, 1, (torch.int32, torch.int64), dev, "block_table")
    V.check_tensor("accepted_path", accepted_path, 2, (torch.int32, torch.int64), dev, "block_table")
    R, D = accepted_path.shape
    for name, t, n in (("block_table", block_table, R), ("kv_lens", kv_lens, R), ("cu_q_lens", cu_q_lens, R + 1)):
        if t.shape[0] != n:
            V.fail(name, f"expected {n} rows (accepted_path has {R} requests), got shape {tuple(t.shape)}")
    q_len = cu_q_lens.diff().long()
    P = kv_lens.long() - q_len
    path = accepted_path.long()
    valid = path >= 0
    if _config.validation_enabled():  # (a host sync: positions a slot lookup would otherwise clamp silently)
        cap = block_table.shape[1] * block_size
        if bool((kv_lens.long() > cap).any()) or bool((P < 0).any()):
            V.fail("kv_lens", f"expected query lengths <= kv_lens <= the block table's {cap} slots, got "
                   f"{kv_lens.tolist()[:16]} with query lengths {q_len.tolist()[:16]}")
        if bool((valid & (path >= q_len[:, None] - 1)).any()):
            V.fail("accepted_path", "expected local node indices below each request's draft count (q_len - 1)")
    depth = torch.arange(D, device=dev).expand(R, D)
    src = P[:, None] + 1 + path.clamp(min=0)
    dst = P[:, None] + 1 + depth
    src = torch.where(valid, src, dst)

    def slot(pos):
        blk = block_table.long().gather(1, (pos // block_size).clamp(max=block_table.shape[1] - 1))
        return blk * block_size + pos % block_size

    new_lens = (P + 1 + valid.sum(1)).to(kv_lens.dtype)
    if sync_free:
        root = P[:, None].expand(R, D)
        return (slot(torch.where(valid, src, root)).reshape(-1), slot(torch.where(valid, dst, root)).reshape(-1),
                new_lens)
    return slot(src)[valid], slot(dst)[valid], new_lens


# ---- other stacks' layouts ------------------------------------------------------------------------------


def from_vllm_cu_num_draft_tokens(cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """vLLM's cumulative draft counts (no leading zero) -> our ``cu_num_draft`` (leading zero, int32)."""
    z = torch.zeros(1, dtype=torch.int32, device=cu_num_draft_tokens.device)
    return torch.cat([z, cu_num_draft_tokens.to(torch.int32)])


def to_vllm_cu_num_draft_tokens(cu_num_draft: torch.Tensor) -> torch.Tensor:
    return cu_num_draft[1:].clone()


def from_vllm_tree(paths: Sequence[Tuple[int, ...]]) -> List[int]:
    """vLLM's speculative token tree (each node a tuple of child ranks from the root, e.g.
    ``[(0,), (1,), (0, 0)]``) -> local ``parents`` in vLLM's order (by depth, then path)."""
    order = sorted(paths, key=lambda p: (len(p), p))
    if list(order) != list(paths):
        V.fail("paths", "expected the nodes sorted by depth, then path (vLLM's order)")
    index = {tuple(p): i for i, p in enumerate(paths)}
    if len(index) != len(paths):
        V.fail("paths", "expected each node once (a path is listed twice)")
    parents = []
    for p in paths:
        if len(p) == 0:
            V.fail("paths", "the root is implicit: paths must be non-empty")
        if len(p) > 1 and tuple(p[:-1]) not in index:
            V.fail("paths", f"node {p} has no parent {p[:-1]} in the tree")
        parents.append(-1 if len(p) == 1 else index[tuple(p[:-1])])
    return parents


def to_vllm_tree(parents: Sequence[int]) -> List[Tuple[int, ...]]:
    """Local ``parents`` of one tree -> vLLM's paths of child ranks (rank = order among siblings). vLLM numbers
    a tree's nodes by depth, then path, so a tree numbered otherwise (``[-1, 0, -1]``: node 1 is deeper than
    node 2) is refused: its node i would not be vLLM's node i."""
    paths: List[Tuple[int, ...]] = []
    rank: dict = {}
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            V.fail("parents", f"expected -1 or an earlier node for node {i}, got {p}")
        r = rank.get(p, 0)
        rank[p] = r + 1
        paths.append((r,) if p < 0 else paths[p] + (r,))
    want = sorted(range(len(paths)), key=lambda i: (len(paths[i]), paths[i]))
    if want != list(range(len(paths))):
        i = next(j for j, w in enumerate(want) if w != j)
        V.fail("parents", f"vLLM numbers a tree's nodes by depth, then path: its node {i} would be this tree's node "
               f"{want[i]} (renumber the tree level by level first)")
    return paths


def to_sglang(parents: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Local ``parents`` of one tree -> SGLang's ``retrive_next_token`` / ``retrive_next_sibling`` over
    the q_len = k + 1 query tokens (index 0 = root): first child and next sibling, -1 for none."""
    n = len(parents) + 1
    nxt, sib = [-1] * n, [-1] * n
    last_child = {}
    for i, p in enumerate(parents):
        q, pq = i + 1, p + 1
        if pq in last_child:
            sib[last_child[pq]] = q
        else:
            nxt[pq] = q
        last_child[pq] = q
    return nxt, sib


def from_sglang(next_token: Sequence[int], next_sibling: Sequence[int]) -> List[int]:
    """SGLang's linked lists (index 0 = root) -> local ``parents`` (requires topological numbering)."""
    n = len(next_token)
    if len(next_sibling) != n:
        V.fail("next_sibling", f"expected {n} entries (one per query, as next_token), got {len(next_sibling)}")
    parents = [None] * (n - 1)
    for pq in range(n):
        c = int(next_token[pq])
        prev = 0
        while c != -1:
            if not 0 < c < n or parents[c - 1] is not None:
                V.fail("next_token", f"malformed linked lists at query {c}")
            if c <= pq:
                V.fail("next_token", f"child {c} before its parent {pq}: expected topological numbering")
            if c <= prev:  # sgl-kernel tries children in list order; our parents list orders siblings by index
                V.fail("next_sibling", f"siblings must be listed in increasing query order: {c} follows {prev}")
            parents[c - 1] = pq - 1
            prev, c = c, int(next_sibling[c])
    if any(p is None for p in parents):
        V.fail("next_token", "some nodes are not reachable from the root")
    return parents


# ---- tree builders ---------------------------------------------------------------------------------------


def chain(k: int) -> List[int]:
    """parents of a chain of k drafts."""
    return list(range(-1, k - 1))


def topk_tree(branching: Sequence[int]) -> List[int]:
    """Full top-k expansion: every node of level l has ``branching[l]`` children (level 0 = the root's
    children). Nodes numbered level by level (topological)."""
    parents: List[int] = []
    level = [-1]
    for b in branching:
        nxt = []
        for p in level:
            for _ in range(b):
                parents.append(p)
                nxt.append(len(parents) - 1)
        level = nxt
    return parents


def budget_tree(parents: Sequence[int], scores: Sequence[float], budget: int) -> Tuple[List[int], List[int]]:
    """EAGLE-2 style: keep the ``budget`` nodes of a candidate tree with the highest scores (a node's
    score is its path's cumulative log-probability, so it never exceeds its parent's), always closed
    under ancestors. Returns (kept candidate indices in topological order, their new parents)."""
    if budget < 0:
        V.fail("budget", f"must be >= 0, got {budget}")
    # best first among the nodes whose parent is kept (a frontier): a child that outscores its parent, which
    # cumulative log-probabilities never do, is taken as soon as its parent is, never skipped for good
    kept: set = set()
    children: dict = {}
    for i, p in enumerate(parents):
        children.setdefault(p if p >= 0 else -1, []).append(i)
    frontier = [(-scores[i], i) for i in children.get(-1, [])]
    heapq.heapify(frontier)
    while frontier and len(kept) < budget:
        _, i = heapq.heappop(frontier)
        kept.add(i)
        for c in children.get(i, []):
            heapq.heappush(frontier, (-scores[c], c))
    ids = sorted(kept)
    new = {old: j for j, old in enumerate(ids)}
    return ids, [-1 if parents[i] < 0 else new[parents[i]] for i in ids]
