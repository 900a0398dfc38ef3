"""Graph-safe ops: with the size arguments given and validation off, no op (nor the tree utilities) synchronises
with the host, so each can be captured in a CUDA graph.

Here (no GPU) the Triton launch path runs under the Triton interpreter inside ``no_host_sync``, which refuses
every host read of a device value made from Python (the interpreter itself is exempt: it reads tensors on the
host by design); the same tests show that the harness fails a call that does sync. On a GPU the ops are also
captured in a CUDA graph and replayed on new inputs (skipped here, with the reason)."""

import pytest
import torch
from conftest import ON_GPU, backends_here, to_backend, use_backend
from test_tree_attention import make_batch

import spdkernels
from spdkernels import tree
from spdkernels.testing import random_draft_batch
from spdkernels.testing.sync_guard import HostSyncError, no_host_sync

I32 = dict(dtype=torch.int32)


def _draft_batch():
    b = random_draft_batch([3, 0, 2], 50, tree=True, gen=torch.Generator().manual_seed(0))
    return b, to_backend("triton", (b.target_logits, b.draft_token_ids, b.cu_num_draft, b.parents))


def _op_calls():
    """(name, call) of every op with all its size arguments given."""
    b, (logits, toks, cu, par) = _draft_batch()
    R = b.R
    seed = to_backend("triton", torch.arange(R, dtype=torch.int64))
    probs = to_backend("triton", torch.softmax(b.target_logits[:b.N].float(), -1))
    chain_toks = to_backend("triton", b.draft_token_ids)
    bonus = to_backend("triton", torch.zeros(R, dtype=torch.int64))
    uniforms = to_backend("triton", torch.rand(b.N + R, generator=torch.Generator().manual_seed(1)))
    att = to_backend("triton", make_batch([3, 1], [17, 5], 4, 2, 64, 16, torch.float32, False))
    md = b.max_depth
    return [
        ("verify_greedy", lambda: spdkernels.verify_greedy(logits, toks, cu, parents=par, max_depth=md)),
        ("rejection_sample seed", lambda: spdkernels.rejection_sample(logits, toks, cu, parents=par, max_depth=md,
                                                                      seed=seed)),
        ("rejection_sample uniforms", lambda: spdkernels.rejection_sample(logits, toks, cu, parents=par,
                                                                          max_depth=md, uniforms=uniforms)),
        ("rejection_sample probs bonus", lambda: spdkernels.rejection_sample(
            probs, chain_toks, cu, max_depth=md, seed=seed, target_is_probs=True, bonus_token_ids=bonus)),
        ("tree_attention", lambda: spdkernels.tree_attention(*att, max_q_len=3, max_kv_len=20)),
    ]


@pytest.mark.parametrize("i", range(5), ids=["verify_greedy", "rejection_sample-seed", "rejection_sample-uniforms",
                                              "rejection_sample-probs-bonus", "tree_attention"])
def test_ops_do_not_sync_with_their_size_arguments(i):
    name, call = _op_calls()[i]
    with spdkernels.validation(False), use_backend("triton"):
        call()  # once outside, so that compiling / first-call work is not what is checked
        with no_host_sync():
            call()


def test_the_harness_catches_a_sync():
    """Planted: the calls that do sync (a size read from the device, a max_depth computed from the batch) fail."""
    b, (logits, toks, cu, par) = _draft_batch()
    att = to_backend("triton", make_batch([3, 1], [17, 5], 4, 2, 64, 16, torch.float32, False))
    with spdkernels.validation(False), use_backend("triton"):
        with pytest.raises(HostSyncError, match="__int__"):
            with no_host_sync():
                spdkernels.tree_attention(*att)  # max_q_len / max_kv_len read from the device
        with pytest.raises(HostSyncError):
            with no_host_sync():
                spdkernels.verify_greedy(logits, toks, cu, parents=par)  # max_depth from the batch
    with pytest.raises(HostSyncError):  # and with validation on, the value checks read the batch
        with no_host_sync():
            spdkernels.verify_greedy(logits, toks, cu, parents=par, max_depth=b.max_depth)
    x = torch.ones(3)
    for bad in (lambda: x.sum().item(), lambda: x[x > 0], lambda: torch.nonzero(x), lambda: x.tolist(),
                lambda: bool(x.any()), lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 3]))):
        with pytest.raises(HostSyncError):
            with no_host_sync():
                bad()


def test_tree_utilities_do_not_sync_with_their_sizes():
    b = random_draft_batch([3, 0, 2], 50, tree=True, gen=torch.Generator().manual_seed(0))
    start = torch.tensor([5, 6, 7])
    with no_host_sync(), spdkernels.validation(False):
        m = tree.build_tree_mask(b.parents, b.cu_num_draft, max_q_len=4)
        mc = tree.build_tree_mask(None, b.cu_num_draft, max_q_len=4, num_draft_tokens=b.N)
        pos = tree.tree_positions(b.parents, b.cu_num_draft, start, max_q_len=4)
    with pytest.raises(HostSyncError):  # with validation on, as the ops, the values are checked: a host sync
        with no_host_sync():
            tree.build_tree_mask(b.parents, b.cu_num_draft, max_q_len=4)
    # the same results as with the sizes read from the batch
    assert torch.equal(m, tree.build_tree_mask(b.parents, b.cu_num_draft))
    assert torch.equal(mc, tree.build_tree_mask(None, b.cu_num_draft))
    assert torch.equal(pos, tree.tree_positions(b.parents, b.cu_num_draft, start))
    with pytest.raises(HostSyncError):  # a chain without its node count reads it from the device
        with no_host_sync(), spdkernels.validation(False):
            tree.build_tree_mask(None, b.cu_num_draft, max_q_len=4)


