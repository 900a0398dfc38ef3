"""The NKI kernels (nki_kernels/): a static check of their language, planted bugs that the emulation or the op
tests must catch, clear errors for shapes the kernels do not tile, the registry switch, the bench model.

The op tests (test_verify_greedy.py, test_rejection_sample.py, test_tree_attention.py) run every kernel on the
NumPy emulation as backend 'nki'; on a machine with the official ``nki`` package the last test here runs them on
``nki.simulate`` as well.
"""

import ast
import contextlib
import importlib
import io
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from spdkernels.nki_kernels import _launch, emulation, nki_available

import spdkernels
from spdkernels import _registry, reference, tree
from spdkernels.testing import nki_emulator as emu
from spdkernels.testing import random_draft_batch

KERNELS = ("verify_greedy", "rejection_sample", "tree_attention")
I32 = dict(dtype=torch.int32)


@contextlib.contextmanager
def use_backend(name):
    """The nki backend on the NumPy emulation (CPU tensors), on any machine."""
    assert name == "nki"
    with emulation(), spdkernels.use_backend("nki"):
        yield

# ---- the static check: official NKI (0.3 and later) names, the compiler's Python subset ---------------------

# Public names of nki.language / nki.isa / nki (aws-neuron-sdk nki/api stubs, NKI 0.3-0.6), minus what the
# release notes deprecate or remove (nl.arange/mgrid indexing, nl.divide, the *_range aliases of range).
NL_NAMES = {
    "ndarray", "zeros", "shared_constant", "shared_identity_matrix", "ds", "tile_size", "device_print",
    "program_id", "num_programs", "program_ndim", "load", "store",
    "sbuf", "psum", "hbm", "shared_hbm", "private_hbm",
    "bool_", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float16", "float32", "bfloat16", "tfloat32",
    "float8_e4m3", "float8_e5m2", "float8_e4m3fn",
    "add", "subtract", "multiply", "maximum", "minimum", "equal", "not_equal", "greater", "greater_equal", "less",
    "less_equal", "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or",
    "bitwise_xor", "invert", "left_shift", "right_shift", "abs", "power", "rsqrt", "reciprocal",
    "exp", "log", "copy", "tanh", "sigmoid", "relu", "gelu", "silu", "square", "sqrt",
}
NL_REMOVED = {"arange", "mgrid", "divide", "affine_range", "sequential_range", "static_range", "dynamic_range"}
NISA_NAMES = {
    "dma_copy", "dma_transpose", "dma_compute", "tensor_copy", "memset", "tensor_copy_predicated", "nc_matmul",
    "nc_matmul_mx", "nc_transpose", "tensor_tensor", "tensor_scalar", "tensor_reduce", "tensor_partition_reduce",
    "tensor_scalar_cumulative", "activation", "activation_reduce", "activate2", "iota", "affine_select",
    "local_gather", "nc_n_gather", "bn_stats", "bn_aggr", "tensor_tensor_scan", "nc_stream_shuffle", "rng",
    "dropout", "set_rng_seed", "rand_set_state", "rand_get_state", "rand2", "exponential", "reciprocal", "max8",
    "sequence_bounds", "scalar_tensor_tensor", "tensor_scalar_reduce", "core_barrier", "quantize_mx",
    "range_select", "select_reduce", "sendrecv", "register_alloc", "register_move", "register_load",
    "register_store", "nc_find_index8", "nc_match_replace8", "nonzero_with_count", "topk", "get_nc_version",
    "engine", "reduce_cmd", "dge_mode", "oob_mode", "matmul_perf_mode", "nc_version", "dma_engine",
}
NKI_NAMES = {"jit", "simulate", "language", "isa", "typing"}
ALLOWED_IMPORTS = {"nki": None, "nki.language": "nl", "nki.isa": "nisa", "nki.typing": "nt", "numpy": "np"}
# Python the NKI compiler rejects or these kernels must not use (data-dependent loops run on registers only)
BANNED_NODES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Try, ast.With,
                ast.ClassDef, ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.Await, ast.AsyncFunctionDef,
                ast.While, ast.JoinedStr, ast.Starred)


