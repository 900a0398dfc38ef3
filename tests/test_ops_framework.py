"""The op framework: torch.library registration (opcheck, torch.compile) and the backend registry."""

import contextlib
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, backends_here, cpp_dispatch, to_backend, use_backend

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


@pytest.mark.parametrize("backend", backends_here() + cpp_dispatch())
def test_opcheck(backend):
    with use_backend(backend):
        for op, args in sample_inputs():
            if backend.split("-")[0] in spdkernels.available_backends(DEVICE, op=op._schema.name.split("::")[1]):
                torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", [None] + cpp_dispatch())
def test_torch_compile_fullgraph(backend):
    with use_backend(backend) if backend else contextlib.nullcontext():
        _compile_fullgraph()


def _compile_fullgraph():
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


# ---- the C++ dispatcher kernels (spdkernels/_C_ops.so) ----------------------------------------------

needs_c_ops = pytest.mark.skipif(not cpp_dispatch(), reason="the C++ extension is not built here "
                                 "(SPDKERNELS_SKIP_CPP or SPDKERNELS_SKIP_TORCH_OPS set)")


@needs_c_ops
def test_c_ops_fast_path_follows_validation_and_backend():
    from spdkernels import _cpp

    assert _cpp.load_ops() is not None, _cpp.ops_load_error()
    ops = _cpp.FAST_OPS
    assert not any(_cpp.fast_path(op) for op in ops)  # validation is on (the tests' default)
    spdkernels.set_validation(False)
    assert all(_cpp.fast_path(op) for op in ops)  # the automatic choice on CPU is cpp
    with spdkernels.use_backend("torch"):
        assert not any(_cpp.fast_path(op) for op in ops)
    assert all(_cpp.fast_path(op) for op in ops)
    spdkernels.set_backend("torch")
    assert not any(_cpp.fast_path(op) for op in ops)
    spdkernels.set_backend("cpp")
    assert all(_cpp.fast_path(op) for op in ops)
    with spdkernels.validation(True):
        assert not any(_cpp.fast_path(op) for op in ops)
    assert all(_cpp.fast_path(op) for op in ops)


def _rs_args(b, **kw):
    max_depth = kw.pop("max_depth", b.max_depth)
    a = dict(parents=b.parents, draft_probs=None, temperature=None, top_k=None, top_p=None, uniforms=None,
             seed=torch.arange(b.R), offset=None)
    a.update(kw)
    return (b.target_logits, b.draft_token_ids, b.cu_num_draft, *a.values(), max_depth)


@needs_c_ops
def test_c_ops_run_well_formed_calls_and_send_the_rest_to_python():
    """With validation off, a well-formed call runs in C++; any other call goes to the Python kernel, which
    gives the same result (a layout the C++ kernel does not take) or the same ValueError as with no _C_ops."""
    from spdkernels import _cpp

    gen = torch.Generator().manual_seed(5)
    b = random_draft_batch([3, 0, 4], 40, tree=True, gen=gen, match_prob=0.7)
    rs, vg = torch.ops.spdkernels.rejection_sample.default, torch.ops.spdkernels.verify_greedy.default
    want_rs = rs(*_rs_args(b))  # validation on: the Python path
    want_vg = vg(*b.args())

    def calls():
        return _cpp.op_calls("rejection_sample") + _cpp.op_calls("verify_greedy")

    def path_of(fn):
        c0 = calls()
        out = fn()
        d = [x - y for x, y in zip(calls(), c0)]
        return out, ("cpp" if d == [0, 1, 0, 0] or d == [0, 0, 0, 1] else
                     "python" if d == [1, 0, 0, 0] or d == [0, 0, 1, 0] else d)

    spdkernels.set_validation(False)
    for fn, want in ((lambda: rs(*_rs_args(b)), want_rs), (lambda: vg(*b.args()), want_vg)):
        got, path = path_of(fn)
        assert path == "cpp" and all(torch.equal(g, w) for g, w in zip(got, want))
    # offset omitted (zeros) and offset given as zeros: the same coins
    got, path = path_of(lambda: rs(*_rs_args(b, offset=torch.zeros(b.R, dtype=torch.int64))))
    assert path == "cpp" and all(torch.equal(g, w) for g, w in zip(got, want_rs))
    # logits with a column stride: Python makes them contiguous, same result
    strided = b.target_logits.t().contiguous().t()
    got, path = path_of(lambda: vg(strided, *b.args()[1:]))
    assert path == "python" and all(torch.equal(g, w) for g, w in zip(got, want_vg))
    # malformed calls: Python's ValueError, named as always
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
    }
    for name, fn in bad.items():
        c0 = calls()
        with pytest.raises(ValueError, match=name):
            fn()
        d = [x - y for x, y in zip(calls(), c0)]
        assert d[1] == d[3] == 0 and d[0] + d[2] == 1, (name, d)


def test_c_ops_load_only_into_the_torch_they_were_built_for():
    from spdkernels._cpp import ops_compatible

    meta = {"torch_version": "2.13.0+cpu", "cxx11_abi": 1}
    assert ops_compatible(meta, "2.13.0+cpu", True) is None
    assert "built for torch 2.13.0+cpu" in ops_compatible(meta, "2.14.1+cu128", True)
    assert "ABI" in ops_compatible(meta, "2.13.0+cpu", False)


@needs_c_ops
def test_ops_work_with_c_ops_switched_off():
    code = ("import torch, spdkernels; from spdkernels import _cpp\n"
            "spdkernels.set_validation(False)\n"
            "out = spdkernels.verify_greedy(torch.tensor([[0., 2.]]), torch.zeros(0, dtype=torch.int64),"
            " torch.tensor([0, 0], dtype=torch.int32))\n"
            "print(out[0].tolist(), _cpp.fast_path('verify_greedy'), _cpp.ops_load_error())")
    env = {k: v for k, v in os.environ.items() if k not in ("SPDKERNELS_BACKEND", "TRITON_INTERPRET")}
    env["SPDKERNELS_NO_C_OPS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[[1]] False SPDKERNELS_NO_C_OPS is set"


@needs_c_ops
def test_c_ops_concurrent_calls_and_inference_mode():
    """Serving threads call the op at once (the GIL is released inside the dispatcher; each OS thread has its
    own kernel scratch), and under torch.inference_mode: every call equals the single-threaded result."""
    import threading

    from spdkernels import _cpp

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
    fast_before = _cpp.op_calls("rejection_sample")[1]
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
    for t, outs in got.items():
        for out in outs:
            assert all(torch.equal(g, w) for g, w in zip(out, want[t % 2]))
    assert _cpp.op_calls("rejection_sample")[1] - fast_before == 80
