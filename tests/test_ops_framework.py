"""The op framework: torch.library registration (opcheck, torch.compile) and the backend registry."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, backends_here, to_backend, use_backend

import spdkernels
from spdkernels import _registry
from spdkernels.testing import random_draft_batch


def sample_inputs():
    """(op, args) for every public torch op, several shapes each (chains, trees, empty requests)."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for ks, tree, dtype in [([2, 0, 3], False, torch.float32), ([4, 1], True, torch.bfloat16),
                            ([0], False, torch.float16)]:
        b = random_draft_batch(ks, 37, tree=tree, dtype=dtype, gen=gen, device=DEVICE)
        cases.append((torch.ops.spdkernels.verify_greedy.default, b.args()))
        R, N = b.R, b.N
        rs = torch.ops.spdkernels.rejection_sample.default
        T = torch.tensor([0.0, 0.8, 1.2][:R], device=DEVICE)
        cases.append((rs, (*b.args()[:4], None, T, None, None, torch.full((N + R,), 0.5, device=DEVICE), None, None,
                           b.max_depth)))
        q = torch.softmax(torch.randn(N, 37, generator=gen), -1).to(DEVICE)
        cases.append((rs, (*b.args()[:4], q, None, torch.full((R,), 5, dtype=torch.int32, device=DEVICE),
                           torch.full((R,), 0.9, device=DEVICE), None, torch.arange(R, device=DEVICE),
                           torch.ones(R, dtype=torch.int64, device=DEVICE), b.max_depth)))
        if not tree:  # probability rows with given bonus tokens (N rows: no row after a request's last draft)
            probs = torch.softmax(b.target_logits[:N].float(), -1).to(b.target_logits.dtype)
            cases.append((rs, (probs, *b.args()[1:4], None, None, None, None, None, torch.arange(R, device=DEVICE),
                               None, b.max_depth, torch.full((R,), 3, device=DEVICE), True)))
    from test_tree_attention import make_batch

    ta = torch.ops.spdkernels.tree_attention.default
    for q_lens, ctx, dtype, chain in [([3, 1], [17, 0], torch.float32, False), ([4], [40], torch.bfloat16, True)]:
        args = make_batch(q_lens, ctx, 4, 2, 64, 16, dtype, chain, gen)
        cases.append((ta, (*args, None)))
        cases.append((ta, (*args, 0.2)))
    return cases


ALL_OPS = {"verify_greedy", "rejection_sample", "tree_attention"}


def test_every_public_op_is_a_torch_op_and_covered():
    from spdkernels._library import DEFINED

    assert set(DEFINED) == ALL_OPS
    for name in ALL_OPS:
        assert isinstance(getattr(torch.ops.spdkernels, name).default, torch._ops.OpOverload)
    assert {op._schema.name.split("::")[1] for op, _ in sample_inputs()} == ALL_OPS


