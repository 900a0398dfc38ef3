"""A NumPy emulation of exactly the ``nki.language`` / ``nki.isa`` subset that ``spdkernels.nki_kernels`` uses.

This is a test harness, not the official NKI simulator (``nki.simulate``, which ships in the ``nki`` wheel of
the Neuron package index). It runs the unmodified kernel source: :func:`load_kernel_module` executes a kernel
file with ``import nki`` / ``nki.language`` / ``nki.isa`` / ``nki.typing`` bound to the modules built here,
and :func:`emulate` runs a kernel on NumPy arrays. Every instruction checks the rules of docs/contract.md section 7
and the ISA documentation, and a broken rule raises :class:`NKIEmulationError` naming it:

* partitions: an SBUF/PSUM tensor has at most 128 partitions (dim 0), and every slice stays inside its
  tensor (NumPy would silently clip ``tile[0:129]``; here it is an error);
* ``nc_matmul``: stationary and moving in SBUF, ``dst`` an fp32 PSUM tile of one 2 KiB bank, contraction
  (partitions) <= 128, stationary free size <= 128, moving free size <= 512, fp32 only with fp32;
* ``nc_transpose`` (Tensor Engine): SBUF in, PSUM out, at most 128 x 128, same dtype;
* capacity: the live SBUF tensors fit the per-partition SBUF bytes of the target (192 KiB trn1, 224 KiB
  trn2; ``NEURON_PLATFORM_TARGET_OVERRIDE``), the live PSUM tensors fit the 8 banks of 2 KiB per partition;
* DMA endpoints: ``dma_copy`` moves data between HBM and SBUF (never PSUM); compute instructions read and
  write SBUF/PSUM only (never HBM); indirect (``.ap(vector_offset=/scalar_offset=)``) rows outside the
  indexed tensor raise unless ``oob_mode=nisa.oob_mode.skip``;
* dtypes: the NKI dtypes only (no float64/int64), predicates of ``tensor_copy_predicated`` unsigned ints,
  vector operands of arithmetic ``tensor_scalar`` float32;
* new tensors (``nl.ndarray``) are filled with NaN (floats) or a poison pattern (ints), so that reading
  memory the kernel never wrote shows up as a wrong answer;
* kernel outputs are returned ``nl.shared_hbm`` tensors.

Numerics follow the engines: arithmetic in fp32 (integer inputs are cast to fp32), results rounded to the
destination dtype (bf16 round-to-nearest-even, fp16 by NumPy), bit-exact copies between equal dtypes. What
it does not model: timing, engine parallelism, instruction scheduling, address alignment, and anything the
kernels here do not use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading
import types
import weakref
from enum import Enum
from typing import Any, Dict, Optional, Tuple

import numpy as np

# ---- hardware constants (docs/contract.md section 7; nki.language.tile_size) --------------------------------

PARTITIONS = 128  # SBUF and PSUM partitions (nl.tile_size.pmax)
PSUM_BANK_BYTES = 2048  # one bank per partition: 512 fp32
PSUM_BANKS = 8
GEMM_CONTRACT_MAX = 128  # nc_matmul partitions (contraction)
GEMM_STATIONARY_FMAX = 128  # nl.tile_size.gemm_stationary_fmax
GEMM_MOVING_FMAX = 512  # nl.tile_size.gemm_moving_fmax
TRANSPOSE_MAX = 128  # Tensor Engine nc_transpose: at most 128 x 128
SBUF_BYTES_PER_PARTITION = {"trn1": 192 * 1024, "trn2": 224 * 1024}


class NKIEmulationError(RuntimeError):
    """A kernel broke a hardware limit or an API rule of the emulated NKI subset."""


def target() -> str:
    t = os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1").strip() or "trn1"
    if t not in SBUF_BYTES_PER_PARTITION:
        raise NKIEmulationError(f"NEURON_PLATFORM_TARGET_OVERRIDE={t!r}: the emulation knows trn1 and trn2")
    return t


# ---- dtypes ---------------------------------------------------------------------------------------------------

# NKI dtype name -> (NumPy storage dtype, bytes per element). Floats narrower than fp32 are stored as fp32
# holding values rounded to the narrow format.
_DTYPES: Dict[str, Tuple[Any, int]] = {
    "float32": (np.float32, 4), "bfloat16": (np.float32, 2), "float16": (np.float32, 2),
    "int32": (np.int32, 4), "uint32": (np.uint32, 4), "int16": (np.int16, 2), "uint16": (np.uint16, 2),
    "int8": (np.int8, 1), "uint8": (np.uint8, 1),
}
_FLOATS = ("float32", "bfloat16", "float16")
_POISON = {"int32": -0x5A5A5A5B, "uint32": 0xA5A5A5A5, "int16": -0x5A5B, "uint16": 0xA5A5, "int8": -0x5B,
           "uint8": 0xA5}


def _check_dtype(dtype, what: str) -> str:
    if dtype not in _DTYPES:
        raise NKIEmulationError(f"{what}: dtype {dtype!r} is not an NKI dtype (supported here: "
                                f"{', '.join(_DTYPES)})")
    return dtype


def _round(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` converted to ``dtype``'s storage (floats rounded to the format, ints saturated)."""
    store = _DTYPES[dtype][0]
    if dtype in _FLOATS:
        v = np.asarray(values, dtype=np.float32)
        if dtype == "float16":
            with np.errstate(over="ignore"):
                return v.astype(np.float16).astype(np.float32)
        if dtype == "bfloat16":
            b = v.view(np.uint32).astype(np.uint64)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
            return np.where(np.isnan(v), v, r)
        return v
    v = np.asarray(values)
    if v.dtype.kind == "f":
        info = np.iinfo(store)
        with np.errstate(invalid="ignore"):
            v = np.clip(np.rint(v), info.min, info.max)  # saturating; NaN converts to garbage
    return v.astype(store)