def kernel_source(stem):
    with open(emu.kernel_path(stem)) as f:
        return f.read()


def static_problems(src):
    """Every breach of the rules above in a kernel file's source."""
    tree_ = ast.parse(src)
    bad = []
    aliases = {}
    for node in tree_.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name not in ALLOWED_IMPORTS or (a.asname or a.name) not in (ALLOWED_IMPORTS[a.name], a.name):
                    bad.append(f"line {node.lineno}: import {a.name}")
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            bad.append(f"line {node.lineno}: from {node.module} import ...")
    known = {"nl": ("nki.language", NL_NAMES), "nisa": ("nki.isa", NISA_NAMES), "nki": ("nki", NKI_NAMES)}
    for node in ast.walk(tree_):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree_.body:
            bad.append(f"{where}: import inside a function")
        if isinstance(node, BANNED_NODES):
            bad.append(f"{where}: {type(node).__name__} is outside the compiler's Python subset")
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            bad.append(f"{where}: 'is' / 'is not'")
        if isinstance(node, ast.FunctionDef):
            a = node.args
            if a.kwonlyargs or a.vararg or a.kwarg:
                bad.append(f"{where}: keyword-only / * / ** parameters in {node.name}")
            for d in node.decorator_list:
                if ast.unparse(d) != "nki.jit":
                    bad.append(f"{where}: decorator {ast.unparse(d)}")
        if isinstance(node, ast.Call):
            for arg in list(node.args) + [k.value for k in node.keywords]:
                if isinstance(arg, ast.List):
                    bad.append(f"{where}: a list literal as an argument (tuples only)")
            if any(k.arg == "mask" for k in node.keywords):
                bad.append(f"{where}: mask= argument")
        if isinstance(node, ast.Dict) and not all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                                  for k in node.keys):
            bad.append(f"{where}: dict keys must be strings")
        if isinstance(node, ast.Name) and "neuronxcc" in node.id:
            bad.append(f"{where}: neuronxcc")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in known:
            mod, names = known[node.value.id]
            if aliases.get(node.value.id) != mod:
                bad.append(f"{where}: {node.value.id} is not {mod}")
            if node.attr in NL_REMOVED and node.value.id == "nl":
                bad.append(f"{where}: nl.{node.attr} is deprecated or removed in NKI 0.3+")
            elif node.attr not in names:
                bad.append(f"{where}: {node.value.id}.{node.attr} is not an official {mod} name")
    # hardware limits are named constants: no bare 128 / 512 inside functions
    for fn in (n for n in ast.walk(tree_) if isinstance(n, ast.FunctionDef)):
        for n in ast.walk(fn):
            if isinstance(n, ast.Constant) and n.value in (128, 512) and not isinstance(n.value, bool):
                bad.append(f"line {n.lineno}: the literal {n.value} in {fn.name} (use the named limit)")
    return bad


def used_names(src, prefix):
    t = ast.parse(src)
    return {n.attr for n in ast.walk(t) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == prefix}


@pytest.mark.parametrize("stem", KERNELS)
def test_kernel_uses_only_official_nki_and_the_compiler_subset(stem):
    src = kernel_source(stem)
    assert static_problems(src) == []
    t = ast.parse(src)
    doc = ast.get_docstring(t) or ""
    assert "Tiling" in doc and "Engine" in doc, "kernel header: tiling, what each tile reads, engines"
    jits = [f for f in t.body if isinstance(f, ast.FunctionDef) and f.decorator_list]
    assert len(jits) == 1
    # every returned output is allocated in shared HBM
    outs = {a.targets[0].id for a in ast.walk(jits[0]) if isinstance(a, ast.Assign)
            and isinstance(a.targets[0], ast.Name) and "buffer=nl.shared_hbm" in ast.unparse(a.value)}
    ret = [n for n in ast.walk(jits[0]) if isinstance(n, ast.Return)][-1].value
    names = [e.id for e in (ret.elts if isinstance(ret, ast.Tuple) else [ret])]
    assert set(names) <= outs, f"returned {names}, shared-HBM allocations {outs}"


