"""The innermost loops of one Triton kernel's PTX, offline (no GPU): per loop, its PTX instructions and the
barriers, shared-memory accesses, warp shuffles and global loads it executes per iteration. A loop whose body holds
a barrier or shared memory synchronises the block at every trip: what a kernel's hot loop should avoid.

    python bench/ptx_loops.py _threshold_kernel                (every specialisation of that kernel the benchmarks
    python bench/ptx_loops.py _threshold_kernel --dtype bf16    launch, first benchmark shape per op, sm_90)

Built on bench/compile_check.py's recording of the launches; figures quoted in the README come from this script.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def inner_loops(ptx: str):
    """(label, body lines) of each loop whose body is a straight run from its label to the branch back to it. A loop
    with a label inside (an inner loop, or a branch within its body) is not reported: read the PTX for those."""
    lines = ptx.split("\n")
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__BB\d+_\d+):", line.strip())
        if not m:
            continue
        back = re.compile(r"bra(\.uni)?\s+" + re.escape(m.group(1)) + ";")
        j = next((k for k in range(i + 1, len(lines)) if back.search(lines[k])), None)
        if j is None:
            continue
        body = lines[i + 1:j + 1]
        if any(re.match(r"^\$L__BB\d+_\d+:", b.strip()) for b in body):
            continue  # an outer loop (another label inside)
        out.append((m.group(1), body))
    return out


def loop_stats(body) -> dict:
    text = "\n".join(body)
    instr = [b for b in body if b.strip() and not b.strip().startswith(("//", "{", "}", "$"))]
    return dict(instructions=len(instr), barriers=len(re.findall(r"\bbar\.sync\b", text)),
                shared=len(re.findall(r"\b(ld|st|atom)\.shared", text)), shuffles=len(re.findall(r"\bshfl\.", text)),
                global_loads=len(re.findall(r"\bld\.global", text)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel", help="a Triton kernel's function name, e.g. _threshold_kernel")
    ap.add_argument("--dtype", default=None, help="only the specialisations of this dtype (fp32, bf16, fp16)")
    ap.add_argument("--arch", type=int, default=90, choices=(90, 80))
    args = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from bench import compile_check as cc
    except ImportError:  # (the installed layout: spdkernels.bench)
        from spdkernels.bench import compile_check as cc
    found = 0
    for rec in cc.collect(args.arch, quick=True).values():
        if rec["fn"].__name__ != args.kernel or (args.dtype and f" {args.dtype}" not in rec["context"]):
            continue
        found += 1
        src = ASTSource(fn=rec["fn"], signature=rec["signature"], constexprs=rec["constexprs"], attrs=rec["attrs"])
        ck = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=rec["options"])
        cx = {cc._param_name(rec["fn"], k): v for k, v in rec["constexprs"].items()}
        print(f"{args.kernel} sm_{args.arch} {rec['context']} {cx} (triton {triton.__version__})")
        for label, body in inner_loops(ck.asm["ptx"]):
            st = loop_stats(body)
            if st["global_loads"]:
                print(f"  loop {label}: " + ", ".join(f"{k} {v}" for k, v in st.items()))
    if not found:
        print(f"no launch of {args.kernel} recorded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
