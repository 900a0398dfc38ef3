"""Pieces shared by the verification ops."""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from spdkernels import _validate as V


def verify_outputs(R: int, max_depth: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``(output_token_ids [R, max_depth+1], num_emitted [R], accepted_path [R, max_depth])``,
    int32: every backend writes all entries, padding included."""
    return (torch.empty((R, max_depth + 1), dtype=torch.int32, device=device),
            torch.empty((R,), dtype=torch.int32, device=device),
            torch.empty((R, max_depth), dtype=torch.int32, device=device))


def call_draft_op(op: Callable, args: tuple, target_logits, draft_token_ids, cu_num_draft, parents, max_depth,
                  bonus_rows: bool = False):
    """``op(*args)`` for an op over a draft batch, where a schema error (a non-tensor argument, a max_depth that
    is not an int) is turned into the static checks' ValueError naming the argument. The checks run only when the
    call fails, so a well-formed call pays for them once, inside the op (in C++ on the CPU fast path)."""
    try:
        return op(*args)
    except RuntimeError:
        V.check_draft_batch_static(target_logits, draft_token_ids, cu_num_draft, parents, max_depth, bonus_rows)
        raise
