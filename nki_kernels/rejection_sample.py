"""NKI rejection_sample: lossless speculative sampling of chains and token trees, from logits or probabilities
(docs/contract.md 3).

Layout (prepared by ``spdkernels.nki_kernels._launch``): requests on the partitions, 128 per request tile; slot
``s`` of a request on the free axis (slot 0 its root row, slot ``1 + i`` the row after node ``i``; ``row_idx``
out of range past ``k_r``); per node its token, local parent, global index (row of ``draft_probs``) and coin
(``coins[r, i]``; ``coins[r, K]`` is the request's final coin); per request temperature, top-k, top-p.
Coins are an input: the ISA has no 32-bit multiply-high for Philox, so the launcher computes the contract's
Philox4x32-10 coins from seed/offset with torch ops on the device (no host sync), or passes ``uniforms``.

Tiling and what each tile reads once: the vocabulary is streamed in tiles of ``VOCAB_TILE`` columns (a row that
fits in one tile is loaded once and kept); the current distribution ``p`` of each request lives in an HBM
scratch row (``pbuf``, normalised up to a per-request scale) that the walk reads and writes tile by tile.
  * statistics of each slot's row (indirect DMA gathers, ``vector_offset`` = the slot's row per partition, absent
    slots skipped): pass 0 gives the max, the first argmax and the smallest finite logit (Vector Engine
    reductions, ``select_reduce``); when a request of the batch uses top-k or top-p, the thresholds follow
    without a sort: a bisection over logit values that snaps both ends to values present in the row
    (``THRESHOLD_PASSES`` passes over the row, each a compare + count (top-k) or masked mass of
    ``exp((x - max) / T)`` (top-p, Scalar Engine) + two ``select_reduce`` maxima); ties at the boundary are kept,
    as in the reference; a search that has not closed is reported (``converged``) and the launcher raises.
    Then the kept mass. A row is read ``2 + passes`` times with filters, twice without (once if it fits a tile).
  * the walk, ``max_depth`` steps without data-dependent control flow: the root row's distribution is written
    to ``pbuf``; each candidate child reads ``p(t)`` and ``q(t)`` as single elements (indirect DMA on a flat
    view), tests ``u q(t) <= p(t)``, and a rejection rewrites ``pbuf`` with ``max(0, p - q)`` (two streaming
    passes over the row and the draft row: its mass first, then the write where it has mass; greedy requests
    keep their one-hot). An accepted child's row is read once more and becomes ``pbuf``. Where a walk stops,
    one token by inverse CDF: the row total, then prefix sums tile by tile (``tensor_tensor_scan`` carrying the
    running sum), counting those ``<= u * total``. Greedy requests (T = 0) use the one-hot of the argmax as
    ``p``, which makes the same steps give verify_greedy's answer.
  * compile-time modes: ``is_probs`` (``target_is_probs``): a row is used as given, its values the weights with
    mass 1 (no exp, no temperature, no filters, no mass pass; greedy requests still take the argmax; residuals are
    normalised by their own sums and the final draw is against the scratch row's actual total, as for logits);
    ``has_bonus`` (``bonus_token_ids``, chains):
    the launcher's ``row_idx`` holds rows ``cu[r] + s`` and leaves slot ``k_r`` absent (no row after the last
    draft), so a walk whose accepted child has no row emits the request's bonus token next and stops, and a request
    without drafts (no root row) emits it at once; the statistics skip slot ``K`` (never present).
Engines: DMA (gathers, scratch rows, results), Vector (compares, reductions, scans, selects), Scalar (exp),
GpSimd (iota, integer index arithmetic).
"""

import nki
import nki.isa as nisa
import nki.language as nl

PARTITIONS = 128  # requests per tile
VOCAB_TILE = 2048  # vocabulary columns per streamed tile (fp32: 8 KiB of a partition's SBUF)
THRESHOLD_PASSES = 32  # bisection passes of the top-k / top-p threshold search
BIG = 16777216.0  # 2**24: above any index
FMAX = 3.0e38  # finite stand-in for +inf in min/max reductions
NEG_INF = float("-inf")
TEMPERATURE_FLOOR = 2.0 ** -126  # the reference's floor on a sampled temperature (the smallest normal fp32)


