"""Public ops: typed wrappers over ``torch.ops.spdkernels.*`` custom ops, one module per op."""

from .verify_greedy import verify_greedy

__all__ = ["verify_greedy"]
