"""rejection_sample: certain answers, structure, exact distribution, determinism, validation."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, ON_GPU, backends_here, cpp_lower_isas, nki_emulated, to_backend, use_backend
from scipy.stats import chisquare
from test_verify_greedy import check_structure

import spdkernels
from spdkernels import reference
from spdkernels._validate import tree_max_depth
from spdkernels.reference.rejection_sample import kept, normalise, philox4x32, temperature_weights
from spdkernels.testing import random_draft_batch

# every backend implements rejection_sample; one that cannot load fails the run. 'nki': the NKI kernel on the
# NumPy emulation (smaller shapes where the emulation is slow)
BACKENDS = backends_here() + nki_emulated()
FAST = [b for b in BACKENDS if b != "torch"] or ["torch"]
# the C++ kernels' lower instruction-set paths (an AVX-512 machine also runs its AVX2 and baseline code)
WITH_ISAS = BACKENDS + cpp_lower_isas()
I32 = dict(dtype=torch.int32)


def run(backend, batch, **kw):
    """The op on ``backend`` with the batch and every tensor argument on that backend's device (CUDA for Triton on
    a GPU machine); the outputs come back on the CPU, where the references are computed."""
    logits, toks, cu, par = to_backend(backend, (*batch.args()[:3], batch.parents))
    with use_backend(backend):
        out = spdkernels.rejection_sample(logits, toks, cu, parents=par, max_depth=batch.max_depth,
                                          **to_backend(backend, kw))
    return tuple(t.cpu() for t in out)


def params(R, gen, greedy_every=4):
    """Per-request sampling parameters, mixed in one batch: greedy, plain, top-k, top-p, both."""
    T = torch.rand(R, generator=gen) * 1.5 + 0.3
    T[::greedy_every] = 0.0
    k = torch.randint(0, 12, (R,), generator=gen, **I32)
    k[1::3] = 0
    p = torch.rand(R, generator=gen) * 0.7 + 0.3
    p[::2] = 1.0
    return dict(temperature=T, top_k=k, top_p=p)


# ---- coins ---------------------------------------------------------------------------------------

def test_philox_known_answers():
    """Random123's published philox4x32_10 test vectors (first output word)."""
    assert philox4x32(0, 0, 0, 0, 0, 0) == 0x6627E8D5
    assert philox4x32(*([0xFFFFFFFF] * 6)) == 0x408F276D
    assert philox4x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0) == 0xD16CFE09