def test_static_check_catches_each_rule():
    """The checker itself fails on each forbidden construct (so a green run means something)."""
    base = "import nki\nimport nki.language as nl\nimport nki.isa as nisa\n"
    cases = {
        "import torch\n": "import torch",
        "from nki.language import ndarray\n": "from nki.language",
        "def f(a, *, b):\n    return a\n": "keyword-only",
        "def f(a):\n    return a is None\n": "'is'",
        "def f(a):\n    nisa.iota(dst=a, pattern=[[1, 4]])\n": "list literal",
        "def f(a):\n    return nl.arange(4)\n": "nl.arange is deprecated or removed",
        "def f(a):\n    return nl.divide\n": "nl.divide",
        "def f(a):\n    return nisa.no_such_instruction\n": "not an official nki.isa name",
        "def f(a):\n    return [x for x in a]\n": "ListComp",
        "def f(a):\n    nisa.dma_copy(dst=a, src=a, mask=a)\n": "mask=",
        "def f(a):\n    return {1: a}\n": "dict keys",
        "def f(a):\n    return a[0:128]\n": "the literal 128",
        "def f(a):\n    import numpy\n": "import inside a function",
    }
    for snippet, expect in cases.items():
        problems = static_problems(base + snippet)
        assert any(expect in p for p in problems), (snippet, problems)


def test_emulation_covers_exactly_the_isa_the_kernels_use():
    used = set().union(*(used_names(kernel_source(s), "nisa") for s in KERNELS))
    emulated = {n for n in dir(emu.isa) if not n.startswith("_") and n != "NKIEmulationError"}
    assert used <= emulated
    instructions = {n for n in emulated if callable(getattr(emu.isa, n)) and not isinstance(getattr(emu.isa, n), type)}
    assert instructions <= used, f"emulated but unused: {instructions - used}"
    used_nl = set().union(*(used_names(kernel_source(s), "nl") for s in KERNELS))
    assert used_nl <= set(dir(emu.language))


# ---- planted bugs: the emulation or the op tests catch each one ----------------------------------------------

@pytest.fixture
def planted(monkeypatch, tmp_path):
    """planted(stem, old, new): the kernels of nki_kernels/<stem>.py with ``old`` replaced by ``new``, used by the
    nki backend for the rest of the test."""
    def plant(stem, old, new):
        src = kernel_source(stem)
        assert src.count(old) == 1, old
        path = tmp_path / f"{stem}.py"
        path.write_text(src.replace(old, new))
        mod = emu.load_kernel_module(stem, str(path))
        real = _launch.kernel
        monkeypatch.setattr(_launch, "kernel", lambda s, name, mode: getattr(mod, name) if s == stem
                            else real(s, name, mode))
    return plant


def test_planted_partition_overrun_is_caught(planted):
    """verify_greedy reading one partition past its 128-partition iota tile (130 requests: a full tile)."""
    gen = torch.Generator().manual_seed(1)
    batch = random_draft_batch([2] * 130, 50, gen=gen)
    with use_backend("nki"):
        got = spdkernels.verify_greedy(*batch.args()[:4], max_depth=batch.max_depth)
    assert all(torch.equal(g, w) for g, w in zip(got, reference.verify_greedy(*batch.args())))
    planted("verify_greedy", "_first_index(tidx, x, tmax, iota_v[0:P, 0:w], scratch)",
            "_first_index(tidx, x, tmax, iota_v[0:P + 1, 0:w], scratch)")
    with use_backend("nki"), pytest.raises(emu.NKIEmulationError, match=r"\[0, 129\) of partitions is outside"):
        spdkernels.verify_greedy(*batch.args()[:4], max_depth=batch.max_depth)


