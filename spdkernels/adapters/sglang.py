"""sgl-kernel's tree verification ops (``sgl_kernel.verify_tree_greedy`` and
``sgl_kernel.tree_speculative_sampling_target_only``), served by the spdkernels ops.

**sgl-kernel's layout.** ``bs`` requests, each a token tree of ``num_draft_tokens`` (``n``) nodes, node 0
being the root (the last verified token): ``candidates [bs, n]`` int64 (node tokens),
``retrive_index [bs, n]`` int64 (each node's flat index into ``predicts``, normally ``b * n + i``),
``retrive_next_token`` / ``retrive_next_sibling [bs, n]`` int64 (first child / next sibling, -1 for none).
Outputs, written in place: ``predicts [bs * n]`` int32 (at the flat index of every node on the accepted
path, the token that follows it), ``accept_index [bs, num_spec_step]`` int32 (the flat indices of the root and
the accepted nodes; later entries untouched), ``accept_token_num [bs]`` int32 (accepted drafts, the root not
counted). Some releases spell the tree arguments ``retrieve_*``: both spellings are accepted as keywords.

With nodes numbered in topological order (every child after its parent, siblings in list order), the
per-node rows ``[bs * n, V]`` are exactly the spdkernels row layout (``[N + R, V]`` with ``k_r = n - 1``), and
the linked lists become ``parents`` (converted on the host: one host sync per call). Nodes unreachable from
the root (a request with fewer drafts than ``n``) are dropped, making the batch ragged.

**What differs** (``docs/adapters.md``): trees whose numbering is not topological, whose siblings are not
listed in increasing index order, or that are deeper than ``num_spec_step - 1`` are refused with a ValueError
naming the argument (sgl-kernel walks the lists as given and silently stops at that depth).
``verify_tree_greedy`` also takes ``target_logits`` instead of ``target_predict`` (our extension: the argmax
is then fused into the walk). See each function for its sampling rule.

**Two paths, one behaviour.** On CPU with the ``cpp`` backend, each function is one call of a C++ kernel that walks
sgl-kernel's lists in its layout and writes the outputs in place (``torch.ops.spdkernels._cpu_sgl_*``,
``csrc/adapters.cpp``): no conversion, no host sync, no chain of small tensor operations. Everywhere else (GPUs,
the ``torch`` and ``triton`` backends, non-contiguous outputs) the generic path converts the trees into the
spdkernels layout and calls :func:`spdkernels.verify_greedy` / :func:`spdkernels.rejection_sample`. Both make the
same checks with the same messages and give the same outputs (tests/test_adapters_sglang.py compares them).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

import spdkernels
from spdkernels import _config

from ..ops.rejection_sample import PROBS_SUM_TOLERANCE
from ._common import (
    REJECT_COIN,
    cached_arange,
    check,
    check_shape,
    fail,
    fused_op,
    gather_rows,
    open_unit_fp32,
    workspace,
)

__all__ = ["tree_speculative_sampling_target_only", "verify_tree_greedy"]

I64 = (torch.int64,)
I32 = (torch.int32,)


def _pick(name: str, a, b):
    """``retrive_*`` (sgl-kernel's spelling) or ``retrieve_*`` (some releases)."""
    if a is not None and b is not None:
        fail(name, f"given twice (as {name} and as {name.replace('retrive', 'retrieve')})")
    t = a if a is not None else b
    if t is None:
        fail(name, "missing")
    return t


def _check_tree_args(predicts, accept_index, accept_token_num, candidates, ri, nt, ns):
    check("candidates", candidates, 2, I64, contiguous=True)
    dev = candidates.device
    bs, n = candidates.shape
    for name, t in (("retrive_index", ri), ("retrive_next_token", nt), ("retrive_next_sibling", ns)):
        check(name, t, 2, I64, dev, contiguous=True)
        check_shape(name, t, (bs, n), "[bs, num_draft_tokens]")
    check("predicts", predicts, 1, I32, dev)
    check("accept_index", accept_index, 2, I32, dev)
    if accept_index.shape[0] != bs or accept_index.shape[1] < 1:
        fail("accept_index", f"expected shape [bs, num_spec_step] = [{bs}, >= 1], got {list(accept_index.shape)}")
    check("accept_token_num", accept_token_num, 1, I32, dev)
    check_shape("accept_token_num", accept_token_num, (bs,), "[bs]")
    if n < 1:
        fail("candidates", "expected num_draft_tokens >= 1 (node 0 is the root)")
    return bs, n, accept_index.shape[1]


def _check_candidates(candidates: torch.Tensor, tb, V: int) -> None:
    """Every token of a node reachable from the root lies in the vocabulary (its row is read at that token)."""
    bad = (tb.par_q[:, 1:] >= 0) & ((candidates[:, 1:] < 0) | (candidates[:, 1:] >= V))
    if bool(bad.any()):
        b, c = (int(x) for x in bad.nonzero()[0])
        fail("candidates", f"request {b}: token {int(candidates[b, c + 1])} of node {c + 1} is outside the "
             f"vocabulary [0, {V})")


def _fused(op: str, name: str, candidates, *outputs):
    """The C++ op in sgl-kernel's layout when it serves this call (else None): CPU tensors, the ``cpp`` backend
    chosen for ``op``, outputs contiguous (they are written in place). The op makes every check of the generic path
    itself, with the same messages (dtypes, shapes, contiguity, devices, the trees; an argument of the wrong type makes
    it raise a TypeError or RuntimeError, and the generic path's checks then name it), so this path checks little
    in Python."""
    if not (_FUSED and isinstance(candidates, torch.Tensor) and candidates.is_cpu):
        return None
    for t in outputs:
        if not (isinstance(t, torch.Tensor) and t.is_contiguous()):
            return None
    return fused_op(op, name)


# the generic path everywhere when False (tests and the benchmark's baseline switch it)
_FUSED = True


def _check_flat_index(ri: torch.Tensor, predicts: torch.Tensor, bs: int, n: int) -> None:
    """Every ``retrive_index`` value indexes ``predicts`` and the per-node rows (the fused kernel checks the same)."""
    lim = min(bs * n, predicts.shape[0])
    if ri.numel():
        lo, hi = (int(x) for x in ri.aminmax())
        if lo < 0 or hi >= lim:
            fail("retrive_index", f"values must lie in [0, {lim}) (bs * num_draft_tokens, and the length of "
                 f"predicts), got {lo if lo < 0 else hi}")


def tree_parents(retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor) -> torch.Tensor:
    """sgl-kernel's linked lists ``[bs, n]`` -> the parent of every node as a query index ``[bs, n]``
    (root: -1; a node unreachable from the root: -2). Vectorised: each pass follows one first-child or
    next-sibling link from every node reached so far (at most 2n passes)."""
    bs, n = retrive_next_token.shape
    dev = retrive_next_token.device
    nt, ns = retrive_next_token.long(), retrive_next_sibling.long()
    par = torch.full((bs, n), -2, dtype=torch.int64, device=dev)
    par[:, 0] = -1
    not_root = torch.ones(bs, n, dtype=torch.bool, device=dev)
    not_root[:, 0] = False
    # grow from the root only (links of unreachable nodes are stale and must not make their targets reachable):
    # each pass follows the first-child link of every reached node and the next-sibling link of every reached
    # node but the root; a node keeps the first parent that reaches it
    for _ in range(2 * n):
        reached = par != -2
        b, v = (reached & (nt > 0) & (nt < n)).nonzero(as_tuple=True)
        c = nt[b, v]
        fresh = par[b, c] == -2
        par[b[fresh], c[fresh]] = v[fresh]
        b2, c2 = (reached & not_root & (ns > 0) & (ns < n)).nonzero(as_tuple=True)
        s = ns[b2, c2]
        fresh2 = par[b2, s] == -2
        par[b2[fresh2], s[fresh2]] = par[b2[fresh2], c2[fresh2]]
        if not (bool(fresh.any()) or bool(fresh2.any())):
            break
    return par


class _Batch:
    """The draft batch of our ops for an sgl-kernel batch: ``drafts [N]``, ``cu`` int32 ``[bs + 1]``,
    ``parents`` int32 ``[N]``, the query-level parents ``par_q [bs, n]`` of sgl-kernel's numbering, and, when
    some nodes are unreachable from the root (a request with fewer drafts than ``n``), the kept nodes
    (``keep [bs, n]``, ``rows`` to gather, ``to_orig [bs, n]``: our query index -> sgl-kernel's)."""

    def __init__(self, candidates, nt, ns, num_spec: int):
        bs, n = candidates.shape
        dev = candidates.device
        self.bs, self.n = bs, n
        # host lists: a tree of a few dozen nodes converts faster in Python than in a chain of tensor ops
        nt_l, ns_l = nt.tolist(), ns.tolist()
        pars, all_reach = [], True
        for b in range(bs):
            par, depth, nxt, sib = [-2] * n, [0] * n, nt_l[b], ns_l[b]
            par[0] = -1
            for v in range(n):
                if par[v] == -2:
                    continue  # unreachable: sgl-kernel never reads its lists
                c = nxt[v]
                while c != -1:
                    if not 0 < c < n or par[c] != -2:
                        fail("retrive_next_token", f"request {b}: malformed linked lists at node {c}")
                    if c <= v:
                        fail("retrive_next_token", f"request {b}: node {c} is a child of node {v}: nodes must be "
                             "numbered in topological order (every child after its parent)")
                    par[c], depth[c] = v, depth[v] + 1
                    if depth[c] > num_spec - 1:
                        fail("accept_index", f"request {b}: the tree is deeper than num_spec_step - 1 = "
                             f"{num_spec - 1} drafts (sgl-kernel would stop there)")
                    s = sib[c]
                    if s != -1 and s <= c:
                        fail("retrive_next_sibling", f"request {b}: siblings must be listed in increasing node "
                             f"index order (node {c} is followed by {s})")
                    c = s
            all_reach = all_reach and -2 not in par
            pars.append(par)
        self.par_q = torch.tensor(pars, dtype=torch.long, device=dev).reshape(bs, n)  # (bs = 0: [0, n], not [0])
        self.rows = self.to_orig = self.nonroot = None
        if all_reach:
            parents = [p - 1 for par in pars for p in par[1:]]
            cu = torch.arange(bs + 1, dtype=torch.int32, device=dev) * (n - 1)
            drafts = candidates[:, 1:].reshape(-1)
        else:  # drop the unreachable nodes: ragged requests, rows gathered
            parents, rows, nonroot, to_orig, cu_l = [], [], [], [], [0]
            for b, par in enumerate(pars):
                kept = [q for q in range(n) if par[q] != -2]
                newq = {q: i for i, q in enumerate(kept)}
                parents.extend(newq[par[q]] - 1 for q in kept[1:])
                rows.extend(b * n + q for q in kept)
                nonroot.extend(b * n + q for q in kept[1:])
                to_orig.append(kept + [-1] * (n - len(kept)))
                cu_l.append(cu_l[-1] + len(kept) - 1)
            cu = torch.tensor(cu_l, dtype=torch.int32, device=dev)
            self.rows = torch.tensor(rows, dtype=torch.long, device=dev)
            self.nonroot = torch.tensor(nonroot, dtype=torch.long, device=dev)
            self.to_orig = torch.tensor(to_orig, dtype=torch.long, device=dev)
            drafts = candidates.reshape(-1).index_select(0, self.nonroot)
        self.drafts, self.cu = drafts, cu
        self.parents = torch.tensor(parents, dtype=torch.int32, device=dev)

    def node_values(self, x: torch.Tensor) -> torch.Tensor:
        """Per-node values ``[bs, n]`` (sgl-kernel's numbering) -> ours ``[N]`` (non-root, kept nodes)."""
        if self.nonroot is None:
            return x[:, 1:].reshape(-1)
        return x.reshape(-1).index_select(0, self.nonroot)

    def row_values(self, x: torch.Tensor) -> torch.Tensor:
        """Per-node rows ``[bs * n, ...]`` -> ours ``[N + bs, ...]``."""
        return x if self.rows is None else gather_rows("rows", x, self.rows)

    def orig_path(self, path: torch.Tensor) -> torch.Tensor:
        """Our ``accepted_path`` (local node indices) -> sgl-kernel's query indices ``[bs, D + 1]``, root first."""
        bs = path.shape[0]
        q = torch.cat([torch.zeros(bs, 1, dtype=torch.long, device=path.device), path.long() + 1], dim=1)
        if self.to_orig is not None:
            q = torch.where(q > 0, self.to_orig.gather(1, q.clamp(min=0)), q)
        return torch.where(torch.cat([q[:, :1] >= 0, path >= 0], dim=1), q, torch.full_like(q, -1))


def _write(predicts, accept_index, accept_token_num, retrive_index, qpath, num, tokens):
    """sgl-kernel's in-place outputs from the accepted path ``qpath [bs, D + 1]`` (sgl-kernel's node indices,
    root first, -1 padded) and the token that follows each node of the path, ``tokens [bs, D + 1]``."""
    dev = num.device
    a = num.long() - 1
    valid = torch.arange(qpath.shape[1], device=dev)[None, :] <= a[:, None]
    flat = retrive_index.gather(1, qpath.clamp(min=0))
    width = min(accept_index.shape[1], qpath.shape[1])
    accept_index[:, :width] = torch.where(valid[:, :width], flat[:, :width].to(torch.int32), accept_index[:, :width])
    accept_token_num.copy_(a.to(torch.int32))
    predicts[flat[valid]] = tokens[valid].to(torch.int32)


def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: Optional[torch.Tensor] = None,
    retrive_next_token: Optional[torch.Tensor] = None,
    retrive_next_sibling: Optional[torch.Tensor] = None,
    target_predict: Optional[torch.Tensor] = None,
    *,
    retrieve_index: Optional[torch.Tensor] = None,
    retrieve_next_token: Optional[torch.Tensor] = None,
    retrieve_next_sibling: Optional[torch.Tensor] = None,
    target_logits: Optional[torch.Tensor] = None,
) -> None:
    """sgl-kernel's greedy tree verification (on CPU with the ``cpp`` backend one C++ kernel in sgl-kernel's layout;
    elsewhere through :func:`spdkernels.verify_greedy`).

    From the root, among the children of the current node (in sibling order) accept the first whose token
    equals the target's prediction at the current node, and continue from it; stop when none matches or
    after ``num_spec_step - 1`` acceptances. ``predicts`` gets, at the flat index of every node on the path,
    the accepted child's token, and at the last node its target prediction.

    Args:
        predicts: int32 ``[bs * n]`` (in place; entries off the path untouched).
        accept_index: int32 ``[bs, num_spec_step]`` (in place; entries after the path untouched).
        accept_token_num: int32 ``[bs]`` (in place).
        candidates, retrive_index, retrive_next_token, retrive_next_sibling: int64 ``[bs, n]`` (see the module
            docstring; ``retrieve_*`` keywords accepted).
        target_predict: int64 ``[bs, n]``: the target's argmax after each node, read at the flat index
            ``retrive_index``.
        target_logits: (extension, instead of ``target_predict``) fp32/bf16/fp16 ``[bs * n, V]`` or
            ``[bs, n, V]`` logits read at the same flat index; ties go to the lowest id, as ``argmax`` does.

    Raises:
        ValueError: naming the argument, for the dtypes and shapes sgl-kernel checks (int32 outputs, int64
            tree tensors, ``[bs, n]`` shapes, contiguity) and the trees described in the module docstring.
    """
    ri = _pick("retrive_index", retrive_index, retrieve_index)
    nt = _pick("retrive_next_token", retrive_next_token, retrieve_next_token)
    ns = _pick("retrive_next_sibling", retrive_next_sibling, retrieve_next_sibling)
    if target_logits is not None and _config.validation_enabled():
        _check_logits(target_logits)
    op = _fused("verify_greedy", "_cpu_sgl_verify_tree_greedy", candidates, predicts, accept_index, accept_token_num)
    if op is not None:
        try:
            return op(predicts, accept_index, accept_token_num, candidates, ri, nt, ns, target_predict, target_logits)
        except (TypeError, RuntimeError):  # an argument of the wrong type (the schema): the checks below name it
            pass
    bs, n, num_spec = _check_tree_args(predicts, accept_index, accept_token_num, candidates, ri, nt, ns)
    dev = candidates.device
    if (target_predict is None) == (target_logits is None):
        fail("target_predict", "pass exactly one of target_predict (sgl-kernel) and target_logits")
    if target_predict is not None:
        check("target_predict", target_predict, 2, I64, dev, contiguous=True)
        check_shape("target_predict", target_predict, (bs, n), "[bs, num_draft_tokens]")
    else:
        check("target_logits", target_logits, None, spdkernels._validate.FLOAT_DTYPES, dev)
        V = target_logits.shape[-1] if target_logits.dim() else 0
        if target_logits.numel() != bs * n * V or target_logits.dim() not in (2, 3) or V < 1:
            fail("target_logits", f"expected shape [bs * n, V] or [bs, n, V] with bs * n = {bs * n}, "
                 f"got {list(target_logits.shape)}")
    _check_flat_index(ri, predicts, bs, n)
    tb = _Batch(candidates, nt, ns, num_spec)
    flat_ri = ri.reshape(-1)
    if target_predict is not None:
        pred = target_predict.reshape(-1)[flat_ri].reshape(bs, n)  # prediction after each node, by node
        # the walk only compares a child's token with its parent's prediction: a two-token vocabulary
        # (0 = "matches", 1 = "differs") carries exactly that, so the op reads [N + bs, 2] logits
        parent_pred = pred.gather(1, tb.par_q.clamp(min=0))
        mapped = tb.node_values((candidates != parent_pred).to(torch.int32))
        logits = torch.zeros(tb.drafts.shape[0] + bs, 2, dtype=torch.float32, device=dev)
        logits[:, 0] = 1.0
        _, num, path = spdkernels.verify_greedy(logits, mapped, tb.cu, tb.parents, max_depth=num_spec - 1)
        qpath = tb.orig_path(path)
        tokens = pred.gather(1, qpath.clamp(min=0))
    else:
        _check_candidates(candidates, tb, V)
        rows = target_logits.reshape(bs * n, V)
        if not torch.equal(flat_ri, torch.arange(bs * n, device=dev)):
            rows = gather_rows("perm", rows, flat_ri)
        tokens, num, path = spdkernels.verify_greedy(tb.row_values(rows), tb.drafts, tb.cu, tb.parents,
                                                     max_depth=num_spec - 1)
        qpath = tb.orig_path(path)
    _write(predicts, accept_index, accept_token_num, ri, qpath, num, tokens)


