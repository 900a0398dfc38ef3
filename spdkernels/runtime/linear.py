"""``linear(x, w, b)`` for the runtime's forward passes: the C++ skinny GEMM (csrc/linear.cpp) for fp32
CPU inputs with few rows (decode, verification, drafting), ``torch.nn.functional.linear`` otherwise.

``w`` may be a :class:`PackedWeight`: the same fp32 values held in a smaller exact form (fp16, or blocks of 32 along K
as Q8_0 = int8 x scale or Q4_1 = 4-bit x scale + min, the layouts of GGUF checkpoints). The kernel widens each block
of 4 weight rows once to fp32 (into a buffer, or in registers for the first pass of up to 3 token rows on AVX2, for up
to 8 token rows on AVX-512) and accumulates in the fp32 kernel's order, so for a contiguous ``w`` and up to
``SKINNY_MAX_ROWS`` rows ``linear(x, pack_exact(w))`` equals ``linear(x, w)`` bit for bit while streaming 2-6x fewer
bytes; :func:`pack_exact` only packs a matrix whose values it reproduces exactly. Packed weights stay in the skinny
GEMM up to :func:`packed_max_rows` rows (192 on AVX-512 and AVX2; fp32 weights go to BLAS above ``SKINNY_MAX_ROWS``: a
packed matrix would first have to be dequantised, which costs more than the skinny GEMM's lower peak up to there), so
each row's result is the fp32 kernel's, whatever the other rows, up to that many rows. Beyond it (long prefills) the
matrix is widened to fp32 for each call (one threaded C++ pass, ``_cpu_widen_packed``) and multiplied by BLAS, as
``F.linear`` on the fp32 values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from spdkernels import _cpp

# Above this many rows, BLAS's blocked GEMM wins over the skinny GEMM on fp32 weights.
SKINNY_MAX_ROWS = 48
# Above this many rows, dequantising a packed matrix for BLAS wins, by the skinny GEMM's instruction-set level
# (the embedded model's Q4_1 layer matrices, 2 threads: on AVX-512 the skinny GEMM is 1.9x cheaper at 64 rows and
# 1.06x at 192, 0.97x at 224 ([3072, 576]); on AVX2 (4 x 3 tile, first pass widened in registers) the embedded
# model's forward takes 0.63x the time of the widen-for-BLAS path at 128 rows and 0.88x at 192 (AMD EPYC, 2 threads:
# `python -m spdkernels.bench.packed_weights --tokens 1 96 128 192 256 --repeats 7 --blas-above 96`; still 0.77x
# at 224 rows and 0.90x at 256 with the limit at 256: 192 is conservative there); the baseline
# one loses from 32 rows, like fp32 weights there: the fp32 limit).
PACKED_MAX_ROWS = {"avx512": 192, "avx2": 192, "baseline": SKINNY_MAX_ROWS}

FORMATS = ("q4_1", "q8_0", "f16")  # smallest first
BLOCK = 32  # Q8_0 / Q4_1 block length along K
_CHUNK = 8192  # blocks per piece when packing


def packed_max_rows() -> int:
    """Rows up to which packed weights stay in the skinny GEMM here (:data:`PACKED_MAX_ROWS` at the extension's
    instruction-set level, :func:`spdkernels._cpp.isa`; ``SKINNY_MAX_ROWS`` without the extension)."""
    return PACKED_MAX_ROWS.get(_cpp.isa(), SKINNY_MAX_ROWS) if _cpp.load() else SKINNY_MAX_ROWS


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight ``[N, K]`` in a compact exact form: ``format`` "f16" (``data`` float16 ``[N, K]``), "q8_0"
    (``data`` int8 ``[N, K]``, ``scale`` float32 ``[N, K / 32]``: w = scale x q) or "q4_1" (``data`` uint8
    ``[N, K / 2]``, 16 bytes a block of 32: byte i holds weight i in its low nibble and weight i + 16 in its
    high one, as in GGUF; ``scale``, ``min`` float32 ``[N, K / 32]``: w = scale x q + min). Build with
    :func:`pack_exact`."""
    format: str
    data: torch.Tensor
    scale: Optional[torch.Tensor]
    min: Optional[torch.Tensor]
    shape: Tuple[int, int]

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {self.format!r}")
        self._check_layout()
        if self.format == "q4_1" and self.scale is not None and not torch.equal(self.scale.half().float(), self.scale):
            # scale x nibble must be exact in fp32 for every instruction-set path to widen the same weights
            raise ValueError("scale: Q4_1 scales must be binary16 values (as in GGUF)")

    def _check_layout(self) -> None:
        """data / scale / min of the dtypes and shapes ``format`` and ``shape`` ask for, on one device (every reader
        sizes its reads from them: a mismatch would be an error far from its cause, or wrong values)."""
        shp = self.shape
        if not (isinstance(shp, tuple) and len(shp) == 2 and all(isinstance(x, int) and x >= 0 for x in shp)):
            raise ValueError(f"shape: expected (N, K), two integers >= 0, got {shp!r}")
        N, K = shp
        dt, cols = {"f16": (torch.float16, K), "q8_0": (torch.int8, K), "q4_1": (torch.uint8, K // 2)}[self.format]
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != dt or tuple(self.data.shape) != (N, cols):
            got = (f"{self.data.dtype} {tuple(self.data.shape)}" if isinstance(self.data, torch.Tensor)
                   else type(self.data).__name__)
            raise ValueError(f"data: a {self.format} weight of shape {shp} holds {dt} {(N, cols)}, got {got}")
        if self.format != "f16" and K % BLOCK:
            raise ValueError(f"shape: {self.format} blocks are {BLOCK} long along K, got K = {K}")
        for name, want in (("scale", self.format != "f16"), ("min", self.format == "q4_1")):
            t = getattr(self, name)
            if not want:
                if t is not None:
                    raise ValueError(f"{name}: a {self.format} weight has none, got a tensor")
                continue
            if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (N, K // BLOCK)
                    or t.device != self.data.device):
                got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)
                raise ValueError(f"{name}: expected float32 {(N, K // BLOCK)} on {self.data.device} for a "
                                 f"{self.format} weight of shape {shp}, got {got}")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.min) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` (exactly the values the kernel computes with): on a CPU with the C++
        extension in one threaded pass (``_cpu_widen_packed``, the kernel's own widening), else in torch."""
        if self.data.device.type == "cpu" and _cpp.load():
            return torch.ops.spdkernels._cpu_widen_packed.default(self.format, self.data, self.scale, self.min)
        return self.dequantize_torch()

    def dequantize_torch(self) -> torch.Tensor:
        """:meth:`dequantize` in torch operations (any device; the definition the C++ widening is tested against)."""
        N, K = self.shape
        if self.format == "f16":
            return self.data.float()
        if self.format == "q8_0":
            q = self.data.float().view(N, K // BLOCK, BLOCK)
            return (q * self.scale.unsqueeze(-1)).view(N, K)
        b = self.data.view(N, K // BLOCK, BLOCK // 2)
        q = torch.cat([b & 15, b >> 4], dim=-1).float()
        return (q * self.scale.unsqueeze(-1) + self.min.unsqueeze(-1)).view(N, K)

    def index_rows(self, idx: torch.Tensor) -> PackedWeight:
        """Rows ``idx`` (a 1-D index tensor), still packed."""
        sel = [None if t is None else t.index_select(0, idx.to(t.device)).contiguous()
               for t in (self.data, self.scale, self.min)]
        return PackedWeight(self.format, sel[0], sel[1], sel[2], (int(idx.numel()), self.shape[1]))

    def __getitem__(self, rows: slice) -> PackedWeight:
        """A slice of rows (step 1), still packed."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("PackedWeight: only row slices w[a:b] are supported")
        a, b, _ = rows.indices(self.shape[0])
        b = max(a, b)
        sel = [None if t is None else t[a:b] for t in (self.data, self.scale, self.min)]
        return PackedWeight(self.format, sel[0], sel[1], sel[2], (b - a, self.shape[1]))

    @staticmethod
    def cat(parts: Sequence[PackedWeight]) -> Optional[PackedWeight]:
        """The rows of ``parts`` one after the other (as ``torch.cat`` of their fp32 weights), still packed; None
        where the parts differ in format, width or device (no single packed form holds them). One part is returned
        as it is."""
        if not parts:
            return None
        p0 = parts[0]
        if len(parts) == 1:
            return p0
        if any(p.format != p0.format or p.shape[1] != p0.shape[1] or p.device != p0.device for p in parts):
            return None
        cat = [None if getattr(p0, n) is None else torch.cat([getattr(p, n) for p in parts]).contiguous()
               for n in ("data", "scale", "min")]
        return PackedWeight(p0.format, cat[0], cat[1], cat[2], (sum(p.shape[0] for p in parts), p0.shape[1]))


Weight = Union[torch.Tensor, PackedWeight]


def _pack_f16(w: torch.Tensor) -> Optional[PackedWeight]:
    h = w.half()
    if not torch.equal(h.float(), w):
        return None
    return PackedWeight("f16", h.contiguous(), None, None, tuple(w.shape))


def _pack_q8_0(w: torch.Tensor) -> Optional[PackedWeight]:
    N, K = w.shape
    b = w.reshape(-1, BLOCK)
    B = b.shape[0]
    data = torch.empty(B, BLOCK, dtype=torch.int8)
    d_all = torch.empty(B, 1)
    for i in range(0, B, _CHUNK):
        c = b[i:i + _CHUNK]
        d = c.abs().amax(1, keepdim=True) / 127  # exact when the block's largest |q| is 127, as GGUF makes it
        q = torch.round(c / torch.where(d > 0, d, torch.ones_like(d)))
        if q.abs().max() > 127 or not torch.equal(q * d, c):
            return None
        data[i:i + _CHUNK], d_all[i:i + _CHUNK] = q.to(torch.int8), d
    return PackedWeight("q8_0", data.view(N, K), d_all.view(N, K // BLOCK), None, (N, K))


def _q4_1_fit(b: torch.Tensor, m: torch.Tensor, d: torch.Tensor):
    """Nibbles of blocks ``b [B, 32]`` for scales ``d`` and mins ``m`` ``[B, 1]``, and which blocks they
    reproduce exactly."""
    q = torch.round((b - m) / torch.where(d > 0, d, torch.ones_like(d)))
    q = torch.where(d > 0, q, torch.zeros_like(q))
    ok = ((q >= 0) & (q <= 15) & (q * d + m == b)).all(1)
    return q, ok


def _pack_q4_1(w: torch.Tensor) -> Optional[PackedWeight]:
    N, K = w.shape
    b = w.reshape(-1, BLOCK)
    B = b.shape[0]
    data = torch.empty(B, BLOCK // 2, dtype=torch.uint8)
    d_all, m_all = torch.empty(B, 1), torch.empty(B, 1)
    for i in range(0, B, _CHUNK):  # in pieces that stay in cache (the temporaries of a whole matrix do not)
        c = b[i:i + _CHUNK]
        m = c.amin(1, keepdim=True)
        # GGUF's Q4_1 scale is a binary16 value (so scale x q is exact in fp32): the one nearest to span / 15
        d = ((c.amax(1, keepdim=True) - m) / 15).half().float()
        q, ok = _q4_1_fit(c, m, d)
        if not bool(ok.all()):
            return None
        qi = q.to(torch.uint8)  # byte i of a block holds weights i (low nibble) and i + 16 (high)
        data[i:i + _CHUNK] = qi[:, :BLOCK // 2] | (qi[:, BLOCK // 2:] << 4)
        d_all[i:i + _CHUNK], m_all[i:i + _CHUNK] = d, m
    return PackedWeight("q4_1", data.view(N, K // 2), d_all.view(N, K // BLOCK), m_all.view(N, K // BLOCK), (N, K))


def pack_exact(w: torch.Tensor, formats: Sequence[str] = FORMATS) -> Weight:
    """``w`` (fp32 ``[N, K]``, CPU) in the first of ``formats`` that holds its values exactly, else ``w``
    itself. Q8_0 / Q4_1 need K a multiple of 32 and finite values."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats: unknown format {unknown[0]!r} (expected some of {FORMATS})")
    if (not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or w.dim() != 2 or w.device.type != "cpu"
            or w.numel() == 0 or not bool(torch.isfinite(w).all())):
        return w
    src = w.detach().contiguous()
    for f in formats:
        if f != "f16" and src.shape[1] % BLOCK:
            continue
        pack = {"f16": _pack_f16, "q8_0": _pack_q8_0, "q4_1": _pack_q4_1}[f]
        if src.shape[0] > 8 and pack(src[:8]) is None:  # most matrices that do not fit fail on any rows
            continue
        p = pack(src)
        if p is not None:
            return p
    return w


def weight_formats(weights: Sequence[Weight]) -> Dict[str, int]:
    """How many of ``weights`` are held in each format (``fp32`` for a plain tensor)."""
    out: Dict[str, int] = {}
    for w in weights:
        f = w.format if isinstance(w, PackedWeight) else "fp32"
        out[f] = out.get(f, 0) + 1
    return out


def linear(x: torch.Tensor, w: Weight, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [M, K] @ w[N, K]^T (+ b)``."""
    M = x.shape[0]
    packed = isinstance(w, PackedWeight)
    # (the C++ ops have no autograd kernel: a weight or bias that wants a gradient takes F.linear, as x does)
    grad = torch.is_grad_enabled() and (x.requires_grad or (not packed and w.requires_grad)
                                        or (b is not None and b.requires_grad))
    skinny = (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and not grad
              and _cpp.load() and (M <= SKINNY_MAX_ROWS or (packed and M <= packed_max_rows())))
    if packed:
        if not skinny:
            return F.linear(x, w.dequantize(), b)
        return torch.ops.spdkernels._cpu_skinny_linear_packed.default(x, w.format, w.data, w.scale, w.min, b)
    if not skinny or w.dtype != torch.float32 or not w.is_contiguous():
        return F.linear(x, w, b)
    return torch.ops.spdkernels._cpu_skinny_linear.default(x, w, b)
