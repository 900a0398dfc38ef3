"""SGLang adapter: sgl-kernel's verify_tree_greedy and tree_speculative_sampling_target_only re-expressed here as
loops over the linked lists, compared exactly with the adapter (in-place outputs included) on every backend and on
both of the adapter's paths (the C++ kernel in sgl-kernel's layout, "cpp", and the generic conversion to the
spdkernels ops, "cpp-generic" and the other backends); known answers; a distribution test with planted wrong
variants; the layouts the adapter refuses, with the same message on both paths."""

import numpy as np
import pytest
import torch
from conftest import adapter_path, adapter_paths, adapter_refusal_path, backends_here, path_device, use_backend
from scipy.stats import chisquare

import spdkernels
from spdkernels import tree
from spdkernels.adapters import sglang as asg
from spdkernels.testing import depths, random_parents

BACKENDS = backends_here()
PATHS = adapter_paths()
I32, I64 = torch.int32, torch.int64


def on(path, monkeypatch):
    return adapter_path(path, asg, monkeypatch)


dev = path_device


# ---- sgl-kernel's semantics, re-expressed ---------------------------------------------------------------------

def sgl_walk(b, n, num_spec, nt, ns, accept_child):
    """The kernel's walk for request b; accept_child(cur_node, child) decides; returns (path nodes incl. root,
    rejected (parent, child) pairs)."""
    path, rejected, cur = [0], [], 0
    for _ in range(1, num_spec):
        c = int(nt[b, cur])
        while c != -1:
            if accept_child(cur, c):
                break
            rejected.append((cur, c))
            c = int(ns[b, c])
        if c == -1:
            break
        path.append(c)
        cur = c
    return path, rejected


def sgl_greedy(cand, ri, nt, ns, target_predict, num_spec, predicts, accept_index, accept_num):
    bs, n = cand.shape
    flat = target_predict.reshape(-1)
    for b in range(bs):
        path, _ = sgl_walk(b, n, num_spec, nt, ns,
                           lambda v, c, b=b: int(cand[b, c]) == int(flat[int(ri[b, v])]))
        for d, v in enumerate(path):
            accept_index[b, d] = int(ri[b, v])
            nxt = int(cand[b, path[d + 1]]) if d + 1 < len(path) else int(flat[int(ri[b, v])])
            predicts[int(ri[b, v])] = nxt
        accept_num[b] = len(path) - 1


def sgl_target_only(cand, ri, nt, ns, coins, final, tp, num_spec, predicts, accept_index, accept_num, draft_probs,
                    th_single=1.0, th_acc=1.0):
    bs, n, V = tp.shape
    th_acc = torch.tensor(max(th_acc, 1e-9), dtype=torch.float32)
    for b in range(bs):
        state = {"acc": torch.tensor(0.0), "coin": coins[b, 0]}

        def accept(v, c, b=b, state=state):
            p = tp[b, v, int(cand[b, c])]
            state["acc"] = state["acc"] + p  # fp32, in sibling order
            ok = bool(state["coin"] <= state["acc"] / th_acc) or bool(p >= th_single)
            if ok:
                state["acc"], state["coin"] = torch.tensor(0.0), coins[b, c]
            return ok

        path, rejected = sgl_walk(b, n, num_spec, nt, ns, accept)
        for v, c in rejected:
            t = int(cand[b, c])
            draft_probs[b, v, t] = tp[b, v, t]
        last = path[-1]
        relu = torch.clamp(tp[b, last] - (draft_probs[b, last] if len(path) - 1 != num_spec - 1 else 0), min=0)
        csum = torch.cumsum(relu.double(), 0)
        hit = (csum > float(final[b]) * float(csum[-1])).nonzero()
        sampled = int(hit[0, 0]) if hit.numel() else int((relu > 0).nonzero()[-1, 0])
        for d, v in enumerate(path):
            accept_index[b, d] = int(ri[b, v])
            predicts[int(ri[b, v])] = int(cand[b, path[d + 1]]) if d + 1 < len(path) else sampled
        accept_num[b] = len(path) - 1