def _attention_batch(ctx=600, bs=16):
    gen = torch.Generator().manual_seed(2)
    q_lens = [3]
    nb = (ctx + 3 + bs - 1) // bs + 2
    kc = torch.randn(nb, bs, 1, 64, generator=gen)
    vc = torch.randn(nb, bs, 1, 64, generator=gen)
    bt = torch.randperm(nb, generator=gen)[None, : nb - 2].to(torch.int32)
    q = torch.randn(3, 4, 64, generator=gen)
    mask = tree.build_tree_mask(torch.tensor([-1, 0], **I32), torch.tensor([0, 2], **I32))
    return [q, kc, vc, bt, torch.tensor([ctx + 3], **I32), torch.tensor([0, 3], **I32), mask], q_lens


def test_planted_matmul_moving_tile_over_512_is_caught(planted):
    """tree_attention with score tiles of 1024 positions: the moving operand of Q K^T exceeds a PSUM bank."""
    args, _ = _attention_batch()
    want = reference.tree_attention(*args)
    with use_backend("nki"):
        torch.testing.assert_close(spdkernels.tree_attention(*args), want, rtol=1e-4, atol=1e-5)
    planted("tree_attention", "KV_TILE = 512  #", "KV_TILE = 1024  #")
    with use_backend("nki"), pytest.raises(emu.NKIEmulationError, match="moving free size 608 exceeds 512"):
        spdkernels.tree_attention(*args)


def test_planted_residual_not_renormalised_is_caught(planted):
    """rejection_sample keeping max(0, p - q) without dividing by its mass: the same coins no longer give the
    reference's tokens (the comparison of test_rejection_sample's sweep)."""
    gen = torch.Generator().manual_seed(3)
    R, V, k = 256, 12, 4
    batch = random_draft_batch([k] * R, V, tree=True, gen=gen)
    batch.parents = torch.full((R * k,), -1, **I32)  # siblings: each rejection leaves a residual for the next
    batch.max_depth = 1
    # drafts drawn from q, a blurred copy of the target's root row, as a real drafter's would be
    root = batch.target_logits[torch.arange(R) * (k + 1)]
    q = torch.softmax(root.repeat_interleave(k, 0) * 0.5 + torch.randn(R * k, V, generator=gen), -1)
    batch.draft_token_ids = torch.multinomial(q, 1, generator=gen)[:, 0]
    u = torch.rand(batch.N + R, generator=gen).clamp(1e-6, 1 - 1e-6)
    want = reference.rejection_sample(*batch.args()[:4], q, None, None, None, u, batch.max_depth)

    def differing():
        with use_backend("nki"):
            got = spdkernels.rejection_sample(*batch.args()[:3], parents=batch.parents, draft_probs=q, uniforms=u,
                                              max_depth=batch.max_depth)
        return int((~((got[0] == want[0]).all(1) & (got[1] == want[1]))).sum())

    assert differing() == 0
    planted("rejection_sample", "nisa.reciprocal(dst=rs, data=rs)", "nisa.memset(dst=rs, value=1.0)")
    assert differing() > R // 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bs", [16, 128])
def test_tree_attention_prefix_over_several_score_tiles(dtype, bs):
    """A prefix of 1100 positions spans three 512-position score tiles (the online softmax carries across them)
    and, with G * q_len > 128, the query tokens of a request are split into two work items."""
    from test_tree_attention import check_close, make_batch

    args = make_batch([40, 5], [1100, 37], 16, 4, 64, bs, dtype, False, torch.Generator().manual_seed(bs))
    args = [a.cpu() if a is not None else None for a in args]
    want = reference.tree_attention(*args)
    with use_backend("nki"):
        got = spdkernels.tree_attention(*args)
    check_close(got, want)


@pytest.mark.parametrize("V,filters,dtype", [(5000, True, torch.float32), (32000, False, torch.bfloat16)],
                         ids=["V5000-topk-topp-fp32", "V32000-bf16"])
