"""Random draft batches for tests and benchmarks (not used by the ops themselves).

A batch has R requests with k_r draft nodes each, as chains or random token trees, target logits with
the layout of docs/contract.md section 2, and draft tokens that agree with the target's greedy choice with a
given probability, so that walks accept a realistic number of nodes instead of stopping at the root.

``spdkernels.testing.nki_emulator`` (imported only when asked for) is the NumPy emulation of the NKI language
subset the kernels in ``spdkernels.nki_kernels`` use; see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class DraftBatch:
    target_logits: torch.Tensor  # [N + R, V]
    draft_token_ids: torch.Tensor  # [N]
    cu_num_draft: torch.Tensor  # int32 [R + 1]
    parents: Optional[torch.Tensor]  # int32 [N] or None (chains)
    max_depth: int

    @property
    def R(self) -> int:
        return self.cu_num_draft.shape[0] - 1

    @property
    def N(self) -> int:
        return self.draft_token_ids.shape[0]

    def args(self):
        return (self.target_logits, self.draft_token_ids, self.cu_num_draft, self.parents, self.max_depth)


def random_parents(k: int, gen: torch.Generator, max_children: Optional[int] = None) -> List[int]:
    """Random topologically ordered tree of k nodes (local parent indices, -1 = root)."""
    par: List[int] = []
    nchild = {}
    for i in range(k):
        while True:
            p = int(torch.randint(-1, i, (1,), generator=gen)) if i > 0 else -1
            if max_children is None or nchild.get(p, 0) < max_children:
                break
        nchild[p] = nchild.get(p, 0) + 1
        par.append(p)
    return par


def depths(parents: Sequence[int]) -> List[int]:
    d: List[int] = []
    for p in parents:
        d.append(1 if p < 0 else d[p] + 1)
    return d


def random_draft_batch(
    ks: Sequence[int],
    V: int,
    *,
    tree: bool = False,
    dtype: torch.dtype = torch.float32,
    token_dtype: torch.dtype = torch.int64,
    match_prob: float = 0.7,
    tie_prob: float = 0.0,
    gen: Optional[torch.Generator] = None,
    device="cpu",
) -> DraftBatch:
    """A batch with ``len(ks)`` requests; request r has ``ks[r]`` draft nodes.

    Each draft token equals the argmax of its parent's row with probability ``match_prob`` (else a
    random token); with ``tie_prob`` a row gets its maximum copied to a few random positions, so argmax
    ties occur.
    """
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    R, N = len(ks), sum(ks)
    logits = torch.randn(N + R, V, generator=gen) * 3
    if tie_prob > 0 and V > 1:
        for row in range(N + R):
            if float(torch.rand((), generator=gen)) < tie_prob:
                cols = torch.randint(0, V, (3,), generator=gen)
                logits[row, cols] = logits[row].max()
    logits = logits.to(dtype)
    argmax = logits.float().argmax(-1)  # exact for bf16/fp16 too: the cast to fp32 is monotone
    cu = [0]
    for k in ks:
        cu.append(cu[-1] + k)
    parents: List[int] = []
    tokens: List[int] = []
    max_depth = 0
    for r, k in enumerate(ks):
        par = random_parents(k, gen) if tree else list(range(-1, k - 1))
        parents.extend(par)
        if k:
            max_depth = max(max_depth, max(depths(par)))
        row0 = cu[r] + r
        for p in par:
            if float(torch.rand((), generator=gen)) < match_prob:
                tokens.append(int(argmax[row0 + 1 + p]))
            else:
                tokens.append(int(torch.randint(0, V, (1,), generator=gen)))
    return DraftBatch(
        target_logits=logits.to(device),
        draft_token_ids=torch.tensor(tokens, dtype=token_dtype, device=device),
        cu_num_draft=torch.tensor(cu, dtype=torch.int32, device=device),
        parents=torch.tensor(parents, dtype=torch.int32, device=device) if tree else None,
        max_depth=max_depth,
    )