def make_trees(bs, n, V, seed, agree=0.7, spare_slots=1, ragged=False):
    """Random trees of n nodes (root included) in sgl-kernel's layout; the target's choice at each node is
    one of its children's tokens with probability ``agree``, so walks go deep. ``ragged``: request b uses
    only its first few nodes (request 0 none), the others unreachable, as in a padded batch."""
    g = torch.Generator().manual_seed(seed)
    nts, nss, cands, preds, deepest = [], [], [], [], 0
    for b in range(bs):
        k = (0 if b == 0 else int(torch.randint(0, n, (1,), generator=g))) if ragged else n - 1
        par = random_parents(k, g)
        deepest = max([deepest] + depths(par))
        nxt, sib = tree.to_sglang(par)
        nts.append(nxt + [-1] * (n - 1 - k))
        nss.append(sib + [-1] * (n - 1 - k))
        cands.append(torch.randint(0, V, (n,), generator=g).tolist())
        children = {}
        for i, p in enumerate(par):
            children.setdefault(p + 1, []).append(i + 1)
        pr = []
        for v in range(n):
            kids = children.get(v, [])
            if kids and float(torch.rand((), generator=g)) < agree:
                pr.append(cands[-1][kids[int(torch.randint(0, len(kids), (1,), generator=g))]])
            else:
                pr.append(int(torch.randint(0, V, (1,), generator=g)))
        preds.append(pr)
    t = lambda x: torch.tensor(x, dtype=I64)  # noqa: E731
    ri = torch.arange(bs * n, dtype=I64).reshape(bs, n)
    return t(cands), ri, t(nts), t(nss), t(preds), deepest + 1 + spare_slots


def outputs(bs, n, num_spec):
    return (torch.full((bs * n,), -7, dtype=I32), torch.full((bs, num_spec), -5, dtype=I32),
            torch.full((bs,), -3, dtype=I32))


@pytest.mark.parametrize("path", PATHS)
def test_an_empty_batch_is_a_no_op(path, monkeypatch):
    """bs = 0 (a scheduler step with no speculative request): nothing to write, on every path (the generic path
    raised a RuntimeError / IndexError, its parents table collapsing to one dimension)."""
    e = torch.zeros(0, 4, dtype=I64)
    with on(path, monkeypatch):
        asg.verify_tree_greedy(*dev(path, outputs(0, 4, 3)), *dev(path, (e, e, e, e, e)))
        asg.tree_speculative_sampling_target_only(*dev(path, outputs(0, 4, 3)), *dev(path, (
            e, e, e, e, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 4, 5), torch.zeros(0, 4, 5))))


def test_tree_parents_follows_links_from_the_root_only():
    """A stale first-child link of a node the root never reaches does not make its target reachable (node 2 came
    back as node 1's child, node 1 itself unreachable)."""
    assert asg.tree_parents(torch.tensor([[-1, 2, -1]]), torch.tensor([[-1, -1, -1]])).tolist() == [[-1, -2, -2]]
    nt, ns = torch.tensor([[1, 3, -1, -1], [2, -1, -1, 1]]), torch.tensor([[-1, 2, -1, -1], [-1, -1, -1, -1]])
    assert asg.tree_parents(nt, ns).tolist() == [[-1, 0, 0, 1], [-1, -2, 0, -2]]


# ---- greedy ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bs,n,V,ragged", [(5, 8, 30, False), (3, 1, 10, False), (2, 16, 1000, False),
                                           (6, 8, 30, True)])
def test_verify_tree_greedy_equals_sgl_kernel(path, bs, n, V, ragged, monkeypatch):
    """predicts / accept_index / accept_token_num written in place exactly as sgl-kernel writes them, untouched
    entries (off the path, after the path) left as they were; also with requests using fewer than n nodes."""
    cand, ri, nt, ns, pred, num_spec = make_trees(bs, n, V, seed=bs * n + V, ragged=ragged)
    want = outputs(bs, n, num_spec)
    sgl_greedy(cand, ri, nt, ns, pred, num_spec, *want)
    got = dev(path, outputs(bs, n, num_spec))
    with on(path, monkeypatch):
        asg.verify_tree_greedy(*got, *dev(path, (cand, ri, nt, ns, pred)))
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    assert int(want[2].max()) >= 1 or n == 1  # some walks accept


