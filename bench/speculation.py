"""Speculation length against batch size on the embedded model: autoregressive, n-gram drafts of a fixed
depth, and the same proposer under :class:`spdkernels.runtime.AdaptiveSpeculation`, at batch 1 (each prompt
alone) and batch N (the whole suite decoded together), greedy. Each run's outputs are compared with the
autoregressive run of the same batch size (``identical``; the demo, ``spdkernels demo``, is where a
divergence is checked for a near-tie: a batched forward of more rows than the skinny GEMM takes, 48 with fp32
weights and ``PACKED_MAX_ROWS`` with packed ones, runs through BLAS, whose summation order differs).

    python -m spdkernels.bench.speculation [--max-tokens 64] [--k 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

from spdkernels.runtime.files import write_text_atomic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.speculation", description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8, help="draft depth of the fixed run, bound of the adaptive one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from spdkernels.runtime import AdaptiveSpeculation, Engine, NGramProposer, Request, SamplingParams
    from spdkernels.runtime.demo import SUITE
    from spdkernels.runtime.model import LlamaModel
    from spdkernels.runtime.weights import embedded_model_path, load_checkpoint

    ck = load_checkpoint(embedded_model_path())
    model = LlamaModel(ck.config, ck.state_dict)
    tok = ck.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for _, p in SUITE]
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)
    rows = []

    def run(name, proposer, spec, batch):
        eng = Engine(model, proposer, speculation=spec)
        groups = [prompts] if batch > 1 else [[p] for p in prompts]
        outs, new, wall, drafted, steps, accepted = [], 0, 0.0, 0, 0, 0
        for g in groups:
            res, m = eng.generate([Request(p, params) for p in g])
            outs += [r.output_ids for r in res]
            new, wall = new + m.new_tokens, wall + m.wall_s - m.prefill_s
            drafted, steps, accepted = drafted + m.drafted, steps + m.steps, accepted + m.accepted
        row = dict(run=name, batch=batch, tokens_per_s=new / wall, drafted_per_step=drafted / max(steps, 1),
                   acceptance=accepted / max(drafted, 1), tokens_per_step=(new / max(steps, 1)))
        rows.append(row)
        print(f"{name:32s} batch {batch:2d}: {row['tokens_per_s']:6.1f} tok/s (decode, prefill excluded), "
              f"{row['drafted_per_step']:4.2f} draft tokens per request-step, acceptance {row['acceptance']:.2f}",
              flush=True)
        return outs

    for batch in (1, len(prompts)):
        ref = run("autoregressive", None, None, batch)
        rows[-1]["identical"] = len(ref)
        for name, prop, spec in ((f"ngram k={args.k}", NGramProposer(k=args.k), None),
                                 (f"ngram + adaptive k<={args.k}", NGramProposer(k=args.k),
                                  AdaptiveSpeculation(max_depth=args.k))):
            outs = run(name, prop, spec, batch)
            rows[-1]["identical"] = sum(a == b for a, b in zip(outs, ref))
    for batch in (1, len(prompts)):
        base = next(r for r in rows if r["batch"] == batch and r["run"] == "autoregressive")["tokens_per_s"]
        for r in rows:
            if r["batch"] == batch:
                r["speedup"] = r["tokens_per_s"] / base
    print("\nrun                               batch  tok/s  speedup  draft/step  accept  identical")
    for r in rows:
        print(f"{r['run']:32s}  {r['batch']:5d}  {r['tokens_per_s']:5.1f}  {r['speedup']:6.2f}x  "
              f"{r['drafted_per_step']:10.2f}  {r['acceptance']:6.2f}  {r['identical']}/{len(prompts)}")
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(machine=platform.processor() or platform.machine(),
                                                     threads=torch.get_num_threads(), torch=torch.__version__,
                                                     max_tokens=args.max_tokens, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
