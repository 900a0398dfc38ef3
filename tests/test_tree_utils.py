"""Token-tree utilities: masks, positions, layout round trips, builders, and compact_kv + attention."""

import math

import pytest
import torch
from test_tree_attention import check_close, make_batch

import spdkernels
from spdkernels import tree
from spdkernels.reference.tree_attention import gather_kv

I32 = dict(dtype=torch.int32)


def ancestors(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out


def test_build_tree_mask_and_positions_against_a_direct_walk():
    gen = torch.Generator().manual_seed(0)
    ks = [0, 5, 40, 1]  # 41 query tokens in one request: two mask words
    par = []
    for k in ks:
        par += [[-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, k)]][0][:k]
    cund = torch.tensor([0] + torch.tensor(ks).cumsum(0).tolist(), **I32)
    mask = tree.build_tree_mask(torch.tensor(par, **I32), cund)
    assert mask.shape == (sum(ks) + len(ks), 2) and mask.dtype == torch.int32
    dense = tree.tree_mask_to_dense(mask, 41)
    start = torch.tensor([7, 0, 100, 3])
    pos = tree.tree_positions(torch.tensor(par, **I32), cund, start)
    row = 0
    for r, k in enumerate(ks):
        local = par[cund[r]:cund[r + 1]]
        for qi in range(k + 1):
            want = {0} | ({a + 1 for a in ancestors(local, qi - 1)} if qi else set())
            assert set(dense[row].nonzero().flatten().tolist()) == want
            assert int(pos[row]) == int(start[r]) + len(want) - 1
            row += 1
    assert torch.equal(tree.dense_to_tree_mask(dense), mask)


def test_chain_mask_is_causal():
    cund = torch.tensor([0, 3, 3], **I32)
    dense = tree.tree_mask_to_dense(tree.build_tree_mask(None, cund), 4)
    assert torch.equal(dense[:4], torch.ones(4, 4, dtype=torch.bool).tril())
    assert dense[4].tolist() == [True, False, False, False]


def test_vllm_layouts_round_trip():
    cund = torch.tensor([0, 2, 2, 7], **I32)
    assert torch.equal(tree.from_vllm_cu_num_draft_tokens(tree.to_vllm_cu_num_draft_tokens(cund)), cund)
    paths = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    parents = tree.from_vllm_tree(paths)
    assert parents == [-1, -1, -1, 0, 0, 1, 3]
    assert tree.to_vllm_tree(parents) == paths


def test_sglang_layout_round_trip():
    parents = [-1, -1, 0, 0, 2, 1, -1]
    nxt, sib = tree.to_sglang(parents)
    assert nxt[0] == 1 and sib[1] == 2 and sib[2] == 7 and nxt[1] == 3 and sib[3] == 4
    assert tree.from_sglang(nxt, sib) == parents


def test_builders():
    assert tree.chain(3) == [-1, 0, 1]
    t = tree.topk_tree([2, 2])
    assert t == [-1, -1, 0, 0, 1, 1]
    scores = [-0.1, -1.0, -0.3, -2.0, -1.2, -1.1]
    ids, par = tree.budget_tree(t, scores, 4)
    assert ids == [0, 1, 2, 5] and par == [-1, -1, 0, 1]
    # closure under ancestors even when a child outscores its parent
    ids, par = tree.budget_tree([-1, 0], [-5.0, -0.1], 1)
    assert ids == [0] and par == [-1]