def test_triton_coins_equal_reference_coins():
    """The kernels' in-register Philox gives bit-identical coins to the reference, over 64-bit seeds and
    offsets (negative ones included: their two's-complement words are the key and counter)."""
    from spdkernels.triton_kernels.rejection_sample import philox_uniforms

    gen = torch.Generator().manual_seed(21)
    n = 64
    seed = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    offset = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    seed[:3] = torch.tensor([0, 1, 2**62])
    offset[:3] = torch.tensor([0, 2**33, 7])
    index = torch.randint(0, 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
    for stream in (0, 1):
        got = philox_uniforms(seed.to(DEVICE), offset.to(DEVICE), index.to(DEVICE), stream).cpu()
        want = [reference.philox_uniform(s, o, i, stream) for s, o, i in zip(seed.tolist(), offset.tolist(),
                                                                            index.tolist())]
        assert got.tolist() == want


def test_coins_are_uniform_and_open_interval():
    u = np.array([reference.philox_uniform(7, 3, i, 0) for i in range(20000)])
    assert (u > 0).all() and (u < 1).all()
    hist = np.histogram(u, bins=20, range=(0, 1))[0]
    assert chisquare(hist).pvalue > 1e-4


# ---- all backends agree --------------------------------------------------------------------------

SWEEP = list(itertools.product([1, 3, 17], [7, 1000], [False, True], [False, True]))


@pytest.mark.parametrize("backend", WITH_ISAS)
@pytest.mark.parametrize("R,V,tree,with_q", SWEEP, ids=[f"R{R}-V{V}-{'tree' if t else 'chain'}-{'q' if q else 'pm'}"
                                                        for R, V, t, q in SWEEP])
def test_backends_match_reference_with_explicit_uniforms(backend, R, V, tree, with_q):
    """Same uniforms -> same tokens on every backend. The thresholds and coins are exact; the only
    possible differences are floating-point boundary cases (a coin within ~1e-7 of an acceptance
    ratio or CDF step). None were seen here; the bound below allows 1 request in 200."""
    gen = torch.Generator().manual_seed(R * 31 + V + 2 * tree + with_q)
    mismatched = total = 0
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if backend == "triton" and not ON_GPU and R > 3:
        # the interpreter runs ~15 requests a second: its 17-request cases take one dtype each, rotating over the
        # sweep so that each dtype meets both layouts (the 1- and 3-request cases take all three, as every case
        # does on a GPU)
        dtypes = (dtypes[(2 * tree + with_q + (V > 7)) % 3],)
    for dtype in dtypes:
        ks = torch.randint(0, 9, (R,), generator=gen).tolist()
        batch = random_draft_batch(ks, V, tree=tree, dtype=dtype, match_prob=0.6, gen=gen)
        N = batch.N
        kw = params(R, gen)
        kw["uniforms"] = torch.rand(N + R, generator=gen).clamp(1e-6, 1 - 1e-6)
        if with_q:
            kw["draft_probs"] = torch.softmax(torch.randn(N, V, generator=gen) * 2, -1)
        want = reference.rejection_sample(*batch.args()[:4], kw.get("draft_probs"), kw["temperature"], kw["top_k"],
                                          kw["top_p"], kw["uniforms"], batch.max_depth)
        check_structure(batch, *want)
        got = run(backend, batch, **kw)
        check_structure(batch, *got)
        rows_equal = (got[0] == want[0]).all(1) & (got[1] == want[1]) & (got[2] == want[2]).all(1)
        mismatched += int((~rows_equal).sum())
        total += R
    assert mismatched <= total / 200, f"{mismatched}/{total} requests differ from the reference"


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_seed_offset_path_equals_reference_coins(backend):
    gen = torch.Generator().manual_seed(11)
    batch = random_draft_batch([3, 0, 5, 2], 64, tree=True, gen=gen, match_prob=0.5)
    seed = torch.tensor([1, 2**40 + 3, 5, 2**62], dtype=torch.int64)
    offset = torch.tensor([0, 9, 2**33, 1], dtype=torch.int64)
    got = run(backend, batch, seed=seed, offset=offset)
    u = reference.coins_from_seed(batch.cu_num_draft, seed, offset)
    want = run("torch", batch, uniforms=u)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---- certain answers ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_target(backend):
    """p is one-hot (all other logits -inf): the matching draft is accepted, a wrong one never is,
    whatever the coins, and the correction is the one-hot token."""
    V = 9
    logits = torch.full((4, V), float("-inf"))
    logits[0, 4] = 0.0   # root: token 4
    logits[1, 2] = 1.0   # after node 0: token 2
    logits[2:, 0] = 0.0
    batch = random_draft_batch([3], V)
    batch.target_logits = logits
    batch.draft_token_ids = torch.tensor([4, 5, 0])  # node 0 right, node 1 wrong
    for s in range(20):
        out, num, path = run(backend, batch, seed=torch.tensor([s]))
        assert out.tolist() == [[4, 2, -1, -1]] and num.tolist() == [2] and path.tolist() == [[0, -1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_equal_to_target_accepts_everything(backend):
    gen = torch.Generator().manual_seed(2)
    R, k, V = 40, 5, 30
    batch = random_draft_batch([k] * R, V, gen=gen)
    T = torch.full((R,), 0.9)
    q = torch.empty(R * k, V)
    toks = []
    for r in range(R):  # node i's q is the target row of its parent; its token is drawn from it
        for i in range(k):
            p = reference.target_weights(batch.target_logits[r * (k + 1) + i], 0.9, 0, 1.0)
            q[r * k + i] = p / p.sum()
            toks.append(int(torch.multinomial(q[r * k + i], 1, generator=gen)))
    batch.draft_token_ids = torch.tensor(toks)
    out, num, _ = run(backend, batch, draft_probs=q, temperature=T, seed=torch.arange(R))
    assert (num == k + 1).all()
    assert torch.equal(out[:, :k].reshape(-1), batch.draft_token_ids.int())


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_requests_equal_verify_greedy(backend):
    gen = torch.Generator().manual_seed(3)
    for tree in (False, True):
        batch = random_draft_batch([4, 0, 7, 2, 8], 500, tree=tree, gen=gen)
        T = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0])
        out, num, path = run(backend, batch, temperature=T, seed=torch.arange(5),
                             draft_probs=torch.softmax(torch.randn(batch.N, 500, generator=gen), -1))
        g = reference.verify_greedy(*batch.args())
        for r in (0, 2, 4):
            assert torch.equal(out[r], g[0][r]) and num[r] == g[1][r] and torch.equal(path[r], g[2][r])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_probability_tokens_are_never_emitted(backend):
    """top-k = 3 with distinct logits: only the 3 largest can ever be emitted at the root."""
    gen = torch.Generator().manual_seed(4)
    R, V = 400 if backend != "triton" or ON_GPU else 60, 20
    batch = random_draft_batch([0] * R, V, gen=gen)
    batch.target_logits[:] = torch.arange(V, dtype=torch.float32) / 4
    out, _, _ = run(backend, batch, top_k=torch.full((R,), 3, **I32), seed=torch.arange(R))
    assert set(out[:, 0].tolist()) == {17, 18, 19}


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_rejection_that_leaves_a_tiny_mass(backend):
    """p(0) = 1 - 1.4e-7, p(8) = p(16) = 6.8e-8: a coin just below 1 rejects the point-mass draft of token
    0, and what is left (below the rounding of the row's mass) must be sampled as it is, half and half: the
    final coin picks token 8 below 1/2 and token 16 above. (Ids 0, 8, 16 share a vector lane, so the cpp
    kernel's fp32 lane sums round them together: it must decide such cancellations on exact sums.)"""
    _check_tiny_mass(backend, 64, 8, 16, ((1e-6, 8), (0.3, 8), (0.7, 16), (1 - 2**-24, 16)))


def _check_tiny_mass(backend, V, a, b, expected):
    """Token 0 at logit 0, tokens ``a`` and ``b`` at -16.5; the point-mass draft of 0 is rejected by a coin
    just below 1 and the final coin ``u`` must give the token in ``expected``."""
    logits = torch.full((2, V), float("-inf"))
    logits[0, 0], logits[0, a], logits[0, b] = 0.0, -16.5, -16.5
    logits[1, 3] = 0.0
    batch = random_draft_batch([1], V)
    batch.target_logits = logits
    batch.draft_token_ids = torch.tensor([0])
    for u_final, token in expected:
        u = torch.tensor([1 - 2**-24, u_final])
        out, num, path = run(backend, batch, uniforms=u)
        assert out.tolist() == [[token, -1]] and num.tolist() == [1] and path.tolist() == [[-1]], u_final


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_rejection_that_leaves_a_tiny_mass_over_tiles(backend):
    """As above with V = 6000, over two 4096-token tiles (the Triton statistics' tiles; its walk and draw use
    2048): p(0) = 1 - 1.4e-7 and two tokens of 6.8e-8 in the second tile, one of them (4096) in token 0's lane,
    where a lane-wise fp32 sum rounds 1 + 6.8e-8 up to 1 + 1.19e-7. Subtracting p(0) from that mass leaves 1.87e-7
    instead of 1.36e-7, which moves the final coin's threshold: u = 0.45 must give token 4096
    (0.45 * 1.36e-7 < 6.8e-8), the biased mass gives 5000. A kernel must decide such a rejection on an exact re-sum
    of what is left."""
    _check_tiny_mass(backend, 6000, 4096, 5000,
                     ((1e-6, 4096), (0.3, 4096), (0.45, 4096), (0.55, 5000), (0.7, 5000), (1 - 2**-24, 5000)))


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_final_draw_lands_on_each_side_of_tile_boundaries(backend):
    """Equal weights over V = 5000 (so the running mass after token v is exactly v + 1): the final coin u gives the
    smallest v with v + 1 > u * V, also where that v is the first or last id of one of the Triton draw's 2048-id
    tiles, or of the C++ and NKI kernels' tiles: the tile search and the search inside the tile must agree."""
    V = 5000
    ids = [0, 1, 2047, 2048, 2049, 4095, 4096, 4097, 4999]
    batch = random_draft_batch([0] * len(ids), V)  # no drafts: each request draws its token from its root row
    batch.target_logits = torch.zeros(len(ids), V)
    u = torch.tensor([(v + 0.5) / V for v in ids], dtype=torch.float64).float()
    out, num, _ = run(backend, batch, uniforms=u)
    assert num.tolist() == [1] * len(ids)
    assert out[:, 0].tolist() == ids, [(v, o) for v, o in zip(ids, out[:, 0].tolist()) if v != o]


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_final_draw_never_lands_on_a_token_without_mass(backend):
    """A probability row with mass on tokens 0 and 4096 only, final coins within a few fp32 ulps of p(0) = 0.582177:
    there the running mass after the tiles that hold token 0 rounds to the threshold, and a draw that compared fp32
    leftovers (or let an empty tile pass on a slightly negative leftover) emitted 2048, the first id of an empty
    tile (it did for u = 0.5821769). Every backend must give a token with mass, whatever its rounding."""
    V = 6000
    row = torch.zeros(1, V)
    row[0, 0], row[0, 4096] = 0.582177, 0.41782308
    batch = random_draft_batch([0], V)
    batch.target_logits = row
    u0 = torch.tensor(0.5821769)
    coins = [u0]
    for _ in range(4):  # the fp32 neighbours on each side
        coins = [torch.nextafter(coins[0], torch.tensor(0.0))] + coins + [torch.nextafter(coins[-1], torch.tensor(1.0))]
    for u in coins:
        out, num, _ = run(backend, batch, uniforms=u.reshape(1), target_is_probs=True)
        assert num.tolist() == [1] and float(row[0, out[0, 0]]) > 0, (float(u), out.tolist())


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_residual_draw_across_tiles_beside_a_greedy_request(backend):
    """Equal weights over V = 8192 (4 of the Triton draw's tiles) and one draft, token 8191, proposed with q one-hot
    on it: a coin just below 1 rejects it and the residual max(0, p - q) is p without token 8191 (scaled by
    1 - 1/8192... in its own mass); the final coin (v + 0.5) / 8191 must give v, across the tiles. A greedy request
    in the same batch keeps its argmax."""
    V = 8192
    ids = [0, 2047, 2048, 4095, 4096, 8190]
    R = len(ids) + 1
    batch = random_draft_batch([1] * R, V)
    logits = torch.zeros(2 * R, V)
    logits[2 * (R - 1), 77] = 5.0  # the greedy request's root row: argmax 77
    batch.target_logits = logits
    batch.draft_token_ids = torch.full((R,), 8191)
    batch.draft_token_ids[R - 1] = 5  # the greedy request's draft: not the argmax, rejected
    q = torch.zeros(R, V)
    q[:, 8191] = 1.0
    u = torch.tensor([1 - 2**-24] * R + [(v + 0.5) / (V - 1) for v in ids] + [0.5], dtype=torch.float32)
    temperature = torch.ones(R)
    temperature[R - 1] = 0.0
    out, num, _ = run(backend, batch, uniforms=u, draft_probs=q, temperature=temperature)
    assert num.tolist() == [1] * R
    assert out[:, 0].tolist() == ids + [77], out[:, 0].tolist()


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_residual_draw_skips_an_empty_tile_of_the_residual(backend):
    """Equal weights over V = 8192 (p = 1/8192) and a draft, token 3000, proposed with q = 1/2048 on ids 2048..4095:
    rejected by a coin just below 1, it leaves the residual max(0, p - q), which is empty over 2048..4095 (the
    Triton draw's second tile). The final coin just below / above 1/3 of the residual's mass must give 2047 / 4096."""
    V = 8192
    batch = random_draft_batch([1, 1], V)
    batch.target_logits = torch.zeros(4, V)
    batch.draft_token_ids = torch.tensor([3000, 3000])
    q = torch.zeros(2, V)
    q[:, 2048:4096] = 1.0 / 2048
    u = torch.tensor([1 - 2**-24, 1 - 2**-24, 1 / 3 - 1e-6, 1 / 3 + 1e-6], dtype=torch.float32)
    out, num, _ = run(backend, batch, uniforms=u, draft_probs=q)
    assert num.tolist() == [1, 1] and out[:, 0].tolist() == [2047, 4096], out.tolist()


@pytest.mark.parametrize("backend", WITH_ISAS)
def test_large_logits_and_low_temperature_match_reference(backend):
    """Logits around 3e4 with T in [0.05, 0.5]: a weight must come from (x - max) / T, not x / T - max / T
    (whose rounding at this size is up to ~0.03 in the exponent: percent errors in p). V = 1003 leaves a
    ragged last block. Same bound as the sweep above: 1 request in 200."""
    gen = torch.Generator().manual_seed(21)
    R, V = 400 if backend not in ("triton", "nki") or ON_GPU else 40, 1003
    batch = random_draft_batch([1] * R, V, gen=gen, match_prob=1.0)
    batch.target_logits = 3e4 + batch.target_logits * 0.5
    kw = dict(temperature=torch.rand(R, generator=gen) * 0.45 + 0.05,
              uniforms=torch.rand(batch.N + R, generator=gen).clamp(1e-6, 1 - 1e-6))
    want = reference.rejection_sample(*batch.args()[:4], None, kw["temperature"], None, None, kw["uniforms"],
                                      batch.max_depth)
    got = run(backend, batch, **kw)
    rows_equal = (got[0] == want[0]).all(1) & (got[1] == want[1])
    assert int((~rows_equal).sum()) <= R / 200, f"{int((~rows_equal).sum())}/{R} requests differ from the reference"


@pytest.mark.parametrize("backend", WITH_ISAS)
@pytest.mark.parametrize("T", [1e-30, 2.0**-126, 2.0**-127, 1e-39, 1e-44])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (2, 1.0), (0, 0.5)], ids=["plain", "top-k", "top-p"])
def test_temperatures_near_zero_split_the_tied_maxima(backend, T, top_k, top_p):
    """Below ~4.2e-39 (1e-39 and the subnormal 1e-44) log2(e) / T overflows fp32, and a kernel that scales by it
    turns the row max into NaN (the C++, Triton and NKI kernels emitted token 0 for every coin before the floor;
    with it removed, those cases fail here). Every backend floors T at 2^-126,
    so at any tiny T the target is uniform over the tied maxima (ids 5, 40, 77), unfiltered or through top-k /
    top-p: the draft 40 has p = 1/3. Coin 0.2 accepts it and row 1's unique max (7) follows; coin 0.5 rejects it
    and the final coin picks 5 or 77 with 1/2 each."""
    gen = torch.Generator().manual_seed(22)
    V = 100
    logits = torch.randn(2, V, generator=gen) * 3
    logits[0, [5, 40, 77]] = logits[0].max() + 1.0
    logits[1, 7] = logits[1].max() + 1e-3
    batch = random_draft_batch([1], V)
    batch.target_logits = logits
    batch.draft_token_ids = torch.tensor([40])
    kw = dict(temperature=torch.tensor([T]), top_k=torch.tensor([top_k], **I32), top_p=torch.tensor([top_p]))
    for coins, want in (((0.2, 0.5), [[40, 7]]), ((0.5, 0.3), [[5, -1]]), ((0.5, 0.7), [[77, -1]])):
        u = torch.tensor(coins)
        ref = reference.rejection_sample(*batch.args()[:4], None, kw["temperature"], kw["top_k"], kw["top_p"], u,
                                         batch.max_depth)
        out, num, _ = run(backend, batch, uniforms=u, **kw)
        assert ref[0].tolist() == want and out.tolist() == want, (coins, out.tolist(), ref[0].tolist())
        assert num.tolist() == [2 if want[0][1] >= 0 else 1]


