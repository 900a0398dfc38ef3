"""Benchmark of rejection_sample: chains and trees, with and without top-k/top-p.

Bytes moved: the logit rows the walk visits (root plus each accepted node, taken from the reference
output, since the walk reads nothing else), draft probabilities of the visited siblings when given,
and the small index tensors. Baseline: the torch reference, i.e. softmax to fp32 probabilities,
sort-based top-k/top-p and the rejection loop, row by row.
"""

from __future__ import annotations

import torch

import spdkernels
from spdkernels.testing import random_draft_batch

from .registry import OpBench, register
from .verify_greedy import DT
from .verify_greedy import check as check_exact


def case(R, k, V, dtype="fp32", tree=False, top_k=0, top_p=1.0, temperature=1.0):
    return {"R": R, "k": k, "V": V, "dtype": dtype, "tree": tree, "top_k": top_k, "top_p": top_p,
            "temperature": temperature}


SHAPE_SETS = {
    "default": [case(16, 4, 32000), case(16, 4, 32000, top_k=50, top_p=0.9), case(16, 4, 32000, top_p=0.9),
                case(16, 8, 32000, tree=True), case(16, 4, 32000, "bf16"), case(64, 4, 128256, "bf16"),
                case(64, 4, 128256, "bf16", top_p=0.9)],
    "tiny": [case(2, 3, 1000), case(3, 4, 1000, "bf16", tree=True, top_k=20, top_p=0.8)],
}


def label(c):
    filt = "".join([f"-topk{c['top_k']}" if c["top_k"] else "", f"-topp{c['top_p']}" if c["top_p"] < 1 else ""])
    return f"R{c['R']}-k{c['k']}-V{c['V']}-{c['dtype']}-{'tree' if c['tree'] else 'chain'}{filt}"


def make_inputs(c, device):
    gen = torch.Generator().manual_seed(0)
    b = random_draft_batch([c["k"]] * c["R"], c["V"], tree=c["tree"], dtype=DT[c["dtype"]], token_dtype=torch.int32,
                           gen=gen, device=device, match_prob=0.8)
    R = c["R"]
    kw = dict(parents=b.parents, max_depth=b.max_depth,
              temperature=torch.full((R,), c["temperature"], device=device),
              top_k=torch.full((R,), c["top_k"], dtype=torch.int32, device=device) if c["top_k"] else None,
              top_p=torch.full((R,), c["top_p"], device=device) if c["top_p"] < 1 else None,
              seed=torch.arange(R, dtype=torch.int64, device=device), offset=torch.zeros(R, dtype=torch.int64,
                                                                                          device=device))
    return (b.target_logits, b.draft_token_ids, b.cu_num_draft), kw


def run(inputs):
    args, kw = inputs
    return spdkernels.rejection_sample(*args, **kw)


def bytes_moved(c, num_emitted=None):
    R, k, V = c["R"], c["k"], c["V"]
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    rows = int(num_emitted.sum()) if num_emitted is not None else R * (k + 1)
    return rows * V * elt + R * k * 4 * (3 if c["tree"] else 2) + R * (k + 1) * 4 * 2 + R * 16


register(OpBench("rejection_sample", SHAPE_SETS, make_inputs, run, bytes_moved, check_exact, label,
                 bytes_from_ref=lambda c, ref: bytes_moved(c, ref[1])))
