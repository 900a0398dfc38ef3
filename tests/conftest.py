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


@pytest.fixture(autouse=True)
def _triton_mode_unchanged():
    """Triton fixes the interpreter mode when a kernel module is first imported, so a test that takes TRITON_INTERPRET
    from this session (e.g. by importing bench/compile_check.py, which compiles real kernels) breaks every Triton test
    after it: fail the test that did it."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    assert os.environ.get("TRITON_INTERPRET") == before, "this test changed TRITON_INTERPRET for the whole session"


def backend_device(backend: str) -> str:
    """The device a backend's test inputs live on: ``triton`` (and ``torch``, which runs anywhere) on DEVICE, i.e.
    CUDA where there is a GPU and CPU under the Triton interpreter elsewhere; cpp, cpp@<level> and
    nki (emulated) on CPU."""
    return DEVICE if backend.partition("@")[0] in ("triton", "torch") else "cpu"


# the attribute to_backend sets on the tensors it places: on a CPU machine it stands for "this tensor would be on
# CUDA on a GPU machine", so that the device check below catches a test that forgets to place its inputs
_PLACED = "_spdkernels_test_device"


def to_backend(backend: str, x):
    """``x`` on ``backend_device(backend)``: a tensor, or a tuple/list/dict of tensors (other values, None
    included, pass through). Every tensor it returns is marked as placed for that device."""
    if isinstance(x, torch.Tensor):
        t = x.to(backend_device(backend))
        setattr(t, _PLACED, backend_device(backend))
        return t
    if isinstance(x, (tuple, list)):
        return type(x)(to_backend(backend, v) for v in x)
    if isinstance(x, dict):
        return {k: to_backend(backend, v) for k, v in x.items()}
    return x


def on_backend_device(t: torch.Tensor, backend: str) -> bool:
    """Is ``t`` where ``backend`` runs: on its device and, on a CPU machine, placed there by to_backend (a test
    that built plain CPU tensors for Triton would hand them to a CUDA Triton on a GPU machine and fail there)."""
    dev = backend_device(backend)
    if t.device.type != dev:
        return False
    return dev != "cpu" or backend.partition("@")[0] != "triton" or getattr(t, _PLACED, None) == dev


def backend_generator(backend: str, seed: int) -> torch.Generator:
    """A torch.Generator on the device of ``backend`` (a CUDA generator for Triton on a GPU machine), seeded."""
    return torch.Generator(device=backend_device(backend)).manual_seed(seed)


# the adapter test modules: every call of an adapter entry point with ``triton`` forced is device-checked like the
# op calls below (the adapters create their own tensors on their inputs' device, so their inputs are what counts)
ADAPTER_ENTRY_POINTS = {
    "test_adapters_vllm": ("spdkernels.adapters.vllm", ("rejection_sample", "sample_recovered_tokens")),
    "test_adapters_sglang": ("spdkernels.adapters.sglang", ("verify_tree_greedy",
                                                             "tree_speculative_sampling_target_only")),
    "test_adapters_flashinfer": ("spdkernels.adapters.flashinfer", ("chain_speculative_sampling",)),
}

# the op test modules whose calls of the public ops are checked (autouse fixture below)
DEVICE_CHECKED_MODULES = {"test_rejection_sample", "test_verify_greedy", "test_tree_attention", "test_ops_framework",
                          "test_tree_utils"}
PUBLIC_OPS = ("verify_greedy", "rejection_sample", "tree_attention")


def device_checked(name: str, fn):
    """``fn`` (a public op) that first asserts that, when ``triton`` is the forced backend, every tensor it is
    handed is on the device Triton runs on (on_backend_device)."""
    from spdkernels import _registry

    def checked(*args, **kw):
        forced = _registry.forced_backend()
        if forced == "triton":
            for i, a in enumerate(list(args) + list(kw.values())):
                if isinstance(a, torch.Tensor):
                    arg = f"argument {i}" if i < len(args) else f"keyword {list(kw)[i - len(args)]!r}"
                    assert on_backend_device(a, forced), (
                        f"{name}: {arg} is a {a.device.type} tensor not placed for the forced backend {forced!r} "
                        f"(device {backend_device(forced)!r}): put test inputs on conftest.to_backend(backend, ...)")
        return fn(*args, **kw)

    checked.__wrapped__ = fn
    return checked


@pytest.fixture(autouse=True)
def _inputs_on_the_backend_device(request, monkeypatch):
    """In the op test modules, every call of a public op with ``triton`` forced must get inputs on Triton's device
    (CUDA on a GPU machine): what would raise BackendUnavailableError there fails here too."""
    if request.module.__name__ in DEVICE_CHECKED_MODULES:
        for name in PUBLIC_OPS:
            monkeypatch.setattr(spdkernels, name, device_checked(name, getattr(spdkernels, name)))
    if request.module.__name__ in ADAPTER_ENTRY_POINTS:
        import importlib

        mod_name, names = ADAPTER_ENTRY_POINTS[request.module.__name__]
        mod = importlib.import_module(mod_name)
        depth = [0]  # only the outermost adapter call is checked: inner calls get tensors the adapter derived

        def outermost(name, fn):
            checked = device_checked(name, fn)

            def f(*a, **kw):
                depth[0] += 1
                try:
                    return (checked if depth[0] == 1 else fn)(*a, **kw)
                finally:
                    depth[0] -= 1
            return f

        for name in names:
            monkeypatch.setattr(mod, name, outermost(f"{mod_name}.{name}", getattr(mod, name)))
        if hasattr(mod, "RejectionSampler"):
            monkeypatch.setattr(mod.RejectionSampler, "forward",
                                outermost("RejectionSampler.forward", mod.RejectionSampler.forward))
    yield


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


@contextlib.contextmanager
def use_backend(backend: str):
    """spdkernels.use_backend, where 'cpp@<level>' also caps the C++ kernels' instruction set."""
    from spdkernels import _cpp

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


