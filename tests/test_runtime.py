"""The runtime on a tiny random-weight model in float64: greedy speculative decoding equals autoregressive
decoding token for token for every proposer (chains and trees, single requests and ragged batches), KV cache
invariants after every step, sampling determinism and the first-token distribution, the CLI's user errors."""
import contextlib

import pytest
import torch
from conftest import backends_here, cpp_lower_isas

from spdkernels.runtime import (
    CacheFullError,
    DraftModelProposer,
    EarlyExitProposer,
    Engine,
    LlamaModel,
    NGramProposer,
    PagedKVCache,
    Request,
    SamplingParams,
)
from spdkernels.runtime.cli import main as cli_main
from spdkernels.runtime.model import Batch, greedy_reference, prefill_logits, random_config, random_state_dict

CFG = random_config()


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float64)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 1, 40)]
    ps[1] = ps[1] + ps[1][:9]  # a repeat, so the n-gram proposer finds matches
    ps[3] = ps[3] + ps[3][10:20]
    return ps


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [greedy_reference(model, p, 24) for p in prompts]


def proposers(model):
    other = LlamaModel(CFG, random_state_dict(CFG, seed=5), dtype=torch.float64)
    return {
        "ngram-chain": NGramProposer(k=4, min_ngram=1),
        "ngram-tree": NGramProposer(k=3, min_ngram=1, branches=3),
        "ngram-adaptive": NGramProposer(k=6, min_ngram=1, adaptive=True),
        "early-exit-chain": EarlyExitProposer(layers=1, k=3),
        "early-exit-tree": EarlyExitProposer(layers=2, k=3, branching=2, width=3, max_nodes=8),
        "draft-model-chain": DraftModelProposer(other, k=4),
        "draft-model-tree": DraftModelProposer(other, k=3, branching=3, width=2),
        "draft-model-self": DraftModelProposer(model, k=4),  # the target as its own draft: all accepted
    }


NAMES = ["none", "ngram-chain", "ngram-tree", "ngram-adaptive", "early-exit-chain", "early-exit-tree",
         "draft-model-chain",
         "draft-model-tree", "draft-model-self"]


def params(n=24, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "ragged-batch"])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_speculative_equals_autoregressive(model, prompts, reference, name, batched):
    prop = None if name == "none" else proposers(model)[name]
    eng = Engine(model, prop, scrub_cache=True, validate_ops=True)
    if batched:
        res, _ = eng.generate([Request(p, params()) for p in prompts])
    else:
        res = [eng.generate([Request(p, params())])[0][0] for p in prompts]
    assert [r.output_ids for r in res] == reference
    drafted = sum(r.metrics.drafted for r in res)
    accepted = sum(r.metrics.accepted for r in res)
    if name == "draft-model-self":
        assert accepted == drafted
    if name != "none":
        assert drafted > 0
    if name not in ("none", "draft-model-chain", "draft-model-tree"):  # an unrelated random draft model may
        assert accepted > 0  # never be right; the others must exercise the accept-and-commit path


def test_speculation_takes_fewer_steps_than_tokens(model, prompts):
    res, m = Engine(model, DraftModelProposer(model, k=4)).generate([Request(prompts[0], params(20))])
    assert len(res[0].output_ids) == 20
    assert res[0].metrics.steps == 4  # 5 tokens per step (4 accepted + bonus)
    assert res[0].metrics.mean_accepted_length == 5.0


