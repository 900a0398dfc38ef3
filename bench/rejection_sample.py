"""Benchmark of rejection_sample: chains and trees, with and without top-k/top-p.

Logits are N(0, 9) noise, so the target's top token has p ~ 0.07 at V = 32000 and a draft is rarely accepted
(~1.1 rows read per request). The "-peak0.8" cases raise each row's top logit until that token has p = 0.8,
as a trained target/draft pair would (~64% of drafts accepted, ~2.9 rows read per request at k = 4).

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


def case(R, k, V, dtype="fp32", tree=False, top_k=0, top_p=1.0, temperature=1.0, peak=None, layout=None):
    """``layout``: None (logit rows, N + R), "probs" (the same rows as probabilities, target_is_probs), "bonus"
    (vLLM's N rows with given bonus tokens) or "probs-bonus"."""
    return {"R": R, "k": k, "V": V, "dtype": dtype, "tree": tree, "top_k": top_k, "top_p": top_p,
            "temperature": temperature, "peak": peak, "layout": layout}


SHAPE_SETS = {
    "default": [case(16, 4, 32000), case(16, 4, 32000, top_k=50, top_p=0.9), case(16, 4, 32000, top_p=0.9),
                case(16, 8, 32000, tree=True), case(16, 4, 32000, "bf16"), case(64, 4, 128256, "bf16"),
                case(64, 4, 128256, "bf16", top_p=0.9), case(16, 4, 32000, peak=0.8),
                case(64, 4, 128256, "bf16", peak=0.8)],
    "tiny": [case(2, 3, 1000), case(3, 4, 1000, "bf16", tree=True, top_k=20, top_p=0.8),
             case(3, 3, 1000, layout="probs-bonus")],
    # the serving stacks' layouts side by side with the logits layout, on a trained-like target (p = 0.8 on the
    # top token): probability rows read as given, N rows with given bonus tokens
    "layouts": [case(16, 4, 32000, peak=0.8, layout=lay) for lay in (None, "probs", "bonus", "probs-bonus")]
    + [case(64, 4, 128256, "bf16", peak=0.8, layout=lay) for lay in (None, "probs", "bonus", "probs-bonus")],
}


def label(c):
    filt = "".join([f"-topk{c['top_k']}" if c["top_k"] else "", f"-topp{c['top_p']}" if c["top_p"] < 1 else "",
                    f"-peak{c['peak']}" if c.get("peak") else ""])
    lay = f"-{c['layout']}" if c.get("layout") else ""
    return f"R{c['R']}-k{c['k']}-V{c['V']}-{c['dtype']}-{'tree' if c['tree'] else 'chain'}{filt}{lay}"


def make_inputs(c, device):
    gen = torch.Generator().manual_seed(0)
    b = random_draft_batch([c["k"]] * c["R"], c["V"], tree=c["tree"], dtype=DT[c["dtype"]], token_dtype=torch.int32,
                           gen=gen, device=device, match_prob=0.8)
    if c.get("peak"):
        b.target_logits = peaked(b.target_logits, c["peak"])
    R = c["R"]
    kw = dict(parents=b.parents, max_depth=b.max_depth,
              temperature=torch.full((R,), c["temperature"], device=device),
              top_k=torch.full((R,), c["top_k"], dtype=torch.int32, device=device) if c["top_k"] else None,
              top_p=torch.full((R,), c["top_p"], device=device) if c["top_p"] < 1 else None,
              seed=torch.arange(R, dtype=torch.int64, device=device), offset=torch.zeros(R, dtype=torch.int64,
                                                                                          device=device))
    rows = b.target_logits
    lay = c.get("layout") or ""
    if "bonus" in lay:  # chains: drop the row after each request's last draft, bonus tokens given instead
        keep = torch.ones(rows.shape[0], dtype=torch.bool, device=device)
        keep[torch.arange(1, R + 1, device=device) * (c["k"] + 1) - 1] = False
        rows = rows[keep]
        kw["bonus_token_ids"] = torch.randint(0, c["V"], (R,), generator=gen).to(device)
    if "probs" in lay:
        rows = torch.softmax(rows.float(), -1).to(rows.dtype)
        kw["target_is_probs"] = True
    return (rows, b.draft_token_ids, b.cu_num_draft), kw


def peaked(logits, p_top):
    """Each row's top logit raised so that the top token has probability p_top at T = 1 (the draft tokens,
    argmaxes of their parents' rows or random tokens, are unchanged)."""
    x = logits.float()
    top = x.argmax(-1, keepdim=True)
    rest = x.scatter(-1, top, float("-inf"))
    raised = torch.logsumexp(rest, -1, keepdim=True) + torch.log(torch.tensor(p_top / (1 - p_top)))
    return x.scatter(-1, top, raised).to(logits.dtype)


def run(inputs):
    args, kw = inputs
    return spdkernels.rejection_sample(*args, **kw)


def op_args(inputs):
    """The op's 14 positional arguments (schema order) for this module's inputs."""
    (logits, ids, cu), kw = inputs
    return (logits, ids, cu, *[kw.get(n) for n in ("parents", "draft_probs", "temperature", "top_k", "top_p",
                                                   "uniforms", "seed", "offset")], kw["max_depth"],
            kw.get("bonus_token_ids"), kw.get("target_is_probs", False))


def run_torch_op(inputs):
    """The torch op called directly (``torch.ops.spdkernels.rejection_sample``): on CPU the C++ kernel through the
    dispatcher, without the wrapper's policy; next to the cpp row it shows what the Python wrapper costs."""
    return torch.ops.spdkernels.rejection_sample.default(*op_args(inputs))


def cpp_kernel_here(name, device):
    import spdkernels

    return device == "cpu" and "cpp" in spdkernels.available_backends(device, op="rejection_sample")


def bytes_moved(c, num_emitted=None):
    """The rows a walk must read: with logits, every visited row in full (root and each accepted node's); with
    probability rows (read as given), one cache line of each accepted row and the row of the final draw in full;
    with bonus tokens, no row after a chain whose drafts were all accepted."""
    R, k, V = c["R"], c["k"], c["V"]
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    lay = c.get("layout") or ""
    visited = int(num_emitted.sum()) if num_emitted is not None else R * (k + 1)
    bonus_hits = int((num_emitted == k + 1).sum()) if num_emitted is not None and "bonus" in lay else 0
    if "probs" in lay:
        rows = (R - bonus_hits) * V * elt + (visited - R) * 64
    else:
        rows = (visited - bonus_hits) * V * elt
    return rows + R * k * 4 * (3 if c["tree"] else 2) + R * (k + 1) * 4 * 2 + R * 16


def nki_bytes(c):
    """(bytes, None) the NKI kernel (nki_kernels/rejection_sample.py) moves between HBM and SBUF, for a walk that
    accepts no draft (the least it does): each slot row read twice for its statistics (max, then kept mass),
    plus 1 + 32 reads per threshold searched (top-k, top-p: each pass streams the row again), the root row once
    more into the fp32 scratch row and that row's writes, per draft node one rejection (the scratch row and the
    draft row read twice, the scratch row written once; the point mass costs no draft row), the final sample
    (the scratch row read twice), the index and coin tables and the outputs; or (0, why). Each accepted node
    adds one read of its row and one scratch row write, more rejections add their passes."""
    from spdkernels.nki_kernels._launch import MAX_FLAT_INDEX

    R, k, V = c["R"], c["k"], c["V"]
    if c.get("layout"):
        return 0, "not modelled for probability rows / bonus tokens"
    if R * k * V > MAX_FLAT_INDEX:
        return 0, "N * V over 2**31 (int32 element indices)"
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    filters = (1 if 0 < c["top_k"] < V else 0) + (1 if c["top_p"] < 1 else 0)
    stats = R * (k + 1) * V * elt * (2 + 33 * filters + (1 if c["top_p"] < 1 else 0))
    root = R * V * (elt + 4)
    q_row = 4 if c.get("draft_probs") else 0
    reject = R * min(k, 1) * V * (3 * 4 + 2 * q_row)  # chains test one child before stopping
    final = 2 * R * V * 4
    tables = R * (k + 1) * 8 + 4 * R * k * 4 + 3 * R * 4
    writes = 2 * R * (k + 2) * 4 + 2 * R * 4
    return stats + root + reject + final + tables + writes, None


def triton_bytes(c, num_emitted=None):
    """Bytes the Triton kernels (triton_kernels/rejection_sample.py) read and write, at least: kernel 1 streams every
    logit row of the batch (N + R rows, not only those a walk visits) once for its max and mass, and per filter
    (top-k, top-p) at least one threshold pass and one kept-mass pass; the final draw reads the row it samples from
    once more (every tile's mass; then one tile again, not counted), and for draft_probs the walk makes one rejection
    pass per request (logit row, q row, scratch row written)."""
    R, k, V = c["R"], c["k"], c["V"]
    elt = torch.finfo(DT[c["dtype"]]).bits // 8
    filters = (1 if 0 < c["top_k"] < V else 0) + (1 if c["top_p"] < 1 else 0)
    stats = R * (k + 1) * V * elt * (1 + 2 * filters) + R * (k + 1) * 20  # + m, tau, mass, argmax per row
    if "probs" in (c.get("layout") or ""):  # kernel 1 reads no sampled probability row; the walk sums the last one
        stats = R * (k + 1) * 20 + R * V * elt
    final = R * V * elt
    q = R * V * (elt + 4 + 4) if c.get("draft_probs") else 0
    visited = int(num_emitted.sum()) if num_emitted is not None else R * (k + 1)
    tables = R * k * 4 * (3 if c["tree"] else 2) + visited * 20 + R * (k + 1) * 4 * 2 + R * 16
    return stats + final + q + tables


def backend_bytes(c, ref, backend):
    return triton_bytes(c, ref[1]) if backend == "triton" else None


register(OpBench("rejection_sample", SHAPE_SETS, make_inputs, run, bytes_moved, check_exact, label,
                 baselines={"cpp-torch-op": run_torch_op},
                 baseline_available=cpp_kernel_here,
                 bytes_from_ref=lambda c, ref: bytes_moved(c, ref[1]), bytes_for_backend=backend_bytes))
