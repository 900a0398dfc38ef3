"""Offline compile check of every Triton kernel specialisation the ops launch, for sm_90 (H100/H200) and sm_80 (A100).

No GPU is needed: Triton ships ``ptxas``. The ops' own launch code (``spdkernels.triton_kernels.*``) runs on CPU
tensors with the benchmark shapes under a stand-in driver that reports the target GPU; Triton's JIT binds the
arguments and specialises them exactly as it would on that GPU (integer divisibility, pointer alignment,
constexprs), and a ``jit_cache_hook`` records each specialisation instead of compiling and launching it. Each
distinct specialisation is then compiled with ``triton.compile`` for each target, and ``ptxas -v`` (the same flags
Triton uses) reports its registers, spill stores/loads, stack frame and static shared memory.

Fails (exit status 1) on a compile error, on any spilled byte (spill stores, spill loads or a stack frame), or on
shared memory (Triton's dynamic plus ptxas' static) over the target's per-block limit. The table goes to
``bench/results/compile-check.md`` (and ``--json``).

    python -m spdkernels.bench.compile_check            (or: python bench/compile_check.py)
    python bench/compile_check.py --arch 90 --quick     (one shape per op family: a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's Python functions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402

# per-block shared memory limit (opt-in maximum), bytes: H100/H200 227 KB, A100 163 KB
SMEM_LIMIT = {90: 232448, 80: 166912}
SM_COUNT = {90: 132, 80: 108}  # SMs of H100 SXM / A100: the split-KV choice of tree_attention depends on it
ARCHS = (90, 80)
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Target:
    """A stand-in for Triton's CUDA driver: enough for JITFunction.run to bind and specialise the arguments of a
    launch (the jit_cache_hook then stops it before it compiles or launches anything)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch  # a device id per target: Triton keeps one binder per device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("no GPU: compile check only")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("no GPU: compile check only")

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, ty):
        return ty


@contextlib.contextmanager
def recording(arch: int, seen: dict, context: str):
    """Inside the block, Triton launches record ``(kernel, signature, constexprs, attrs, options)`` in ``seen``
    (keyed by everything that selects a compiled binary) instead of compiling and running."""
    from triton import knobs
    from triton.runtime.driver import driver

    def hook(*, fn, compile, **_):
        jf = fn.jit_function
        opts = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        maxnreg = json.loads(compile["specialization_data"])["options"].get("maxnreg")
        if maxnreg is not None:  # a register cap stated at the launch (the hook's own arguments omit it)
            opts["maxnreg"] = maxnreg
        # one binary per (signature types, constexprs, attributes, options): what selects a compiled kernel
        uid = (jf.__name__, repr(sorted(compile["signature"].items())), repr(sorted(compile["constants"].items())),
               repr(compile["configs"]), repr(sorted(opts.items())))
        if uid not in seen:
            seen[uid] = dict(fn=jf, signature=compile["signature"], constexprs=compile["constants"],
                             attrs=compile["configs"][0], options=opts, context=context)
        return True  # handled: Triton neither compiles nor launches

    old_hook, old_active = knobs.runtime.jit_cache_hook, driver._active  # (no default driver without a GPU)
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(_Target(arch))
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_active


# ---- the launches: the ops' Triton host code on CPU tensors with the benchmark shapes -------------------------

def _draft_batch(R, k, V, dtype, tree):
    from spdkernels.testing import random_draft_batch

    gen = torch.Generator().manual_seed(0)
    b = random_draft_batch([k] * R, 8, tree=tree, gen=gen)
    logits = torch.empty((R * (k + 1), V), dtype=DT[dtype])  # never read: only shapes and strides matter
    return logits, b.draft_token_ids, b.cu_num_draft, b.parents, b.max_depth


def verify_greedy_launches(quick):
    from spdkernels.triton_kernels import verify_greedy as K

    from bench.verify_greedy import SHAPE_SETS

    cases = SHAPE_SETS["default"][:1] if quick else SHAPE_SETS["default"] + SHAPE_SETS["sweep"]
    for c in cases:
        for dtype in DT:
            for tree in (False, True):
                batch = _draft_batch(c["R"], c["k"], c["V"], dtype, tree)
                yield f"R{c['R']}-k{c['k']}-V{c['V']}", dtype, lambda b=batch: K.verify_greedy(*b)


# rejection_sample's layouts (constexprs PROBS / BONUS of its kernels): logits with N + R rows, probability rows
# (target_is_probs), given bonus tokens with N rows (chains only), and both
RS_MODES = {"logits": (False, False), "probs": (True, False), "bonus": (False, True), "probs-bonus": (True, True)}