def _rows(V, gen):
    """Logit rows that stress the C++ top-k / top-p selection: flat, peaked, heavy ties, all equal, -inf
    entries, a long tail, and bf16 / fp16 storage."""
    flat = torch.randn(V, generator=gen) * 3
    peak = flat.clone()
    peak[int(flat.argmax())] += 6.0
    ties = (torch.randn(V, generator=gen) * 3).round()  # ~25 distinct values: thousands per radix bin
    masked = flat.masked_fill(torch.rand(V, generator=gen) < 0.3, float("-inf"))
    tail = -torch.log(torch.randperm(V, generator=gen).float() + 1.0) * 2.0  # Zipf-like
    # one token over a plateau of V - 1 equal ones holding 1.5x its mass (at T = 1): top-p = 0.5 must keep the
    # plateau, whose tokens are each light (the pruning before top-p must not drop them)
    plateau = torch.zeros(V)
    plateau[int(torch.randint(V, (1,), generator=gen))] = math.log((V - 1) / 1.5)
    # the 40 largest logits are consecutive fp32 values (one ulp apart) above the rest: the top-k and top-p
    # boundaries fall inside the run, where a search's interval spans fewer keys than it has pivots
    ulps = flat.clone()
    run = torch.full((40,), float(flat.max()) + 1.0)
    for i in range(1, 40):
        run[i] = torch.nextafter(run[i - 1], torch.tensor(math.inf))
    ulps[torch.randperm(V, generator=gen)[:40]] = run
    return {"flat": flat, "peaked": peak, "ties": ties, "equal": torch.zeros(V), "masked": masked, "zipf": tail,
            "plateau": plateau, "ulps": ulps,
            "bf16": flat.bfloat16(), "fp16": flat.half()}


FILTERS = [(0, 0.999), (0, 0.9), (0, 0.5), (0, 0.02), (1, 1.0), (37, 1.0), (37, 0.7), (2999, 0.95)]


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")
@pytest.mark.parametrize("isa", ["best"] + [b.partition("@")[2] for b in cpp_lower_isas()])
@pytest.mark.parametrize("V", [3000, 40000])
def test_cpp_top_k_top_p_threshold_equals_reference(V, isa):
    """The C++ kept set {x >= threshold} equals the reference's (sort-based top-k, float64 cumsum top-p) token
    for token, over rows and filters chosen for the selection's corner cases: the radix passes (V > 2048 for
    top-k, > 1024 candidates for top-p), the pruning of light tokens before top-p, bins holding thousands of
    tied values, a K-th value tied across the boundary, -inf logits. Weights on the kept set: fp32 exp error.
    At every instruction-set level of this machine (AVX-512 has its own exponential for these weights)."""
    import contextlib

    from spdkernels import _cpp

    with _cpp.isa_cap(isa) if isa != "best" else contextlib.nullcontext():
        _check_thresholds(V)


def _check_thresholds(V):
    gen = torch.Generator().manual_seed(V)
    for name, row in _rows(V, gen).items():
        for T in (0.6, 1.5):
            for top_k, top_p in FILTERS:
                x = row.float()
                out, mass, tau = torch.ops.spdkernels._cpu_target_weights(row, T, top_k, top_p)
                w_ref = temperature_weights(x, T)
                keep = kept(x, w_ref, top_k, top_p)
                got = x >= tau
                case = f"{name} T={T} k={top_k} p={top_p}: {int(got.sum())} kept, reference {int(keep.sum())}"
                assert torch.equal(got, keep), case
                assert torch.equal(out > 0, keep & (w_ref > 0)), case
                torch.testing.assert_close(out[keep], w_ref[keep], rtol=2e-6, atol=1e-30, msg=case)
                assert mass == pytest.approx(float(w_ref[keep].double().sum()), rel=1e-5), case


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """The kernels' order-preserving int32 key of fp32 values (both zeros map to +0's)."""
    b = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