@pytest.mark.parametrize("name", ["none", "ngram-tree", "early-exit-tree", "draft-model-chain"])
def test_kv_cache_invariants_after_every_step(model, prompts, name):
    """After each step: committed length == tokens - 1 (the root is not cached yet); exactly the blocks that
    length needs; the committed entries equal a fresh prefill of the committed tokens; every entry past the
    committed length is poisoned (scrub), so stale tree entries are never read (outputs stay exact)."""
    prop = None if name == "none" else proposers(model)[name]
    eng = Engine(model, prop, scrub_cache=True)
    reqs = [Request(p, params(16), rid=i) for i, p in enumerate(prompts)]
    checks = []

    def check(_):
        cache = eng.cache
        for rid in range(len(reqs)):
            if rid not in cache._len:  # finished
                continue
            st = states[rid]
            L = cache.length(rid)
            assert L == len(st.tokens) - 1
            assert len(cache.blocks(rid)) == -(-L // cache.block_size)
            if L == 0:
                continue
            fresh = model.new_cache(-(-L // 16), 16)
            fresh.add(0)
            fresh.reserve(0, L)
            b = Batch(torch.tensor(st.tokens[:L]), torch.arange(L), torch.tensor(fresh.slots(0, range(L))),
                      torch.tensor([0, L], dtype=torch.int32), torch.tensor([L], dtype=torch.int32),
                      fresh.block_table([0]))
            model.forward_layers(model.embed_tokens(b.token_ids), b, fresh)
            mine = cache.k.view(cache.k.shape[0], -1, *cache.k.shape[3:])[:, cache.slots(rid, range(L))]
            ref = fresh.k.view(fresh.k.shape[0], -1, *fresh.k.shape[3:])[:, fresh.slots(0, range(L))]
            torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-9)
            bs = cache.block_size
            if L % bs:
                assert torch.isnan(cache.k[:, cache.blocks(rid)[-1], L % bs:]).all()
        checks.append(1)

    states = {}
    orig_step = eng._step

    def step(active, m):
        for s in active:
            states[s.rid] = s
        orig_step(active, m)

    eng._step = step
    eng.on_step = check
    eng.generate(reqs)
    assert len(checks) >= 4


def test_cache_grow_keeps_pages_and_adds_free_blocks():
    c = PagedKVCache(2, 1, 4, num_blocks=3, block_size=4, dtype=torch.float64)
    c.add("a")
    c.reserve("a", 12)  # every block
    k = torch.arange(12 * 4, dtype=torch.float64).view(12, 1, 4)
    for layer in range(2):
        c.write(layer, torch.tensor(c.slots("a", range(12))), k, -k)
    c.set_length("a", 12)
    with pytest.raises(CacheFullError):
        c.reserve("a", 13)
    with pytest.raises(ValueError, match="extra"):
        c.grow(0)
    c.grow(2)
    assert c.num_blocks == 5 and c.free_blocks == 2 and c.k.shape[1] == 5
    c.reserve("a", 20)
    k2 = torch.full((8, 1, 4), 5.0, dtype=torch.float64)
    c.write(1, torch.tensor(c.slots("a", range(12, 20))), k2, k2)
    for layer in range(2):
        assert torch.equal(c.layer_k(layer).reshape(-1, 1, 4)[torch.tensor(c.slots("a", range(12)))], k)
        assert torch.equal(c.layer_v(layer).reshape(-1, 1, 4)[torch.tensor(c.slots("a", range(12)))], -k)
    assert torch.equal(c.layer_k(1).reshape(-1, 1, 4)[torch.tensor(c.slots("a", range(12, 20)))], k2)
    c.release("a")
    assert c.free_blocks == 5
    s = PagedKVCache(1, 1, 4, num_blocks=1, block_size=4, dtype=torch.float64, scrub=True)
    s.grow(1)
    assert torch.isnan(s.k[:, 1]).all() and not torch.isnan(s.k[:, 0]).any()  # scrub: new pages poison a read


def test_cache_rollback_restores():
    c = PagedKVCache(2, 1, 4, num_blocks=6, block_size=4, dtype=torch.float64, scrub=True)
    c.add("a")
    c.reserve("a", 6)
    slots = torch.tensor(c.slots("a", range(6)))
    k = torch.arange(6 * 4, dtype=torch.float64).view(6, 1, 4)
    for layer in range(2):
        c.write(layer, slots, k, -k)
    c.set_length("a", 3)  # prefix 2 + root, drafts rejected
    free_before = c.free_blocks
    c.reserve("a", 9)  # a 6-node draft tree
    c.write(0, torch.tensor(c.slots("a", range(3, 9))), torch.full((6, 1, 4), 7.0, dtype=torch.float64),
            torch.zeros(6, 1, 4, dtype=torch.float64))
    bt = c.block_table(["a"])
    lens = c.commit(["a"], bt, torch.tensor([9], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32),
                    torch.full((1, 4), -1, dtype=torch.int32))  # nothing accepted: roll back to prefix + root
    assert lens == [3] and c.length("a") == 3 and c.free_blocks == free_before
    got = c.k[0].view(-1, 1, 4)[torch.tensor(c.slots("a", range(3)))]
    assert torch.equal(got, k[:3])
    assert torch.isnan(c.k[:, c.blocks("a")[0], 3:]).all()
    # next step: root + 5 nodes at positions 3..8; accept nodes 1 and 4 (a path): they move next to the root
    # in every layer
    c.reserve("a", 9)
    new = torch.arange(6, dtype=torch.float64).view(6, 1, 1).expand(6, 1, 4) + 100
    for layer in range(2):
        c.write(layer, torch.tensor(c.slots("a", range(3, 9))), new, -new)
    lens = c.commit(["a"], c.block_table(["a"]), torch.tensor([9], dtype=torch.int32),
                    torch.tensor([0, 6], dtype=torch.int32), torch.tensor([[1, 4, -1]], dtype=torch.int32))
    assert lens == [6]  # P = 9 - 6 = 3: root at 3, nodes 1 and 4 (positions 5 and 8) move to 4 and 5
    got = c.v[1].view(-1, 1, 4)[torch.tensor(c.slots("a", range(4, 6)))]
    assert torch.equal(got[:, 0, 0], torch.tensor([-102.0, -105.0], dtype=torch.float64))
    held = c.blocks("a")
    c.release("a")  # a released request's blocks go back NaN-filled: a reader that reuses one sees no old K/V
    assert c.free_blocks == 6 and torch.isnan(c.k[:, held]).all() and torch.isnan(c.v[:, held]).all()
    with pytest.raises(KeyError):
        c.length("a")


def test_stages_and_taps_equal_the_full_forward(model, prompts):
    p = prompts[3]
    T = len(p)

    def run(stages):
        cache = model.new_cache(8, 16)
        cache.add(0)
        cache.reserve(0, T)
        b = Batch(torch.tensor(p), torch.arange(T), torch.tensor(cache.slots(0, range(T))),
                  torch.tensor([0, T], dtype=torch.int32), torch.tensor([T], dtype=torch.int32),
                  cache.block_table([0]))
        h = model.embed_tokens(b.token_ids)
        taps = {}
        for s, e in stages:
            h, t = model.forward_layers(h, b, cache, s, e, taps=range(CFG.num_layers))
            taps.update(t)
        return model.logits(h), taps

    full, taps_full = run([(0, CFG.num_layers)])
    staged, taps_staged = run(model.stages(3))
    assert model.stages(3) == [(0, 1), (1, 2), (2, 3)]
    assert torch.equal(full, staged)
    assert sorted(taps_staged) == list(range(CFG.num_layers))
    for i in taps_full:
        assert torch.equal(taps_full[i], taps_staged[i])


def test_same_seed_same_text_and_seeds_matter(model, prompts):
    def run(seed, prop=None):
        reqs = [Request(p, params(16, temperature=0.9, top_p=0.95, seed=seed)) for p in prompts]
        return [r.output_ids for r in Engine(model, prop).generate(reqs)[0]]

    a, b = run(7), run(7)
    assert a == b
    assert run(8) != a
    # the same seed with a proposer: same text on every repeat too
    assert run(7, NGramProposer(k=3, min_ngram=1)) == run(7, NGramProposer(k=3, min_ngram=1))


def test_seeded_sampling_is_the_autoregressive_text_whatever_the_drafts(model, prompts):
    """Deterministic drafts are verified by coupling (Engine._verify_sampled): each token is the target's own
    sample with a coin keyed by (seed, position), so a seeded request's text is autoregressive decoding's with that
    seed, for every proposer (the PDM proposer's greedy drafts included), tree or chain, under the cost-aware
    controller and in any batch (the coins were keyed by the step before: the text changed with the draft
    depths). A planted variant that keys the coupled coins by the step makes the text depend on the drafts."""
    from spdkernels.runtime.spd.proposer import PDMProposer
    from spdkernels.runtime.spd.train import untrained_pdm
    from spdkernels.runtime.speculation import AdaptiveSpeculation

    def run(prop, seeds=(11, 12, 13), max_batch=None, **kw):
        reqs = [Request(p, params(20, temperature=0.9, top_p=0.95, top_k=40, seed=sd))
                for p, sd in zip(prompts, seeds)]
        res, m = Engine(model, prop, **kw).generate(reqs, max_batch=max_batch)
        return [r.output_ids for r in res], m

    pdm = untrained_pdm(model, [0, 1, 2], layers=1, intermediate=32, noise=0.3, seed=5)
    props = dict(proposers(model), **{"pdm-greedy-chain": PDMProposer(pdm, k=3, sample=False),
                                      "pdm-greedy-tree": PDMProposer(pdm, k=3, branching=2, width=2, sample=False)})
    want, _ = run(None)
    assert len({tuple(o) for o in want}) == len(want)
    accepted = 0
    real = Engine._verify_sampled

    def eager(self, *args):  # every row sampled in one call (the GPU's default) instead of the walks' rows
        return real(self, *args, lazy=False)

    for name, prop in props.items():
        got, m = run(prop)
        assert got == want, name
        accepted += m.accepted
        try:
            Engine._verify_sampled = eager
            assert run(prop)[0] == want, name
        finally:
            Engine._verify_sampled = real
    got, _ = run(NGramProposer(k=6, min_ngram=1), max_batch=2, speculation=AdaptiveSpeculation(max_depth=6))
    assert got == want
    assert accepted > 0  # drafts were accepted, not all refused
    mixed = [Request(prompts[0], params(20, temperature=0.9, top_p=0.95, top_k=40, seed=11)),
             Request(prompts[1], params(20))]  # a greedy request in the same batch keeps its greedy text
    res, _ = Engine(model, props["draft-model-tree"]).generate(mixed)
    greedy = Engine(model).generate([Request(prompts[1], params(20))])[0][0].output_ids
    assert [r.output_ids for r in res] == [want[0], greedy]

    def by_step(self, active, drafts, logits, positions, cu, depths, max_depth):  # planted: the step keys the coin
        by_steps = [[s.metrics.steps - 1 + 0 * p for p in ps] for s, ps in zip(active, positions)]
        return real(self, active, drafts, logits, by_steps, cu, depths, max_depth)

    try:
        Engine._verify_sampled = by_step
        planted_ar = run(None)[0]  # (autoregressive: one row a step, so the step is the position shifted)
        planted = [run(props[n])[0] for n in ("ngram-chain", "draft-model-tree")]
    finally:
        Engine._verify_sampled = real
    assert any(p != planted_ar for p in planted)


def test_coupled_path_walks_the_samples_through_the_tree():
    """coupled_path: from the root, the child whose token is its parent row's sample is accepted; the emitted tokens
    are the samples along the path, the first without a matching child included; a repeated sibling token takes the
    first such sibling; an empty draft emits the root's sample."""
    from spdkernels.runtime.engine import coupled_path
    from spdkernels.runtime.proposers import Draft

    tree = Draft(tokens=[5, 6, 7, 8, 6], parents=[-1, -1, 0, 1, -1])  # root -> 5 -> 7, root -> 6 -> 8, root -> 6
    samples = [6, 1, 8, 2, 9, 3]  # rows: root, node 0 .. node 4
    assert coupled_path(tree, samples) == ([6, 8, 9], [1, 3])
    assert coupled_path(tree, [5, 7, 0, 4, 0, 0]) == ([5, 7, 4], [0, 2])
    assert coupled_path(tree, [9, 0, 0, 0, 0, 0]) == ([9], [])
    assert coupled_path(Draft(), [3]) == ([3], [])
    chain = Draft(tokens=[1, 2, 3], parents=[-1, 0, 1])
    assert coupled_path(chain, [1, 2, 3, 4]) == ([1, 2, 3, 4], [0, 1, 2])  # all accepted: the bonus sample
    assert coupled_path(chain, [1, 5, 3, 4]) == ([1, 5], [0])


def test_verification_bench_runs_and_both_coupled_modes_agree(tmp_path):
    """python -m spdkernels.bench.verification on a small vocabulary: every case's lazy and eager coupled
    verification give the same tokens (checked inside the bench), one row per case in its JSON."""
    import json

    from spdkernels.bench import verification

    out = tmp_path / "v.json"
    assert verification.main(["--repeats", "1", "--vocab", "64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == [c[0] for c in verification.CASES]
    assert all(r["rejection_ms"] > 0 and r["lazy_ms"] > 0 and r["eager_ms"] > 0 for r in rows)
    assert verification.main(["--repeats", "0"]) == 2


def test_sampled_pdm_drafts_keep_their_text_in_any_batch(model, prompts):
    """The PDM proposer's sampled chains (rejection sampling, coins keyed by the step) next to other requests: a
    request's text with a seed is its text alone. The verification is chosen per request: a step where the request
    drafted nothing (its last token) is coupled whatever its batch-mates drafted (it followed the batch's choice,
    and the last token changed with the batch in half the seeds)."""
    from spdkernels.runtime.spd.proposer import PDMProposer
    from spdkernels.runtime.spd.train import untrained_pdm

    pdm = untrained_pdm(model, [0, 1, 2], layers=1, intermediate=32, noise=0.05)
    drafted = 0
    for seed in range(12):
        def a(seed=seed):
            return Request(prompts[0], params(6, temperature=1.0, seed=seed))

        b = Request(prompts[1], params(24, temperature=1.0, seed=1000 + seed))
        alone = Engine(model, PDMProposer(pdm, k=3)).generate([a()])[0][0].output_ids
        res, m = Engine(model, PDMProposer(pdm, k=3)).generate([a(), b])
        assert res[0].output_ids == alone, seed
        drafted += m.drafted
    assert drafted > 0


@pytest.mark.parametrize("name", ["none", "draft-model-tree"])
def test_first_token_distribution_matches_softmax(model, name):
    """4000 identical requests with different seeds: the first emitted token (verified against drafts of
    another model when there is a proposer) is distributed as softmax(logits / T). Chi-square over the
    vocabulary; the same statistic rejects the softmax at a slightly different temperature (power check)."""
    import scipy.stats as scipy_stats  # the test extra: a missing scipy fails the run, it is not skipped
    prompt = [3, 14, 15, 92, 65]
    temp, n = 0.7, 4000
    logits = prefill_logits(model, prompt, [len(prompt) - 1])[0].float()
    prop = None if name == "none" else proposers(model)[name]
    reqs = [Request(prompt, SamplingParams(max_new_tokens=3, temperature=temp, seed=s, ignore_eos=True))
            for s in range(n)]
    res, m = Engine(model, prop).generate(reqs)
    if prop is not None:
        assert m.drafted > 0
    counts = torch.bincount(torch.tensor([r.output_ids[0] for r in res]), minlength=CFG.vocab_size).double()

    def pvalue(p):
        exp = p.double() * n
        keep = exp >= 5
        obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
        ex = torch.cat([exp[keep], exp[~keep].sum(0, keepdim=True)])
        return scipy_stats.chisquare(obs.numpy(), ex.numpy() * obs.sum().item() / ex.sum().item()).pvalue

    assert pvalue(torch.softmax(logits / temp, -1)) > 1e-3
    assert pvalue(torch.softmax(logits / (temp * 1.25), -1)) < 1e-6


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"], "no such file"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "top_p"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "hi", "--temperature", "1e-300"], "temperature: expected 0 (greedy) or >= 1e-06"),
    (["generate", "--prompt", "hi", "--k", "0"], "--k"),
    (["generate", "--prompt", "hi", "--ngram-min", "4", "--ngram-max", "2"], "--ngram-min"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "max_new_tokens"),
    (["generate", "--prompt-file", "/no/such/prompts.txt"], "--prompt-file"),
    (["generate", "--prompt", "hi", "--max-batch", "0"], "--max-batch"),
    (["generate", "--prompt", "hi", "--max-batch", "2", "--proposer", "spd"], "--max-batch"),
])
def test_cli_user_errors_exit_2_without_traceback(argv, needle, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["none", "ngram-chain", "draft-model-tree"])
def test_continuous_batching_gives_the_same_outputs(model, prompts, reference, name):
    """max_batch=2 over requests of different lengths (greedy, and seeded sampling): the same outputs as one
    batch, every request admitted as another leaves (never more than 2 in flight), a cache sized for 2,
    the progress callback counting every request's tokens."""
    lengths = [24, 6, 24, 11, 3, 24]
    ps = [prompts[i % len(prompts)] for i in range(len(lengths))]

    def reqs(seed=None, **kw):
        return [Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True, seed=None if seed is None else seed + i,
                                          **kw)) for i, (p, n) in enumerate(zip(ps, lengths))]

    prop = None if name == "none" else proposers(model)[name]
    eng = Engine(model, prop, scrub_cache=True)
    in_flight, progress = [], []
    orig_step = eng._step

    def step(active, m):
        in_flight.append(len(active))
        orig_step(active, m)

    eng._step = step
    eng.on_step = progress.append
    res, m = eng.generate(reqs(), max_batch=2)
    assert [r.output_ids for r in res] == [reference[i % len(prompts)][:n] for i, n in enumerate(lengths)]
    assert max(in_flight) == 2 and in_flight.count(1) <= 1 + lengths[-1]  # refilled, not drained per pair
    assert progress == sorted(progress) and progress[-1] == sum(lengths)
    room = 1 + (prop.max_nodes if prop else 0)
    per_req = sorted((-(-(len(p) + n + room) // 16) + 1 for p, n in zip(ps, lengths)), reverse=True)
    assert eng.cache.num_blocks == sum(per_req[:2])
    if name == "none":  # seeded sampling, a seed per request: its coins are its own, whatever shares its batch
        a = [Engine(model).generate([r])[0][0].output_ids for r in reqs(temperature=0.9, seed=3)]
        b = [r.output_ids for r in Engine(model).generate(reqs(temperature=0.9, seed=3), max_batch=2)[0]]
        assert a == b and len({tuple(o[:3]) for o in a}) > 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_batch_is_checked(model, prompts, bad):
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model).generate([Request(prompts[0], params(4))], max_batch=bad)


def test_engine_rejects_bad_arguments(model):
    """Arguments of the wrong kind are ValueErrors naming them when the engine is built (a string as speculation
    failed inside the run, at its first step, with an AttributeError; a block size of 3 at the KV cache's creation)."""
    from spdkernels.runtime.speculation import AdaptiveSpeculation

    for kw, pattern in [(dict(proposer="ngram"), "proposer: expected a Proposer"),
                        (dict(speculation="cost"), "speculation: expected an AdaptiveSpeculation"),
                        (dict(block_size=3), "block_size: expected a power of two"),
                        (dict(block_size=16.0), "block_size"), (dict(eos_token_ids=2), "eos_token_ids"),
                        (dict(eos_token_ids=["2"]), "eos_token_ids: expected token ids")]:
        with pytest.raises(ValueError, match=pattern):
            Engine(model, **kw)
    eng = Engine(model, NGramProposer(k=2), eos_token_ids=(t for t in [5, 6]),
                 speculation=AdaptiveSpeculation(max_depth=2))
    assert eng.eos == {5, 6}


def test_engine_rejects_bad_requests(model):
    eng = Engine(model, None)
    with pytest.raises(ValueError, match="prompt_ids"):
        eng.generate([Request([1] * 500, params(100))])  # longer than the 512-token context
    with pytest.raises(ValueError, match="prompt_ids"):
        eng.generate([Request([CFG.vocab_size], params())])
    with pytest.raises(ValueError, match="top_k"):
        eng.generate([Request([1, 2], params(top_k=-1))])
    with pytest.raises(ValueError, match="layers"):
        Engine(model, EarlyExitProposer(layers=CFG.num_layers)).generate([Request([1, 2], params())])


class LetterTokenizer:
    """Token t decodes to one letter, chr(65 + t % 26): stop strings over the random model's text."""

    def decode(self, ids, skip_special=True):
        return "".join(chr(65 + t % 26) for t in ids)


def _with_stop(model, prompt, name, stop):
    prop = None if name == "none" else proposers(model)[name]
    r = Engine(model, prop, tokenizer=LetterTokenizer()).generate([Request(prompt, params(24, stop=stop))])[0][0]
    return r.output_ids, r.text, r.finish_reason


@pytest.mark.parametrize("name", ["ngram-chain", "ngram-tree", "draft-model-self", "draft-model-tree"])
def test_stop_strings_end_where_autoregressive_decoding_ends(model, prompts, name):
    """A stop string completed inside an accepted draft run ends the request at the token that completes it, as
    one token per step would: the ids after it are dropped, and with several stop strings the first one
    completed counts, cut where the earliest one in that text begins (the engine appended the whole run and cut
    the text at the earliest start of any stop string in it: draft-model-self, which accepts every draft, kept
    3 tokens past the stop and cut 'QMLG' / 'L' two letters early)."""
    for p in prompts:
        full = LetterTokenizer().decode(greedy_reference(model, p, 24))
        cases = [[full[5:7]], [full[5:9], full[7]], [full[9:12], full[2:4], "#"], [full[-2:]]]
        for stop in cases:
            want = _with_stop(model, p, "none", stop)
            assert want[2] == "stop"
            assert _with_stop(model, p, name, stop) == want, (stop, full)


def test_the_stop_check_sees_a_run_that_ends_past_the_stop(model, prompts):
    """The planted wrong variant: the same request with the stop strings checked once per accepted run (the old
    rule) keeps tokens past the stop, which the comparison above reports."""
    from spdkernels.runtime import engine as engine_mod

    p = prompts[0]
    full = LetterTokenizer().decode(greedy_reference(model, p, 24))
    right = _with_stop(model, p, "draft-model-self", [full[5:7]])
    orig = engine_mod.append_tokens

    def once_per_run(s, new, eos, tokenizer):
        orig(s, new, eos, None)  # ids only
        if s.params.stop and tokenizer is not None and s.text_cut is None:
            text = tokenizer.decode(s.output)
            cuts = [text.find(x) for x in s.params.stop if x in text]
            if cuts:
                s.text_cut, s.done, s.finish_reason = min(cuts), True, "stop"

    try:
        engine_mod.append_tokens = once_per_run
        wrong = _with_stop(model, p, "draft-model-self", [full[5:7]])
    finally:
        engine_mod.append_tokens = orig
    assert wrong[1] == right[1] and len(wrong[0]) > len(right[0])


@pytest.mark.parametrize("bs", [1, 2, 4, 8])
def test_draft_model_proposer_fits_any_block_size(model, prompts, reference, bs):
    """The draft model's own cache (16-position blocks) holds every request whatever the engine's block size
    (rounding the target's capacity down to 16-position blocks ran out at block sizes 1, 2 and 4)."""
    eng = Engine(model, DraftModelProposer(model, k=4), block_size=bs)
    res, _ = eng.generate([Request(p, params(24)) for p in prompts])
    assert [r.output_ids for r in res] == reference
    for p, ref in zip(prompts, reference):  # alone, where the engine sizes its cache for one request
        for n in (13, 14, 15):
            res, _ = eng.generate([Request(p, params(n))])
            assert res[0].output_ids == ref[:n]


def test_adaptive_lookup_depth_grows_after_a_fully_accepted_tree():
    """The adaptive n-gram depth grows when the accepted path reaches the draft's depth, for trees too (a tree's
    node count is more than any path accepts, which kept shrinking the depth)."""

    class St:
        rid = 0
        tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 10, 11, 12, 13, 14, 1, 2, 3]

    prop = NGramProposer(k=6, min_ngram=1, branches=2, adaptive=True)
    depths = []
    for _ in range(3):
        d = prop.propose([St()], [6])[0]
        assert len(d) == 2 * d.depth()  # two branches of the same depth
        prop.feedback(St(), len(d), d.depth())  # one whole branch accepted
        depths.append(d.depth())
    assert depths == [3, 5, 6]
    prop.feedback(St(), 12, 2)
    assert prop.propose([St()], [6])[0].parents.count(-1) == 2 and prop._depth[0] == 5


def test_request_fields_of_the_wrong_type_are_named(model):
    eng = Engine(model, None)
    bad = [
        (dict(prompt_ids=torch.tensor([1, 2])), "prompt_ids.*tolist"),
        (dict(prompt_ids=[1.5, 2]), "prompt_ids.*1.5"),
        (dict(prompt_ids=[True, 2]), "prompt_ids"),
        (dict(params=params(temperature="1")), "temperature"),
        (dict(params=params(temperature=None)), "temperature"),
        (dict(params=params(top_p=None)), "top_p"),
        (dict(params=SamplingParams(max_new_tokens=True)), "max_new_tokens"),
        (dict(params=params(seed=True)), "seed"),
        (dict(params=params(stop="ab")), "stop"),
        (dict(params=params(stop=[""])), "stop"),
        (dict(params=params(stop=None)), "stop"),
    ]
    for changes, pattern in bad:
        req = dict(prompt_ids=[1, 2], params=params(4))
        req.update(changes)
        with pytest.raises(ValueError, match=pattern):
            eng.generate([Request(**req)])
    # NumPy integers are integers
    import numpy as np

    res, _ = eng.generate([Request([np.int64(1), 2], SamplingParams(max_new_tokens=np.int64(2), ignore_eos=True))])
    assert len(res[0].output_ids) == 2


def test_an_aborted_run_leaves_no_request_state_behind(model, prompts):
    """Per-request state of the proposer and of the speculation controller is dropped when a run stops with an
    error, so a later run, whose requests take the same ids, starts as a fresh engine would."""
    from spdkernels.runtime.speculation import AdaptiveSpeculation

    def engine():
        spec = AdaptiveSpeculation(max_depth=6)
        spec.cost_model = lambda: (1.0, 0.3, 0.0)  # no timings: the depths depend on acceptance only
        return Engine(model, NGramProposer(k=6, min_ngram=1, adaptive=True), speculation=spec)

    calls = []

    def stop_after_3(n):
        calls.append(n)
        if len(calls) == 3:
            raise RuntimeError("stopped")

    reqs = lambda: [Request(p, params(16, temperature=0.8, seed=5 + i)) for i, p in enumerate(prompts)]  # noqa: E731
    eng = engine()
    eng.on_step = stop_after_3
    with pytest.raises(RuntimeError, match="stopped"):
        eng.generate(reqs())
    assert eng.proposer._depth == {} and eng.proposer._deepest == {} and eng.speculation._acc == {}
    eng.on_step = None
    again = [r.output_ids for r in eng.generate(reqs())[0]]
    assert again == [r.output_ids for r in engine().generate(reqs())[0]]


def test_duplicate_request_ids_name_both_requests(model):
    with pytest.raises(ValueError, match=r"rid: .*request 0 \(rid=1\) and request 1 \(no rid: its index, 1\)"):
        Engine(model, None).generate([Request([1, 2], params(2), rid=1), Request([3], params(2))])
    with pytest.raises(ValueError, match=r"rid: .*request 0 \(rid='a'\) and request 2 \(rid='a'\)"):
        Engine(model, None).generate([Request([1], params(2), rid="a"), Request([2], params(2)),
                                      Request([3], params(2), rid="a")])


# ---- the C++ skinny GEMM behind the runtime's fp32 forward ------------------------------------------

@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here "
                    "(SPDKERNELS_SKIP_CPP); runtime.linear then is F.linear itself")
