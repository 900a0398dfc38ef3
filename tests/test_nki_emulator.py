"""The NumPy emulation of the NKI subset (spdkernels.testing.nki_emulator) rejects each violated hardware limit
and API rule, fills new tensors with NaN, and computes what the ISA documents. Each limit test runs a tiny
kernel that breaks exactly one rule, next to the same kernel within the rule, which must run."""

import numpy as np
import pytest

from spdkernels.testing.nki_emulator import HBM, NKIEmulationError, emulate
from spdkernels.testing.nki_emulator import isa as nisa
from spdkernels.testing.nki_emulator import language as nl

P = 128


def run(kernel, *args):
    return emulate(kernel)(*args)


def copy_out(t, shape=None):
    out = nl.ndarray(shape or t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out


# ---- partitions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("buffer", ["sbuf", "psum"])
def test_tile_over_128_partitions_is_rejected(buffer):
    def k(n):
        nl.ndarray((n, 4), dtype=nl.float32, buffer=buffer)
        return copy_out(_zeros((1, 1)))

    run(k, 128)
    with pytest.raises(NKIEmulationError, match="partition dimension 129 exceeds the 128 partitions"):
        run(k, 129)


def _zeros(shape):
    t = nl.ndarray(shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=t, value=0.0)
    return t


def test_reading_past_a_tiles_partitions_is_rejected():
    """NumPy would clip t[0:129] to 128 rows silently; the emulation raises."""
    def k(stop):
        t = _zeros((P, 4))
        u = _zeros((P, 4))
        nisa.tensor_copy(dst=u[0:P, 0:4], src=t[0:stop, 0:4])
        return copy_out(u)

    run(k, P)
    with pytest.raises(NKIEmulationError, match=r"access \[0, 129\) of partitions is outside the tensor's 128"):
        run(k, P + 1)


def test_free_dim_overrun_and_steps_and_fancy_indices_are_rejected():
    def k(case):
        t = _zeros((4, 8))
        if case == 1:
            t[0:4, 4:9]
        elif case == 2:
            t[0:4, 0:8:2]
        elif case == 3:
            t[[0, 1], 0:8]  # an index list (nl.arange-style indexing)
        return copy_out(t)

    run(k, 0)
    for case, msg in ((1, r"\[4, 9\) of dim 1"), (2, "step"), (3, "only ints and slices")):
        with pytest.raises(NKIEmulationError, match=msg):
            run(k, case)


# ---- nc_matmul and nc_transpose --------------------------------------------------------------------

def _mm(K, M, N, dst_buf="psum", st_buf="sbuf", dtypes=("float32", "float32")):
    def k(a_in, b_in):
        a = nl.ndarray((K, M), dtype=dtypes[0], buffer=st_buf)
        b = nl.ndarray((K, N), dtype=dtypes[1], buffer=nl.sbuf)
        if st_buf == "sbuf":
            nisa.dma_copy(dst=a, src=a_in)
        else:
            nisa.memset(dst=a, value=1.0)
        nisa.dma_copy(dst=b, src=b_in)
        d = nl.ndarray((min(M, P), N), dtype=nl.float32, buffer=dst_buf)
        nisa.nc_matmul(dst=d, stationary=a, moving=b)
        s = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=s, src=d)
        return copy_out(s)

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((K, M), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
    return k, a, b


def test_matmul_computes_stationary_transposed_times_moving():
    k, a, b = _mm(128, 128, 512)
    np.testing.assert_allclose(run(k, a, b), a.T.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)


def test_matmul_moving_over_512_is_rejected():
    k, a, b = _mm(64, 32, 513)
    with pytest.raises(NKIEmulationError, match="moving free size 513 exceeds 512"):
        run(k, a, b)


def test_matmul_stationary_over_128_is_rejected():
    k, a, b = _mm(64, 129, 16)
    with pytest.raises(NKIEmulationError, match="stationary free size 129 exceeds 128"):
        run(k, a, b)


def test_matmul_memories_and_dtypes_are_checked():
    k, a, b = _mm(8, 8, 8, dst_buf="sbuf")
    with pytest.raises(NKIEmulationError, match="nc_matmul dst.*must be in PSUM"):
        run(k, a, b)
    k, a, b = _mm(8, 8, 8, st_buf="psum")
    with pytest.raises(NKIEmulationError, match="nc_matmul stationary.*must be in SBUF"):
        run(k, a, b)
    k, a, b = _mm(8, 8, 8, dtypes=("float32", "bfloat16"))
    with pytest.raises(NKIEmulationError, match="fp32 operand needs an fp32 partner"):
        run(k, a, b)


def test_matmul_contraction_mismatch_is_rejected():
    def k():
        a = _zeros((64, 8))
        b = _zeros((32, 8))
        d = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=d, stationary=a, moving=b)
        return copy_out(_zeros((1, 1)))

    with pytest.raises(NKIEmulationError, match="stationary has 64 partitions, moving 32"):
        run(k)


