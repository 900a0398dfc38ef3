"""Pieces shared by the verification ops."""

from __future__ import annotations

from typing import Tuple

import torch


def verify_outputs(R: int, max_depth: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``(output_token_ids [R, max_depth+1], num_emitted [R], accepted_path [R, max_depth])``,
    int32: every backend writes all entries, padding included."""
    return (torch.empty((R, max_depth + 1), dtype=torch.int32, device=device),
            torch.empty((R,), dtype=torch.int32, device=device),
            torch.empty((R, max_depth), dtype=torch.int32, device=device))