def rejection_sample_launches(quick):
    from spdkernels.triton_kernels import rejection_sample as K

    from bench.rejection_sample import SHAPE_SETS

    cases = SHAPE_SETS["default"][:1] if quick else SHAPE_SETS["default"]
    seen_shapes = set()
    for c in cases:
        shape = (c["R"], c["k"], c["V"])
        if shape in seen_shapes:  # the filters are runtime values: one launch set per shape
            continue
        seen_shapes.add(shape)
        R, k, V = shape
        for dtype in DT:
            for mode, (probs, bonus) in RS_MODES.items():
                for tree in (False, True):
                    if bonus and tree:  # bonus tokens are for chains only
                        continue
                    for with_q in (False, True):
                        for coins in ("seed", "uniforms"):
                            logits, toks, cu, par, D = _draft_batch(R, k, V, dtype, tree)
                            N = toks.shape[0]
                            if bonus:
                                logits = logits[:N]  # no row after each request's last draft
                            q = torch.empty((N, V), dtype=torch.float32) if with_q else None
                            unif = torch.full((N + R,), 0.5) if coins == "uniforms" else None
                            seed = torch.arange(R, dtype=torch.int64) if coins == "seed" else None
                            off = torch.zeros(R, dtype=torch.int64) if coins == "seed" else None
                            if probs:  # top-k / top-p do not apply to probability rows
                                kw = dict(temperature=torch.ones(R), top_k=None, top_p=None)
                            else:
                                kw = dict(temperature=torch.ones(R), top_k=torch.full((R,), 50, dtype=torch.int32),
                                          top_p=torch.full((R,), 0.9))
                            bt = torch.zeros(R, dtype=torch.int64) if bonus else None

                            def launch(a=(logits, toks, cu, par, q), u=unif, s=seed, o=off, kw=kw, D=D, bt=bt,
                                       probs=probs):
                                K.rejection_sample(*a, kw["temperature"], kw["top_k"], kw["top_p"], u, s, o, D, bt,
                                                   probs)

                            name = "" if mode == "logits" else f"-{mode}"
                            yield (f"R{R}-k{k}-V{V}-{'tree' if tree else 'chain'}-{'q' if with_q else 'pm'}-{coins}"
                                   f"{name}", dtype, launch)


def tree_attention_launches(quick, arch):
    from spdkernels.triton_kernels import tree_attention as K

    from bench.tree_attention import SHAPE_SETS

    cases = SHAPE_SETS["default"][:1] if quick else SHAPE_SETS["default"] + SHAPE_SETS["gpu"]
    done = set()
    for c in cases:
        for dtype in DT:
            for D in (64, 128):
                for chain in (False, True):
                    key = (c["R"], c["ctx"], c["q_len"], c["Hq"], c["Hkv"], D, c["bs"], dtype, chain)
                    if key in done:
                        continue
                    done.add(key)
                    R, ql, Hq, Hkv, bs = c["R"], c["q_len"], c["Hq"], c["Hkv"], c["bs"]
                    L = c["ctx"] + ql
                    nbr = (L + bs - 1) // bs
                    dt = DT[dtype]
                    q = torch.empty((R * ql, Hq, D), dtype=dt)
                    cache = torch.empty((4, bs, Hkv, D), dtype=dt)  # the block count is not part of a launch
                    bt = torch.zeros((R, nbr), dtype=torch.int32)
                    lens = torch.full((R,), L, dtype=torch.int32)
                    cu = torch.arange(0, R * ql + 1, ql, dtype=torch.int32)
                    W = (ql + 31) // 32
                    mask = None if chain else torch.ones((R * ql, W), dtype=torch.int32)

                    def launch(a=(q, cache, cache, bt, lens, cu, mask), ql=ql, L=L):
                        K.tree_attention(*a, 0.1, max_kv_len=L, max_q_len=ql)

                    yield (f"R{R}-ctx{c['ctx']}-q{ql}-H{Hq}/{Hkv}-D{D}-bs{bs}-{'chain' if chain else 'tree'}", dtype,
                           launch)


def collect(arch: int, quick: bool) -> dict:
    """Every distinct specialisation launched for ``arch``: key -> record (with the first shape that launched it)."""
    from spdkernels.triton_kernels import tree_attention as TA

    seen: dict = {}
    old_sm, old_cap = TA._sm_count, TA._capability
    TA._sm_count = lambda device: SM_COUNT[arch]
    TA._capability = lambda device: (arch // 10, arch % 10)
    try:
        gens = [("verify_greedy", verify_greedy_launches(quick)),
                ("rejection_sample", rejection_sample_launches(quick)),
                ("tree_attention", tree_attention_launches(quick, arch))]
        for op, gen in gens:
            for shape, dtype, launch in gen:
                with recording(arch, seen, f"{op} {shape} {dtype}"):
                    launch()
    finally:
        TA._sm_count, TA._capability = old_sm, old_cap
    return seen


# ---- compile and measure ---------------------------------------------------------------------------------

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "smem_static": re.compile(r"(\d+) bytes smem"),
}


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, stack frame, spill stores/loads and static shared memory from ``ptxas -v`` with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", os.devnull]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    out = {}
    for k, rx in _PTXAS_RE.items():
        m = rx.search(log)
        out[k] = int(m.group(1)) if m else 0
    return out


def _param_name(fn, path) -> str:
    """A constexpr's parameter name from Triton's argument path ((index,) for a plain argument)."""
    if isinstance(path, tuple) and len(path) == 1 and isinstance(path[0], int):
        return fn.arg_names[path[0]]
    return str(path)