@pytest.mark.parametrize("isa", ["best"] + [b.partition("@")[2] for b in cpp_lower_isas()])
@pytest.mark.parametrize("M,N,K", [(1, 7, 5), (3, 64, 96), (16, 130, 257), (48, 33, 1000)])
def test_skinny_linear_matches_torch(isa, M, N, K):
    """runtime.linear (csrc/linear.cpp for fp32 with <= 48 rows: 4-column tiles, N and K tails) against
    torch's GEMM in float64, on every instruction-set path this machine has: fp32 summation-order error only."""
    from spdkernels import _cpp
    from spdkernels.runtime.linear import linear

    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    want = (x.double() @ w.double().T + b.double()).float()
    with contextlib.ExitStack() as stack:
        if isa != "best":
            stack.enter_context(_cpp.isa_cap(isa))
        got = linear(x, w, b)
        got_nobias = linear(x, w)
    tol = 2e-6 * K ** 0.5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    torch.testing.assert_close(got_nobias, want - b, rtol=0, atol=tol)


def _exact_weights(fmt, N, K, g):
    """fp32 weights whose values a format holds exactly, as GGUF's quantisers make them (per block of 32 the
    largest |q| is 127 for Q8_0; the nibbles reach 0 and 15 for Q4_1; scales and mins binary16)."""
    if fmt == "f16":
        return torch.randn(N, K, generator=g).half().float()
    nb = K // 32
    d = (torch.rand(N, nb, 1, generator=g) * 0.02 + 1e-3).half().float()
    if fmt == "q8_0":
        q = torch.randint(-127, 128, (N, nb, 32), generator=g).float()
        q[..., 5] = 127 * torch.sign(torch.randn(N, nb, generator=g)).clamp_min(0).mul(2).sub(1)
        return (q * d).view(N, K)
    q = torch.randint(0, 16, (N, nb, 32), generator=g).float()
    q[..., 3], q[..., 20] = 0, 15
    m = (torch.randn(N, nb, 1, generator=g) * 0.05).half().float()
    return (q * d + m).view(N, K)


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here "
                    "(SPDKERNELS_SKIP_CPP); runtime.linear then is F.linear itself")
