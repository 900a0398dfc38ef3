"""The ``spdkernels`` torch.library namespace and the helper that defines each op in it.

Each op is defined here, in Python, so that the package works without its C++ extension: the schema, a fake
(meta) kernel, and a Python kernel that makes the static checks and runs the automatic backend choice for the
tensors' device, registered for the ``CUDA`` key (the Triton kernels) and as ``CompositeExplicitAutograd`` (every
other device: Neuron/XLA, and CPU without the extension). The C++ extension (csrc/ops.cpp), once loaded,
registers the CPU kernels of ``verify_greedy``, ``rejection_sample`` and ``tree_attention`` for the ``CPU`` key,
which then take precedence over the Python kernel on CPU tensors.

Ops are defined with the plain ``torch.library.Library`` API rather than ``torch.library.custom_op``: measured on
the CPU machine here, a call through ``custom_op`` costs ~18 us of Python dispatch more than the same kernel behind
a Library definition (~4 us). Both register a real op in the dispatcher; opcheck and torch.compile treat them
alike.
"""

from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("spdkernels", "DEF")  # noqa: TOR901 - inference-only ops, no autograd
DEFINED: list = []  # names of the public ops defined so far, in definition order


def define_op(schema: str, kernel: Callable, fake: Callable, integer_outputs: bool = False) -> None:
    """Define ``spdkernels::<schema>`` with ``kernel`` for every device and ``fake`` as its meta kernel.

    ``integer_outputs``: the outputs are integers, nothing to differentiate: the Autograd key falls through
    (skips the boxed autograd fallback, ~10 us on a cold call)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, kernel, "CompositeExplicitAutograd")
    LIB.impl(name, kernel, "CUDA")
    if integer_outputs:
        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"spdkernels::{name}", fake, lib=LIB)
    DEFINED.append(name)
