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


def define_op(schema: str, impl: Callable, fake: Callable, cpu_twin: bool = False) -> None:
    """Define ``spdkernels::<schema>``, its kernel for every device, and its fake (meta) kernel.

    ``cpu_twin``: also define ``spdkernels::_<name>_python``, the same schema with the same kernels. The C++
    CPU kernel of ``<name>`` in ``spdkernels/_C_ops.so`` (csrc/torch_ops/dispatch.cpp), when loaded, takes the
    CPU key of ``<name>`` and hands every call it does not run itself to this twin, i.e. to ``impl``."""
    name, rest = schema.split("(", 1)
    for n in (name, f"_{name}_python") if cpu_twin else (name,):
        LIB.define(f"{n}({rest}")
        LIB.impl(n, impl, "CompositeExplicitAutograd")
        if cpu_twin:  # integer outputs, nothing to differentiate: skip the boxed autograd fallback (~10 us cold)
            LIB.impl(n, torch.library.fallthrough_kernel, "Autograd")
        torch.library.register_fake(f"spdkernels::{n}", fake, lib=LIB)
    DEFINED.append(name)