def test_transpose_limits():
    def k(f, dst_buf):
        t = _zeros((64, f))
        d = nl.ndarray((min(f, P), 64), dtype=nl.float32, buffer=dst_buf)
        nisa.nc_transpose(dst=d, data=t)
        return copy_out(_zeros((1, 1)))

    run(k, 128, "psum")
    with pytest.raises(NKIEmulationError, match="exceeds the Tensor Engine's 128 x 128"):
        run(k, 129, "psum")
    with pytest.raises(NKIEmulationError, match="nc_transpose dst.*must be in PSUM"):
        run(k, 16, "sbuf")


# ---- capacity ----------------------------------------------------------------------------------------

def test_psum_holds_eight_banks():
    def k(n):
        keep = tuple(nl.ndarray((P, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(n))
        assert len(keep) == n
        return copy_out(_zeros((1, 1)))

    run(k, 8)
    with pytest.raises(NKIEmulationError, match="PSUM capacity exceeded: 8 banks live"):
        run(k, 9)


def test_psum_banks_are_freed_with_their_tiles():
    def k():
        for _ in range(20):  # each iteration's tile replaces the last one
            t = nl.ndarray((P, 512), dtype=nl.float32, buffer=nl.psum)
            nisa.memset(dst=t, value=0.0)
        return copy_out(_zeros((1, 1)))

    run(k)


def test_sbuf_capacity_per_target(monkeypatch):
    def k(n):
        t = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=t, value=0.0)
        return copy_out(_zeros((1, 1)))

    n = 200 * 1024 // 4  # 200 KiB per partition: over trn1's 192 KiB, within trn2's 224 KiB
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1")
    run(k, 192 * 1024 // 4 - 1)
    with pytest.raises(NKIEmulationError, match="SBUF capacity exceeded on trn1"):
        run(k, n)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    run(k, n)


# ---- memories: DMA endpoints, compute on-chip only, outputs in shared HBM ---------------------------

def test_dma_never_touches_psum():
    def k(x, to_psum):
        t = nl.ndarray((P, 4), dtype=nl.float32, buffer=nl.psum)
        if to_psum:
            nisa.dma_copy(dst=t, src=x)
        else:
            nisa.memset(dst=t, value=0.0)
            out = nl.ndarray((P, 4), dtype=nl.float32, buffer=nl.shared_hbm)
            nisa.dma_copy(dst=out, src=t)
        return copy_out(_zeros((1, 1)))

    x = np.zeros((P, 4), np.float32)
    with pytest.raises(NKIEmulationError, match="dma_copy dst: DMA does not access PSUM"):
        run(k, x, True)
    with pytest.raises(NKIEmulationError, match="dma_copy src: DMA does not access PSUM"):
        run(k, x, False)


def test_compute_engines_do_not_read_hbm():
    def k(x):
        t = _zeros((P, 4))
        nisa.tensor_copy(dst=t, src=x)
        return copy_out(t)

    with pytest.raises(NKIEmulationError, match="tensor_copy src.*must be in SBUF or PSUM"):
        run(k, np.zeros((P, 4), np.float32))


def test_outputs_must_be_shared_hbm():
    def k(buffer):
        t = nl.ndarray((2, 2), dtype=nl.float32, buffer=buffer)
        if buffer == "sbuf":
            nisa.memset(dst=t, value=0.0)
        return t

    with pytest.raises(NKIEmulationError, match="outputs must be nl.shared_hbm"):
        run(k, "sbuf")
    with pytest.raises(NKIEmulationError, match="outputs must be nl.shared_hbm"):
        run(k, "private_hbm")


def test_indirect_dma_bounds():
    """A gathered row outside the tensor raises, unless oob_mode=skip, which moves nothing for that row."""
    def k(data, idx_in, skip):
        idx = nl.ndarray((4, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=idx, src=idx_in)
        t = _zeros((4, 3))
        nisa.dma_copy(dst=t, src=data.ap(pattern=((3, 4), (1, 3)), offset=0, vector_offset=idx, indirect_dim=0),
                      oob_mode=nisa.oob_mode.skip if skip else nisa.oob_mode.error)
        return copy_out(t)

    data = np.arange(15, dtype=np.float32).reshape(5, 3)
    idx = np.array([[4], [0], [5], [2]], np.int32)
    got = run(k, data, idx, True)
    np.testing.assert_array_equal(got, np.stack([data[4], data[0], np.zeros(3), data[2]]))
    with pytest.raises(NKIEmulationError, match="outside the indexed tensor"):
        run(k, data, idx, False)


# ---- dtypes ----------------------------------------------------------------------------------------------

def test_dtypes_are_nki_dtypes():
    def k():
        nl.ndarray((2, 2), dtype="float64", buffer=nl.sbuf)

    with pytest.raises(NKIEmulationError, match="'float64' is not an NKI dtype"):
        run(k)
    with pytest.raises(NKIEmulationError, match="int64 has no NKI dtype"):
        run(lambda x: x, np.zeros(3, np.int64))


def test_predicates_and_vector_operands_have_their_dtypes():
    def k(case):
        t = _zeros((4, 4))
        if case == "float-predicate":
            nisa.tensor_copy_predicated(dst=t, src=t, predicate=_zeros((4, 4)))
        else:
            v = nl.ndarray((4, 1), dtype=nl.int32, buffer=nl.sbuf)
            nisa.memset(dst=v, value=1)
            nisa.tensor_scalar(dst=t, data=t, op0=nl.add, operand0=v)
        return copy_out(t)

    with pytest.raises(NKIEmulationError, match="predicate must be uint8/uint16/uint32"):
        run(k, "float-predicate")
    with pytest.raises(NKIEmulationError, match="vector operands of arithmetic operators are float32"):
        run(k, "int-operand")


def test_bf16_storage_rounds_to_nearest_even():
    def k(x):
        t = nl.ndarray((1, 3), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        return copy_out(t)

    x = np.array([[1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-7]], np.float32)  # ties to even, then exact
    np.testing.assert_array_equal(run(k, x), [[1.0, 1.0 + 2**-6, 1.0 + 2**-7]])
    with pytest.raises(NKIEmulationError, match="not exactly bfloat16"):
        run(k, HBM(x, "bfloat16"))


# ---- new tensors are poisoned -------------------------------------------------------------------------

def test_new_tensors_are_nan_or_poison():
    def k():
        f = nl.ndarray((2, 3), dtype=nl.float32, buffer=nl.sbuf)
        i = nl.ndarray((2, 3), dtype=nl.int32, buffer=nl.sbuf)
        return copy_out(f), copy_out(i)

    f, i = run(k)
    assert np.isnan(f).all()
    assert (i == -0x5A5A5A5B).all()


def test_unwritten_output_rows_show_up():
    """A kernel that forgets part of its output returns NaN there, never a plausible value."""
    def k(x):
        out = nl.ndarray((4, 2), dtype=nl.float32, buffer=nl.shared_hbm)
        t = _zeros((3, 2))
        nisa.dma_copy(dst=t, src=x[0:3, 0:2])
        nisa.dma_copy(dst=out[0:3, 0:2], src=t)
        return out

    got = run(k, np.ones((4, 2), np.float32))
    assert (got[:3] == 1).all() and np.isnan(got[3]).all()


# ---- a few semantics the kernels rely on --------------------------------------------------------------

def test_scan_reduce_select_and_activation_semantics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype(np.float32)

    def k(x_in):
        t = _zeros((5, 7))
        nisa.dma_copy(dst=t, src=x_in)
        ones = _zeros((5, 7))
        nisa.memset(dst=ones, value=1.0)
        cs = _zeros((5, 7))
        nisa.tensor_tensor_scan(dst=cs, data0=ones, data1=t, initial=0.0, op0=nl.multiply, op1=nl.add)
        mx = _zeros((5, 1))
        nisa.tensor_reduce(dst=mx, op=nl.maximum, data=t, axis=1)
        e = _zeros((5, 7))
        s = _zeros((5, 1))
        neg = _zeros((5, 1))
        nisa.tensor_scalar(dst=neg, data=mx, op0=nl.multiply, operand0=-1.0)
        nisa.activation(dst=e, op=nl.exp, data=t, bias=neg, scale=1.0, reduce_op=nl.add, reduce_res=s)
        pred = nl.ndarray((5, 7), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=pred, data=t, op0=nl.greater, operand0=0.0)
        sel = _zeros((5, 7))
        smax = _zeros((5, 1))
        nisa.select_reduce(dst=sel, predicate=pred, on_true=t, on_false=-5.0, reduce_res=smax,
                           reduce_cmd=nisa.reduce_cmd.reset_reduce, reduce_op=nl.maximum, reverse_pred=True)
        return copy_out(cs), copy_out(mx), copy_out(e), copy_out(s), copy_out(sel), copy_out(smax)

    cs, mx, e, s, sel, smax = run(k, x)
    np.testing.assert_allclose(cs, np.cumsum(x, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mx[:, 0], x.max(1))
    np.testing.assert_allclose(e, np.exp(x - x.max(1, keepdims=True)), rtol=1e-6)
    np.testing.assert_allclose(s[:, 0], e.sum(1), rtol=1e-6)
    np.testing.assert_array_equal(sel, np.where(x > 0, -5.0, x))
    np.testing.assert_array_equal(smax[:, 0], np.where(x > 0, -5.0, x).max(1))
