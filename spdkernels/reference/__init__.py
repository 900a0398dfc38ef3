"""Pure-torch references: the algorithms as the papers state them, written to be read.

They are the oracle of every test and the last-resort backend on any device. They sync with the host
and loop in Python: correct, not fast.
"""

from .rejection_sample import coins_from_seed, philox_uniform, rejection_sample, target_weights
from .tree_attention import tree_attention
from .verify_greedy import verify_greedy

__all__ = ["coins_from_seed", "philox_uniform", "rejection_sample", "target_weights", "tree_attention", "verify_greedy"]