def compile_one(rec: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=rec["fn"].__name__, context=rec["context"], arch=f"sm_{arch}",
               num_warps=rec["options"].get("num_warps"), maxnreg=rec["options"].get("maxnreg"),
               constexprs={_param_name(rec["fn"], k): v for k, v in rec["constexprs"].items()})
    t0 = time.time()
    try:
        src = ASTSource(fn=rec["fn"], signature=rec["signature"], constexprs=rec["constexprs"], attrs=rec["attrs"])
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=rec["options"])
        rep = ptxas_report(ck.asm["ptx"], arch)
        row.update(rep, smem=ck.metadata.shared + rep["smem_static"], error="")
    except Exception as e:  # a compile error is a result: reported and failed on
        row.update(regs=-1, stack=0, spill_st=0, spill_ld=0, smem=0, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["seconds"] = round(time.time() - t0, 2)
    row["spills"] = row["spill_st"] + row["spill_ld"] + row["stack"]
    row["dtype"] = next((d for d in DT if f" {d}" in rec["context"]), "")
    return row


def verdict(row: dict, arch: int) -> str:
    if row["error"]:
        return "compile error"
    problems = []
    if row["spills"]:
        problems.append(f"spills ({row['spill_st']} B stores, {row['spill_ld']} B loads, {row['stack']} B stack)")
    if row["smem"] > SMEM_LIMIT[arch]:
        problems.append(f"shared memory {row['smem']} B over {SMEM_LIMIT[arch]} B")
    return "; ".join(problems)


def failures(rows, errors_only: bool = False) -> int:
    """The rows that fail the check: any verdict (compile error, spills, shared memory), or with ``errors_only``
    compile errors alone."""
    return sum(bool(r["error"] if errors_only else r["verdict"]) for r in rows)


def write_markdown(rows, path: Path, elapsed: float, quick: bool = False) -> None:
    import triton

    scope = ("; --quick: the first shape of each op's default set, with every dtype, head dim 64/128, chain/tree, "
             "with/without draft_probs, seed/uniforms, logits/probability rows, with/without bonus tokens" if quick
             else "")
    lines = ["# Triton compile check (bench/compile_check.py)", "",
             f"triton {triton.__version__}, ptxas from the Triton wheel; {len(rows)} kernel specialisations "
             f"compiled in {elapsed:.0f} s. Each row: one distinct specialisation the ops launch for the benchmark "
             f"shapes{scope} (the shape column: the first that launched it). Spills = spill stores + spill loads + "
             "stack frame (bytes); smem = Triton's dynamic + static shared memory per block (bytes).", "",
             "| kernel | dtype | shape (first launch) | arch | warps (register cap) | constexprs | regs | spills "
             "| smem | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper())
        cap = f" (maxnreg {r['maxnreg']})" if r.get("maxnreg") else ""
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['context'].split(' ')[1]} | {r['arch']} "
                     f"| {r['num_warps']}{cap} | {cx} | {r['regs']} | {r['spills']} | {r['smem']} "
                     f"| {r['verdict'] or 'ok'} |")
    from spdkernels.runtime.files import write_text_atomic  # (after the environment above is set)

    write_text_atomic(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (default: 90 and 80)")
    ap.add_argument("--quick", action="store_true", help="one benchmark shape per op (a smoke run)")
    ap.add_argument("--only", default=None, help="regex: compile only the kernels whose name matches")
    ap.add_argument("--jobs", type=int, default=2, help="compiles in parallel (ptxas runs as a subprocess)")
    ap.add_argument("--md", default=str(Path(__file__).resolve().parent / "results" / "compile-check.md"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--errors-only", action="store_true",
                    help="fail only on compile errors (spills and shared memory reported, not failed): for another "
                    "Triton release, whose known spills are not this check's subject")
    args = ap.parse_args(argv)
    archs = args.arch or list(ARCHS)
    t0 = time.time()
    work = []
    for arch in archs:
        for rec in collect(arch, args.quick).values():
            if args.only is None or re.search(args.only, rec["fn"].__name__):
                work.append((rec, arch))
    print(f"{len(work)} specialisations to compile ({', '.join(f'sm_{a}' for a in archs)})", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as ex:
        rows = list(ex.map(lambda w: compile_one(*w), work))
    for r, (_, arch) in zip(rows, work):
        r["verdict"] = verdict(r, arch)
        print(f"{r['kernel']:<20} {r['dtype']:<5} {r['arch']} w{r['num_warps']} regs {r['regs']:>4} spills "
              f"{r['spills']:>5} smem {r['smem']:>6}  {r['context']}  {r['verdict'] or 'ok'}"
              + (f"\n    {r['error']}" if r["error"] else ""), flush=True)
    failed = failures(rows, args.errors_only)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["context"]))
    elapsed = time.time() - t0
    if args.only is None:
        write_markdown(rows, Path(args.md), elapsed, args.quick)
    if args.json:
        from spdkernels.runtime.files import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=1, default=str))
    print(f"{len(rows)} compiled in {elapsed:.0f} s: {failed} failed"
          + (" (compile errors only)" if args.errors_only else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
