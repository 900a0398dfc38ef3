"""The ``spdkernels`` torch.library namespace and the helper that defines each op in it.

Each op is defined here, in Python, so that the package works without its C++ extension: the schema, a fake
(meta) kernel, and a Python kernel that makes the static checks and runs the automatic backend choice for the
tensors' device, registered for the ``CUDA`` key (the Triton kernels) and as ``CompositeExplicitAutograd`` (every
other device: Neuron/XLA, and CPU without the extension). The C++ extension (csrc/ops.cpp), once loaded,
registers the CPU kernels of ``verify_greedy``, ``rejection_sample`` and ``tree_attention`` for the ``CPU`` key,
which then take precedence over the Python kernel on CPU tensors.

An op with float outputs is an inference op (no backward, no forward derivative): its ``Autograd`` kernel
(:func:`inference_only`) refuses an input that a derivative would need, with a ValueError naming it, then runs
the op below autograd (torch's fallback would run it and give no gradient or a zero tangent). The C++ extension
registers the same check in C++ for ``AutogradCPU`` and, for ``tree_attention``, ``AutogradCUDA``, which take
precedence over this one: no Python frame on those calls.

Ops are defined with the plain ``torch.library.Library`` API rather than ``torch.library.custom_op``: measured on
the CPU machine here, a call through ``custom_op`` costs ~18 us of Python dispatch more than the same kernel behind
a Library definition (~4 us). Both register a real op in the dispatcher; opcheck and torch.compile treat them
alike.
"""

from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("spdkernels", "DEF")  # noqa: TOR901 - inference-only ops: autograd refuses, below
DEFINED: list = []  # names of the public ops defined so far, in definition order
FLOAT_OUTPUTS: set = set()  # those of them with float outputs: inference ops that refuse derivatives


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
    else:
        LIB.impl(name, inference_only(getattr(torch.ops.spdkernels, name).default), "Autograd", with_keyset=True)
        FLOAT_OUTPUTS.add(name)
    torch.library.register_fake(f"spdkernels::{name}", fake, lib=LIB)
    DEFINED.append(name)


_ARG_NAMES: dict = {}  # op overload -> its schema's argument names


def refuse_derivatives(op: torch._ops.OpOverload, args, kwargs=None) -> None:
    """ValueError naming the first tensor argument of the inference op ``op`` that a derivative would need: one
    that requires grad while grad mode is on, or one that carries a forward-mode tangent (forward_ad dual tensors,
    torch.func.jvp). ``args`` are positional, in the schema's order."""
    names = _ARG_NAMES.get(op)
    if names is None:
        names = _ARG_NAMES[op] = [a.name for a in op._schema.arguments]
    qualified = op._schema.name
    grad = torch.is_grad_enabled()
    dual = torch.autograd.forward_ad._current_level >= 0  # (one global read when no dual level is open)
    for name, t in [*zip(names, args), *(kwargs or {}).items()]:
        if not isinstance(t, torch.Tensor):
            continue
        if grad and t.requires_grad:
            raise ValueError(f"{name}: requires grad, and {qualified} is an inference op with no backward: call it "
                             f"under torch.no_grad() or torch.inference_mode(), or pass {name}.detach()")
        if dual and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise ValueError(f"{name}: carries a forward-mode AD tangent, and {qualified} is an inference op "
                             f"with no forward derivative: pass the primal "
                             f"(torch.autograd.forward_ad.unpack_dual({name}).primal)")


def inference_only(op: torch._ops.OpOverload) -> Callable:
    """The ``Autograd`` kernel (``with_keyset=True``) of an inference op: :func:`refuse_derivatives`, then the op
    below autograd."""
    def kernel(keyset, *args, **kwargs):
        refuse_derivatives(op, args, kwargs)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args, **kwargs)

    kernel.__name__ = f"{op._schema.name.split('::')[1]}_autograd"
    return kernel
