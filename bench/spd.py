"""Speculative Pipeline Decoding on the embedded model: equivalent speedup and acceptance against the number
of stages n, for each given PDM (one per tower depth L_s), next to the paper's figures and to the i.i.d.
acceptance model ``n / (n - (n - 1) alpha)``. Greedy, the demo's prompts; every output is compared with
autoregressive decoding. The stages run one after another in this process: the wall clock is reported
but is not the pipelined one (each cycle costs the n stage forwards in sequence plus the PDM); the
equivalent speedup is what a pipeline of n workers reaches.

With ``--lookup`` every n also runs with prompt lookup drafting where it matches (SPDEngine(lookup=...)).
With ``--corpus WORK/corpus-*.json`` (the text ``train-pdm`` generated) every run is repeated on the prompts of
held-out sequences of that corpus (``train-pdm``'s split; drawn at random) and of as many training sequences
of the same kinds (code, text editing, documents, chat, ...; kind for kind), so the drafter's
acceptance on its training distribution, on unseen text of that distribution and on the demo's prompts stand
side by side (the gap between them is what more or more varied training text would close).

    python -m spdkernels.bench.spd [--stages 2 4 8] [--pdm DIR ...] [--lookup] [--max-tokens 128]
                                   [--corpus F] [--json F] [--plot F]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

# "Speculative Pipeline Decoding" (arXiv 2605.30852), Qwen3.5-4B, T=0: n -> (draft layers, equivalent speedup)
PAPER = {4: (4, 2.64), 8: (3, 3.39), 16: (2, 3.70)}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def corpus_prompt_sets(corpus, seed: int, count: int) -> dict:
    """``{"held-out": prompts, "training": prompts}`` from a train-pdm corpus: the prompts of ``count`` held-out
    sequences drawn at random (seeded) from ``train_pdm``'s held-out split for ``seed``, and of as many training
    sequences drawn at random among those of the same kind, one for each (kinds differ in difficulty: editing
    requests copy much of their prompt), so that the two sets differ only in having been trained on."""
    import random

    from spdkernels.runtime.spd.train import held_out_split

    held_idx, train_idx = held_out_split(len(corpus), seed)
    rng = random.Random(seed + 1)
    held_sel = rng.sample(held_idx, min(count, len(held_idx)))
    train_sel = []
    for i in held_sel:
        same = [j for j in train_idx if corpus[j].get("kind") == corpus[i].get("kind") and j not in train_sel]
        pool = same or [j for j in train_idx if j not in train_sel]
        if pool:
            train_sel.append(rng.choice(pool))
    return {"held-out": [[int(t) for t in corpus[i]["prompt_ids"]] for i in held_sel],
            "training": [[int(t) for t in corpus[j]["prompt_ids"]] for j in train_sel]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.spd", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--pdm", action="append", default=None, help="PDM folder (repeat to compare tower depths; "
                    "default: the shipped one)")
    ap.add_argument("--lookup", action="store_true", help="also run every n with prompt lookup (n-grams 2..3) "
                    "drafting where it matches, the PDM elsewhere")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8, help="the first N prompts of the demo suite (and of each "
                    "--corpus set)")
    ap.add_argument("--corpus", default=None, help="a train-pdm corpus (WORK/corpus-*.json): also run the prompts "
                    "of held-out sequences and of training sequences of the same kinds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if args.prompts < 1:
        ap.error("--prompts must be at least 1")
    corpus_sets = {}
    if args.corpus:
        from spdkernels.runtime.spd.data import load_corpus

        try:
            corpus, meta = load_corpus(Path(args.corpus))
            corpus_sets = corpus_prompt_sets(corpus, int(meta["seed"]), args.prompts)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            ap.error(f"--corpus: not a train-pdm corpus ({args.corpus}): {e}")
        if not all(corpus_sets.values()):
            ap.error(f"--corpus: {args.corpus} has too few sequences for a held-out and a training set")

    import torch

    from spdkernels.runtime import Engine, LlamaModel, Request, SamplingParams, load_checkpoint
    from spdkernels.runtime.demo import SUITE
    from spdkernels.runtime.proposers import NGramProposer
    from spdkernels.runtime.spd.pdm import load_pdm, shipped_pdm_path
    from spdkernels.runtime.spd.schedule import SPDEngine

    ck = load_checkpoint()
    model = LlamaModel(ck.config, ck.state_dict)
    tok = ck.tokenizer
    sets = {"demo": [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
                     for _, p in SUITE[:args.prompts]], **corpus_sets}
    params = SamplingParams(max_new_tokens=args.max_tokens)
    ar = {}
    ar_wall = 0.0
    for name, prompts in sets.items():
        ar[name] = []
        for p in prompts:
            res, m = Engine(model, None).generate([Request(p, params)])
            ar[name].append(res[0].output_ids)
            if name == "demo":
                ar_wall += m.wall_s - m.prefill_s
    ar_tps = sum(len(o) for o in ar["demo"]) / ar_wall
    rows = []
    runs = [(name, n, lk) for name in sets for lk in ([False, True] if args.lookup else [False]) for n in args.stages]
    for path in args.pdm or [str(shipped_pdm_path())]:
        pdm = load_pdm(path, model, ck.state_dict)
        for prompt_set, n, lookup in runs:
            prompts = sets[prompt_set]
            eng = SPDEngine(model, pdm, n, lookup=NGramProposer(k=1, min_ngram=2, max_ngram=3) if lookup else None)
            tokens = cycles = accepted = drafted = identical = 0
            wall = pdm_s = stage_s = slow_s = 0.0
            for p, ref in zip(prompts, ar[prompt_set]):
                res, m = eng.generate([Request(p, params)])
                identical += res[0].output_ids == ref
                tokens += len(res[0].output_ids) - 1
                cycles += m.cycles
                accepted, drafted = accepted + m.accepted, drafted + m.drafted
                wall += m.wall_s - m.prefill_s
                pdm_s, stage_s, slow_s = pdm_s + m.pdm_s, stage_s + sum(m.stage_s) / n, slow_s + m.slowest_stage_s
            alpha = accepted / max(drafted, 1)
            row = dict(pdm=path, draft_layers=pdm.num_layers, n=n, lookup=lookup, prompt_set=prompt_set,
                       acceptance=alpha,
                       tokens_per_cycle=tokens / cycles,
                       equivalent_speedup=n * tokens / cycles, iid_model=n / (n - (n - 1) * alpha),
                       pdm_ms=1e3 * pdm_s / cycles, stage_ms=1e3 * stage_s / cycles,
                       wall_tokens_per_s_one_process=(tokens + len(prompts)) / wall,
                       identical=f"{identical}/{len(prompts)}")
            rows.append(row)
            print(f"{prompt_set} prompts, L_s={row['draft_layers']}{' + lookup' if lookup else ''} n={n}: "
                  f"acceptance {alpha:.3f}, "
                  f"tokens/cycle {row['tokens_per_cycle']:.3f}, "
                  f"equivalent speedup {row['equivalent_speedup']:.2f} (i.i.d. model {row['iid_model']:.2f}), PDM "
                  f"{row['pdm_ms']:.2f} ms vs stage {row['stage_ms']:.2f} ms, one-process wall "
                  f"{row['wall_tokens_per_s_one_process']:.1f} tok/s (AR {ar_tps:.1f}), identical {row['identical']}",
                  flush=True)
    out = dict(commit=_commit(), machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               max_new_tokens=args.max_tokens, prompts=len(sets["demo"]), corpus=args.corpus, ar_tokens_per_s=ar_tps,
               rows=rows,
               paper={str(k): dict(draft_layers=v[0], equivalent_speedup=v[1]) for k, v in PAPER.items()})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)
    return 0 if all(r["identical"].split("/")[0] == r["identical"].split("/")[1] for r in rows) else 1


def plot(out, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r.get("prompt_set", "demo"), r["draft_layers"], r.get("lookup", False)) for r in out["rows"]})
    for ps, ls, lk in keys:
        rs = sorted([r for r in out["rows"] if (r.get("prompt_set", "demo"), r["draft_layers"], r.get("lookup", False))
                     == (ps, ls, lk)], key=lambda r: r["n"])
        name = f"L_s={ls}{' + lookup' if lk else ''}{'' if ps == 'demo' else f', {ps} prompts'}"
        if ps == "demo":
            a1.plot([r["n"] for r in rs], [r["equivalent_speedup"] for r in rs], "o-",
                    label=f"ours, {name} (SmolLM2-135M)")
            a1.plot([r["n"] for r in rs], [r["iid_model"] for r in rs], ":", label=f"i.i.d. model, our alpha ({name})")
        a2.plot([r["n"] for r in rs], [r["acceptance"] for r in rs], "o-" if ps == "demo" else "x--",
                label=f"ours, {name}")
    pn = sorted(int(k) for k in out["paper"])
    a1.plot(pn, [out["paper"][str(k)]["equivalent_speedup"] for k in pn], "s--", label="paper (Qwen3.5-4B)")
    a1.set_xlabel("stages n")
    a1.set_ylabel("equivalent speedup (n x tokens/cycle)")
    a1.legend(fontsize=8)
    a2.set_xlabel("stages n")
    a2.set_ylabel("acceptance (accepted / verified drafts)")
    a2.legend(fontsize=8)
    fig.suptitle(f"Speculative Pipeline Decoding, greedy, {out['prompts']} prompts x {out['max_new_tokens']} tokens "
                 f"(commit {out['commit']})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