@pytest.mark.parametrize("isa", ["best"] + [b.partition("@")[2] for b in cpp_lower_isas()])
@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q4_1"])
@pytest.mark.parametrize("M,N,K", [(1, 7, 64), (2, 64, 96), (3, 130, 576), (8, 33, 1024), (5, 6, 4128), (48, 5, 32),
                                   (49, 9, 64), (128, 5, 64), (192, 6, 96), (193, 9, 64)])
def test_packed_linear_equals_fp32_bitwise(isa, fmt, M, N, K):
    """Packed weights (csrc/linear.cpp: fp16, Q8_0, Q4_1 widened into a per-thread fp32 buffer, on the stack up to
    K = 4096, on the heap beyond, or on AVX2 in registers by the first pass) give exactly the fp32 kernel's output
    for the same values, on every instruction-set path, and f16 rows with a K tail. Up to packed_max_rows() rows
    (192 on AVX-512 and AVX2, 48 on baseline x86-64) that is the skinny kernel's (fp32 weights leave it for
    BLAS above 48 rows: the comparison then calls the fp32 kernel itself); beyond, F.linear on the dequantised
    matrix (which checks dequantize())."""
    from spdkernels import _cpp
    from spdkernels.runtime.linear import SKINNY_MAX_ROWS, PackedWeight, linear, pack_exact, packed_max_rows

    def fp32(x, w, b=None):  # the fp32 weights through the path the packed ones take at this row count (and ISA)
        if SKINNY_MAX_ROWS < x.shape[0] <= packed_max_rows():
            return torch.ops.spdkernels._cpu_skinny_linear.default(x, w, b)
        return linear(x, w, b)

    if fmt == "f16" and K % 8 == 0:
        K += 5  # the f16 path has a scalar K tail; the block formats need K % 32 == 0
    g = torch.Generator().manual_seed(M * 7919 + N * 31 + K)
    w = _exact_weights(fmt, N, K, g)
    x, b = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    p = pack_exact(w, formats=(fmt,))
    assert isinstance(p, PackedWeight) and p.format == fmt and p.shape == (N, K)
    assert torch.equal(p.dequantize(), w)
    assert p.nbytes < w.numel() * 4
    with contextlib.ExitStack() as stack:
        if isa != "best":
            stack.enter_context(_cpp.isa_cap(isa))
        want, got = fp32(x, w, b), linear(x, p, b)
        want0, got0 = fp32(x, w), linear(x, p)
        rows = torch.tensor([N - 1, 0])
        sub, sub_want = linear(x, p.index_rows(rows)), fp32(x, w[rows])
        sl, sl_want = linear(x, p[1:N]), fp32(x, w[1:N])
        skinny = M <= packed_max_rows()  # (under the cap: the limit depends on the instruction set)
    assert torch.equal(got, want) and torch.equal(got0, want0)
    # (a sub-matrix against the fp32 weights' same sub-matrix: above the limit both go to BLAS, whose result for a
    # column can depend on N (MKL on an AMD EPYC: a 2-column product differs from those columns of a 9-column one))
    assert torch.equal(sub, sub_want) and torch.equal(sl, sl_want)
    if skinny:  # the skinny kernel: each column on its own
        assert torch.equal(sub, want0[:, rows]) and torch.equal(sl, want0[:, 1:N])
    ref = (x.double() @ w.double().T + b.double()).float()  # and both are the product, to fp32 rounding
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6 * K ** 0.5 * float(ref.abs().max()))


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")
@pytest.mark.parametrize("isa", ["best"] + [b.partition("@")[2] for b in cpp_lower_isas()])
@pytest.mark.parametrize("K", [576, 4096, 4128])
def test_packed_linear_strided_rows_bias_and_long_k(isa, K):
    """Every packed format against the fp32 kernel bit for bit for 1 to 9 token rows, with x rows strided (a column
    slice of a wider tensor: row stride != K), a bias, N with a partial last block of 3 weight rows, and K at and
    past the 4096 floats of the stack buffer (on AVX2 the first pass of up to 3 rows widens in registers at any K;
    on AVX-512 up to 8 rows are widened in registers at any K, 5 to 8 two weight rows at a time, the 3rd of the
    partial block alone; later passes use the stack buffer up to K = 4096, the heap beyond)."""
    from spdkernels import _cpp
    from spdkernels.runtime.linear import pack_exact

    g = torch.Generator().manual_seed(K)
    N = 11
    wide = torch.randn(9, K + 24, generator=g)
    x = wide[:, 8:8 + K]
    assert x.stride(0) == K + 24 and x.stride(1) == 1
    b = torch.randn(N, generator=g)
    with contextlib.ExitStack() as stack:
        if isa != "best":
            stack.enter_context(_cpp.isa_cap(isa))
        for fmt in ("q8_0", "q4_1", "f16"):
            w = _exact_weights(fmt, N, K, g)
            p = pack_exact(w, formats=(fmt,))
            for M in range(1, 10):
                got = torch.ops.spdkernels._cpu_skinny_linear_packed.default(x[:M], p.format, p.data, p.scale, p.min, b)
                want = torch.ops.spdkernels._cpu_skinny_linear.default(x[:M].contiguous(), w, b)
                assert torch.equal(got, want), (fmt, M)
            empty = torch.ops.spdkernels._cpu_skinny_linear_packed.default(x[:0], p.format, p.data, p.scale, p.min, b)
            assert empty.shape == (0, N)


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")
def test_packed_linear_layout_errors_are_caught():
    """The bitwise comparison above catches a wrong layout: the same Q4_1 bytes read with the nibbles of a
    block in pairs (2i, 2i + 1) instead of (i, i + 16), or a scale moved to the next block, change the output."""
    from spdkernels.runtime.linear import PackedWeight, linear, pack_exact

    g = torch.Generator().manual_seed(3)
    w = _exact_weights("q4_1", 8, 64, g)
    x = torch.randn(2, 64, generator=g)
    p = pack_exact(w, formats=("q4_1",))
    q = torch.cat([p.data.view(8, 2, 16) & 15, p.data.view(8, 2, 16) >> 4], -1)  # [N, blocks, 32]
    pairs = (q[..., 0::2] | (q[..., 1::2] << 4)).view(8, 32)  # weights 2i / 2i+1 in byte i
    wrong = PackedWeight("q4_1", pairs.contiguous(), p.scale, p.min, p.shape)
    assert not torch.equal(linear(x, wrong), linear(x, w))
    rolled = PackedWeight("q4_1", p.data, p.scale.roll(1, dims=1).contiguous(), p.min, p.shape)
    assert not torch.equal(linear(x, rolled), linear(x, w))


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")
@pytest.mark.parametrize("isa", ["best"] + [b.partition("@")[2] for b in cpp_lower_isas()])
def test_packed_linear_rows_do_not_depend_on_the_batch(isa):
    """With packed weights every row's output is the same whether it is computed alone or among up to
    packed_max_rows() rows (the skinny kernel's fixed order, past the 48 rows where fp32 weights go to BLAS: 192
    on AVX-512 and AVX2), so a decoding batch of that many rows gives each request its batch-1 logits. A row in
    a batch of more rows than that goes to BLAS, and is only close. Every row count up to 13 is checked, for Q8_0,
    f16 and fp32 weights too: the tiles take the token rows in passes of 1, 2 or 3 (AVX2) or of up to 4 (AVX-512)
    by the count, on AVX2 the first pass widens packed weights in registers, on AVX-512 up to 8 rows do."""
    from spdkernels import _cpp
    from spdkernels.runtime.linear import linear, pack_exact, packed_max_rows

    g = torch.Generator().manual_seed(11)
    w = _exact_weights("q4_1", 37, 576, g)
    p = pack_exact(w, formats=("q4_1",))
    with contextlib.ExitStack() as stack:
        if isa != "best":
            stack.enter_context(_cpp.isa_cap(isa))
        top = packed_max_rows()
        x = torch.randn(top + 8, 576, generator=g)
        alone = torch.cat([linear(x[i:i + 1], p) for i in range(x.shape[0])])
        # every pass layout up to 9 rows, then around the limits (48 for fp32 weights, packed_max_rows())
        for M in sorted({*range(2, 10), 13, min(49, top), min(90, top), min(128, top), top - 1, top}):
            assert torch.equal(linear(x[:M], p), alone[:M]), M
            assert torch.equal(linear(x[x.shape[0] - M:], p), alone[x.shape[0] - M:]), M
        # fp32 weights through the same tiles (K with an 8-lane tail), each row alone against within a batch
        wf, xf = torch.randn(37, 581, generator=g), torch.randn(13, 581, generator=g)
        alone_f = torch.cat([linear(xf[i:i + 1], wf) for i in range(13)])
        for M in range(2, 14):
            assert torch.equal(linear(xf[:M], wf), alone_f[:M]), M
        # Q8_0 and f16 weights (AVX2, K % 32 == 0: widened in registers for the first pass of 1 to 3 rows, and
        # stored from there for later passes), each row alone against within a batch and against the fp32 kernel
        for fmt in ("q8_0", "f16"):
            wq = _exact_weights(fmt, 37, 576, g)
            pq = pack_exact(wq, formats=(fmt,))
            alone_q = torch.cat([linear(x[i:i + 1], pq) for i in range(13)])
            assert torch.equal(alone_q, torch.ops.spdkernels._cpu_skinny_linear.default(x[:13], wq, None)), fmt
            for M in range(2, 14):
                assert torch.equal(linear(x[:M], pq), alone_q[:M]), (fmt, M)
        big = linear(x, p)
    torch.testing.assert_close(big, alone, rtol=0, atol=1e-5 * float(alone.abs().max()))


