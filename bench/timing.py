"""Timers, the copy-bandwidth measurement and the facts each result row records."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

# An L3-sized write between CPU repeats evicts the inputs, so every repeat reads them from DRAM, as a
# kernel reading fresh logits at serving time mostly would; 64 MiB is twice the 32 MiB L3 seen here.
CPU_FLUSH_BYTES = 64 << 20
# Copy-bandwidth buffers: far larger than any cache, so the figure is the DRAM/HBM limit.
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


def quantiles(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)

    def q(p):
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {"median": statistics.median(s), "p20": q(0.2), "p80": q(0.8), "n": len(s)}


class CpuTimer:
    def __init__(self, flush: bool = True):
        self.flush_buf = torch.empty(CPU_FLUSH_BYTES // 4, dtype=torch.float32) if flush else None

    def __call__(self, fn: Callable[[], object], warmup: int, repeats: int) -> Dict[str, float]:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            if self.flush_buf is not None:
                self.flush_buf.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return quantiles(samples)


def reset_rng_after_failed_capture() -> None:
    """A CUDA-graph capture that fails midway never reaches its epilogue, which leaves the default generator in
    capture mode: every later draw from it outside a capture then fails ("Offset increment outside graph capture
    encountered unexpectedly"; seen with torch 2.11 on an H200). Replace each GPU's generator state with a copy of it
    (same seed and offset, not capturing)."""
    for gen in torch.cuda.default_generators:
        gen.graphsafe_set_state(gen.clone_state())


# bytes read between GPU repeats to evict the inputs from L2 (H100/H200: 50-60 MB of L2); a read, not a write, so that
# no dirty lines are left to be written back during the timed call
GPU_FLUSH_BYTES = 256 << 20
# GPU time a row's repeats aim for: fewer repeats (at least GPU_MIN_REPEATS) for calls slower than budget / repeats
GPU_ROW_BUDGET_MS = 200.0
GPU_MIN_REPEATS = 5


class GpuTimer:
    """CUDA events around each repeat, the L2 flushed (a read of GPU_FLUSH_BYTES) before each; median and quantiles
    over the repeats: ``repeats``, or fewer for slow calls (about GPU_ROW_BUDGET_MS of calls in all, but not fewer
    than GPU_MIN_REPEATS unless ``repeats`` is; the row's ``n`` says how many). With ``graph`` the call is captured
    once in a CUDA graph (warmed up and captured on a side stream) and each repeat is one replay: no launch overhead,
    what a serving stack that captures its step sees. A call that cannot be captured (a host sync in its path) is
    timed as launched from Python, and the row says so (``cuda_graph`` False)."""

    def __init__(self):
        self.flush_buf = None

    def _flush(self):
        self.flush_buf.sum()

    def _samples(self, run: Callable[[], object], warmup: int, repeats: int) -> Dict[str, float]:
        if self.flush_buf is None:
            self.flush_buf = torch.ones(GPU_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
        for _ in range(max(1, warmup)):
            run()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        est = max(a.elapsed_time(b), 1e-3)
        n = min(repeats, max(GPU_MIN_REPEATS, int(GPU_ROW_BUDGET_MS / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for a, b in zip(starts, ends):
            self._flush()
            a.record()
            run()
            b.record()
        torch.cuda.synchronize()
        return quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)])

    def __call__(self, fn: Callable[[], object], warmup: int, repeats: int, graph: bool = False) -> Dict[str, float]:
        if graph:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # compilation, allocations, per-stream library state (cuBLAS)
                    fn()
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=side):
                    fn()
            except Exception:  # not capturable (a host sync in the path): time it as launched
                reset_rng_after_failed_capture()
            else:
                return dict(self._samples(g.replay, warmup, repeats), cuda_graph=True)
        return dict(self._samples(fn, warmup, repeats), cuda_graph=False)


def copy_bandwidth(device: str, repeats: int = 10) -> float:
    """GB/s of a device-to-device tensor copy, counting read + write bytes (a STREAM-copy figure)."""
    nbytes = COPY_BYTES["cuda" if device.startswith("cuda") else "cpu"]
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.startswith("cuda"):
        import triton.testing as tt

        ms = tt.do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    else:
        for _ in range(2):
            dst.copy_(src)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            samples.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(samples)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> Dict[str, str]:
    import spdkernels

    v = {"python": platform.python_version(), "torch": torch.__version__, "spdkernels": spdkernels.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = "not installed"
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
    return v


def environment(device: str) -> Dict[str, object]:
    return {"device": device, "device_name": device_name(device), "versions": versions(), "git_commit": git_commit(),
            "hostname": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset")}


# ---- the embedded model's forward, for the runtime benches (packed_weights, forward_steps) ----------------------

def prefilled_cache(model, prompt: List[int], context: int, extra: int):
    """A paged cache of ``model`` holding request 0's first ``context`` prompt tokens, with room for ``extra`` more."""
    from spdkernels.runtime.model import build_batch

    cache = model.new_cache(-(-(context + extra) // 16) + 1, 16)
    cache.add(0)
    model.forward(build_batch(cache, [0], [0], [list(range(context))], tokens=prompt[:context]), cache)
    return cache


def forward_step(model, cache, prompt: List[int], context: int, T: int):
    """One forward of the ``T`` prompt tokens after ``context`` cached ones (the cache cut back to ``context`` first):
    ``(seconds, logits)``."""
    from spdkernels.runtime.model import build_batch

    cache.set_length(0, context)
    b = build_batch(cache, [0], [context], [list(range(context, context + T))], tokens=prompt[context:context + T])
    t0 = time.perf_counter()
    out = model.forward(b, cache)
    return time.perf_counter() - t0, out


def interleaved_ms(names: List[str], tokens: List[int], repeats: int, step: Callable) -> Dict[tuple, float]:
    """Median milliseconds of ``step(name, T)[0]`` (seconds) per ``(name, T)``: every name once per token count per
    repeat, in turn, so that all of them see the same machine state; the order rotates from one repeat to the next
    (no name always runs right after the same other one)."""
    times = {(n, T): [] for n in names for T in tokens}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for T in tokens:
            for n in order:
                times[(n, T)].append(step(n, T)[0])
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