@pytest.mark.parametrize("path", PATHS)
def test_target_logits_extension_and_retrieve_spelling(path, monkeypatch):
    """target_logits (argmax fused into the walk) gives the same outputs as target_predict = argmax(logits);
    the retrieve_* spelling is accepted; a permuted retrive_index is honoured."""
    bs, n, V = 4, 8, 40
    cand, ri, nt, ns, pred, num_spec = make_trees(bs, n, V, seed=9)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(bs * n, V, generator=g)
    logits[torch.arange(bs * n), pred.reshape(-1)] = 9.0
    perm = torch.randperm(bs * n, generator=g).reshape(bs, n)  # nodes stored at shuffled flat indices
    pred_flat = torch.empty(bs * n, dtype=I64)
    pred_flat[perm.reshape(-1)] = pred.reshape(-1)
    logits_flat = torch.empty_like(logits)
    logits_flat[perm.reshape(-1)] = logits
    want = outputs(bs, n, num_spec)
    sgl_greedy(cand, perm, nt, ns, pred_flat.reshape(bs, n), num_spec, *want)
    got = dev(path, outputs(bs, n, num_spec))
    with on(path, monkeypatch):
        asg.verify_tree_greedy(*got, dev(path, cand), **dev(path, dict(
            retrieve_index=perm, retrieve_next_token=nt, retrieve_next_sibling=ns, target_logits=logits_flat)))
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def test_greedy_known_answer_chain_and_zero_draft_request():
    """Request 0: a chain 5 -> [1, 2, 3] all matching: 3 accepted, then the prediction after the last node.
    Request 1: the root has no children: nothing accepted, predicts = the root's prediction."""
    cand = torch.tensor([[5, 1, 2, 3], [6, 0, 0, 0]], dtype=I64)
    nt = torch.tensor([[1, 2, 3, -1], [-1, -1, -1, -1]], dtype=I64)
    ns = torch.full((2, 4), -1, dtype=I64)
    ri = torch.arange(8, dtype=I64).reshape(2, 4)
    pred = torch.tensor([[1, 2, 3, 9], [8, 0, 0, 0]], dtype=I64)
    p, ai, an = outputs(2, 4, 4)
    asg.verify_tree_greedy(p, ai, an, cand, ri, nt, ns, pred)
    assert an.tolist() == [3, 0]
    assert ai.tolist() == [[0, 1, 2, 3], [4, -5, -5, -5]]
    assert p.tolist() == [1, 2, 3, 9, 8, -7, -7, -7]


# ---- target-only sampling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bs,n,V,th,ragged", [(6, 8, 20, (1.0, 1.0), False), (4, 6, 300, (1.0, 1.0), False),
                                              (5, 8, 12, (0.3, 0.6), False), (7, 8, 20, (1.0, 1.0), True)],
                         ids=["V20", "V300", "thresholds", "ragged"])
def test_tree_speculative_sampling_target_only_equals_sgl_kernel(path, bs, n, V, th, ragged, monkeypatch):
    """Same coins: every in-place output, draft_probs' side effect included, equals sgl-kernel's, with the
    default thresholds, with threshold_single / threshold_acc below 1, and with requests using fewer nodes."""
    cand, ri, nt, ns, _, num_spec = make_trees(bs, n, V, seed=bs + n + V, ragged=ragged)
    g = torch.Generator().manual_seed(bs * V)
    tp = torch.softmax(torch.randn(bs, n, V, generator=g) * 2, -1)
    # give the children's tokens some mass in their parent's row, so walks go deep
    par = asg.tree_parents(nt, ns)
    for b in range(bs):
        for c in range(1, n):
            if int(par[b, c]) >= 0:
                tp[b, int(par[b, c]), int(cand[b, c])] += 0.5
    tp = tp / tp.sum(-1, keepdim=True)
    coins, final = torch.rand(bs, n, generator=g), torch.rand(bs, generator=g)
    want = outputs(bs, n, num_spec)
    dp_want = torch.zeros(bs, n, V)
    sgl_target_only(cand, ri, nt, ns, coins, final, tp, num_spec, *want, dp_want, *th)
    got = dev(path, outputs(bs, n, num_spec))
    dp_got = dev(path, torch.zeros(bs, n, V))
    with on(path, monkeypatch):
        asg.tree_speculative_sampling_target_only(*got, *dev(path, (cand, ri, nt, ns, coins, final, tp)),
                                                  dp_got, threshold_single=th[0], threshold_acc=th[1])
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    assert torch.equal(dp_got.cpu(), dp_want)
    assert int(want[2].max()) >= (1 if ragged else 2)  # some walks go deep