if "triton" in backends_here():  # (a kernel of the test module: Triton resolves the names it calls at module level)
    import triton
    import triton.language as tl
    from spdkernels.triton_kernels.rejection_sample import _threshold

    @triton.jit
    def _threshold_probe(x_ptr, V, lo, hi, need, floor, m, sc, out_ptr, MASS: tl.constexpr, BLOCK: tl.constexpr,
                         P: tl.constexpr, SUB: tl.constexpr):
        """One ``_threshold`` search over the row at x_ptr, its answer to out_ptr."""
        tl.store(out_ptr, _threshold(x_ptr, V, lo, hi, need, floor, m, sc, MASS, BLOCK, P, SUB))


def _top_p_margin(x, w_ref, keep, top_k, top_p):
    """How far (relative to the top-k set's mass, fp64) the reference's top-p boundary is from flipping: the smaller
    of f(its threshold) - need and need - f(the next key up); inf without top-p."""
    if top_p >= 1.0:
        return math.inf
    key = _order_key(x)
    keep_k = kept(x, w_ref, top_k, 1.0)
    w = torch.where(keep_k, w_ref.double(), torch.zeros((), dtype=torch.float64))
    total = float(w.sum())
    need = float(torch.tensor(top_p, dtype=torch.float32)) * total
    tau = int(key[keep].min())
    above = key[keep_k & (key > tau)]
    f_tau = float(w[key >= tau].sum())
    f_next = float(w[key >= above.min()].sum()) if above.numel() else -math.inf
    return min(f_tau - need, need - f_next) / total


def _within_rounding(x, w_ref, tau, top_k, top_p, rel=1e-6):
    """Whether the kept set {key(x) >= tau} is the reference's up to the rounding of the top-p masses: the top-k set
    exact, then f(tau) >= need and f(the next key up) < need within ``rel`` of the kept mass, where f(t) is the
    fp64 mass of the top-k set's keys >= t and need = top_p * (that set's mass) with top_p as the fp32 the kernels
    read."""
    key = _order_key(x)
    keep_k = kept(x, w_ref, top_k, 1.0)
    got = key >= tau
    if top_p >= 1.0 or bool((got & ~keep_k).any()):
        return torch.equal(got, keep_k)
    w = torch.where(keep_k, w_ref.double(), torch.zeros((), dtype=torch.float64))
    total = float(w.sum())
    need = float(torch.tensor(top_p, dtype=torch.float32)) * total
    above = key[keep_k & (key > tau)]
    f_tau = float(w[got].sum())
    f_next = float(w[key >= above.min()].sum()) if above.numel() else -math.inf
    return bool(got.any()) and f_tau >= need - rel * total and f_next < need + rel * total


@pytest.mark.skipif("triton" not in backends_here(), reason="Triton is not installed here")
@pytest.mark.parametrize("V", [3000, 4500] + ([40000] if ON_GPU else []))
def test_triton_top_k_top_p_threshold_equals_reference(V):
    """The Triton threshold kernels' kept set {key(x) >= tau} equals the reference's (sort-based top-k, float64
    cumsum top-p) on the rows and filters of the C++ test above (ties by the thousand, a K-th value tied across the
    boundary, -inf logits, a plateau of light tokens, a run of consecutive fp32 values across the boundaries,
    16-bit rows), one launch per row dtype with a request per (row, T, filter): token for token, except for top-p
    where the reference's boundary is within 2e-6 of the mass from flipping (Triton sums fp32 within 4096-token tiles,
    the reference in fp64): there up to the rounding of the masses. Its kept mass within fp32 summation error; rows
    without a filter (none given, K >= V, top-p 1 or NaN) keep everything. (V = 4500 spans two of the searches'
    4096-token tiles.)"""
    from spdkernels.triton_kernels.rejection_sample import row_stats

    gen = torch.Generator().manual_seed(V)
    by_dtype = {}
    for name, row in _rows(V, gen).items():
        for T in (0.6, 1.5):
            for top_k, top_p in FILTERS:
                by_dtype.setdefault(row.dtype, []).append((name, row, T, top_k, top_p))
    for cases in by_dtype.values():
        rows = torch.stack([c[1] for c in cases]).to(DEVICE)
        R = len(cases)
        m, tau, mass, _ = row_stats(rows, torch.arange(R, dtype=torch.int32, device=DEVICE),
                                    torch.tensor([c[2] for c in cases], dtype=torch.float32, device=DEVICE),
                                    torch.tensor([c[3] for c in cases], dtype=torch.int32, device=DEVICE),
                                    torch.tensor([c[4] for c in cases], dtype=torch.float32, device=DEVICE))
        m, tau, mass = m.cpu(), tau.cpu(), mass.cpu()
        for i, (name, row, T, top_k, top_p) in enumerate(cases):
            x = row.float()
            w_ref = temperature_weights(x, T)
            keep = kept(x, w_ref, top_k, top_p)
            got = _order_key(x) >= tau[i]
            case = f"{name} T={T} k={top_k} p={top_p}: {int(got.sum())} kept, reference {int(keep.sum())}"
            if _top_p_margin(x, w_ref, keep, top_k, top_p) >= 2e-6:
                assert torch.equal(got, keep), case
            else:
                assert _within_rounding(x, w_ref, int(tau[i]), top_k, top_p), case
            assert float(m[i]) == float(x.max()), case
            want = float((torch.exp((x[got].double() - float(x.max())) / T)).sum())
            assert float(mass[i]) == pytest.approx(want, rel=1e-5), case
    # rows without a filter: the search kernel leaves them alone (threshold INT_MIN, the whole mass)
    row = _rows(V, torch.Generator().manual_seed(V))["flat"].to(DEVICE)
    unfiltered = [(0, 1.0), (V, 1.0), (V + 5, float("nan")), (0, 1.5)]
    n = len(unfiltered)
    m, tau, mass, _ = row_stats(row.expand(n, V).contiguous(), torch.arange(n, dtype=torch.int32, device=DEVICE),
                                torch.full((n,), 0.8, device=DEVICE),
                                torch.tensor([k for k, _ in unfiltered], dtype=torch.int32, device=DEVICE),
                                torch.tensor([p for _, p in unfiltered], dtype=torch.float32, device=DEVICE))
    full = float(torch.exp((row.cpu().double() - float(row.max())) / 0.8).sum())
    assert tau.cpu().tolist() == [-2 ** 31] * n
    assert mass.cpu().tolist() == pytest.approx([full] * n, rel=1e-5)


