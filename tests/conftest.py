"""Shared test setup.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET must
be set before any kernel module is imported, which is why it is set here, at collection time. The NKI kernels
run on CPU tensors through the NumPy emulation of the NKI language, switched on per test by use_backend('nki').
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


def nki_emulated():
    """['nki'] on CPU: the NKI kernels run on the project's NumPy emulation of the NKI language
    (spdkernels.testing.nki_emulator), switched on by use_backend('nki'). On a GPU machine they are not run."""
    return ["nki"] if DEVICE == "cpu" else []


def cpp_lower_isas():
    """'cpp@<level>' for every instruction-set level of the C++ kernels that this machine runs below its best
    (the best runs as plain 'cpp'): the AVX2 and baseline paths of an AVX-512 machine get the same tests."""
    if "cpp" not in backends_here():
        return []
    from spdkernels import _cpp

    return [f"cpp@{name}" for name in _cpp.isas_here()[:-1]]


def cpp_dispatch():
    """['cpp-dispatch'] where the C++ dispatcher kernels (spdkernels/_C_ops.so) must run: the cpp backend with
    value validation off, so that well-formed CPU calls of verify_greedy and rejection_sample run in C++ without
    Python. Wherever the extension is built, _C_ops is built too (make install sets SPDKERNELS_REQUIRE_CPP), so
    a _C_ops that does not load is a failure, not a skip."""
    if "cpp" not in backends_here() or os.environ.get("SPDKERNELS_SKIP_TORCH_OPS", "0") not in ("", "0"):
        return []
    return ["cpp-dispatch"]


@contextlib.contextmanager
def use_backend(backend: str):
    """spdkernels.use_backend, where 'cpp@<level>' also caps the C++ kernels' instruction set and 'cpp-dispatch'
    is the cpp backend with validation off, checked to have run at least one call in the C++ dispatcher kernel."""
    from spdkernels import _cpp

    if backend == "cpp-dispatch":
        assert _cpp.load_ops() is not None, f"_C_ops did not load: {_cpp.ops_load_error()}"
        before = sum(_cpp.op_calls(op)[1] for op in _cpp.FAST_OPS)
        with spdkernels.use_backend("cpp"), spdkernels.validation(False):
            assert all(_cpp.fast_path(op) for op in _cpp.FAST_OPS)
            yield
        assert sum(_cpp.op_calls(op)[1] for op in _cpp.FAST_OPS) > before, "no call ran in the C++ kernel"
        return
    name, _, isa = backend.partition("@")
    with contextlib.ExitStack() as stack:
        if name == "nki" and DEVICE == "cpu" and os.environ.get("SPDKERNELS_NKI_SIMULATE") != "1":
            # the NKI kernels on the NumPy emulation (SPDKERNELS_NKI_SIMULATE=1: on the official nki.simulate)
            from spdkernels.nki_kernels import emulation

            stack.enter_context(emulation())
        stack.enter_context(spdkernels.use_backend(name))
        if isa:
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