def _bf16_exact(a: np.ndarray) -> np.ndarray:
    return _round(a, "bfloat16")


# ---- allocation and accounting --------------------------------------------------------------------------------

class _Run(threading.local):
    def __init__(self):
        self.ctx: Optional[_Context] = None


_RUN = _Run()


class _Context:
    """Resource accounting of one kernel run: live SBUF bytes per partition, live PSUM banks."""

    def __init__(self):
        self.target = target()
        self.sbuf_limit = SBUF_BYTES_PER_PARTITION[self.target]
        self.sbuf_used = 0
        self.sbuf_peak = 0
        self.psum_used = 0
        self.psum_peak = 0

    def _free(self, buffer: str, amount: int) -> None:
        if buffer == "sbuf":
            self.sbuf_used -= amount
        else:
            self.psum_used -= amount


def _ctx() -> _Context:
    if _RUN.ctx is None:
        raise NKIEmulationError("NKI instructions run only inside a kernel launched by emulate()")
    return _RUN.ctx


class _Alloc:
    """Storage of one tensor (its views share it)."""

    __slots__ = ("arr", "dtype", "buffer", "mm_written", "__weakref__")

    def __init__(self, arr: np.ndarray, dtype: str, buffer: str):
        self.arr, self.dtype, self.buffer = arr, dtype, buffer
        self.mm_written = None