P0 = torch.tensor([0.30, 0.05, 0.15, 0.02, 0.18, 0.10, 0.12, 0.08])


def first_tokens(bs, seed):
    """bs copies of root -> children with tokens [0, 2, 4] (each with one child); predicts at the root."""
    g = torch.Generator().manual_seed(seed)
    n, V = 7, P0.shape[0]
    par = [-1, -1, -1, 0, 1, 2]
    nxt, sib = tree.to_sglang(par)
    cand = torch.tensor([[7, 0, 2, 4, 1, 1, 1]] * bs, dtype=I64)
    nt, ns = torch.tensor([nxt] * bs, dtype=I64), torch.tensor([sib] * bs, dtype=I64)
    ri = torch.arange(bs * n, dtype=I64).reshape(bs, n)
    tp = torch.softmax(torch.randn(n, V, generator=g), -1)
    tp[0] = P0
    tp = tp[None].repeat(bs, 1, 1).contiguous()
    p, ai, an = outputs(bs, n, 3)
    asg.tree_speculative_sampling_target_only(p, ai, an, cand, ri, nt, ns, torch.rand(bs, n, generator=g),
                                              torch.rand(bs, generator=g), tp)
    return p.reshape(bs, n)[:, 0].numpy()


def chi2_pvalue(samples, p):
    counts = np.bincount(samples, minlength=len(p)).astype(float)
    p = np.asarray(p, dtype=float)
    return chisquare(counts, counts.sum() * p / p.sum()).pvalue


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_emitted_tokens_follow_the_target(fused, monkeypatch):
    monkeypatch.setattr(asg, "_FUSED", fused)
    assert chi2_pvalue(first_tokens(4000, seed=3), P0.double().numpy()) > 1e-4


def test_distribution_test_catches_a_wrong_sibling_rule(monkeypatch):
    """Planted bug (in the generic path, whose steps are Python): compare each sibling's coin with its own
    probability instead of the running sum over the siblings tried so far. The same test must reject it."""
    monkeypatch.setattr(asg, "_FUSED", False)
    monkeypatch.setattr(asg, "_sibling_running_sums", lambda p_child, par_q, ns: p_child)
    assert chi2_pvalue(first_tokens(4000, seed=3), P0.double().numpy()) < 1e-6


