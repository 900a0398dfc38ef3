"""verify_greedy: every backend equals the torch reference exactly, known answers, and validation."""

import itertools

import pytest
import torch
from conftest import DEVICE, backends_here, nki_emulated, to_backend, use_backend

import spdkernels
from spdkernels import reference
from spdkernels.testing import random_draft_batch

# nki: the NKI kernel on the NumPy emulation
BACKENDS = backends_here() + nki_emulated()
FAST = [b for b in BACKENDS if b != "triton" or DEVICE == "cuda"]  # interpreter: small shapes only
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(backend, *args, **kw):
    """The op on ``backend`` with every tensor argument on that backend's device (CUDA for Triton on a GPU
    machine); the outputs come back on the CPU."""
    args, kw = to_backend(backend, args), to_backend(backend, kw)
    with use_backend(backend):
        return tuple(t.cpu() for t in spdkernels.verify_greedy(*args, **kw))


def assert_same(got, want):
    for g, w, name in zip(got, want, ("output_token_ids", "num_emitted", "accepted_path")):
        assert g.dtype == torch.int32, name
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs:\n{g}\n{w}"


def ks_for(R, gen):
    """k in 0..8 mixed in one batch, always including a zero-draft request when R > 1."""
    ks = torch.randint(0, 9, (R,), generator=gen).tolist()
    if R > 1:
        ks[0] = 0
        ks[-1] = 8
    return ks


def check_structure(batch, out, num, path):
    """Invariants that hold for any correct answer, independent of the reference."""
    R, D = batch.R, batch.max_depth
    cu = batch.cu_num_draft.tolist()
    toks = batch.draft_token_ids.tolist()
    par = batch.parents.tolist() if batch.parents is not None else None
    for r in range(R):
        n = int(num[r])
        assert 1 <= n <= D + 1
        assert (out[r, :n] >= 0).all() and (out[r, n:] == -1).all()
        assert (path[r, : n - 1] >= 0).all() and (path[r, n - 1:] == -1).all()
        prev = -1
        for d in range(n - 1):
            node = int(path[r, d])
            assert node < cu[r + 1] - cu[r]
            assert (par[cu[r] + node] if par else node - 1) == prev  # a root-to-leaf path
            assert toks[cu[r] + node] == int(out[r, d])  # the accepted token is that node's token
            prev = node


SWEEP = list(itertools.product([1, 3, 17], [1, 7, 1000, 32003], [False, True]))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("R,V,tree", SWEEP, ids=[f"R{R}-V{V}-{'tree' if t else 'chain'}" for R, V, t in SWEEP])
def test_matches_reference_sweep(backend, R, V, tree):
    gen = torch.Generator().manual_seed(R * 100003 + V + tree)
    for dtype, tok_dtype in [(torch.float32, torch.int64), (torch.bfloat16, torch.int32),
                             (torch.float16, torch.int64)]:
        batch = random_draft_batch(ks_for(R, gen), V, tree=tree, dtype=dtype, token_dtype=tok_dtype,
                                   tie_prob=0.3, gen=gen, device=DEVICE)
        want = reference.verify_greedy(*batch.args())
        check_structure(batch, *want)
        got = run(backend, *batch.args()[:4], max_depth=batch.max_depth)
        assert_same(got, want)


def test_sweep_accepts_drafts():
    """The sweep is only meaningful if walks go deep: check the generator yields real acceptances."""
    gen = torch.Generator().manual_seed(1)
    batch = random_draft_batch([8] * 17, 1000, tree=True, gen=gen)
    _, num, _ = reference.verify_greedy(*batch.args())
    assert (num > 1).float().mean() > 0.4 and int(num.max()) >= 4


TRITON_SMALL = list(itertools.product([1, 3, 17], [1, 7, 1000], [False, True], DTYPES))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the full sweep above covers the compiled kernel")
@pytest.mark.parametrize("R,V,tree,dtype", TRITON_SMALL,
                         ids=[f"R{R}-V{V}-{'tree' if t else 'chain'}-{str(d)[6:]}" for R, V, t, d in TRITON_SMALL])