def _new_alloc(shape, dtype: str, buffer: str, name: str) -> _Alloc:
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape) or not shape:
        raise NKIEmulationError(f"nl.ndarray {name!r}: shape {shape} must have at least one dim, all >= 1")
    store, size = _DTYPES[dtype]
    if dtype in _FLOATS:
        arr = np.full(shape, np.nan, dtype=store)
    else:
        arr = np.full(shape, _POISON[dtype], dtype=store)
    alloc = _Alloc(arr, dtype, buffer)
    if buffer in ("sbuf", "psum"):
        ctx = _ctx()
        if shape[0] > PARTITIONS:
            raise NKIEmulationError(f"nl.ndarray {name!r}: partition dimension {shape[0]} exceeds the "
                                    f"{PARTITIONS} partitions of {buffer.upper()}")
        per_part = math.prod(shape[1:]) * size
        if buffer == "sbuf":
            if ctx.sbuf_used + per_part > ctx.sbuf_limit:
                raise NKIEmulationError(
                    f"nl.ndarray {name!r}: SBUF capacity exceeded on {ctx.target}: {ctx.sbuf_used} bytes per "
                    f"partition live + {per_part} > {ctx.sbuf_limit}")
            ctx.sbuf_used += per_part
            ctx.sbuf_peak = max(ctx.sbuf_peak, ctx.sbuf_used)
            weakref.finalize(alloc, ctx._free, "sbuf", per_part)
        else:
            if dtype != "float32":
                raise NKIEmulationError(f"nl.ndarray {name!r}: PSUM tensors are fp32 here, got {dtype}")
            banks = -(-per_part // PSUM_BANK_BYTES)
            if ctx.psum_used + banks > PSUM_BANKS:
                raise NKIEmulationError(
                    f"nl.ndarray {name!r}: PSUM capacity exceeded: {ctx.psum_used} banks live + {banks} > "
                    f"{PSUM_BANKS} banks of {PSUM_BANK_BYTES} bytes per partition")
            ctx.psum_used += banks
            ctx.psum_peak = max(ctx.psum_peak, ctx.psum_used)
            weakref.finalize(alloc, ctx._free, "psum", banks)
    return alloc


class Tensor:
    """An NKI tensor (or a view of one): HBM, SBUF or PSUM."""

    __slots__ = ("_alloc", "_arr", "dtype", "buffer", "name")

    def __init__(self, alloc: _Alloc, arr: np.ndarray, name: str = ""):
        self._alloc, self._arr = alloc, arr
        self.dtype, self.buffer, self.name = alloc.dtype, alloc.buffer, name

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._arr.shape

    @property
    def ndim(self) -> int:
        return self._arr.ndim

    @property
    def onchip(self) -> bool:
        return self.buffer in ("sbuf", "psum")

    def __repr__(self):
        return f"<{self.buffer} tensor {self.name!r} {self.dtype}{list(self.shape)}>"

    def __getitem__(self, key) -> Tensor:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > self.ndim:
            raise NKIEmulationError(f"{self!r}: {len(key)} indices for {self.ndim} dims")
        norm = []
        for ax, k in enumerate(key):
            dim = self.shape[ax]
            if isinstance(k, slice):
                if k.step not in (None, 1):
                    raise NKIEmulationError(f"{self!r}: slices with a step are not used here")
                a = 0 if k.start is None else k.start
                b = dim if k.stop is None else k.stop
                if not (isinstance(a, int) and isinstance(b, int)) or a < 0 or b > dim or a >= b:
                    what = "partitions" if ax == 0 and self.onchip else f"dim {ax}"
                    raise NKIEmulationError(
                        f"{self!r}: access [{a}, {b}) of {what} is outside the tensor's {dim} "
                        f"{'partitions' if ax == 0 and self.onchip else 'elements'}")
                norm.append(slice(a, b))
            elif isinstance(k, (int, np.integer)):
                if ax == 0 and self.onchip:
                    raise NKIEmulationError(f"{self!r}: index the partition dim with a slice, not {k}")
                if not 0 <= k < dim:
                    raise NKIEmulationError(f"{self!r}: index {k} outside dim {ax} of size {dim}")
                norm.append(int(k))
            else:
                raise NKIEmulationError(f"{self!r}: index {k!r}: only ints and slices (no nl.arange, no masks)")
        return Tensor(self._alloc, self._arr[tuple(norm)], self.name)

    def ap(self, pattern, offset=0, scalar_offset=None, vector_offset=None, indirect_dim=0, dtype=None):
        """Access pattern over this tensor's storage (HBM tensors only here): ``pattern`` is
        ``((step, num), ...)`` in elements, the first pair the partition dimension; with ``vector_offset`` (an
        SBUF ``(P, 1)`` int tile) partition ``p`` starts at ``offset + vector_offset[p] * stride(indirect_dim)``
        and the partition step is unused; with ``scalar_offset`` (an SBUF ``(1, 1)`` int tile) every element
        is shifted by ``scalar_offset * stride(indirect_dim)``."""
        return _AP(self, pattern, offset, scalar_offset, vector_offset, indirect_dim, dtype)


class _AP:
    def __init__(self, t: Tensor, pattern, offset, scalar_offset, vector_offset, indirect_dim, dtype):
        if t.buffer not in ("hbm", "shared_hbm", "private_hbm"):
            raise NKIEmulationError(f"{t!r}.ap(): access patterns are used on HBM tensors here")
        if not t._arr.flags.c_contiguous or t._arr.base is not None and t._arr is not t._alloc.arr:
            raise NKIEmulationError(f"{t!r}.ap(): call it on the whole tensor, not on a slice")
        if dtype is not None:
            raise NKIEmulationError(".ap(dtype=) is not used here")
        if scalar_offset is not None and vector_offset is not None:
            raise NKIEmulationError(".ap(): vector_offset and scalar_offset are mutually exclusive")
        pat = tuple((int(s), int(n)) for s, n in pattern)
        if not pat or any(n < 1 for _, n in pat):
            raise NKIEmulationError(f".ap(): bad pattern {pattern}")
        if not 0 <= indirect_dim < t.ndim:
            raise NKIEmulationError(f".ap(): indirect_dim {indirect_dim} outside the tensor's {t.ndim} dims")
        self.t, self.pattern, self.offset = t, pat, int(offset)
        self.scalar_offset, self.vector_offset, self.indirect_dim = scalar_offset, vector_offset, indirect_dim
        self.shape = tuple(n for _, n in pat)
        self.dtype, self.buffer = t.dtype, t.buffer

    def addresses(self):
        """(flat element addresses of shape self.shape, per-partition validity)."""
        t = self.t
        strides = np.cumprod((1,) + t.shape[:0:-1])[::-1]
        stride_ind = int(strides[self.indirect_dim])
        rows_ind = t.shape[self.indirect_dim]
        addr = np.full(self.shape, self.offset, dtype=np.int64)
        for ax, (step, n) in enumerate(self.pattern):
            if ax == 0 and self.vector_offset is not None:
                continue
            sh = [1] * len(self.shape)
            sh[ax] = n
            addr = addr + (np.arange(n, dtype=np.int64) * step).reshape(sh)
        valid = np.ones(self.shape[0], dtype=bool)
        if self.vector_offset is not None:
            idx = _index_tile(self.vector_offset, (self.shape[0], 1), "vector_offset")[:, 0]
            valid = (idx >= 0) & (idx < rows_ind)
            addr = addr + (np.where(valid, idx, 0) * stride_ind).reshape((-1,) + (1,) * (len(self.shape) - 1))
        elif self.scalar_offset is not None:
            idx = int(_index_tile(self.scalar_offset, (1, 1), "scalar_offset")[0, 0])
            ok = 0 <= idx < rows_ind
            valid[:] = ok
            addr = addr + (idx if ok else 0) * stride_ind
        if addr.size and (addr.min() < 0 or addr.max() >= t._arr.size):
            raise NKIEmulationError(f"{t!r}.ap(): the pattern reaches element {int(addr.max())} outside the "
                                    f"tensor's {t._arr.size} elements")
        return addr, valid


def _index_tile(t, shape, what) -> np.ndarray:
    if not isinstance(t, Tensor) or t.buffer != "sbuf":
        raise NKIEmulationError(f"{what} must be an SBUF tile, got {t!r}")
    if t.dtype not in ("int32", "uint32"):
        raise NKIEmulationError(f"{what} must be int32/uint32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise NKIEmulationError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    return t._arr.astype(np.int64)


# ---- nki.language -----------------------------------------------------------------------------------------------

class _Op:
    """An ALU operator (``op=`` argument): arithmetic, comparison or bitvec."""

    def __init__(self, name, fn, kind):
        self.name, self.fn, self.kind = name, fn, kind

    def __call__(self, *a, **k):
        raise NKIEmulationError(f"nl.{self.name} is used as an ALU operator (op=...) by these kernels")

    def __repr__(self):
        return f"nl.{self.name}"


class _Act:
    """An activation function (``nisa.activation(op=...)``)."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *a, **k):
        raise NKIEmulationError(f"nl.{self.name} is used as an activation function (op=...) here")


def _cmp(f):
    return lambda a, b: f(a, b).astype(np.float32)


_OPS = {
    "add": (np.add, "arith"), "subtract": (np.subtract, "arith"), "multiply": (np.multiply, "arith"),
    "maximum": (np.maximum, "arith"), "minimum": (np.minimum, "arith"),
    "equal": (_cmp(np.equal), "cmp"), "not_equal": (_cmp(np.not_equal), "cmp"),
    "greater": (_cmp(np.greater), "cmp"), "greater_equal": (_cmp(np.greater_equal), "cmp"),
    "less": (_cmp(np.less), "cmp"), "less_equal": (_cmp(np.less_equal), "cmp"),
    "logical_and": (lambda a, b: ((a != 0) & (b != 0)).astype(np.float32), "cmp"),
    "logical_or": (lambda a, b: ((a != 0) | (b != 0)).astype(np.float32), "cmp"),
}


def _build_language() -> types.ModuleType:
    nl = types.ModuleType("nki.language")
    nl.__doc__ = "NumPy emulation of the nki.language subset used by spdkernels (see spdkernels.testing)."
    for name in _DTYPES:
        setattr(nl, name, name)
    nl.sbuf, nl.psum, nl.hbm, nl.shared_hbm, nl.private_hbm = "sbuf", "psum", "hbm", "shared_hbm", "private_hbm"
    for name, (fn, kind) in _OPS.items():
        setattr(nl, name, _Op(name, fn, kind))
    nl.exp = _Act("exp", lambda x: np.exp(x))
    nl.copy = _Act("copy", lambda x: x)

    class tile_size:  # noqa: N801 - the NKI name
        pmax = PARTITIONS
        psum_fmax = PSUM_BANK_BYTES // 4
        gemm_stationary_fmax = GEMM_STATIONARY_FMAX
        gemm_moving_fmax = GEMM_MOVING_FMAX

    nl.tile_size = tile_size

    def ndarray(shape, dtype, buffer=None, name=""):
        buffer = "sbuf" if buffer is None else buffer
        if buffer not in ("sbuf", "psum", "hbm", "shared_hbm", "private_hbm"):
            raise NKIEmulationError(f"nl.ndarray: unknown buffer {buffer!r}")
        _check_dtype(dtype, f"nl.ndarray {name!r}")
        alloc = _new_alloc(shape, dtype, buffer, name)
        return Tensor(alloc, alloc.arr, name)

    nl.ndarray = ndarray
    return nl


# ---- nki.isa ------------------------------------------------------------------------------------------------------

class oob_mode(Enum):  # noqa: N801
    error = 0
    skip = 1


class dge_mode(Enum):  # noqa: N801
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class engine(Enum):  # noqa: N801
    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


class reduce_cmd(Enum):  # noqa: N801
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


def _tile(t, what, buffers=("sbuf", "psum")) -> Tensor:
    if not isinstance(t, Tensor):
        raise NKIEmulationError(f"{what}: expected a tile, got {type(t).__name__}")
    if t.buffer not in buffers:
        raise NKIEmulationError(f"{what}: {t!r} must be in {' or '.join(b.upper() for b in buffers)} "
                                f"(compute engines do not access HBM; DMA never touches PSUM)")
    return t


def _pf(t: Tensor) -> Tuple[int, int]:
    sh = t._arr.shape
    return sh[0], math.prod(sh[1:])


def _same_pf(what, *tiles):
    pf = _pf(tiles[0])
    for t in tiles[1:]:
        if _pf(t) != pf:
            raise NKIEmulationError(f"{what}: partition/free sizes differ: {[_pf(x) for x in tiles]}")
    return pf


def _read(t: Tensor) -> np.ndarray:
    """fp32 values as the compute engines see them, shaped (P, F)."""
    return t._arr.reshape(_pf(t)).astype(np.float32, copy=False)


def _write(dst: Tensor, values: np.ndarray) -> None:
    dst._arr[...] = _round(values, dst.dtype).reshape(dst.shape)


def _operand(x, P, what) -> Any:
    """A scalar or a (P, 1) vector operand of tensor_scalar / activation."""
    if isinstance(x, Tensor):
        _tile(x, what)
        if _pf(x) != (P, 1):
            raise NKIEmulationError(f"{what}: a vector operand has shape ({P}, 1), got {tuple(x.shape)}")
        if x.dtype != "float32":
            raise NKIEmulationError(f"{what}: vector operands of arithmetic operators are float32, got {x.dtype}")
        return _read(x)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return np.float32(x)
    raise NKIEmulationError(f"{what}: expected a number or a ({P}, 1) tile, got {x!r}")


def _alu(op, what) -> _Op:
    if not isinstance(op, _Op):
        raise NKIEmulationError(f"{what}: {op!r} is not an ALU operator of the emulated subset")
    return op


def _apply(op: _Op, a, b, reverse=False):
    with np.errstate(invalid="ignore", over="ignore"):
        return op.fn(b, a) if reverse else op.fn(a, b)


def _build_isa() -> types.ModuleType:
    nisa = types.ModuleType("nki.isa")
    nisa.__doc__ = "NumPy emulation of the nki.isa subset used by spdkernels (see spdkernels.testing)."
    nisa.oob_mode, nisa.dge_mode, nisa.engine, nisa.reduce_cmd = oob_mode, dge_mode, engine, reduce_cmd
    nisa.NKIEmulationError = NKIEmulationError

    def dma_copy(dst, src, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown,
                 name=None):
        for side, t in (("dst", dst), ("src", src)):
            if not isinstance(t, (Tensor, _AP)):
                raise NKIEmulationError(f"dma_copy {side}: expected a tensor, got {type(t).__name__}")
            if t.buffer == "psum":
                raise NKIEmulationError(f"dma_copy {side}: DMA does not access PSUM ({t!r}); copy it to SBUF "
                                        "with tensor_copy first")
        n_dst, n_src = math.prod(dst.shape), math.prod(src.shape)
        if n_dst != n_src:
            raise NKIEmulationError(f"dma_copy: {n_src} source elements for {n_dst} destination elements")
        skip = oob_mode == globals()["oob_mode"].skip
        # source values (flat, C order) and per-element validity
        if isinstance(src, _AP):
            addr, valid = src.addresses()
            if not valid.all() and not skip:
                raise NKIEmulationError("dma_copy: indirect source row outside the indexed tensor "
                                        "(oob_mode=error)")
            vals = src.t._alloc.arr.reshape(-1)[addr]
            ok = np.broadcast_to(valid.reshape((-1,) + (1,) * (addr.ndim - 1)), addr.shape).reshape(-1)
        else:
            vals, ok = src._arr, np.ones(n_src, dtype=bool)
        vals = np.asarray(vals).reshape(-1)
        if src.dtype != dst.dtype:  # the DMA engines convert through fp32
            vals = _round(vals.astype(np.float32), dst.dtype)
        if isinstance(dst, _AP):
            addr, valid = dst.addresses()
            if not valid.all() and not skip:
                raise NKIEmulationError("dma_copy: indirect destination row outside the indexed tensor "
                                        "(oob_mode=error)")
            okd = np.broadcast_to(valid.reshape((-1,) + (1,) * (addr.ndim - 1)), addr.shape).reshape(-1) & ok
            dst.t._alloc.arr.reshape(-1)[addr.reshape(-1)[okd]] = vals[okd]
        else:
            if dst._arr.flags.c_contiguous:
                dst._arr.reshape(-1)[ok] = vals[ok]
            else:
                tmp = dst._arr.reshape(-1).copy()
                tmp[ok] = vals[ok]
                dst._arr[...] = tmp.reshape(dst.shape)

    def memset(dst, value, engine=engine.unknown, name=None):
        _tile(dst, "memset dst")
        if not isinstance(value, (int, float)):
            raise NKIEmulationError("memset: value must be a compile-time constant number")
        _write(dst, np.full(dst.shape, value, dtype=np.float64 if dst.dtype not in _FLOATS else np.float32))

    def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):
        _tile(dst, "iota dst", ("sbuf",))
        P, F = _pf(dst)
        pat = tuple((int(s), int(n)) for s, n in pattern)
        if int(np.prod([n for _, n in pat])) != F:
            raise NKIEmulationError(f"iota: the pattern has {int(np.prod([n for _, n in pat]))} elements per "
                                    f"partition, dst has {F}")
        v = np.zeros([n for _, n in pat], dtype=np.int64)
        for ax, (s, n) in enumerate(pat):
            sh = [1] * len(pat)
            sh[ax] = n
            v = v + (np.arange(n) * s).reshape(sh)
        v = v.reshape(1, F) + int(offset) + int(channel_multiplier) * np.arange(P).reshape(P, 1)
        dst._arr[...] = _round(v.astype(np.float64) if dst.dtype in _FLOATS else v, dst.dtype).reshape(dst.shape)

    def tensor_copy(dst, src, engine=engine.unknown, name=None):
        _tile(dst, "tensor_copy dst")
        _tile(src, "tensor_copy src")
        _same_pf("tensor_copy", dst, src)
        if src.dtype == dst.dtype:
            dst._arr[...] = src._arr.reshape(dst.shape)
        else:
            _write(dst, _read(src))

    def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
        op = _alu(op, "tensor_tensor")
        for w, t in (("dst", dst), ("data1", data1), ("data2", data2)):
            _tile(t, f"tensor_tensor {w}")
        if data1.buffer == "psum" and data2.buffer == "psum":
            raise NKIEmulationError("tensor_tensor: data1 and data2 cannot both be in PSUM")
        _same_pf("tensor_tensor", dst, data1, data2)
        ints = ("int32", "uint32")
        if dst.dtype in ints and data1.dtype in ints and data2.dtype in ints and op.kind == "arith":
            # all-int32 arithmetic runs on GpSimd in native integer arithmetic: exact, wrapping
            a = data1._arr.reshape(_pf(data1)).astype(np.int64)
            b = data2._arr.reshape(_pf(data2)).astype(np.int64)
            dst._arr[...] = op.fn(a, b).astype(_DTYPES[dst.dtype][0]).reshape(dst.shape)
            return
        _write(dst, _apply(op, _read(data1), _read(data2)))

    def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                      engine=engine.unknown, name=None):
        _tile(dst, "tensor_scalar dst")
        _tile(data, "tensor_scalar data")
        P, _ = _same_pf("tensor_scalar", dst, data)
        v = _apply(_alu(op0, "tensor_scalar op0"), _read(data), _operand(operand0, P, "tensor_scalar operand0"),
                   reverse0)
        if op1 is not None:
            v = _apply(_alu(op1, "tensor_scalar op1"), v, _operand(operand1, P, "tensor_scalar operand1"),
                       reverse1)
        elif operand1 is not None:
            raise NKIEmulationError("tensor_scalar: operand1 without op1")
        _write(dst, v)

    def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
        op = _alu(op, "tensor_reduce")
        _tile(dst, "tensor_reduce dst")
        _tile(data, "tensor_reduce data")
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        nd = data.ndim
        if 0 in axes or sorted(axes) != list(range(nd - len(axes), nd)):
            raise NKIEmulationError(f"tensor_reduce: axis {axis} must be the last free dims (never 0)")
        if dst.shape[0] != data.shape[0]:
            raise NKIEmulationError("tensor_reduce: dst and data partitions differ")
        red = {"add": np.sum, "maximum": np.max, "minimum": np.min, "multiply": np.prod}.get(op.name)
        if red is None:
            raise NKIEmulationError(f"tensor_reduce: {op!r} is not a reduction of the emulated subset")
        v = data._arr.astype(np.float32, copy=False)
        with np.errstate(invalid="ignore", over="ignore"):
            r = red(v, axis=axes, keepdims=False).astype(np.float32)
        if negate:
            r = -r
        if math.prod(dst.shape[1:]) != math.prod(r.shape[1:]):
            raise NKIEmulationError(f"tensor_reduce: dst {tuple(dst.shape)} does not hold the result "
                                    f"{tuple(r.shape)}")
        _write(dst, r)

    def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None,
                   reduce_cmd=reduce_cmd.idle, name=None):
        if not isinstance(op, _Act):
            raise NKIEmulationError(f"activation: {op!r} is not an activation function of the emulated subset")
        _tile(dst, "activation dst")
        _tile(data, "activation data")
        P, _ = _same_pf("activation", dst, data)
        x = _read(data) * _operand(scale, P, "activation scale")
        if bias is not None:
            x = x + _operand(bias, P, "activation bias")
        with np.errstate(over="ignore", invalid="ignore"):
            y = op.fn(x.astype(np.float32)).astype(np.float32)
        _write(dst, y)
        if reduce_res is not None:
            if reduce_op is None or not isinstance(reduce_op, _Op) or reduce_op.name != "add":
                raise NKIEmulationError("activation: reduce_op must be nl.add")
            _tile(reduce_res, "activation reduce_res")
            if _pf(reduce_res) != (P, 1):
                raise NKIEmulationError("activation: reduce_res has shape (P, 1)")
            _write(reduce_res, _read(dst).sum(axis=1, keepdims=True, dtype=np.float32))

    def reciprocal(dst, data, name=None):
        _tile(dst, "reciprocal dst")
        _tile(data, "reciprocal data")
        _same_pf("reciprocal", dst, data)
        with np.errstate(divide="ignore"):
            _write(dst, np.float32(1.0) / _read(data))

    def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, name=None):
        _tile(dst, "tensor_copy_predicated dst")
        _tile(predicate, "tensor_copy_predicated predicate")
        if predicate.dtype not in ("uint8", "uint16", "uint32"):
            raise NKIEmulationError(f"tensor_copy_predicated: predicate must be uint8/uint16/uint32, got "
                                    f"{predicate.dtype}")
        P, F = _same_pf("tensor_copy_predicated", dst, predicate)
        pred = predicate._arr.reshape(P, F) == 0 if reverse_pred else predicate._arr.reshape(P, F) != 0
        if isinstance(src, Tensor):
            _tile(src, "tensor_copy_predicated src")
            if src.dtype != dst.dtype:
                raise NKIEmulationError("tensor_copy_predicated: src and dst dtypes differ")
            if src.buffer == "psum" and predicate.buffer == "psum":
                raise NKIEmulationError("tensor_copy_predicated: src and predicate cannot both be in PSUM")
            _same_pf("tensor_copy_predicated", dst, src)
            s = src._arr.reshape(P, F)
        else:
            s = _round(np.float32(src), dst.dtype)
        np.copyto(dst._arr, np.where(pred, s, dst._arr.reshape(P, F)).reshape(dst.shape))

    def select_reduce(dst, predicate, on_true, on_false, reduce_res=None, reduce_cmd=reduce_cmd.idle,
                      reduce_op=None, reverse_pred=False, name=None):
        _tile(dst, "select_reduce dst")
        _tile(predicate, "select_reduce predicate")
        _tile(on_true, "select_reduce on_true")
        if predicate.dtype not in ("int8", "uint8", "int16", "uint16"):
            raise NKIEmulationError(f"select_reduce: predicate must be an 8/16-bit int, got {predicate.dtype}")
        if on_true.dtype in ("int32", "uint32"):
            raise NKIEmulationError("select_reduce: on_true cannot be int32/uint32")
        if on_true.buffer == "psum" and predicate.buffer == "psum":
            raise NKIEmulationError("select_reduce: on_true and predicate cannot both be in PSUM")
        P, F = _same_pf("select_reduce", dst, predicate, on_true)
        pred = predicate._arr.reshape(P, F) == 0 if reverse_pred else predicate._arr.reshape(P, F) != 0
        off = _operand(on_false, P, "select_reduce on_false")
        res = np.where(pred, _read(on_true), off).astype(np.float32)
        _write(dst, res)
        if reduce_res is not None:
            if reduce_op is None or reduce_op.name != "maximum":
                raise NKIEmulationError("select_reduce: reduce_op must be nl.maximum")
            if reduce_cmd != globals()["reduce_cmd"].reset_reduce:
                raise NKIEmulationError("select_reduce: only reduce_cmd=reset_reduce is emulated")
            _tile(reduce_res, "select_reduce reduce_res")
            if _pf(reduce_res) != (P, 1) or reduce_res.dtype not in _FLOATS:
                raise NKIEmulationError("select_reduce: reduce_res is a float (P, 1) tile")
            _write(reduce_res, res.max(axis=1, keepdims=True))

    def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
        for w, t in (("dst", dst), ("data0", data0), ("data1", data1)):
            _tile(t, f"tensor_tensor_scan {w}")
        P, F = _same_pf("tensor_tensor_scan", dst, data0, data1)
        a, b = _read(data0), _read(data1)
        prev = np.broadcast_to(_operand(initial, P, "tensor_tensor_scan initial"), (P, 1)).reshape(P).copy()
        out = np.empty((P, F), dtype=np.float32)
        o0, o1 = _alu(op0, "scan op0"), _alu(op1, "scan op1")
        if o0.name == "multiply" and o1.name == "add" and not (reverse0 or reverse1) and bool((a == 1).all()):
            b2 = b.copy()
            b2[:, 0] += prev
            _write(dst, np.cumsum(b2, axis=1, dtype=np.float32))  # the same sequential fp32 sums
            return
        for i in range(F):
            prev = _apply(o1, _apply(o0, a[:, i], prev, reverse0), b[:, i], reverse1).astype(np.float32)
            out[:, i] = prev
        _write(dst, out)

    def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False,
                  is_transpose=False, accumulate=None, tile_position=(), tile_size=(), perf_mode=None, name=None):
        _tile(stationary, "nc_matmul stationary", ("sbuf",))
        _tile(moving, "nc_matmul moving", ("sbuf",))
        _tile(dst, "nc_matmul dst", ("psum",))
        K, M = _pf(stationary)
        K2, N = _pf(moving)
        if K != K2:
            raise NKIEmulationError(f"nc_matmul: stationary has {K} partitions, moving {K2} (the contraction)")
        if K > GEMM_CONTRACT_MAX:
            raise NKIEmulationError(f"nc_matmul: contraction {K} exceeds {GEMM_CONTRACT_MAX} partitions")
        if M > GEMM_STATIONARY_FMAX:
            raise NKIEmulationError(f"nc_matmul: stationary free size {M} exceeds {GEMM_STATIONARY_FMAX}")
        if N > GEMM_MOVING_FMAX:
            raise NKIEmulationError(f"nc_matmul: moving free size {N} exceeds {GEMM_MOVING_FMAX} (one PSUM bank "
                                    "of fp32 per partition)")
        ok = ("float32", "bfloat16", "float16")
        if stationary.dtype not in ok or moving.dtype not in ok:
            raise NKIEmulationError(f"nc_matmul: input dtypes {stationary.dtype}/{moving.dtype} not supported")
        if ("float32" in (stationary.dtype, moving.dtype)) and stationary.dtype != moving.dtype:
            raise NKIEmulationError("nc_matmul: an fp32 operand needs an fp32 partner")
        if dst.dtype != "float32" or _pf(dst) != (M, N):
            raise NKIEmulationError(f"nc_matmul: dst must be fp32 ({M}, {N}), got {dst.dtype}{tuple(dst.shape)}")
        if N * 4 > PSUM_BANK_BYTES:
            raise NKIEmulationError("nc_matmul: the result exceeds one PSUM bank")
        prod = (_read(stationary).astype(np.float64).T @ _read(moving).astype(np.float64)).astype(np.float32)
        alloc = dst._alloc
        if alloc.mm_written is None:
            alloc.mm_written = np.zeros(alloc.arr.shape, dtype=bool)
        written = _view_like(alloc.mm_written, alloc.arr, dst._arr)
        acc = bool(written.all()) if accumulate is None else bool(accumulate)
        d = dst._arr.reshape(M, N)
        d[...] = d + prod if acc else prod
        written[...] = True

    def nc_transpose(dst, data, engine=engine.unknown, name=None):
        _tile(data, "nc_transpose data", ("sbuf",))
        _tile(dst, "nc_transpose dst", ("psum",))
        P, F = _pf(data)
        if P > TRANSPOSE_MAX or F > TRANSPOSE_MAX:
            raise NKIEmulationError(f"nc_transpose: ({P}, {F}) exceeds the Tensor Engine's "
                                    f"{TRANSPOSE_MAX} x {TRANSPOSE_MAX}")
        if _pf(dst) != (F, P) or dst.dtype != data.dtype:
            raise NKIEmulationError(f"nc_transpose: dst must be {data.dtype} ({F}, {P}), got "
                                    f"{dst.dtype}{tuple(dst.shape)}")
        dst._arr[...] = data._arr.reshape(P, F).T.reshape(dst.shape)

    for f in (dma_copy, memset, iota, tensor_copy, tensor_tensor, tensor_scalar, tensor_reduce, activation,
              reciprocal, tensor_copy_predicated, select_reduce, tensor_tensor_scan, nc_matmul, nc_transpose):
        setattr(nisa, f.__name__, f)
    return nisa


def _view_like(mask: np.ndarray, base: np.ndarray, view: np.ndarray) -> np.ndarray:
    """The region of ``mask`` (same shape as ``base``) that ``view`` covers in ``base``."""
    off = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // base.itemsize
    strides = tuple(s // base.itemsize * mask.itemsize for s in view.strides)
    return np.lib.stride_tricks.as_strided(mask.reshape(-1)[off:], shape=view.shape, strides=strides)


# ---- nki (jit), nki.typing, loading and running kernels ----------------------------------------------------------

def _build_nki(nl, nisa) -> Tuple[types.ModuleType, types.ModuleType]:
    nki = types.ModuleType("nki")
    nki.__doc__ = "NumPy emulation of the nki package subset used by spdkernels (see spdkernels.testing)."
    nki.__path__ = []  # a package, so that `import nki.language` resolves through sys.modules

    def jit(fn=None, **kwargs):
        if fn is None:
            return lambda f: jit(f, **kwargs)
        fn.__nki_emulated__ = True
        return fn

    nki.jit = jit
    nki.language, nki.isa = nl, nisa
    nt = types.ModuleType("nki.typing")

    class _TensorType:
        def __class_getitem__(cls, item):
            return cls

    nt.tensor = _TensorType
    nki.typing = nt
    return nki, nt


_LANGUAGE = _build_language()
_ISA = _build_isa()
_NKI, _TYPING = _build_nki(_LANGUAGE, _ISA)
language, isa = _LANGUAGE, _ISA  # the emulated nki.language / nki.isa (tests write small kernels against them)
_LOAD_LOCK = threading.Lock()
_MODULES: Dict[str, types.ModuleType] = {}


@contextlib.contextmanager
def _fake_nki():
    names = {"nki": _NKI, "nki.language": _LANGUAGE, "nki.isa": _ISA, "nki.typing": _TYPING}
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(names)
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def kernel_path(stem: str) -> str:
    import spdkernels.nki_kernels as pkg

    return os.path.join(os.path.dirname(pkg.__file__), f"{stem}.py")


def load_kernel_module(stem: str, path: Optional[str] = None) -> types.ModuleType:
    """The kernel file ``nki_kernels/<stem>.py`` (or ``path``) executed against this emulation. Cached per
    path; the module is private (``spdkernels.testing._nki_emulated.<stem>``), never the real package's."""
    path = path or kernel_path(stem)
    with _LOAD_LOCK:
        mod = _MODULES.get(path)
        if mod is None:
            name = f"spdkernels.testing._nki_emulated.{stem}_{len(_MODULES)}"
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            with _fake_nki():
                spec.loader.exec_module(mod)
            _MODULES[path] = mod
    return mod


class HBM:
    """A kernel argument in HBM: a NumPy array with its NKI dtype (``bfloat16`` arrays are passed as fp32
    holding bf16 values)."""

    def __init__(self, array: np.ndarray, dtype: Optional[str] = None):
        a = np.ascontiguousarray(array)
        if dtype is None:
            dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                     np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32",
                     np.dtype(np.uint8): "uint8"}.get(a.dtype)
            if dtype is None:
                raise NKIEmulationError(f"HBM argument of NumPy dtype {a.dtype} has no NKI dtype")
        _check_dtype(dtype, "kernel argument")
        if dtype in _FLOATS and dtype != "float32":
            a = _round(a.astype(np.float32), dtype)
            if not np.array_equal(a, array.astype(np.float32), equal_nan=True):
                raise NKIEmulationError(f"HBM argument: values are not exactly {dtype}")
        self.array, self.dtype = np.ascontiguousarray(a.astype(_DTYPES[dtype][0])), dtype


class RunStats:
    """Kernel runs so far, and the peak SBUF bytes per partition and PSUM banks of the last one."""

    runs = 0
    sbuf_peak = 0
    psum_peak = 0


def emulate(kernel):
    """``emulate(kernel)(*args)``: run an ``@nki.jit`` kernel loaded by :func:`load_kernel_module` on NumPy
    arrays. Array arguments (or :class:`HBM`) become HBM tensors; other arguments (ints, floats, tuples) pass
    through as compile-time constants. Returns the kernel's outputs as NumPy arrays (fp32 storage for
    bf16/fp16), checking that each is a returned ``nl.shared_hbm`` tensor."""

    def run(*args):
        if _RUN.ctx is not None:
            raise NKIEmulationError("kernels do not launch kernels")
        conv = []
        for a in args:
            if isinstance(a, np.ndarray):
                a = HBM(a)
            if isinstance(a, HBM):
                alloc = _Alloc(a.array.copy(), a.dtype, "hbm")
                conv.append(Tensor(alloc, alloc.arr, "input"))
            else:
                conv.append(a)
        _RUN.ctx = ctx = _Context()
        try:
            res = kernel(*conv)
        finally:
            _RUN.ctx = None
            RunStats.sbuf_peak, RunStats.psum_peak = ctx.sbuf_peak, ctx.psum_peak
            RunStats.runs += 1
        outs = res if isinstance(res, tuple) else (res,)
        arrays = []
        for o in outs:
            if not isinstance(o, Tensor) or o.buffer != "shared_hbm":
                raise NKIEmulationError(f"kernel outputs must be nl.shared_hbm tensors, got {o!r}")
            arrays.append(o._arr.copy())
        return tuple(arrays) if isinstance(res, tuple) else arrays[0]

    return run


__all__ = ["NKIEmulationError", "HBM", "RunStats", "emulate", "load_kernel_module", "kernel_path", "target",
           "language", "isa",
           "PARTITIONS", "PSUM_BANK_BYTES", "PSUM_BANKS", "GEMM_CONTRACT_MAX", "GEMM_STATIONARY_FMAX",
           "GEMM_MOVING_FMAX", "TRANSPOSE_MAX", "SBUF_BYTES_PER_PARTITION"]