def test_rejection_sample_streams_rows_over_several_vocabulary_tiles(V, filters, dtype):
    """Rows wider than one 2048-column tile: statistics, threshold passes, scratch rows and the inverse CDF carry
    across tiles. Same coins, same tokens as the reference (trees, draft distributions, a greedy request)."""
    gen = torch.Generator().manual_seed(V)
    R = 5
    batch = random_draft_batch([3, 0, 4, 2, 3], V, tree=True, dtype=dtype, gen=gen, match_prob=0.5)
    kw = dict(temperature=torch.tensor([0.8, 1.0, 0.0, 1.3, 0.6]),
              uniforms=torch.rand(batch.N + R, generator=gen).clamp(1e-6, 1 - 1e-6),
              draft_probs=torch.softmax(torch.randn(batch.N, V, generator=gen) * 3, -1))
    if filters:
        kw.update(top_k=torch.tensor([50, 0, 7, 3000, 0], **I32), top_p=torch.tensor([0.9, 0.5, 1.0, 0.95, 1.0]))
    want = reference.rejection_sample(*batch.args()[:4], kw["draft_probs"], kw["temperature"], kw.get("top_k"),
                                      kw.get("top_p"), kw["uniforms"], batch.max_depth)
    with use_backend("nki"):
        got = spdkernels.rejection_sample(*batch.args()[:3], parents=batch.parents, max_depth=batch.max_depth, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---- shapes the kernels do not tile: a clear error, never a wrong answer --------------------------------------

def test_shapes_beyond_the_kernels_raise_value_errors(monkeypatch):
    args, _ = _attention_batch(ctx=20)
    with use_backend("nki"):
        big_d = [torch.randn(3, 4, 256), torch.randn(*args[1].shape[:3], 256), torch.randn(*args[2].shape[:3], 256)]
        with pytest.raises(ValueError, match="q: head dim 256 exceeds the 128 partitions"):
            spdkernels.tree_attention(*big_d, *args[3:])
        kc = torch.randn(2, 256, 1, 64)
        with pytest.raises(ValueError, match="k_cache: block size 256"):
            spdkernels.tree_attention(args[0], kc, kc.clone(), torch.zeros(1, 1, **I32), args[4], args[5], args[6])
        q = torch.randn(130, 4, 64)
        kc = torch.randn(12, 16, 1, 64)
        with pytest.raises(ValueError, match="cu_q_lens: a request has 130 query tokens"):
            spdkernels.tree_attention(q, kc, kc.clone(), torch.arange(12, **I32)[None], torch.tensor([150], **I32),
                                      torch.tensor([0, 130], **I32))
        monkeypatch.setattr(_launch, "MAX_FLAT_INDEX", 1000)  # (2**31 elements would not fit this machine)
        b = random_draft_batch([2], 600)
        with pytest.raises(ValueError, match=r"target_logits: .*int32 element indices: max\(R, N\) \* V"):
            spdkernels.rejection_sample(*b.args()[:3], max_depth=b.max_depth, seed=torch.tensor([1]))


def test_threshold_search_that_cannot_close_raises(monkeypatch, planted):
    """With one bisection pass the top-k threshold of a row with close values stays open: an error, not tokens."""
    planted("rejection_sample", "THRESHOLD_PASSES = 32", "THRESHOLD_PASSES = 1")
    b = random_draft_batch([1], 300, gen=torch.Generator().manual_seed(4))
    with use_backend("nki"), pytest.raises(RuntimeError, match="threshold search did not close"):
        spdkernels.rejection_sample(*b.args()[:3], max_depth=b.max_depth, top_k=torch.tensor([7], **I32),
                                    seed=torch.tensor([1]))


# ---- the automatic choice past the kernels' limits: the next backend, not an error -----------------------------

@pytest.fixture
def nki_first_on_cpu(monkeypatch):
    """The automatic order on CPU made (emulated nki, torch), as on a Neuron device; the Python kernels that torch's
    dispatcher runs there are called directly (on CPU the C++ extension's kernels hold the dispatcher's CPU key)."""
    from spdkernels.ops._common import PYTHON_KERNELS

    monkeypatch.setitem(_registry._AUTO_ORDER, "cpu", ("nki", "torch"))
    monkeypatch.setattr(_registry, "_logged", set())
    with emulation():
        assert _registry.resolve("tree_attention", torch.device("cpu"), None)[0] == "nki"
        yield PYTHON_KERNELS


def _on_torch(op, *args, **kw):
    with spdkernels.use_backend("torch"):
        return getattr(spdkernels, op)(*args, **kw)


def test_automatic_choice_runs_torch_for_attention_past_the_nki_limits(nki_first_on_cpu, monkeypatch, caplog):
    args, _ = _attention_batch(ctx=20)
    kernel = nki_first_on_cpu["tree_attention"]
    want = _on_torch("tree_attention", *args)
    runs = emu.RunStats.runs
    inside = kernel(*args, None, None, None, None)  # head dim 64: within the limits, the NKI kernel runs
    assert emu.RunStats.runs > runs
    torch.testing.assert_close(inside, want, rtol=2e-5, atol=2e-5)
    monkeypatch.setattr(_launch, "MAX_HEAD_DIM", 32)  # now past them: the torch backend runs it, logged once
    runs = emu.RunStats.runs
    with caplog.at_level("WARNING", logger="spdkernels"):
        for _ in range(2):
            assert torch.equal(kernel(*args, None, None, None, None), want)
    assert emu.RunStats.runs == runs
    logged = [r.getMessage() for r in caplog.records if "cannot take an input" in r.getMessage()]
    assert len(logged) == 1 and "q: head dim 64 exceeds the 32 partitions" in logged[0] and "'torch'" in logged[0]
    with spdkernels.use_backend("nki"), pytest.raises(spdkernels.BackendLimitError, match="q: head dim 64"):
        kernel(*args, None, None, None, None)  # a forced backend never falls back
    with spdkernels.use_backend("torch"):  # another backend forced: the dispatcher's kernel (automatic) falls back
        assert torch.equal(kernel(*args, None, None, None, None), want)
    # a malformed layout is named as such, before the limits (forced: no fallback could name it instead)
    bad = list(args)
    bad[4] = torch.tensor([2], **I32)
    with spdkernels.use_backend("nki"), pytest.raises(ValueError, match="kv_lens: request 0 has kv_len 2 < its 3"):
        kernel(*bad, None, None, None, None)
    no_request = [*args[:3], args[3][:0], args[4][:0], torch.tensor([0], **I32), None]  # 3 query tokens, no request
    with spdkernels.use_backend("nki"), pytest.raises(ValueError, match="cu_q_lens: last entry must equal"):
        kernel(*no_request, None, None, None, None)  # (an early empty answer, uninitialised, before)


def test_more_query_heads_per_kv_head_than_partitions_fall_back(nki_first_on_cpu):
    """256 query heads on one KV head: past the tile the NKI kernel lays one token's heads on (its loop step was 0:
    'range() arg 3 must not be zero', no argument named)."""
    args, _ = _attention_batch(ctx=20)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 256, 8, generator=gen)
    kc, vc = torch.randn(*args[1].shape[:3], 8, generator=gen), torch.randn(*args[2].shape[:3], 8, generator=gen)
    full = [q, kc, vc, *args[3:]]
    got = nki_first_on_cpu["tree_attention"](*full, None, None, None, None)
    assert torch.equal(got, _on_torch("tree_attention", *full))
    with spdkernels.use_backend("nki"), pytest.raises(spdkernels.BackendLimitError,
                                                      match="q: 256 query heads per KV head exceed"):
        nki_first_on_cpu["tree_attention"](*full, None, None, None, None)


