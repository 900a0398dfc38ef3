"""Benchmarks of the serving-stack adapters (spdkernels.adapters): each adapter at its stack's typical shapes,
against the bare op on inputs already in our layout (the ``bare-op`` baseline row, same decisions).

``adapter overhead = adapter - bare op``: what a caller pays for calling with the stack's own layout and
semantics. It includes, by adapter:

* vLLM, sgl-kernel, FlashInfer and transformers greedy on CPU with the cpp backend: the adapter is one fused C++ op
  in the stack's layout (spdkernels/adapters/vllm.py for unseeded calls, sglang.py, flashinfer.py,
  transformers.py's greedy step); its baseline is the op call of the adapter's *generic* path
  (the public op on the batch converted to the spdkernels layout: for sgl-kernel greedy with ``target_predict``
  a two-token vocabulary, with ``target_logits`` the logits; for target-only sampling the final draw from the
  last node's row; for vLLM and FlashInfer the rows read in place; for transformers greedy verify_greedy on the
  drafts' tensor), so a negative overhead means that the adapter costs less than the public op would on
  already-converted inputs. The vLLM and FlashInfer adapters also draw their coins (for FlashInfer from a
  generator seeded per call with ``seed``), and FlashInfer's keeps its two counters;
* transformers sampling: the bookkeeping of one verification around the op call the adapter makes (its offsets,
  the committed tokens read back; the drafts' tensor is made in both rows, for HF's processors).
* Both transformers rows carry HF's logits processors on each of the ``k + 1`` rows in the baseline too, which HF's
  own assisted generation applies as well (the stack's work, not the adapter's; none in the greedy case), and the
  copy of the rows into the step's work buffer.

Run ``python -m spdkernels.bench.adapters`` for the overhead table (median of wall-clock repeats, CPU caches flushed
between repeats, validation off), or ``spd-bench --op adapter_vllm ...`` for the usual rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import spdkernels
from spdkernels import tree
from spdkernels.adapters import flashinfer as af
from spdkernels.adapters import sglang as asg
from spdkernels.adapters import transformers as ahf  # (imports transformers only when called)
from spdkernels.adapters import vllm as av
from spdkernels.testing import depths

from .registry import OpBench, register

I32, I64 = torch.int32, torch.int64


def _peaked(logits: torch.Tensor, tokens_per_row: torch.Tensor, p: float) -> torch.Tensor:
    """Raise each row's chosen token until it holds probability ~p (a trained target/draft pair)."""
    lse_rest = torch.logsumexp(logits, dim=-1)
    target = lse_rest + torch.log(torch.tensor(p / (1 - p)))
    logits[torch.arange(logits.shape[0]), tokens_per_row] = target
    return logits


def _captured_op_call(run, inputs):
    """Run the adapter once and record the op call it makes (arguments cloned: the adapters reuse their
    workspaces); the ``bare-op`` row replays that call, so ``adapter - bare op`` is everything but the op."""
    calls = []
    real = {name: getattr(spdkernels, name) for name in ("rejection_sample", "verify_greedy")}

    def spy(name):
        def f(*a, **kw):
            clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            calls.append((name, [clone(x) for x in a], {k: clone(v) for k, v in kw.items()}))
            return real[name](*a, **kw)
        return f

    try:
        for name in real:
            setattr(spdkernels, name, spy(name))
        run(inputs)
    finally:
        for name, f in real.items():
            setattr(spdkernels, name, f)
    assert len(calls) == 1, f"expected one op call, got {len(calls)}"
    name, a, kw = calls[0]
    return lambda: real[name](*a, **kw)


