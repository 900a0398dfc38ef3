"""What the per-layer steps around the GEMMs cost in one decoding forward of the embedded model, measured side by
side in one process: the runtime as it is (the C++ RMSNorm / rotary passes, tree_attention's C++ CPU kernel), against
the same forward with the torch RMSNorm / rotary ops, and against tree_attention behind its former Python kernel
(the public wrapper's work, then an op of the same schema whose CPU kernel is the Python one the op had before: the
static checks in Python, then the private C++ op). The variants run in turn, one forward each, the order rotating
from one repeat to the next, ``--repeats`` times (medians); op validation off (the engine's setting); every
variant is checked first to run what it stands for (the profiler's op names), and its logits against the
runtime's (bit for bit for tree_attention, within fp32 rounding for the torch norm).

    python -m spdkernels.bench.forward_steps [--tokens 1 5] [--repeats 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys

_LIBS: list = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.forward_steps", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 5], help="query tokens per forward")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before the query tokens")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--weights", choices=["packed", "fp32"], default="packed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.context < 1 or any(t < 1 or t > 48 for t in args.tokens):
        print("error: --repeats and --context >= 1, --tokens in 1..48", file=sys.stderr)
        return 2

    import torch

    import spdkernels
    from spdkernels import _cpp
    from spdkernels.ops import _common
    from spdkernels.runtime import model as model_mod
    from spdkernels.runtime.model import LlamaModel
    from spdkernels.runtime.weights import embedded_model_path, load_checkpoint

    from .timing import forward_step, interleaved_ms, prefilled_cache

    if not _cpp.load():
        print("error: the C++ extension is not loaded: nothing to compare", file=sys.stderr)
        return 2
    ta_mod = sys.modules["spdkernels.ops.tree_attention"]
    if not hasattr(torch.ops.spdkernels_forward_steps, "tree_attention"):  # (main may run twice in a process)
        lib = torch.library.Library("spdkernels_forward_steps", "DEF")  # noqa: TOR901 - inference only
        lib.define(str(torch.ops.spdkernels.tree_attention.default._schema).split("::", 1)[1])
        lib.impl("tree_attention", _common.op_kernel(ta_mod.OP, ta_mod._check_all_static, ta_mod._run),
                 "CompositeExplicitAutograd")
        _LIBS.append(lib)  # kept alive: the registration lasts as long as the Library object
    behind_python = torch.ops.spdkernels_forward_steps.tree_attention.default

    def ta_behind_python_kernel(q, k, v, bt, lens, cu, mask=None, scale=None, *, max_q_len=None, max_kv_len=None):
        # the public function's own work (spdkernels.tree_attention), with the op it calls swapped for the one above
        return ta_mod._call(behind_python, q, k, v, bt, lens, cu, mask, scale, max_q_len, max_kv_len, None)

    @contextlib.contextmanager
    def variant(name):
        saved = model_mod._one_pass, model_mod._layer_one_pass, model_mod.tree_attention
        if name == "torch norm/rotary":
            model_mod._one_pass = model_mod._layer_one_pass = lambda *a: False
        elif name == "tree_attention via Python kernel":
            model_mod.tree_attention = ta_behind_python_kernel
        try:
            yield
        finally:
            model_mod._one_pass, model_mod._layer_one_pass, model_mod.tree_attention = saved

    ck = load_checkpoint(embedded_model_path())
    m = LlamaModel(ck.config, ck.state_dict, packed=args.weights == "packed")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ck.config.vocab_size, (args.context + max(args.tokens),), generator=g).tolist()
    spdkernels.set_validation(False)
    names = ["runtime", "torch norm/rotary", "tree_attention via Python kernel"]

    def step(name, T):
        with variant(name):
            return forward_step(m, cache, prompt, args.context, T)

    with torch.inference_mode():
        cache = prefilled_cache(m, prompt, args.context, max(args.tokens))
        # what each variant must run (the profiler's op names), and its logits against the runtime's
        one_pass = {"spdkernels::_cpu_rms_norm", "spdkernels::_cpu_rotary"}
        expect = {"runtime": (one_pass | {"spdkernels::tree_attention"}, set()),
                  "torch norm/rotary": (set(), one_pass),
                  "tree_attention via Python kernel": ({"spdkernels_forward_steps::tree_attention"},
                                                       {"spdkernels::tree_attention"})}
        for T in args.tokens:
            logits = {}
            for name in names:
                with torch.profiler.profile() as prof:
                    logits[name] = step(name, T)[1]
                ran = {e.name for e in prof.events()}
                must, must_not = expect[name]
                if not must <= ran or must_not & ran:
                    print(f"error: variant '{name}' did not run what it stands for at T={T}", file=sys.stderr)
                    return 1
            base = logits["runtime"]
            for name in names[1:]:
                other = logits[name]
                ok = torch.equal(other, base) if "tree_attention" in name else \
                    float((other - base).abs().max()) <= 1e-3 * float(base.abs().max())
                if not ok:
                    print(f"error: '{name}' logits differ from the runtime's at T={T}", file=sys.stderr)
                    return 1
        med = interleaved_ms(names, args.tokens, args.repeats, step)
    rows = [dict(tokens=T, **{f"{n} ms": med[(n, T)] for n in names},
                 **{f"{n} / runtime": med[(n, T)] / med[("runtime", T)] for n in names[1:]}) for T in args.tokens]
    out = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               isa=_cpp.isa(), weights=args.weights, context=args.context, repeats=args.repeats, rows=rows)
    print(f"embedded model ({args.weights} weights), context {args.context}, {args.repeats} interleaved repeats "
          f"(medians), {out['threads']} threads, C++ ISA {out['isa']}; op validation off")
    print(f"{'tokens':>6} {'runtime ms':>11} {'torch norm/rotary ms':>21} {'ratio':>6} {'TA via Python ms':>17} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['runtime ms']:>11.2f} {r['torch norm/rotary ms']:>21.2f} "
              f"{r['torch norm/rotary / runtime']:>6.3f} {r['tree_attention via Python kernel ms']:>17.2f} "
              f"{r['tree_attention via Python kernel / runtime']:>6.3f}")
    if args.json:
        from spdkernels.runtime.files import write_text_atomic

        write_text_atomic(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