def _pick(dst, table, index, iota_f, scratch, pred):
    """dst[p] = table[p, index[p]] (a one-hot select along the free axis)."""
    nisa.tensor_scalar(dst=pred, data=iota_f, op0=nl.equal, operand0=index)
    nisa.memset(dst=scratch, value=0.0)
    nisa.tensor_copy_predicated(dst=scratch, src=table, predicate=pred)
    nisa.tensor_reduce(dst=dst, op=nl.add, data=scratch, axis=1)


def _row_tile(logits, rowcol, v0, w, P, V):
    """Columns [v0, v0 + w) of the row rowcol[p] for each partition (rows out of range: skipped)."""
    x = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=x, src=logits.ap(pattern=((V, P), (1, w)), offset=v0, vector_offset=rowcol, indirect_dim=0),
                  oob_mode=nisa.oob_mode.skip)
    return x


def _neg(x, P, w):
    n = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=n, data=x, op0=nl.multiply, operand0=-1.0)
    return n


def _weights(wt, x, m, invT, tau, P, w, probs):
    """wt = exp((x - m) / T) on {x >= tau}, 0 elsewhere; for probability rows (``probs``) the values themselves."""
    if probs:
        nisa.tensor_copy(dst=wt, src=x)
        return
    nisa.tensor_scalar(dst=wt, data=x, op0=nl.subtract, operand0=m)
    nisa.activation(dst=wt, op=nl.exp, data=wt, scale=invT)
    ge = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=ge, data=x, op0=nl.greater_equal, operand0=tau)
    nisa.tensor_tensor(dst=wt, data1=wt, data2=ge, op=nl.multiply)


def _acc_max(acc, part):
    nisa.tensor_tensor(dst=acc, data1=acc, data2=part, op=nl.maximum)


def _acc_add(acc, part):
    nisa.tensor_tensor(dst=acc, data1=acc, data2=part, op=nl.add)


def _add_kept_mass(mass, part, logits, rowcol, x1, NT, P, V, VT, m, invT, tau, probs):
    """mass += the row's kept weights (``_weights``), one tile at a time (``x1``: the row when it is one tile)."""
    for v0 in range(0, V, VT):
        w = min(VT, V - v0)
        if NT == 1:
            x = x1
        else:
            x = _row_tile(logits, rowcol, v0, w, P, V)
        wt = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
        _weights(wt, x, m, invT, tau, P, w, probs)
        nisa.tensor_reduce(dst=part, op=nl.add, data=wt, axis=1)
        _acc_add(mass, part)


def _scratch_index(dst, base, v0, lanes, oob, P):
    """dst[p] = base[p] + v0 (element index of a scratch row tile) where lanes[p], else oob (skipped). int32
    tiles only: GpSimd integer arithmetic, exact beyond 2**24."""
    off = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.memset(dst=off, value=v0)
    idx = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=idx, data1=base, data2=off, op=nl.add)
    nisa.memset(dst=dst, value=oob)
    nisa.tensor_copy_predicated(dst=dst, src=idx, predicate=lanes)


def _materialize(pbuf, logits, rowcol, lanes, m, tau, mass, amax, invT, greedy_u8, iota_t, base, P, V, VT, oob,
                 probs):
    """The normalised distribution of row rowcol[p] (w / mass, or the one-hot of the argmax for greedy requests)
    into the scratch rows of the partitions in lanes: one more read of the row, tile by tile."""
    rm = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=rm, data=mass)
    for v0 in range(0, V, VT):
        w = min(VT, V - v0)
        x = _row_tile(logits, rowcol, v0, w, P, V)
        wt = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
        _weights(wt, x, m, invT, tau, P, w, probs)
        nisa.tensor_scalar(dst=wt, data=wt, op0=nl.multiply, operand0=rm)
        oh = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=oh, data=iota_t[0:P, 0:w], op0=nl.add, operand0=float(v0), op1=nl.equal,
                           operand1=amax)
        nisa.tensor_copy_predicated(dst=wt, src=oh, predicate=greedy_u8[0:P, 0:w])
        dst_idx = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
        _scratch_index(dst_idx, base, v0, lanes, oob, P)
        nisa.dma_copy(dst=pbuf.ap(pattern=((1, P), (1, w)), offset=0, vector_offset=dst_idx, indirect_dim=0),
                      src=wt, oob_mode=nisa.oob_mode.skip)