def _sibling_running_sums(p_child: torch.Tensor, par_q: torch.Tensor, ns: torch.Tensor) -> torch.Tensor:
    """For every node, the fp32 running sum of its parent-row target probabilities over its earlier siblings
    and itself, accumulated one sibling at a time as sgl-kernel does (``[bs, n]``; root: 0)."""
    bs, n = p_child.shape
    dev = p_child.device
    acc = torch.zeros_like(p_child)
    first = torch.zeros((bs, n), dtype=torch.bool, device=dev)
    # first children: those not named as anybody's next sibling
    is_next = torch.zeros((bs, n), dtype=torch.bool, device=dev)
    # links of reachable nodes only (sgl-kernel never reads an unreachable node's, which may hold anything)
    b, c = ((ns >= 0) & (ns < n) & (par_q >= 0)).nonzero(as_tuple=True)
    is_next[b, ns[b, c]] = True
    first[:, 1:] = ~is_next[:, 1:] & (par_q[:, 1:] >= 0)
    acc = torch.where(first, p_child, acc)
    b, c = first.nonzero(as_tuple=True)
    for _ in range(n):
        s = ns[b, c]
        m = s > 0
        if not bool(m.any()):
            break
        b, c, s = b[m], c[m], s[m]
        acc[b, s] = acc[b, c] + p_child[b, s]  # fp32, one addition at a time
        c = s
    return acc


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: Optional[torch.Tensor] = None,
    retrive_next_token: Optional[torch.Tensor] = None,
    retrive_next_sibling: Optional[torch.Tensor] = None,
    uniform_samples: Optional[torch.Tensor] = None,
    uniform_samples_for_final_sampling: Optional[torch.Tensor] = None,
    target_probs: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    deterministic: bool = True,
    *,
    retrieve_index: Optional[torch.Tensor] = None,
    retrieve_next_token: Optional[torch.Tensor] = None,
    retrieve_next_sibling: Optional[torch.Tensor] = None,
) -> None:
    """sgl-kernel's target-only tree speculative sampling (on CPU with the ``cpp`` backend one C++ kernel in
    sgl-kernel's layout; elsewhere through :func:`spdkernels.rejection_sample`).

    sgl-kernel's rule (reproduced): at the current node ``v`` with coin ``c = uniform_samples[b, v]`` (the
    root's coin first), walk ``v``'s children in sibling order keeping the running sum ``S`` of their tokens'
    target probabilities in ``v``'s row; accept the first child with ``c <= S / max(threshold_acc, 1e-9)`` or
    ``p(token) >= threshold_single``, and continue from it with its own coin. With the default thresholds
    (1, 1) this is "draw one token from the target by inverse CDF over the siblings" and is lossless. When
    no child is accepted (or after ``num_spec_step - 1`` acceptances), the token after the last node is drawn
    from its target row with the rejected children's tokens removed, by inverse CDF with
    ``uniform_samples_for_final_sampling[b]`` (first id whose running sum exceeds ``coin * sum``).

    The decisions are made in sgl-kernel's fp32 arithmetic (they need only the probabilities of the drafted
    tokens) and give the accepted path; the token after the path's last node is drawn from that node's
    probability row, read as given, without the tokens of the children tried there (a coin within ~1e-7 of a CDF
    step may pick the neighbouring token). If the first child tried there holds at least 1 - 2^-24 of that row
    (possible only from fp32 rounding of ``S``), or nothing is left without the tried tokens, the token is drawn from
    the whole row. On CPU
    with the ``cpp`` backend one C++ kernel does all of it; elsewhere the decisions are tensor operations and
    :func:`spdkernels.rejection_sample` makes the draw (``target_is_probs``; one forced rejection against the
    indicator row of the tried tokens).

    Args:
        predicts, accept_index, accept_token_num: int32 outputs, in place (see the module docstring).
        candidates, retrive_index, retrive_next_token, retrive_next_sibling: int64 ``[bs, n]``.
        uniform_samples: fp32 ``[bs, n]`` coins in [0, 1), one per node (used for its children).
        uniform_samples_for_final_sampling: fp32 ``[bs]``.
        target_probs: fp32 ``[bs, n, V]``: the target distribution after each node (its local index).
        draft_probs: optional fp32 ``[bs, n, V]``, all zeros on entry as SGLang allocates it; updated in place
            as sgl-kernel does (each rejected child's token gets its target probability). Not read.
        threshold_single, threshold_acc: floats in [0, 1].
        deterministic: accepted for compatibility; no effect.

    Raises:
        ValueError: naming the argument, for sgl-kernel's checks (dtypes, ranks, shapes, contiguity,
            thresholds outside [0, 1]) and the trees described in the module docstring.
    """
    ri = _pick("retrive_index", retrive_index, retrieve_index)
    nt = _pick("retrive_next_token", retrive_next_token, retrieve_next_token)
    ns = _pick("retrive_next_sibling", retrive_next_sibling, retrieve_next_sibling)
    op = _fused("rejection_sample", "_cpu_sgl_tree_sampling_target_only", candidates, predicts, accept_index,
                accept_token_num, *(() if draft_probs is None else (draft_probs,)))
    if op is not None:
        if _config.validation_enabled() and isinstance(target_probs, torch.Tensor) and target_probs.dim() == 3:
            _check_probs(target_probs)
        try:
            return op(predicts, accept_index, accept_token_num, candidates, ri, nt, ns, uniform_samples,
                      uniform_samples_for_final_sampling, target_probs, draft_probs, float(threshold_single),
                      float(threshold_acc))
        except (TypeError, RuntimeError):  # an argument of the wrong type (the schema): the checks below name it
            pass
    bs, n, num_spec = _check_tree_args(predicts, accept_index, accept_token_num, candidates, ri, nt, ns)
    dev = candidates.device
    check("uniform_samples", uniform_samples, 2, (torch.float32,), dev, contiguous=True)
    check_shape("uniform_samples", uniform_samples, (bs, n), "[bs, num_draft_tokens]")
    check("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling, 1, (torch.float32,), dev,
          contiguous=True)
    check_shape("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling, (bs,), "[bs]")
    check("target_probs", target_probs, 3, (torch.float32,), dev, contiguous=True)
    if target_probs.shape[:2] != (bs, n):
        fail("target_probs", f"expected shape [bs, num_draft_tokens, vocab_size] = [{bs}, {n}, V], "
             f"got {list(target_probs.shape)}")
    V = target_probs.shape[2]
    if draft_probs is not None:
        check("draft_probs", draft_probs, 3, (torch.float32,), dev)
        check_shape("draft_probs", draft_probs, (bs, n, V), "[bs, num_draft_tokens, vocab_size]")
    for name, th in (("threshold_single", threshold_single), ("threshold_acc", threshold_acc)):
        if not 0.0 <= float(th) <= 1.0:
            fail(name, f"expected a value in [0, 1], got {th}")
    if _config.validation_enabled():
        _check_probs(target_probs)
    _check_flat_index(ri, predicts, bs, n)
    if bs == 0:  # an empty batch: nothing to write (as the fused op)
        return
    tb = _Batch(candidates, nt, ns, num_spec)
    _check_candidates(candidates, tb, V)

    # sgl-kernel's decisions, in its fp32 arithmetic
    pq = tb.par_q.clamp(min=0)
    b_idx = torch.arange(bs, device=dev)[:, None]
    # [bs, n]: p_parent(token of the node) (the root's and unreachable nodes' tokens, never used, clamped)
    p_child = target_probs[b_idx, pq, candidates.clamp(min=0, max=V - 1)]
    p_child[:, 0] = 0
    running = _sibling_running_sums(p_child, tb.par_q, ns)
    coin = uniform_samples.gather(1, pq)
    th_acc = torch.tensor(max(float(threshold_acc), 1e-9), dtype=torch.float32)
    th_single = torch.tensor(float(threshold_single), dtype=torch.float32)
    accept = (coin <= running / th_acc) | (p_child >= th_single)
    # The path follows from the decisions; what is left for the op is the draw of the token after the path's
    # last node: from its row with the tokens of the children tried there removed (those children are the op's
    # nodes, forced to be rejected). Only that row is converted to logits. One host sync (the decisions).
    node = torch.arange(n, device=dev)[None, :]
    chosen = torch.full((bs, n), n, dtype=torch.long, device=dev)
    chosen.scatter_reduce_(1, tb.par_q.clamp(min=0), torch.where(accept & (tb.par_q >= 0), node, n), reduce="amin")
    chosen_l, nt_l, ns_l, cand_l = chosen.tolist(), nt.tolist(), ns.tolist(), candidates.tolist()
    tried_n, leaves_at, finals, leaf_tokens, leaf_req, qpaths, toks = [], [], [], [], [], [], []
    for b in range(bs):
        path = [0]
        while len(path) < num_spec and chosen_l[b][path[-1]] < n:
            path.append(chosen_l[b][path[-1]])
        tried = []
        if len(path) < num_spec:
            c = nt_l[b][path[-1]]
            while c != -1:
                tried.append(cand_l[b][c])
                c = ns_l[b][c]
        tried_n.append(len(tried))
        leaves_at.append(len(path) - 1)
        leaf_tokens.extend(tried)
        leaf_req.extend([b] * len(tried))
        finals.append(b * n + path[-1])
        qpaths.append(path + [-1] * (num_spec - len(path)))
        toks.append([cand_l[b][v] for v in path[1:]] + [-1] * (num_spec - len(path) + 1))
    # The op's batch: one node per request, read as probability rows in place of a log: its row (the last path
    # node's row, gathered) and, after it, the same row again. With children tried there the node is the first of
    # them, its draft row the indicator of all of them and its coin REJECT_COIN: rejected, the residual is the row
    # without those tokens. Without, its draft row is zero: accepted or not, the token drawn last is a sample of
    # that row. Either way the draw is the request's last emitted token, with its final coin.
    first_tried = [cand_l[b][nt_l[b][qpaths[b][leaves_at[b]]]] if tried_n[b] else 0 for b in range(bs)]
    q = workspace("q", (bs, V), torch.float32, dev).zero_()
    if leaf_tokens:
        q[torch.tensor(leaf_req, dtype=torch.long, device=dev), torch.tensor(leaf_tokens, dtype=torch.long,
                                                                             device=dev)] = 1.0
    rows = gather_rows("rows", target_probs.reshape(bs * n, V),
                       torch.tensor(finals, dtype=torch.long, device=dev).repeat_interleave(2))
    coins = torch.empty(2 * bs, dtype=torch.float32, device=dev)
    coins[:bs] = REJECT_COIN
    coins[bs:] = uniform_samples_for_final_sampling
    open_unit_fp32(coins)
    o, num_op, _ = spdkernels.rejection_sample(
        rows, torch.tensor(first_tried, dtype=torch.int64, device=dev), cached_arange(bs + 1, dev), draft_probs=q,
        uniforms=coins, max_depth=1, target_is_probs=True)
    sampled = o.gather(1, num_op.long()[:, None] - 1)
    qpath = torch.tensor(qpaths, dtype=torch.long, device=dev)
    a = (qpath[:, 1:] >= 0).sum(1)
    num = (a + 1).to(torch.int32)
    tokens = torch.tensor(toks, dtype=torch.int32, device=dev)
    tokens.scatter_(1, a[:, None], sampled[:, :1])
    _write(predicts, accept_index, accept_token_num, ri, qpath, num, tokens)

    if draft_probs is not None and n > 1:  # sgl-kernel's side effect: rejected children's target probability
        _mark_rejected(draft_probs, target_probs, candidates, tb.par_q, qpath, num, num_spec)


def _check_logits(target_logits) -> None:
    """(validation on) no NaN in the logits (as spdkernels.verify_greedy checks)."""
    if isinstance(target_logits, torch.Tensor) and target_logits.is_floating_point() and target_logits.numel():
        if bool(torch.isnan(target_logits).any()):
            fail("target_logits", "contains NaN")


def _check_probs(target_probs: torch.Tensor) -> None:
    """(validation on) finite, non-negative rows that sum to 1: sgl-kernel's rows are used as given."""
    if not target_probs.numel():
        return
    if not bool(torch.isfinite(target_probs).all()):
        fail("target_probs", "contains NaN or inf")
    if bool((target_probs < 0).any()):
        fail("target_probs", "contains negative probabilities")
    sums = target_probs.sum(dim=-1, dtype=torch.float64).reshape(-1)
    off = (sums - 1).abs() > PROBS_SUM_TOLERANCE
    if bool(off.any()):
        i = int(off.nonzero()[0, 0])
        n = target_probs.shape[1]
        fail("target_probs", f"row [{i // n}, {i % n}] sums to {float(sums[i]):.6g}: probability rows must sum to 1 "
             f"(within {PROBS_SUM_TOLERANCE})")


def _mark_rejected(draft_probs, target_probs, candidates, par_q, qpath, num, num_spec) -> Tuple[()]:
    """``draft_probs[b, v, token(c)] = target_probs[b, v, token(c)]`` for every child ``c`` that sgl-kernel
    tried and rejected: the children of path nodes listed before the accepted one, and all the children of
    the last node unless the walk stopped at ``num_spec_step - 1`` acceptances."""
    bs, n = candidates.shape
    dev = candidates.device
    a = num.long() - 1
    D = qpath.shape[1]
    depth_of = torch.full((bs, n), -1, dtype=torch.long, device=dev)  # depth of each path node, -1 off path
    valid = torch.arange(D, device=dev)[None, :] <= a[:, None]
    bb = torch.arange(bs, device=dev)[:, None].expand(bs, D)
    depth_of[bb[valid], qpath[valid]] = torch.arange(D, device=dev)[None, :].expand(bs, D)[valid]
    par = par_q[:, 1:]
    pd = depth_of.gather(1, par.clamp(min=0))  # depth of each node's parent on the path
    pd = torch.where(par >= 0, pd, torch.full_like(pd, -1))
    node = torch.arange(1, n, device=dev)[None, :]
    nxt = qpath.gather(1, (pd + 1).clamp(min=0, max=D - 1))  # the accepted child at that depth
    before_accepted = (pd >= 0) & (pd < a[:, None]) & (node < nxt)
    at_last = (pd >= 0) & (pd == a[:, None]) & (a[:, None] < num_spec - 1)
    b, c = (before_accepted | at_last).nonzero(as_tuple=True)
    v, t = par[b, c], candidates[b, c + 1]
    draft_probs[b, v, t] = target_probs[b, v, t]
    return ()
