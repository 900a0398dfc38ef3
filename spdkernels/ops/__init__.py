"""Public ops: typed wrappers over ``torch.ops.spdkernels.*`` custom ops, one module per op."""

from .. import _cpp
from .rejection_sample import rejection_sample
from .tree_attention import tree_attention
from .verify_greedy import verify_greedy

# the C++ CPU kernels of the ops above, registered with torch's dispatcher: loaded after the ops are defined,
# since they hand the calls they do not run to the ops' Python twins
_cpp.load_ops()

__all__ = ["rejection_sample", "tree_attention", "verify_greedy"]
