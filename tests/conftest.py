"""Shared test setup.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET must
be set before any kernel module is imported, which is why it is set here, at collection time.
"""

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


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    spdkernels.set_backend(None)
    spdkernels.set_validation(True)
    yield
    spdkernels.set_backend(None)
    spdkernels.set_validation(True)
