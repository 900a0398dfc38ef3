"""NKI tree_attention: paged GQA attention of the verification pass (docs/contract.md section 3).

Inputs as the launcher (``spdkernels.nki_kernels._launch``) lays them out: ``q [T, Hq*D]``; the caches as rows
``k_flat, v_flat [num_blocks*block_size, Hkv*D]`` (views, nothing copied); per request the first cache row of
each prefix block (``bt_rows [R, max_blocks]``, ``OOB`` for blocks past the prefix), the cache row of each of
its query tokens (``kv_rows [R, Qmax, 1]``), its query rows (``q_rows [R, Qmax, 1]``, ``OOB`` past ``q_len``),
its prefix length (``prefix [R, 1]``) and the tree mask as 0/1 per (query token, query token) (``mask [T, Qmax]``,
expanded from the bit words by the launcher).

Tiling: one work item per (request, KV head, chunk of query tokens): the ``G = Hq / Hkv`` query heads of the KV
head times the chunk's query tokens are the rows on the partitions (``G * chunk <= 128``), so a K/V tile is
read once for the whole group (GQA). Per item:
  * Q rows gathered by indirect DMA, transposed once on the Tensor Engine (``nc_transpose`` into PSUM, copied to
    SBUF) to be the stationary operand ``Q^T [D, rows]`` (``D <= 128`` partitions).
  * prefix: score tiles of ``KV_TILE = 512`` positions (one PSUM bank of fp32: the moving free size limit of
    ``nc_matmul``). Each block of the tile is read once by DMA with the block table entry as a scalar offset:
    K directly as ``K^T [D, block]`` (strided access pattern), V as ``[block, D]`` rows. Blocks past the prefix
    are not read (``oob_mode.skip``). Scores ``S = Q K^T`` (Tensor Engine, PSUM), scaled while copied to SBUF
    (Scalar Engine), positions at or past the prefix masked (GpSimd ``iota``, Vector compare and predicated
    copy), then the online softmax (running max and sum per row; ``exp`` with the row max as bias and the row
    sum as the activation's reduction on the Scalar Engine), ``P^T`` by ``nc_transpose`` and ``P V`` as
    128-position chunks accumulating in one PSUM tile (``accumulate=True``).
  * tail: the query tokens' own K/V (the last ``q_len`` positions) gathered row by row by indirect DMA into one
    tile; the tree mask is applied on this tail tile only (the prefix is visible to every query).
  * out = acc / sum, rounded to the output dtype, scattered to the query rows by indirect DMA.
fp32 scores and accumulation (PSUM for each product, SBUF for the running accumulator); inputs of any of
fp32/bf16/fp16 are converted to fp32 by the DMA.
"""

import nki
import nki.isa as nisa
import nki.language as nl

PARTITIONS = 128  # SBUF/PSUM partitions: query rows per work item, head dim, transposes
KV_TILE = 512  # positions per score tile = nc_matmul moving free size limit (one 2 KiB PSUM bank of fp32)
PV_CHUNK = 128  # positions per P.V matmul: the contraction runs over the partitions
NEG = -3.0e38  # score of a masked position (finite: a fully masked tile keeps exp(0) = 1, never NaN)


def _to_sbuf_transposed(dst, src, rows, cols):
    """dst [cols, rows] (SBUF) = src [rows, cols] (SBUF) transposed on the Tensor Engine through PSUM."""
    t_ps = nl.ndarray((cols, rows), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=t_ps, data=src)
    nisa.tensor_copy(dst=dst, src=t_ps)


def _scores(dst, qT, kT, rows, n, scale):
    """dst [rows, n] (SBUF) = scale * (Q K^T): stationary Q^T [D, rows], moving K^T [D, n <= KV_TILE]."""
    s_ps = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=s_ps, stationary=qT, moving=kT, accumulate=False)
    nisa.activation(dst=dst, op=nl.copy, data=s_ps, scale=scale)