def _gguf_like(sd, g):
    """A state dict with every matrix whose K is a multiple of 32 made of Q4_1 values (the LM head Q8_0), as
    a GGUF checkpoint dequantised at load; other tensors unchanged."""
    out = {}
    for k, v in sd.items():
        v = v.float()
        if v.dim() == 2 and v.shape[1] % 32 == 0 and "embed" not in k:
            v = _exact_weights("q8_0" if k == "lm_head.weight" else "q4_1", *v.shape, g)
        out[k] = v
    return out


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP): "
                    "models are not packed without it (the next test)")
def test_packed_model_equals_unpacked_model():
    """A model whose checkpoint holds GGUF block values runs packed by default (CPU fp32): its logits (prefill
    and decode rows) and its greedy tokens, autoregressive and speculative, are the unpacked model's bit for bit
    (up to 48 rows, where both run the skinny kernel, and past packed_max_rows(), where both run BLAS on the
    same values; in between the fp32 model runs BLAS and the packed one the skinny kernel: close, not equal)."""
    from spdkernels.runtime.linear import PackedWeight

    cfg = random_config(num_layers=2, intermediate_size=128)
    sd = _gguf_like(random_state_dict(cfg), torch.Generator().manual_seed(5))
    packed, plain = LlamaModel(cfg, sd), LlamaModel(cfg, sd, packed=False)
    assert packed.packed and not plain.packed
    assert isinstance(packed.head_weight, PackedWeight) and packed.head_weight.format == "q8_0"
    assert all(isinstance(getattr(L, n), PackedWeight) and getattr(L, n).format == "q4_1"
               for L in packed.layers for n in ("w_qkv", "w_o", "w_gate_up", "w_down"))
    assert torch.equal(packed.lm_head, plain.lm_head)  # the fp32 head stays for indexing
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 8, 41]
    rows = list(range(len(prompt)))  # 20 rows: the skinny kernel for both
    assert torch.equal(prefill_logits(packed, prompt, rows), prefill_logits(plain, prompt, rows))
    long = prompt * 10  # 200 rows: BLAS for both (the packed model dequantises)
    assert torch.equal(prefill_logits(packed, long, [199]), prefill_logits(plain, long, [199]))
    a, b = prefill_logits(packed, prompt * 3, [59]), prefill_logits(plain, prompt * 3, [59])  # 60 rows
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    p = SamplingParams(max_new_tokens=24)
    for prop in (None, NGramProposer(k=4, max_ngram=2)):
        a = Engine(packed, prop).generate([Request(prompt, p)])[0][0].output_ids
        b = Engine(plain, prop).generate([Request(prompt, p)])[0][0].output_ids
        assert a == b and len(a) == 24
    assert not LlamaModel(cfg, {k: v.double() for k, v in sd.items()}, dtype=torch.float64).packed


