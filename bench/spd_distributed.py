"""Speculative Pipeline Decoding across processes on the embedded model: wall-clock tokens/s of the
distributed pipeline (one process per stage + rank 0) against our autoregressive decoding, measured in the
same run and interleaved prompt by prompt (the demo's prompts, greedy), every output compared token for
token with the autoregressive one, and the cost model of contract section 6 printed next to each
measurement (cycle = slowest stage + communication + verify; tokens per cycle from acceptance), with the
bound that the machine's cores put on ranks that outnumber them.

    python -m spdkernels.bench.spd_distributed [--stages 2 4] [--max-tokens 128] [--prompts 8] [--json F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from spdkernels.runtime.files import write_text_atomic


def merge(ms):
    """Sum per-prompt :class:`DistSPDRunMetrics` (lists element-wise; the ping round trip averaged)."""
    out = dataclasses.replace(ms[0])
    for f in dataclasses.fields(out):
        v = getattr(ms[0], f.name)
        if isinstance(v, bool) or isinstance(v, str) or f.name in ("n", "ranks", "threads"):
            continue
        if isinstance(v, list):
            setattr(out, f.name, [sum(x) for x in zip(*[getattr(m, f.name) for m in ms])])
        elif isinstance(v, (int, float)):
            setattr(out, f.name, sum(getattr(m, f.name) for m in ms))
    out.p2p_rtt_s = sum(m.p2p_rtt_s for m in ms) / len(ms)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.spd_distributed", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8, help="the first N prompts of the demo suite")
    ap.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / (n + 1), >= 1)")
    ap.add_argument("--ar-threads", type=int, nargs="+", default=None,
                    help="thread counts of the autoregressive baseline (default: 1 and all cores)")
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from spdkernels.bench.spd import _commit

    from spdkernels.runtime import Engine, LlamaModel, Request, SamplingParams, load_checkpoint
    from spdkernels.runtime.demo import SUITE
    from spdkernels.runtime.spd.distributed import DistributedSPD, cost_model, format_report
    from spdkernels.runtime.spd.pdm import load_pdm, shipped_pdm_path

    cores = os.cpu_count() or 1
    ar_threads = args.ar_threads or sorted({1, cores})
    ck = load_checkpoint()
    model = LlamaModel(ck.config, ck.state_dict)
    tok = ck.tokenizer
    pdm = load_pdm(str(shipped_pdm_path()), model, ck.state_dict)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for _, p in SUITE[:args.prompts]]
    params = SamplingParams(max_new_tokens=args.max_tokens)
    engines = {n: DistributedSPD(ck.config, ck.state_dict, pdm, n, tokenizer=tok, backend=args.backend,
                                 threads=args.threads) for n in args.stages}
    t = time.perf_counter()
    for e in engines.values():
        e.start()  # workers idle (blocked in a receive) while the others run
    print(f"{len(engines)} pipelines started in {time.perf_counter() - t:.1f} s; {len(prompts)} prompts, greedy, "
          f"{args.max_tokens} new tokens, interleaved prompt by prompt; {cores} cores", flush=True)
    ar = {t: dict(tokens=0, decode_s=0.0, wall_s=0.0) for t in ar_threads}
    spd = {n: [] for n in engines}
    identical = {n: 0 for n in engines}
    try:
        for i, p in enumerate(prompts):
            req = Request(p, params)
            ref = None
            for th in ar_threads:
                torch.set_num_threads(th)
                res, m = Engine(model, None).generate([req])
                ref = ref or res[0].output_ids
                a = ar[th]
                a["tokens"] += len(res[0].output_ids)
                a["decode_s"] += m.wall_s - m.prefill_s
                a["wall_s"] += m.wall_s
            same = {}
            for n, eng in engines.items():
                res, m = eng.generate([req])  # rank 0 runs with the ranks' thread count while it generates
                spd[n].append(m)
                same[n] = res[0].output_ids == ref
                identical[n] += same[n]
            print(f"prompt {i}: AR " + ", ".join(f"{th}T {ar[th]['tokens']}" for th in ar_threads) + "; " + ", ".join(
                f"n={n} {m.tokens_per_s:.1f} tok/s {'identical' if same[n] else 'DIFFERENT'}"
                for n, m in ((n, spd[n][-1]) for n in engines)), flush=True)
    finally:
        for e in engines.values():
            e.close()
    ar_tps = {th: a["tokens"] / a["decode_s"] for th, a in ar.items()}
    base = ar_tps[1] if 1 in ar_tps else next(iter(ar_tps.values()))
    lines = ["autoregressive (our Engine, one process): " + ", ".join(
        f"{th} thread(s) {ar_tps[th]:.1f} tok/s decode ({ar[th]['tokens'] / ar[th]['wall_s']:.1f} with prefill)"
        for th in ar_threads)]
    rows = []
    for n in engines:
        m = merge(spd[n])
        cm = cost_model(m, cores)
        rows.append(dict(n=n, ranks=n + 1, threads_per_rank=m.threads, identical=f"{identical[n]}/{len(prompts)}",
                         acceptance=m.acceptance_rate, tokens_per_cycle=m.tokens_per_cycle,
                         decode_tokens_per_s=m.decode_tokens_per_s, tokens_per_s_with_prefill=m.tokens_per_s,
                         speedup_vs_ar_1thread=m.decode_tokens_per_s / base,
                         speedups_vs_ar={str(th): m.decode_tokens_per_s / v for th, v in ar_tps.items()},
                         cost_model=cm, metrics=m.as_dict()))
        lines.append(format_report(m, ar_tokens_per_s=base, cores=cores))
        lines.append(f"    identical to autoregressive: {identical[n]}/{len(prompts)}; with prefill "
                     f"{m.tokens_per_s:.1f} tok/s")
    table = ["| n | ranks | identical | acceptance | tokens/cycle (model) | cycle ms (model; cores bound) | "
             "SPD tok/s | model tok/s | AR tok/s " + " / ".join(f"{t}T" for t in ar_threads) + " | speedup vs AR 1T |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cm = r["cost_model"]
        table.append(f"| {r['n']} | {r['ranks']} | {r['identical']} | {r['acceptance']:.2f} | "
                     f"{r['tokens_per_cycle']:.2f} ({cm['model_tokens_per_cycle']:.2f}) | {cm['cycle_ms']:.1f} "
                     f"({cm['model_cycle_ms']:.1f}; {cm['cores_bound_cycle_ms']:.1f}) | "
                     f"{r['decode_tokens_per_s']:.1f} | "
                     f"{cm['model_tokens_per_s']:.1f} | " + " / ".join(f"{ar_tps[t]:.1f}" for t in ar_threads)
                     + f" | {r['speedup_vs_ar_1thread']:.2f}x |")
    cmd = "python -m spdkernels.bench.spd_distributed " + " ".join(argv if argv is not None else sys.argv[1:])
    head = f"commit {_commit()}, {platform.processor() or platform.machine()}, {cores} cores; {cmd}"
    text = "\n".join([head] + lines + [""] + table)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(dict(commit=_commit(), command=cmd, cores=cores,
                                                   machine=platform.processor() or platform.machine(),
                                                   max_new_tokens=args.max_tokens, prompts=len(prompts),
                                                   ar_tokens_per_s={str(k): v for k, v in ar_tps.items()},
                                                   rows=rows, text=text), indent=1))
        write_text_atomic(Path(args.json).with_suffix(".txt"), text + "\n")
    return 0 if all(v == len(prompts) for v in identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