def _reseed():
    """Reseed the generators the adapters draw their coins from: the CPU's and, on a GPU machine, every GPU's (the
    CPU generator alone left the GPU rows' coins different between the reference and the timed call: the sampled
    vLLM and FlashInfer adapter rows read MISMATCH on an H200). CUDA is not initialised for it on a CPU run."""
    torch.default_generator.manual_seed(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for gen in torch.cuda.default_generators:
            gen.manual_seed(0)


def _with_generic_baseline(module, make, run, prelude=None):
    """make_inputs for an adapter with a fused C++ op (sgl-kernel, FlashInfer): the baseline is the op call that the
    adapter's generic path makes (the spdkernels op on the converted batch, reaching the same result), recorded and
    replayed. On CPU with the cpp backend the adapter itself runs its fused op in the stack's layout, which makes no
    public op call to record. ``prelude(inputs)``: what the timed adapter call does besides the adapter (a reseed of
    torch's generator, for reproducible outputs), run before the replay too, so that it cancels out."""
    def make_inputs(c, device):
        inputs = make(c, device)
        fused, module._FUSED = module._FUSED, False
        try:
            op = _captured_op_call(run, inputs)
        finally:
            module._FUSED = fused
        if prelude is None:
            return inputs, op

        def bare():
            prelude(inputs)
            return op()
        return inputs, bare
    return make_inputs


def _with_bare(make, run):
    """make_inputs returning (adapter inputs, the replay of its op call)."""
    def make_inputs(c, device):
        inputs = make(c, device)
        return inputs, _captured_op_call(run, inputs)
    return make_inputs


def _check(out, ref) -> str:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    for i, (a, b) in enumerate(zip(outs, refs)):
        if a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            return f"output {i} differs"
    return ""


# ---- vLLM ----------------------------------------------------------------------------------------------------

def vllm_case(B, k, V, with_q=False):
    return {"B": B, "k": k, "V": V, "q": with_q}


def vllm_inputs(c, device):
    """vLLM's verification rows [N, V] (fp32, as vLLM hands them over), drafts that the target likes (each
    verifying row puts p = 0.8 on its draft), unseeded sampled requests."""
    g = torch.Generator().manual_seed(0)
    B, k, V = c["B"], c["k"], c["V"]
    N = B * k
    draft = torch.randint(0, V, (N,), generator=g)
    target = _peaked(torch.randn(N, V, generator=g) * 3, draft, 0.8)
    q = torch.softmax(torch.randn(N, V, generator=g), -1).to(device) if c["q"] else None
    sm = av.SamplingMetadata(temperature=torch.ones(B, device=device), all_greedy=False, all_random=True)
    return (draft.to(I32).to(device), [k] * B, k, (torch.arange(1, B + 1) * k).to(I32).to(device), q,
            target.to(device), torch.zeros(B, 1, dtype=I32, device=device), sm)


def vllm_run(args):
    _reseed()
    return av.rejection_sample(*args)


# ---- sgl-kernel ----------------------------------------------------------------------------------------------

def sgl_case(bs, n, V, mode):
    return {"bs": bs, "n": n, "V": V, "mode": mode}


def _sgl_tree(n, topk):
    """EAGLE-like tree: the root expands into ``topk`` children, every later node has one child at most, nodes
    numbered level by level."""
    par, level = [], [-1]
    while len(par) < n - 1:
        nxt = []
        for p in level:
            for _ in range(topk if p == -1 else 1):
                if len(par) < n - 1:
                    par.append(p)
                    nxt.append(len(par) - 1)
        level = nxt
    return par


def sgl_inputs(c, device):
    """Trees of n nodes (root with 4 children, then chains), the target putting p = 0.8 on each node's first
    child; greedy with target_predict (argmax) or target_logits, or target-only sampling from probabilities."""
    g = torch.Generator().manual_seed(0)
    bs, n, V = c["bs"], c["n"], c["V"]
    par = _sgl_tree(n, 4)
    nt_l, ns_l = tree.to_sglang(par)
    nt, ns = torch.tensor([nt_l] * bs, dtype=I64), torch.tensor([ns_l] * bs, dtype=I64)
    cand = torch.randint(0, V, (bs, n), generator=g, dtype=I64)
    ri = torch.arange(bs * n, dtype=I64).reshape(bs, n)
    first = torch.where(nt >= 0, cand.gather(1, nt.clamp(min=0)), cand[:, :1]).reshape(-1)
    logits = _peaked(torch.randn(bs * n, V, generator=g) * 3, first, 0.8)
    spec = max(depths(par)) + 1
    outs = (torch.full((bs * n,), -1, dtype=I32), torch.full((bs, spec), -1, dtype=I32), torch.zeros(bs, dtype=I32))
    outs = tuple(t.to(device) for t in outs)
    tree_args = tuple(t.to(device) for t in (cand, ri, nt, ns))
    if c["mode"] == "greedy-predict":
        return "greedy", outs, tree_args, dict(target_predict=logits.argmax(-1).reshape(bs, n).to(device))
    if c["mode"] == "greedy-logits":
        return "greedy", outs, tree_args, dict(target_logits=logits.to(device))
    kw = dict(uniform_samples=torch.rand(bs, n, generator=g).to(device),
              uniform_samples_for_final_sampling=torch.rand(bs, generator=g).to(device),
              target_probs=torch.softmax(logits, -1).reshape(bs, n, V).to(device))
    return "sampling", outs, tree_args, kw


def sgl_run(inputs):
    kind, outs, tree_args, kw = inputs
    if kind == "greedy":
        asg.verify_tree_greedy(*outs, *tree_args, **kw)
    else:
        asg.tree_speculative_sampling_target_only(*outs, *tree_args, **kw)
    return outs  # (written in place; the timed call makes no copies)


# ---- FlashInfer ----------------------------------------------------------------------------------------------

def fi_case(B, n, V, seeded=False):
    """``seeded``: each call passes ``seed=0`` (FlashInfer's (seed, offset) stream; a generator seeded per call),
    else the call passes none, as the stacks usually call it (torch's default generator, reseeded before each
    timed call and before its baseline alike, for reproducible outputs)."""
    return {"B": B, "n": n, "V": V, "seeded": seeded}


def fi_inputs(c, device):
    """Drafts drawn from their draft distributions; the target puts p = 0.8 on each draft."""
    g = torch.Generator().manual_seed(0)
    B, n, V = c["B"], c["n"], c["V"]
    dp = torch.softmax(torch.randn(B, n, V, generator=g) * 3, -1)
    tokens = torch.multinomial(dp.reshape(B * n, V), 1, generator=g).reshape(B, n)
    tl = _peaked(torch.randn(B * (n + 1), V, generator=g) * 3, torch.cat([tokens, tokens[:, :1]], 1).reshape(-1), 0.8)
    return (dp.to(device), tokens.to(I32).to(device), torch.softmax(tl, -1).reshape(B, n + 1, V).to(device),
            c["seeded"])


def fi_run(args):
    dp, tokens, tp, seeded = args
    if seeded:
        return af.chain_speculative_sampling(dp, tokens, tp, seed=0)
    _reseed()
    return af.chain_speculative_sampling(dp, tokens, tp)


# ---- transformers --------------------------------------------------------------------------------------------

def hf_case(k, V, sample):
    return {"k": k, "V": V, "sample": sample}


def hf_inputs(c, device):
    """One verification step after a 256-token context: k drafts, the k + 1 target rows; sampling with
    temperature 0.7, top-k 50 and top-p 0.9 (HF's processors, applied to every row)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    k, V = c["k"], c["V"]
    ids = torch.randint(0, V, (1, 256), generator=g)
    drafts = torch.randint(0, V, (k,), generator=g)
    rows = _peaked(torch.randn(k + 1, V, generator=g) * 3, torch.cat([drafts, drafts[:1]]), 0.8)
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)]) \
        if c["sample"] else LogitsProcessorList()
    rows = rows.to(device)
    # (the work buffer: each timed call copies the rows into it, as both calls modify their rows in place; a fresh
    # 1 MB clone per call instead makes the allocator's page faults the largest and noisiest term of the timing)
    return ids.to(device), drafts.tolist(), rows, procs, c["sample"], torch.empty_like(rows)


def hf_processors(inputs):
    """HF's own work in a verification step, which its assisted generation does as well: the logits processors on
    each of the k + 1 rows with that row's prefix (on the work copy of the rows, as hf_run)."""
    ids, dl, rows, procs, sample, work = inputs
    work.copy_(rows)
    if len(procs):  # (the drafts' tensor only for processors: the adapter's own is the adapter's cost)
        ahf.apply_processors(ids, torch.tensor(dl, dtype=ids.dtype, device=ids.device), work, procs)
    return work


def hf_with_stack_baseline(c, device):
    """transformers' baseline: HF's processors (the stack's own work) and then the op call the adapter makes."""
    inputs = hf_inputs(c, device)
    fused, ahf._FUSED = ahf._FUSED, False  # (greedy on CPU: the adapter's fused op makes no public op call)
    try:
        op = _captured_op_call(hf_run, inputs)
    finally:
        ahf._FUSED = fused

    def bare():
        _reseed()  # (as hf_run does)
        hf_processors(inputs)
        return op()
    return inputs, bare


def hf_run(inputs):
    ids, dl, rows, procs, sample, work = inputs
    _reseed()
    work.copy_(rows)
    return ahf.verify_step(ids, dl, work, procs, None, sample)[1]


# ---- registration --------------------------------------------------------------------------------------------

def _bytes_rows(nrows, V, elt=4):
    return nrows * V * elt


ADAPTERS = {
    "adapter_vllm": dict(
        shape_sets={"default": [vllm_case(16, 4, 32000), vllm_case(64, 4, 128256), vllm_case(16, 4, 32000, True)],
                    "tiny": [vllm_case(3, 2, 500), vllm_case(3, 2, 500, True)]},
        make=vllm_inputs, run=vllm_run, op="rejection_sample",
        bytes_moved=lambda c: _bytes_rows(c["B"] * c["k"], c["V"]) * (2 if c["q"] else 1),
        label=lambda c: f"B{c['B']}-k{c['k']}-V{c['V']}{'-q' if c['q'] else '-ngram'}"),
    "adapter_sglang": dict(
        shape_sets={"default": [sgl_case(8, 8, 32000, "greedy-predict"), sgl_case(8, 8, 128256, "greedy-logits"),
                                sgl_case(8, 8, 32000, "sampling"), sgl_case(32, 16, 32000, "sampling")],
                    "tiny": [sgl_case(2, 6, 300, "greedy-logits"), sgl_case(2, 6, 300, "sampling")]},
        make=sgl_inputs, run=sgl_run, op="rejection_sample",
        bytes_moved=lambda c: (_bytes_rows(c["bs"] * c["n"], c["V"]) if c["mode"] != "greedy-predict"
                               else c["bs"] * c["n"] * 40),
        label=lambda c: f"bs{c['bs']}-n{c['n']}-V{c['V']}-{c['mode']}"),
    "adapter_flashinfer": dict(
        shape_sets={"default": [fi_case(16, 4, 32000), fi_case(16, 4, 32000, seeded=True), fi_case(64, 4, 32000)],
                    "tiny": [fi_case(3, 2, 300), fi_case(3, 2, 300, seeded=True)]},
        make=fi_inputs, run=fi_run, op="rejection_sample",
        bytes_moved=lambda c: _bytes_rows(c["B"] * (2 * c["n"] + 1), c["V"]),
        label=lambda c: f"B{c['B']}-n{c['n']}-V{c['V']}{'-seed' if c['seeded'] else ''}"),
    "adapter_transformers": dict(
        shape_sets={"default": [hf_case(4, 49152, False), hf_case(4, 49152, True), hf_case(8, 128256, True)],
                    "tiny": [hf_case(3, 300, True)]},
        make=hf_inputs, run=hf_run, op="rejection_sample",
        bytes_moved=lambda c: _bytes_rows(c["k"] + 1, c["V"]),
        label=lambda c: f"k{c['k']}-V{c['V']}-{'sample' if c['sample'] else 'greedy'}"),
}

ADAPTERS["adapter_transformers"]["make_with_bare"] = hf_with_stack_baseline
ADAPTERS["adapter_vllm"]["make_with_bare"] = _with_generic_baseline(av, vllm_inputs, vllm_run,
                                                                   prelude=lambda x: _reseed())
ADAPTERS["adapter_sglang"]["make_with_bare"] = _with_generic_baseline(asg, sgl_inputs, sgl_run)
ADAPTERS["adapter_flashinfer"]["make_with_bare"] = _with_generic_baseline(
    af, fi_inputs, fi_run, prelude=lambda x: None if x[3] else _reseed())

for _name, _a in ADAPTERS.items():
    register(OpBench(_name, _a["shape_sets"], _a.get("make_with_bare") or _with_bare(_a["make"], _a["run"]),
                     lambda x, run=_a["run"]: run(x[0]), _a["bytes_moved"], _check, _a["label"],
                     baselines={"bare-op": lambda x: x[1]()}, baseline_check=False, backend_op=_a["op"]))


# ---- the overhead table --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from .timing import CpuTimer

    p = argparse.ArgumentParser(prog="python -m spdkernels.bench.adapters", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="default")
    p.add_argument("--backend", default="cpp", help="backend of the op, for both rows (default: cpp)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--adapter", action="append", choices=sorted(ADAPTERS))
    p.add_argument("--warm", action="store_true",
                   help="back-to-back calls, caches warm (default: a 64 MB write flushes the CPU caches before each "
                        "call, as a model forward pass between two sampler calls does; it also evicts torch's and "
                        "Python's own code and data, so every small tensor operation costs more)")
    args = p.parse_args(argv)
    spdkernels.set_validation(False)
    timer = CpuTimer(flush=not args.warm)
    print(f"# adapter overhead over the bare op; backend {args.backend}; median of {args.repeats} repeats, the two "
          f"calls interleaved "
          f"({'caches warm' if args.warm else 'CPU caches flushed'}), validation off; "
          f"torch threads {torch.get_num_threads()}")
    head = f"{'adapter':22s} {'case':32s} {'bare op us':>11s} {'adapter us':>11s} {'overhead us':>12s} {'overhead':>9s}"
    print(head)
    print("-" * len(head))
    for name in args.adapter or ADAPTERS:
        a = ADAPTERS[name]
        for c in a["shape_sets"][args.shapes]:
            with spdkernels.use_backend(args.backend):
                inputs, bare = (a.get("make_with_bare") or _with_bare(a["make"], a["run"]))(c, "cpu")
            run = lambda a=a, x=inputs: a["run"](x)  # noqa: E731
            with spdkernels.use_backend(args.backend):  # interleaved, so that both see the same machine load
                tb, ta = [], []
                for i in range(args.repeats + 3):
                    b, a_ = timer(bare, 0, 1)["median"], timer(run, 0, 1)["median"]
                    if i >= 3:
                        tb.append(b)
                        ta.append(a_)
                t_bare, t_ad = statistics.median(tb) * 1e3, statistics.median(ta) * 1e3
            print(f"{name:22s} {a['label'](c):32s} {t_bare:11.1f} {t_ad:11.1f} {t_ad - t_bare:12.1f} "
                  f"{100 * (t_ad - t_bare) / t_bare:8.0f}%")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