def test_distribution_test_catches_a_final_draw_keeping_tried_tokens(monkeypatch):
    """Planted bug: the final draw removes only the first of the children tried at the last node (the op handed no
    draft rows, so its one node is a point mass). The same test must reject it."""
    monkeypatch.setattr(asg, "_FUSED", False)
    real = spdkernels.rejection_sample
    monkeypatch.setattr(spdkernels, "rejection_sample", lambda *a, draft_probs=None, **kw: real(*a, **kw))
    assert chi2_pvalue(first_tokens(4000, seed=3), P0.double().numpy()) < 1e-6


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the fused path is the cpp backend's")
@pytest.mark.parametrize("seed", range(12))
def test_fused_kernel_equals_the_generic_path(seed, monkeypatch):
    """Random batches (ragged or not, thresholds, permuted flat indices, draft_probs given or not, predictions or
    logits in fp32 / bf16): the fused C++ kernel and the generic path write identical outputs."""
    g = torch.Generator().manual_seed(100 + seed)
    bs, n, V = 1 + seed % 5, 1 + (3 * seed) % 11, (7, 50, 1000)[seed % 3]
    cand, _, nt, ns, pred, num_spec = make_trees(bs, n, V, seed=seed, ragged=seed % 2 == 1)
    ri = torch.randperm(bs * n, generator=g).reshape(bs, n) if seed % 3 == 0 else torch.arange(bs * n).reshape(bs, n)
    tp = torch.softmax(torch.randn(bs, n, V, generator=g) * 3, -1)
    coins, final = torch.rand(bs, n, generator=g), torch.rand(bs, generator=g)
    th = (1.0, 1.0) if seed % 4 else (0.4, 0.7)
    logits = torch.randn(bs * n, V, generator=g).to(torch.bfloat16 if seed % 2 else torch.float32)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(asg, "_FUSED", fused)
        greedy, greedy_l, sampled = outputs(bs, n, num_spec), outputs(bs, n, num_spec), outputs(bs, n, num_spec)
        dp = torch.zeros(bs, n, V) if seed % 2 == 0 else None
        with use_backend("cpp"):
            asg.verify_tree_greedy(*greedy, cand, ri, nt, ns, pred)
            asg.verify_tree_greedy(*greedy_l, cand, ri, nt, ns, target_logits=logits)
            asg.tree_speculative_sampling_target_only(*sampled, cand, ri, nt, ns, coins, final, tp, dp,
                                                      threshold_single=th[0], threshold_acc=th[1])
        results.append((greedy, greedy_l, sampled, dp))
    for a, b in zip(*results):
        for x, y in zip(a, b) if a is not None else ():
            assert torch.equal(x, y)


@pytest.mark.parametrize("path", PATHS)
def test_links_of_unreachable_nodes_are_never_read(path, monkeypatch):
    """Padded requests whose unused nodes hold arbitrary links (to reachable nodes, out of range): sgl-kernel never
    reads them, and neither does the adapter (greedy and sampling equal the re-expression)."""
    bs, n, V = 6, 8, 20
    cand, ri, nt, ns, pred, num_spec = make_trees(bs, n, V, seed=21, ragged=True)
    reach = asg.tree_parents(nt, ns) != -2
    g = torch.Generator().manual_seed(2)
    junk = torch.randint(-3, n + 3, (2, bs, n), generator=g)
    junk[1, :, ::2] = 1  # half of them name node 1, the root's first child where it has one
    nt_j, ns_j = torch.where(reach, nt, junk[0]), torch.where(reach, ns, junk[1])
    assert not torch.equal(nt_j, nt) and not torch.equal(ns_j, ns)
    tp = torch.softmax(torch.randn(bs, n, V, generator=g), -1)
    coins, final = torch.rand(bs, n, generator=g), torch.rand(bs, generator=g)
    want_g, want_s = outputs(bs, n, num_spec), outputs(bs, n, num_spec)
    sgl_greedy(cand, ri, nt, ns, pred, num_spec, *want_g)
    sgl_target_only(cand, ri, nt, ns, coins, final, tp, num_spec, *want_s, torch.zeros(bs, n, V))
    got_g, got_s = dev(path, outputs(bs, n, num_spec)), dev(path, outputs(bs, n, num_spec))
    with on(path, monkeypatch):
        asg.verify_tree_greedy(*got_g, *dev(path, (cand, ri, nt_j, ns_j, pred)))
        asg.tree_speculative_sampling_target_only(*got_s, *dev(path, (cand, ri, nt_j, ns_j, coins, final, tp)))
    for a, b in zip(got_g + got_s, want_g + want_s):
        assert torch.equal(a.cpu(), b)


