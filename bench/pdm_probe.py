"""What does a trained PDM use? Held-out top-1 agreement with the target (over the draft vocabulary) of one
PDM under several attention layouts, on the cached training text of ``spdkernels train-pdm``:

* ``pipe4``: the SPD staircase at n = 4 (what inference feeds);
* ``proposer_segN``: draft-then-verify, every query seeing the completed rows before its segment of N
  (``seg1`` = completed features of every earlier token, the most a drafter can know);
* ``self_only``: each row sees only its own position (no context through attention; a PDM with the
  previous-token term still gets that token's deepest anchor in its row);
* ``recent6``: the staircase restricted to the last 6 positions.

If ``proposer_seg1`` is no better than ``pipe4``, the deep features of the completed tokens add nothing over
the partial ones, i.e. the PDM does not exploit them.

    python -m spdkernels.bench.pdm_probe --pdm DIR --work WORK [--windows 12] [--seed 0]

``WORK`` is the ``--work`` folder of ``train-pdm`` (its corpus JSON and anchor-state cache); the held-out
sequences are the ones ``train-pdm`` held out for that seed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spdkernels.runtime.files import write_text_atomic


def load_net(pdm_dir: str, target):
    """A :class:`PDMNet` holding the weights of a saved PDM (fp32)."""
    import torch

    from spdkernels.runtime.spd.pdm import read_pdm
    from spdkernels.runtime.spd.train import PDMNet

    cfg, w = read_pdm(pdm_dir)
    net = PDMNet(cfg, target, w["vocab_ids"], seed=0)
    sd = {k: v.float() for k, v in w.items() if k != "vocab_ids"}
    with torch.no_grad():
        for k in range(cfg.m + 1):
            net.agg[k].copy_(sd[f"agg.{k}.weight"])
        if net.anchor_norms is not None:
            for j in range(cfg.m + 1):
                net.anchor_norms[j].copy_(sd[f"anchor_norm.{j}.weight"])
        if net.shift_w is not None:
            for k in range(cfg.m + 1):
                net.shift_w[k].copy_(sd[f"shift.{k}.weight"])
                net.shift_norms[k].copy_(sd[f"shift_norm.{k}.weight"])
        for i, L in enumerate(net.layers):
            p = f"model.layers.{i}."
            L.ln1.copy_(sd[p + "input_layernorm.weight"])
            L.ln2.copy_(sd[p + "post_attention_layernorm.weight"])
            L.w_qkv.copy_(torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
            L.w_o.copy_(sd[p + "self_attn.o_proj.weight"])
            L.w_gate_up.copy_(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
            L.w_down.copy_(sd[p + "mlp.down_proj.weight"])
        if cfg.train_head:
            net.head.copy_(sd["head.weight"])
    net.eval()
    return net


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.bench.pdm_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--pdm", required=True)
    ap.add_argument("--work", required=True, help="train-pdm's --work folder")
    ap.add_argument("--windows", type=int, default=12, help="held-out windows to score")
    ap.add_argument("--seed", type=int, default=0, help="train-pdm's --seed (selects the held-out split)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from spdkernels.runtime import LlamaModel, load_checkpoint
    from spdkernels.runtime.spd.data import corpus_families, held_out_windows, load_corpus, trained_corpus
    from spdkernels.runtime.spd.pdm import depth_types
    from spdkernels.runtime.spd.train import held_out_split, make_windows, previous_types, structural_mask

    work = Path(args.work)
    ck = load_checkpoint()
    target = LlamaModel(ck.config, ck.state_dict)
    net = load_net(args.pdm, target)
    cfg = net.cfg
    try:
        cpath = trained_corpus(work, cfg.training)
    except FileNotFoundError as e:
        raise SystemExit(f"--work: {e}") from None
    print(f"corpus: {cpath}" + ("" if cfg.training.get("corpus") == cpath.name else
                                " (the newest: the PDM does not name the text it was trained on)"))
    corpus, _ = load_corpus(cpath)
    spath = cpath.with_suffix(f".anchors-{'-'.join(map(str, cfg.anchors))}.pt")
    if not spath.exists():
        raise SystemExit(f"--work: no anchor-state cache {spath.name} for this PDM's anchors")
    states = torch.load(spath)
    held, _ = held_out_split(len(corpus), args.seed, families=corpus_families(corpus))  # train_pdm's split
    wins = held_out_windows(make_windows([states[i] for i in held], [corpus[i] for i in held], 256), args.windows,
                            args.seed)
    L = target.num_layers
    head = target.lm_head[net.vocab_ids].float()

    def score(mode, n, seg, restrict=None):
        agree = rows_n = 0
        for w in wins:
            S = w.anchors.shape[0]
            f = depth_types(cfg.anchors, L, n)
            segs = [] if mode == "pipeline" else [seg] * (S // seg) + ([S % seg] if S % seg else [])
            mask, depths = structural_mask(S, f, mode, n if mode == "pipeline" else 0, segs)
            prev = previous_types(S, f, mode, depths, n if mode == "pipeline" else 0, segs) if cfg.shift else None
            if restrict is not None:
                pos = torch.arange(mask.shape[0]) % S
                mask = mask & restrict(pos[:, None] - pos[None, :])
            rows = torch.arange(w.first_loss, S)
            rows = rows[w.next_ids[rows] >= 0]
            h = w.anchors.float()
            with torch.no_grad():
                logits = net(h, torch.arange(w.start, w.start + S), [f[d] for d in depths], mask, rows, prev)
                hl = h[rows, -1]
                t = F.linear(F.rms_norm(hl, (hl.shape[-1],), net.norm, target.config.rms_norm_eps), head)
            agree += int((logits.argmax(-1) == t.argmax(-1)).sum())
            rows_n += len(rows)
        return agree / max(rows_n, 1)

    out = dict(pipe4=score("pipeline", 4, 0), proposer_seg1=score("proposer", 4, 1),
               proposer_seg4=score("proposer", 4, 4), self_only=score("pipeline", 4, 0, lambda d: d == 0),
               recent6=score("pipeline", 4, 0, lambda d: d < 6))
    print(json.dumps(dict(pdm=args.pdm, windows=len(wins), top1=out), indent=1))
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(pdm=args.pdm, windows=len(wins), top1=out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
