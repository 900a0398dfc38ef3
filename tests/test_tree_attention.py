"""tree_attention against the reference (tolerance table), mask semantics, and validation."""

import math

import pytest
import torch
from conftest import DEVICE, backends_here, cpp_lower_isas, nki_emulated, to_backend, use_backend

import spdkernels
from spdkernels import reference, tree

# every backend that should run here; a backend that cannot load fails the run instead of disappearing
BACKENDS = backends_here() + nki_emulated()  # nki: the NKI kernel on the NumPy emulation
WITH_ISAS = BACKENDS + cpp_lower_isas()  # the C++ kernel's lower instruction-set paths too (AVX2, baseline)
I32 = dict(dtype=torch.int32)

# relative RMS error and max error (relative to max |reference|) allowed per dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.5e-2, 4e-2), torch.float16: (2e-3, 5e-3)}


def make_batch(q_lens, ctx, Hq=8, Hkv=2, D=64, bs=16, dtype=torch.float32, chain=False, gen=None, spare_blocks=3):
    """Random paged batch: request r has ctx[r] committed positions then q_lens[r] query tokens (a random
    tree, or a chain); pages shuffled over the cache."""
    gen = gen or torch.Generator().manual_seed(0)
    R = len(q_lens)
    kv = [c + q for c, q in zip(ctx, q_lens)]
    nbs = [(x + bs - 1) // bs for x in kv]
    nb = sum(nbs) + spare_blocks
    perm = torch.randperm(nb, generator=gen)
    bt = torch.zeros(R, max(nbs + [1]), **I32)
    i = 0
    for r, n in enumerate(nbs):
        bt[r, :n] = perm[i:i + n]
        i += n
    kc = torch.randn(nb, bs, Hkv, D, generator=gen).to(dtype)
    vc = torch.randn(nb, bs, Hkv, D, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), Hq, D, generator=gen).to(dtype)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), **I32)
    ks = [x - 1 for x in q_lens]
    par = []
    for k in ks:
        par += [int(torch.randint(-1, i, (1,), generator=gen)) if i > 0 else -1 for i in range(k)]
    cund = torch.tensor([0] + torch.tensor(ks).cumsum(0).tolist(), **I32)
    mask = None if chain else tree.build_tree_mask(torch.tensor(par, **I32), cund)
    args = [q, kc, vc, bt, torch.tensor(kv, **I32), cu_q, mask]
    return [a.to(DEVICE) if a is not None else None for a in args]


def run(backend, args, **kw):
    """The op on ``backend`` with every tensor argument on that backend's device (CUDA for Triton on a GPU
    machine); the output comes back on the CPU."""
    args = to_backend(backend, list(args))
    with use_backend(backend):
        return spdkernels.tree_attention(*args, **kw).cpu()


def check_close(got, want):
    rms_tol, max_tol = TOL[want.dtype]
    g, w = got.float().cpu(), want.float().cpu()
    rel_rms = float((g - w).norm() / w.norm().clamp(min=1e-30))
    rel_max = float((g - w).abs().max() / w.abs().max().clamp(min=1e-30))
    assert rel_rms <= rms_tol and rel_max <= max_tol, f"rel RMS {rel_rms:.2e}, rel max {rel_max:.2e}"


CASES = [
    # q_lens, ctx, Hq, Hkv, D, bs, chain
    ([1, 1, 1], [37, 5, 80], 8, 8, 64, 16, True),        # plain decode, MHA
    ([8, 3, 1], [50, 17, 0], 8, 2, 64, 16, False),       # trees, GQA 4, a request with no prefix
    ([8, 5], [30, 100], 8, 1, 128, 16, True),            # chains, MQA (group 8), D 128
    ([64], [21], 4, 4, 64, 16, False),                   # a 64-node tree (two mask words... one: 64 bits)
    ([33, 2], [200, 9], 4, 1, 64, 128, False),           # block size 128, partly filled last blocks
    ([9], [0], 8, 2, 64, 16, False),                     # no prefix at all
    ([5], [300], 8, 1, 64, 16, False),                   # one request, one KV head: the cpp path splits the KV
    ([3, 7], [45, 70], 6, 2, 80, 16, False),             # GQA 3, D 80 (not a multiple of 32: cpp column tails)
    ([4], [130], 4, 2, 36, 32, False),                   # D 36 (not a multiple of 8: cpp scalar columns)
]