@pytest.mark.parametrize("backend", backends_here())
def test_opcheck(backend):
    with use_backend(backend):
        for op, args in sample_inputs():
            if backend.split("-")[0] in spdkernels.available_backends(DEVICE, op=op._schema.name.split("::")[1]):
                torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def step(logits, toks, cu, parents):
        # some ordinary torch work around the op, so the graph is not just the op
        out, num, path = torch.ops.spdkernels.verify_greedy(logits * 2.0, toks, cu, parents, 3)
        seed = torch.arange(cu.shape[0] - 1, device=cu.device)
        temp = torch.full((cu.shape[0] - 1,), 0.7, device=cu.device)
        out2, num2, _ = torch.ops.spdkernels.rejection_sample(logits, toks, cu, parents, None, temp, None, None, None,
                                                              seed, None, 3)
        q = torch.ones(cu.shape[0] - 1, 4, 64, device=cu.device)  # exact values: eager == compiled inputs
        kc = (torch.arange(4 * 16 * 2 * 64, device=cu.device) % 7).float().view(4, 16, 2, 64) / 8
        bt = torch.arange(4, dtype=torch.int32, device=cu.device).view(1, 4).expand(cu.shape[0] - 1, 4).contiguous()
        lens = torch.full((cu.shape[0] - 1,), 50, dtype=torch.int32, device=cu.device)
        cu1 = torch.arange(cu.shape[0], dtype=torch.int32, device=cu.device)
        att = torch.ops.spdkernels.tree_attention(q * 0 + 1, kc, kc, bt, lens, cu1, None, None)
        return out, num + 1, path, out2, num2, att

    b = random_draft_batch([3, 0, 2], 64, tree=True, gen=torch.Generator().manual_seed(1), device=DEVICE)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got = compiled(*b.args()[:4])
    want = step(*b.args()[:4])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_device_check_catches_inputs_left_off_the_triton_device():
    """The op test modules' autouse check (conftest.device_checked): a test that hands plain CPU tensors to a forced
    triton backend fails here, on a CPU machine, as it would raise BackendUnavailableError on a GPU machine (where
    Triton runs on CUDA tensors only); the same inputs placed by to_backend pass."""
    b = random_draft_batch([2, 1], 19, gen=torch.Generator().manual_seed(2))
    with use_backend("triton"):
        with pytest.raises(AssertionError, match="argument 0 is a cpu tensor not placed for the forced backend"):
            spdkernels.verify_greedy(*b.args())
        with pytest.raises(AssertionError, match="keyword 'seed'"):
            spdkernels.rejection_sample(*to_backend("triton", b.args()[:3]), max_depth=b.max_depth,
                                        seed=torch.arange(2))
        out, _, _ = spdkernels.verify_greedy(*to_backend("triton", b.args()))
    assert torch.equal(out.cpu(), spdkernels.reference.verify_greedy(*b.args())[0])
    with use_backend("torch"):  # only the device backend is held to its device
        spdkernels.verify_greedy(*b.args())


# ---- registry ------------------------------------------------------------------------------------

def test_available_backends_here():
    names = spdkernels.available_backends("cpu")
    assert names[-1] == "torch"
    if "cpp" in backends_here():
        assert "cpp" in names
    assert "nki" not in names  # no Neuron device or nki package on these machines
    assert spdkernels.available_backends("cpu", op="no_such_op") == []


def test_automatic_choice_on_cpu_is_cpp_and_logged_once(caplog):
    if "cpp" not in backends_here():
        pytest.skip("C++ extension deliberately not built (SPDKERNELS_SKIP_CPP)")
    _registry._logged.clear()
    _registry._resolved.clear()
    with caplog.at_level(logging.INFO, logger="spdkernels"):
        for _ in range(3):
            name, _ = _registry.resolve("verify_greedy", torch.device("cpu"))
            assert name == "cpp"
    msgs = [r.getMessage() for r in caplog.records if "verify_greedy on cpu" in r.getMessage()]
    assert len(msgs) == 1 and "'cpp'" in msgs[0]


def test_forced_backend_that_cannot_run_raises():
    with spdkernels.use_backend("nki"):
        with pytest.raises(spdkernels.BackendUnavailableError, match="nki"):
            spdkernels.verify_greedy(torch.zeros(1, 4), torch.zeros(0, dtype=torch.int64),
                                     torch.zeros(2, dtype=torch.int32))
    if DEVICE == "cpu":
        with spdkernels.use_backend("cpp"):
            with pytest.raises(spdkernels.BackendUnavailableError, match="cpp.*meta"):
                _registry.resolve("verify_greedy", torch.device("meta"))


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        spdkernels.set_backend("cuda")


