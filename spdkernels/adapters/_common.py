"""Pieces shared by the adapters: coins that force a decision of the op, coin clamping, argument checks."""

from __future__ import annotations

import threading

import torch

from spdkernels import _registry
from spdkernels import _validate as V

# The op accepts a child iff p(t) > 0 and u * q(t) <= p(t), with u in the open interval (0, 1).
# ACCEPT_COIN accepts whenever p(t) > 0; REJECT_COIN rejects whenever p(t) < (1 - 2^-24) * q(t), i.e. in
# every case but a target probability within one fp32 ulp of the draft's (the adapters that force
# decisions document this corner).
ACCEPT_COIN = float(torch.finfo(torch.float32).tiny)
REJECT_COIN = 1.0 - 2.0 ** -24
# what a coin that the op never reads is set to (nodes after a forced rejection)
UNUSED_COIN = 0.5


def open_unit_fp32(u: torch.Tensor) -> torch.Tensor:
    """fp32 coins clamped into the open interval (0, 1) the op requires (a stack's exact 0 becomes the
    smallest normal fp32, a value that rounds up to 1 becomes 1 - 2^-24)."""
    return u.to(torch.float32).clamp_(min=ACCEPT_COIN, max=REJECT_COIN)


_WS = threading.local()
_ARANGE: dict = {}


def cached_arange(n: int, device, step: int = 1) -> torch.Tensor:
    """int32 ``[0, step, ..., (n - 1) * step]`` on ``device``, made once per (n, step, device): the offsets of the
    stacks' dense layouts, which repeat from step to step. Never written to by the adapters."""
    key = (n, step, str(device))
    t = _ARANGE.get(key)
    if t is None:
        t = _ARANGE[key] = torch.arange(n, dtype=torch.int32, device=device) * step
    return t


def workspace(name: str, shape, dtype, device) -> torch.Tensor:
    """A scratch tensor kept between calls (per thread, per name): the conversions write their large
    intermediate tensors here. On CPU a fresh multi-megabyte tensor costs more in page faults than the
    conversion itself (a 64 MB allocation is ~16k first-touch faults), so reusing it matters as much as on
    GPUs, where the serving stacks keep such workspaces too. Never returned to callers."""
    cache = getattr(_WS, "cache", None)
    if cache is None:
        cache = _WS.cache = {}
    n = 1
    for d in shape:
        n *= int(d)
    buf = cache.get((name, dtype, torch.device(device)))
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype, device=device)
        cache[(name, dtype, torch.device(device))] = buf
    return buf[:n].view(*shape)


def probs_to_logits(p: torch.Tensor, rows=None) -> torch.Tensor:
    """log(p) in fp32 (of the given ``rows`` of ``p`` only, when given), in a workspace: softmax of the result
    is p / sum(p), and zero probabilities become -inf logits."""
    p = p.to(torch.float32)
    if rows is not None:
        g = workspace("rows", (rows.shape[0], p.shape[1]), torch.float32, p.device)
        torch.index_select(p, 0, rows, out=g)
        return torch.log_(g)
    return torch.log(p, out=workspace("log", p.shape, torch.float32, p.device))


def gather_rows(name: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, rows)`` into a workspace."""
    out = workspace(name, (rows.shape[0],) + tuple(x.shape[1:]), x.dtype, x.device)
    return torch.index_select(x, 0, rows, out=out)


def check(arg: str, t, ndim=None, dtypes=None, device=None, contiguous: bool = False) -> None:
    """ValueError naming ``arg`` for a non-tensor, wrong rank, dtype or device (and contiguity if asked)."""
    V.check_tensor(arg, t, ndim, dtypes, device)
    if contiguous and not t.is_contiguous():
        V.fail(arg, f"expected a contiguous tensor, got strides {tuple(t.stride())} for shape {tuple(t.shape)}")


def check_shape(arg: str, t: torch.Tensor, shape, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        V.fail(arg, f"expected shape {what} = {list(shape)}, got {list(t.shape)}")


fail = V.fail


_CPU = torch.device("cpu")
_AUTO_CPP: dict = {}  # public op -> whether the automatic backend on CPU is cpp
_FUSED_OPS: dict = {}  # private op name -> its overload, or None when the loaded extension lacks it


def fused_op(public_op: str, name: str):
    """An adapter's fused C++ op (``torch.ops.spdkernels.<name>.default``) when it may serve a CPU call now: the
    ``cpp`` backend is the one chosen for ``public_op`` (forced or automatic) and the loaded extension has the op (a
    build older than the Python package lacks it: the generic path then serves the call). None otherwise. Cached:
    after a forward pass has flushed the caches, each line of Python costs microseconds."""
    forced = _registry.forced_backend()
    if forced is None:
        auto = _AUTO_CPP.get(public_op)
        if auto is None:
            auto = _AUTO_CPP[public_op] = _registry.resolve(public_op, _CPU, None)[0] == "cpp"
        if not auto:
            return None
    elif forced != "cpp" or _registry.resolve(public_op, _CPU)[0] != "cpp":
        return None
    op = _FUSED_OPS.get(name, _CPU)
    if op is _CPU:
        op = _FUSED_OPS[name] = getattr(getattr(torch.ops.spdkernels, name, None), "default", None)
    return op