def test_compact_kv_sync_free_equals_the_selected_moves():
    """compact_kv(sync_free=True) moves the same K/V (its unused moves copy each root slot onto itself) without a
    host sync."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q_lens, ctx = [7, 1, 4, 5], [19, 3, 33, 0]
        _, kc, vc, bt, lens, cu_q, _ = make_batch(q_lens, ctx, 4, 2, 64, 16, torch.float32, False, g)
        D = max(q_lens)  # wider than any path: unused columns too
        path = torch.full((len(q_lens), D), -1, **I32)
        for r, ql in enumerate(q_lens):  # an increasing run of node indices, as along any accepted path
            nodes = sorted(torch.randperm(ql - 1, generator=g)[:int(torch.randint(0, ql, (1,), generator=g))].tolist())
            path[r, :len(nodes)] = torch.tensor(nodes, **I32)
        path = path.to(bt.device)
        want_k, want_v = kc.clone(), vc.clone()
        want_lens = tree.compact_kv(want_k, want_v, bt, lens, cu_q, path)
        with no_host_sync(), spdkernels.validation(False):
            got_lens = tree.compact_kv(kc, vc, bt, lens, cu_q, path, sync_free=True)
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v) and torch.equal(got_lens, want_lens)
    with pytest.raises(HostSyncError):
        with no_host_sync(), spdkernels.validation(False):
            tree.compact_kv(kc, vc, bt, lens, cu_q, path)


@pytest.mark.parametrize("backend", backends_here())
def test_tree_attention_size_arguments_are_bounds(backend):
    """Bounds larger than the batch's sizes give the same output (the launch covers more, the kernel masks it), with
    every KV split count."""
    args = make_batch([5, 1, 3], [40, 3, 70], 4, 2, 64, 16, torch.float32, False)
    want = spdkernels.tree_attention(*args)
    with use_backend(backend):
        for kw in (dict(max_q_len=5, max_kv_len=73), dict(max_q_len=9, max_kv_len=200),
                   dict(max_q_len=5, max_kv_len=73, num_splits=1), dict(max_q_len=6, max_kv_len=90, num_splits=3)):
            got = spdkernels.tree_attention(*to_backend(backend, args), **kw).cpu()
            torch.testing.assert_close(got, want.cpu(), rtol=2e-5, atol=2e-5)


def test_tree_attention_size_arguments_are_checked():
    args = make_batch([5, 1], [40, 3], 4, 2, 64, 16, torch.float32, False)
    with pytest.raises(ValueError, match="^max_q_len: 4 is smaller than"):
        spdkernels.tree_attention(*args, max_q_len=4, max_kv_len=45)
    with pytest.raises(ValueError, match="^max_kv_len: 44 is smaller than"):
        spdkernels.tree_attention(*args, max_q_len=5, max_kv_len=44)
    with pytest.raises(ValueError, match="^max_q_len: expected >= 0"):
        spdkernels.tree_attention(*args, max_q_len=-1)
    with pytest.raises(ValueError, match="^num_splits: expected >= 1"):
        spdkernels.tree_attention(*args, num_splits=0)
    with pytest.raises(ValueError, match="^max_kv_len: expected an int"):
        spdkernels.tree_attention(*args, max_kv_len=3.5)


def test_torch_compile_fullgraph_with_size_arguments():
    args = make_batch([3, 2], [20, 9], 4, 2, 64, 16, torch.float32, False)

    def step(q, kc, vc, bt, lens, cu, mask):
        return spdkernels.tree_attention(q * 1.0, kc, vc, bt, lens, cu, mask, max_q_len=3, max_kv_len=23) + 1.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*args), step(*args))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU (the GPU test tier runs this)")
def test_ops_in_a_cuda_graph():
    """Each op captured in a CUDA graph and replayed: the outputs equal eager calls; the sync debug mode refuses
    any synchronisation during capture."""
    with spdkernels.validation(False), use_backend("triton"):
        for name, call in _op_calls():
            call()  # compile first
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.cuda.graph(g):
                    static_out = call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            g.replay()
            torch.cuda.synchronize()
            eager = call()
            outs = static_out if isinstance(static_out, tuple) else (static_out,)
            eags = eager if isinstance(eager, tuple) else (eager,)
            for a, b in zip(outs, eags):  # (seeded coins are Philox: deterministic too)
                if a.is_floating_point():
                    torch.testing.assert_close(a, b)
                else:
                    assert torch.equal(a, b), name


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU (the GPU test tier runs this)")
def test_bench_timer_graphs_and_a_capture_that_fails():
    """spd-bench tries a CUDA-graph capture of every Triton row and falls back to events where the call is not
    capturable; the failed capture must not break later draws from torch's generator (the first H200 run of spd-bench
    stopped at the next torch.rand: "Offset increment outside graph capture encountered unexpectedly")."""
    from spdkernels.bench.timing import GpuTimer

    x = torch.ones(4, device="cuda")
    timer = GpuTimer()
    t = timer(lambda: (torch.rand(4, device="cuda") + x).sum().item(), 1, 3, graph=True)  # .item(): a host sync
    assert t["cuda_graph"] is False and t["median"] > 0 and t["n"] == 3
    u = torch.rand(1000, device="cuda")
    assert 0.4 < float(u.mean()) < 0.6
    t = timer(lambda: x.mul_(1.0), 1, 5, graph=True)  # capturable: replayed, one sample per repeat
    assert t["cuda_graph"] is True and t["n"] == 5 and 0 < t["p20"] <= t["median"] <= t["p80"]