def test_model_is_not_packed_without_the_extension(monkeypatch):
    """Without the C++ extension a packed matrix would be widened whole for every product (the skinny GEMM is the
    extension's): 2.8x the time of fp32 weights for a prefill of the embedded model. The model then holds fp32
    tensors, whatever ``packed`` asks for."""
    from spdkernels import _cpp

    cfg = random_config(num_layers=2, intermediate_size=128)
    sd = _gguf_like(random_state_dict(cfg), torch.Generator().manual_seed(5))
    monkeypatch.setattr(_cpp, "load", lambda: False)
    m = LlamaModel(cfg, sd)
    assert not m.packed and all(isinstance(w, torch.Tensor) for w in m.matrices())


def test_pack_exact_keeps_what_it_cannot_hold_exactly():
    """pack_exact only packs values it reproduces bit for bit: random fp32, non-finite values, a Q8_0 block
    whose largest |q| is not 127, K not a multiple of 32 for the block formats, non-fp32 or 1-D input come back
    unchanged (or in a wider format that holds them); an unknown format is a ValueError."""
    from spdkernels.runtime.linear import PackedWeight, pack_exact

    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, 64, generator=g)
    assert pack_exact(r) is r
    q8 = _exact_weights("q8_0", 4, 64, g)
    assert pack_exact(q8).format == "q8_0"
    bad = q8.clone()
    bad[0, 0] = float("nan")
    assert pack_exact(bad) is bad
    half = q8 * 0.5 + 1e-7  # no longer scale x int8 with a 127 in every block
    assert not isinstance(pack_exact(half, formats=("q8_0",)), PackedWeight)
    f16 = _exact_weights("f16", 4, 40, g)  # K = 40: only f16 applies
    assert pack_exact(f16).format == "f16"
    assert not isinstance(pack_exact(_exact_weights("q4_1", 4, 64, g)[:, :40].contiguous(),
                                     formats=("q4_1", "q8_0")), PackedWeight)
    for x in (r.double(), r[0]):
        assert pack_exact(x) is x
    q4 = _exact_weights("q4_1", 4, 64, g)
    assert pack_exact(q4).format == "q4_1" and pack_exact(q4, formats=("f16",)) is q4
    with pytest.raises(ValueError, match="formats"):
        pack_exact(q4, formats=("q5_k",))
    p = pack_exact(q4)
    with pytest.raises(ValueError, match="scale"):  # scale x nibble would round, differently per instruction set
        PackedWeight("q4_1", p.data, p.scale + 1e-6, p.min, p.shape)
    with pytest.raises(ValueError, match="format"):
        PackedWeight("q5_k", p.data, p.scale, p.min, p.shape)


