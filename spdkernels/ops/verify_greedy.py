"""verify_greedy: batched greedy verification of draft chains and token trees.

The torch op ``torch.ops.spdkernels.verify_greedy`` (schema below) runs the kernel torch's dispatcher holds for
the tensors' device (on CPU the C++ kernel of csrc/ops.cpp when the extension is built). Its fake implementation
gives the output shapes from ``cu_num_draft``'s length and ``max_depth`` alone, so it traces under torch.compile.
The public wrapper :func:`verify_greedy` adds the policy: value validation and a forced backend.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from spdkernels import _registry, reference
from spdkernels import _validate as V
from spdkernels._library import define_op
from spdkernels.ops._common import call_op, op_kernel
from spdkernels.ops._common import verify_outputs as _outputs

OP = "verify_greedy"


def _check_static(target_logits, draft_token_ids, cu_num_draft, parents, max_depth) -> None:
    V.check_draft_batch_static(target_logits, draft_token_ids, cu_num_draft, parents, max_depth)


def _check_values(target_logits, draft_token_ids, cu_num_draft, parents, max_depth) -> None:
    V.check_draft_batch_values(target_logits, draft_token_ids, cu_num_draft, parents, max_depth)
    if bool(torch.isnan(target_logits).any()):
        V.fail("target_logits", "contains NaN")


def _run(name, impl, *args):
    return impl(*args)


def _fake(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    R, _, _ = V.check_draft_batch_static(target_logits, draft_token_ids, cu_num_draft, parents, max_depth)
    return _outputs(R, max_depth, target_logits.device)


define_op("verify_greedy(Tensor target_logits, Tensor draft_token_ids, Tensor cu_num_draft, Tensor? parents, "
          "SymInt max_depth) -> (Tensor, Tensor, Tensor)", op_kernel(OP, _check_static, _run), _fake,
          integer_outputs=True)


# ---- backends --------------------------------------------------------------------------------------

@_registry.register(OP, "torch")
def _torch_impl(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    V.check_draft_batch_indices(target_logits, draft_token_ids, cu_num_draft, parents, tokens=False)
    return reference.verify_greedy(target_logits, draft_token_ids, cu_num_draft, parents, max_depth)


@_registry.register(OP, "cpp")
def _cpp_impl(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    """csrc/verify_greedy.cpp through its dispatcher registration (csrc/ops.cpp)."""
    return torch.ops.spdkernels.verify_greedy.default(target_logits, draft_token_ids, cu_num_draft, parents,
                                                      max_depth)


@_registry.register(OP, "triton")
def _triton_impl(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    from spdkernels.triton_kernels import verify_greedy as k
    from spdkernels.triton_kernels._common import int32_ids, launch_device

    with launch_device(target_logits):
        return k.verify_greedy(target_logits, int32_ids(draft_token_ids), cu_num_draft, parents, max_depth)


@_registry.register(OP, "nki")
def _nki_impl(target_logits, draft_token_ids, cu_num_draft, parents, max_depth):
    from spdkernels.nki_kernels import _launch

    return _launch.verify_greedy(target_logits, draft_token_ids, cu_num_draft, parents, max_depth)


# ---- public wrapper --------------------------------------------------------------------------------

def verify_greedy(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    cu_num_draft: torch.Tensor,
    parents: Optional[torch.Tensor] = None,
    max_depth: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a ragged batch of draft chains or token trees.

    Walk each request's tree from its root: among the children of the current node (in index order)
    accept the first whose token equals the argmax of the current node's target row, and continue from
    it; when none matches, emit that argmax and stop. Argmax ties go to the lowest token id.

    Args:
        target_logits: ``[N + R, V]`` fp32, bf16 or fp16. Request ``r`` owns the ``k_r + 1`` rows from
            ``cu_num_draft[r] + r``: row 0 follows the committed prefix, row ``1 + i`` follows node ``i``.
        draft_token_ids: ``[N]`` int32 or int64, in ``[0, V)``.
        cu_num_draft: ``[R + 1]`` int32, ``cu_num_draft[0] == 0``, non-decreasing, last entry ``N``.
            Requests with zero drafts are allowed (they emit one token).
        parents: ``[N]`` int32 or ``None`` (a chain). ``parents[i]`` is the local index of node ``i``'s
            parent within its request, ``-1`` for the root, and ``-1 <= parents[i] < i`` (local).
        max_depth: the longest root-to-leaf path of the batch (draft nodes). If ``None`` it is computed
            from ``cu_num_draft``/``parents``, which **costs a host sync**; pass it explicitly under
            ``torch.compile`` or CUDA graphs. A value larger than needed only adds padding.

    Returns:
        ``(output_token_ids, num_emitted, accepted_path)``, all int32 on the input device:

        * ``output_token_ids [R, max_depth + 1]``: accepted draft tokens, then one more token (the
          argmax where the walk stopped), then ``-1`` padding.
        * ``num_emitted [R]``: accepted draft tokens + 1.
        * ``accepted_path [R, max_depth]``: local indices of the accepted nodes, ``-1`` padded.

    Raises:
        ValueError: naming the argument, for any breach of the contract. Checks that read values (a
            host sync: monotone ``cu_num_draft``, ``parents`` order, token ids in range, NaN logits,
            ``max_depth`` too small) run unless ``spdkernels.set_validation(False)``; with validation
            off and ``max_depth`` too small, walks stop accepting at ``max_depth``.

    Example:
        >>> logits = torch.tensor([[0., 5., 1.], [9., 0., 0.], [0., 0., 3.]])  # R=1, k=2
        >>> out, num, path = verify_greedy(logits, torch.tensor([1, 2]), torch.tensor([0, 2], dtype=torch.int32))
        >>> out.tolist(), num.tolist(), path.tolist()  # node 0 accepted (token 1), then the argmax 0
        ([[1, 0, -1]], [2], [[0, -1]])
    """
    if max_depth is None:  # checks first: the depth is read from cu_num_draft and parents
        V.check_draft_batch_static(target_logits, draft_token_ids, cu_num_draft, parents, 0)
        max_depth = V.tree_max_depth(cu_num_draft, parents)
    return call_op(OP, torch.ops.spdkernels.verify_greedy.default,
                   (target_logits, draft_token_ids, cu_num_draft, parents, max_depth), _check_static, _check_values,
                   _run)