def test_automatic_choice_runs_torch_for_verification_past_the_nki_limits(nki_first_on_cpu, monkeypatch):
    b = random_draft_batch([3, 0, 2], 17, tree=True, gen=torch.Generator().manual_seed(6))
    monkeypatch.setattr(_launch, "FP32_EXACT_INT", 17)  # V = 17 is now past the ids' exact range
    got = nki_first_on_cpu["verify_greedy"](*b.args()[:4], b.max_depth)
    assert all(torch.equal(g, w) for g, w in zip(got, reference.verify_greedy(*b.args())))
    with spdkernels.use_backend("nki"), pytest.raises(spdkernels.BackendLimitError, match="target_logits: .*2\\*\\*24"):
        nki_first_on_cpu["verify_greedy"](*b.args()[:4], b.max_depth)
    bad = list(b.args()[:4])  # malformed offsets are named before the limit
    bad[2] = torch.tensor([0, 4, 3, 5], **I32)
    with spdkernels.use_backend("nki"), pytest.raises(ValueError, match="cu_num_draft") as e:
        nki_first_on_cpu["verify_greedy"](*bad, b.max_depth)
    assert not isinstance(e.value, spdkernels.KernelLimit)
    with spdkernels.use_backend("nki"), pytest.raises(ValueError, match="cu_num_draft") as e:
        nki_first_on_cpu["rejection_sample"](*bad, None, None, None, None, None, torch.tensor([1, 2, 3]),
                                             torch.tensor([0, 0, 0]), b.max_depth, None, False)
    assert not isinstance(e.value, spdkernels.KernelLimit)
    monkeypatch.setattr(_launch, "FP32_EXACT_INT", 2 ** 24)
    monkeypatch.setattr(_launch, "MAX_DRAFT_NODES", 2)  # 3 nodes in a request: past the slot tables' SBUF budget
    got = nki_first_on_cpu["rejection_sample"](*b.args()[:4], None, None, None, None, None, torch.tensor([1, 2, 3]),
                                               torch.tensor([0, 0, 0]), b.max_depth, None, False)
    want = _on_torch("rejection_sample", *b.args()[:3], parents=b.parents, max_depth=b.max_depth,
                     seed=torch.tensor([1, 2, 3]))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with spdkernels.use_backend("nki"), pytest.raises(spdkernels.BackendLimitError, match="cu_num_draft: a request "
                                                                                         "has 3 draft nodes"):
        nki_first_on_cpu["verify_greedy"](*b.args()[:4], b.max_depth)


