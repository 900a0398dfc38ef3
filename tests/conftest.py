"""Shared test setup.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET must
be set before any kernel module is imported, which is why it is set here, at collection time.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import spdkernels  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def backends_here():
    """Backends the tests must exercise on this machine. A backend that should work here but cannot
    load is a failure, not a skip (so a broken C++ build or Triton install turns CI red)."""
    names = ["torch"]
    names.append("triton")
    if DEVICE == "cpu" and os.environ.get("SPDKERNELS_SKIP_CPP", "0") in ("", "0"):
        names.append("cpp")
    return names


def cpp_lower_isas():
    """'cpp@<level>' for every instruction-set level of the C++ kernels that this machine runs below its best
    (the best runs as plain 'cpp'): the AVX2 and baseline paths of an AVX-512 machine get the same tests."""
    if "cpp" not in backends_here():
        return []
    from spdkernels import _cpp

    return [f"cpp@{name}" for name in _cpp.isas_here()[:-1]]


@contextlib.contextmanager
def use_backend(backend: str):
    """spdkernels.use_backend, where 'cpp@<level>' also caps the C++ kernels' instruction set."""
    name, _, isa = backend.partition("@")
    with contextlib.ExitStack() as stack:
        stack.enter_context(spdkernels.use_backend(name))
        if isa:
            from spdkernels import _cpp

            stack.enter_context(_cpp.isa_cap(isa))
        yield


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    spdkernels.set_backend(None)
    spdkernels.set_validation(True)
    yield
    spdkernels.set_backend(None)
    spdkernels.set_validation(True)
