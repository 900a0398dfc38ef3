"""Benchmark of verify_greedy: shape sets, inputs, bytes, output check."""

from __future__ import annotations

import torch

import spdkernels
from spdkernels.testing import random_draft_batch

from .registry import OpBench, register

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def case(R, k, V, dtype="fp32", tree=False):
    return {"R": R, "k": k, "V": V, "dtype": dtype, "tree": tree}


SHAPE_SETS = {
    # the acceptance shapes of the foundation issue plus a batch-1 and a tree case
    "default": [case(16, 4, 32000, "fp32"), case(16, 4, 32000, "bf16"), case(1, 4, 32000, "fp32"),
                case(16, 8, 32000, "fp32", tree=True), case(64, 4, 128256, "bf16")],
    # time against size: vocabulary x batch
    "sweep": [case(R, 4, V, "bf16") for V in (4096, 32000, 128256) for R in (1, 4, 16, 64)],
    "tiny": [case(2, 3, 1000, "fp32"), case(3, 4, 1000, "bf16", tree=True)],
}


def label(c):
    return f"R{c['R']}-k{c['k']}-V{c['V']}-{c['dtype']}-{'tree' if c['tree'] else 'chain'}"


def make_inputs(c, device):
    gen = torch.Generator().manual_seed(0)
    b = random_draft_batch([c["k"]] * c["R"], c["V"], tree=c["tree"], dtype=DT[c["dtype"]],
                           token_dtype=torch.int32, gen=gen, device=device)
    return b.args()


def run(args):
    return spdkernels.verify_greedy(*args[:4], max_depth=args[4])


def bytes_moved(c):
    R, k, V = c["R"], c["k"], c["V"]
    N = R * k
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    reads = (N + R) * V * elt + N * 4 + (R + 1) * 4 + (N * 4 if c["tree"] else 0)
    writes = R * (k + 1) * 4 + R * 4 + R * k * 4
    return reads + writes


def nki_bytes(c):
    """(bytes, None) the NKI kernel moves between HBM and SBUF (nki_kernels/verify_greedy.py): every target
    row once, its index tables (slot rows, tokens, parents), the three outputs; or (0, why) if it cannot run."""
    R, k, V = c["R"], c["k"], c["V"]
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    reads = R * (k + 1) * V * elt + R * (k + 1) * 4 + 2 * R * k * 4
    writes = 2 * R * (k + 2) * 4 + R * 4
    return reads + writes, None


def check(out, ref):
    for name, a, b in zip(("output_token_ids", "num_emitted", "accepted_path"), out, ref):
        if a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            return f"{name} differs"
    return ""


register(OpBench("verify_greedy", SHAPE_SETS, make_inputs, run, bytes_moved, check, label))