def test_compact_kv_then_attention_equals_attention_over_the_committed_path():
    """Verify a tree, compact the accepted nodes, then decode one token: the result must equal attention
    over a cache that only ever held the committed sequence."""
    gen = torch.Generator().manual_seed(4)
    # accepted paths (local node indices, increasing along a path as in any topological tree)
    paths = [[0, 1, 3, 4, -1], [1, 2, -1, -1, -1]]  # node indices along each accepted path
    q_lens, ctx = [7, 4], [19, 33]
    args = make_batch(q_lens, ctx, 4, 2, 64, 16, torch.float32, False, gen)
    q, kc, vc, bt, kv, cu_q, _ = args
    dense_before = (kc.clone(), vc.clone())
    new_kv = tree.compact_kv(kc, vc, bt, kv, cu_q, torch.tensor(paths, **I32).to(bt.device))
    assert new_kv.tolist() == [19 + 1 + 4, 33 + 1 + 2]
    # expected committed sequence per request: prefix, root, accepted nodes (from the old cache)
    for r in range(2):
        P = ctx[r]
        want_pos = list(range(P + 1)) + [P + 1 + n for n in paths[r] if n >= 0]
        old_k = gather_kv(dense_before[0], bt[r], kv[r].item())
        new_k = gather_kv(kc, bt[r], int(new_kv[r]))
        assert torch.equal(new_k, old_k[want_pos])
    # one decode step over the compacted cache (its K/V written at the next slot) equals the reference
    # over a fresh cache that holds the committed sequence only
    kv2 = new_kv + 1
    qd = torch.randn(2, 4, 64, generator=gen).to(kc.device)
    for r in range(2):
        pos = int(new_kv[r])
        blk = int(bt[r, pos // 16])
        kc[blk, pos % 16] = torch.randn(2, 64, generator=gen)
        vc[blk, pos % 16] = torch.randn(2, 64, generator=gen)
    cu1 = torch.tensor([0, 1, 2], **I32).to(kc.device)
    got = spdkernels.tree_attention(qd, kc, vc, bt, kv2, cu1)
    for r in range(2):
        k, v = gather_kv(kc, bt[r], int(kv2[r])), gather_kv(vc, bt[r], int(kv2[r]))
        ref = torch.softmax(torch.einsum("hd,khd->hk", qd[r], k.repeat_interleave(2, 1)) / math.sqrt(64), -1)
        check_close(got[r], torch.einsum("hk,khd->hd", ref, v.repeat_interleave(2, 1)))


def test_compact_kv_refuses_arguments_it_cannot_use():
    """A ValueError naming the argument (never an indexing error deep inside): another device than block_table's,
    and row counts that disagree with accepted_path."""
    _, kc, vc, bt, kv, cu_q, _ = make_batch([3, 2], [5, 9], 4, 2, 64, 16, torch.float32, False,
                                            torch.Generator().manual_seed(2))
    path = torch.tensor([[0, -1], [-1, -1]], **I32).to(bt.device)
    elsewhere = "meta"  # a second device on any machine
    with pytest.raises(ValueError, match="accepted_path: expected a tensor on device .* \\(like block_table\\)"):
        tree.compact_kv(kc, vc, bt, kv, cu_q, path.to(elsewhere))
    with pytest.raises(ValueError, match="kv_lens: expected a tensor on device"):
        tree.compact_kv(kc, vc, bt, kv.to(elsewhere), cu_q, path)
    with pytest.raises(ValueError, match="v_cache: expected a tensor on device"):
        tree.compact_kv(kc, vc.to(elsewhere), bt, kv, cu_q, path)
    with pytest.raises(ValueError, match="kv_lens: expected 2 rows"):
        tree.compact_kv(kc, vc, bt, kv[:1], cu_q, path)
    with pytest.raises(ValueError, match="cu_q_lens: expected 3 rows"):
        tree.compact_kv(kc, vc, bt, kv, cu_q[:2], path)
    with pytest.raises(ValueError, match="block_table: expected 2 rows"):
        tree.compact_kv(kc, vc, bt[:1], kv, cu_q, path)
    assert tree.compact_kv(kc, vc, bt, kv, cu_q, path).tolist() == [5 + 1 + 1, 9 + 1]


def test_layout_conversions_refuse_what_they_cannot_express():
    """vLLM numbers a tree's nodes by depth, then path: a tree numbered otherwise would map its node i to another
    vLLM node (it came back as [(0,), (0, 0), (1,)], which vLLM re-sorts). SGLang lists siblings in the order it
    tries them: a list that is not in increasing query order cannot become parents (they order siblings by index,
    and the order used to be dropped silently); lists of different lengths are named."""
    with pytest.raises(ValueError, match="parents: vLLM numbers a tree's nodes by depth, then path: its node 1 "
                                         "would be this tree's node 2"):
        tree.to_vllm_tree([-1, 0, -1])
    with pytest.raises(ValueError, match="parents: expected -1 or an earlier node for node 0, got 1"):
        tree.to_vllm_tree([1, -1])
    assert tree.to_vllm_tree([-1, -1, 0]) == [(0,), (1,), (0, 0)]
    with pytest.raises(ValueError, match="next_sibling: siblings must be listed in increasing query order: 1 follows"):
        tree.from_sglang([2, -1, -1], [-1, -1, 1])
    with pytest.raises(ValueError, match="next_sibling: expected 2 entries"):
        tree.from_sglang([1, -1], [-1])
    with pytest.raises(ValueError, match="paths: expected each node once"):
        tree.from_vllm_tree([(0,), (0,)])


@pytest.mark.parametrize("validate", [True, False])
def test_mask_and_positions_name_a_layout_they_cannot_use(validate):
    """With validation on, the values a mask is built from are checked (a max_q_len below the longest request
    dropped the root from the last rows, whose positions then stopped growing: [10, 11, 12, 13, 13, 13]; a
    parent in another request or a cycle gave a silently wrong mask); a num_draft_tokens that disagrees with
    parents is named with validation off too (a RuntimeError from a tensor size before)."""
    cu = torch.tensor([0, 5], **I32)
    start = torch.tensor([10])
    par = torch.tensor([-1, 0, 1, 2, 3], **I32)
    good = tree.tree_positions(par, cu, start, max_q_len=6)
    assert good.tolist() == [10, 11, 12, 13, 14, 15]
    with spdkernels.validation(validate):
        with pytest.raises(ValueError, match="num_draft_tokens: expected len\\(parents\\) = 5, got 4"):
            tree.build_tree_mask(par, cu, 6, num_draft_tokens=4)
        bad = [
            (dict(max_q_len=4), "max_q_len: expected at least the longest request's root \\+ drafts = 6, got 4"),
            (dict(parents=torch.tensor([1, 0, 1, 2, 3], **I32)), "parents: each entry must satisfy"),
            (dict(parents=torch.tensor([-1, 0, -1, 3, 2], **I32), cu=torch.tensor([0, 2, 5], **I32)),
             "parents: each entry must satisfy"),
            (dict(cu=torch.tensor([0, 6], **I32)), "parents: expected N = cu_num_draft\\[-1\\] = 6 entries"),
            (dict(cu=torch.tensor([1, 5], **I32)), "cu_num_draft: cu_num_draft\\[0\\] must be 0, got 1"),
        ]
        for change, pattern in bad:
            a = dict(parents=par, cu=cu, max_q_len=6)
            a.update(change)
            if validate:
                with pytest.raises(ValueError, match=pattern):
                    tree.build_tree_mask(a["parents"], a["cu"], a["max_q_len"])
        with pytest.raises(ValueError, match="max_q_len: expected an int >= 1"):
            tree.build_tree_mask(par, cu, 0)
        if validate:  # a chain (no parents): its counts are checked here, not by the ops' parents check
            with pytest.raises(ValueError, match="cu_num_draft: expected cumulative draft counts from 0"):
                tree.build_tree_mask(None, torch.tensor([0, 3, 2], **I32), 4)


def test_compact_kv_names_positions_past_its_block_table():
    """With validation on, a kv_len past the block table's slots, or an accepted node past the request's drafts,
    is named (the slot lookup clamped them into the table's last block: moves to and from the wrong slots)."""
    bt = torch.tensor([[0, 1]], **I32)  # 8 slots of block size 4
    cu_q = torch.tensor([0, 3], **I32)
    path = torch.tensor([[1, -1]], **I32)
    assert tree.compact_kv_moves(bt, torch.tensor([7], **I32), cu_q, path, 4)[2].tolist() == [6]
    with pytest.raises(ValueError, match="kv_lens: expected query lengths <= kv_lens <= the block table's 8 slots"):
        tree.compact_kv_moves(bt, torch.tensor([12], **I32), cu_q, path, 4)
    with pytest.raises(ValueError, match="accepted_path: expected local node indices below"):
        tree.compact_kv_moves(bt, torch.tensor([7], **I32), cu_q, torch.tensor([[2, -1]], **I32), 4)


def test_budget_tree_fills_its_budget_when_a_child_outscores_its_parent():
    """A child skipped because its parent was not kept yet is taken once the parent is (it was never reconsidered:
    two nodes that both fit came back as one)."""
    assert tree.budget_tree([-1, 0], [-5.0, -0.1], 2) == ([0, 1], [-1, 0])
    # with scores that never exceed a parent's, the top-budget nodes by score (ties by index), as before
    t = tree.topk_tree([2, 2])
    assert tree.budget_tree(t, [-0.1, -1.0, -0.3, -2.0, -1.2, -1.1], 4) == ([0, 1, 2, 5], [-1, -1, 0, 1])
