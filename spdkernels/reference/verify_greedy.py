"""Reference greedy verification of chains and token trees (docs/contract.md section 3, verify_greedy)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def children_of(parents: Optional[List[int]], k: int, node: int) -> List[int]:
    """Local indices of the children of ``node`` (-1 = root) in index order."""
    if parents is None:  # chain: parents[i] = i - 1
        return [node + 1] if node + 1 < k else []
    return [j for j in range(node + 1, k) if parents[j] == node]


def verify_greedy(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    cu_num_draft: torch.Tensor,
    parents: Optional[torch.Tensor],
    max_depth: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk each request's tree from the root: accept the first child whose token is the argmax of the
    current row; at the first node with no such child, emit that argmax and stop. Accepting stops at
    ``max_depth`` (the emitted token is then the argmax at that depth)."""
    device = target_logits.device
    R = cu_num_draft.shape[0] - 1
    argmax = target_logits.argmax(dim=-1).tolist()  # torch.argmax: ties go to the first (lowest) index
    cu = cu_num_draft.tolist()
    tokens = draft_token_ids.tolist()
    par = parents.tolist() if parents is not None else None

    out = torch.full((R, max_depth + 1), -1, dtype=torch.int32)
    path = torch.full((R, max_depth), -1, dtype=torch.int32)
    num_emitted = torch.zeros(R, dtype=torch.int32)
    for r in range(R):
        start, k = cu[r], cu[r + 1] - cu[r]
        row0 = start + r  # this request's row of the root; node i's row is row0 + 1 + i
        local_par = par[start:start + k] if par is not None else None
        node, depth = -1, 0
        best = argmax[row0]
        while depth < max_depth:
            match = [c for c in children_of(local_par, k, node) if tokens[start + c] == best]
            if not match:
                break
            node = match[0]
            out[r, depth] = best
            path[r, depth] = node
            depth += 1
            best = argmax[row0 + 1 + node]
        out[r, depth] = best
        num_emitted[r] = depth + 1
    return out.to(device), num_emitted.to(device), path.to(device)