@pytest.mark.skipif("triton" not in backends_here(), reason="Triton is not installed here")
def test_triton_threshold_search_against_brute_force():
    """The search itself (``_threshold``, through a probe kernel) against a brute force over the keys present: the
    largest key t with f(t) >= need, f counting (top-k) or summing weights (top-p) over keys >= max(t, floor), on
    rows whose keys are a few ulps apart (an interval of fewer keys than pivots: pivots repeat), with ties, with a
    floor, and with need above the whole mass, where the answer is the interval's lowest key (a search that took
    the empty first bucket there returned a key above every token)."""
    import triton
    from spdkernels.triton_kernels import rejection_sample as RS

    gen = torch.Generator().manual_seed(5)
    base = torch.full((1,), 1.0)
    steps = [base]
    for _ in range(30):
        steps.append(torch.nextafter(steps[-1], torch.tensor(math.inf)))
    steps = torch.cat(steps)  # 31 consecutive fp32 values
    rows = {"ulps": steps[torch.randint(0, 31, (300,), generator=gen)],
            "ulps-few": steps[torch.randint(0, 5, (70,), generator=gen)],
            "spread": torch.randn(600, generator=gen) * 2}
    rows["mixed"] = torch.cat([rows["ulps"], rows["spread"]])
    for name, x in rows.items():
        key = _order_key(x)
        present = torch.unique(key)
        for T in (0.7, 2.0):
            sc = math.log2(math.e) / T
            m = float(x.max())
            w = torch.exp2((x.double() - m) * sc)
            for mass in (False, True):
                tot = float(w.sum()) if mass else float(x.numel())
                wt = w if mass else torch.ones_like(w)
                for floor in (int(present[0]), int(present[len(present) // 3])):
                    # f(t) for every present key t >= floor (present is ascending: suffix sums)
                    fs = {int(t): float(wt[key >= max(int(t), floor)].sum()) for t in present if int(t) >= floor}
                    for need in (0.3 * tot, 0.9 * tot, 0.999 * tot, 1.0, 2.0 * tot):
                        need = float(np.float32(need))  # (the probe's fp32 argument)
                        ok = [t for t, ft in fs.items() if ft >= need]
                        lo = max(int(present[0]), floor)
                        want = max(ok) if ok else lo
                        out = torch.empty(1, dtype=torch.int32, device=DEVICE)
                        V = x.numel()
                        bs = min(RS.BLOCK_S, triton.next_power_of_2(V))
                        _threshold_probe[(1,)](x.to(DEVICE), V, lo, int(present[-1]), need, floor, m, sc, out,
                                               MASS=mass, BLOCK=bs, P=RS.PIVOTS, SUB=2)
                        got = int(out[0])
                        case = f"{name} T={T} mass={mass} floor={floor} need={need / tot:.3f} x total"
                        # f at the answer and at the next key up (fs is in ascending key order)
                        near = [fs[want]] + [ft for t, ft in fs.items() if t > want][:1]
                        if mass and ok and min(abs(ft - need) for ft in near) < 2e-6 * tot:
                            continue  # (a boundary within fp32 rounding of need: either side is right)
                        assert got == want, f"{case}: got key {got}, want {want}"


# ---- distribution: the emitted tokens follow the target exactly -----------------------------------

V_D = 10


def dist_setup(R, with_q, tree, gen, T=0.8, top_k=7, top_p=0.85):
    """R identical requests with different coins and (when drafts are stochastic) different drafts.
    Tree: root -> m children; each child -> one grandchild. The row of a node is a function of its
    token path only, as in a real model: root row L0, child with token t -> L1[t]."""
    m = 3 if tree else 1
    L0 = torch.randn(V_D, generator=gen) * 1.5
    L1 = torch.randn(V_D, V_D, generator=gen) * 1.5
    L2 = torch.randn(V_D, generator=gen)
    q0 = torch.softmax(torch.randn(V_D, generator=gen), -1)
    q1 = torch.softmax(torch.randn(V_D, generator=gen), -1)
    k = 2 * m
    parents = ([-1] * m + list(range(m))) if tree else [-1, 0]
    toks, rows, qs = [], [], []
    # point-mass drafts propose the target's likely tokens, as a real deterministic drafter would
    fixed0 = torch.argsort(L0, descending=True)[[1, 0, 2][:m]].tolist()
    fixed1 = 4
    for _ in range(R):
        t0 = torch.multinomial(q0, m, replacement=True, generator=gen).tolist() if with_q else fixed0
        t1 = torch.multinomial(q1, m, replacement=True, generator=gen).tolist() if with_q else [fixed1] * m
        toks += t0 + t1
        rows += [L0] + [L1[t] for t in t0] + [L2] * m
        qs += [q0] * m + [q1] * m
    R_t = torch.full((R,), T)
    kw = dict(temperature=R_t, top_k=torch.full((R,), top_k, **I32), top_p=torch.full((R,), top_p),
              seed=torch.arange(R, dtype=torch.int64) * 7919 + 1)
    if with_q:
        kw["draft_probs"] = torch.stack(qs)
    batch = random_draft_batch([k] * R, V_D, tree=tree, gen=gen)
    batch.target_logits = torch.stack(rows)
    batch.draft_token_ids = torch.tensor(toks)
    batch.parents = torch.tensor(parents * R, **I32) if tree else None
    batch.max_depth = 2
    target = lambda x: (lambda w: w / w.sum())(reference.target_weights(x, T, top_k, top_p))  # noqa: E731
    return batch, kw, target(L0), [target(L1[t]) for t in range(V_D)], (q0, fixed0)


def chi2_pvalue(samples, p):
    """Chi-square goodness of fit; a sample on a zero-probability token fails outright."""
    p = np.asarray(p, dtype=np.float64)
    counts = np.bincount(np.asarray(samples), minlength=len(p))
    if counts[p == 0].sum() > 0:
        return 0.0
    keep = p > 0
    return chisquare(counts[keep], counts[keep].sum() * p[keep] / p[keep].sum()).pvalue


DIST = list(itertools.product([False, True], [False, True], [(0.8, 7, 0.85), (1.0, 0, 1.0), (1.7, 0, 0.6)]))
# nki: the emulation runs ~10^5 instructions per 1000 requests here; 2500 keeps > 200 samples for the second
# token in every case (the token-for-token comparison with the reference on shared coins is the sharper test)
R_DIST = {"torch": 3000, "cpp": 30000, "triton": 3000, "nki": 2500}


# The Triton interpreter runs ~15 requests a second here: two cases (a tree with draft_probs; a chain of point-mass
# drafts under top-p) with R_DIST_INTERP requests, whose power against a wrong residual rule is shown by
# test_distribution_test_catches_a_wrong_algorithm at that size; on a GPU every case with the full samples.
R_DIST_INTERP = 400
DIST_INTERP = [(True, True, (1.0, 0, 1.0)), (False, False, (1.7, 0, 0.6))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tree,with_q,cfg", DIST,
                         ids=[f"{'tree' if t else 'chain'}-{'q' if q else 'pointmass'}-T{c[0]}-k{c[1]}-p{c[2]}"
                              for t, q, c in DIST])
def test_emitted_tokens_follow_the_target(backend, tree, with_q, cfg):
    R = R_DIST.get(backend, 3000)
    if backend == "triton" and not ON_GPU:
        if (tree, with_q, cfg) not in DIST_INTERP:
            pytest.skip("under the Triton interpreter two cases run, with fewer samples (minutes each at full "
                        "size); every case runs with the full samples on a GPU")
        R = R_DIST_INTERP
    gen = torch.Generator().manual_seed(hash((tree, with_q, cfg)) % 2**31)
    batch, kw, p0, p1, _ = dist_setup(R, with_q, tree, gen, *cfg)
    out, num, _ = run(backend, batch, **kw)
    first = out[:, 0].numpy()
    assert chi2_pvalue(first, p0) > 1e-4
    # the token after an accepted first node follows that node's row
    acc = (num >= 2).numpy()
    t_star = np.bincount(first[acc], minlength=V_D).argmax()
    sel = acc & (first == t_star)
    assert sel.sum() > min(200, R // 5)
    assert chi2_pvalue(out[:, 1].numpy()[sel], p1[t_star]) > 1e-4


def wrong_first_tokens(variant, R, batch, kw, p0, q0, fixed0, tree):
    """First emitted token under a subtly wrong algorithm, same drafts and coins."""
    m = 3 if tree else 1
    k = 2 * m
    u = reference.coins_from_seed(batch.cu_num_draft, kw["seed"], torch.zeros(R, dtype=torch.int64)).numpy()
    toks = batch.draft_token_ids.numpy().reshape(R, k)
    N = R * k
    p0 = p0.double().numpy()
    q = q0.double().numpy() if "draft_probs" in kw else None
    res = []
    for r in range(R):
        p = p0.copy()
        emitted = None
        for c in range(m):
            t = toks[r, c]
            qv = q if q is not None else np.eye(V_D)[t]
            if p[t] > 0 and u[r * k + c] * qv[t] <= p[t]:
                emitted = t
                break
            resid = np.maximum(0, p - qv)
            if variant == "residual_not_renormalised":
                p = resid
            elif variant == "siblings_against_original_p":
                p = p if c < m - 1 else resid / resid.sum()
            elif resid.sum() > 0:  # the right rule
                p = resid / resid.sum()
        if emitted is None:
            c = np.cumsum(p)
            emitted = int(np.searchsorted(c, u[N + r] * c[-1], side="right"))
        res.append(emitted)
    return np.array(res)


@pytest.mark.parametrize("variant", ["residual_not_renormalised", "siblings_against_original_p"])
def test_distribution_test_catches_a_wrong_algorithm(variant):
    """The distribution check above, applied to deliberately wrong variants, must fail: proof that it
    has the power to tell a subtly wrong algorithm from the right one at these sample sizes."""
    gen = torch.Generator().manual_seed(12)
    R = 30000
    batch, kw, p0, _, (q0, fixed0) = dist_setup(R, True, True, gen, 1.0, 0, 1.0)
    wrong = wrong_first_tokens(variant, R, batch, kw, p0, q0, fixed0, True)
    assert chi2_pvalue(wrong, p0) < 1e-6
    # and the same walk written correctly passes, so the failure is the variant's, not the harness's
    right = wrong_first_tokens("correct", R, batch, kw, p0, q0, fixed0, True)
    assert chi2_pvalue(right, p0) > 1e-4


@pytest.mark.parametrize("seed", range(3))
def test_interpreter_sample_size_catches_a_wrong_sibling_rule(seed):
    """At the Triton interpreter's R_DIST_INTERP requests, the tree case of the distribution test still fails a
    walk that tests later siblings against the original p instead of the residual (the subtler unnormalised
    residual needs the full samples: it is left to the GPU and to the other backends)."""
    gen = torch.Generator().manual_seed(100 + seed)
    R = R_DIST_INTERP
    batch, kw, p0, _, (q0, fixed0) = dist_setup(R, True, True, gen, *DIST_INTERP[0][2])
    assert chi2_pvalue(wrong_first_tokens("siblings_against_original_p", R, batch, kw, p0, q0, fixed0, True),
                       p0) < 1e-6
    assert chi2_pvalue(wrong_first_tokens("correct", R, batch, kw, p0, q0, fixed0, True), p0) > 1e-4


# ---- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_tokens_whatever_the_batch(backend):
    gen = torch.Generator().manual_seed(13)
    big = random_draft_batch([4, 6, 3, 5], 200, tree=True, gen=gen, match_prob=0.5)
    seed = torch.tensor([11, 22, 33, 44])
    offset = torch.tensor([5, 6, 7, 8])
    out, num, path = run(backend, big, seed=seed, offset=offset)
    # request 2 alone, then in a batch with other requests in front of it
    for sel in ([2], [1, 2], [3, 0, 2]):
        sub = _subbatch(big, sel)
        o, n, p = run(backend, sub, seed=seed[sel], offset=offset[sel])
        j = sel.index(2)
        D = min(big.max_depth, sub.max_depth)
        assert n[j] == num[2] and torch.equal(o[j, : D + 1], out[2, : D + 1]) and torch.equal(p[j, :D], path[2, :D])
    u_a = reference.coins_from_seed(big.cu_num_draft, seed, offset)
    u_b = reference.coins_from_seed(big.cu_num_draft, seed, offset + 1)
    assert not torch.equal(u_a, u_b)


def _subbatch(b, sel):
    cu = b.cu_num_draft.tolist()
    logits, toks, parents, ks = [], [], [], []
    for r in sel:
        k = cu[r + 1] - cu[r]
        logits.append(b.target_logits[cu[r] + r: cu[r + 1] + r + 1])
        toks.append(b.draft_token_ids[cu[r]: cu[r + 1]])
        parents.append(b.parents[cu[r]: cu[r + 1]])
        ks.append(k)
    new_cu = torch.tensor([0] + list(itertools.accumulate(ks)), **I32)
    par = torch.cat(parents)
    return type(b)(torch.cat(logits), torch.cat(toks), new_cu, par, tree_max_depth(new_cu, par))


# ---- validation -----------------------------------------------------------------------------------

def good():
    gen = torch.Generator().manual_seed(9)
    b = random_draft_batch([2, 3], 11, tree=True, gen=gen)
    return dict(target_logits=b.target_logits, draft_token_ids=b.draft_token_ids, cu_num_draft=b.cu_num_draft,
                parents=b.parents, max_depth=b.max_depth, seed=torch.tensor([1, 2]))


def nan_at(shape, idx, value=float("nan")):
    t = torch.zeros(shape)
    t.view(-1)[idx] = value
    return t


INVALID = {
    "logits-nan": (dict(target_logits=nan_at((7, 11), 5)), "target_logits: contains NaN"),
    "logits-posinf": (dict(target_logits=nan_at((7, 11), 5, float("inf"))), r"target_logits: contains \+inf"),
    "logits-row-all-neginf": (dict(target_logits=torch.zeros(7, 11).index_fill_(0, torch.tensor([2]),
                                                                                 float("-inf"))), "row 2"),
    "draft-probs-shape": (dict(draft_probs=torch.zeros(5, 10)), r"draft_probs.*\[N, V\]"),
    "draft-probs-dtype": (dict(draft_probs=torch.zeros(5, 11, dtype=torch.float64)), "draft_probs"),
    "draft-probs-nan": (dict(draft_probs=nan_at((5, 11), 3)), "draft_probs: contains NaN"),
    "draft-probs-negative": (dict(draft_probs=nan_at((5, 11), 3, -0.1)), "draft_probs: contains negative"),
    "temperature-negative": (dict(temperature=torch.tensor([1.0, -0.5])), "temperature"),
    "temperature-nan": (dict(temperature=torch.tensor([1.0, float("nan")])), "temperature"),
    "temperature-shape": (dict(temperature=torch.tensor([1.0])), r"temperature.*\[R\]"),
    "top-k-negative": (dict(top_k=torch.tensor([1, -1], **I32)), "top_k"),
    "top-k-dtype": (dict(top_k=torch.tensor([1, 1])), "top_k"),
    "top-p-zero": (dict(top_p=torch.tensor([0.0, 0.5])), r"top_p.*\(0, 1\]"),
    "top-p-above-one": (dict(top_p=torch.tensor([1.5, 0.5])), r"top_p.*\(0, 1\]"),
    "uniforms-and-seed": (dict(uniforms=torch.full((7,), 0.5)), "uniforms.*not both"),
    "uniforms-zero": (dict(uniforms=torch.tensor([0.5] * 6 + [0.0]), seed=None), r"uniforms.*\(0, 1\)"),
    "uniforms-shape": (dict(uniforms=torch.full((6,), 0.5), seed=None), r"uniforms.*\[N \+ R\]"),
    "seed-dtype": (dict(seed=torch.tensor([1, 2], **I32)), "seed"),
    "offset-shape": (dict(offset=torch.tensor([1, 2, 3])), "offset"),
    "tokens-out-of-range": (dict(draft_token_ids=torch.tensor([0, 1, 11, 2, 3])), "draft_token_ids"),
    "parents-order": (dict(parents=torch.tensor([-1, 1, -1, 0, 1], **I32)), "parents"),
    "cu-decreasing": (dict(cu_num_draft=torch.tensor([0, 6, 5], **I32)), "cu_num_draft"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_validation_errors(case):
    kw = good()
    changes, pattern = INVALID[case]
    kw.update(changes)
    with pytest.raises(ValueError, match=pattern):
        spdkernels.rejection_sample(kw.pop("target_logits"), kw.pop("draft_token_ids"), kw.pop("cu_num_draft"), **kw)


# the value checks that only validation makes: with it off, such input must still give a well-formed answer (tokens
# in the vocabulary, -1 padding, a root-to-leaf path) on every backend; which tokens is unspecified
UNCHECKED_VALUES = ["logits-nan", "logits-posinf", "logits-row-all-neginf", "draft-probs-nan", "draft-probs-negative",
                    "temperature-nan", "top-p-above-one", "uniforms-zero"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", UNCHECKED_VALUES)
@pytest.mark.parametrize("filters", [False, True], ids=["plain", "top-k-top-p"])
def test_bad_values_with_validation_off_still_give_well_formed_answers(backend, case, filters):
    """NaN / inf rows, a row without a finite logit, NaN or negative draft probabilities, a NaN temperature,
    top_p above 1, a zero coin: validation off skips the checks that would name them, and the answer must still
    be well formed, or name the argument (until the reference's inverse CDF fell back to the last positive weight
    like the kernels,
    a row whose weights summed to NaN raised an IndexError on the torch backend). Every request is made to reach
    the bad row: its first draft is its target's certain choice."""
    kw = good()
    kw.update(INVALID[case][0])
    logits = kw["target_logits"].clone()
    toks, cu, par = kw["draft_token_ids"], kw["cu_num_draft"], kw["parents"]
    for r in range(len(cu) - 1):
        first = int(cu[r])
        if torch.isfinite(logits[first]).all():
            logits[first, int(toks[first])] = 40.0
    kw["target_logits"] = logits
    if filters:
        kw.setdefault("top_k", torch.tensor([3, 5], **I32))
        kw.setdefault("top_p", torch.tensor([0.8, 0.9]))
    if case == "uniforms-zero":
        kw["uniforms"] = torch.tensor([0.0] * 7)
    rest = {k: v for k, v in kw.items() if k not in ("target_logits", "draft_token_ids", "cu_num_draft", "parents",
                                                      "max_depth")}
    with spdkernels.validation(False):
        if backend == "nki" and filters and case in ("logits-nan", "logits-posinf", "logits-row-all-neginf",
                                                      "temperature-nan"):
            # the NKI launcher reads back whether each top-k / top-p search closed; one fed NaN or inf cannot, and
            # it then names the input instead of returning
            with pytest.raises(ValueError, match="temperature" if case == "temperature-nan" else "target_logits"):
                run(backend, _Batch(logits, toks, cu, par, kw["max_depth"]), **rest)
            return
        out, num, path = run(backend, _Batch(logits, toks, cu, par, kw["max_depth"]), **rest)
    batch = _Batch(logits, toks, cu, par, path.shape[1])
    check_structure(batch, out, num, path)
    assert (out < logits.shape[1]).all()


class _Batch:
    """A draft batch as ``run`` and ``check_structure`` read it."""

    def __init__(self, logits, toks, cu, par, max_depth):
        self.target_logits, self.draft_token_ids, self.cu_num_draft, self.parents = logits, toks, cu, par
        self.max_depth, self.R = max_depth, len(cu) - 1

    def args(self):
        return self.target_logits, self.draft_token_ids, self.cu_num_draft


def test_op_needs_coins():
    kw = good()
    with pytest.raises(ValueError, match="seed"):
        torch.ops.spdkernels.rejection_sample(kw["target_logits"], kw["draft_token_ids"], kw["cu_num_draft"],
                                              kw["parents"], None, None, None, None, None, None, None, kw["max_depth"])


def test_default_generator_path_is_seeded_by_torch():
    kw = good()
    kw.pop("seed")
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(spdkernels.rejection_sample(kw["target_logits"], kw["draft_token_ids"], kw["cu_num_draft"],
                                                parents=kw["parents"]))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_docstring_example_is_right():
    import doctest
    import importlib

    mod = importlib.import_module("spdkernels.ops.rejection_sample")
    res = doctest.testmod(mod, extraglobs={"torch": torch, "rejection_sample": spdkernels.rejection_sample})
    assert res.attempted >= 1 and res.failed == 0


# ---- probability rows and given bonus tokens (the layouts of vLLM, FlashInfer and sgl-kernel) ----------------

def _onehot_rows(tokens, V):
    """Logit rows whose target distribution is exactly the one-hot of each token (the other weights underflow to 0)."""
    rows = torch.full((len(tokens), V), -1e4)
    rows[torch.arange(len(tokens)), torch.as_tensor(tokens)] = 0.0
    return rows


def _bonus_batch(R, V, gen, max_k=4):
    """A chain batch with some requests without drafts, and its bonus tokens: (full batch with N + R rows whose row
    after each request's last draft is the one-hot of its bonus token, the N rows of the bonus layout, bonus)."""
    ks = torch.randint(0, max_k + 1, (R,), generator=gen).tolist()
    ks[0], ks[-1] = 0, max_k
    batch = random_draft_batch(ks, V, gen=gen, match_prob=0.8)
    bonus = torch.randint(0, V, (R,), generator=gen)
    cu = batch.cu_num_draft.tolist()
    last_rows = [cu[r + 1] + r for r in range(R)]  # the row after request r's last draft
    keep = [i for i in range(batch.N + R) if i not in set(last_rows)]
    rows_n = batch.target_logits[keep].clone()
    batch.target_logits[last_rows] = _onehot_rows(bonus, V)
    batch.max_depth = max_k
    return batch, rows_n, bonus


def _run_layout(backend, batch, rows, **kw):
    """The op on ``backend`` with ``rows`` as target_logits (any row count) and the batch's drafts."""
    rows, toks, cu = to_backend(backend, (rows, batch.draft_token_ids, batch.cu_num_draft))
    with use_backend(backend):
        out = spdkernels.rejection_sample(rows, toks, cu, parents=None, max_depth=batch.max_depth,
                                          **to_backend(backend, kw))
    return tuple(t.cpu() for t in out)


def _mixed_temperature(R, gen, probs):
    T = torch.ones(R) if probs else torch.rand(R, generator=gen) + 0.5
    T[1::3] = 0.0  # greedy requests in the same batch
    return T


@pytest.mark.parametrize("backend", WITH_ISAS)
@pytest.mark.parametrize("with_q", [False, True])
def test_bonus_tokens_equal_a_one_hot_row_after_the_last_draft(backend, with_q):
    """bonus_token_ids with N rows = the usual layout whose row after each request's last draft puts all its mass
    on the bonus token: the same tokens, counts and paths, for sampled and greedy requests, with and without
    draft probabilities, requests without drafts included."""
    small = backend in ("triton", "nki") and not ON_GPU
    R, V = (7, 97) if small else (64, 1000)
    gen = torch.Generator().manual_seed(31 + with_q)
    batch, rows_n, bonus = _bonus_batch(R, V, gen)
    N = batch.N
    kw = dict(temperature=_mixed_temperature(R, gen, False), uniforms=torch.rand(N + R, generator=gen) * 0.98 + 0.01)
    if with_q:
        kw["draft_probs"] = torch.softmax(torch.randn(N, V, generator=gen) * 2, -1)
    want = _run_layout(backend, batch, batch.target_logits, **kw)
    got = _run_layout(backend, batch, rows_n, bonus_token_ids=bonus.to(torch.int32), **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert got[0][0, 0] == bonus[0] and got[1][0] == 1  # request 0 has no draft: its bonus token at once
    assert (got[1] == torch.tensor([k + 1 for k in (batch.cu_num_draft[1:] - batch.cu_num_draft[:-1]).tolist()])
            ).any()  # some request accepted every draft and emitted its bonus token


def _probs_of(rows):
    """The reference's own fp32 probabilities of logit rows (T = 1): what its logits path samples from."""
    return torch.stack([normalise(temperature_weights(x, 1.0)) for x in rows])


def _probs_case(R, V, gen, with_q):
    """Probability rows (_probs_of random logit rows) for a chain batch with mixed greedy and sampled requests."""
    ks = torch.randint(1, 4, (R,), generator=gen).tolist()
    batch = random_draft_batch(ks, V, gen=gen, match_prob=0.8)
    probs = _probs_of(batch.target_logits)
    N = batch.N
    kw = dict(temperature=_mixed_temperature(R, gen, True), uniforms=torch.rand(N + R, generator=gen) * 0.98 + 0.01)
    if with_q:
        kw["draft_probs"] = torch.softmax(torch.randn(N, V, generator=gen) * 2, -1)
    return batch, probs, kw


def test_reference_probability_rows_equal_logit_rows():
    """The reference with target_is_probs on the probabilities its logits path computes takes the same decisions as
    with the logits: the same p at every row, the same residuals, the same draws."""
    gen = torch.Generator().manual_seed(5)
    for with_q in (False, True):
        batch, probs, kw = _probs_case(40, 300, gen, with_q)
        want = _run_layout("torch", batch, batch.target_logits, **kw)
        got = _run_layout("torch", batch, probs, target_is_probs=True, **kw)
        for g, x in zip(got, want):
            assert torch.equal(g, x)
        assert (got[1] > 1).any() and (got[1] == 1).any()  # acceptances and rejections both occurred


@pytest.mark.parametrize("backend", WITH_ISAS)
@pytest.mark.parametrize("with_q,bonus", [(False, False), (True, False), (True, True)])
def test_probability_rows_match_reference(backend, with_q, bonus):
    """target_is_probs: every backend takes the reference's decisions on the same coins, token for token (greedy and
    sampled requests mixed, with the bonus layout too)."""
    small = backend in ("triton", "nki") and not ON_GPU
    R, V = (6, 131) if small else (80, 2000)
    gen = torch.Generator().manual_seed(77 + 2 * with_q + bonus)
    batch, probs, kw = _probs_case(R, V, gen, with_q)
    if bonus:
        b, rows_n, bt = _bonus_batch(R, V, gen)
        batch, probs = b, _probs_of(rows_n)
        kw["uniforms"] = torch.rand(batch.N + R, generator=gen) * 0.98 + 0.01
        kw["bonus_token_ids"] = bt
        if with_q:
            kw["draft_probs"] = torch.softmax(torch.randn(batch.N, V, generator=gen) * 2, -1)
    want = _run_layout("torch", batch, probs, target_is_probs=True, **kw)
    got = _run_layout(backend, batch, probs, target_is_probs=True, **kw)
    for g, x in zip(got, want):
        assert torch.equal(g, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probability_rows_in_half_precision_match_reference(dtype):
    """bf16 / fp16 probability rows: each backend reads them as the reference does (widened to fp32)."""
    gen = torch.Generator().manual_seed(8)
    batch, probs, kw = _probs_case(24, 500, gen, True)
    probs = probs.to(dtype)
    want = _run_layout("torch", batch, probs, target_is_probs=True, **kw)
    for backend in [b for b in BACKENDS if b not in ("torch", "nki")]:
        got = _run_layout(backend, batch, probs, target_is_probs=True, **kw)
        for g, x in zip(got, want):
            assert torch.equal(g, x), backend


def _probs_dist_case(R, gen):
    """Drafts from q, the target a probability row p0 for the first token and p1 after it."""
    V = V_D
    p0 = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    p1 = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=gen), -1)
    toks = torch.multinomial(q.expand(R, V), 1, replacement=True, generator=gen)[:, 0]
    rows = torch.stack([p0, p1]).repeat(R, 1)  # request r: rows 2r (verifies its draft), 2r + 1 (after it)
    cu = torch.arange(R + 1, dtype=torch.int32)
    kw = dict(draft_probs=q.expand(R, V).contiguous(), seed=torch.arange(R, dtype=torch.int64) * 131 + 7)
    return rows, toks, cu, kw, p0, p1


@pytest.mark.parametrize("backend", BACKENDS)
def test_probability_rows_emit_the_target_distribution(backend):
    """Tokens emitted from probability rows follow the rows (first token: accepted draft or residual sample; second
    token after an accepted draft: the next row)."""
    R = 400 if backend == "triton" and not ON_GPU else (2500 if backend == "nki" else 20000)
    gen = torch.Generator().manual_seed(2024)
    rows, toks, cu, kw, p0, p1 = _probs_dist_case(R, gen)
    with use_backend(backend):
        out, num, _ = spdkernels.rejection_sample(*to_backend(backend, (rows, toks, cu)), max_depth=1,
                                                  target_is_probs=True, **to_backend(backend, kw))
    out, num = out.cpu(), num.cpu()
    assert chi2_pvalue(out[:, 0].numpy(), p0) > 1e-4
    acc = (num == 2).numpy()
    assert acc.sum() > min(150, R // 5)
    assert chi2_pvalue(out[:, 1].numpy()[acc], p1) > 1e-4


@pytest.mark.parametrize("R", [400, 20000], ids=["interpreter-size", "full-size"])
def test_probability_rows_distribution_test_catches_the_flag_forgotten(R):
    """The planted bug (probabilities read as logits: target_is_probs forgotten) fails the same test, at the
    smallest sample size the backends use above too."""
    gen = torch.Generator().manual_seed(2024)
    rows, toks, cu, kw, p0, _ = _probs_dist_case(R, gen)
    backend = "cpp" if "cpp" in BACKENDS else "torch"
    with use_backend(backend):
        bad, _, _ = spdkernels.rejection_sample(rows, toks, cu, max_depth=1, **kw)
    assert chi2_pvalue(bad[:, 0].numpy(), p0) < 1e-6


def test_probability_rows_and_bonus_tokens_refuse_bad_input():
    gen = torch.Generator().manual_seed(3)
    batch, rows_n, bonus = _bonus_batch(4, 50, gen)
    toks, cu = batch.draft_token_ids, batch.cu_num_draft
    probs = torch.softmax(batch.target_logits, -1)

    def call(rows, **kw):
        return spdkernels.rejection_sample(rows, toks, cu, max_depth=batch.max_depth, seed=torch.arange(4), **kw)

    with pytest.raises(ValueError, match="^target_logits: expected shape \\[N, V\\]"):
        call(batch.target_logits, bonus_token_ids=bonus)  # N + R rows with bonus tokens
    with pytest.raises(ValueError, match="^bonus_token_ids: expected shape"):
        call(rows_n, bonus_token_ids=bonus[:3])
    with pytest.raises(ValueError, match="^bonus_token_ids: expected dtype"):
        call(rows_n, bonus_token_ids=bonus.float())
    with pytest.raises(ValueError, match="^bonus_token_ids: only for chains"):
        spdkernels.rejection_sample(rows_n, toks, cu, parents=torch.full((batch.N,), -1, dtype=torch.int32),
                                    max_depth=batch.max_depth, seed=torch.arange(4), bonus_token_ids=bonus)
    with pytest.raises(ValueError, match="^bonus_token_ids: token ids must lie in"):
        call(rows_n, bonus_token_ids=bonus + 50)
    with pytest.raises(ValueError, match="^top_k: not applied to probabilities"):
        call(probs, target_is_probs=True, top_k=torch.full((4,), 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="^top_p: not applied to probabilities"):
        call(probs, target_is_probs=True, top_p=torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="^temperature: with target_is_probs=True"):
        call(probs, target_is_probs=True, temperature=torch.full((4,), 0.7))
    with pytest.raises(ValueError, match="^target_logits: contains negative probabilities"):
        call(probs - 0.5, target_is_probs=True)
    off = probs.clone()
    off[2] *= 0.9
    with pytest.raises(ValueError, match="^target_logits: row 2 sums to 0.9"):
        call(off, target_is_probs=True)
    with pytest.raises(ValueError, match="^target_is_probs: expected a bool"):
        call(probs, target_is_probs=1)
