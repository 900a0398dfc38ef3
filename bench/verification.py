"""Cost of verifying deterministic drafts for sampled requests: the engine's coupled verification
(``Engine._verify_sampled``), lazy (the rows the walks reach, a call per level: the CPU's default) and eager (every
row of every draft in one call: the GPU's default), against rejection sampling of the same drafts as point masses
(one ``rejection_sample`` call whose walk samples only the rows on its path: what the engine ran before), all from
the same logits and with their results read on the host, timed in turn (interleaved, ``--repeats`` times;
medians), with op validation off (the engine's setting).

Coupled verification gives a seeded request the text of autoregressive decoding whatever the draft depths or the
batch; this measures what that costs. Drafts: random chains or random trees over random logits (the share of
accepted nodes is then near zero: the walks stop at their first row, the eager coupled call samples every row:
the widest gap between them); cases marked A draft the argmax of each parent's row, accepted more often, so the
walks go deeper (the lazy one a call per level).

    python -m spdkernels.bench.verification [--vocab 49152] [--top-p 0.95] [--repeats 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from types import SimpleNamespace

CASES = [  # (label, requests, draft nodes per request, tree, drafts = the argmax of their parent's row)
    ("1 chain of 4", 1, 4, False, False),
    ("4 chains of 4", 4, 4, False, False),
    ("8 chains of 8", 8, 8, False, False),
    ("4 trees of 15", 4, 15, True, False),
    ("16 trees of 15", 16, 15, True, False),
    ("4 chains of 4 A", 4, 4, False, True),
    ("8 chains of 8 A", 8, 8, False, True),
]


def _batch(R: int, k: int, tree: bool, V: int, gen, top_p: float, argmax: bool):
    import torch

    from spdkernels.runtime.engine import SamplingParams
    from spdkernels.runtime.proposers import Draft
    from spdkernels.testing import random_parents

    drafts, active, positions, cu, depths = [], [], [], [0], []
    logits = torch.randn(R * (k + 1), V, generator=gen) * 3
    for r in range(R):
        parents = random_parents(k, gen) if tree else list(range(-1, k - 1))
        tokens = torch.randint(0, V, (k,), generator=gen).tolist()
        if argmax:  # node i's token: the argmax of its parent's row
            tokens = [int(logits[cu[-1] + 1 + p].argmax()) for p in parents]
        d = Draft(tokens=tokens, parents=parents)
        drafts.append(d)
        active.append(SimpleNamespace(params=SamplingParams(temperature=0.9, top_p=top_p, seed=r + 1),
                                      metrics=SimpleNamespace(steps=0)))
        nd = [0]
        for p in parents:
            nd.append(1 + nd[p + 1])
        positions.append([100 + x for x in nd])
        cu.append(cu[-1] + 1 + k)
        depths.append(max(nd))
    return drafts, active, positions, cu, depths, logits


def _measure(R: int, k: int, tree: bool, argmax: bool, vocab: int, top_p: float, repeats: int, gen):
    """([rejection, lazy coupled, eager coupled] ms, rows): medians over ``repeats`` interleaved calls."""
    import torch

    import spdkernels
    from spdkernels.runtime.engine import Engine

    drafts, active, positions, cu, depths, logits = _batch(R, k, tree, vocab, gen, top_p, argmax)
    max_depth = max(depths)
    ids = torch.tensor([t for d in drafts for t in d.tokens], dtype=torch.int64)
    cund = torch.tensor([k * r for r in range(R + 1)], dtype=torch.int32)
    par = torch.tensor([p for d in drafts for p in d.parents], dtype=torch.int32) if tree else None
    kw = dict(temperature=torch.full((R,), 0.9), top_p=torch.full((R,), top_p), seed=torch.arange(1, R + 1),
              offset=torch.zeros(R, dtype=torch.int64))

    def rejection():
        out, num, path = spdkernels.rejection_sample(logits, ids, cund, parents=par, max_depth=max_depth, **kw)
        return out.tolist(), num.tolist(), path.tolist()

    eng = Engine.__new__(Engine)  # (the method reads nothing of the engine)

    def lazy():
        return eng._verify_sampled(active, drafts, logits, positions, cu, depths, max_depth, lazy=True)

    def eager():
        return eng._verify_sampled(active, drafts, logits, positions, cu, depths, max_depth, lazy=False)

    assert lazy() == eager()  # the same tokens either way
    times = {rejection: [], lazy: [], eager: []}
    for fn in times:  # warm-up
        fn()
    for _ in range(repeats):
        for fn, ts in times.items():
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(times[fn]) for fn in (rejection, lazy, eager)], cu[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.verification", description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-p", type=float, default=0.95, help="1 = no filter")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.vocab < 2 or not 0 < args.top_p <= 1:
        print("error: --repeats >= 1, --vocab >= 2, --top-p in (0, 1]", file=sys.stderr)
        return 2
    import torch

    import spdkernels

    spdkernels.set_validation(False)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'case':<16} {'rows':>5} {'rejection ms':>13} {'lazy ms':>8} {'eager ms':>9} {'lazy / rej':>11} "
          f"{'eager / rej':>12}")
    for label, R, k, tree, argmax in CASES:
        (a, b, c), n_rows = _measure(R, k, tree, argmax, args.vocab, args.top_p, args.repeats, gen)
        rows.append(dict(case=label, requests=R, nodes=k, tree=tree, argmax_drafts=argmax, rows=n_rows,
                         rejection_ms=a, lazy_ms=b, eager_ms=c, lazy_ratio=b / a, eager_ratio=c / a))
        print(f"{label:<16} {n_rows:>5} {a:>13.3f} {b:>8.3f} {c:>9.3f} {b / a:>10.2f}x {c / a:>11.2f}x", flush=True)
    if args.json:
        env = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                   threads=torch.get_num_threads(), vocab=args.vocab, top_p=args.top_p, repeats=args.repeats,
                   backend=spdkernels.available_backends("cpu")[0])
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, env=env), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
