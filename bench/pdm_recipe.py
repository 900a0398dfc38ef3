"""Short PDM training runs to compare recipes on one cached text: held-out top-1 agreement and KL per
layout after a fixed number of steps, and the time per step (a recipe that is cheaper per step trains more
steps in the same time).

    python -m spdkernels.bench.pdm_recipe --work WORK --layers 1 --shift --steps 300 [--lr 2e-3] [--tower-init L]
        [--json out.jsonl]

``WORK`` is the ``--work`` folder of ``spdkernels train-pdm`` (its corpus JSON and the anchor-state cache for
the anchors ``0, 8, 15, 22, 30``); the held-out split is ``train-pdm``'s for ``--seed``. One JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.pdm_recipe", description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="train-pdm's --work folder")
    ap.add_argument("--layers", type=int, default=2, help="tower layers L_s")
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--shift", action="store_true", help="the previous-token term")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-windows", type=int, default=16, help="held-out windows scored")
    ap.add_argument("--tower-init", type=int, default=None, help="train-pdm's --tower-init (default: noise)")
    ap.add_argument("--json", default=None, help="append the result line to this file")
    args = ap.parse_args(argv)

    import torch

    from spdkernels.runtime import LlamaModel, load_checkpoint
    from spdkernels.runtime.spd.data import corpus_families, held_out_windows, load_corpus, newest_corpus
    from spdkernels.runtime.spd.pdm import PDMConfig, target_fingerprint
    from spdkernels.runtime.spd.train import (
        Trainer,
        TrainSettings,
        held_out_split,
        make_windows,
        select_vocab,
        stage_bounds_union,
    )

    try:
        cpath = newest_corpus(Path(args.work))
    except FileNotFoundError as e:
        raise SystemExit(f"--work: {e}") from None
    print(f"corpus: {cpath}")
    ck = load_checkpoint()
    anchors = stage_bounds_union(ck.config.num_layers, (4,))  # train-pdm's default anchors (n = 4)
    spath = cpath.with_suffix(f".anchors-{'-'.join(map(str, anchors))}.pt")
    if not spath.exists():
        raise SystemExit(f"--work: no anchor-state cache {spath.name}")
    target = LlamaModel(ck.config, ck.state_dict)
    corpus, _ = load_corpus(cpath)
    states = torch.load(spath)
    held, train = held_out_split(len(corpus), args.seed, families=corpus_families(corpus))  # train_pdm's split
    vocab = select_vocab([corpus[i] for i in train], 8192, ck.config.vocab_size, ck.config.eos_token_ids)
    tw = make_windows([states[i] for i in train], [corpus[i] for i in train], 256)
    hw = held_out_windows(make_windows([states[i] for i in held], [corpus[i] for i in held], 256),
                          args.held_windows, args.seed)
    cfg = PDMConfig(anchors=anchors, num_layers=args.layers, intermediate_size=args.intermediate,
                    draft_vocab=len(vocab), shift=args.shift, target=target_fingerprint(ck.config, ck.state_dict))
    cfg.training = dict(vocab_ids=vocab)
    if args.tower_init is not None and not 0 <= args.tower_init < ck.config.num_layers:
        raise SystemExit(f"--tower-init: expected a layer of the target, 0..{ck.config.num_layers - 1}, "
                         f"got {args.tower_init}")
    st = TrainSettings(steps=args.steps, batch=4, lr=args.lr, seed=args.seed, tower_init=args.tower_init)
    tr = Trainer(target, cfg, tw, hw, st, log=lambda *a: None)
    t0 = time.perf_counter()
    res = tr.run(None, progress=False)
    t = time.perf_counter() - t0
    ev = tr.evaluate(hw, {"pipe4": ("pipeline", 4, 4, 0), "prop4": ("proposer", 4, 0, 4),
                                              "pipe2": ("pipeline", 2, 2, 0)})
    last = res["history"][-20:]
    line = dict(layers=args.layers, shift=args.shift, steps=args.steps, lr=args.lr, intermediate=args.intermediate,
                tower_init=args.tower_init,
                train_s=round(t), s_per_step=round(t / args.steps, 3),
                train_top1_last20=round(sum(x["top1"] for x in last) / len(last), 3),
                **{k: round(v, 4) for k, v in ev.items()}, windows=len(tw),
                held_windows=len(hw))
    print(json.dumps(line))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
