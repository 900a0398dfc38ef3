"""Public ops: typed wrappers over ``torch.ops.spdkernels.*`` custom ops, one module per op."""

from .rejection_sample import rejection_sample
from .tree_attention import tree_attention
from .verify_greedy import verify_greedy

__all__ = ["rejection_sample", "tree_attention", "verify_greedy"]