def test_triton_interpreter_matches_reference(R, V, tree, dtype):
    gen = torch.Generator().manual_seed(R * 7 + V + tree)
    batch = random_draft_batch(ks_for(R, gen), V, tree=tree, dtype=dtype, tie_prob=0.3, gen=gen)
    assert_same(run("triton", *batch.args()[:4], max_depth=batch.max_depth), reference.verify_greedy(*batch.args()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_interpreter_large_vocab_one_batch(backend):
    """V = 32003 (not a power of two, several tiles) on every backend, Triton included."""
    gen = torch.Generator().manual_seed(5)
    batch = random_draft_batch([0, 3, 5], 32003, tree=True, dtype=torch.bfloat16, tie_prob=0.5, gen=gen)
    assert_same(run(backend, *batch.args()[:4], max_depth=batch.max_depth), reference.verify_greedy(*batch.args()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_answer_chain(backend):
    # R=2: request 0 has 2 drafts [1, 2]; request 1 has none.
    logits = torch.tensor([[0.0, 5.0, 1.0],   # r0 root -> argmax 1 == draft 0: accept
                           [9.0, 0.0, 0.0],   # after node 0 -> argmax 0 != draft 1 (2): emit 0
                           [0.0, 0.0, 3.0],   # after node 1 (unused)
                           [0.0, 1.0, 7.0]])  # r1 root -> emit 2
    out, num, path = run(backend, logits, torch.tensor([1, 2]), torch.tensor([0, 2, 2], dtype=torch.int32))
    assert out.tolist() == [[1, 0, -1], [2, -1, -1]]
    assert num.tolist() == [2, 1]
    assert path.tolist() == [[0, -1], [-1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_answer_tree_first_matching_sibling(backend):
    # One request, tree: root -> {n0 (tok 4), n1 (tok 3), n2 (tok 3)}, n1 -> {n3 (tok 0)}, n2 -> {n4 (tok 1)}.
    # Root argmax is 3: n1 and n2 both match; the first in index order (n1) is accepted. Row of n1
    # (row 1 + 1) has argmax 0 -> n3 accepted; n3's row has argmax 2 and n3 has no children: bonus 2.
    V = 5
    logits = torch.full((6, V), -1.0)
    logits[0, 3] = 1.0
    logits[2, 0] = 1.0   # row of n1
    logits[3, 1] = 1.0   # row of n2 (would accept n4 if n2 had been chosen)
    logits[4, 2] = 1.0   # row of n3
    parents = torch.tensor([-1, -1, -1, 1, 2], dtype=torch.int32)
    tokens = torch.tensor([4, 3, 3, 0, 1], dtype=torch.int32)
    out, num, path = run(backend, logits, tokens, torch.tensor([0, 5], dtype=torch.int32), parents)
    assert out.tolist() == [[3, 0, 2]]
    assert num.tolist() == [3]
    assert path.tolist() == [[1, 3]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_lowest_id_and_all_neg_inf_gives_zero(backend, dtype):
    V = 4099  # odd, spans tiles and lanes
    logits = torch.randn(3, V).to(dtype)
    logits[0, [4000, 17, 2049]] = 50.0        # three-way tie -> 17
    logits[1] = float("-inf")                  # all -inf -> 0
    logits[2, :] = -0.0
    logits[2, 1000] = 0.0                      # -0 and +0 are equal: tie -> 0
    out, num, _ = run(backend, logits, torch.tensor([17, 5]), torch.tensor([0, 2], dtype=torch.int32))
    # node 0 (token 17) accepted, node 1 (token 5) rejected by row 1's argmax 0
    assert out.tolist() == [[17, 0, -1]] and num.tolist() == [2]
    out, _, _ = run(backend, logits[2:], torch.tensor([], dtype=torch.int64), torch.tensor([0, 0], dtype=torch.int32))
    assert out.tolist() == [[0]]


@pytest.mark.parametrize("backend,programs", [(b, None) for b in BACKENDS] + [("triton", 2)],
                         ids=list(BACKENDS) + ["triton-two-programs"])
def test_argmax_across_row_chunks(backend, programs, monkeypatch):
    """The Triton argmax cuts rows into chunks of whole tiles (one chunk a tile at the default program count for
    these few rows; with two programs for the 2 rows of each call, one chunk of all 4 tiles); the row's argmax is the
    largest chunk
    max, ties to the lowest index: ties across chunks, a later chunk's larger max, a first chunk without any value
    above -inf, a row of equal values."""
    if programs is not None:  # (the chunk count is the Triton kernel's)
        from spdkernels.triton_kernels import verify_greedy as tvg

        monkeypatch.setattr(tvg, "ARGMAX_PROGRAMS", programs)
    V = 3 * 4096 + 5  # 4 tiles of 4096: 4 chunks for these rows at the default program count
    logits = torch.randn(4, V)
    logits[0, [9000, 4100, 12290]] = 60.0  # tie across chunks 1, 2, 3 -> 4100
    logits[0, 4000] = 59.0
    logits[1, 5] = 70.0
    logits[1, 12291] = 71.0                # a later chunk's larger max -> 12291
    logits[2, :8192] = float("-inf")       # chunks 0 and 1 without a value above -inf
    logits[2, 8192:] = -1.0
    logits[2, 8200] = -0.5                 # -> 8200
    logits[3, :] = 1.0                     # every column ties -> 0
    want = [4100, 12291, 8200, 0]
    for r, tok in enumerate(want):  # a chain of one draft per row, the draft the argmax: accepted, then the bonus
        out, num, _ = run(backend, logits[r:r + 1].repeat(2, 1), torch.tensor([tok]),
                          torch.tensor([0, 1], dtype=torch.int32))
        assert out.tolist() == [[tok, tok]] and num.tolist() == [2], (r, out.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_depth_padding_and_cap(backend):
    gen = torch.Generator().manual_seed(3)
    batch = random_draft_batch([4, 6, 0], 50, match_prob=1.0, gen=gen)  # every draft accepted
    logits, toks, cu, par, D = batch.args()
    out, num, path = run(backend, logits, toks, cu, par, max_depth=D + 3)  # extra padding only
    ref = reference.verify_greedy(logits, toks, cu, par, D)
    assert num.tolist() == ref[1].tolist() == [5, 7, 1]
    assert torch.equal(out[:, : D + 1], ref[0]) and (out[:, D + 1:] == -1).all()
    assert torch.equal(path[:, :D], ref[2]) and (path[:, D:] == -1).all()
    with pytest.raises(ValueError, match="max_depth"):
        run(backend, logits, toks, cu, par, max_depth=2)
    with spdkernels.validation(False):  # unchecked: walks stop accepting at max_depth, all backends alike
        out, num, path = run(backend, logits, toks, cu, par, max_depth=2)
    want = reference.verify_greedy(logits, toks, cu, par, 2)
    assert_same((out, num, path), want)
    assert num.tolist() == [3, 3, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    gen = torch.Generator().manual_seed(4)
    batch = random_draft_batch([2, 3], 300, gen=gen)
    wide = torch.zeros(batch.target_logits.shape[0], 512)
    wide[:, :300] = batch.target_logits
    wide[:, 300:] = 100.0  # garbage beyond V that a wrong stride would pick up
    view = to_backend(backend, to_backend(backend, wide)[:, :300])  # sliced on the device: the view travels as is
    assert not view.is_contiguous()
    got = run(backend, view, *batch.args()[1:4], max_depth=batch.max_depth)
    assert_same(got, reference.verify_greedy(*batch.args()))


def test_max_depth_computed_when_omitted():
    gen = torch.Generator().manual_seed(6)
    for tree in (False, True):
        batch = random_draft_batch([3, 0, 7, 5], 20, tree=tree, gen=gen)
        out, _, path = spdkernels.verify_greedy(*batch.args()[:4])
        assert out.shape == (4, batch.max_depth + 1) and path.shape == (4, batch.max_depth)


def test_empty_batch():
    out, num, path = spdkernels.verify_greedy(torch.zeros(0, 10), torch.zeros(0, dtype=torch.int64),
                                              torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, 1) and num.shape == (0,) and path.shape == (0, 0)


# ---- validation: one test per rule ----------------------------------------------------------------

def good():
    gen = torch.Generator().manual_seed(9)
    b = random_draft_batch([2, 3], 11, tree=True, gen=gen)
    return dict(target_logits=b.target_logits, draft_token_ids=b.draft_token_ids, cu_num_draft=b.cu_num_draft,
                parents=b.parents, max_depth=b.max_depth)


def bad(**changes):
    kw = good()
    kw.update(changes)
    return kw


I32 = dict(dtype=torch.int32)
INVALID = {
    "logits-1d": (dict(target_logits=torch.zeros(7)), "target_logits"),
    "logits-int": (dict(target_logits=torch.zeros(7, 11, dtype=torch.int32)), "target_logits"),
    "logits-fp64": (dict(target_logits=torch.zeros(7, 11, dtype=torch.float64)), "target_logits"),
    "logits-rows": (dict(target_logits=torch.zeros(8, 11)), r"target_logits.*\[N \+ R, V\]"),
    "logits-nan": (dict(target_logits=torch.zeros(7, 11).index_fill_(1, torch.tensor([3]), float("nan"))),
                   "target_logits: contains NaN"),
    "tokens-float": (dict(draft_token_ids=torch.zeros(5)), "draft_token_ids"),
    "tokens-2d": (dict(draft_token_ids=torch.zeros(5, 1, dtype=torch.int64)), "draft_token_ids"),
    "tokens-negative": (dict(draft_token_ids=torch.tensor([0, 1, -1, 2, 3])), r"draft_token_ids.*\[0, V\)"),
    "tokens-too-big": (dict(draft_token_ids=torch.tensor([0, 1, 11, 2, 3])), r"draft_token_ids.*\[0, V\)"),
    "cu-int64": (dict(cu_num_draft=torch.tensor([0, 2, 5])), "cu_num_draft"),
    "cu-empty": (dict(cu_num_draft=torch.zeros(0, **I32)), "cu_num_draft"),
    "cu-first-nonzero": (dict(cu_num_draft=torch.tensor([1, 2, 5], **I32)), r"cu_num_draft\[0\]"),
    "cu-decreasing": (dict(cu_num_draft=torch.tensor([0, 4, 3, 5], **I32),
                           target_logits=torch.zeros(8, 11)), "non-decreasing"),
    "cu-last-not-N": (dict(cu_num_draft=torch.tensor([0, 2, 4], **I32), target_logits=torch.zeros(7, 11)),
                      r"cu_num_draft\[-1\]"),
    "parents-int64": (dict(parents=torch.tensor([-1, 0, -1, 0, 1])), "parents"),
    "parents-len": (dict(parents=torch.tensor([-1, 0, -1], **I32)), "parents"),
    "parents-forward": (dict(parents=torch.tensor([-1, 1, -1, 0, 1], **I32)), "parents.*topological"),
    "parents-cross-request": (dict(parents=torch.tensor([-1, 0, -1, 0, 3], **I32)), "parents.*topological"),
    "parents-below-root": (dict(parents=torch.tensor([-1, 0, -2, 0, 1], **I32)), "parents"),
    "max-depth-negative": (dict(max_depth=-1), "max_depth"),
    "max-depth-small": (dict(max_depth=1), "max_depth"),
    "max-depth-float": (dict(max_depth=2.0), "max_depth"),
    "tokens-not-tensor": (dict(draft_token_ids=[0, 1, 2, 3, 4]), "draft_token_ids"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_validation_errors(case):
    changes, pattern = INVALID[case]
    with pytest.raises(ValueError, match=pattern):
        spdkernels.verify_greedy(**bad(**changes))


def test_validation_switch_and_the_torch_op():
    """Value checks are the wrapper's policy: on by default, off by the switch; the torch op itself makes only the
    always-on checks (a token outside the vocabulary is compared, never accepted: a defined result)."""
    kw = bad(draft_token_ids=torch.tensor([0, 1, 11, 2, 3]))
    with pytest.raises(ValueError, match="draft_token_ids"):
        spdkernels.verify_greedy(**kw)
    direct = torch.ops.spdkernels.verify_greedy(*kw.values())
    spdkernels.set_validation(False)  # value checks off: no error, no crash (tokens are only compared)
    out, num, path = spdkernels.verify_greedy(**kw)
    assert out.shape == (2, kw["max_depth"] + 1)
    assert all(torch.equal(a, b) for a, b in zip(direct, (out, num, path)))
    assert 11 not in out.tolist()[0][: int(num[0]) - 1]
    k = bad(target_logits=torch.zeros(8, 11))
    for call in (lambda: spdkernels.verify_greedy(**k), lambda: torch.ops.spdkernels.verify_greedy(*k.values())):
        with pytest.raises(ValueError, match="target_logits"):  # static checks stay on
            call()


def test_device_mismatch_is_a_value_error():
    if not torch.cuda.is_available():
        meta = torch.zeros(7, 11, device="meta")
        with pytest.raises(ValueError, match="draft_token_ids.*device"):
            spdkernels.verify_greedy(**bad(target_logits=meta))
    else:
        with pytest.raises(ValueError, match="device"):
            spdkernels.verify_greedy(**bad(target_logits=torch.zeros(7, 11, device="cuda")))


def test_docstring_example_is_right():
    import doctest
    import importlib

    mod = importlib.import_module("spdkernels.ops.verify_greedy")
    res = doctest.testmod(mod, extraglobs={"torch": torch, "verify_greedy": spdkernels.verify_greedy})
    assert res.attempted >= 1 and res.failed == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("validate", [True, False])
def test_int64_draft_ids_past_the_int32_range_are_never_accepted(backend, validate):
    """2**32 + 7 is outside the vocabulary even though its low 32 bits are 7, the argmax (the Triton and NKI
    launches narrowed int64 ids to int32 and accepted it); with validation on it is named."""
    logits = torch.full((3, 10), -5.0)
    logits[:, 7] = 5.0
    toks = torch.tensor([2 ** 32 + 7, 7], dtype=torch.int64)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with spdkernels.validation(validate):
        if validate:
            with pytest.raises(ValueError, match="draft_token_ids"):
                run(backend, logits, toks, cu, max_depth=2)
            return
        out, num, _ = run(backend, logits, toks, cu, max_depth=2)
    assert num.tolist() == [1] and out.tolist() == [[7, -1, -1]]


@pytest.mark.skipif("nki" not in BACKENDS, reason="the NKI emulation runs on CPU machines only")
def test_the_nki_launcher_checks_indices_on_a_direct_op_call():
    """The NKI launcher makes its index checks whatever the validation setting (it skipped them with validation on,
    trusting the wrapper's value checks): a direct op call with a malformed batch is a ValueError naming it."""
    logits = torch.randn(3, 10)
    toks = torch.tensor([1, 2], dtype=torch.int32)
    bad_cu = torch.tensor([0, 5], dtype=torch.int32)  # past the two drafts
    with use_backend("nki"), spdkernels.validation(True), pytest.raises(ValueError, match="cu_num_draft"):
        torch.ops.spdkernels.verify_greedy(logits, toks, bad_cu, None, 2)


def test_the_validation_switch_takes_booleans_only():
    """"false" is truthy and None is not False: both used to be read as a setting."""
    for bad in ("false", None, 2):
        with pytest.raises(ValueError, match="enabled"):
            spdkernels.set_validation(bad)
        with pytest.raises(ValueError, match="enabled"):
            with spdkernels.validation(bad):
                pass
    with spdkernels.validation(0):
        assert not spdkernels.validation_enabled()