@nki.jit
def rejection_sample_kernel(logits, row_idx, tokens, parents, node_idx, coins, temperature, top_k, top_p,
                            draft_probs, draft_flat, max_depth, has_q, any_top_k, any_top_p, is_chain, bonus,
                            has_bonus, is_probs):
    NR, V = logits.shape
    R, S = row_idx.shape
    K = S - 1
    D = max_depth
    out_tok = nl.ndarray((R, D + 1), dtype=nl.int32, buffer=nl.shared_hbm)
    num = nl.ndarray((R, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    path = nl.ndarray((R, D + 1), dtype=nl.int32, buffer=nl.shared_hbm)
    converged = nl.ndarray((R, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    pbuf = nl.ndarray((R * V, 1), dtype=nl.float32, buffer=nl.hbm)  # p of each request, a flat scratch row
    VT = min(VOCAB_TILE, V)
    NT = (V + VT - 1) // VT
    P_OOB = R * V  # element index past the scratch rows: skipped
    filters = any_top_k or any_top_p

    iota_s = nl.ndarray((PARTITIONS, S), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=iota_s, pattern=((1, S),), offset=0, channel_multiplier=0)
    iota_t = nl.ndarray((PARTITIONS, VT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=iota_t, pattern=((1, VT),), offset=0, channel_multiplier=0)
    ones_t = nl.ndarray((PARTITIONS, VT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_t, value=1.0)

    for r0 in range(0, R, PARTITIONS):
        P = min(PARTITIONS, R - r0)
        rows = nl.ndarray((P, S), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows, src=row_idx[r0:r0 + P, 0:S])
        rows_f = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=rows_f, src=rows)
        u_tab = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=u_tab, src=coins[r0:r0 + P, 0:S])
        T = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=T, src=temperature[r0:r0 + P, 0:1])
        kf = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=kf, src=top_k[r0:r0 + P, 0:1])
        tp = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=tp, src=top_p[r0:r0 + P, 0:1])
        greedy = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=greedy, data=T, op0=nl.equal, operand0=0.0)
        greedy_u8 = nl.ndarray((P, VT), dtype=nl.uint8, buffer=nl.sbuf)  # the lane's flag along a tile
        nisa.tensor_scalar(dst=greedy_u8, data=ones_t[0:P, 0:VT], op0=nl.multiply, operand0=greedy)
        not_greedy = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=not_greedy, data=greedy, op0=nl.equal, operand0=0.0)
        invT = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)  # 1 / T (1 for greedy rows: unused)
        nisa.tensor_tensor(dst=invT, data1=T, data2=greedy, op=nl.add)
        # the reference's temperature floor (2^-126): 1 / T stays finite, and so does (x - m) / T at the row max
        nisa.tensor_scalar(dst=invT, data=invT, op0=nl.maximum, operand0=TEMPERATURE_FLOOR)
        nisa.reciprocal(dst=invT, data=invT)
        k_on = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)  # 0 < top_k < V
        nisa.tensor_scalar(dst=k_on, data=kf, op0=nl.greater, operand0=0.0)
        k_lt = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=k_lt, data=kf, op0=nl.less, operand0=float(V))
        nisa.tensor_tensor(dst=k_on, data1=k_on, data2=k_lt, op=nl.multiply)
        p_on = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)  # top_p < 1
        nisa.tensor_scalar(dst=p_on, data=tp, op0=nl.less, operand0=1.0)
        conv = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=conv, value=1.0)
        base = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)  # first element of each request's scratch row
        nisa.iota(dst=base, pattern=((0, 1),), offset=r0 * V, channel_multiplier=V)
        all_lanes = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.memset(dst=all_lanes, value=1)
        pscale = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)  # p = pbuf * pscale
        nisa.memset(dst=pscale, value=1.0)

        m_tab = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        tau_tab = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        mass_tab = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        amax_tab = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        m = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        tau = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        mass = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        amax = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        part = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        part2 = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        present = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)

        # ---- statistics of every slot's row ----
        if has_bonus:  # slot K holds no row for any request: not read, its statistics a defined 0
            nisa.memset(dst=m_tab, value=0.0)
            nisa.memset(dst=tau_tab, value=0.0)
            nisa.memset(dst=mass_tab, value=1.0)
            nisa.memset(dst=amax_tab, value=0.0)
        for s in range(S - has_bonus):
            rowcol = rows[0:P, s:s + 1]
            x1 = None  # the row, when it is one tile
            if NT == 1:
                x1 = _row_tile(logits, rowcol, 0, V, P, V)
                n1 = _neg(x1, P, V)
            nisa.memset(dst=m, value=NEG_INF)
            nisa.memset(dst=amax, value=0.0)
            lo_neg = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)  # -(smallest finite logit)
            nisa.memset(dst=lo_neg, value=-FMAX)
            for v0 in range(0, V, VT):
                w = min(VT, V - v0)
                if NT == 1:
                    x, nx = x1, n1
                else:
                    x = _row_tile(logits, rowcol, v0, w, P, V)
                    nx = _neg(x, P, w)
                nisa.tensor_reduce(dst=part, op=nl.maximum, data=x, axis=1)
                scr = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=scr, data=x, op0=nl.not_equal, operand0=part, op1=nl.multiply, operand1=BIG)
                nisa.tensor_tensor(dst=scr, data1=scr, data2=iota_t[0:P, 0:w], op=nl.add)
                nisa.tensor_reduce(dst=part2, op=nl.minimum, data=scr, axis=1)
                nisa.tensor_scalar(dst=part2, data=part2, op0=nl.add, operand0=float(v0))
                up = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=up, data1=part, data2=m, op=nl.greater)
                nisa.tensor_copy_predicated(dst=amax, src=part2, predicate=up)
                _acc_max(m, part)
                if filters:
                    fin = nl.ndarray((P, w), dtype=nl.uint8, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=fin, data=x, op0=nl.greater, operand0=NEG_INF)
                    nisa.select_reduce(dst=scr, predicate=fin, on_true=nx, on_false=-FMAX, reduce_res=part,
                                       reduce_cmd=nisa.reduce_cmd.reset_reduce, reduce_op=nl.maximum)
                    _acc_max(lo_neg, part)
            nisa.memset(dst=tau, value=NEG_INF)
            lo = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=lo, data=lo_neg, op0=nl.multiply, operand0=-1.0)
            for which in range(2):  # 0: top-k (a count), 1: top-p (a mass)
                if (which == 0 and any_top_k) or (which == 1 and any_top_p):
                    need = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    if which == 0:
                        nisa.tensor_copy(dst=need, src=kf)
                    else:
                        # top-p of the top-k mass, searched above the top-k threshold
                        nisa.memset(dst=mass, value=0.0)
                        _add_kept_mass(mass, part, logits, rowcol, x1, NT, P, V, VT, m, invT, tau, is_probs)
                        nisa.tensor_tensor(dst=need, data1=mass, data2=tp, op=nl.multiply)
                        _acc_max(lo, tau)
                        if NT == 1:  # a row in one tile: its top-k weights once for all passes
                            w1 = nl.ndarray((P, V), dtype=nl.float32, buffer=nl.sbuf)
                            _weights(w1, x1, m, invT, tau, P, V, is_probs)
                    lo_w = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)  # the search's own bounds
                    nisa.tensor_copy(dst=lo_w, src=lo)
                    hi = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_copy(dst=hi, src=m)
                    mid = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    f = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    ok = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
                    ok0 = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
                    cand_lo = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    cand_hi = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    # invariant: lo and hi are values present in the row, f(lo) >= need, the answer is in [lo, hi]
                    for it in range(THRESHOLD_PASSES + 1):
                        if it == 0:
                            nisa.tensor_copy(dst=mid, src=lo_w)
                        else:
                            nisa.tensor_tensor(dst=mid, data1=lo_w, data2=hi, op=nl.add)
                            nisa.tensor_scalar(dst=mid, data=mid, op0=nl.multiply, operand0=0.5)
                            nisa.tensor_tensor(dst=ok, data1=mid, data2=lo_w, op=nl.less_equal)  # adjacent: try hi
                            nisa.tensor_copy_predicated(dst=mid, src=hi, predicate=ok)
                        if NT > 1:  # partial results of each tile go through part, then accumulate
                            nisa.memset(dst=f, value=0.0)
                            nisa.memset(dst=cand_lo, value=-FMAX)
                            nisa.memset(dst=cand_hi, value=-FMAX)
                        for v0 in range(0, V, VT):
                            w = min(VT, V - v0)
                            if NT == 1:
                                x, nx = x1, n1
                                f_t, lo_t, hi_t = f, cand_lo, cand_hi
                            else:
                                x = _row_tile(logits, rowcol, v0, w, P, V)
                                nx = _neg(x, P, w)
                                f_t, lo_t, hi_t = part, part, part2
                            ge = nl.ndarray((P, w), dtype=nl.uint8, buffer=nl.sbuf)
                            nisa.tensor_scalar(dst=ge, data=x, op0=nl.greater_equal, operand0=mid)
                            scr = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
                            if which == 0:
                                nisa.tensor_reduce(dst=f_t, op=nl.add, data=ge, axis=1)
                            else:
                                if NT == 1:
                                    nisa.tensor_tensor(dst=scr, data1=w1, data2=ge, op=nl.multiply)
                                else:
                                    _weights(scr, x, m, invT, tau, P, w, is_probs)
                                    nisa.tensor_tensor(dst=scr, data1=scr, data2=ge, op=nl.multiply)
                                nisa.tensor_reduce(dst=f_t, op=nl.add, data=scr, axis=1)
                            if NT > 1:
                                _acc_add(f, part)
                            if it > 0:
                                nisa.select_reduce(dst=scr, predicate=ge, on_true=nx, on_false=-FMAX, reduce_res=lo_t,
                                                   reduce_cmd=nisa.reduce_cmd.reset_reduce, reduce_op=nl.maximum)
                                nisa.select_reduce(dst=scr, predicate=ge, on_true=x, on_false=-FMAX, reduce_res=hi_t,
                                                   reduce_cmd=nisa.reduce_cmd.reset_reduce, reduce_op=nl.maximum,
                                                   reverse_pred=True)
                                if NT > 1:
                                    _acc_max(cand_lo, part)
                                    _acc_max(cand_hi, part2)
                        nisa.tensor_tensor(dst=ok, data1=f, data2=need, op=nl.greater_equal)
                        if it == 0:
                            nisa.tensor_copy(dst=ok0, src=ok)
                        else:
                            # ok: the answer is in [mid, hi]: lo <- the smallest value >= mid
                            nisa.tensor_scalar(dst=cand_lo, data=cand_lo, op0=nl.multiply, operand0=-1.0)
                            nisa.tensor_copy_predicated(dst=lo_w, src=cand_lo, predicate=ok)
                            # not ok: the answer is in [lo, mid): hi <- the largest value < mid
                            nisa.tensor_copy_predicated(dst=hi, src=cand_hi, predicate=ok, reverse_pred=True)
                    found = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.memset(dst=found, value=NEG_INF)
                    nisa.tensor_copy_predicated(dst=found, src=lo_w, predicate=ok0)
                    closed = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=closed, data1=lo_w, data2=hi, op=nl.equal)
                    nisa.tensor_tensor(dst=closed, data1=closed, data2=conv, op=nl.multiply)
                    on = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
                    nisa.tensor_copy(dst=on, src=k_on if which == 0 else p_on)
                    nisa.tensor_copy_predicated(dst=tau, src=found, predicate=on)
                    # (slots past a request's drafts hold no row: their search says nothing)
                    nisa.tensor_scalar(dst=present, data=rows_f[0:P, s:s + 1], op0=nl.less, operand0=float(NR))
                    nisa.tensor_tensor(dst=on, data1=on, data2=present, op=nl.multiply)
                    nisa.tensor_copy_predicated(dst=conv, src=closed, predicate=on)
            # the kept mass (a probability row is used as given: mass 1, no pass)
            if is_probs:
                nisa.memset(dst=mass, value=1.0)
            else:
                nisa.memset(dst=mass, value=0.0)
                _add_kept_mass(mass, part, logits, rowcol, x1, NT, P, V, VT, m, invT, tau, is_probs)
            nisa.tensor_copy(dst=m_tab[0:P, s:s + 1], src=m)
            nisa.tensor_copy(dst=tau_tab[0:P, s:s + 1], src=tau)
            nisa.tensor_copy(dst=mass_tab[0:P, s:s + 1], src=mass)
            nisa.tensor_copy(dst=amax_tab[0:P, s:s + 1], src=amax)

        nisa.tensor_copy(dst=m, src=m_tab[0:P, 0:1])
        nisa.tensor_copy(dst=tau, src=tau_tab[0:P, 0:1])
        nisa.tensor_copy(dst=mass, src=mass_tab[0:P, 0:1])
        nisa.tensor_copy(dst=amax, src=amax_tab[0:P, 0:1])
        root_lanes = all_lanes
        if has_bonus:  # requests without drafts have no root row: their scratch rows are not written
            root_lanes = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=root_lanes, data=rows_f[0:P, 0:1], op0=nl.less, operand0=float(NR))
        _materialize(pbuf, logits, rows[0:P, 0:1], root_lanes, m, tau, mass, amax, invT, greedy_u8, iota_t, base, P, V,
                     VT, P_OOB, is_probs)

        # ---- the walk ----
        tok = nl.ndarray((P, K), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=tok, src=tokens[r0:r0 + P, 0:K])
        tok_i = nl.ndarray((P, K), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=tok_i, src=tokens[r0:r0 + P, 0:K])
        par = nl.ndarray((P, K), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=par, src=parents[r0:r0 + P, 0:K])
        nodes = nl.ndarray((P, K), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=nodes, src=node_idx[r0:r0 + P, 0:K])
        vconst = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.memset(dst=vconst, value=V)
        out_sb = nl.ndarray((P, D + 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=out_sb, value=-1.0)
        path_sb = nl.ndarray((P, D + 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=path_sb, value=-1.0)
        num_sb = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=num_sb, value=1.0)
        cur = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=cur, value=-1.0)
        alive = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=alive, value=1.0)
        if has_bonus:
            bon = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)  # the bonus token of each request
            nisa.dma_copy(dst=bon, src=bonus[r0:r0 + P, 0:1])
            # no root row (no drafts): the bonus token at once, and no walk
            nisa.tensor_scalar(dst=alive, data=rows_f[0:P, 0:1], op0=nl.less, operand0=float(NR))
            nisa.tensor_copy_predicated(dst=out_sb[0:P, 0:1], src=bon, predicate=root_lanes, reverse_pred=True)
        s_scr = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        s_pred = nl.ndarray((P, S), dtype=nl.uint8, buffer=nl.sbuf)
        a_u8 = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
        u_fin = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=u_fin, src=u_tab[0:P, K:K + 1])
        eidx = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
        for d in range(D + 1):
            acc_any = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=acc_any, value=0.0)
            acc_j = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=acc_j, value=0.0)
            for c in range(K):
                if d < D and (is_chain == 0 or c == d):  # a chain's node d is the only child at depth d
                    act = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=act, data1=par[0:P, c:c + 1], data2=cur, op=nl.equal)
                    nisa.tensor_tensor(dst=act, data1=act, data2=alive, op=nl.multiply)
                    free = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=free, data=acc_any, op0=nl.equal, operand0=0.0)
                    nisa.tensor_tensor(dst=act, data1=act, data2=free, op=nl.multiply)
                    # p(t): one element of the scratch row
                    nisa.tensor_tensor(dst=eidx, data1=base, data2=tok_i[0:P, c:c + 1], op=nl.add)
                    pt = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.memset(dst=pt, value=0.0)
                    nisa.dma_copy(dst=pt, src=pbuf.ap(pattern=((1, P), (1, 1)), offset=0, vector_offset=eidx,
                                                      indirect_dim=0), oob_mode=nisa.oob_mode.skip)
                    nisa.tensor_tensor(dst=pt, data1=pt, data2=pscale, op=nl.multiply)
                    qt = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    if has_q:  # q(t): one element of the draft row (node * V + t)
                        nisa.tensor_tensor(dst=eidx, data1=nodes[0:P, c:c + 1], data2=vconst, op=nl.multiply)
                        nisa.tensor_tensor(dst=eidx, data1=eidx, data2=tok_i[0:P, c:c + 1], op=nl.add)
                        nisa.memset(dst=qt, value=0.0)
                        nisa.dma_copy(dst=qt, src=draft_flat.ap(pattern=((1, P), (1, 1)), offset=0,
                                                                vector_offset=eidx, indirect_dim=0),
                                      oob_mode=nisa.oob_mode.skip)
                    else:
                        nisa.memset(dst=qt, value=1.0)
                    # accept: p(t) > 0 and u * q(t) <= p(t)
                    uq = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=uq, data1=u_tab[0:P, c:c + 1], data2=qt, op=nl.multiply)
                    accept = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=accept, data1=uq, data2=pt, op=nl.less_equal)
                    pos = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=pos, data=pt, op0=nl.greater, operand0=0.0)
                    nisa.tensor_tensor(dst=accept, data1=accept, data2=pos, op=nl.multiply)
                    nisa.tensor_tensor(dst=accept, data1=accept, data2=act, op=nl.multiply)
                    nisa.tensor_copy(dst=a_u8, src=accept)
                    nisa.tensor_copy_predicated(dst=acc_j, src=float(c), predicate=a_u8)
                    nisa.tensor_copy_predicated(dst=out_sb[0:P, d:d + 1], src=tok[0:P, c:c + 1], predicate=a_u8)
                    nisa.tensor_copy_predicated(dst=path_sb[0:P, d:d + 1], src=float(c), predicate=a_u8)
                    nisa.tensor_tensor(dst=acc_any, data1=acc_any, data2=accept, op=nl.add)
                    # reject: p <- max(0, p - q) / its mass, where it has mass (greedy rows keep their one-hot)
                    upd = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=upd, data1=act, data2=accept, op=nl.subtract)
                    nisa.tensor_tensor(dst=upd, data1=upd, data2=not_greedy, op=nl.multiply)
                    rs = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    for phase in range(2):  # 0: the residual's mass, 1: the residual written where it has mass
                        if phase == 0:
                            nisa.memset(dst=rs, value=0.0)
                        else:
                            has = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                            nisa.tensor_scalar(dst=has, data=rs, op0=nl.greater, operand0=0.0)
                            nisa.tensor_tensor(dst=upd, data1=upd, data2=has, op=nl.multiply)
                            nisa.tensor_copy(dst=a_u8, src=upd)
                        for v0 in range(0, V, VT):
                            w = min(VT, V - v0)
                            pt_ = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
                            nisa.dma_copy(dst=pt_, src=pbuf.ap(pattern=((V, P), (1, w)), offset=r0 * V + v0))
                            nisa.tensor_scalar(dst=pt_, data=pt_, op0=nl.multiply, operand0=pscale)
                            q_ = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
                            if has_q:
                                nisa.memset(dst=q_, value=0.0)
                                nisa.dma_copy(dst=q_, src=draft_probs.ap(pattern=((V, P), (1, w)), offset=v0,
                                                                         vector_offset=nodes[0:P, c:c + 1],
                                                                         indirect_dim=0),
                                              oob_mode=nisa.oob_mode.skip)
                            else:
                                nisa.tensor_scalar(dst=q_, data=iota_t[0:P, 0:w], op0=nl.add, operand0=float(v0),
                                                   op1=nl.equal, operand1=tok[0:P, c:c + 1])
                            nisa.tensor_tensor(dst=pt_, data1=pt_, data2=q_, op=nl.subtract)
                            nisa.tensor_scalar(dst=pt_, data=pt_, op0=nl.maximum, operand0=0.0)
                            if phase == 0:
                                nisa.tensor_reduce(dst=part, op=nl.add, data=pt_, axis=1)
                                _acc_add(rs, part)
                            else:
                                dst_idx = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
                                _scratch_index(dst_idx, base, v0, a_u8, P_OOB, P)
                                nisa.dma_copy(dst=pbuf.ap(pattern=((1, P), (1, w)), offset=0, vector_offset=dst_idx,
                                                          indirect_dim=0), src=pt_, oob_mode=nisa.oob_mode.skip)
                    nisa.reciprocal(dst=rs, data=rs)
                    nisa.tensor_copy_predicated(dst=pscale, src=rs, predicate=a_u8)

            # walks that accepted no child here stop: one token from p with the final coin (inverse CDF)
            stop = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=stop, data1=alive, data2=acc_any, op=nl.subtract)
            total = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            thr = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            cnt = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            last = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            for phase in range(2):  # 0: the total (the carry of the scan), 1: the prefix sums
                nisa.memset(dst=total, value=0.0)
                if phase == 1:
                    nisa.memset(dst=cnt, value=0.0)
                    nisa.memset(dst=last, value=-1.0)
                for v0 in range(0, V, VT):
                    w = min(VT, V - v0)
                    pt_ = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.dma_copy(dst=pt_, src=pbuf.ap(pattern=((V, P), (1, w)), offset=r0 * V + v0))
                    cs = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor_scan(dst=cs, data0=ones_t[0:P, 0:w], data1=pt_, initial=total,
                                            op0=nl.multiply, op1=nl.add)
                    nisa.tensor_copy(dst=total, src=cs[0:P, w - 1:w])
                    if phase == 1:
                        nisa.tensor_scalar(dst=cs, data=cs, op0=nl.less_equal, operand0=thr)
                        nisa.tensor_reduce(dst=part, op=nl.add, data=cs, axis=1)
                        _acc_add(cnt, part)
                        # the last id with mass (rounding can leave u * total at the total)
                        nisa.tensor_scalar(dst=cs, data=pt_, op0=nl.greater, operand0=0.0, op1=nl.multiply,
                                           operand1=BIG)
                        nisa.tensor_tensor(dst=cs, data1=cs, data2=iota_t[0:P, 0:w], op=nl.add)
                        nisa.tensor_reduce(dst=part, op=nl.maximum, data=cs, axis=1)
                        nisa.tensor_scalar(dst=part, data=part, op0=nl.subtract, operand0=BIG - float(v0))
                        _acc_max(last, part)
                if phase == 0:
                    nisa.tensor_tensor(dst=thr, data1=total, data2=u_fin, op=nl.multiply)
            over = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=over, data=cnt, op0=nl.greater_equal, operand0=float(V))
            nisa.tensor_copy_predicated(dst=cnt, src=last, predicate=over)
            nisa.tensor_copy(dst=a_u8, src=stop)
            nisa.tensor_copy_predicated(dst=out_sb[0:P, d:d + 1], src=cnt, predicate=a_u8)
            nisa.tensor_copy(dst=alive, src=acc_any)
            nisa.tensor_tensor(dst=num_sb, data1=num_sb, data2=acc_any, op=nl.add)
            if d < D:
                # accepted walks move to the child: its row (read once more) becomes p
                slot = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=slot, data=acc_j, op0=nl.add, operand0=1.0)
                rsel = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                _pick(rsel, rows_f, slot, iota_s[0:P, 0:S], s_scr, s_pred)
                if has_bonus:
                    # an accepted child without a row is the chain's last draft: the bonus token follows, the walk ends
                    fin = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=fin, data=rsel, op0=nl.greater_equal, operand0=float(NR))
                    nisa.tensor_tensor(dst=fin, data1=fin, data2=acc_any, op=nl.multiply)
                    nisa.tensor_copy(dst=a_u8, src=fin)
                    nisa.tensor_copy_predicated(dst=out_sb[0:P, d + 1:d + 2], src=bon, predicate=a_u8)
                    nisa.tensor_tensor(dst=alive, data1=alive, data2=fin, op=nl.subtract)
                    nisa.tensor_tensor(dst=fin, data1=acc_any, data2=fin, op=nl.subtract)
                    nisa.tensor_copy(dst=a_u8, src=fin)
                else:
                    nisa.tensor_copy(dst=a_u8, src=acc_any)
                nisa.tensor_copy_predicated(dst=cur, src=acc_j, predicate=a_u8)
                oob = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=oob, value=float(NR))
                nisa.tensor_copy_predicated(dst=oob, src=rsel, predicate=a_u8)
                ri = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
                nisa.tensor_copy(dst=ri, src=oob)
                _pick(m, m_tab, slot, iota_s[0:P, 0:S], s_scr, s_pred)
                _pick(tau, tau_tab, slot, iota_s[0:P, 0:S], s_scr, s_pred)
                _pick(mass, mass_tab, slot, iota_s[0:P, 0:S], s_scr, s_pred)
                _pick(amax, amax_tab, slot, iota_s[0:P, 0:S], s_scr, s_pred)
                _materialize(pbuf, logits, ri, a_u8, m, tau, mass, amax, invT, greedy_u8, iota_t, base, P, V, VT,
                             P_OOB, is_probs)
                nisa.memset(dst=part, value=1.0)
                nisa.tensor_copy_predicated(dst=pscale, src=part, predicate=a_u8)

        nisa.dma_copy(dst=out_tok[r0:r0 + P, 0:D + 1], src=out_sb)
        nisa.dma_copy(dst=path[r0:r0 + P, 0:D + 1], src=path_sb)
        nisa.dma_copy(dst=num[r0:r0 + P, 0:1], src=num_sb)
        nisa.dma_copy(dst=converged[r0:r0 + P, 0:1], src=conv)
    return out_tok, num, path, converged