def test_env_variable_forces_backend():
    code = ("import torch, spdkernels; from spdkernels import _registry;"
            "print(spdkernels.forced_backend(), _registry.resolve('verify_greedy', torch.device('cpu'))[0])")
    env = dict(os.environ, SPDKERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "torch"]
    env["SPDKERNELS_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SPDKERNELS_BACKEND must be one of" in out.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on PATH to check the C++ sources with")
def test_cpp_sources_compile_without_the_x86_paths():
    """The C++ sources with x86 code keep it behind ``__x86_64__`` (directly or through common.h's SPD_HAVE_V4;
    CMakeLists.txt: elsewhere every path is the baseline one): each one parses (g++ -fsyntax-only) with its system
    headers included first and then ``__x86_64__`` undefined, as on an ARM build. The AVX-512 widening (widen16)
    left unguarded failed here with 19 errors. This does not stand in for an ARM compiler (``__aarch64__`` stays
    undefined)."""
    import re
    import sysconfig
    from pathlib import Path

    from torch.utils.cpp_extension import include_paths

    root = Path(__file__).resolve().parent.parent / "csrc"

    def system_headers(path, seen):
        out = []
        if path in seen:
            return out
        seen.add(path)
        for line in path.read_text().splitlines():
            m = re.match(r'\s*#include\s*<([^>]+)>', line)
            if m and m.group(1) != "immintrin.h":
                out.append(m.group(1))
            m = re.match(r'\s*#include\s*"([^"]+)"', line)
            if m and (root / m.group(1)).exists():
                out += system_headers(root / m.group(1), seen)
        return out

    guarded = [p for p in sorted(root.glob("*.cpp")) if any(k in p.read_text() for k in ("immintrin", "__x86_64__"))]
    assert {p.name for p in guarded} >= {"linear.cpp", "rejection_sample.cpp", "tree_attention.cpp", "vec_exp.cpp"}
    flags = ["-std=c++17", "-fsyntax-only", "-w", *(f"-I{d}" for d in include_paths()),
             f"-I{sysconfig.get_paths()['include']}", f"-I{root}", "-x", "c++", "-"]
    for p in guarded:
        heads = dict.fromkeys(system_headers(p, set()))
        src = "".join(f"#include <{h}>\n" for h in heads) + f'#undef __x86_64__\n#include "{p}"\n'
        r = subprocess.run(["g++", *flags], input=src, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (p.name, r.stderr[-3000:])


def test_package_works_without_the_extension():
    """If spdkernels._C cannot be imported the package still works (on torch) and says so once."""
    code = ("import sys, logging; logging.basicConfig(level=logging.INFO);"
            "sys.modules['spdkernels._C'] = None\n"
            "import torch, spdkernels\n"
            "print(spdkernels.available_backends('cpu'))\n"
            "for _ in range(2):\n"
            "    out = spdkernels.verify_greedy(torch.tensor([[0., 2.]]), torch.zeros(0, dtype=torch.int64),"
            " torch.tensor([0, 0], dtype=torch.int32))\n"
            "print(out[0].tolist())")
    env = {k: v for k, v in os.environ.items() if k not in ("SPDKERNELS_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split("\n")[:2] == ["['torch']", "[[1]]"]
    assert out.stderr.count("C++ extension spdkernels._C unavailable") == 1


# ---- the dispatcher's kernels and the wrappers' policy ----------------------------------------------

needs_cpp = pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here "
                               "(SPDKERNELS_SKIP_CPP set)")


@needs_cpp
def test_cpu_kernels_are_the_extensions():
    """The CPU key of verify_greedy, rejection_sample and tree_attention holds the C++ kernel of csrc/ops.cpp (no
    Python on a CPU call of the torch op); so do the private ops."""
    for name in ("verify_greedy", "rejection_sample", "tree_attention", "_cpu_tree_attention", "_cpu_skinny_linear",
                 "_cpu_skinny_linear_packed", "_cpu_widen_packed"):
        dump = torch._C._dispatch_dump(f"spdkernels::{name}")
        cpu = [line for line in dump.splitlines() if line.startswith("CPU:")]
        assert len(cpu) == 1 and "csrc/ops.cpp" in cpu[0], dump
    for name in ("verify_greedy", "rejection_sample", "tree_attention"):  # the Triton kernels: CUDA's, in Python
        dump = torch._C._dispatch_dump(f"spdkernels::{name}")
        assert any(line.startswith("CUDA:") and "_library.py" in line for line in dump.splitlines()), dump


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op called from Python while active (not the ones a kernel calls inside)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def _ops_called(fn):
    with _OpLog() as log:
        fn()
    return log.ops


@needs_cpp
def test_wrapper_policy_validation_and_forced_backend():
    """With validation off and the automatic backend, the wrapper makes one call: the torch op (on CPU, the C++
    kernel). Validation on adds the value checks (torch ops) before it; a forced torch backend runs the reference
    directly, without the op."""
    b = random_draft_batch([3, 0, 4], 40, tree=True, gen=torch.Generator().manual_seed(5), match_prob=0.7)
    want = spdkernels.reference.verify_greedy(*b.args())
    out = {}

    def call(key):
        def fn():
            out[key] = spdkernels.verify_greedy(*b.args())
        return fn

    with spdkernels.validation(False):
        assert _ops_called(call("off")) == ["spdkernels::verify_greedy"]
        with spdkernels.use_backend("torch"):
            forced = _ops_called(call("torch"))
        assert "spdkernels::verify_greedy" not in forced and forced
    on = _ops_called(call("on"))
    assert on[-1] == "spdkernels::verify_greedy" and len(on) > 1
    for key in ("off", "torch", "on"):
        assert all(torch.equal(g, w) for g, w in zip(out[key], want)), key


def test_policy_is_per_thread():
    """use_backend / validation blocks hold in their own thread only; set_* change the process default."""
    import threading

    seen = {}
    before = (spdkernels.forced_backend(), spdkernels.validation_enabled())  # (SPDKERNELS_BACKEND may force one)
    inside, release = threading.Event(), threading.Event()

    def worker():
        with spdkernels.use_backend("torch"), spdkernels.validation(False):
            seen["worker"] = (spdkernels.forced_backend(), spdkernels.validation_enabled())
            inside.set()
            release.wait(10)

    th = threading.Thread(target=worker)
    th.start()
    assert inside.wait(10)
    seen["main"] = (spdkernels.forced_backend(), spdkernels.validation_enabled())
    release.set()
    th.join()
    assert seen == {"worker": ("torch", False), "main": before}
    spdkernels.set_validation(False)
    spdkernels.set_backend("torch")
    th = threading.Thread(target=lambda: seen.update(t=(spdkernels.forced_backend(), spdkernels.validation_enabled())))
    th.start()
    th.join()
    assert seen["t"] == ("torch", False)
    with spdkernels.use_backend(None), spdkernels.validation(True):  # a block overrides the process default
        assert (spdkernels.forced_backend(), spdkernels.validation_enabled()) == (None, True)


def _rs_args(b, **kw):
    max_depth = kw.pop("max_depth", b.max_depth)
    a = dict(parents=b.parents, draft_probs=None, temperature=None, top_k=None, top_p=None, uniforms=None,
             seed=torch.arange(b.R), offset=None)
    a.update(kw)
    return (b.target_logits, b.draft_token_ids, b.cu_num_draft, *a.values(), max_depth)


@needs_cpp
def test_cpu_op_checks_its_arguments():
    """Direct torch op calls: the C++ kernel's checks name the argument (ValueError) for every malformed layout,
    and take what the contract allows (strided logit rows, offset omitted = zeros)."""
    gen = torch.Generator().manual_seed(5)
    b = random_draft_batch([3, 0, 4], 40, tree=True, gen=gen, match_prob=0.7)
    rs, vg = torch.ops.spdkernels.rejection_sample.default, torch.ops.spdkernels.verify_greedy.default
    with spdkernels.use_backend("torch"):
        want_rs = spdkernels.rejection_sample(*b.args()[:3], parents=b.parents, seed=torch.arange(b.R),
                                              max_depth=b.max_depth)
        want_vg = spdkernels.verify_greedy(*b.args())
    for got, want in ((rs(*_rs_args(b)), want_rs), (vg(*b.args()), want_vg),
                      (rs(*_rs_args(b, offset=torch.zeros(b.R, dtype=torch.int64))), want_rs),
                      (vg(b.target_logits.t().contiguous().t(), *b.args()[1:]), want_vg)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    bad = {
        "cu_num_draft": lambda: vg(b.target_logits, b.draft_token_ids, b.cu_num_draft.long(), b.parents, b.max_depth),
        "parents": lambda: vg(b.target_logits, b.draft_token_ids, b.cu_num_draft, b.parents[1:], b.max_depth),
        "max_depth": lambda: rs(*_rs_args(b, max_depth=-1)),
        "top_k": lambda: rs(*_rs_args(b, top_k=torch.ones(b.R, dtype=torch.int64))),
        "temperature": lambda: rs(*_rs_args(b, temperature=torch.ones(b.R + 1))),
        "draft_probs": lambda: rs(*_rs_args(b, draft_probs=torch.ones(b.N, 39))),
        "uniforms": lambda: rs(*_rs_args(b, uniforms=torch.full((b.N + b.R,), 0.5))),  # and a seed
        "seed": lambda: rs(*_rs_args(b, seed=None, offset=torch.zeros(b.R, dtype=torch.int64))),  # neither coin
        "target_logits": lambda: vg(b.target_logits[1:], *b.args()[1:]),
        "draft_token_ids": lambda: vg(b.target_logits, b.draft_token_ids.float(), *b.args()[2:]),
        # no request but drafts: cu_num_draft = [0] must end at N (checked for an empty batch too)
        "cu_num_draft: last entry": lambda: vg(b.target_logits[:2], b.draft_token_ids[:2],
                                               torch.zeros(1, dtype=torch.int32), None, 0),
        "max_depth: expected an int in": lambda: vg(*b.args()[:4], 2**31),
    }
    for name, fn in bad.items():
        with pytest.raises(ValueError, match=f"^{name}" if ":" in name else f"^{name}: "):
            fn()


@needs_cpp
def test_cpu_tree_attention_checks_an_empty_batch():
    """No request but query rows: the layout check still runs (no uninitialised output)."""
    from test_tree_attention import make_batch

    q, kc, vc, bt, lens, cu, mask = make_batch([3], [20], 4, 2, 64, 16, torch.float32, False)
    with pytest.raises(ValueError, match="^cu_q_lens: last entry"):
        torch.ops.spdkernels._cpu_tree_attention(q, kc, vc, bt[:0], lens[:0], cu[:1], None, 0.125)


@needs_cpp
def test_cpu_tree_attention_op_runs_the_kernel_and_sends_fp64_to_torch():
    """The public op's C++ CPU kernel: fp32 / bf16 / fp16 give the private kernel's output bit for bit with or without
    a scale (None = 1 / sqrt(D)) and size hints; fp64 runs the torch backend (bit for bit, through the private op
    _tree_attention_torch: the C++ kernel has no fp64 path); bad size hints are named as the Python op names them."""
    from test_tree_attention import make_batch

    op = torch.ops.spdkernels.tree_attention.default
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, kc, vc, bt, lens, cu, mask = make_batch([3, 1], [20, 37], 4, 2, 64, 16, dtype, True)
        want = torch.ops.spdkernels._cpu_tree_attention(q, kc, vc, bt, lens, cu, mask, 0.125)
        assert torch.equal(op(q, kc, vc, bt, lens, cu, mask, 0.125, 3, 37, 2), want)
        assert torch.equal(op(q, kc, vc, bt, lens, cu, mask, None), want)  # 1 / sqrt(64)
    q, kc, vc, bt, lens, cu, mask = make_batch([3, 1], [20, 37], 4, 2, 64, 16, torch.float64, True)
    with spdkernels.use_backend("torch"):
        want = spdkernels.tree_attention(q, kc, vc, bt, lens, cu, mask)
    assert torch.equal(op(q, kc, vc, bt, lens, cu, mask, None), want)
    with pytest.raises(ValueError, match="^k_cache: expected dtype in \\(float64\\)"):
        op(q, kc.float(), vc, bt, lens, cu, mask, None)
    f32 = (q.float(), kc.float(), vc.float(), bt, lens, cu, mask, None)
    bad_hints = (((-1, None, None), "^max_q_len: expected >= 0"), ((None, -2, None), "^max_kv_len: expected >= 0"),
                 ((None, None, 0), "^num_splits: expected >= 1"))
    for hints, msg in bad_hints:
        with pytest.raises(ValueError, match=msg):  # the op itself: the C++ kernel's checks (the wrapper checks first)
            op(*f32, *hints)


def test_forced_backend_with_validation_off_names_a_bad_argument():
    with spdkernels.validation(False), spdkernels.use_backend("torch"):
        with pytest.raises(ValueError, match="^target_logits: expected a torch.Tensor"):
            spdkernels.verify_greedy([[0.0, 1.0]], torch.zeros(0, dtype=torch.int64),
                                     torch.zeros(2, dtype=torch.int32), None, 0)


@needs_cpp
def test_a_kernel_torch_refuses_is_an_import_error_not_an_abort():
    """A stale build whose kernel no longer matches the package's schema: importing the extension raises ImportError
    (the package then falls back and says why); the process survives (registration at import, not at dlopen)."""
    import spdkernels._C

    code = ("import importlib.util, sys, torch\n"
            "lib = torch.library.Library('spdkernels', 'DEF')\n"
            "lib.define('verify_greedy(Tensor x) -> Tensor')  # another schema than the kernel's\n"
            f"spec = importlib.util.spec_from_file_location('spdkernels._C', {spdkernels._C.__file__!r})\n"
            "try:\n"
            "    importlib.util.module_from_spec(spec)\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ImportError: spdkernels._C: torch refused a kernel registration" in out.stdout, out.stdout


def test_extension_loads_only_into_the_torch_it_was_built_for():
    from spdkernels._cpp import compatible

    meta = {"torch_version": "2.13.0+cpu", "cxx11_abi": 1}
    assert compatible(meta, "2.13.0+cpu", True) is None
    assert "built for torch 2.13.0+cpu" in compatible(meta, "2.14.1+cu128", True)
    assert "ABI" in compatible(meta, "2.13.0+cpu", False)
    assert compatible({"error": "the build failed: boom"}, "2.13.0+cpu", True) == "the build failed: boom"


@needs_cpp
def test_concurrent_calls_and_inference_mode():
    """Serving threads call the op at once (the GIL is released inside the dispatcher; each OS thread has its
    own kernel scratch), and under torch.inference_mode: every call equals the single-threaded result."""
    import threading

    gen = torch.Generator().manual_seed(8)
    batches = [random_draft_batch([4, 2, 5, 3], 3000, tree=t, gen=gen, match_prob=0.6) for t in (False, True)]
    kws = [dict(temperature=torch.tensor([1.0, 0.0, 0.7, 1.3]), top_p=torch.tensor([0.9, 1.0, 0.8, 1.0]),
                seed=torch.arange(4) + 10 * i) for i in range(2)]
    spdkernels.set_validation(False)

    def call(i):
        b = batches[i]
        return spdkernels.rejection_sample(b.target_logits, b.draft_token_ids, b.cu_num_draft, parents=b.parents,
                                           max_depth=b.max_depth, **kws[i])

    want = [call(i) for i in range(2)]
    got, errors = {}, []

    def worker(t):
        try:
            with torch.inference_mode(t % 2 == 1):
                got[t] = [call(t % 2) for _ in range(20)]
        except Exception as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sorted(got) == [0, 1, 2, 3]
    for t, outs in got.items():
        for out in outs:
            assert all(torch.equal(g, w) for g, w in zip(out, want[t % 2]))


# ---- inference ops: no derivative, refused with a ValueError naming the input -------------------------

def _inference_cases():
    """(op, args, float tensor argument names) of every op with float outputs that this build registers on CPU."""
    from test_tree_attention import make_batch

    gen = torch.Generator().manual_seed(1)
    ta_args = (*make_batch([3, 1], [17, 5], 4, 2, 16, 16, torch.float32, False, gen), 0.25)
    ops = torch.ops.spdkernels
    cases = [(ops.tree_attention.default, ta_args, ("q", "k_cache", "v_cache")),
             (ops._tree_attention_torch.default, ta_args, ("q", "k_cache", "v_cache"))]
    if "cpp" in backends_here():
        x, w, b = torch.randn(3, 64, generator=gen), torch.randn(8, 64, generator=gen), torch.randn(8, generator=gen)
        cos, sin = torch.rand(3, 1, 16, generator=gen), torch.rand(3, 1, 16, generator=gen)
        cases += [
            (ops._cpu_tree_attention.default, ta_args, ("q", "k_cache", "v_cache")),
            (ops._cpu_skinny_linear.default, (x, w, b), ("x", "weight", "bias")),
            (ops._cpu_skinny_linear_packed.default, (x, "f16", w.half(), None, None, b), ("x", "weight", "bias")),
            (ops._cpu_skinny_linear_packed.default,
             (x, "q8_0", torch.randint(-127, 128, (8, 64), dtype=torch.int8, generator=gen),
              torch.rand(8, 2, generator=gen), None, b), ("x", "scale", "bias")),
            (ops._cpu_widen_packed.default, ("f16", w.half(), None, None), ("weight",)),
            (ops._cpu_rms_norm.default, (x, torch.rand(64, generator=gen) + 0.5, 1e-6), ("x", "weight")),
            (ops._cpu_rotary.default, (torch.randn(3, 2, 16, generator=gen), cos, sin), ("x", "cos", "sin")),
            (ops._cpu_target_weights.default, (torch.randn(37, generator=gen), 0.8, 5, 0.9), ("row",)),
        ]
    return cases


def _with(args, op, name, make):
    """``args`` with the argument called ``name`` replaced by ``make(it)``."""
    i = [a.name for a in op._schema.arguments].index(name)
    return (*args[:i], make(args[i]), *args[i + 1:])


@pytest.mark.parametrize("case", range(len(_inference_cases())),
                         ids=[c[0]._schema.name.split("::")[1] for c in _inference_cases()])
def test_inference_ops_refuse_an_input_that_needs_a_derivative(case):
    """An op with float outputs has no backward and no forward derivative: an input that requires grad under grad
    mode, or that carries a forward-mode tangent (forward_ad, torch.func.jvp, torch.func.grad), is a ValueError
    naming it, instead of torch's fallback, which runs the op and gives a zero gradient / tangent. Under no_grad and
    inference_mode the same inputs run, bit for bit as without requires_grad."""
    import torch.autograd.forward_ad as fwAD

    op, args, names = _inference_cases()[case]
    want = op(*args)
    want = want if isinstance(want, tuple) else (want,)

    def same(got):
        got = got if isinstance(got, tuple) else (got,)
        assert all(torch.equal(g, w) if isinstance(g, torch.Tensor) else g == w for g, w in zip(got, want))

    for name in names:
        grad_args = _with(args, op, name, lambda t: t.clone().requires_grad_(True))
        with pytest.raises(ValueError, match=f"^{name}: requires grad, and {op._schema.name} is an inference op"):
            op(*grad_args)
        with torch.no_grad():
            same(op(*grad_args))
        with torch.inference_mode():
            same(op(*grad_args))
        with fwAD.dual_level():
            dual_args = _with(args, op, name, lambda t: fwAD.make_dual(t, torch.ones_like(t)))
            with pytest.raises(ValueError, match=f"^{name}: carries a forward-mode AD tangent"):
                op(*dual_args)
        i = [a.name for a in op._schema.arguments].index(name)

        def f(t, i=i):
            out = op(*args[:i], t, *args[i + 1:])
            return out[0] if isinstance(out, tuple) else out

        t0 = args[i].float() if args[i].dtype == torch.float16 else args[i]
        if t0 is args[i]:  # (torch.func needs a float dtype it can differentiate: fp16 weights are covered above)
            with pytest.raises(ValueError, match=f"^{name}: carries a forward-mode AD tangent"):
                torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
            with pytest.raises(ValueError, match=f"^{name}: requires grad"):
                torch.func.grad(lambda t: f(t).sum())(t0)


def test_public_wrapper_refuses_too_and_integer_ops_still_run():
    """spdkernels.tree_attention (the wrapper, validation on or off) refuses q that requires grad; verify_greedy and
    rejection_sample, whose outputs are token ids and counts (nothing to differentiate), run on logits that
    require grad and give the same outputs."""
    from test_tree_attention import make_batch

    gen = torch.Generator().manual_seed(2)
    q, kc, vc, bt, lens, cu, mask = make_batch([2], [9], 4, 2, 16, 16, torch.float32, False, gen)
    for on in (True, False):
        cpu_backends = [b for b in spdkernels.available_backends("cpu", op="tree_attention") if b in ("cpp", "torch")]
        for backend in [None, *cpu_backends]:  # forced: called directly
            with spdkernels.validation(on), spdkernels.use_backend(backend):
                with pytest.raises(ValueError, match="^q: requires grad"):
                    spdkernels.tree_attention(q.requires_grad_(True), kc, vc, bt, lens, cu, mask)
                with pytest.raises(ValueError, match="^v_cache: requires grad"):  # the op, keyword arguments given
                    torch.ops.spdkernels.tree_attention(q.detach(), kc, vc.requires_grad_(True), bt, lens, cu, mask,
                                                        None, max_q_len=2, max_kv_len=11)
                vc.requires_grad_(False)
                want = spdkernels.tree_attention(q.detach(), kc, vc, bt, lens, cu, mask)
                with torch.no_grad():
                    assert torch.equal(spdkernels.tree_attention(q, kc, vc, bt, lens, cu, mask, max_q_len=2), want)
    q.requires_grad_(False)
    b = random_draft_batch([2, 3], 37, gen=gen)
    logits = b.target_logits.clone().requires_grad_(True)
    want = spdkernels.verify_greedy(*b.args())
    got = spdkernels.verify_greedy(logits, *b.args()[1:])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    seed = torch.arange(b.R)
    kw = dict(parents=b.parents, seed=seed, temperature=torch.full((b.R,), 0.8))
    want = spdkernels.rejection_sample(b.target_logits, b.draft_token_ids, b.cu_num_draft, **kw)
    got = spdkernels.rejection_sample(logits, b.draft_token_ids, b.cu_num_draft, **kw)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_inference_check_without_the_extension():
    """Without the C++ extension the Python Autograd kernel (spdkernels/_library.py) makes the same refusals."""
    code = ("import sys; sys.modules['spdkernels._C'] = None\n"
            "import torch, spdkernels\n"
            "import torch.autograd.forward_ad as fwAD\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from test_tree_attention import make_batch\n"
            "q, kc, vc, bt, lens, cu, mask = make_batch([2], [9], 4, 2, 16, 16)\n"
            "f = lambda q: torch.ops.spdkernels.tree_attention(q, kc, vc, bt, lens, cu, mask, 0.25)\n"
            "want = f(q)\n"
            "for name, g in [('grad', lambda: f(q.clone().requires_grad_(True))),\n"
            "                ('grad k', lambda: torch.ops.spdkernels.tree_attention(q, kc.clone().requires_grad_(True),"
            " vc, bt, lens, cu, mask, 0.25)),\n"
            "                ('jvp', lambda: torch.func.jvp(f, (q,), (torch.ones_like(q),))),\n"
            "                ('func.grad', lambda: torch.func.grad(lambda t: f(t).sum())(q))]:\n"
            "    try:\n"
            "        g(); print(name, 'ran')\n"
            "    except ValueError as e:\n"
            "        print(name, str(e).split(',')[0])\n"
            "with fwAD.dual_level():\n"
            "    try:\n"
            "        f(fwAD.make_dual(q, torch.ones_like(q))); print('dual ran')\n"
            "    except ValueError as e:\n"
            "        print('dual', str(e).split(',')[0])\n"
            "with torch.no_grad():\n"
            "    print('no_grad', torch.equal(f(q.clone().requires_grad_(True)), want))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SPDKERNELS_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.splitlines() == ["grad q: requires grad", "grad k k_cache: requires grad",
                                       "jvp q: carries a forward-mode AD tangent",
                                       "func.grad q: requires grad", "dual q: carries a forward-mode AD tangent",
                                       "no_grad True"], out.stdout + out.stderr


@needs_cpp
def test_autograd_kernels_are_registered():
    """AutogradCPU of every op with float outputs holds the C++ check (csrc/ops.cpp), and AutogradCUDA of
    tree_attention (whose CUDA kernel is Python's: the check adds no Python frame); its Autograd alias holds the
    Python check (for every other device, and without the extension)."""
    for name in ("tree_attention", "_cpu_tree_attention", "_cpu_skinny_linear", "_cpu_skinny_linear_packed",
                 "_cpu_widen_packed", "_cpu_rms_norm", "_cpu_rotary", "_cpu_target_weights"):
        dump = torch._C._dispatch_dump(f"spdkernels::{name}")
        assert any(line.startswith("AutogradCPU:") and "csrc/ops.cpp" in line for line in dump.splitlines()), dump
    dump = torch._C._dispatch_dump("spdkernels::tree_attention").splitlines()
    assert any(line.startswith("AutogradCUDA:") and "csrc/ops.cpp" in line for line in dump), dump
    assert any(line.startswith("Autograd[alias]:") and "_library.py" in line for line in dump), dump


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inference_check_on_cuda():
    """tree_attention's AutogradCUDA kernel (C++ with the extension, else the Python one) refuses q that requires grad,
    and runs it under no_grad."""
    from test_tree_attention import make_batch

    args = [t.cuda() for t in make_batch([2], [9], 4, 2, 16, 16)[:6]]
    q = args[0].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="^q: requires grad"):
        torch.ops.spdkernels.tree_attention(q, *args[1:], None, 0.25)
    with torch.no_grad():
        assert torch.equal(torch.ops.spdkernels.tree_attention(q, *args[1:], None, 0.25),
                           torch.ops.spdkernels.tree_attention(args[0], *args[1:], None, 0.25))