def _online_update(s, valid, v, n, rows, Dh, m_run, l_run, acc):
    """One tile of the online softmax: s [rows, n] scores, valid [rows, n] (uint8) visibility, v [<=128,
    nchunks, Dh] values of the tile's positions (chunk c holds positions c*128 ...)."""
    sm = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=sm, value=NEG)
    nisa.tensor_copy_predicated(dst=sm, src=s, predicate=valid)
    tmax = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=tmax, op=nl.maximum, data=sm, axis=1)
    m_new = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=m_new, data1=m_run, data2=tmax, op=nl.maximum)
    alpha = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=alpha, data1=m_run, data2=m_new, op=nl.subtract)
    nisa.activation(dst=alpha, op=nl.exp, data=alpha)
    neg_m = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=neg_m, data=m_new, op0=nl.multiply, operand0=-1.0)
    p = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    rowsum = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=p, op=nl.exp, data=sm, bias=neg_m, scale=1.0, reduce_op=nl.add, reduce_res=rowsum)
    nisa.tensor_tensor(dst=l_run, data1=l_run, data2=alpha, op=nl.multiply)
    nisa.tensor_tensor(dst=l_run, data1=l_run, data2=rowsum, op=nl.add)
    nisa.tensor_scalar(dst=acc, data=acc, op0=nl.multiply, operand0=alpha)
    pv_ps = nl.ndarray((rows, Dh), dtype=nl.float32, buffer=nl.psum)
    for c0 in range(0, n, PV_CHUNK):
        cw = min(PV_CHUNK, n - c0)
        pT = nl.ndarray((cw, rows), dtype=nl.float32, buffer=nl.sbuf)
        _to_sbuf_transposed(pT, p[0:rows, c0:c0 + cw], rows, cw)
        nisa.nc_matmul(dst=pv_ps, stationary=pT, moving=v[0:cw, c0 // PV_CHUNK, 0:Dh], accumulate=c0 > 0)
    nisa.tensor_tensor(dst=acc, data1=acc, data2=pv_ps, op=nl.add)
    nisa.tensor_copy(dst=m_run, src=m_new)


@nki.jit
def tree_attention_kernel(q, k_flat, v_flat, bt_rows, kv_rows, q_rows, prefix, mask, n_heads, n_kv_heads,
                          block_size, scale):
    T, HD = q.shape
    Dh = HD // n_heads
    G = n_heads // n_kv_heads
    KVD = n_kv_heads * Dh
    R, MB = bt_rows.shape
    Qmax = mask.shape[1]
    bs = block_size
    out = nl.ndarray((T, HD), dtype=q.dtype, buffer=nl.shared_hbm)
    QC = min(Qmax, PARTITIONS // G)  # query tokens per work item
    BPT = KV_TILE // bs  # blocks per score tile

    for r in range(R):
        for h in range(n_kv_heads):
            for qc0 in range(0, Qmax, QC):
                qn = min(QC, Qmax - qc0)
                rows = G * qn
                qidx = nl.ndarray((qn, 1), dtype=nl.int32, buffer=nl.sbuf)
                nisa.dma_copy(dst=qidx, src=q_rows[r, qc0:qc0 + qn, 0:1])
                q_sb = nl.ndarray((rows, Dh), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=q_sb, value=0.0)
                tmask = nl.ndarray((rows, Qmax), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=tmask, value=0.0)
                for g in range(G):
                    nisa.dma_copy(dst=q_sb[g * qn:(g + 1) * qn, 0:Dh],
                                  src=q.ap(pattern=((HD, qn), (1, Dh)), offset=(h * G + g) * Dh, vector_offset=qidx,
                                           indirect_dim=0), oob_mode=nisa.oob_mode.skip)
                    nisa.dma_copy(dst=tmask[g * qn:(g + 1) * qn, 0:Qmax],
                                  src=mask.ap(pattern=((Qmax, qn), (1, Qmax)), offset=0, vector_offset=qidx,
                                              indirect_dim=0), oob_mode=nisa.oob_mode.skip)
                qT = nl.ndarray((Dh, rows), dtype=nl.float32, buffer=nl.sbuf)
                _to_sbuf_transposed(qT, q_sb, rows, Dh)
                pref = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.dma_copy(dst=pref, src=prefix.ap(pattern=((0, rows), (1, 1)), offset=r))
                m_run = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=m_run, value=NEG)
                l_run = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=l_run, value=0.0)
                acc = nl.ndarray((rows, Dh), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=acc, value=0.0)

                # ---- the committed prefix, block by block through the block table ----
                for c0 in range(0, MB, BPT):
                    nblk = min(BPT, MB - c0)
                    n = nblk * bs
                    kT = nl.ndarray((Dh, n), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.memset(dst=kT, value=0.0)
                    v_sb = nl.ndarray((min(PV_CHUNK, n), (n + PV_CHUNK - 1) // PV_CHUNK, Dh), dtype=nl.float32,
                                      buffer=nl.sbuf)
                    nisa.memset(dst=v_sb, value=0.0)
                    for b in range(nblk):
                        blk = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
                        nisa.dma_copy(dst=blk, src=bt_rows[r:r + 1, c0 + b:c0 + b + 1])
                        nisa.dma_copy(dst=kT[0:Dh, b * bs:(b + 1) * bs],
                                      src=k_flat.ap(pattern=((1, Dh), (KVD, bs)), offset=h * Dh, scalar_offset=blk,
                                                    indirect_dim=0), oob_mode=nisa.oob_mode.skip)
                        p0 = (b * bs) % PV_CHUNK
                        nisa.dma_copy(dst=v_sb[p0:p0 + bs, (b * bs) // PV_CHUNK, 0:Dh],
                                      src=v_flat.ap(pattern=((KVD, bs), (1, Dh)), offset=h * Dh, scalar_offset=blk,
                                                    indirect_dim=0), oob_mode=nisa.oob_mode.skip)
                    s = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
                    _scores(s, qT, kT, rows, n, scale)
                    pos = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.iota(dst=pos, pattern=((1, n),), offset=c0 * bs, channel_multiplier=0)
                    valid = nl.ndarray((rows, n), dtype=nl.uint8, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=valid, data=pos, op0=nl.less, operand0=pref)
                    _online_update(s, valid, v_sb, n, rows, Dh, m_run, l_run, acc)

                # ---- the tail: the request's own query tokens, under the tree mask ----
                kvi = nl.ndarray((Qmax, 1), dtype=nl.int32, buffer=nl.sbuf)
                nisa.dma_copy(dst=kvi, src=kv_rows[r, 0:Qmax, 0:1])
                k_t = nl.ndarray((Qmax, Dh), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=k_t, value=0.0)
                nisa.dma_copy(dst=k_t, src=k_flat.ap(pattern=((KVD, Qmax), (1, Dh)), offset=h * Dh,
                                                     vector_offset=kvi, indirect_dim=0), oob_mode=nisa.oob_mode.skip)
                v_t = nl.ndarray((Qmax, 1, Dh), dtype=nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=v_t, value=0.0)
                nisa.dma_copy(dst=v_t[0:Qmax, 0, 0:Dh],
                              src=v_flat.ap(pattern=((KVD, Qmax), (1, Dh)), offset=h * Dh, vector_offset=kvi,
                                            indirect_dim=0), oob_mode=nisa.oob_mode.skip)
                kT_t = nl.ndarray((Dh, Qmax), dtype=nl.float32, buffer=nl.sbuf)
                _to_sbuf_transposed(kT_t, k_t, Qmax, Dh)
                s = nl.ndarray((rows, Qmax), dtype=nl.float32, buffer=nl.sbuf)
                _scores(s, qT, kT_t, rows, Qmax, scale)
                valid = nl.ndarray((rows, Qmax), dtype=nl.uint8, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=valid, data=tmask, op0=nl.greater, operand0=0.5)
                _online_update(s, valid, v_t, Qmax, rows, Dh, m_run, l_run, acc)

                # ---- out = acc / sum, scattered to the query rows ----
                rl = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.reciprocal(dst=rl, data=l_run)
                o = nl.ndarray((rows, Dh), dtype=q.dtype, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=o, data=acc, op0=nl.multiply, operand0=rl)
                for g in range(G):
                    nisa.dma_copy(dst=out.ap(pattern=((HD, qn), (1, Dh)), offset=(h * G + g) * Dh,
                                             vector_offset=qidx, indirect_dim=0),
                                  src=o[g * qn:(g + 1) * qn, 0:Dh], oob_mode=nisa.oob_mode.skip)
    return out
