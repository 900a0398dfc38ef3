"""Argument checks shared by the ops. Every failure is a ValueError naming the argument.

``check_*_static`` functions read only metadata (shape, dtype, device): always on, fake-tensor safe.
``check_*_values`` functions read tensor values (a host sync): run when validation is enabled.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOKEN_DTYPES = (torch.int32, torch.int64)


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool (``True`` is an int to Python, never a count, a size or an id)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def fail(arg: str, msg: str) -> None:
    raise ValueError(f"{arg}: {msg}")


def _fmt(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(arg: str, t, ndim: Optional[int] = None, dtypes=None, device=None, like: Optional[str] = None) -> None:
    """ValueError naming ``arg`` unless ``t`` is a tensor of that rank, one of those dtypes, on ``device`` (that of the
    argument named ``like``, when given)."""
    if not isinstance(t, torch.Tensor):
        fail(arg, f"expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        fail(arg, f"expected {ndim} dimension(s), got {_fmt(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(arg, f"expected dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        ref = f" (like {like})" if like else ""
        fail(arg, f"expected a tensor on device {device}{ref}, got device {t.device}")


def check_draft_batch_static(target_logits, draft_token_ids, cu_num_draft, parents, max_depth,
                             bonus_rows: bool = False) -> Tuple[int, int, int]:
    """Static checks of the ragged draft batch shared by the verification ops. Returns (R, N, V).
    ``bonus_rows``: the layout with given bonus tokens (``[N, V]``: no row after each request's last draft)."""
    check_tensor("target_logits", target_logits, 2, FLOAT_DTYPES)
    dev = target_logits.device
    check_tensor("draft_token_ids", draft_token_ids, 1, TOKEN_DTYPES, dev, "target_logits")
    check_tensor("cu_num_draft", cu_num_draft, 1, (torch.int32,), dev, "target_logits")
    if cu_num_draft.shape[0] < 1:
        fail("cu_num_draft", "expected shape [R + 1] with R >= 0, got an empty tensor")
    R = cu_num_draft.shape[0] - 1
    N = draft_token_ids.shape[0]
    V = target_logits.shape[1]
    if bonus_rows:
        if target_logits.shape[0] != N:
            fail("target_logits", f"expected shape [N, V] = [{N}, V] with bonus_token_ids (no row after each "
                 f"request's last draft; N = len(draft_token_ids)), got {tuple(target_logits.shape)}")
    elif target_logits.shape[0] != N + R:
        fail("target_logits", f"expected shape [N + R, V] = [{N} + {R}, V] (N = len(draft_token_ids), "
             f"R = len(cu_num_draft) - 1), got {tuple(target_logits.shape)}")
    if V < 1:
        fail("target_logits", f"vocabulary size must be >= 1, got shape {tuple(target_logits.shape)}")
    if parents is not None:
        check_tensor("parents", parents, 1, (torch.int32,), dev, "target_logits")
        if parents.shape[0] != N:
            fail("parents", f"expected shape [N] = [{N}], got {tuple(parents.shape)}")
    if not isinstance(max_depth, int) and not isinstance(max_depth, torch.SymInt):
        fail("max_depth", f"expected an int, got {type(max_depth).__name__}")
    if isinstance(max_depth, int) and max_depth < 0:
        fail("max_depth", f"expected >= 0, got {max_depth}")
    return R, N, V


def request_of_node(cu_num_draft: torch.Tensor, N: int) -> torch.Tensor:
    """int64 [N]: the request each draft node belongs to (cu_num_draft must be valid)."""
    R = cu_num_draft.shape[0] - 1
    counts = (cu_num_draft[1:] - cu_num_draft[:-1]).long()
    return torch.repeat_interleave(torch.arange(R, device=cu_num_draft.device), counts, output_size=N)


def check_draft_batch_values(target_logits, draft_token_ids, cu_num_draft, parents, max_depth) -> None:
    """Value checks (host sync) of the ragged draft batch."""
    check_draft_batch_indices(target_logits, draft_token_ids, cu_num_draft, parents)
    N = draft_token_ids.shape[0]
    depth = tree_max_depth(cu_num_draft, parents, N)
    if max_depth < depth:
        fail("max_depth", f"must be >= the longest root-to-leaf path of the batch ({depth}), got {max_depth}")


def check_draft_batch_indices(target_logits, draft_token_ids, cu_num_draft, parents, tokens: bool = True) -> None:
    """The checks that keep every index a kernel follows in bounds (``cu`` from 0 to N, token ids in
    [0, V), parents earlier nodes of their request): run with validation off too by the backends that do
    not check in their kernels (the torch backend; the cpp kernels check in C++). ``tokens=False`` skips
    the token range (greedy verification only compares tokens: one outside the vocabulary is never
    accepted)."""
    R = cu_num_draft.shape[0] - 1
    N = draft_token_ids.shape[0]
    V = target_logits.shape[1]
    cu = cu_num_draft.long()
    if int(cu[0]) != 0:
        fail("cu_num_draft", f"cu_num_draft[0] must be 0, got {int(cu[0])}")
    if R > 0 and bool((cu[1:] < cu[:-1]).any()):
        fail("cu_num_draft", f"must be non-decreasing, got {cu.tolist()[:16]}")
    if int(cu[-1]) != N:
        fail("cu_num_draft", f"cu_num_draft[-1] must equal N = len(draft_token_ids) = {N}, got {int(cu[-1])}")
    if N > 0 and tokens:
        lo, hi = int(draft_token_ids.min()), int(draft_token_ids.max())
        if lo < 0 or hi >= V:
            fail("draft_token_ids", f"token ids must be in [0, V) = [0, {V}), got values in [{lo}, {hi}]")
    if parents is not None and N > 0:
        req = request_of_node(cu_num_draft, N)
        local = torch.arange(N, device=parents.device) - cu[req]
        bad = (parents < -1) | (parents.long() >= local)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            fail("parents", f"each entry must satisfy -1 <= parents[i] < (local index of i) (topological "
                 f"order, local to its request); node {i} (local {int(local[i])}) has parent {int(parents[i])}")


def tree_max_depth(cu_num_draft: torch.Tensor, parents: Optional[torch.Tensor], N: Optional[int] = None) -> int:
    """Longest root-to-leaf path (in draft nodes) of the batch; one host sync.

    Robust to malformed input (it only bounds the work): validation reports the actual error.
    """
    R = cu_num_draft.shape[0] - 1
    if R <= 0:
        return 0
    cu = cu_num_draft.long()
    if parents is None:
        return max(0, int((cu[1:] - cu[:-1]).max()))
    N = parents.shape[0] if N is None else N
    if N == 0:
        return 0
    # depth by pointer jumping: ceil(log2 N) + 1 rounds of depth[i] += depth[jump[i]]
    counts = (cu[1:] - cu[:-1]).clamp(min=0)
    if int(counts.sum()) != N:
        return N
    req = torch.repeat_interleave(torch.arange(R, device=cu.device), counts, output_size=N)
    g = torch.where(parents >= 0, parents.long() + cu[req], torch.full_like(parents, -1, dtype=torch.long))
    g = torch.where(g < torch.arange(N, device=g.device), g, torch.full_like(g, -1))  # keep it acyclic
    depth = torch.ones(N, dtype=torch.long, device=g.device)
    jump = g
    for _ in range(max(1, int(N).bit_length()) + 1):
        has = jump >= 0
        if not bool(has.any()):
            break
        j = jump.clamp(min=0)
        depth = depth + torch.where(has, depth[j], torch.zeros_like(depth))
        jump = torch.where(has, jump[j], jump)
    return int(depth.max())
