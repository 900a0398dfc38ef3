"""The ``spdkernels`` torch.library namespace and the helper that defines each op in it.

Ops are defined with the plain ``torch.library.Library`` API (schema + one CompositeExplicitAutograd
kernel + a fake) rather than ``torch.library.custom_op``: measured on the CPU machine here, a call
through ``custom_op`` costs ~18 us of Python dispatch more than the same kernel behind a Library
definition (~4 us), which is a fifth of a cold R=16, V=32000 verify_greedy. Both register a real op
in the dispatcher; opcheck and torch.compile treat them alike.
"""

from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("spdkernels", "DEF")  # noqa: TOR901 - inference-only ops, no autograd
DEFINED: list = []  # names of the ops defined so far, in definition order


def define_op(schema: str, impl: Callable, fake: Callable) -> None:
    """Define ``spdkernels::<schema>``, its kernel for every device, and its fake (meta) kernel."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"spdkernels::{name}", fake, lib=LIB)
    DEFINED.append(name)