def test_automatic_choice_runs_torch_where_the_nki_search_cannot_close(nki_first_on_cpu, planted):
    """The threshold search of test_threshold_search_that_cannot_close_raises, automatic: the torch backend answers,
    with the same coins (seeded), so the tokens equal a torch run's."""
    planted("rejection_sample", "THRESHOLD_PASSES = 32", "THRESHOLD_PASSES = 1")
    b = random_draft_batch([1], 300, gen=torch.Generator().manual_seed(4))
    kw = dict(top_k=torch.tensor([7], **I32), seed=torch.tensor([1]), offset=torch.tensor([0]))
    want = _on_torch("rejection_sample", *b.args()[:3], max_depth=b.max_depth, **kw)
    runs = emu.RunStats.runs
    got = nki_first_on_cpu["rejection_sample"](*b.args()[:3], None, None, None, kw["top_k"], None, None, kw["seed"],
                                               kw["offset"], b.max_depth, None, False)
    assert emu.RunStats.runs > runs  # the NKI kernel ran first, then gave up
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- the registry switch and the bench model ----------------------------------------------------------------

def test_env_switch_makes_the_nki_backend_available_on_cpu(monkeypatch):
    b = random_draft_batch([3, 0, 2], 17, tree=True, gen=torch.Generator().manual_seed(5))
    monkeypatch.delenv("SPDKERNELS_NKI_EMULATE", raising=False)
    _registry._resolved.clear()
    assert "nki" not in spdkernels.available_backends("cpu")
    monkeypatch.setenv("SPDKERNELS_NKI_EMULATE", "1")
    _registry._resolved.clear()
    try:
        assert "nki" in spdkernels.available_backends("cpu", op="tree_attention")
        assert _registry.resolve("verify_greedy", torch.device("cpu"))[0] == "cpp" or "cpp" not in \
            spdkernels.available_backends("cpu")  # never chosen automatically
        before = emu.RunStats.runs
        with spdkernels.use_backend("nki"):
            got = spdkernels.verify_greedy(*b.args()[:4], max_depth=b.max_depth)
        assert emu.RunStats.runs > before
        assert all(torch.equal(g, w) for g, w in zip(got, reference.verify_greedy(*b.args())))
    finally:
        monkeypatch.delenv("SPDKERNELS_NKI_EMULATE")
        _registry._resolved.clear()


