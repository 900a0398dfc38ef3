"""Public ops: typed wrappers over ``torch.ops.spdkernels.*`` custom ops, one module per op."""

from .. import _cpp
from .rejection_sample import rejection_sample
from .tree_attention import tree_attention
from .verify_greedy import verify_greedy

# the C++ extension registers the CPU kernels of the ops above with torch's dispatcher when it is imported
_cpp.load()

__all__ = ["rejection_sample", "tree_attention", "verify_greedy"]
