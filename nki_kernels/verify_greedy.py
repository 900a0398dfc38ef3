"""NKI verify_greedy: batched greedy verification of draft chains and token trees (docs/contract.md section 3).

Layout (prepared by the launcher, ``spdkernels.nki_kernels.launch``): requests on the partitions, 128 per
request tile; the slots of a request on the free axis: slot 0 is its root row, slot ``1 + i`` the row after
draft node ``i``. ``row_idx[r, s]`` is the logit row of slot ``s`` (``OOB_ROW`` = ``N + R`` for slots past
``k_r``), ``tokens[r, i]`` / ``parents[r, i]`` the draft token and local parent of node ``i`` (padding:
token -1, parent -2, which matches no node).

Tiling and what each tile reads once:
  * argmax pass: for each slot, the target rows of up to 128 requests are gathered by one indirect DMA per
    vocabulary tile of ``VOCAB_TILE`` columns (``vector_offset`` = that slot's row index per partition;
    absent slots are skipped by ``oob_mode.skip``, no bytes move). Every needed logit row is read exactly
    once. Vector Engine: tile max (``tensor_reduce``), the first column equal to it (``iota`` index plus a
    large constant off the maximum, then a min-reduce: ties go to the lowest id), and a running (max, index)
    pair per row that changes only on a strictly larger tile max (so the first tile wins ties). GpSimd:
    ``iota``.
  * walk: ``max_depth`` steps on [requests, nodes] tiles in SBUF, no data-dependent control flow: the children
    of the current node whose token equals the current row's argmax, the first of them by index (min-reduce),
    then predicated copies of the token, the path index and the stop token. Nothing is read from HBM.
  * outputs: one DMA per output tile (fp32 ids converted to int32 by the DMA).
Engines: DMA (HBM -> SBUF gathers, SBUF -> HBM results), Vector (compare, select, reduce), GpSimd (iota,
memset). Exact: ids are integers below 2**24 held in fp32.
"""

import nki
import nki.isa as nisa
import nki.language as nl

PARTITIONS = 128  # SBUF partitions: requests per tile
VOCAB_TILE = 2048  # vocabulary columns per gathered tile (fp32: 8 KiB of the 192 KiB per partition)
BIG = 16777216.0  # 2**24: larger than any index; ids stay exact in fp32 below it
NEG_INF = float("-inf")


def _first_index(dst, data, value, iota_f, scratch):
    """dst[p] = the first column of data[p, :] equal to value[p] (BIG + column where none)."""
    nisa.tensor_scalar(dst=scratch, data=data, op0=nl.not_equal, operand0=value, op1=nl.multiply, operand1=BIG)
    nisa.tensor_tensor(dst=scratch, data1=scratch, data2=iota_f, op=nl.add)
    nisa.tensor_reduce(dst=dst, op=nl.minimum, data=scratch, axis=1)


def _pick(dst, table, index, iota_f, scratch, pred):
    """dst[p] = table[p, index[p]] (a one-hot select along the free axis; 0 where index is out of range)."""
    nisa.tensor_scalar(dst=pred, data=iota_f, op0=nl.equal, operand0=index)
    nisa.memset(dst=scratch, value=0.0)
    nisa.tensor_copy_predicated(dst=scratch, src=table, predicate=pred)
    nisa.tensor_reduce(dst=dst, op=nl.add, data=scratch, axis=1)