def test_bench_prints_the_nki_model_labelled_as_a_model():
    from spdkernels.bench import cli

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["--backend", "nki", "--shapes", "tiny", "--no-progress"])
    text = buf.getvalue()
    assert rc == 0
    assert "A MODEL, NOT A MEASUREMENT" in text and "trn1" in text and "trn2" in text
    for op in KERNELS:
        assert op in text
    rows = cli.nki_model_rows([(cli.load_all()["verify_greedy"], dict(R=2, k=3, V=1000, dtype="fp32", tree=False),
                                [])])
    assert rows[0]["bytes"] == 2 * 4 * 1000 * 4 + 2 * 4 * 4 + 2 * 2 * 3 * 4 + 2 * 2 * 5 * 4 + 2 * 4
    assert rows[0]["trn1_lower_bound_us"] == pytest.approx(rows[0]["bytes"] / 410e9 * 1e6)


# ---- the official simulator, where the nki package is installed ------------------------------------------

@pytest.mark.skipif(not (nki_available()[0] and hasattr(importlib.import_module("nki") if nki_available()[0]
                                                        else object(), "simulate")),
                    reason="the official nki package (Neuron package index) is not installed here")
def test_kernels_on_the_official_simulator(monkeypatch):
    monkeypatch.setenv("SPDKERNELS_NKI_SIMULATE", "1")
    monkeypatch.delenv("SPDKERNELS_NKI_EMULATE", raising=False)
    _registry._resolved.clear()
    try:
        b = random_draft_batch([3, 0, 5], 300, tree=True, gen=torch.Generator().manual_seed(6))
        with spdkernels.use_backend("nki"):
            got = spdkernels.verify_greedy(*b.args()[:4], max_depth=b.max_depth)
            assert all(torch.equal(g, w) for g, w in zip(got, reference.verify_greedy(*b.args())))
            u = torch.rand(b.N + 3, generator=torch.Generator().manual_seed(7)).clamp(1e-6, 1 - 1e-6)
            got = spdkernels.rejection_sample(*b.args()[:3], parents=b.parents, uniforms=u, max_depth=b.max_depth)
            want = reference.rejection_sample(*b.args()[:4], None, None, None, None, u, b.max_depth)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
            args, _ = _attention_batch(ctx=40)
            torch.testing.assert_close(spdkernels.tree_attention(*args), reference.tree_attention(*args),
                                       rtol=1e-4, atol=1e-5)
    finally:
        _registry._resolved.clear()


def test_no_kernel_module_is_imported_on_the_runtime_path():
    """Importing spdkernels (and running other backends) never imports the kernels or the emulation."""
    code = ("import sys, spdkernels, torch; spdkernels.verify_greedy(torch.zeros(2, 4), torch.zeros(1, "
            "dtype=torch.int64), torch.tensor([0, 1], dtype=torch.int32)); "
            "print([m for m in sys.modules if 'nki_kernels.' in m or 'nki_emulator' in m or m == 'nki'])")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SPDKERNELS_NKI_EMULATE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_launcher_coins_equal_reference_coins():
    """The coins the NKI launcher computes from seed/offset with torch ops are the reference's, bit for bit, over
    64-bit seeds and offsets (negative ones included)."""
    gen = torch.Generator().manual_seed(21)
    n = 64
    seed = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    offset = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    seed[:3] = torch.tensor([0, 1, 2**62])
    offset[:3] = torch.tensor([0, 2**33, 7])
    index = torch.randint(0, 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
    for stream in (0, 1):
        got = _launch.philox_uniforms(seed, offset, index, stream)
        want = [reference.philox_uniform(s, o, i, stream) for s, o, i in zip(seed.tolist(), offset.tolist(),
                                                                            index.tolist())]
        assert got.tolist() == want


def test_emulated_bf16_argument_is_exact():
    x = torch.randn(3, 5).bfloat16()
    arg = _launch._to_emulator(x)
    assert arg.dtype == "bfloat16" and np.array_equal(arg.array, x.float().numpy())
