"""Pure-torch references: the algorithms as the papers state them, written to be read.

They are the oracle of every test and the last-resort backend on any device. They sync with the host
and loop in Python: correct, not fast.
"""

from .verify_greedy import verify_greedy

__all__ = ["verify_greedy"]