@pytest.mark.parametrize("backend", WITH_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(backend, dtype, case):
    q_lens, ctx, Hq, Hkv, D, bs, chain = CASES[case]
    args = make_batch(q_lens, ctx, Hq, Hkv, D, bs, dtype, chain, torch.Generator().manual_seed(case))
    want = reference.tree_attention(*[a.cpu() if a is not None else None for a in args])
    got = run(backend, args)
    assert got.dtype == dtype and got.shape == args[0].shape
    check_close(got, want)


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_triton_split_kv_matches_reference(splits):
    """Flash-decoding path (partial outputs + log-sum-exp merge), forced on small shapes."""
    from spdkernels.triton_kernels.tree_attention import tree_attention as k

    args = make_batch([4, 1, 6], [90, 3, 150], 8, 2, 64, 16, torch.float32, False, torch.Generator().manual_seed(7))
    want = reference.tree_attention(*[a.cpu() if a is not None else None for a in args])
    got = k(*args, 1 / math.sqrt(64), num_splits=splits)
    check_close(got, want)


@pytest.mark.parametrize("threads", [2, 3, 4, 7])
def test_cpp_split_kv_matches_reference(threads):
    """The C++ flash-decoding path: (request, KV head) items split over more threads than items, merged
    from partial (m, l, acc) states. 205 positions make 4 tiles of 64, so the long request splits into up to
    4 chunks; the short one (13 positions) gets empty chunks."""
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ extension runs on CPU tensors only")
    args = make_batch([5, 3], [200, 10], 8, 1, 64, 16, torch.float32, False, torch.Generator().manual_seed(11))
    want = reference.tree_attention(*[a.cpu() if a is not None else None for a in args])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run("cpp", args)
    finally:
        torch.set_num_threads(old)
    check_close(got, want)


def test_scale_argument():
    args = make_batch([3], [10], gen=torch.Generator().manual_seed(3))
    want = reference.tree_attention(*[a.cpu() if a is not None else None for a in args], scale=0.3)
    for b in BACKENDS:
        check_close(run(b, args, scale=0.3), want)
    out = torch.empty_like(args[0])
    res = spdkernels.tree_attention(*args, scale=0.3, out=out)
    assert res is out
    check_close(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_semantics_exactly(backend):
    """Changing K/V at a position a query must not see leaves its output unchanged bit for bit; changing
    one it must see changes it."""
    gen = torch.Generator().manual_seed(5)
    q_lens, ctx = [6], [20]
    args = make_batch(q_lens, ctx, 4, 2, 64, 16, torch.float32, False, gen)
    parents = [-1, 0, 0, 2, -1]  # local query j = node j - 1; query 0 is the root
    cund = torch.tensor([0, 5], **I32)
    args[6] = tree.build_tree_mask(torch.tensor(parents, **I32), cund).to(DEVICE)
    base = run(backend, args)
    P = ctx[0]
    bt = args[3].cpu()
    visible = {0: {0}, 1: {0, 1}, 2: {0, 1, 2}, 3: {0, 1, 3}, 4: {0, 1, 3, 4}, 5: {0, 5}}
    for j in range(6):  # perturb the K and V of local query token j
        kc, vc = args[1].clone(), args[2].clone()
        pos = P + j
        blk = int(bt[0, pos // 16])
        kc[blk, pos % 16] += 3.0
        vc[blk, pos % 16] -= 2.0
        out = run(backend, [args[0], kc, vc] + args[3:])
        for i in range(6):
            same = torch.equal(out[i], base[i])
            assert same == (j not in visible[i]), f"query {i} vs perturbed token {j}"
    # and a prefix position is seen by every query
    kc = args[1].clone()
    kc[int(bt[0, 0]), 3] += 3.0
    out = run(backend, [args[0], kc] + args[2:])
    assert all(not torch.equal(out[i], base[i]) for i in range(6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_kv_cache_views(backend):
    """K and V as views of one fused cache [num_blocks, block_size, 2, Hkv, D] (block and slot strides twice the
    contiguous ones), the other half filled with NaN: a kernel that ignored the strides would read NaN. Same result
    as the contiguous caches."""
    args = make_batch([5, 2], [40, 9], 8, 2, 64, 16, torch.float32, False, torch.Generator().manual_seed(8))
    kc, vc = args[1], args[2]
    fused = torch.full((kc.shape[0], kc.shape[1], 2, *kc.shape[2:]), float("nan"), device=kc.device)
    fused[:, :, 0], fused[:, :, 1] = kc, vc
    kv = to_backend(backend, fused)
    k_view, v_view = to_backend(backend, kv[:, :, 0]), to_backend(backend, kv[:, :, 1])
    assert not k_view.is_contiguous() and k_view.stride(-1) == 1
    want = reference.tree_attention(*[a.cpu() if a is not None else None for a in args])
    check_close(run(backend, [args[0], k_view, v_view] + args[3:]), want)


def test_triton_reads_strided_kv_caches_in_place(monkeypatch):
    """The Triton wrapper hands strided caches to its kernel as they are (no .contiguous() copy of the cache)."""
    from spdkernels.triton_kernels import tree_attention as k

    args = to_backend("triton", make_batch([3], [20], 4, 2, 64, 16, torch.float32, False,
                                           torch.Generator().manual_seed(9)))
    fused = torch.stack([args[1], args[2]], dim=2)
    k_view, v_view = fused[:, :, 0], fused[:, :, 1]
    seen = {}

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen["k"], seen["v"] = a[1], a[2]
                return kernel[grid](*a, **kw)
            return launch

    kernel = k._tree_attn_kernel
    monkeypatch.setattr(k, "_tree_attn_kernel", Spy())
    k.tree_attention(args[0], k_view, v_view, *args[3:], 0.125)
    assert seen["k"].data_ptr() == k_view.data_ptr() and seen["v"].data_ptr() == v_view.data_ptr()
    assert seen["k"].stride() == k_view.stride()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")
def test_cpp_reads_strided_kv_caches_in_place():
    """The cpp kernel reads strided caches (K and V views of one fused cache) in place: no copy op runs, and the
    result equals the contiguous caches'. A cache whose head dim is not unit-stride is copied, and the profile
    shows it (the check can see a copy)."""
    args = make_batch([3], [20], 4, 2, 64, 16, torch.float32, False, torch.Generator().manual_seed(9))
    fused = torch.stack([args[1], args[2]], dim=2)
    k_view, v_view = fused[:, :, 0], fused[:, :, 1]
    assert not k_view.is_contiguous()

    def copies(k, v):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = spdkernels.tree_attention(args[0], k, v, *args[3:])
        names = {e.name for e in prof.events()}
        return out, names & {"aten::copy_", "aten::clone", "aten::contiguous"}

    with use_backend("cpp"), spdkernels.validation(False):
        got, seen = copies(k_view, v_view)
        assert not seen, seen
        torch.testing.assert_close(got, spdkernels.tree_attention(*args), rtol=0, atol=0)
        k_t = args[1].transpose(1, 3).contiguous().transpose(1, 3)  # head dim strided
        _, seen = copies(k_t, args[2])
        assert seen, "a copy of a cache with a strided head dim went unseen"


# ---- validation -------------------------------------------------------------------------------------

def good():
    return make_batch([3, 2], [20, 4], 4, 2, 64, 16, torch.float32, False, torch.Generator().manual_seed(1))


def _with(i, value, *more):
    """good()'s arguments with argument i replaced by ``value`` (and more pairs of index, value), every tensor on
    good()'s device: each case fails its own check, not the device check."""
    a = good()
    for j, v in ((i, value),) + tuple(zip(more[::2], more[1::2])):
        a[j] = v.to(a[0].device)
    return a


INVALID = {
    "q-ndim": (lambda: _with(0, torch.zeros(5, 4 * 64)), "q"),
    "k-dtype": (lambda: _with(1, good()[1].half()), "k_cache"),
    "v-shape": (lambda: _with(2, good()[2][:, :8]), "v_cache"),
    "heads-not-multiple": (lambda: _with(0, torch.zeros(5, 3, 64)), "multiple"),
    "head-dim": (lambda: _with(0, torch.zeros(5, 4, 32)), "head dim"),
    "block-size-not-pow2": (lambda: _with(1, torch.zeros(4, 12, 2, 64), 2, torch.zeros(4, 12, 2, 64)),
                            "power of two"),
    "block-table-rows": (lambda: _with(3, good()[3][:1]), "block_table"),
    "block-table-outside": (lambda: _with(3, good()[3] + 100), "block_table: points outside"),
    "block-table-narrow": (lambda: _with(3, good()[3][:, :1]), "block_table: has 1 columns"),
    "kv-lens-short": (lambda: _with(4, torch.tensor([2, 6], **I32)), "kv_lens: request 0"),
    "kv-lens-dtype": (lambda: _with(4, torch.tensor([23, 6])), "kv_lens"),
    "cu-q-last": (lambda: _with(5, torch.tensor([0, 3, 4], **I32)), "cu_q_lens"),
    "mask-not-self": (lambda: _with(6, torch.zeros(5, 1, **I32)), "see itself"),
    "mask-later-query": (lambda: _with(6, torch.full((5, 1), 0b111, **I32)), "later query"),
    "mask-rows": (lambda: _with(6, torch.ones(4, 1, **I32)), "tree_mask"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_validation_errors(case):
    make, pattern = INVALID[case]
    with pytest.raises(ValueError, match=pattern):
        spdkernels.tree_attention(*make())


def test_scale_validation():
    with pytest.raises(ValueError, match="scale"):
        spdkernels.tree_attention(*good(), scale=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("validate", [True, False])
def test_strided_lengths_and_a_permuted_query(backend, validate):
    """kv_lens / cu_q_lens that are views with a stride (a column of a [R, 2] table) or broadcast (stride 0), and
    a query that is a permuted view: the same output as dense copies, on every backend (the Triton kernel read the
    lengths one element after another: request r got another request's kv_len, and a broadcast tensor was read
    past its end); the output is dense, as the op's fake kernel says (torch.compile relies on it)."""
    q, kc, vc, bt, kv, cu_q, mask = make_batch([3, 2, 4], [5, 9, 0], Hq=4, Hkv=2, D=32, bs=8,
                                               gen=torch.Generator().manual_seed(8))
    want = run("torch", (q, kc, vc, bt, kv, cu_q, mask))
    kv_col = torch.stack([torch.zeros_like(kv), kv], 1)[:, 1]
    cu_col = torch.stack([cu_q, torch.zeros_like(cu_q)], 1)[:, 0]
    assert kv_col.stride(0) == 2 and cu_col.stride(0) == 2
    qp = q.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # the same values, strides of a [H, T, D] tensor
    with spdkernels.validation(validate):
        got = run(backend, (qp, kc, vc, bt, kv_col, cu_col, mask))
    check_close(got, want)
    assert got.is_contiguous()
    same = torch.tensor([12], **I32).expand(3)  # every request 12 positions long (stride 0)
    q2, kc2, vc2, bt2, kv2, cu2, _ = make_batch([2, 2, 2], [10, 10, 10], Hq=4, Hkv=2, D=32, bs=8,
                                                gen=torch.Generator().manual_seed(9))
    with spdkernels.validation(validate):
        got = run(backend, (q2, kc2, vc2, bt2, same.to(kv2.device), cu2, None))
    check_close(got, run("torch", (q2, kc2, vc2, bt2, kv2, cu2, None)))


def test_the_fake_kernel_gives_a_dense_output():
    from spdkernels.ops.tree_attention import _fake

    q, kc, vc, bt, kv, cu_q, mask = make_batch([3], [5], Hq=4, Hkv=2, D=32, bs=8)
    qp = q.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not qp.is_contiguous() and _fake(qp, kc, vc, bt, kv, cu_q, mask, None).is_contiguous()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "nki")])
def test_a_kv_len_near_the_int32_limit_is_named(backend):
    """(kv_len + block size - 1) // block size wrapped negative in int32 near 2**31, which skipped the block-table
    check the torch and NKI backends rely on with validation off."""
    q, kc, vc, bt, kv, cu_q, mask = make_batch([2], [6], Hq=4, Hkv=2, D=32, bs=8)
    kv[0] = 2 ** 31 - 2
    with spdkernels.validation(False), pytest.raises(ValueError, match="block_table"):
        run(backend, (q, kc, vc, bt, kv, cu_q, mask))