def test_non_contiguous_outputs_take_the_generic_path(monkeypatch):
    """Outputs are written in place: a strided predicts cannot go to the C++ kernel, and still gets its values."""
    bs, n, V = 3, 6, 20
    cand, ri, nt, ns, pred, num_spec = make_trees(bs, n, V, seed=4)
    want = outputs(bs, n, num_spec)
    sgl_greedy(cand, ri, nt, ns, pred, num_spec, *want)
    wide = torch.full((bs * n, 2), -7, dtype=I32)
    got = (wide[:, 0],) + outputs(bs, n, num_spec)[1:]
    with on("cpp-generic" if "cpp" in BACKENDS else "torch", monkeypatch):
        monkeypatch.setattr(asg, "_FUSED", True)
        asg.verify_tree_greedy(*got, cand, ri, nt, ns, pred)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---- errors -------------------------------------------------------------------------------------------------------

def _good():
    cand, ri, nt, ns, pred, num_spec = make_trees(2, 5, 10, seed=0)
    return dict(zip(("predicts", "accept_index", "accept_token_num"), outputs(2, 5, num_spec))) | dict(
        candidates=cand, retrive_index=ri, retrive_next_token=nt, retrive_next_sibling=ns, target_predict=pred)


def _deep_chain(a):
    a["retrive_next_token"] = torch.tensor([[1, 2, 3, 4, -1]] * 2, dtype=I64)
    a["retrive_next_sibling"] = torch.full((2, 5), -1, dtype=I64)
    a["accept_index"] = torch.zeros(2, 3, dtype=I32)


