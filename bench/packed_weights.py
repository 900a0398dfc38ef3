"""Cost of one decoding forward on the embedded model with fp32 weights and with packed weights (the GGUF
file's Q4_1 / Q8_0 blocks held as they are and widened in registers by the skinny GEMM, csrc/linear.cpp):
T = 1 (autoregressive decoding) to 17 query tokens (verifying a draft), and 64 / 128 rows (a decoding batch or a
prefill chunk), after a prompt of ``--context`` tokens, the two models timed in turn (interleaved, one forward
each, ``--repeats`` times; medians), with op validation off (the engine's setting). Both models' logits are
compared first: bit for bit equal where both took the same path for the query rows and for the ``--context``
rows of the cached prompt (up to 48 rows the skinny GEMM, beyond ``packed_max_rows()`` BLAS), within fp32
summation-order error otherwise (fp32 weights go to BLAS above 48 rows, packed ones stay in the skinny GEMM);
else the run fails. ``--blas-above N`` times a third variant in turn with the other two: the packed model with its
skinny-GEMM row limit (``PACKED_MAX_ROWS``) set to N, so that above N rows each matrix is widened for BLAS: the
comparison behind that limit (N >= 48: up to 48 rows every weight takes the skinny GEMM; needs the C++ extension).

    python -m spdkernels.bench.packed_weights [--tokens 1 2 5 9 17 64 128] [--repeats 30] [--blas-above N]
                                              [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.packed_weights", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9, 17, 64, 128],
                    help="query tokens per forward")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before the query tokens")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--blas-above", type=int, default=None,
                    help="also time the packed model with its skinny-GEMM row limit set to this many rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.context < 1 or any(t < 1 or t > 1024 for t in args.tokens):
        print("error: --repeats and --context >= 1, --tokens in 1..1024", file=sys.stderr)
        return 2
    if args.blas_above is not None and args.blas_above < 48:
        print("error: --blas-above: expected >= 48 rows (up to 48 rows every weight takes the skinny GEMM)",
              file=sys.stderr)
        return 2

    import torch

    import spdkernels
    from spdkernels import _cpp
    from spdkernels.runtime import linear as linear_mod
    from spdkernels.runtime.linear import SKINNY_MAX_ROWS, PackedWeight, packed_max_rows, weight_formats
    from spdkernels.runtime.model import LlamaModel
    from spdkernels.runtime.weights import embedded_model_path, load_checkpoint

    from .timing import forward_step, interleaved_ms, prefilled_cache

    if args.blas_above is not None and not _cpp.load():
        print(f"error: --blas-above: needs the C++ extension ({_cpp.load_error()})", file=sys.stderr)
        return 2
    ck = load_checkpoint(embedded_model_path())
    c = ck.config
    models = {"fp32": LlamaModel(ck.config, ck.state_dict, packed=False),
              "packed": LlamaModel(ck.config, ck.state_dict)}

    def weight_bytes(m):
        return sum(w.nbytes if isinstance(w, PackedWeight) else w.numel() * w.element_size() for w in m.matrices())

    packed = models["packed"]
    formats = weight_formats(packed.matrices()[:-1])  # the layers'
    head = packed.head_weight
    formats["head"] = head.format if isinstance(head, PackedWeight) else "fp32"

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (args.context + max(args.tokens),), generator=g).tolist()
    caches = {name: prefilled_cache(m, prompt, args.context, max(args.tokens)) for name, m in models.items()}

    limited = f"packed, BLAS above {args.blas_above}"
    names = list(models) + ([limited] if args.blas_above is not None else [])

    def step(name, T):
        if name != limited:
            return forward_step(models[name], caches[name], prompt, args.context, T)
        isa = _cpp.isa() if _cpp.load() else "baseline"
        saved = dict(linear_mod.PACKED_MAX_ROWS)
        linear_mod.PACKED_MAX_ROWS[isa] = args.blas_above
        try:
            assert packed_max_rows() == args.blas_above, "the limit the variant sets is not the one linear() reads"
            return forward_step(packed, caches["packed"], prompt, args.context, T)
        finally:
            linear_mod.PACKED_MAX_ROWS.clear()
            linear_mod.PACKED_MAX_ROWS.update(saved)

    spdkernels.set_validation(False)  # the engine's setting: no host-sync value checks in the timed forward
    diffs = {}
    with torch.inference_mode():
        for T in args.tokens:
            _, a = step("fp32", T)
            _, b = step("packed", T)
            diffs[T] = float((a - b).abs().max())
            same_path = all(n <= SKINNY_MAX_ROWS or n > packed_max_rows() for n in (T, args.context))
            if (not torch.equal(a, b)) if same_path else diffs[T] > 1e-4 * float(a.abs().max()):
                print(f"error: packed logits differ from fp32 at T={T} by {diffs[T]:.3g}", file=sys.stderr)
                return 1
            if args.blas_above is not None:
                _, c2 = step(limited, T)
                diffs[(limited, T)] = float((c2 - b).abs().max())
                # bit for bit where both limits send the T query rows the same way, else within fp32 rounding
                same = (T <= args.blas_above) == (T <= packed_max_rows())
                if (not torch.equal(c2, b)) if same else diffs[(limited, T)] > 1e-4 * float(b.abs().max()):
                    print(f"error: '{limited}' logits differ from packed at T={T}", file=sys.stderr)
                    return 1
        med = interleaved_ms(names, args.tokens, args.repeats, step)
    rows = [dict(tokens=T, fp32_ms=med[("fp32", T)], packed_ms=med[("packed", T)],
                 fp32_vs_T1=med[("fp32", T)] / med[("fp32", args.tokens[0])],
                 packed_vs_T1=med[("packed", T)] / med[("packed", args.tokens[0])],
                 packed_speedup=med[("fp32", T)] / med[("packed", T)], max_abs_logit_diff=diffs[T],
                 **({"blas_above": args.blas_above, "packed_blas_above_ms": med[(limited, T)],
                     "packed_blas_above_max_abs_logit_diff": diffs[(limited, T)],
                     "packed_vs_blas_above": med[("packed", T)] / med[(limited, T)]} if limited in names else {}))
            for T in args.tokens]
    out = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               context=args.context, repeats=args.repeats, layer_formats=formats,
               weight_mb={n: weight_bytes(m) / 1e6 for n, m in models.items()}, rows=rows)
    print(f"embedded model, context {args.context}, {args.repeats} repeats (medians), {out['threads']} threads; "
          f"layer matrices {formats}; weights read per forward: fp32 {out['weight_mb']['fp32']:.0f} MB, "
          f"packed {out['weight_mb']['packed']:.0f} MB; op validation off; logits bit for bit equal where both "
          f"models take the same path (<= {SKINNY_MAX_ROWS} or > {packed_max_rows()} rows, query and prompt)")
    print(f"{'tokens':>6} {'fp32 ms':>9} {'packed ms':>10} {'fp32 /T1':>9} {'packed /T1':>11} {'packed speedup':>15} "
          f"{'max |logit diff|':>17}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['fp32_ms']:>9.2f} {r['packed_ms']:>10.2f} {r['fp32_vs_T1']:>9.2f} "
              f"{r['packed_vs_T1']:>11.2f} {r['packed_speedup']:>14.2f}x {r['max_abs_logit_diff']:>17.3g}"
              + (f"  {limited}: {r['packed_blas_above_ms']:.2f} ms, packed / that {r['packed_vs_blas_above']:.3f}"
                 if limited in names else ""))
    if args.json:
        from spdkernels.runtime.files import write_text_atomic

        write_text_atomic(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
