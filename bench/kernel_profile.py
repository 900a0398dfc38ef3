"""Where an op's time goes: the device time of each kernel one call launches, from torch.profiler.

spd-bench gives one figure per call; an op launches several kernels (the sampler: row statistics, then the walk),
and which one to speed up is a measurement, not a guess. For each case of the chosen ops and shape set, the op runs
``--warmup`` times, then ``--calls`` times under torch.profiler; each kernel's device time is divided by the number
of calls (CUDA kernels on a GPU; on a CPU the profiler's operator self times, a rehearsal of the paths only).

    python -m spdkernels.bench.kernel_profile --device cuda                       # the three ops, default shapes
    python -m spdkernels.bench.kernel_profile --device cuda --op rejection_sample --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch

import spdkernels

from . import timing
from .registry import load_all

OPS = ("verify_greedy", "rejection_sample", "tree_attention")


def _device_us(evt) -> float:
    """An averaged profiler event's own device time in microseconds (the attribute's name changed across torch
    releases)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def profile_case(ob, c, device: str, backend: str, warmup: int, calls: int) -> List[Dict]:
    """[{kernel, us_per_call, launches_per_call}], the largest first, for one case of one op."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.startswith("cuda")
    inputs = ob.make_inputs(c, device)
    with spdkernels.use_backend(backend):
        for _ in range(max(1, warmup)):
            ob.run(inputs)
        if on_gpu:
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(calls):
                ob.run(inputs)
            if on_gpu:
                torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        if on_gpu:
            us = _device_us(evt)
            if us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = float(evt.self_cpu_time_total)
            if us <= 0:
                continue
        rows.append({"kernel": evt.key, "us_per_call": us / calls, "launches_per_call": evt.count / calls})
    rows.sort(key=lambda r: -r["us_per_call"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--op", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--shapes", default="default", help="a shape set of spd-bench (default: default)")
    p.add_argument("--backend", default=None, help="default: triton on a GPU, cpp on a CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--top", type=int, default=6, help="kernels listed per case")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    backend = args.backend or ("triton" if on_gpu else "cpp")
    spdkernels.set_validation(False)  # as timed: no host-sync checks
    ops = load_all()
    out = {"environment": timing.environment(args.device), "backend": backend, "calls": args.calls, "cases": []}
    unit = "device us" if on_gpu else "CPU self us"
    print(f"# {out['environment']['device_name']} | backend {backend} | {args.calls} calls per case | {unit} per call")
    for name in args.op:
        ob = ops[name]
        if args.shapes not in ob.shape_sets:
            print(f"kernel_profile: op {name} has no shape set {args.shapes!r}", file=sys.stderr)
            return 2
        for c in ob.shape_sets[args.shapes]:
            rows = profile_case(ob, c, args.device, backend, args.warmup, args.calls)
            total = sum(r["us_per_call"] for r in rows)
            out["cases"].append({"op": name, "case": ob.label(c), "total_us_per_call": total, "kernels": rows})
            print(f"{name} {ob.label(c)}: {total:.1f} us per call")
            for r in rows[:args.top]:
                share = 100 * r["us_per_call"] / total if total else 0.0
                n = r["launches_per_call"]
                print(f"    {r['us_per_call']:10.1f} us  {share:5.1f}%  x{n:g}  {r['kernel'][:90]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