@pytest.mark.parametrize("name,change", [
    ("candidates", lambda a: a.update(candidates=a["candidates"].to(I32))),
    ("predicts", lambda a: a.update(predicts=a["predicts"].long())),
    ("accept_index", lambda a: a.update(accept_index=a["accept_index"][:1])),
    ("retrive_next_sibling", lambda a: a.update(retrive_next_sibling=a["retrive_next_sibling"][:, :4])),
    ("target_predict", lambda a: a.update(target_predict=a["target_predict"].to(I32))),
    ("retrive_index", lambda a: a.update(retrieve_index=a["retrive_index"])),
    ("accept_index", _deep_chain),
    ("retrive_index", lambda a: a["retrive_index"].__setitem__((1, 2), 10)),
    ("retrive_index", lambda a: a["retrive_index"].__setitem__((0, 0), -1)),
    ("retrive_next_token", lambda a: a["retrive_next_token"].__setitem__((0, 0), 7)),
    ("retrive_next_sibling", lambda a: a.update(retrive_next_token=torch.tensor([[1, -1, -1, -1, -1]] * 2),
                                                retrive_next_sibling=torch.tensor([[-1, 1, -1, -1, -1]] * 2))),
    ("retrive_index", lambda a: a.update(retrive_index=a["retrive_index"].numpy())),
    ("target_predict", lambda a: a.update(target_predict=a["target_predict"].tolist())),
    ("target_predict", lambda a: a.pop("target_predict")),
], ids=["cand-dtype", "out-dtype", "accept-shape", "tree-shape", "predict-dtype", "twice", "too-deep",
        "flat-index-high", "flat-index-negative", "child-out-of-range", "sibling-loop", "index-numpy",
        "predict-list", "predict-missing"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_layouts_refused_raise_value_errors(name, change, fused, monkeypatch):
    """The same refusal, naming the argument, on both paths; outputs untouched."""
    a = _good()
    change(a)
    before = [a[k].clone() for k in ("predicts", "accept_index", "accept_token_num")]
    with adapter_refusal_path(fused, asg, monkeypatch), pytest.raises(ValueError, match=name):
        asg.verify_tree_greedy(**a)
    for x, k in zip(before, ("predicts", "accept_index", "accept_token_num")):
        assert torch.equal(x, a[k])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("validate", [True, False], ids=["validation-on", "validation-off"])
def test_drafted_tokens_outside_the_vocabulary_are_refused(fused, validate, monkeypatch):
    """A drafted token outside [0, V) would be read out of bounds (sampling) or could never be accepted (greedy with
    target_logits, our extension): refused on both paths, with validation on and off, naming candidates."""
    b = _good()
    b.pop("target_predict")
    b["candidates"][1, 3] = 10  # V = 10
    reach = asg.tree_parents(b["retrive_next_token"], b["retrive_next_sibling"])
    assert int(reach[1, 3]) >= 0  # (node 3 is on a tree)
    with adapter_refusal_path(fused, asg, monkeypatch), spdkernels.validation(validate):
        with pytest.raises(ValueError, match="candidates: request 1: token 10 of node 3"):
            asg.tree_speculative_sampling_target_only(**b, uniform_samples=torch.rand(2, 5),
                                                      uniform_samples_for_final_sampling=torch.rand(2),
                                                      target_probs=torch.softmax(torch.randn(2, 5, 10), -1))
        with pytest.raises(ValueError, match="candidates: request 1: token 10 of node 3"):
            asg.verify_tree_greedy(**b, target_logits=torch.randn(10, 10))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_value_checks_with_validation_on(fused, monkeypatch):
    """With validation on, NaN logits (greedy with target_logits) and probability rows that do not sum to 1
    (sampling) are refused on both paths, naming the argument; non-contiguous coins too (as sgl-kernel requires)."""
    b = _good()
    b.pop("target_predict")
    logits = torch.randn(10, 10)
    logits[4, 2] = float("nan")
    tp = torch.softmax(torch.randn(2, 5, 10), -1)
    with adapter_refusal_path(fused, asg, monkeypatch):
        with pytest.raises(ValueError, match="target_logits: contains NaN"):
            asg.verify_tree_greedy(**b, target_logits=logits)
        with pytest.raises(ValueError, match="target_probs: row"):
            asg.tree_speculative_sampling_target_only(**b, uniform_samples=torch.rand(2, 5),
                                                      uniform_samples_for_final_sampling=torch.rand(2),
                                                      target_probs=tp * 1.5)
        with pytest.raises(ValueError, match="uniform_samples"):
            asg.tree_speculative_sampling_target_only(**b, uniform_samples=torch.rand(5, 2).t(),
                                                      uniform_samples_for_final_sampling=torch.rand(2),
                                                      target_probs=tp)


@pytest.mark.parametrize("path", PATHS)
def test_final_draw_keeps_a_small_remaining_mass(path, monkeypatch):
    """The children tried at the last node hold all but 5e-9 of its row: the token drawn there is the one left
    (token 2), never a rejected child's, on every path (as in sgl-kernel)."""
    par = [-1, -1]  # root -> children 1, 2 (tokens 0 and 1)
    nxt, sib = tree.to_sglang(par)
    cand = torch.tensor([[9, 0, 1]], dtype=I64)
    row = torch.tensor([0.5, 0.49, 5e-9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    tp = row[None, None].repeat(1, 3, 1).contiguous()
    outs = path_device(path, outputs(1, 3, 3))
    with on(path, monkeypatch):
        asg.tree_speculative_sampling_target_only(
            *outs, *path_device(path, (cand, torch.arange(3).reshape(1, 3), torch.tensor([nxt]), torch.tensor([sib]),
                                       torch.tensor([[0.995, 0.5, 0.5]]), torch.tensor([0.3]), tp)))
    assert outs[2].tolist() == [0] and outs[0].tolist()[0] == 2


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_non_topological_tree_and_bad_thresholds_are_refused(fused, monkeypatch):
    a = _good()
    a["retrive_next_token"] = torch.tensor([[2, -1, 1, -1, -1]] * 2, dtype=I64)  # 0 -> 2 -> 1: child before parent
    a["retrive_next_sibling"] = torch.tensor([[-1, -1, -1, -1, -1]] * 2, dtype=I64)
    a["retrive_next_token"][:, 1] = 3
    a["retrive_next_token"][:, 3] = 4
    b = _good()
    b.pop("target_predict")
    tp = torch.softmax(torch.randn(2, 5, 10), -1)
    with adapter_refusal_path(fused, asg, monkeypatch):
        with pytest.raises(ValueError, match="topological"):
            asg.verify_tree_greedy(**a)
        with pytest.raises(ValueError, match="threshold_acc"):
            asg.tree_speculative_sampling_target_only(**b, uniform_samples=torch.rand(2, 5),
                                                      uniform_samples_for_final_sampling=torch.rand(2),
                                                      target_probs=tp, threshold_acc=1.5)
