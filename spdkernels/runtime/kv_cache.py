"""A paged KV cache for every layer of a model, with per-request block allocation, commit of the accepted
path (the moves of :func:`spdkernels.tree.compact_kv`, applied to all layers at once) and roll back."""
from __future__ import annotations

from typing import Dict, Hashable, List, Sequence

import torch

from spdkernels.tree import compact_kv_moves


class CacheFullError(RuntimeError):
    """No free block left for a request's next tokens."""


class PagedKVCache:
    """K and V of ``num_layers`` consecutive model layers, ``first_layer ..`` (a pipeline stage holds only its
    own range), in pages of ``block_size`` positions: ``k[l]`` and ``v[l]`` (model layer
    ``first_layer + l``) are ``[num_blocks, block_size, Hkv, D]``, the layout ``tree_attention`` reads.
    Lengths are per request and per cache, so the stages of a pipeline, each with its own cache, keep
    staggered lengths and are truncated one by one. ``length(rid)`` positions of
    request ``rid`` are committed; positions past it (draft tree nodes being verified) are scratch until
    :meth:`commit` keeps the accepted ones. ``scrub=True`` fills every position past the committed length
    with NaN after each commit, roll back or release, so a read of a stale tree entry poisons the output (tests)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device="cpu", scrub: bool = False, first_layer: int = 0):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size: expected a power of two, got {block_size}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.scrub = scrub
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._blocks: Dict[Hashable, List[int]] = {}
        self._len: Dict[Hashable, int] = {}

    # -- allocation ----------------------------------------------------------------------------------
    def add(self, rid: Hashable) -> None:
        if rid in self._blocks:
            raise ValueError(f"rid: request {rid!r} already has cache blocks")
        self._blocks[rid] = []
        self._len[rid] = 0

    def release(self, rid: Hashable) -> None:
        """Give back all of request ``rid``'s blocks (NaN-filled first when ``scrub`` is on, so a later reader of
        a reused block that skipped writing it sees NaN, not another request's K/V)."""
        self.set_length(rid, 0)
        del self._blocks[rid], self._len[rid]

    def length(self, rid: Hashable) -> int:
        return self._len[rid]

    def blocks(self, rid: Hashable) -> List[int]:
        return list(self._blocks[rid])

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def grow(self, extra: int) -> None:
        """Add ``extra`` free blocks (NaN-filled with ``scrub``). The page tensors are reallocated and copied, so
        call it between forwards, keep no view of the old pages (``layer_k`` / ``layer_v`` hand out fresh views
        each time) and grow by more than the shortfall when it may recur."""
        if extra < 1:
            raise ValueError(f"extra: expected at least one block, got {extra}")
        for name in ("k", "v"):
            old = getattr(self, name)
            fill = float("nan") if self.scrub else 0.0
            new = old.new_full((old.shape[0], old.shape[1] + extra, *old.shape[2:]), fill)
            new[:, :old.shape[1]] = old
            setattr(self, name, new)
        self._free = list(range(self.num_blocks + extra - 1, self.num_blocks - 1, -1)) + self._free
        self.num_blocks += extra

    def reserve(self, rid: Hashable, total: int) -> None:
        """Make sure request ``rid`` has blocks for positions ``0 .. total - 1``."""
        blocks = self._blocks[rid]
        need = -(-total // self.block_size) - len(blocks)
        if need > len(self._free):
            raise CacheFullError(f"KV cache full: request {rid!r} needs {need} more blocks, {len(self._free)} free")
        for _ in range(max(0, need)):
            blocks.append(self._free.pop())

    def set_length(self, rid: Hashable, n: int) -> None:
        """Commit ``n`` positions (their K/V must be written) and give back the blocks past them: a roll back
        when ``n`` is shorter than what was written."""
        blocks = self._blocks[rid]
        if not 0 <= n <= len(blocks) * self.block_size:
            raise ValueError(f"n: {n} outside the {len(blocks) * self.block_size} reserved positions of {rid!r}")
        self._len[rid] = n
        keep = -(-n // self.block_size)
        freed = blocks[keep:]
        self._free.extend(reversed(freed))
        del blocks[keep:]
        if self.scrub and freed:
            self.k[:, freed] = float("nan")
            self.v[:, freed] = float("nan")
        if self.scrub and n % self.block_size:
            last = blocks[-1]
            self.k[:, last, n % self.block_size:] = float("nan")
            self.v[:, last, n % self.block_size:] = float("nan")

    # -- tensors for a forward pass --------------------------------------------------------------------
    def block_table(self, rids: Sequence[Hashable], device=None) -> torch.Tensor:
        width = max([len(self._blocks[r]) for r in rids] + [1])
        rows = [self._blocks[r] + [0] * (width - len(self._blocks[r])) for r in rids]
        return torch.tensor(rows, dtype=torch.int32, device=device or self.k.device)

    def slots(self, rid: Hashable, positions: Sequence[int]) -> List[int]:
        blocks, bs = self._blocks[rid], self.block_size
        return [blocks[p // bs] * bs + p % bs for p in positions]

    def _index(self, layer: int) -> int:
        i = layer - self.first_layer
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer: this cache holds model layers {self.first_layer}.."
                             f"{self.first_layer + self.num_layers - 1}, got {layer}")
        return i

    def layer_k(self, layer: int) -> torch.Tensor:
        """K pages of model layer ``layer``: ``[num_blocks, block_size, Hkv, D]``."""
        return self.k[self._index(layer)]

    def layer_v(self, layer: int) -> torch.Tensor:
        return self.v[self._index(layer)]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v: [T, Hkv, D]`` at flat slots ``slot_mapping: int64 [T]`` of model layer ``layer``."""
        i = self._index(layer)
        self.k[i].view(-1, *self.k.shape[3:]).index_copy_(0, slot_mapping, k)
        self.v[i].view(-1, *self.v.shape[3:]).index_copy_(0, slot_mapping, v)

    # -- verification bookkeeping ----------------------------------------------------------------------
    def commit(self, rids: Sequence[Hashable], block_table: torch.Tensor, kv_lens: torch.Tensor,
               cu_q_lens: torch.Tensor, accepted_path: torch.Tensor) -> List[int]:
        """After a verification forward that wrote ``[root, nodes...]`` of each request at its last
        ``q_len`` positions (``kv_lens`` includes them): keep the root and the accepted nodes, moved next to
        the prefix in every layer, and roll the rest back. Returns the new committed lengths."""
        src, dst, new_lens = compact_kv_moves(block_table, kv_lens, cu_q_lens, accepted_path, self.block_size)
        if src.numel():
            for cache in (self.k, self.v):
                flat = cache.view(cache.shape[0], -1, *cache.shape[3:])
                flat[:, dst] = flat[:, src]
        lens = new_lens.tolist()
        for rid, n in zip(rids, lens):
            self.set_length(rid, n)
        return lens
