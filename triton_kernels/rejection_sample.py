"""Triton rejection_sample: lossless speculative sampling of chains and token trees, from logits or probabilities.

Same algorithm and definitions as ``spdkernels/reference/rejection_sample.py``; probabilities are never
materialised for a whole row unless a rejection forces a residual.

Kernel 1, ``_row_stats_kernel``: grid (N + R,) (N with bonus tokens), one program per logit row (every row, so
the whole GPU works even for small batches; a walk would visit them one after another). It reads the row's request
from a row -> request map (``repeat_interleave`` on the device, no host sync) and computes, without
sorting and without writing probabilities:

* greedy requests (T = 0): the argmax (ties to the lowest id);
* otherwise the row max ``m`` and the mass ``M = sum exp((x - m) / T)`` in one streaming pass (online
  max/sum, lane-wise rescaling).

Kernel 1b, ``_threshold_kernel``: the same grid; the rows of requests with top-k / top-p (the other programs
return at once) get their thresholds: the largest logit value ``tau`` whose upper set holds at least ``K`` tokens
(top-k), then at least ``top_p`` of the top-k mass (top-p). Both are searches over the order-preserving int32 key of
the logits: each pass evaluates 16 pivots at once and narrows the interval to the smallest and largest key actually
present in the chosen bucket, so it ends after a handful of passes on real rows (at most 8: 16^8 = 2^32 keys). A
pass keeps its sums and bucket bounds per lane of a [16, 256] tile laid out so that each thread holds one token's
16 pivot lanes: its inner loop over the row has no reduction across threads (in the PTX of Triton 3.9 and 3.6 for
sm_90: no shared memory, no barrier, ``bench/ptx_loops.py``); the sums are reduced across the block once per 4096
tokens, the bounds once per pass. Ties at the boundary are kept, exactly as in the reference.
Then ``M`` is recomputed over the kept set. (Its tiles need ~125 registers a thread: in kernel 1 they would cost
every row's streaming pass a third of its blocks per SM.)

Kernel 2, ``_walk_kernel``: grid (R,), one program per request. The target probability of a draft
token is one scalar load (``exp((x_t - m) / T) / M``). A point-mass rejection removes one token:
``M -= w_t`` and the token is excluded (no pass over the vocabulary for the first one; a second
exclusion under the same node writes the residual to a per-request scratch row); when that leaves less than
``RESUM_BELOW`` of ``M`` (a cancellation: ``M`` carries the rounding of its sums) the mass left is summed again
from the weights, as the C++ kernel does, so a tiny residual is sampled exactly and a zero one leaves ``p``
unchanged. A rejection against ``draft_probs`` writes ``max(0, p - q)`` to the scratch row in one pass. The walk
ends by writing what its request draws from (row, excluded token or scratch row, mass).

Kernels 3 and 4, ``_tile_mass_kernel`` (grid (R, tiles)) and ``_draw_kernel`` (grid (R,)): the final token by
inverse CDF over token ids. Every tile's mass of every drawing request at once, then per request the tile where the
running mass passes ``u * mass`` (an fp64 prefix over the tile masses) and a search of that tile alone.

Arithmetic: weights are ``exp2((x - m) * sc)`` with ``sc = log2(e) / T`` computed once per row (a multiply, not a
divide, per element). Sums are fp32 within a tile and fp64 only across tiles (fp64 runs at 1/64 rate on
L4/L40S/RTX parts, and [BLOCK] fp64 vectors cost twice the registers). Coins are explicit
uniforms or Philox4x32-10 keyed by (seed, offset) with counter (node, stream): the same bits as the
reference and the C++ backend, no host sync, CUDA-graph safe for a fixed max_depth.

Two compile-time modes (``tl.constexpr`` flags; with both off the kernels compile to the logits code):

* ``PROBS`` (``target_is_probs``): the rows hold probabilities, used as given. A sampled request's weights are the
  row's values themselves (fp32; no max, no exponential, no temperature, no filters) with mass 1, so kernel 1 does
  not read its rows (it only takes the argmax for greedy requests) and an accepted row costs the walk one load,
  ``p(t) = x_t``. Where the row's actual sum matters it is summed (fp32 per tile, fp64 across tiles): by the walk
  after a point-mass rejection at a row as given (the residual is normalised by its own sum, also when p(t) = 0),
  by the draw kernels for a final draw from a row as given (inverse CDF against the actual sum). A residual against
  draft_probs is ``max(0, x - q)`` normalised by its sum, as in the logits mode.
* ``BONUS`` (``bonus_token_ids``, chains only): the rows are ``[N, V]``, request r's rows start at ``cu[r]`` (not
  ``cu[r] + r``) and there is no row after its last draft. Accepting the last draft ends the walk with the given
  bonus token; a request without drafts emits it at once and reads no row. Greedy requests take the same walk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spdkernels.ops._common import verify_outputs

from ._common import argmax_row, finish_walk, order_key

BLOCK_V = 4096  # streaming passes: elements per tile
STATS_WARPS = 8  # kernel 1 keeps three [BLOCK_V] lane states (max, sum, min key): 12 a thread on 8 warps
SEARCH_WARPS = 8  # kernel 1b: a [PIVOTS, BLOCK_S] tile, one token (and its 16 pivot lanes) a thread
# the walk holds several tiles live (weights, q, residual, ids) besides ~20 scalars: 2048-token tiles on 4 warps
# (16 elements a thread). With 4096 ptxas spilled 16-200 B on sm_80 and sm_90 (bench/compile_check.py). The walk
# has one program per request and is latency-bound: smaller tiles cost little.
WALK_BLOCK = 2048
WALK_WARPS = 4
# ptxas' own register target for the walk (no .maxnreg) is 72-96 registers, and it keeps it by spilling a few cold
# scalars (row addresses, a predicate: 16-96 B on 28 of the 148 --quick variants); with the cap stated as 128 it
# allocates up to 128 and spills nothing. 128 registers x 128 threads still fit 4 programs per SM, and the walk
# launches one program per request. The draw kernel states it too (without it ptxas spilled 4 B of the fp16 PROBS
# variants on sm_80).
WALK_MAXNREG = 128
_REG_CAP = {"maxnreg": WALK_MAXNREG} if torch.version.hip is None else {}  # (an NVIDIA option: ROCm has none)
BLOCK_S = 256  # threshold search: elements per tile, times PIVOTS pivots evaluated at once
PIVOTS = 16
LOG2E = tl.constexpr(1.4426950408889634)  # exp(y / T) = exp2(y * LOG2E / T)
MIN_T = tl.constexpr(2.0 ** -126)  # the reference's TEMPERATURE_FLOOR: below ~4.2e-39, LOG2E / T overflows to inf
# a point-mass rejection that leaves less than this fraction of the row's mass is decided on an exact re-sum (as the
# C++ kernel does): M - w_t cancels to rounding noise there (fp32 tile sums carry ~1e-7 relative error)
RESUM_BELOW = tl.constexpr(1e-6)
INT_MAX = 2147483647
INT_MIN = -2147483648


@triton.jit
def philox_uniform(seed, offset, index, stream: tl.constexpr):
    """fp32 coin ``((x >> 9) + 0.5) / 2^23`` with x the first word of Philox4x32-10, key = seed,
    counter = (index, stream, offset lo, offset hi) (spdkernels.reference.philox_uniform)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (tl.zeros([], tl.int32) + index).to(tl.uint32)
    c1 = tl.full([], stream, tl.uint32)
    c2 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    m0 = tl.full([], 0xD2511F53, tl.uint32)
    m1 = tl.full([], 0xCD9E8D57, tl.uint32)
    for i in tl.static_range(10):
        if i > 0:
            k0 = k0 + tl.full([], 0x9E3779B9, tl.uint32)
            k1 = k1 + tl.full([], 0xBB67AE85, tl.uint32)
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return ((c0 >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _philox_kernel(seed_ptr, offset_ptr, index_ptr, out_ptr, n, STREAM: tl.constexpr):
    """Coins for tests: out[i] = philox_uniform(seed[i], offset[i], index[i], STREAM)."""
    i = tl.program_id(0)
    if i < n:
        u = philox_uniform(tl.load(seed_ptr + i), tl.load(offset_ptr + i), tl.load(index_ptr + i), STREAM)
        tl.store(out_ptr + i, u)


# ---- kernel 1: per-row statistics ------------------------------------------------------------------

@triton.jit
def _kept_mass(base, V, m, sc, tau, BLOCK: tl.constexpr):
    """sum over tokens with key >= tau of exp2((x - m) * sc): fp32 weights and tile sums, fp64 across tiles."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        msk = cols < V
        x = tl.load(base + cols, mask=msk, other=float("-inf")).to(tl.float32)
        w = tl.where(msk & (order_key(x) >= tau), tl.exp2((x - m) * sc), 0.0)
        acc += tl.sum(w, 0).to(tl.float64)
    return acc


@triton.jit
def _threshold(base, V, lo, hi, need, floor, m, sc, MASS: tl.constexpr, BLOCK: tl.constexpr, P: tl.constexpr,
               SUB: tl.constexpr):
    """The largest key t present in the row, in [lo, hi], with f(t) >= need, where f(t) sums over
    tokens with key >= max(t, floor) either 1 (MASS=False: top-k) or exp2((x - m) * sc) (top-p): fp32 sums per
    tile of BLOCK * SUB tokens (exact for the counts: a tile holds << 2^24 tokens), fp64 across tiles.

    Invariant: lo and hi are present keys, the answer lies in [lo, hi]. A pass evaluates f at P pivots
    spread over [lo, hi] (pivot 0 = lo), picks the last pivot bucket whose f still reaches ``need``
    and shrinks [lo, hi] to the smallest and largest key present in that bucket; when no pivot reaches it (rounding
    left the total below ``need``) the answer is lo: the whole kept set, as the reference keeps.

    Within a pass every quantity is kept per lane of the [P, BLOCK] tile (partial sums, smallest and largest key
    per bucket) and reduced across the lanes once per BLOCK * SUB tokens (the sums) or once per pass (the keys):
    a reduction across lanes goes through shared memory with a barrier, and three of them per BLOCK tokens (as
    this search first did) made the pass latency-bound. A token's bucket is tested against the bucket's bounds
    (pivot j <= key < pivot j + 1, the last bucket's end hi + 1) rather than counted across the pivots."""
    offs = tl.arange(0, BLOCK)
    jj = tl.arange(0, P)
    while lo < hi:
        span = hi.to(tl.int64) - lo.to(tl.int64) + 1
        piv = (lo.to(tl.int64) + (span * jj.to(tl.int64)) // P).to(tl.int32)
        # the bucket's end: pivot j + 1, for the last bucket hi + 1 (so no key above the interval is in a bucket;
        # clamped to the int32 range, which only the key 0x7FFFFFFF of a NaN would reach)
        nxt = tl.minimum(lo.to(tl.int64) + (span * (jj + 1).to(tl.int64)) // P, 2147483647).to(tl.int32)
        f = tl.zeros([P], tl.float64)
        mn = tl.full([P, BLOCK], 2147483647, tl.int32)
        mx = tl.full([P, BLOCK], -2147483648, tl.int32)
        for s0 in range(0, V, BLOCK * SUB):
            part = tl.zeros([P, BLOCK], tl.float32)
            for s1 in range(0, SUB):
                cols = s0 + s1 * BLOCK + offs
                msk = cols < V
                x = tl.load(base + cols, mask=msk, other=float("-inf")).to(tl.float32)
                key = order_key(x)
                elig = msk & (key >= floor)
                ge = (key[None, :] >= piv[:, None]) & elig[None, :]
                # the weights need no eligibility test of their own: every use is under where(ge, ...), and ge holds
                # elig. Selecting on elig here as well compiled, on Triton 3.6 for 16-bit rows, to a select whose
                # condition was defined after it ("does not dominate")
                if MASS:
                    w = tl.exp2((x - m) * sc)
                else:
                    w = tl.full([BLOCK], 1.0, tl.float32)
                part += tl.where(ge, w[None, :], 0.0)
                hot = ge & (key[None, :] < nxt[:, None])
                mn = tl.minimum(mn, tl.where(hot, key[None, :], 2147483647))
                mx = tl.maximum(mx, tl.where(hot, key[None, :], -2147483648))
            f += tl.sum(part, 1).to(tl.float64)
        J = tl.maximum(tl.sum((f >= need).to(tl.int32), 0) - 1, 0)
        lo_J = tl.sum(tl.where(jj == J, tl.min(mn, 1), 0), 0)
        hi_J = tl.sum(tl.where(jj == J, tl.max(mx, 1), 0), 0)
        # no pivot reaches need (pivot 0 = lo: rounding left even the whole interval's mass below it, which only the
        # first pass can see): the answer is lo. (Bucket 0 is empty when a span under P makes pivots 0 and 1 equal,
        # and its bounds would be the empty bucket's.)
        short = tl.sum(tl.where(jj == 0, f, 0.0), 0) < need
        hi = tl.where(short, lo, hi_J)
        lo = tl.where(short, lo, lo_J)
    return lo


@triton.jit
def _row_stats_kernel(logits_ptr, row_stride, V, req_ptr, temp_ptr, topk_ptr, topp_ptr,
                      m_ptr, tau_ptr, mass_ptr, amax_ptr, BLOCK: tl.constexpr, PROBS: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    r = tl.load(req_ptr + row)
    T = tl.load(temp_ptr + r)
    if T == 0.0:  # greedy: the argmax is the whole target distribution
        tl.store(amax_ptr + row, argmax_row(base, V, BLOCK))
        tl.store(m_ptr + row, 0.0)
        tl.store(tau_ptr + row, -2147483648)
        tl.store(mass_ptr + row, tl.full([], 1.0, tl.float64))
    elif PROBS:  # a probability row is used as given: weights its values, mass 1 (the row is not read here)
        tl.store(m_ptr + row, 0.0)
        tl.store(tau_ptr + row, -2147483648)
        tl.store(mass_ptr + row, tl.full([], 1.0, tl.float64))
        tl.store(amax_ptr + row, 0)
    else:
        K = tl.load(topk_ptr + r)
        TP = tl.load(topp_ptr + r)
        sc = LOG2E / tl.maximum(T, MIN_T)  # weights exp((x - m) / T) as exp2((x - m) * sc): one multiply, no divide
        offs = tl.arange(0, BLOCK)
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        kmin = tl.full([BLOCK], 2147483647, tl.int32)
        for start in range(0, V, BLOCK):  # online max / sum, lane-wise
            cols = start + offs
            msk = cols < V
            x = tl.load(base + cols, mask=msk, other=float("-inf")).to(tl.float32)
            new = tl.maximum(mx, x)
            fin = new > float("-inf")  # (-inf) - (-inf) would be NaN: lanes without a finite value yet
            ref = tl.where(fin, new, 0.0)
            alpha = tl.where(fin, tl.exp2((tl.where(fin, mx, 0.0) - ref) * sc), 0.0)
            w = tl.where(fin, tl.exp2((tl.where(fin, x, 0.0) - ref) * sc), 0.0)
            s = s * alpha + w
            mx = new
            kmin = tl.minimum(kmin, tl.where(msk, order_key(x), 2147483647))
        m = tl.max(mx, 0)
        M = tl.sum((s * tl.exp2((mx - m) * sc)).to(tl.float64), 0)  # fp32 per lane, fp64 across lanes
        # a row with top-k / top-p gets the smallest key present (keeps every token), which _threshold_kernel starts
        # its search from and narrows
        filt = ((K > 0) & (K < V)) | (TP < 1.0)
        tl.store(m_ptr + row, m)
        tl.store(tau_ptr + row, tl.where(filt, tl.min(kmin, 0), -2147483648))
        tl.store(mass_ptr + row, M)
        tl.store(amax_ptr + row, 0)


@triton.jit
def _threshold_kernel(logits_ptr, row_stride, V, req_ptr, temp_ptr, topk_ptr, topp_ptr, m_ptr, tau_ptr, mass_ptr,
                      BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, P: tl.constexpr, SUB: tl.constexpr):
    """Kernel 1b, grid (N,): the top-k, then top-p threshold of each sampled logit row that has a filter (the other
    programs return at once), from the max, mass and smallest key kernel 1 stored; the kept mass after each. A
    kernel of its own: the search's [P, BLOCK_S] per-thread tiles take ~125 registers, which in kernel 1 cost every
    row's streaming pass a third of its blocks per SM."""
    row = tl.program_id(0)
    r = tl.load(req_ptr + row)
    T = tl.load(temp_ptr + r)
    if T != 0.0:
        K = tl.load(topk_ptr + r)
        TP = tl.load(topp_ptr + r)
        filt_k = (K > 0) & (K < V)
        filt_p = TP < 1.0
        if filt_k | filt_p:
            base = logits_ptr + row.to(tl.int64) * row_stride
            sc = LOG2E / tl.maximum(T, MIN_T)  # (as kernel 1)
            m = tl.load(m_ptr + row)
            M = tl.load(mass_ptr + row)
            lo = tl.load(tau_ptr + row)
            hi = order_key(m)
            tau = tl.full([], -2147483648, tl.int32)
            if filt_k:
                tau = _threshold(base, V, lo, hi, K.to(tl.float64), tau, m, sc, False, BLOCK_S, P, SUB)
                M = _kept_mass(base, V, m, sc, tau, BLOCK)
            if filt_p:
                need = TP.to(tl.float64) * M
                tau = _threshold(base, V, tl.maximum(lo, tau), hi, need, tau, m, sc, True, BLOCK_S, P, SUB)
                M = _kept_mass(base, V, m, sc, tau, BLOCK)
            tl.store(tau_ptr + row, tau)
            tl.store(mass_ptr + row, M)


# ---- kernel 2: the walk ------------------------------------------------------------------------------

@triton.jit
def _weights(base, buf, cols, msk, in_buf, m, sc, tau, ex_tok, PROBS: tl.constexpr):
    """Unnormalised weights of the current distribution at ``cols``: the scratch row once a residual
    was written, else the row's kept weights (PROBS: its values) with the excluded token removed."""
    if in_buf != 0:
        g = tl.load(buf + cols, mask=msk, other=0.0)
    elif PROBS:
        x = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
        g = tl.where(msk & (cols != ex_tok), x, 0.0)
    else:
        x = tl.load(base + cols, mask=msk, other=float("-inf")).to(tl.float32)
        g = tl.where(msk & (order_key(x) >= tau) & (cols != ex_tok), tl.exp2((x - m) * sc), 0.0)
    return g


@triton.jit
def _mass_without(base, buf, V, in_buf, m, sc, tau, ex_tok, t, BLOCK: tl.constexpr, PROBS: tl.constexpr):
    """The current distribution's mass without token ``t``, summed again from the weights (fp32 per tile, fp64
    across tiles): after a cancellation, a mass that is truly zero comes out as zero and a tiny one exactly."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([], tl.float64)
    for s0 in range(0, V, BLOCK):
        cols = s0 + offs
        msk = cols < V
        g = _weights(base, buf, cols, msk, in_buf, m, sc, tau, ex_tok, PROBS)
        acc += tl.sum(tl.where(cols == t, 0.0, g), 0).to(tl.float64)
    return acc


@triton.jit
def _row_state(m_ptr, tau_ptr, mass_ptr, amax_ptr, row):
    """The statistics kernel 1 wrote for ``row``: max, threshold key, kept mass, argmax."""
    return tl.load(m_ptr + row), tl.load(tau_ptr + row), tl.load(mass_ptr + row), tl.load(amax_ptr + row)


@triton.jit(do_not_specialize=["N", "max_depth"])
def _walk_kernel(logits_ptr, row_stride, V, draft_ptr, cu_ptr, parents_ptr, q_ptr, temp_ptr,
                 unif_ptr, seed_ptr, offset_ptr, N,
                 m_ptr, tau_ptr, mass_ptr, amax_ptr, buf_ptr,
                 out_ptr, num_ptr, path_ptr, max_depth, bonus_ptr, fin_ptr, fin_mass_ptr,
                 IS_CHAIN: tl.constexpr, HAS_Q: tl.constexpr, HAS_UNIF: tl.constexpr, BLOCK: tl.constexpr,
                 PROBS: tl.constexpr, BONUS: tl.constexpr):
    r = tl.program_id(0)
    # Index guards, always on (validation off included) and free of host syncs: offsets clamped into [0, N] and
    # non-decreasing, so every row and draft read stays in its tensor; a draft token outside [0, V) is never
    # accepted and changes nothing (it is only ever used as an address after this test). A malformed batch gives
    # a defined result, never an access out of bounds.
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + r), 0), N)
    k = tl.minimum(tl.maximum(tl.load(cu_ptr + r + 1), start), N) - start
    if BONUS:  # rows [N, V]: no row after a chain's last draft (row cu[r] <= N: the statistics have N + 1 entries)
        row0 = start
    else:
        row0 = start + r
    T = tl.load(temp_ptr + r)
    # greedy = (T == 0) is tested where needed, not held: ptxas spilled that predicate (P2R + STL) over the walk
    sc = LOG2E / tl.maximum(tl.where(T == 0.0, 1.0, T), MIN_T)  # exp2((x - m) * sc); greedy never uses it
    buf = buf_ptr + r.to(tl.int64) * V
    out_row = out_ptr + r.to(tl.int64) * (max_depth + 1)
    path_row = path_ptr + r.to(tl.int64) * max_depth
    offs = tl.arange(0, BLOCK)

    row = row0
    m, tau, M, amax = _row_state(m_ptr, tau_ptr, mass_ptr, amax_ptr, row)
    in_buf = r * 0
    ex_tok = r * 0 - 1
    node = r * 0 - 1
    depth = r * 0
    done = r * 0
    if BONUS:  # emitted: the walk ended on the bonus token (at once without drafts: no row is read)
        emitted = (k <= 0).to(tl.int32)
        done = emitted
    for _d in range(0, max_depth):
        if done == 0:
            base = logits_ptr + row.to(tl.int64) * row_stride
            accepted = r * 0 - 1
            # The candidates are the drafts after ``node`` (a chain: only node + 1). The loop bounds are fixed (0, k)
            # and the test is inside: with bounds that depend on ``node``, Triton 3.6 folded ``node`` to its initial
            # value on sm_90 (the walk re-accepted draft 0 at every depth; seen on an H200, not on the interpreter).
            for j in range(0, k):
                if (accepted < 0) & (j > node) & ((not IS_CHAIN) | (j == node + 1)):
                    if IS_CHAIN:
                        par = node
                    else:
                        par = tl.load(parents_ptr + start + j)
                    t = tl.load(draft_ptr + start + j).to(tl.int32)
                    if (par == node) & (t >= 0) & (t < V):
                        if T == 0.0:  # greedy
                            if t == amax:
                                if BONUS or PROBS:
                                    if HAS_Q:  # p is the one-hot of the argmax: accept if u q(t) <= 1
                                        if HAS_UNIF:
                                            ug = tl.load(unif_ptr + start + j)
                                        else:
                                            ug = philox_uniform(tl.load(seed_ptr + r), tl.load(offset_ptr + r), j, 0)
                                        qg = tl.load(q_ptr + (start + j).to(tl.int64) * V + t)
                                        if ug * qg <= 1.0:
                                            accepted = j
                                    else:
                                        accepted = j
                                else:
                                    accepted = j
                        else:
                            if in_buf != 0:
                                gt = tl.load(buf + t)
                            elif PROBS:
                                xt = tl.load(base + t).to(tl.float32)
                                gt = tl.where(t != ex_tok, xt, 0.0)
                            else:
                                xt = tl.load(base + t).to(tl.float32)
                                gt = tl.where((order_key(xt) >= tau) & (t != ex_tok), tl.exp2((xt - m) * sc), 0.0)
                            pt = gt / M.to(tl.float32)
                            if HAS_Q:
                                q_row = q_ptr + (start + j).to(tl.int64) * V
                                qt = tl.load(q_row + t)
                            else:
                                qt = 1.0
                            if HAS_UNIF:
                                u = tl.load(unif_ptr + start + j)
                            else:
                                # seed and offset loaded where used (cached): not held in registers over the walk
                                u = philox_uniform(tl.load(seed_ptr + r), tl.load(offset_ptr + r), j, 0)
                            if PROBS:  # at a row as given a rejection normalises p, also where p(t) = 0
                                pm_go = (pt > 0.0) | ((in_buf == 0) & (ex_tok < 0))
                            else:
                                pm_go = pt > 0.0
                            if (pt > 0.0) & (u * qt <= pt):
                                accepted = j
                            elif HAS_Q:
                                # residual max(0, p - q), renormalised; kept as is if it has no mass
                                M32 = M.to(tl.float32)
                                S = tl.zeros([], tl.float64)  # fp32 sums per tile, fp64 across tiles
                                for s0 in range(0, V, BLOCK):
                                    cols = s0 + offs
                                    msk = cols < V
                                    g = _weights(base, buf, cols, msk, in_buf, m, sc, tau, ex_tok, PROBS)
                                    qv = tl.load(q_row + cols, mask=msk, other=0.0)
                                    res = tl.maximum(g / M32 - qv, 0.0)
                                    if in_buf == 0:  # the row form stays valid: write at once
                                        tl.store(buf + cols, res, mask=msk)
                                    S += tl.sum(res, 0).to(tl.float64)
                                if S > 0.0:
                                    if in_buf != 0:  # second pass: only now may the scratch row change
                                        for s0 in range(0, V, BLOCK):
                                            cols = s0 + offs
                                            msk = cols < V
                                            g = tl.load(buf + cols, mask=msk, other=0.0)
                                            qv = tl.load(q_row + cols, mask=msk, other=0.0)
                                            tl.store(buf + cols, tl.maximum(g / M32 - qv, 0.0), mask=msk)
                                    in_buf = r * 0 + 1
                                    M = S
                                tl.debug_barrier()
                            elif pm_go:
                                # point mass: the residual is p without token t (if anything is left)
                                left = M - gt.to(tl.float64)
                                if PROBS:  # a row as given: its actual mass is not known, sum what is left
                                    resum = (left <= RESUM_BELOW * M) | ((in_buf == 0) & (ex_tok < 0))
                                else:
                                    resum = left <= RESUM_BELOW * M
                                if resum:  # cancellation: decide on an exact re-sum
                                    left = _mass_without(base, buf, V, in_buf, m, sc, tau, ex_tok, t, BLOCK, PROBS)
                                if left > 0.0:
                                    if in_buf != 0:
                                        tl.store(buf + t + offs, tl.zeros([BLOCK], tl.float32), mask=offs < 1)
                                    elif ex_tok < 0:
                                        ex_tok = t
                                    else:  # a second exclusion: write the residual row once
                                        for s0 in range(0, V, BLOCK):
                                            cols = s0 + offs
                                            msk = cols < V
                                            g = _weights(base, buf, cols, msk, in_buf, m, sc, tau, ex_tok, PROBS)
                                            tl.store(buf + cols, tl.where(cols == t, 0.0, g), mask=msk)
                                        in_buf = r * 0 + 1
                                    M = left
                                    tl.debug_barrier()
            if accepted >= 0:
                tl.store(out_row + depth, tl.load(draft_ptr + start + accepted).to(tl.int32))
                tl.store(path_row + depth, accepted)
                depth += 1
                node = accepted
                row = row0 + 1 + node
                if BONUS:
                    if node == k - 1:  # the chain's last draft: the bonus token follows, there is no row
                        emitted = r * 0 + 1
                        done = r * 0 + 1
                        row = row0
                m, tau, M, amax = _row_state(m_ptr, tau_ptr, mass_ptr, amax_ptr, row)
                in_buf = r * 0
                ex_tok = r * 0 - 1
            else:
                done = r * 0 + 1

    if BONUS:
        no_sample = (T == 0.0) | (emitted != 0)
    else:
        no_sample = T == 0.0
    # the outputs with the final token of a request that draws nothing (greedy: the argmax; a chain that accepted
    # its last draft: the bonus token); a request that draws gets its token from _draw_kernel, from the state below
    tok = amax
    if BONUS:
        if emitted != 0:
            tok = tl.load(bonus_ptr + r).to(tl.int32)
    finish_walk(out_row, path_row, num_ptr, r, depth, tok, max_depth)
    fin = fin_ptr + r * 4
    tl.store(fin, tl.where(no_sample, 0, 1))
    tl.store(fin + 1, row)
    tl.store(fin + 2, in_buf)
    tl.store(fin + 3, ex_tok)
    tl.store(fin_mass_ptr + r, M)


# ---- kernels 3 and 4: the final draw, by inverse CDF over token ids --------------------------------------------
# The distribution a request draws from is fixed once its walk ends (a row's kept weights, less one excluded token,
# or a residual row). Its mass is cut into tiles of BLOCK ids: kernel 3 sums every tile of every drawing request at
# once (grid (R, tiles)); kernel 4 finds, per request, the tile where the running mass passes the threshold
# u * mass and searches that tile alone. (The walk used to scan the tiles itself, one after another, in one program
# per request: on a 128k vocabulary ~30 dependent tile passes per request.) Arithmetic: fp32 within a tile (its
# mass is its cumsum's last entry), fp64 across tiles and for the tile test; what is left of the threshold is
# clamped at 0, so no id without mass is drawn, and a search that fp32 rounding leaves empty takes the tile's last id
# with positive mass.

@triton.jit
def _final_state(fin_ptr, r, m_ptr, tau_ptr, temp_ptr):
    """What the walk left for request r's draw (call it only for a request that draws: fin[r, 0] != 0):
    (row, in_buf, ex_tok, m, tau, sc)."""
    fin = fin_ptr + r * 4
    row = tl.load(fin + 1)
    T = tl.load(temp_ptr + r)
    sc = LOG2E / tl.maximum(T, MIN_T)  # (T > 0: a greedy request draws nothing)
    return row, tl.load(fin + 2), tl.load(fin + 3), tl.load(m_ptr + row), tl.load(tau_ptr + row), sc


@triton.jit
def _tile_mass_kernel(logits_ptr, row_stride, V, fin_ptr, m_ptr, tau_ptr, temp_ptr, buf_ptr, tot_ptr, last_ptr,
                      BLOCK: tl.constexpr, PROBS: tl.constexpr):
    r = tl.program_id(0)
    t = tl.program_id(1)
    if tl.load(fin_ptr + r * 4) != 0:  # (a request that draws nothing costs its programs one load)
        row, in_buf, ex_tok, m, tau, sc = _final_state(fin_ptr, r, m_ptr, tau_ptr, temp_ptr)
        cols = t * BLOCK + tl.arange(0, BLOCK)
        msk = cols < V
        g = _weights(logits_ptr + row.to(tl.int64) * row_stride, buf_ptr + r.to(tl.int64) * V, cols, msk, in_buf,
                     m, sc, tau, ex_tok, PROBS)
        out = r.to(tl.int64) * tl.num_programs(1) + t
        tl.store(tot_ptr + out, tl.max(tl.cumsum(g, 0), 0))
        tl.store(last_ptr + out, tl.max(tl.where(g > 0.0, cols, -1), 0))


@triton.jit(do_not_specialize=["N", "max_depth"])
def _draw_kernel(logits_ptr, row_stride, V, fin_ptr, fin_mass_ptr, m_ptr, tau_ptr, temp_ptr, buf_ptr, tot_ptr,
                 last_ptr, unif_ptr, seed_ptr, offset_ptr, N, num_ptr, out_ptr, max_depth, tiles,
                 HAS_UNIF: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr, PROBS: tl.constexpr):
    r = tl.program_id(0)
    if tl.load(fin_ptr + r * 4) != 0:
        row, in_buf, ex_tok, m, tau, sc = _final_state(fin_ptr, r, m_ptr, tau_ptr, temp_ptr)
        if HAS_UNIF:
            u = tl.load(unif_ptr + N + r)
        else:
            u = philox_uniform(tl.load(seed_ptr + r), tl.load(offset_ptr + r), r * 0, 1)
        jt = tl.arange(0, TILES)
        ok = jt < tiles
        at = r.to(tl.int64) * tiles + jt
        tot = tl.load(tot_ptr + at, mask=ok, other=0.0).to(tl.float64)
        M = tl.load(fin_mass_ptr + r)
        if PROBS:
            if (in_buf == 0) & (ex_tok < 0):  # a row as given: the draw is against its actual sum
                M = tl.sum(tot, 0)
        thr = u.to(tl.float64) * M
        before = tl.cumsum(tot, 0) - tot  # the mass of the tiles before each
        # the tile where the running mass passes thr, in fp64 and against what is left of thr clamped at 0: a tile
        # without mass never passes (rounding of thr - before can leave it slightly negative past the last hit)
        hit_t = tl.min(tl.where(ok & (tot > tl.maximum(thr - before, 0.0)), jt, tiles), 0)
        tok = V
        if hit_t < tiles:
            cols = hit_t * BLOCK + tl.arange(0, BLOCK)
            msk = cols < V
            g = _weights(logits_ptr + row.to(tl.int64) * row_stride, buf_ptr + r.to(tl.int64) * V, cols, msk, in_buf,
                         m, sc, tau, ex_tok, PROBS)
            # what is left of thr for this tile, fp32 like the tile's cumsum, at least 0; the first id with positive
            # mass whose cumsum exceeds it (on a GPU the scan sums in a tree across lanes, and its value can step up
            # by an ulp at an id of zero mass: such an id is never taken)
            rest = tl.maximum((thr - tl.sum(tl.where(jt == hit_t, before, 0.0), 0)).to(tl.float32), 0.0)
            tok = tl.min(tl.where((tl.cumsum(g, 0) > rest) & (g > 0.0) & msk, cols, V), 0)
            if tok >= V:  # fp32 rounding of what is left: the tile's last id with positive mass
                tok = tl.load(last_ptr + r.to(tl.int64) * tiles + hit_t)
        if tok >= V:  # rounding left thr above the total: the last id with positive mass (0 if none)
            tok = tl.maximum(tl.max(tl.load(last_ptr + at, mask=ok, other=-1), 0), 0)
        depth = tl.load(num_ptr + r) - 1
        tl.store(out_ptr + r.to(tl.int64) * (max_depth + 1) + depth, tok.to(tl.int32))


def philox_uniforms(seed: torch.Tensor, offset: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """fp32 coins computed by the kernels' Philox (for tests against the reference)."""
    n = seed.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=seed.device)
    if n:
        _philox_kernel[(n,)](seed, offset, index.to(torch.int32), out, n, STREAM=stream)
    return out


def row_stats(rows, req, temperature, top_k, top_p, probs=False, n_stats=None, filters=True):
    """Kernels 1 and 1b over ``rows [N, V]`` (row i belongs to request ``req[i]``, whose ``temperature`` /
    ``top_k`` / ``top_p`` apply): per row the max ``m``, the threshold ``tau`` (the order key of the smallest kept
    logit of a row with top-k / top-p; INT_MIN for other rows, greedy and probability rows included), the kept mass
    ``sum exp((x - m) / T)`` over keys >= tau (fp64) and, for a greedy request, the argmax. Entries past N
    (``n_stats`` > N) are left unwritten. ``filters=False`` (no request has top-k or top-p: known on the host) skips
    kernel 1b's launch."""
    N, V = rows.shape
    dev = rows.device
    n_stats = N if n_stats is None else n_stats
    m = torch.empty(n_stats, dtype=torch.float32, device=dev)
    tau = torch.empty(n_stats, dtype=torch.int32, device=dev)
    mass = torch.empty(n_stats, dtype=torch.float64, device=dev)
    amax = torch.empty(n_stats, dtype=torch.int32, device=dev)
    if N > 0:
        block = min(BLOCK_V, triton.next_power_of_2(V))
        _row_stats_kernel[(N,)](rows, rows.stride(0), V, req, temperature, top_k, top_p, m, tau, mass, amax,
                                BLOCK=block, PROBS=bool(probs), num_warps=STATS_WARPS)
        if filters and not probs:  # (a probability row is used as given: no filters)
            bs = min(BLOCK_S, triton.next_power_of_2(V))  # its fp32 partial sums span `block` tokens, as elsewhere
            _threshold_kernel[(N,)](rows, rows.stride(0), V, req, temperature, top_k, top_p, m, tau, mass,
                                    BLOCK=block, BLOCK_S=bs, P=PIVOTS, SUB=block // bs, num_warps=SEARCH_WARPS)
    return m, tau, mass, amax


def rejection_sample(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                     uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False):
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    rows, V = target_logits.shape
    R = cu_num_draft.shape[0] - 1
    N = draft_token_ids.shape[0]
    dev = target_logits.device
    out, num, path = verify_outputs(R, max_depth, dev)  # the kernels write every entry, padding included
    if R == 0:
        return out, num, path
    bonus = bonus_token_ids is not None  # (chains only: the op refuses parents with bonus tokens)
    probs = bool(target_is_probs)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    cu = cu_num_draft.contiguous()
    temp = c(temperature) if temperature is not None else torch.ones(R, dtype=torch.float32, device=dev)
    tk = c(top_k) if top_k is not None else torch.zeros(R, dtype=torch.int32, device=dev)
    tp = c(top_p) if top_p is not None else torch.ones(R, dtype=torch.float32, device=dev)
    # with bonus tokens a request without drafts starts at row cu[r] = N at most: one entry more, never written
    # and never used (its walk and the draw kernels read its entry but act on none: such a request draws nothing)
    n_stats = rows + 1 if bonus else rows
    block = min(BLOCK_V, triton.next_power_of_2(V))
    # the request of each row (rows of request r: cu[r] + r .. cu[r + 1] + r; with bonus tokens cu[r] .. cu[r + 1] - 1),
    # without a host sync
    # (a search rather than repeat_interleave: defined, in [0, R), for any cu with validation off)
    first = cu[1:] if bonus else cu[1:] + torch.arange(1, R + 1, dtype=torch.int32, device=dev)
    req = torch.searchsorted(first, torch.arange(rows, dtype=torch.int32, device=dev), right=True, out_int32=True)
    req = req.clamp_(max=R - 1)
    m, tau, mass, amax = row_stats(target_logits, req, temp, tk, tp, probs, n_stats,
                                   filters=top_k is not None or top_p is not None)
    # scratch rows for residuals: only trees (several siblings) and draft_probs can need them
    buf = (torch.empty((R, V), dtype=torch.float32, device=dev) if (parents is not None or draft_probs is not None)
           else m)
    q = c(draft_probs) if draft_probs is not None else m
    unif = c(uniforms) if uniforms is not None else m
    par = c(parents) if parents is not None else cu
    sd = c(seed) if seed is not None else cu
    off = c(offset) if offset is not None else cu
    # bonus_ptr None without bonus tokens: a constexpr, so the logits kernels keep their signature
    wb = min(WALK_BLOCK, block)  # the walk's and the draw's tiles
    fin = torch.empty((R, 4), dtype=torch.int32, device=dev)  # per request: draws?, row, in_buf, excluded token
    fin_mass = torch.empty(R, dtype=torch.float64, device=dev)  # the mass of what it draws from
    _walk_kernel[(R,)](target_logits, target_logits.stride(0), V, draft_token_ids.contiguous(), cu, par, q, temp,
                       unif, sd, off, N, m, tau, mass, amax, buf, out, num, path, max_depth,
                       c(bonus_token_ids) if bonus else None, fin, fin_mass,
                       IS_CHAIN=parents is None, HAS_Q=draft_probs is not None, HAS_UNIF=uniforms is not None,
                       BLOCK=wb, PROBS=probs, BONUS=bonus, num_warps=WALK_WARPS,
                       **_REG_CAP)
    # the final draws: every tile's mass at once, then one tile searched per request
    tiles = triton.cdiv(V, wb)
    tot = torch.empty((R, tiles), dtype=torch.float32, device=dev)
    last = torch.empty((R, tiles), dtype=torch.int32, device=dev)
    _tile_mass_kernel[(R, tiles)](target_logits, target_logits.stride(0), V, fin, m, tau, temp, buf, tot, last,
                                  BLOCK=wb, PROBS=probs, num_warps=WALK_WARPS)
    _draw_kernel[(R,)](target_logits, target_logits.stride(0), V, fin, fin_mass, m, tau, temp, buf, tot, last, unif, sd,
                       off, N, num, out, max_depth, tiles, HAS_UNIF=uniforms is not None, BLOCK=wb,
                       TILES=triton.next_power_of_2(tiles), PROBS=probs, num_warps=WALK_WARPS, **_REG_CAP)
    return out, num, path