def test_packed_weight_cat_and_state_dict_block_forms():
    """PackedWeight.cat stacks rows as torch.cat stacks the fp32 weights (None for parts of two formats or
    widths); a StateDict hands out a block form only while it gives exactly the values of the fp32 tensor under its
    name (modified through .data or numpy, which autograd's version counter does not see, it gets none)."""
    from spdkernels.runtime.linear import PackedWeight, pack_exact
    from spdkernels.runtime.weights import StateDict

    g = torch.Generator().manual_seed(1)
    a, b = (pack_exact(_exact_weights("q4_1", n, 64, g)) for n in (3, 5))
    c = PackedWeight.cat([a, b])
    assert c.format == "q4_1" and c.shape == (8, 64)
    assert torch.equal(c.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    q8 = pack_exact(_exact_weights("q8_0", 2, 64, g))
    assert q8.format == "q8_0" and PackedWeight.cat([a, q8]) is None and PackedWeight.cat([]) is None
    assert PackedWeight.cat([a, pack_exact(_exact_weights("q4_1", 2, 96, g))]) is None

    t = a.dequantize()
    sd = StateDict(w=t, v=torch.ones(3))
    sd.keep_packed("w", a)
    assert sd.packed_form("w") is a and sd.packed_form("v") is None
    sub = sd.subset(["w"])
    assert list(sub) == ["w"] and sub.packed_form("w") is a
    with pytest.raises(ValueError, match="packed"):
        sd.keep_packed("v", a)
    import pickle

    again = pickle.loads(pickle.dumps(sd))  # another process gets a plain dict
    assert type(again) is dict and sorted(again) == ["v", "w"] and torch.equal(again["w"], t)
    sub["w"] = t.clone()  # another tensor with the same values: still its blocks
    assert sub.packed_form("w") is a
    sub["w"] = t.double()  # not fp32
    assert sub.packed_form("w") is None and sd.packed_form("w") is a
    first = float(t[0, 0])
    t.data[0, 0] += 1  # modified in place, even where autograd's version counter does not see it
    assert sd.packed_form("w") is None
    t.numpy()[0, 0] = first  # the same values again
    assert sd.packed_form("w") is a
    sd.drop_packed()
    assert sd.packed_form("w") is None


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")
def test_packed_linear_op_refuses_bad_input():
    """The packed op checks every tensor against its format before reading it: a ValueError naming it."""
    op = torch.ops.spdkernels._cpu_skinny_linear_packed.default
    x = torch.randn(2, 64)
    q = torch.zeros(3, 64, dtype=torch.int8)
    s = torch.ones(3, 2)
    cases = [
        (("q5", q, s, None, None), "format"),
        (("q8_0", q.float(), s, None, None), "weight"),
        (("q8_0", q[:, :32], s, None, None), "weight"),
        (("q8_0", q, None, None, None), "scale"),
        (("q8_0", q, s[:, :1], None, None), "scale"),
        (("q8_0", q, s.double(), None, None), "scale"),
        (("q8_0", q, s, s, None), "min"),
        (("q4_1", torch.zeros(3, 32, dtype=torch.uint8), s, None, None), "min"),
        (("q4_1", torch.zeros(3, 64, dtype=torch.uint8), s, s, None), "weight"),
        (("f16", q.half(), s, None, None), "scale"),
        (("q8_0", q, s, None, torch.ones(4)), "bias"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            op(x, *args)
    with pytest.raises(ValueError, match="multiple of 32"):
        op(torch.randn(2, 48), "q8_0", torch.zeros(3, 48, dtype=torch.int8), torch.ones(3, 1), None, None)
    with pytest.raises(ValueError, match="x"):
        op(x.double(), "f16", q.half(), None, None, None)
    widen = torch.ops.spdkernels._cpu_widen_packed.default  # the same checks, K taken from the weight's columns:
    # a weight of the wrong width is then named through the scales that do not match it
    names = ["format", "weight", "scale", "scale", "scale", "scale", "min", "min", "scale", "scale"]
    for (args, _), name in zip(cases[:-1], names):
        with pytest.raises(ValueError, match=f"^{name}:"):
            widen(*args[:4])
    with pytest.raises(ValueError, match="multiple of 32"):
        widen("q8_0", torch.zeros(3, 48, dtype=torch.int8), torch.ones(3, 1), None)
    with pytest.raises(ValueError, match="weight"):
        widen("q8_0", torch.zeros(3, dtype=torch.int8), torch.ones(3, 1), None)


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")
@pytest.mark.parametrize("isa", ["best"] + [b.partition("@")[2] for b in cpp_lower_isas()])
@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q4_1"])
def test_widen_packed_equals_torch_dequantize(isa, fmt):
    """PackedWeight.dequantize() on a CPU is the C++ widening (_cpu_widen_packed: one threaded pass, the skinny
    kernel's own widening, for the BLAS path above packed_max_rows()): bit for bit the torch definition and the
    original fp32 values, on every instruction-set path, for N not a multiple of 4, row slices (strided scales)
    and an f16 K tail; a planted wrong nibble order is caught."""
    from spdkernels import _cpp
    from spdkernels.runtime.linear import PackedWeight, pack_exact

    g = torch.Generator().manual_seed(17)
    for N, K in ((1, 64), (7, 96), (130, 576), (9, 1536)):
        if fmt == "f16":
            K += 3
        w = _exact_weights(fmt, N, K, g)
        p = pack_exact(w, formats=(fmt,))
        with contextlib.ExitStack() as stack:
            if isa != "best":
                stack.enter_context(_cpp.isa_cap(isa))
            got, sub = p.dequantize(), p[1:N].dequantize()
        assert torch.equal(got, w) and torch.equal(got, p.dequantize_torch()) and torch.equal(sub, w[1:N])
    if fmt == "q4_1":
        q = torch.cat([p.data.view(N, -1, 16) & 15, p.data.view(N, -1, 16) >> 4], -1)
        pairs = (q[..., 0::2] | (q[..., 1::2] << 4)).view(N, K // 2).contiguous()
        assert not torch.equal(PackedWeight("q4_1", pairs, p.scale, p.min, p.shape).dequantize(), w)


# ---- the one-pass RMSNorm and rotary embedding (csrc/norm_rope.cpp) --------------------------------------------

needs_cpp = pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here "
                               "(SPDKERNELS_SKIP_CPP)")


def _torch_rotate(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


@needs_cpp
@pytest.mark.parametrize("T", [1, 5, 300])  # 300 rows: the threaded path
def test_one_pass_rotary_equals_the_torch_ops_bitwise(T):
    """q and k as the layer makes them (views of the fused QKV output, strided), the embedded model's tables at random
    positions: the C++ pass equals x * cos + cat(-x2, x1) * sin bit for bit (model.rotate too, whichever it runs)."""
    from spdkernels.runtime.model import rope_tables, rotate

    c = random_config(num_heads=6, num_kv_heads=2, hidden_size=6 * 64)
    cos_t, sin_t = rope_tables(c, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(7)
    pos = torch.randint(0, cos_t.shape[0], (T,), generator=gen)
    cos, sin = cos_t[pos][:, None, :], sin_t[pos][:, None, :]
    qkv = torch.randn(T, 10 * 64, generator=gen) * 3
    for x in (qkv[:, :6 * 64].view(T, 6, 64), qkv[:, 6 * 64:8 * 64].view(T, 2, 64)):
        want = _torch_rotate(x, cos, sin)
        got = torch.ops.spdkernels._cpu_rotary(x, cos[:, 0], sin[:, 0])  # [T, D] tables, or [T, 1, D] as the layer
        assert got.is_contiguous() and torch.equal(got, want)
        assert torch.equal(torch.ops.spdkernels._cpu_rotary(x, cos, sin), want)
        assert torch.equal(rotate(x, cos, sin), want) and torch.equal(rotate(x, cos, sin, True), want)
    # the bitwise comparison sees a single rounding: the same formula evaluated in fp64 and rounded once differs
    x = qkv[:, :6 * 64].view(T, 6, 64)
    once = _torch_rotate(x.double(), cos.double(), sin.double()).float()
    assert not torch.equal(once, _torch_rotate(x, cos, sin))


@needs_cpp
@pytest.mark.parametrize("T", [1, 7, 200])  # 200 rows of 576: the threaded path
def test_one_pass_rms_norm_matches_torch_and_each_row_stands_alone(T):
    """Within 2 ulp-ish of torch's rms_norm and of an fp64 evaluation; each row's result equals that row normalised
    alone bit for bit (no dependence on the batch or the thread split); model.rms_norm gives the C++ result."""
    from spdkernels.runtime.model import rms_norm

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(T, 576, generator=gen) * torch.rand(T, 1, generator=gen) * 10
    w = torch.randn(576, generator=gen)
    got = torch.ops.spdkernels._cpu_rms_norm(x, w, 1e-5)
    exact = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double())
    scale = exact.abs().max()
    assert float((got.double() - exact).abs().max()) <= 4e-7 * float(scale)
    assert torch.allclose(got, torch.nn.functional.rms_norm(x, (576,), w, 1e-5), rtol=1e-6, atol=1e-6 * float(scale))
    for t in {0, T // 2, T - 1}:
        assert torch.equal(torch.ops.spdkernels._cpu_rms_norm(x[t:t + 1].clone(), w, 1e-5)[0], got[t])
    assert torch.equal(rms_norm(x, w, 1e-5), got)
    strided = torch.randn(T, 2 * 576, generator=gen)[:, ::2]  # rows with non-unit stride: copied, same values
    assert torch.equal(torch.ops.spdkernels._cpu_rms_norm(strided, w, 1e-5),
                       torch.ops.spdkernels._cpu_rms_norm(strided.contiguous(), w, 1e-5))


def _ops_in_forward(model):
    """The spdkernels ops that a forward of ``model`` over 4 tokens runs (by the profiler), and its logits."""
    from spdkernels.runtime.model import build_batch

    cache = model.new_cache(4, 16)
    cache.add(0)
    b = build_batch(cache, [0], [0], [list(range(4))], tokens=[1, 2, 3, 4])
    with torch.profiler.profile() as prof:
        out = model.forward(b, cache)
    return {e.name for e in prof.events() if e.name.startswith("spdkernels::")}, out


@needs_cpp
def test_one_pass_steps_run_in_the_model_forward_unless_gradients_flow(monkeypatch):
    """An fp32 CPU forward runs the C++ norm and rotary passes (and tree_attention's C++ kernel). When a weight
    requires gradients (w_o of a one-layer model: upstream of its second norm, the MLP and the final norm, after its
    attention), the forward runs torch's norm and rotary ops instead, gives the same logits to fp32 rounding, and the
    gradient reaches w_o as the torch ops give it. With a later layer, whose attention would need the gradient
    (tree_attention is an inference op), the forward is a ValueError naming q, not a gradient without that path."""
    from spdkernels.runtime.model import LlamaModel

    m = LlamaModel(random_config(), random_state_dict(random_config(), seed=3), packed=False)
    m.layers[0].w_o = m.layers[0].w_o.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="^q: requires grad, and spdkernels::tree_attention is an inference op"):
        _ops_in_forward(m)
    with torch.no_grad():
        _ops_in_forward(m)
    c = random_config(num_layers=1)
    sd = random_state_dict(c, seed=3)
    ops, want = _ops_in_forward(LlamaModel(c, sd, packed=False))
    assert {"spdkernels::_cpu_rms_norm", "spdkernels::_cpu_rotary", "spdkernels::tree_attention"} <= ops, ops
    grads = []
    for one_pass in (True, False):
        m = LlamaModel(c, sd, packed=False)
        m.layers[0].w_o = m.layers[0].w_o.clone().requires_grad_(True)
        with monkeypatch.context() as mp:
            if not one_pass:  # the torch ops everywhere (the reference for the gradient)
                mp.setattr("spdkernels.runtime.model._one_pass", lambda *a: False)
                mp.setattr("spdkernels.runtime.model._layer_one_pass", lambda *a: False)
            ops, out = _ops_in_forward(m)
        assert not ops & {"spdkernels::_cpu_rms_norm", "spdkernels::_cpu_rotary"}, ops
        torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
        out.sum().backward()
        grads.append(m.layers[0].w_o.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


@needs_cpp
def test_one_pass_steps_leave_training_to_torch_and_name_bad_input():
    """With gradients wanted (the PDM's training) the layer uses the torch ops; bad input is a ValueError naming the
    argument."""
    from spdkernels.runtime.model import rms_norm, rotate

    w = torch.randn(64, requires_grad=True)
    x = torch.randn(3, 64)
    rms_norm(x, w, 1e-6).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    xg = torch.randn(2, 3, 64, requires_grad=True)
    cos, sin = torch.rand(2, 1, 64), torch.rand(2, 1, 64)
    rotate(xg, cos, sin).sum().backward()
    assert torch.allclose(xg.grad, (cos + torch.cat([sin[..., 32:], -sin[..., :32]], -1)).expand(2, 3, 64))
    rn, ro = torch.ops.spdkernels._cpu_rms_norm, torch.ops.spdkernels._cpu_rotary
    bad = {
        "x: expected dtype": lambda: rn(x.double(), w.detach(), 1e-6),
        "weight: expected shape": lambda: rn(x, torch.ones(63), 1e-6),
        "eps: expected a finite": lambda: rn(x, w.detach(), float("nan")),
        "x: expected an even head dim": lambda: ro(torch.randn(2, 3, 63), torch.rand(2, 63), torch.rand(2, 63)),
        "cos: expected shape": lambda: ro(torch.randn(2, 3, 64), torch.rand(3, 64), torch.rand(3, 64)),
        "cos: expected shape ": lambda: ro(torch.randn(2, 3, 64), torch.rand(2, 2, 64), torch.rand(2, 2, 64)),
        "sin: expected the shape of cos": lambda: ro(torch.randn(2, 3, 64), torch.rand(2, 64), torch.rand(2, 32)),
        "x: expected 3 dimension": lambda: ro(torch.randn(2, 64), torch.rand(2, 64), torch.rand(2, 64)),
    }
    for msg, fn in bad.items():
        with pytest.raises(ValueError, match=f"^{msg}"):
            fn()


def _gguf_bytes(endian, kvs, n_tensors=0, cut=0):
    """A GGUF header and metadata section (no tensors) in ``endian`` byte order: ``kvs`` = [(key, type, payload
    bytes)], payloads written by the caller in the same order."""
    import struct

    b = b"GGUF" + struct.pack(endian + "IQQ", 3, n_tensors, len(kvs))
    for key, t, payload in kvs:
        b += struct.pack(endian + "Q", len(key)) + key.encode() + struct.pack(endian + "I", t) + payload
    return b[:len(b) - cut]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_the_gguf_reader_follows_the_format(tmp_path, endian):
    """spdkernels.runtime.gguf_file.read_gguf on hand-made files in both byte orders: scalars of every type,
    strings, arrays of values, of strings and of arrays, and a tensor table (an f32 and a Q8_0 tensor after the
    aligned data start) read back exactly; a file cut short, an array or a string array longer than the file, an
    unknown type, a tensor past the end, a repeated key or tensor and a bad alignment are named."""
    import struct

    import numpy as np

    from spdkernels.runtime.gguf_file import GGUFFormatError, read_gguf

    def s(x):
        return struct.pack(endian + "Q", len(x.encode())) + x.encode()

    scalars = {0: ("B", 200), 1: ("b", -3), 2: ("H", 60000), 3: ("h", -7), 4: ("I", 7), 5: ("i", -9), 6: ("f", 1.5),
               7: ("?", True), 10: ("Q", 2 ** 40), 11: ("q", -(2 ** 40)), 12: ("d", 0.1)}
    kvs = [("general.architecture", 8, s("llama")), ("text", 8, s("héllo"))]
    kvs += [(f"v{t}", t, struct.pack(endian + c, v)) for t, (c, v) in scalars.items()]
    kvs += [("a.ints", 9, struct.pack(endian + "IQ", 5, 3) + struct.pack(endian + "3i", 1, -2, 3)),
            ("a.strs", 9, struct.pack(endian + "IQ", 8, 2) + s("ab") + s("")),
            ("a.nested", 9, struct.pack(endian + "IQ", 9, 2) + struct.pack(endian + "IQ", 0, 2) + bytes([4, 5])
             + struct.pack(endian + "IQ", 8, 1) + s("z"))]
    want = {"general.architecture": "llama", "text": "héllo", **{f"v{t}": v for t, (_, v) in scalars.items()},
            "a.ints": [1, -2, 3], "a.strs": ["ab", ""], "a.nested": [[4, 5], ["z"]]}
    f = tmp_path / "m.gguf"
    f.write_bytes(_gguf_bytes(endian, kvs))
    g = read_gguf(f)
    assert g.byte_order == endian and g.version == 3 and g.tensors == []
    assert g.fields == want
    # a tensor table: f32 [3, 2] (dims innermost first: 2 then 3), then Q8_0 [1, 32] at the next multiple of 32
    vals = np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5
    q8 = struct.pack("<e", 0.5) + bytes(range(32))  # one Q8_0 block: fp16 scale + 32 int8

    def with_tensors(tensors, data, alignment=None, n_tensors=None):
        extra = [] if alignment is None else [("general.alignment", 4, struct.pack(endian + "I", alignment))]
        head = _gguf_bytes(endian, kvs + extra, n_tensors=len(tensors) if n_tensors is None else n_tensors)
        for name, dims, t, off in tensors:
            head += s(name) + struct.pack(endian + "I", len(dims)) + struct.pack(endian + f"{len(dims)}Q", *dims)
            head += struct.pack(endian + "IQ", t, off)
        return head + bytes(-len(head) % (alignment or 32)) + data

    plain = vals.astype(np.dtype(np.float32).newbyteorder(endian)).tobytes()
    table = [("w", (2, 3), 0, 0)] + ([("q", (32, 1), 8, 32)] if endian == "<" else [])
    f.write_bytes(with_tensors(table, plain + bytes(32 - len(plain)) + (q8 if endian == "<" else b"")))
    g = read_gguf(f)
    assert [t.name for t in g.tensors] == [n for n, *_ in table] and g.tensors[0].shape == (2, 3)
    # in this machine's byte order (readers such as gguf.quants view the bytes as native numbers)
    assert g.tensors[0].data.dtype.isnative and np.array_equal(g.tensors[0].data, vals)
    from spdkernels.runtime.weights import dequantize_gguf
    assert torch.equal(dequantize_gguf(g.tensors[0]), torch.from_numpy(vals))
    if endian == "<":
        import gguf
        assert g.tensors[1].data.shape == (1, 34) and bytes(g.tensors[1].data[0]) == q8
        assert gguf.quants.dequantize(g.tensors[1].data, gguf.GGMLQuantizationType.Q8_0).tolist() == \
            [[0.5 * i for i in range(32)]]
    else:  # a quantised tensor in a byte-swapped file: its block scales would be read wrong
        f.write_bytes(with_tensors([("q", (32, 1), 8, 0)], q8))
        with pytest.raises(GGUFFormatError, match="quantised .* byte-swapped"):
            read_gguf(f)
    bad = {
        "truncated or corrupt": _gguf_bytes(endian, kvs, cut=3),
        "truncated or corrupt .*an array of 1000000000000 values": _gguf_bytes(
            endian, kvs[:1] + [("a.huge", 9, struct.pack(endian + "IQ", 4, 10 ** 12))]),
        "truncated or corrupt .*an array of 1000000000000 strings": _gguf_bytes(
            endian, kvs[:1] + [("a.huge", 9, struct.pack(endian + "IQ", 8, 10 ** 12))]),
        "unknown type 13": _gguf_bytes(endian, [("a.odd", 13, b"")]),
        "'text' appears twice": _gguf_bytes(endian, kvs + kvs[1:2]),
        "tensor w: 24 bytes at offset": with_tensors([("w", (2, 3), 0, 0)], plain[:20]),
        "tensor w appears twice": with_tensors([("w", (2, 3), 0, 0), ("w", (2, 3), 0, 0)], plain),
        "tensor w has unknown ggml type 99": with_tensors([("w", (2, 3), 99, 0)], plain),
        "general.alignment 24 is not a power of two": with_tensors([("w", (2, 3), 0, 0)], plain, alignment=24),
        "truncated or corrupt .*1000000 tensor descriptions": with_tensors([], b"", n_tensors=10 ** 6),
        "not a GGUF file": b"GGUX" + bytes(40),
        "a string at offset \\d+ is not UTF-8": _gguf_bytes(
            endian, kvs[:1] + [("a.bad", 9, struct.pack(endian + "IQ", 8, 2) + s("ok") + struct.pack(endian + "Q", 3)
                                + b"a\xffb")]),
    }
    for message, data in bad.items():
        f.write_bytes(data)
        with pytest.raises(GGUFFormatError, match=message):
            read_gguf(f)


def test_iterables_and_numpy_integers_are_taken_where_a_list_or_an_int_is(model):
    import numpy as np

    from spdkernels import tree

    p = params(4, stop={"ab"})
    p.validate()
    assert p.stop == ("ab",)
    p = params(4, stop=(x for x in ["cd"]))
    p.validate()
    assert p.stop == ("cd",)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    par = torch.tensor([-1, 0], dtype=torch.int32)
    assert torch.equal(tree.build_tree_mask(par, cu, np.int64(3)), tree.build_tree_mask(par, cu, 3))


def test_packed_weight_of_another_layout_is_refused():
    """A PackedWeight whose tensors do not have the dtypes and shapes its format and shape ask for is refused when
    made, naming the tensor (its readers size their reads from them)."""
    from spdkernels.runtime.linear import PackedWeight

    g = torch.Generator().manual_seed(0)
    p = PackedWeight("q8_0", torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8),
                     torch.rand(8, 2, generator=g).half().float(), None, (8, 64))  # a valid layout: accepted
    cases = [
        (dict(shape=(9, 64)), "data: a q8_0 weight of shape"),  # more rows than the data holds
        (dict(shape=(8, 96)), "data: a q8_0 weight of shape"),
        (dict(shape=[8, 64]), "shape: expected"),
        (dict(data=p.data.to(torch.uint8)), "data: a q8_0 weight"),
        (dict(data=p.data[:, :32].contiguous(), shape=(8, 32)), "scale: expected float32 \\(8, 1\\)"),
        (dict(scale=p.scale.double()), "scale: expected float32"),
        (dict(scale=None), "scale: expected float32"),
        (dict(min=p.scale), "min: a q8_0 weight has none"),
    ]
    for change, needle in cases:
        kw = dict(dict(format=p.format, data=p.data, scale=p.scale, min=p.min, shape=p.shape), **change)
        with pytest.raises(ValueError, match=needle):
            PackedWeight(**kw)
    with pytest.raises(ValueError, match="scale: a f16 weight has none"):
        PackedWeight("f16", torch.zeros(8, 64, dtype=torch.float16), p.scale, None, (8, 64))
    with pytest.raises(ValueError, match="shape: q4_1 blocks are 32 long"):
        PackedWeight("q4_1", torch.zeros(2, 8, dtype=torch.uint8), None, None, (2, 16))