@nki.jit
def verify_greedy_kernel(logits, row_idx, tokens, parents, max_depth):
    NR, V = logits.shape
    R, S = row_idx.shape  # S = K + 1 slots
    K = S - 1
    D = max_depth
    out_tok = nl.ndarray((R, D + 1), dtype=nl.int32, buffer=nl.shared_hbm)
    num = nl.ndarray((R, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    path = nl.ndarray((R, D + 1), dtype=nl.int32, buffer=nl.shared_hbm)  # last column unused (width >= 1)

    VT = min(VOCAB_TILE, V)
    iota_v = nl.ndarray((PARTITIONS, VT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=iota_v, pattern=((1, VT),), offset=0, channel_multiplier=0)
    iota_s = nl.ndarray((PARTITIONS, S), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=iota_s, pattern=((1, S),), offset=0, channel_multiplier=0)
    iota_k = nl.ndarray((PARTITIONS, K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=iota_k, pattern=((1, K),), offset=0, channel_multiplier=0)

    for r0 in range(0, R, PARTITIONS):
        P = min(PARTITIONS, R - r0)
        rows = nl.ndarray((P, S), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows, src=row_idx[r0:r0 + P, 0:S])

        # ---- argmax of every slot's row: running (max, first index) over vocabulary tiles ----
        amax = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        for s in range(S):
            best = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=best, value=NEG_INF)
            bidx = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=bidx, value=0.0)
            for v0 in range(0, V, VT):
                w = min(VT, V - v0)
                x = nl.ndarray((P, w), dtype=logits.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=x, src=logits.ap(pattern=((V, P), (1, w)), offset=v0,
                                                   vector_offset=rows[0:P, s:s + 1], indirect_dim=0),
                              oob_mode=nisa.oob_mode.skip)
                tmax = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_reduce(dst=tmax, op=nl.maximum, data=x, axis=1)
                tidx = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                scratch = nl.ndarray((P, w), dtype=nl.float32, buffer=nl.sbuf)
                _first_index(tidx, x, tmax, iota_v[0:P, 0:w], scratch)
                nisa.tensor_scalar(dst=tidx, data=tidx, op0=nl.add, operand0=float(v0))
                up = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=up, data1=tmax, data2=best, op=nl.greater)
                nisa.tensor_copy_predicated(dst=bidx, src=tidx, predicate=up)
                nisa.tensor_tensor(dst=best, data1=best, data2=tmax, op=nl.maximum)
            nisa.tensor_copy(dst=amax[0:P, s:s + 1], src=bidx)

        # ---- the walk ----
        tok = nl.ndarray((P, K), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=tok, src=tokens[r0:r0 + P, 0:K])
        par = nl.ndarray((P, K), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=par, src=parents[r0:r0 + P, 0:K])
        out_sb = nl.ndarray((P, D + 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=out_sb, value=-1.0)
        path_sb = nl.ndarray((P, D + 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=path_sb, value=-1.0)
        num_sb = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=num_sb, value=1.0)
        cur = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)  # current node (-1: the root)
        nisa.memset(dst=cur, value=-1.0)
        alive = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=alive, value=1.0)
        s_scr = nl.ndarray((P, S), dtype=nl.float32, buffer=nl.sbuf)
        s_pred = nl.ndarray((P, S), dtype=nl.uint8, buffer=nl.sbuf)
        k_scr = nl.ndarray((P, K), dtype=nl.float32, buffer=nl.sbuf)
        k_pred = nl.ndarray((P, K), dtype=nl.uint8, buffer=nl.sbuf)
        a_cur = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        slot = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        for d in range(D + 1):
            # the argmax of the current node's row (slot cur + 1)
            nisa.tensor_scalar(dst=slot, data=cur, op0=nl.add, operand0=1.0)
            _pick(a_cur, amax, slot, iota_s[0:P, 0:S], s_scr, s_pred)
            found = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            if d < D:
                # children of cur whose token is that argmax; the first of them by index
                cand = nl.ndarray((P, K), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=cand, data=par, op0=nl.equal, operand0=cur)
                nisa.tensor_scalar(dst=k_scr, data=tok, op0=nl.equal, operand0=a_cur)
                nisa.tensor_tensor(dst=cand, data1=cand, data2=k_scr, op=nl.multiply)
                nisa.tensor_scalar(dst=cand, data=cand, op0=nl.equal, operand0=0.0, op1=nl.multiply,
                                   operand1=BIG)
                nisa.tensor_tensor(dst=cand, data1=cand, data2=iota_k[0:P, 0:K], op=nl.add)
                jstar = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_reduce(dst=jstar, op=nl.minimum, data=cand, axis=1)
                nisa.tensor_scalar(dst=found, data=jstar, op0=nl.less, operand0=BIG)
                nisa.tensor_tensor(dst=found, data1=found, data2=alive, op=nl.multiply)
                t_star = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                _pick(t_star, tok, jstar, iota_k[0:P, 0:K], k_scr, k_pred)
                acc = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
                nisa.tensor_copy(dst=acc, src=found)
                nisa.tensor_copy_predicated(dst=out_sb[0:P, d:d + 1], src=t_star, predicate=acc)
                nisa.tensor_copy_predicated(dst=path_sb[0:P, d:d + 1], src=jstar, predicate=acc)
                nisa.tensor_copy_predicated(dst=cur, src=jstar, predicate=acc)
                nisa.tensor_tensor(dst=num_sb, data1=num_sb, data2=found, op=nl.add)
            else:
                nisa.memset(dst=found, value=0.0)
            # requests alive here without an accepted child stop: emit the argmax
            stop = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=stop, data1=alive, data2=found, op=nl.subtract)
            stop_u8 = nl.ndarray((P, 1), dtype=nl.uint8, buffer=nl.sbuf)
            nisa.tensor_copy(dst=stop_u8, src=stop)
            nisa.tensor_copy_predicated(dst=out_sb[0:P, d:d + 1], src=a_cur, predicate=stop_u8)
            nisa.tensor_copy(dst=alive, src=found)

        nisa.dma_copy(dst=out_tok[r0:r0 + P, 0:D + 1], src=out_sb)
        nisa.dma_copy(dst=path[r0:r0 + P, 0:D + 1], src=path_sb)
        nisa.dma_copy(dst=num[r0:r0 + P, 0:1], src=num_sb)
    return out_tok, num, path