# ---- the adapters' two paths on CPU ------------------------------------------------------------------------------
# "cpp" = the adapter's fused C++ op in the stack's layout, "cpp-generic" = its conversion to the public ops (the
# path every other backend takes).

def adapter_paths():
    names = backends_here()
    return names + (["cpp-generic"] if "cpp" in names else [])


@contextlib.contextmanager
def adapter_path(path: str, module, monkeypatch):
    """Run ``module``'s adapter on ``path`` and prove that it took it: for "cpp" the public ops must not be called
    (the fused op served the call), for "cpp-generic" they must be."""
    calls = []
    for name in ("verify_greedy", "rejection_sample"):
        real = getattr(spdkernels, name)
        monkeypatch.setattr(spdkernels, name, lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    monkeypatch.setattr(module, "_FUSED", not path.endswith("-generic"))
    with use_backend(path.replace("-generic", "")):
        yield
    if path == "cpp":
        assert not calls, "the fused C++ op should have served the call"
    elif path == "cpp-generic":
        assert calls, "the generic path should have called the spdkernels op"


def path_device(path: str, x):
    """``x`` on the device of ``path``'s backend."""
    return to_backend(path.replace("-generic", ""), x)


@contextlib.contextmanager
def adapter_refusal_path(fused: bool, module, monkeypatch):
    """For the refusal tests: ``module``'s fused op (``fused``, on the cpp backend) or its generic path; with the
    fused op, prove that it ran (no public op was called before the refusal)."""
    calls = []
    for name in ("verify_greedy", "rejection_sample"):
        real = getattr(spdkernels, name)
        monkeypatch.setattr(spdkernels, name, lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    monkeypatch.setattr(module, "_FUSED", fused)
    cpp = "cpp" in backends_here()
    with (use_backend("cpp") if cpp else contextlib.nullcontext()):
        yield
    if fused and cpp:
        assert not calls, "the fused C++ op should have served (and refused) the call"


class ByteTokenizer:
    """Enough of a tokenizer for the runtime on a tiny random model: bytes modulo ``vocab_size``, at most
    ``max_len`` of them (``None``: all), the chat template the user's message itself."""

    stop_token_ids: list = []

    def __init__(self, vocab_size: int, max_len=None):
        self.vocab_size, self.max_len = vocab_size, max_len

    def apply_chat_template(self, messages):
        return messages[0]["content"]

    def encode(self, text):
        return [b % self.vocab_size for b in text.encode()][:self.max_len]

    def decode(self, ids):
        return " ".join(map(str, ids))
