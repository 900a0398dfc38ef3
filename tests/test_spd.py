"""Speculative Pipeline Decoding on a tiny random-weight model: the depth-type map, the structural training
mask against a brute-force simulation of inference, training forward == inference forward, greedy SPD and
the PDM proposer equal to autoregressive decoding (cache invariants asserted every cycle, stale KV poisoned),
rollbacks forced at every fill level, the lossless sampling distribution of the first 3 tokens with two
planted bugs (the residual forgotten, the wrong row) that the same test rejects, and the PDM file's refusal
of other targets and corrupt files."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import ByteTokenizer, backends_here
from scipy import stats as scipy_stats

from spdkernels.reference.rejection_sample import STREAM_FINAL, philox_uniform, sample_inverse_cdf, target_weights
from spdkernels.runtime import Engine, LlamaModel, Request, SamplingParams
from spdkernels.runtime.cli import main as cli_main
from spdkernels.runtime.model import Batch, greedy_reference, prefill_logits, random_config, random_state_dict
from spdkernels.runtime.proposers import Draft, FallbackProposer, NGramProposer, Proposer
from spdkernels.runtime.spd.pdm import (
    PDMError,
    check_stages,
    depth_types,
    load_pdm,
    read_pdm,
    save_pdm,
    target_fingerprint,
)
from spdkernels.runtime.spd.proposer import PDMProposer
from spdkernels.runtime.spd.schedule import SPDEngine, draw_draft
from spdkernels.runtime.spd.train import (
    STATE_FILE,
    PDMNet,
    Trainer,
    TrainSettings,
    brute_force_mask,
    make_windows,
    previous_types,
    structural_mask,
    untrained_pdm,
)

CFG = random_config(num_layers=4)
ANCHORS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float64)


@pytest.fixture(scope="module", params=["anchor_norm", "shift"])
def pdm(model, request):
    """Both row variants: anchor norms, and the previous token's anchor in every row (``shift``, whose
    weights start at zero: the noise makes the term matter)."""
    return untrained_pdm(model, ANCHORS, layers=2, intermediate=48, noise=0.05, anchor_norm=True,
                         shift=request.param == "shift")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 4, 13)]


def _greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


# ---- depth types and the structural mask ----------------------------------------------------------------
def test_depth_types_follow_the_stage_boundaries():
    # 30 layers, anchors at the 4-stage boundaries: n=4 -> one type per depth; n=8 -> each type twice;
    # n=2 -> the embedding, the middle anchor, the last
    a = [0, 8, 15, 22, 30]
    assert depth_types(a, 30, 4) == [0, 1, 2, 3, 4]
    assert depth_types(a, 30, 8) == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert depth_types(a, 30, 2) == [0, 2, 4]
    assert depth_types([0, 8, 16, 24, 32], 32, 8) == [0, 0, 1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_structural_mask_equals_brute_force_inference_views(n):
    f = depth_types([0, 8, 15, 22, 30], 30, n)
    S = 11
    for fill in range(1, n + 1):
        mask, _ = structural_mask(S, f, "pipeline", fill)
        want, present = brute_force_mask(S, f, "pipeline", fill)
        assert present[:S].all()  # every depth-0 (loss) row occurs
        assert torch.equal(mask[present], want[present]), f"n={n} fill={fill}"
    for segs in ([3, 1, 5, 2], [1] * S, [S]):
        mask, _ = structural_mask(S, f, "proposer", segments=segs)
        want, present = brute_force_mask(S, f, "proposer", segments=segs)
        assert torch.equal(mask[present], want[present]), f"segments={segs}"


def test_structural_mask_planted_bug_is_caught():
    """A mask that ignores the fill level (keys at their full-pipeline depth after a rejection) is not
    what inference gives the rows: the comparison above fails on it."""
    f = depth_types([0, 8, 15, 22, 30], 30, 4)
    S = 9
    full, depths = structural_mask(S, f, "pipeline", 4)  # blocks 0, 1, 2, 3, 4
    keep = torch.cat([torch.arange(S * i, S * (i + 1)) for i, d in enumerate(depths) if d in (0, 1, 4)])
    buggy = full[keep][:, keep]  # the fill-2 layout's blocks (depths 0, 1, n), each key at its full depth
    want, present = brute_force_mask(S, f, "pipeline", 2)
    assert not torch.equal(buggy[present], want[present])
    correct, _ = structural_mask(S, f, "pipeline", 2)
    assert torch.equal(correct[present], want[present])


def test_structural_mask_rejects_bad_layouts():
    f = depth_types([0, 1, 2, 3, 4], 4, 4)
    with pytest.raises(ValueError, match="fill"):
        structural_mask(5, f, "pipeline", 0)
    with pytest.raises(ValueError, match="segments"):
        structural_mask(5, f, "proposer", segments=[2, 2])
    with pytest.raises(ValueError, match="mode"):
        structural_mask(5, f, "tree")


@pytest.mark.parametrize("mode,n,fill,segs", [("pipeline", 4, 4, []), ("pipeline", 4, 2, []),
                                              ("pipeline", 2, 2, []), ("proposer", 4, 0, [3, 2, 4])])
@pytest.mark.parametrize("variant", ["plain", "anchor_norm", "shift"])
def test_training_forward_equals_inference(mode, n, fill, segs, variant):
    """The training net under the structural mask gives, at every depth-0 row, the logits the inference
    module computes from the rows that inference would feed (the same weights, a fresh cache per view;
    with ``shift`` each row also gets the previous row of its view, which must match the training's
    ``previous_types``)."""
    torch.manual_seed(0)
    anchor_norm, shift = variant == "anchor_norm", variant == "shift"
    m = LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float32)
    net = PDMNet(untrained_pdm(m, ANCHORS, layers=2, intermediate=48, anchor_norm=anchor_norm, shift=shift).cfg, m,
                 torch.arange(CFG.vocab_size), seed=3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from spdkernels.runtime.spd.pdm import PipelineDraftModule

    inf = PipelineDraftModule(net.cfg, net.hf_state_dict(), m)
    assert (inf.anchor_norms is not None) == anchor_norm
    S = 9
    # anchors of growing scale, as in a trained LM's residual stream
    h = torch.randn(S, len(ANCHORS), CFG.hidden_size) * torch.tensor([1.0, 10.0, 50.0, 200.0, 700.0])[:, None]
    f = depth_types(ANCHORS, CFG.num_layers, n)
    mask, depths = structural_mask(S, f, mode, fill, segs)
    prev = previous_types(S, f, mode, depths, fill, segs) if shift else None
    with torch.no_grad():
        got = net(h, torch.arange(S), [f[d] for d in depths], mask, torch.arange(S), prev)
    starts = []
    for i, L in enumerate(segs):
        starts += [sum(segs[:i])] * L
    for t in range(S):
        if mode == "pipeline":
            types = [f[t - p] if t - p < fill else f[n] for p in range(t + 1)]
        else:
            types = [0 if p >= starts[t] else f[n] for p in range(t + 1)]
        cache = inf.new_cache(2, 16)
        cache.add(0)
        cache.reserve(0, t + 1)
        b = Batch(torch.zeros(t + 1, dtype=torch.int64), torch.arange(t + 1),
                  torch.tensor(cache.slots(0, range(t + 1))),
                  torch.tensor([0, t + 1], dtype=torch.int32), torch.tensor([t + 1], dtype=torch.int32),
                  cache.block_table([0]))
        kw = {}
        if shift:  # each row's previous token: the row before it in this view, with its type
            kw = dict(prev_h=torch.cat([h[:1], h[:t]]), prev_types=torch.tensor([-1] + types[:-1]))
        out, _ = inf.tower.forward_layers(inf.rows(h[:t + 1], torch.tensor(types), **kw), b, cache)
        want = inf.draft_logits(out[-1:])
        torch.testing.assert_close(got[t:t + 1], want, rtol=1e-4, atol=1e-4)


# ---- greedy equality and invariants ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4])
def test_greedy_spd_equals_autoregressive(model, pdm, prompts, n):
    ref = [greedy_reference(model, p, 20) for p in prompts]
    eng = SPDEngine(model, pdm, n, debug=True, scrub_cache=True, validate_ops=True)
    for batched in (False, True):
        outs = []
        if batched:
            res, met = eng.generate([Request(p, _greedy(20)) for p in prompts])
            outs = [r.output_ids for r in res]
        else:
            for p in prompts:
                res, met = eng.generate([Request(p, _greedy(20))])
                outs.append(res[0].output_ids)
        assert outs == ref
    # every committed token but the first comes from one verification
    assert met.steps == met.new_tokens - len(prompts)
    assert met.equivalent_speedup == pytest.approx(n * met.steps / met.request_cycles)


@pytest.mark.parametrize("n", [2, 4])
def test_greedy_spd_with_lookup_equals_autoregressive(model, pdm, prompts, n):
    """Drafts from prompt lookup (over the committed tokens and those in flight) where it finds the newest tokens
    earlier in the text, from the PDM elsewhere: outputs still equal autoregressive decoding, both kinds verified."""
    ref = [greedy_reference(model, p, 30) for p in prompts]
    eng = SPDEngine(model, pdm, n, debug=True, scrub_cache=True, lookup=NGramProposer(k=1, min_ngram=1, max_ngram=3))
    res, met = eng.generate([Request(p, _greedy(30)) for p in prompts])
    assert [r.output_ids for r in res] == ref
    assert 0 < met.lookup_drafted < met.drafted
    assert met.lookup_accepted <= met.lookup_drafted and met.lookup_accepted <= met.accepted
    assert "lookup n=1..3" in eng.describe()


class _OracleSPD(SPDEngine):
    """Drafts the target's greedy token, except at the planted positions, where it drafts a wrong one."""

    def __init__(self, *a, truth, wrong, **kw):
        super().__init__(*a, **kw)
        self.truth, self.wrong = truth, wrong

    def _draft(self, s, logits):
        pos = s.pipeline[-1].pos + 1
        tok = self.truth[pos - len(s.prompt)]
        return ((tok + 1) % CFG.vocab_size if pos - len(s.prompt) in self.wrong else tok), None


@pytest.mark.parametrize("n", [2, 4])
def test_forced_rejections_at_every_fill_level(model, pdm, prompts, n):
    """Rejections planted so that the pipeline is refilled to every level before the next one: outputs
    equal autoregressive, every plant is rejected and everything else accepted, and the invariants (stage
    cache lengths, PDM cache, staircase) hold after every cycle."""
    p = prompts[1]
    N = 40
    truth = greedy_reference(model, p, N)
    wrong, at = set(), 2
    for gap in list(range(1, n + 1)) * 2:  # the next rejection comes `gap` verifications later
        wrong.add(at)
        at += gap
    wrong = {w for w in wrong if w < N}
    eng = _OracleSPD(model, pdm, n, truth=truth, wrong=wrong, debug=True, scrub_cache=True)
    res, met = eng.generate([Request(p, _greedy(N))])
    assert res[0].output_ids == truth
    assert met.drafted - met.accepted == len(wrong)
    # cycles: n - 1 to fill, one per accepted draft, n per rejection
    assert met.cycles == (n - 1) + met.accepted + n * len(wrong)
    # no rejections at all: n - 1 + one cycle per token, equivalent speedup -> n
    res, met = _OracleSPD(model, pdm, n, truth=truth, wrong=set(), debug=True).generate([Request(p, _greedy(N))])
    assert res[0].output_ids == truth and met.acceptance_rate == 1.0
    assert met.cycles == n - 1 + (N - 1)


@pytest.mark.parametrize("kw", [dict(k=3), dict(k=3, branching=2, width=2), dict(k=2, branching=3, width=3)])
def test_pdm_proposer_greedy_equals_autoregressive(model, pdm, prompts, kw):
    ref = [greedy_reference(model, p, 20) for p in prompts]
    res, met = Engine(model, PDMProposer(pdm, **kw, debug=True), scrub_cache=True, validate_ops=True).generate(
        [Request(p, _greedy(20)) for p in prompts])
    assert [r.output_ids for r in res] == ref
    assert met.drafted > 0


@pytest.mark.parametrize("block_size", [2, 4, 16])
def test_pdm_proposer_tree_runs_each_node_once(model, pdm, prompts, block_size):
    """A tree level runs only its frontier nodes (the root at level 0), each attending to the completed rows
    and its own path through a private tail of cache blocks: per draft, the tower sees the root and every node
    that was expanded, once. Small blocks make the tails span several blocks; the debug check compares every
    node's distribution with the PDM run from scratch over its whole view, and the scrubbed caches poison any
    read of a given-back tail."""
    prop = PDMProposer(pdm, k=3, branching=2, width=2, debug=True)
    ran = []
    forward = pdm.tower.forward_layers

    def counting(h, batch, cache, *a, **kw):
        if cache is prop._cache:  # (not the debug check's PDM from scratch)
            ran.append(h.shape[0])
        return forward(h, batch, cache, *a, **kw)

    seen = []
    propose = prop._trees

    def recording(states, limits):
        ran.clear()
        out = propose(states, limits)
        seen.append((list(ran), [d.parents for d in out], list(limits)))
        return out

    prop._trees = recording
    pdm.tower.forward_layers = counting
    try:
        res, met = Engine(model, prop, block_size=block_size, scrub_cache=True, validate_ops=True).generate(
            [Request(p, _greedy(20)) for p in prompts])
    finally:
        del pdm.tower.forward_layers
    assert [r.output_ids for r in res] == [greedy_reference(model, p, 20) for p in prompts]
    assert met.drafted > 0 and seen
    for rows, parents, limits in seen:  # one forward per level; per request its root, then its nodes above depth k
        want = sum(1 + sum(1 for x in Draft(list(ps), list(ps)).depths() if x < min(3, lim))
                   for ps, lim in zip(parents, limits) if lim)
        assert sum(rows) == want and len(rows) <= 3
    assert prop._cache.free_blocks == prop._cache.num_blocks  # every tail given back (and every request)


def test_pdm_proposer_confidence_cut_keeps_greedy_outputs(model, pdm, prompts):
    """Chains ended by ``min_confidence`` (some before their first token) verify to the autoregressive
    outputs; the cut drafts fewer tokens than the full chains, and a threshold no draft reaches drafts none."""
    ref = [greedy_reference(model, p, 20) for p in prompts]
    reqs = [Request(p, _greedy(20)) for p in prompts]
    _, full = Engine(model, PDMProposer(pdm, k=3)).generate(reqs)
    # the threshold: the median top probability of the drafts (the untrained PDM's are all low)
    probe = PDMProposer(pdm, k=3, min_confidence=1e-9)
    seen = []
    probe._confident = lambda logits, states, pos: seen.extend(
        torch.softmax(logits.float(), -1).amax(-1).tolist()) or [True] * len(states)
    Engine(model, probe).generate(reqs)
    tau = sorted(seen)[len(seen) // 2]
    res, met = Engine(model, PDMProposer(pdm, k=3, min_confidence=tau, debug=True), scrub_cache=True,
                      validate_ops=True).generate(reqs)
    assert [r.output_ids for r in res] == ref
    assert 0 < met.drafted < full.drafted
    res, met = Engine(model, PDMProposer(pdm, k=3, min_confidence=max(seen) + 1e-6)).generate(reqs)
    assert [r.output_ids for r in res] == ref and met.drafted == 0
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="min_confidence"):
            PDMProposer(pdm, min_confidence=bad)
    with pytest.raises(ValueError, match="min_confidence: chains only"):
        PDMProposer(pdm, k=2, branching=2, min_confidence=0.5)


class _Scripted(Proposer):
    """A test part: drafts one token (0) for a request whose text length satisfies ``when``, nothing otherwise;
    records whom it was asked about and the feedback it got."""

    def __init__(self, when):
        super().__init__(1, 1)
        self.when, self.asked, self.drafted, self.fed = when, [], [], []

    def propose(self, states, depth_limits):
        out = []
        for st, lim in zip(states, depth_limits):
            self.asked.append((st.rid, len(st.tokens)))
            ok = lim > 0 and self.when(len(st.tokens))
            if ok:
                self.drafted.append((st.rid, len(st.tokens)))
            out.append(Draft([0], [-1]) if ok else Draft())
        return out

    def feedback(self, state, drafted, accepted):
        self.fed.append((state.rid, drafted))


def test_fallback_proposer_asks_the_next_part_only_where_the_first_drafts_nothing(model, prompts):
    first, second = _Scripted(lambda n: n % 2 == 0), _Scripted(lambda n: n % 3 != 0)
    fb = FallbackProposer([first, second])
    reqs = [Request(p, _greedy(12)) for p in prompts]
    res, met = Engine(model, fb).generate(reqs)
    assert [r.output_ids for r in res] == [greedy_reference(model, p, 12) for p in prompts]
    assert first.drafted and second.drafted
    assert not set(second.asked) & set(first.drafted)  # never asked where the first part drafted
    assert set(second.asked) == {a for a in first.asked if a not in set(first.drafted)}
    # each part hears about its own drafts only, one feedback per draft
    assert len(first.fed) == len(first.drafted) and len(second.fed) == len(second.drafted)
    assert all(d == 1 for _, d in first.fed + second.fed)
    assert fb.drafted_by == [len(first.drafted), len(second.drafted)]
    assert met.drafted == len(first.drafted) + len(second.drafted)
    assert fb.describe() == "proposer else proposer"
    with pytest.raises(ValueError, match="parts: expected at least two"):
        FallbackProposer([first])


def test_lookup_else_pdm_keeps_greedy_outputs(model, pdm, prompts):
    """Prompt lookup first, the PDM where it finds nothing: the PDM catches up on the committed rows of the
    steps it skipped (checked against the PDM run from scratch, ``debug``); outputs are the autoregressive ones."""
    prompts = list(prompts) + [[7]]  # (a one-token prompt: its first draft has no committed rows to catch up on)
    ref = [greedy_reference(model, p, 24) for p in prompts]
    fb = FallbackProposer([NGramProposer(k=3, min_ngram=1, max_ngram=2),
                           PDMProposer(pdm, k=3, min_confidence=0.0, debug=True)])
    reqs = [Request(p, _greedy(24)) for p in prompts]
    res, met = Engine(model, fb, scrub_cache=True, validate_ops=True).generate(reqs)
    assert [r.output_ids for r in res] == ref
    assert all(n > 0 for n in fb.drafted_by), fb.drafted_by


def test_union_of_lookup_and_pdm_keeps_greedy_outputs_and_refuses_sampled_parts(model, pdm, prompts, small):
    """UnionProposer merges the parts' drafts into one tree (both parts' paths in it, shared prefixes once);
    outputs stay the autoregressive ones; a part that drafts from a distribution (q) is refused."""
    from spdkernels.runtime.proposers import UnionProposer

    first, second = _Scripted(lambda n: n % 2 == 0), _Scripted(lambda n: True)
    res, met = Engine(model, UnionProposer([first, second])).generate([Request(p, _greedy(12)) for p in prompts])
    assert [r.output_ids for r in res] == [greedy_reference(model, p, 12) for p in prompts]
    assert met.drafted == len(second.drafted)  # both parts draft the same token 0: one node where both draft
    assert len(first.fed) == len(second.fed) > 0  # every part hears about every step
    un = UnionProposer([NGramProposer(k=3, min_ngram=1, max_ngram=2), PDMProposer(pdm, k=3, sample=False)])
    res, met = Engine(model, un, scrub_cache=True).generate([Request(p, _greedy(16)) for p in prompts])
    assert [r.output_ids for r in res] == [greedy_reference(model, p, 16) for p in prompts]
    assert met.drafted > 0
    m, spdm = small
    bad = UnionProposer([NGramProposer(k=1), PDMProposer(spdm, k=1)])  # sampled requests draft with q
    with pytest.raises(ValueError, match="parts: .*deterministic"):
        Engine(m, bad).generate([Request([1, 3, 0, 2], SamplingParams(max_new_tokens=3, temperature=0.8, seed=1))])


def test_lookup_else_pdm_sampling_is_lossless(small):
    """Lookup drafts (point masses) and the PDM's sampled drafts (with their q) chosen per request and step: the
    verification of each keeps sampling lossless."""
    m, pdm = small
    fb = FallbackProposer([NGramProposer(k=1, min_ngram=2, max_ngram=2), PDMProposer(pdm, k=2)])
    pv, met = _pvalue(lambda r: Engine(m, fb).generate(r), m, [1, 3, 0, 2, 4, 1], 4000)
    assert pv > 1e-3, pv
    assert all(n > 0 for n in fb.drafted_by), fb.drafted_by
    assert 0 < met.accepted < met.drafted


def test_spd_stops_at_eos_and_budget(model, pdm, prompts):
    ref = greedy_reference(model, prompts[0], 12)
    eos = ref[6]
    res, _ = SPDEngine(model, pdm, 3, eos_token_ids=[eos], debug=True).generate(
        [Request(prompts[0], SamplingParams(max_new_tokens=12))])
    assert res[0].output_ids == ref[:ref.index(eos) + 1] and res[0].finish_reason == "eos"
    res, _ = SPDEngine(model, pdm, 3, debug=True).generate([Request(prompts[0], _greedy(1))])
    assert res[0].output_ids == ref[:1] and res[0].finish_reason == "length"


def test_spd_runs_a_request_that_fills_the_context_exactly(model, pdm, prompts):
    """prompt + max_new_tokens == the model's context: the ordinary engine runs it, so SPD must too (the
    pipeline never drafts past the budget), with the same tokens."""
    import dataclasses

    cfg = dataclasses.replace(CFG, max_position=len(prompts[1]) + 12)
    m = LlamaModel(cfg, random_state_dict(CFG), dtype=torch.float64)
    ref, _ = Engine(m).generate([Request(prompts[1], _greedy(12))])
    res, _ = SPDEngine(m, pdm, 4, debug=True).generate([Request(prompts[1], _greedy(12))])
    assert res[0].output_ids == ref[0].output_ids and len(ref[0].output_ids) == 12
    with pytest.raises(ValueError, match="more than the model's context"):
        SPDEngine(m, pdm, 4).generate([Request(prompts[1], _greedy(13))])


@pytest.mark.parametrize("block_size", [1, 2, 16])
def test_pdm_proposer_fits_any_block_size_and_many_requests(model, pdm, block_size):
    """The proposer's own cache follows the target's block size: twelve requests on blocks of 1 or 2 slots
    (each request rounds up to whole blocks) fit, with outputs equal to autoregressive decoding."""
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(0, CFG.vocab_size, (10,), generator=g).tolist() for _ in range(12)]
    ref = [greedy_reference(model, p, 10) for p in ps]
    res, _ = Engine(model, PDMProposer(pdm, k=4), block_size=block_size).generate([Request(p, _greedy(10)) for p in ps])
    assert [r.output_ids for r in res] == ref


def test_spd_bad_input(model, pdm):
    with pytest.raises(ValueError, match="stages"):
        SPDEngine(model, pdm, CFG.num_layers + 1)
    with pytest.raises(ValueError, match="stages"):
        SPDEngine(model, pdm, 1)
    with pytest.raises(ValueError, match="prompt_ids: request 0 has 2 tokens"):
        SPDEngine(model, pdm, 3).generate([Request([1, 2], _greedy(4))])
    with pytest.raises(ValueError, match="deepest anchor"):
        check_stages(type("C", (), dict(anchors=[0, 2, 4], m=2))(), 3, 2)
    # arguments of the wrong kind: a ValueError naming them (TypeErrors, a ZeroDivisionError and AttributeErrors,
    # the lookup's only after the prefill, before)
    for kw, pattern in [(dict(n="2"), "stages"), (dict(n=2.0), "stages"), (dict(n=None), "stages"),
                        (dict(block_size=0), "block_size"), (dict(block_size=2.0), "block_size"),
                        (dict(block_size=3), "block_size: expected a power of two"),
                        (dict(eos_token_ids=3), "eos_token_ids"), (dict(lookup=object()), "lookup"),
                        (dict(lookup=PDMProposer(pdm)), "lookup"), (dict(pdm=None), "pdm")]:
        args = dict(model=model, pdm=pdm, n=2)
        args.update(kw)
        with pytest.raises(ValueError, match=pattern):
            SPDEngine(**args)
    # a PDM for another target: named, as the ordinary engine's proposer does (an IndexError, a shape error, or
    # for a deeper target a silent run with the other model's head before)
    for change in (dict(vocab_size=CFG.vocab_size - 7), dict(hidden_size=CFG.hidden_size // 2),
                   dict(num_layers=CFG.num_layers + 2)):
        c = dataclasses.replace(CFG, **change)
        other = LlamaModel(c, random_state_dict(c), dtype=torch.float64)
        with pytest.raises(ValueError, match="pdm: this PDM was built for another target model"):
            SPDEngine(other, pdm, 2)
        with pytest.raises(ValueError, match="pdm: this PDM was built for another target model"):
            Engine(other, PDMProposer(pdm)).generate([Request([1, 2, 3], _greedy(2))])
    # eos ids as a generator: read once (the check used it up and EOS was never seen)
    eng = SPDEngine(model, pdm, 2, eos_token_ids=(t for t in [5, 6]))
    assert eng.eos == {5, 6}
    # requests as a generator: used once (the checks used it up and the caches were sized for nothing)
    res, _ = SPDEngine(model, pdm, 2).generate(Request(p, _greedy(3)) for p in ([1, 2, 3], [4, 5, 6, 7]))
    assert [len(r.output_ids) for r in res] == [3, 3]


@pytest.mark.parametrize("kw,pattern", [(dict(k=2.5), "k: expected an integer"), (dict(k="3"), "k: expected"),
                                        (dict(branching=2.5, width=2), "branching"), (dict(width=1.5), "width"),
                                        (dict(width=None), "width"), (dict(max_nodes=2.5), "max_nodes"),
                                        (dict(max_nodes=0), "max_nodes"), (dict(max_nodes=-1), "max_nodes"),
                                        (dict(k=True), "k: expected")])
def test_pdm_proposer_refuses_sizes_that_are_not_counts(pdm, kw, pattern):
    """At construction, naming the argument (TypeErrors inside generate before; max_nodes = 0 was read as the
    default and -1 named max_depth)."""
    with pytest.raises(ValueError, match=pattern):
        PDMProposer(pdm, **kw)


def test_pdm_rows_grouped_on_the_host_equal_row_by_row(pdm):
    """Rows of mixed types (grouped by type on the host from a list, or read from a tensor) equal each row
    formed alone (fp64; list and tensor types bit for bit); the previous-token term is zero for a row without
    one; bad types are refused."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(7, len(ANCHORS), CFG.hidden_size, generator=g, dtype=torch.float64)
    prev_h = torch.randn(7, len(ANCHORS), CFG.hidden_size, generator=g, dtype=torch.float64)
    types, prev_t = [4, 0, 1, 1, 3, 4, 2], [-1, 4, 0, 1, 1, 3, 4]
    kw = dict(prev_h=prev_h, prev_types=prev_t) if pdm.shift_w is not None else {}
    got = pdm.rows(h, types, **kw)
    kw_t = dict(kw, prev_types=torch.tensor(prev_t)) if kw else {}
    assert torch.equal(pdm.rows(h, torch.tensor(types), **kw_t), got)
    for i in range(7):
        kw_i = dict(prev_h=prev_h[i:i + 1], prev_types=[prev_t[i]]) if kw else {}
        torch.testing.assert_close(pdm.rows(h[i:i + 1], [types[i]], **kw_i), got[i:i + 1], rtol=1e-12, atol=1e-12)
    if kw:  # row 0 has no previous token: its row is the aggregation alone
        torch.testing.assert_close(got[0], pdm.rows(h[:1], [4], prev_h=prev_h[:1], prev_types=[-1])[0],
                                   rtol=1e-12, atol=1e-12)
        assert (got[1] - pdm.rows(h[1:2], [0], prev_h=prev_h[1:2], prev_types=[-1])[0]).abs().max() > 1e-3
        with pytest.raises(ValueError, match="prev_types: row types must lie in \\[-1, 5\\)"):
            pdm.rows(h, types, prev_h=prev_h, prev_types=[5] * 7)
        with pytest.raises(ValueError, match="prev_types: 6 row types for 7 rows"):
            pdm.rows(h, types, prev_h=prev_h, prev_types=prev_t[:6])
    with pytest.raises(ValueError, match="types: row types must lie in \\[0, 5\\)"):
        pdm.rows(h, [-1] * 7, **kw)
    with pytest.raises(ValueError, match="types: row types must lie in \\[0, 5\\)"):
        pdm.rows(h, torch.full((7,), 5), **kw)
    with pytest.raises(ValueError, match="types: 3 row types for 7 rows"):
        pdm.rows(h, [0, 1, 2], **kw)
    with pytest.raises(ValueError, match="types: expected a 1-D integer tensor"):
        pdm.rows(h, torch.full((7,), 1.0), **kw)
    with pytest.raises(ValueError, match="types: row types must be integers"):
        pdm.rows(h, [1.5] * 7, **kw)
    # one type for every row (the path without gather or scatter; completed rows, a prefill) == row by row
    kw1 = dict(prev_h=prev_h, prev_types=[2] * 7) if kw else {}
    one = pdm.rows(h, [3] * 7, **kw1)
    for i in range(7):
        kw_i = dict(prev_h=prev_h[i:i + 1], prev_types=[2]) if kw else {}
        torch.testing.assert_close(pdm.rows(h[i:i + 1], [3], **kw_i), one[i:i + 1], rtol=1e-12, atol=1e-12)
    # completed rows: runs of at least one token that cover the rows
    torch.testing.assert_close(pdm.completed_rows(h, [3, 4])[3:], pdm.completed_rows(h[3:], [4]), rtol=1e-12,
                               atol=1e-12)
    for lengths in ([3, 0, 4], [3, 3]):
        with pytest.raises(ValueError, match="lengths: runs of at least one token summing to the 7 rows"):
            pdm.completed_rows(h, lengths)


# ---- lossless sampling -----------------------------------------------------------------------------------------
SMALL = random_config(vocab_size=5, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48)
TEMP, TOP_P = 0.8, 0.9


@pytest.fixture(scope="module")
def small():
    # fp32 (the C++ kernels); weights scaled so that ~50 of the 125 three-token outcomes have mass. The PDM
    # has the shipped one's shape (one layer, the previous-token term)
    m = LlamaModel(SMALL, random_state_dict(SMALL, seed=4, std=0.3), dtype=torch.float32)
    return m, untrained_pdm(m, ANCHORS, layers=1, intermediate=32, noise=0.3, seed=5, shift=True)


def _exact_joint(m, prompt):
    """P(x1, x2, x3) under T / top-p sampling from the target, exactly."""
    V = SMALL.vocab_size

    def dist(seq):
        w = target_weights(prefill_logits(m, seq, [len(seq) - 1])[0].float(), TEMP, 0, TOP_P).double()
        return w / w.sum()

    p = torch.zeros(V, V, V, dtype=torch.float64)
    d1 = dist(prompt)
    for a in range(V):
        if d1[a] == 0:
            continue
        d2 = dist(prompt + [a])
        for b in range(V):
            if d2[b] == 0:
                continue
            p[a, b] = d1[a] * d2[b] * dist(prompt + [a, b])
    return p / p.sum()


def _pvalue(run, m, prompt, N):
    reqs = [Request(prompt, SamplingParams(max_new_tokens=3, temperature=TEMP, top_p=TOP_P, seed=s, ignore_eos=True))
            for s in range(N)]
    res, met = run(reqs)
    V = SMALL.vocab_size
    obs = torch.zeros(V ** 3, dtype=torch.float64)
    for r in res:
        a, b, c = r.output_ids
        obs[(a * V + b) * V + c] += 1
    ex = _exact_joint(m, prompt).view(-1) * N
    if obs[ex == 0].sum() > 0:  # a token outside the target's top-p set: impossible under the target
        return 0.0, met
    # outcomes expected fewer than 5 times are pooled into one cell (the chi-square approximation)
    big = ex >= 5
    o = torch.cat([obs[big], obs[~big].sum().view(1)])
    e = torch.cat([ex[big], ex[~big].sum().view(1)])
    keep = e > 0
    return scipy_stats.chisquare(o[keep].numpy(), e[keep].numpy()).pvalue, met


class _NoResidual(SPDEngine):
    """Planted bug: after a rejection the correction is sampled from p itself instead of the residual
    norm(max(0, p - q)) (same coin)."""

    def _verify(self, exits):
        out = super()._verify(exits)
        logits = self._target_logits(torch.stack([e.h for _, e in exits]))
        fixed = []
        for i, ((s, _), (ok, tok)) in enumerate(zip(exits, out)):
            if not ok:
                w = target_weights(logits[i], s.params.temperature, s.params.top_k, s.params.top_p)
                tok = sample_inverse_cdf(w, philox_uniform(s.params.seed, s.pipeline[1].pos, 0, STREAM_FINAL))
            fixed.append((ok, tok))
        return fixed


class _WrongRow(SPDEngine):
    """Planted bug: the exiting token's logits verify the draft two positions after it."""

    def _target_logits(self, h):
        out = super()._target_logits(h)
        return out if out.shape[0] != h.shape[0] or h.shape[0] < 2 else out.roll(1, dims=0)


def test_spd_sampling_is_lossless_and_planted_bugs_fail(small):
    m, pdm = small
    prompt = [1, 3, 0, 2, 4, 1]
    N = 4000
    pv, met = _pvalue(lambda r: SPDEngine(m, pdm, 2).generate(r), m, prompt, N)
    assert pv > 1e-3, pv
    assert 0.1 < met.acceptance_rate < 0.95  # both branches of the rule are exercised
    pv_bad, _ = _pvalue(lambda r: _NoResidual(m, pdm, 2).generate(r), m, prompt, N)
    assert pv_bad < 1e-6, pv_bad
    pv_bad2, _ = _pvalue(lambda r: _WrongRow(m, pdm, 2).generate(r), m, prompt, N)
    assert pv_bad2 < 1e-6, pv_bad2


class _LookupWithPDMq(SPDEngine):
    """Planted bug: a lookup draft is verified against the PDM's q at that position, as if it had been drawn from
    it (it was not: the lookup proposes deterministically, its q is the point mass)."""

    def _draft(self, s, logits):
        tok, q = super()._draft(s, logits)
        if q is None and s.params.temperature > 0:
            q = torch.softmax(logits.float() / s.params.temperature, dim=-1)
        return tok, q


def test_spd_sampling_with_lookup_is_lossless(small):
    """Lookup drafts are point masses (q None) next to the PDM's sampled drafts with their q: still lossless; the
    planted variant that verifies lookup drafts against the PDM's q fails the same test."""
    m, pdm = small
    prompt = [1, 3, 0, 2, 4, 1]

    def run(cls):
        return lambda r: cls(m, pdm, 2, lookup=NGramProposer(k=1, min_ngram=2, max_ngram=2)).generate(r)

    pv, met = _pvalue(run(SPDEngine), m, prompt, 4000)
    assert pv > 1e-3, pv
    assert 0 < met.lookup_drafted < met.drafted  # both kinds of draft verified
    assert 0 < met.lookup_accepted < met.lookup_drafted
    pv_bad, _ = _pvalue(run(_LookupWithPDMq), m, prompt, 4000)
    assert pv_bad < 1e-6, pv_bad


@pytest.mark.parametrize("prompt", [[1, 3, 0, 2, 4, 1], [2, 2, 4, 0, 1, 3]])  # ~50 / 2 outcomes with mass
def test_pdm_proposer_sampling_is_lossless(small, prompt):
    m, pdm = small
    pv, met = _pvalue(lambda r: Engine(m, PDMProposer(pdm, k=2)).generate(r), m, prompt, 4000)
    assert pv > 1e-3, pv
    assert 0 < met.accepted < met.drafted


class _DrawnTokenGate(PDMProposer):
    """Planted bug: the confidence rule reads the token the chain is about to draw (the same coin) and ends the
    chain before it when its own q is below ``min_confidence``: the drafts verified are then no longer
    distributed as their q."""

    def _confident(self, logits, states, positions):
        out = []
        for row, st, pos in zip(logits, states, positions):
            tok, q = draw_draft(self.pdm, row, st.params.temperature, st.params.seed, pos)
            out.append(q is None or float(q[int((self.pdm.vocab_ids == tok).nonzero()[0, 0])]) >= self.min_confidence)
        return out


def test_pdm_proposer_confidence_cut_is_lossless_and_a_rule_reading_the_token_is_not(small):
    """``min_confidence`` ends a chain on its draft distribution's top probability: sampling stays lossless. The
    head is scaled down so that q is flat enough for the top probability to fall on both sides of 0.3 (the small
    PDM's own q is nearly one-hot)."""
    m, pdm = small
    flat = copy.copy(pdm)
    flat.head = pdm.head * 0.15
    prompt = [1, 3, 0, 2, 4, 1]
    prop = PDMProposer(flat, k=2, min_confidence=0.3)
    decided = []
    rule = prop._confident
    prop._confident = lambda *a: decided.extend(rule(*a)) or decided[len(decided) - len(a[1]):]
    pv, met = _pvalue(lambda r: Engine(m, prop).generate(r), m, prompt, 4000)
    assert pv > 1e-3, pv
    assert 0 < met.accepted < met.drafted
    assert 0 < decided.count(False) and 0 < decided.count(True)  # the rule both cut and kept chains
    pv_bad, _ = _pvalue(lambda r: Engine(m, _DrawnTokenGate(flat, k=2, min_confidence=0.3)).generate(r), m, prompt,
                        4000)
    assert pv_bad < 1e-6, pv_bad


def test_same_seed_same_tokens_after_rollbacks(small):
    m, pdm = small
    reqs = [Request([1, 3, 0, 2, 4, 1], SamplingParams(max_new_tokens=16, temperature=TEMP, top_p=TOP_P, seed=s))
            for s in (7, 7, 8)]
    res, met = SPDEngine(m, pdm, 3, debug=True).generate(reqs)
    assert res[0].output_ids == res[1].output_ids
    assert met.drafted > met.accepted  # there were rollbacks
    res2, _ = SPDEngine(m, pdm, 3).generate(reqs[:1])
    assert res2[0].output_ids == res[0].output_ids  # batch composition does not change a request's tokens


# ---- the PDM file -----------------------------------------------------------------------------------------------
def _save(tmp_path, model, pdm, target_sd):
    cfg = pdm.cfg
    cfg.target = target_fingerprint(model.config, target_sd)
    net = PDMNet(cfg, model, pdm.vocab_ids, seed=1)
    return save_pdm(str(tmp_path / "pdm"), cfg, net.hf_state_dict())


def _write_weights(d, weights):
    """Replace a saved PDM's weights file and record its hash in pdm.json, as a save would: a consistent pair whose
    tensors the load checks."""
    import hashlib

    from safetensors.torch import save

    blob = save(weights)
    (d / "new.tmp").write_bytes(blob)  # a new file, as save_pdm writes (tensors read from the old one may map it)
    (d / "new.tmp").replace(d / "pdm.safetensors")
    cfg_j = json.loads((d / "pdm.json").read_text())
    (d / "pdm.json").write_text(json.dumps(dict(cfg_j, weights_file_sha256=hashlib.sha256(blob).hexdigest())))


@pytest.mark.skipif("cpp" not in backends_here(), reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP): "
                    "models are not packed without it")
def test_loaded_pdm_is_packed_and_drafts_the_same_logits(tmp_path):
    """A loaded PDM (fp16 file) on a CPU fp32 target holds its matrices packed (fp16, the head Q8_0 where the
    target's head rows are Q8_0 values, as in a GGUF file) and gives the unpacked PDM's logits bit for bit."""
    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    e = sd["lm_head.weight"].view(CFG.vocab_size, -1, 32)  # Q8_0 values: scale x int8, a 127 in every block
    d = (e.abs().amax(-1, keepdim=True) / 127).half().float()
    sd["lm_head.weight"] = (torch.round(e / d).clamp(-127, 127) * d).view(CFG.vocab_size, -1)
    m = LlamaModel(CFG, sd)
    path = _save(tmp_path, m, untrained_pdm(m, ANCHORS, layers=1, shift=True), sd)
    packed, plain = load_pdm(str(path), m, sd), load_pdm(str(path), m, sd, packed=False)
    fm = packed.weight_formats()
    # (the untrained previous-token matrices are zeros: Q4_1 holds them exactly too)
    assert fm["q8_0"] == 1 and "fp32" not in fm and sum(fm.values()) == 2 * len(ANCHORS) + 5
    assert plain.weight_formats() == {"fp32": 2 * len(ANCHORS) + 5}
    g = torch.Generator().manual_seed(0)
    rows = list(torch.randn(6, len(ANCHORS), CFG.hidden_size, generator=g))
    types = [4, 4, 3, 2, 1, 0]
    assert torch.equal(packed.view_logits(rows, types), plain.view_logits(rows, types))


def test_pdm_file_round_trip_and_refusals(tmp_path, pdm):
    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    d = _save(tmp_path, m, untrained_pdm(m, ANCHORS, layers=1), sd)
    loaded = load_pdm(str(d), m, sd)
    assert loaded.cfg.anchors == ANCHORS
    # a config that asks for anchor norms the weights file lacks
    cfg_j = json.loads((d / "pdm.json").read_text())
    (d / "pdm.json").write_text(json.dumps(dict(cfg_j, anchor_norm=True)))
    with pytest.raises(PDMError, match="anchor_norm.0.weight"):
        load_pdm(str(d), m, sd)
    # ... or the previous-token term's weights
    (d / "pdm.json").write_text(json.dumps(dict(cfg_j, shift=True)))
    with pytest.raises(PDMError, match="shift.0.weight"):
        load_pdm(str(d), m, sd)
    (d / "pdm.json").write_text(json.dumps(cfg_j))
    # a PDM with the previous-token term: round trip, and its rows refuse to be formed without that token
    ds = _save(tmp_path / "shift", m, untrained_pdm(m, ANCHORS, layers=1, shift=True), sd)
    ls = load_pdm(str(ds), m, sd)
    assert ls.cfg.shift and len(ls.shift_w) == len(ANCHORS)
    h = torch.randn(3, len(ANCHORS), CFG.hidden_size)
    with pytest.raises(ValueError, match="prev_h"):
        ls.rows(h, torch.zeros(3, dtype=torch.int64))
    # another checkpoint of the same architecture
    sd2 = {k: v.float() for k, v in random_state_dict(CFG, seed=9).items()}
    with pytest.raises(PDMError, match="weight hash"):
        load_pdm(str(d), LlamaModel(CFG, sd2), sd2)
    # another architecture
    c3 = random_config(num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2)
    sd3 = {k: v.float() for k, v in random_state_dict(c3).items()}
    with pytest.raises(PDMError, match="hidden_size"):
        load_pdm(str(d), LlamaModel(c3, sd3), sd3)
    # two files that are not one save's pair: the weights of another PDM beside this config (a save interrupted
    # between its two files leaves that too)
    assert len(cfg_j["weights_file_sha256"]) == 64
    d2 = save_pdm(str(tmp_path / "other"), loaded.cfg, PDMNet(loaded.cfg, m, loaded.vocab_ids, seed=2).hf_state_dict())
    assert (d2 / "pdm.safetensors").read_bytes() != (d / "pdm.safetensors").read_bytes()
    mine = (d / "pdm.safetensors").read_bytes()
    (d / "pdm.safetensors").write_bytes((d2 / "pdm.safetensors").read_bytes())
    with pytest.raises(PDMError, match="is not the weights file .*pdm.json was saved with .*not one save's pair"):
        load_pdm(str(d), m, sd)
    # a config saved before the hash was recorded: not checked, the pair read as it is
    (d / "pdm.json").write_text(json.dumps({k: v for k, v in cfg_j.items() if k != "weights_file_sha256"}))
    load_pdm(str(d), m, sd)
    (d / "pdm.safetensors").write_bytes(mine)
    (d / "pdm.json").write_text(json.dumps(cfg_j))
    # corrupt or missing files
    (d / "pdm.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(PDMError, match="SHA-256 differs .* the file is damaged"):
        read_pdm(str(d))
    (d / "pdm.json").write_text(json.dumps({k: v for k, v in cfg_j.items() if k != "weights_file_sha256"}))
    with pytest.raises(PDMError, match="cannot read"):
        read_pdm(str(d))
    (d / "pdm.safetensors").unlink()
    with pytest.raises(PDMError, match="expected pdm.json"):
        read_pdm(str(d))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pdm.json").write_text(json.dumps({"anchors": [0]}))
    (tmp_path / "bad" / "pdm.safetensors").write_bytes(b"")
    with pytest.raises(PDMError, match="not a PDM config"):
        read_pdm(str(tmp_path / "bad"))


@pytest.mark.parametrize("field,value", [
    ("target", None), ("num_layers", "1"), ("draft_vocab", None), ("anchors", [0, 1.5, 2, 3, 4]),
    ("anchors", "0,1,2,3,4"), ("intermediate_size", 2.0), ("shift", 1), ("training", []), ("format", True),
    ("weights_file_sha256", 5), ("weights_file_sha256", "abc"), ("weights_file_sha256", None),
])
def test_pdm_config_of_the_wrong_type_is_refused(tmp_path, field, value):
    """json gives any type anywhere: a field of the wrong type is a PDMError naming it, never a TypeError or
    AttributeError later (and never silently used: a fractional anchor matches no layer, its rows stay empty)."""
    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    d = _save(tmp_path, m, untrained_pdm(m, ANCHORS, layers=1), sd)
    load_pdm(str(d), m, sd)
    cfg_j = json.loads((d / "pdm.json").read_text())
    (d / "pdm.json").write_text(json.dumps(dict(cfg_j, **{field: value})))
    with pytest.raises(PDMError, match=f"not a PDM config.*{field}"):
        load_pdm(str(d), m, sd)


def test_pdm_with_a_repeated_vocabulary_id_is_refused(tmp_path):
    """A repeated draft-vocabulary id would be drawn with both entries' probability and verified against one
    of them (sampling no longer lossless); an id list of floats would be truncated silently."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    d = _save(tmp_path, m, untrained_pdm(m, ANCHORS, layers=1, draft_vocab=8), sd)
    w = load_file(str(d / "pdm.safetensors"))
    good = w["vocab_ids"].clone()
    w["vocab_ids"][1] = w["vocab_ids"][0]
    _write_weights(d, w)
    with pytest.raises(PDMError, match="more than once"):
        load_pdm(str(d), m, sd)
    w["vocab_ids"] = good.double()
    _write_weights(d, w)
    with pytest.raises(PDMError, match="not integers"):
        load_pdm(str(d), m, sd)
    w["vocab_ids"] = good
    _write_weights(d, w)
    assert load_pdm(str(d), m, sd).vocab_ids.tolist() == good.tolist()


def test_cli_pdm_errors_exit_2_without_output(tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = cli_main(["generate", "--prompt", "hi", "--proposer", "spd", "--pdm", str(tmp_path / "none"),
                   "--json", str(out), "--no-progress"])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--pdm: pdm: " in err and "none does not exist" in err
    rc = cli_main(["generate", "--prompt", "hi", "--proposer", "spd", "--stages", "0", "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "--stages" in capsys.readouterr().err
    rc = cli_main(["generate", "--prompt", "hi", "--proposer", "ngram", "--spd-lookup", "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "--lookup (--spd-lookup): needs --proposer spd or pdm" in capsys.readouterr().err
    for argv, msg in ((["--proposer", "pdm", "--lookup", "--tree-width", "2"], "--lookup: with --proposer pdm"),
                      (["--proposer", "pdm", "--lookup", "--branches", "2"], "--lookup: with --proposer pdm"),
                      (["--proposer", "pdm", "--min-confidence", "1"], "--min-confidence: expected a probability"),
                      (["--proposer", "pdm", "--min-confidence", "nan"], "--min-confidence: expected a probability"),
                      (["--proposer", "pdm", "--min-confidence", "-0.5"], "--min-confidence: expected a probability"),
                      (["--proposer", "ngram", "--min-confidence", "0.3"], "--min-confidence: needs --proposer pdm"),
                      (["--proposer", "pdm", "--min-confidence", "0.3", "--tree-branching", "2"],
                       "--min-confidence: chains only")):
        rc = cli_main(["generate", "--prompt", "hi", "--json", str(out), "--no-progress"] + argv)
        assert rc == 2 and not out.exists(), argv
        assert msg in capsys.readouterr().err, argv
    rc = cli_main(["generate", "--prompt", "hi", "--proposer", "spd", "--stages", "1", "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "--stages: expected >= 2" in capsys.readouterr().err
    # more stages than the embedded model's 30 layers: named as the flag, right after the model loads
    rc = cli_main(["generate", "--prompt", "hi", "--proposer", "spd", "--stages", "31", "--json", str(out),
                   "--no-progress"])
    assert rc == 2 and not out.exists()
    assert capsys.readouterr().err.startswith("error: --stages: expected 2 <= n <= 30")


def test_pdm_file_whose_tensors_do_not_fit_its_config_is_refused(tmp_path):
    """Beyond shapes: a tensor the config does not use (pdm.json edited after training), a weight that is not
    floating point, a NaN or an infinity in any weight (sampled verification with a NaN q is not lossless) are
    refused with a PDMError naming the folder and the tensor; an unchanged file loads (the checks pass good
    files)."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    d = _save(tmp_path, m, untrained_pdm(m, ANCHORS, layers=1, shift=True), sd)
    good_w, good_j = load_file(str(d / "pdm.safetensors")), (d / "pdm.json").read_text()
    assert load_pdm(str(d), m, sd).cfg.anchors == ANCHORS

    def with_tensor(name, t):
        _write_weights(d, dict(good_w, **{name: t}))

    for name, bad, needle in [
        ("agg.0.weight", float("nan"), "agg.0.weight: holds NaN or infinite values"),
        ("model.layers.0.mlp.down_proj.weight", float("inf"), "down_proj.weight: holds NaN or infinite values"),
        ("shift_norm.2.weight", float("-inf"), "shift_norm.2.weight: holds NaN or infinite values"),
    ]:
        t = good_w[name].clone()
        t.view(-1)[3] = bad
        with_tensor(name, t)
        with pytest.raises(PDMError, match=f"pdm {d}: .*{needle}"):
            load_pdm(str(d), m, sd)
    with_tensor("agg.1.weight", good_w["agg.1.weight"].to(torch.int8))
    with pytest.raises(PDMError, match="agg.1.weight: expected a floating-point tensor, got torch.int8"):
        load_pdm(str(d), m, sd)
    with_tensor("shift_norm.0.weight", good_w["shift_norm.0.weight"] > 0)
    with pytest.raises(PDMError, match="shift_norm.0.weight: expected a floating-point tensor, got torch.bool"):
        load_pdm(str(d), m, sd)
    _write_weights(d, good_w)
    # anchors edited after training: fewer anchors than the file has aggregation matrices
    cfg_j = json.loads(good_j)
    (d / "pdm.json").write_text(json.dumps(dict(cfg_j, anchors=[0, 2, 4])))
    with pytest.raises(PDMError, match=r"6 tensor\(s\) the config does not use \(agg.3.weight, agg.4.weight, "
                                       r"shift.3.weight, shift.4.weight, ...\)"):
        load_pdm(str(d), m, sd)
    (d / "pdm.json").write_text(good_j)
    with_tensor("extra.weight", torch.zeros(2))
    with pytest.raises(PDMError, match=r"1 tensor\(s\) the config does not use \(extra.weight\)"):
        load_pdm(str(d), m, sd)
    _write_weights(d, good_w)
    assert load_pdm(str(d), m, sd).cfg.anchors == ANCHORS  # restored: loads again


def test_save_pdm_refuses_weights_that_overflow_fp16(tmp_path):
    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    p = untrained_pdm(m, ANCHORS, layers=1)
    w = PDMNet(p.cfg, m, p.vocab_ids).hf_state_dict()
    w["agg.1.weight"] = w["agg.1.weight"].clone()
    w["agg.1.weight"][0, 0] = 1e6  # beyond fp16's 65504
    with pytest.raises(ValueError, match="agg.1.weight: not finite in torch.float16"):
        save_pdm(str(tmp_path / "p"), p.cfg, w)
    assert not (tmp_path / "p").exists()


def test_output_folder_through_a_dangling_link_is_refused_before_the_run(tmp_path):
    from spdkernels.runtime.files import check_output_file, check_output_folder

    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="--out: .*link is a link to a missing target"):
        check_output_folder(tmp_path / "link" / "pdm", "--out")
    with pytest.raises(ValueError, match="--json: .*link is a link to a missing target"):
        check_output_file(tmp_path / "link" / "o.json", "--json")
    assert check_output_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checked, not created


def test_pdm_path_that_is_not_a_pdm_folder_is_refused(tmp_path):
    """The path must be the folder, or its pdm.json / pdm.safetensors: any other file is refused (not read as
    the folder it sits in), as are an empty path, a missing one, and a pdm.json that is a folder."""
    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    d = _save(tmp_path, m, untrained_pdm(m, ANCHORS, layers=1), sd)
    for f in ("pdm.json", "pdm.safetensors"):
        assert load_pdm(str(d / f), m, sd).cfg.anchors == ANCHORS
    (d / "notes.txt").write_text("a file beside a good PDM")
    with pytest.raises(PDMError, match="notes.txt is a file, expected a folder with pdm.json and pdm.safetensors"):
        load_pdm(str(d / "notes.txt"), m, sd)
    with pytest.raises(PDMError, match="empty path"):
        load_pdm("", m, sd)
    with pytest.raises(PDMError, match="nowhere does not exist"):
        load_pdm(str(tmp_path / "nowhere"), m, sd)
    bad = tmp_path / "dir-json"
    (bad / "pdm.json").mkdir(parents=True)
    (bad / "pdm.safetensors").write_bytes((d / "pdm.safetensors").read_bytes())
    with pytest.raises(PDMError, match="expected pdm.json and pdm.safetensors"):
        load_pdm(str(bad), m, sd)


def test_a_non_finite_draft_distribution_is_refused_not_sampled(pdm):
    """A sampled draft's q must be a distribution: NaN or infinite logits raise a PDMError instead of handing
    verification a NaN q (with which the rejection rule would no longer be lossless)."""
    V = pdm.cfg.draft_vocab
    ok = torch.zeros(V, dtype=torch.float64)
    tok, q = draw_draft(pdm, ok, 0.8, seed=1, pos=5)
    assert q is not None and abs(float(q.sum()) - 1) < 1e-9 and tok in pdm.vocab_ids.tolist()
    for bad in (float("nan"), float("inf")):
        logits = ok.clone()
        logits[2] = bad
        with pytest.raises(PDMError, match="draft distribution for position 5 is not finite"):
            draw_draft(pdm, logits, 0.8, seed=1, pos=5)


def test_stages_the_pdm_was_not_trained_for_warn(model):
    """Any n fits anchors 0 = b_0 < ... <= L (verification keeps the output the target's), but a PDM runs
    depth layouts it never saw at an n it was not trained for: a warning says so; none for a trained n or a PDM
    without a training record."""
    import warnings

    cfg = type("C", (), dict(anchors=[0, 2, 4], m=2, training=dict(stages_trained_for=[2, 4])))()
    with pytest.warns(UserWarning, match=r"trained for n in \[2, 4\], not for n = 3") as rec:
        check_stages(cfg, 4, 3)
    assert [w.filename for w in rec] == [__file__]  # the caller's line, not ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_stages(cfg, 4, 2) == [0, 1, 2]
        cfg.training = {}
        check_stages(cfg, 4, 3)


def test_cli_bad_pdm_and_prompt_file_exit_2_before_the_load_and_leave_no_folders(tmp_path, capsys):
    """An empty --pdm is refused (not read as the shipped PDM); a --prompt-file that is bad JSON, empty or not
    UTF-8 is refused before the model loads (a missing model would be the error otherwise); a refused run leaves
    no output folder behind (output folders are made by the first write, not by the check)."""
    nomodel = str(tmp_path / "no-model.gguf")
    bad_json, empty, latin = tmp_path / "p.json", tmp_path / "empty.txt", tmp_path / "latin.txt"
    bad_json.write_text('["one", "two" "three"]')
    empty.write_text("\n  \n")
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "list.json").write_text("[]")
    out = tmp_path / "new" / "deeper" / "o.json"
    cases = [
        (["--prompt-file", str(bad_json)], "--prompt-file: " + str(bad_json) + " is not valid JSON"),
        (["--prompt-file", str(empty)], "--prompt-file: no prompts in"),
        (["--prompt-file", str(tmp_path / "list.json")], "--prompt-file: no prompts in"),
        (["--prompt-file", str(latin)], "is not UTF-8 text"),
    ]
    for extra, needle in cases:
        rc = cli_main(["generate", "--model", nomodel, "--json", str(out), "--no-progress"] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "new").exists()
    # the model fails to load after the checks: still no folder
    rc = cli_main(["generate", "--model", nomodel, "--prompt", "hi", "--json", str(out), "--no-progress"])
    assert rc == 2 and not (tmp_path / "new").exists()
    rc = cli_main(["train-pdm", "--model", nomodel, "--out", str(tmp_path / "new" / "pdm")])
    assert rc == 2 and not (tmp_path / "new").exists()
    capsys.readouterr()
    for cmd in (["generate", "--prompt", "hi", "--proposer", "spd"], ["demo"]):
        rc = cli_main(cmd + ["--model", nomodel, "--pdm", "", "--json", str(out), "--no-progress"])
        err = capsys.readouterr().err  # (before the load: the missing model is not the error)
        assert rc == 2 and "--pdm: empty path" in err and not (tmp_path / "new").exists(), err


def test_shipped_pdm_refused_for_another_model_says_how_to_get_one(tmp_path):
    from types import SimpleNamespace

    from spdkernels.runtime.cli import load_pdm_for

    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    with pytest.raises(PDMError, match=r"made for a target.*train-pdm --model MODEL --out DIR\) and pass --pdm DIR"):
        load_pdm_for(SimpleNamespace(pdm=None), SimpleNamespace(state_dict=sd), m)
    d = _save(tmp_path, m, untrained_pdm(m, ANCHORS, layers=1), sd)  # a PDM of its own loads
    assert load_pdm_for(SimpleNamespace(pdm=str(d)), SimpleNamespace(state_dict=sd), m).cfg.anchors == ANCHORS


def test_cli_unwritable_outputs_exit_2_before_the_model_loads(tmp_path, capsys):
    """An output path that cannot be written is refused before any work (the model load included: a missing
    model would be the error otherwise), never a traceback after the run."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    nomodel = str(tmp_path / "no-model.gguf")
    cases = [
        (["generate", "--model", nomodel, "--prompt", "hi", "--json", str(afile / "o.json")], "--json"),
        (["generate", "--model", nomodel, "--prompt", "hi", "--json", str(tmp_path)], "--json"),
        (["demo", "--model", nomodel, "--json", str(afile / "d.json")], "--json"),
        (["demo", "--model", nomodel, "--json", str(tmp_path / "d.json"), "--plot", str(afile / "d.png")], "--plot"),
        (["train-pdm", "--model", nomodel, "--out", str(afile)], "--out"),
        (["train-pdm", "--model", nomodel, "--out", str(tmp_path / "o"), "--work", str(afile / "w")], "--work"),
        # an empty path is not the current folder
        (["generate", "--model", nomodel, "--prompt", "hi", "--json", ""], "--json"),
        (["demo", "--model", nomodel, "--json", ""], "--json"),
        (["demo", "--model", nomodel, "--plot", ""], "--plot"),
        (["train-pdm", "--model", nomodel, "--out", ""], "--out"),
        (["train-pdm", "--model", nomodel, "--out", str(tmp_path / "o"), "--work", ""], "--work"),
        # too few prompts for a held-out split and training text (an IndexError after the text, before)
        (["train-pdm", "--model", nomodel, "--out", str(tmp_path / "o"), "--prompts", "9"], "--prompts"),
        # (--no-json / --no-plot skip a file; an empty path is still refused above: here the model is the error)
        (["demo", "--model", nomodel, "--no-json", "--json", "", "--no-plot", "--plot", ""], "model"),
        # a PDM the command would not use
        (["generate", "--model", nomodel, "--prompt", "hi", "--pdm", str(tmp_path)], "--pdm"),
        (["generate", "--model", nomodel, "--prompt", "hi", "--proposer", "ngram", "--pdm", str(tmp_path)], "--pdm"),
        (["demo", "--model", nomodel, "--no-spd", "--pdm", str(tmp_path)], "--pdm"),
    ]
    for argv, needle in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {needle}:") and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the checks create nothing
    assert afile.read_text() == "x"


def test_output_checks_create_an_entry_to_know(tmp_path, monkeypatch, capsys):
    """os.access says yes to root everywhere (/sys, a read-only mount seen by root): the checks create and remove
    an entry, so such a folder is refused before the run instead of failing after it with a traceback."""
    import errno
    import os
    import tempfile

    from spdkernels.runtime.files import check_output_file, check_output_folder

    check_output_file(tmp_path / "a" / "o.json", "--json")  # writable: fine, and nothing is left behind
    assert list(tmp_path.iterdir()) == []

    def refused(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(ValueError, match=r"--json: the folder .* is not writable \(Read-only file system\)"):
        check_output_file(tmp_path / "o.json", "--json")
    with pytest.raises(ValueError, match=r"--out: the folder .* is not writable .*cannot create"):
        check_output_folder(tmp_path / "new" / "pdm", "--out")
    monkeypatch.undo()
    if os.geteuid() == 0 and os.path.isdir("/sys/kernel"):  # the real case, where this runs as root
        nomodel = str(tmp_path / "no-model.gguf")
        assert cli_main(["generate", "--model", nomodel, "--prompt", "hi", "--json", "/sys/kernel/o.json"]) == 2
        assert capsys.readouterr().err.startswith("error: --json: the folder /sys/kernel is not writable")


def test_atomic_writes_leave_the_old_file_or_none(tmp_path):
    from spdkernels.runtime.files import write_atomic, write_text_atomic

    p = tmp_path / "sub" / "f.json"
    write_text_atomic(p, "old")
    assert p.read_text() == "old" and oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def broken(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(p, broken)
    assert p.read_text() == "old" and sorted(x.name for x in p.parent.iterdir()) == ["f.json"]
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "new.json", broken)
    assert not (tmp_path / "new.json").exists() and sorted(x.name for x in tmp_path.iterdir()) == ["sub"]


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """The temporary file is fsync'ed before it replaces the final name, the folder after (a power loss would
    otherwise be able to leave the new name on an empty file)."""
    import os as os_mod

    from spdkernels.runtime import files

    events = []
    real_fsync, real_replace = os_mod.fsync, os_mod.replace

    def fsync(fd):
        events.append(("fsync", os_mod.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    p = tmp_path / "f.json"
    files.write_text_atomic(p, "data")
    assert p.read_text() == "data"
    (kind0, first), (kind1, renamed), (kind2, folder) = events
    assert kind0 == "fsync" and Path(first).name.startswith(".f.json.") and Path(first).parent == tmp_path.resolve()
    assert (kind1, renamed) == ("replace", str(p)) and (kind2, Path(folder)) == ("fsync", tmp_path.resolve())


def test_figures_are_written_atomically(tmp_path):
    """Plots (demo, spd-bench, bench/spd.py) go through save_figure_atomic: a whole PNG (or SVG by suffix) under
    the final name, and a figure that fails to render leaves the previous file and no temporary one."""
    pytest.importorskip("matplotlib", reason="matplotlib draws the plots (installed with the package's bench extra)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spdkernels.runtime.files import save_figure_atomic

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    p = tmp_path / "plot.png"
    save_figure_atomic(fig, p)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_figure_atomic(fig, tmp_path / "plot.svg")
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:400]
    old = p.read_bytes()
    ax.set_title("$\\frac{$")  # mathtext that cannot be parsed: rendering raises
    with pytest.raises(ValueError):
        save_figure_atomic(fig, p)
    plt.close(fig)
    assert p.read_bytes() == old and sorted(x.name for x in tmp_path.iterdir()) == ["plot.png", "plot.svg"]


def _umask():
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_layer_range_model_and_stage_caches(model, prompts):
    """A model holding only layers 1..2 (and a cache of only those layers) gives the full model's
    hidden states for that range."""
    sd = random_state_dict(CFG)
    part = LlamaModel(CFG, {k: v for k, v in sd.items() if ".layers.1." in k or ".layers.2." in k},
                      dtype=torch.float64, layers=(1, 3), head=False)
    ids = prompts[3]
    T = len(ids)
    full_cache, part_cache = model.new_cache(2, 16), part.new_cache(2, 16)
    assert part_cache.first_layer == 1 and part_cache.k.shape[0] == 2
    for c in (full_cache, part_cache):
        c.add(0)
        c.reserve(0, T)
    b = Batch(torch.tensor(ids), torch.arange(T), torch.tensor(full_cache.slots(0, range(T))),
              torch.tensor([0, T], dtype=torch.int32), torch.tensor([T], dtype=torch.int32),
              full_cache.block_table([0]))
    h0 = model.embed_tokens(b.token_ids)
    h1, _ = model.forward_layers(h0, b, full_cache, 0, 1)
    want, _ = model.forward_layers(h1, b, full_cache, 1, 3)
    got, _ = part.forward_layers(h1, b, part_cache, 1, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layers"):
        part.forward_layers(h1, b, part_cache, 0, 3)


# ---- training --------------------------------------------------------------------------------------------------
def _tiny_training_set(model, n_seq=6, seed=0):
    from spdkernels.runtime.spd.data import anchor_states

    g = torch.Generator().manual_seed(seed)
    corpus = [dict(prompt_ids=torch.randint(0, CFG.vocab_size, (5,), generator=g).tolist(),
                   output_ids=torch.randint(0, CFG.vocab_size, (27,), generator=g).tolist()) for _ in range(n_seq)]
    states = anchor_states(model, [c["prompt_ids"] + c["output_ids"] for c in corpus], ANCHORS)
    return make_windows(states, corpus, 16)


@pytest.mark.parametrize("window", [4, 8, 16, 64])
@pytest.mark.parametrize("loss_from", [None, 1, 3, 6])
def test_windows_cover_exactly_the_loss_rows(window, loss_from):
    """Over all windows, the loss rows of a sequence are each of its positions from the last prompt token on (the
    generated text's rows) or, with ``loss_from``, from position ``loss_from - 1`` on (the prompt's rows after that
    preamble too), every one with a next token, each window's rows its own anchors and next ids; the shared preamble
    of a corpus is what all its prompts begin with."""
    from spdkernels.runtime.spd.train import shared_prefix

    g = torch.Generator().manual_seed(window)
    pre = [7, 8, 9]
    corpus = [dict(prompt_ids=pre + torch.randint(0, 50, (p,), generator=g).tolist(),
                   output_ids=torch.randint(0, 50, (o,), generator=g).tolist())
              for p, o in [(2, 9), (5, 1), (0, 30), (9, 3)]]
    corpus[2]["prompt_ids"][-1] = 99  # (its preamble is cut short: the shared prefix is 2 tokens)
    assert shared_prefix(corpus) == 2 and shared_prefix(corpus[:2]) == 3 and shared_prefix([]) == 0
    for recorded_all in (True, False):  # states for every token, or every token but the last
        states, seqs = [], []
        for i, c in enumerate(corpus):  # anchor 0 holds the position, anchor 1 the sequence
            ids = c["prompt_ids"] + c["output_ids"]
            T = len(ids) - (0 if recorded_all else 1)
            h = torch.empty(T, 2, 3, dtype=torch.float16)
            h[:, 0] = torch.arange(T, dtype=torch.float16)[:, None]
            h[:, 1] = i
            states.append(h)
            seqs.append(ids)
        wins = make_windows(states, corpus, window, loss_from=loss_from)
        seen = [set() for _ in corpus]
        for w in wins:
            S = w.anchors.shape[0]
            i = int(w.anchors[0, 1, 0])
            ids = seqs[i]
            assert 2 <= S <= window and bool((w.anchors[:, 1] == i).all())
            pos = w.start + torch.arange(S)
            assert torch.equal(w.anchors[:, 0, 0].long(), pos)
            assert torch.equal(w.next_ids, torch.tensor([ids[t + 1] if t + 1 < len(ids) else -1 for t in pos.tolist()]))
            rows = {w.start + r for r in range(w.first_loss, S) if int(w.next_ids[r]) >= 0}
            assert rows  # no window without a loss row
            assert not rows & seen[i]  # each row a loss row once (an overlap was trained again, on less context)
            seen[i] |= rows
        for i, (c, h) in enumerate(zip(corpus, states)):
            P = len(c["prompt_ids"])
            first = P - 1 if loss_from is None else min(max(1, loss_from), P) - 1
            assert seen[i] == {t for t in range(max(first, 0), h.shape[0]) if t + 1 < len(seqs[i])}


@pytest.mark.parametrize("anchor_norm,shift", [(False, False), (True, False), (False, True)])
def test_trainer_is_reproducible_and_learns(anchor_norm, shift):
    """The same seed gives bit-identical weights; the training loss falls over a few dozen steps."""
    m = LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float32)
    wins = _tiny_training_set(m)
    cfg = untrained_pdm(m, ANCHORS, layers=1, intermediate=32, anchor_norm=anchor_norm, shift=shift).cfg
    cfg.training = dict(vocab_ids=list(range(CFG.vocab_size)))

    def run(steps):
        st = TrainSettings(steps=steps, batch=2, lr=3e-3, window=16, seed=7)
        tr = Trainer(m, cfg, wins, wins[:2], st, log=lambda *a: None)
        return tr, tr.run(progress=False)

    a, ra = run(6)
    b, _ = run(6)
    sa, sb = a.net.hf_state_dict(), b.net.hf_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ("anchor_norm.0.weight" in sa) == anchor_norm
    assert ("shift.0.weight" in sa) == shift
    if shift:  # the previous-token term was trained away from its zero start
        assert float(sa["shift.0.weight"].abs().max()) > 0
    _, res = run(60)
    loss = [h["loss"] for h in res["history"]]
    assert sum(loss[-10:]) / 10 < 0.8 * sum(loss[:10]) / 10, (loss[:10], loss[-10:])


def test_cli_train_pdm_bad_device_exits_2(tmp_path, capsys):
    rc = cli_main(["train-pdm", "--out", str(tmp_path / "o"), "--device", "tpu:x"])
    assert rc == 2 and not (tmp_path / "o").exists()
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [(f, "0") for f in ("--stages", "--layers", "--intermediate", "--draft-vocab",
                                                            "--prompts", "--max-new-tokens", "--gen-batch", "--steps",
                                                            "--batch", "--lr")]
                         + [("--self-prompts", "1.5"), ("--self-prompts", "-0.1"), ("--self-prompts", "nan"),
                            ("--tower-init", "-1"), ("--stages", "1"), ("--lr", "inf"), ("--lr", "nan"),
                            ("--seed", "-1"), ("--seed", str(2 ** 40))])
def test_cli_train_pdm_bad_numbers_exit_2(tmp_path, capsys, flag, value):
    rc = cli_main(["train-pdm", "--out", str(tmp_path / "o"), flag, value])
    assert rc == 2 and not (tmp_path / "o").exists()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}:") and "Traceback" not in err


@pytest.mark.parametrize("inter", [40, 96, 128])
def test_tower_init_copies_a_target_layer(inter):
    """``tower_init``: every tower layer starts as the target's layer (norms, attention exactly); the MLP keeps
    the target's neurons of largest |gate| |up| |down| in their order when narrower, all of them (then its own
    noise) when wider; the copies are the net's parameters (trained, not frozen)."""
    from spdkernels.runtime.linear import PackedWeight

    sd = {k: v.half().float() for k, v in random_state_dict(CFG).items()}  # fp16 values: the target packs them
    m = LlamaModel(CFG, sd)
    assert isinstance(m.layers[2].w_gate_up, PackedWeight) == ("cpp" in backends_here())  # (copied via dequantize)
    cfg = untrained_pdm(m, ANCHORS, layers=2, intermediate=inter, draft_vocab=16).cfg
    base = PDMNet(cfg, m, torch.arange(16), seed=3)
    net = PDMNet(cfg, m, torch.arange(16), seed=3, tower_init=2)
    p = "model.layers.2."
    gate, up, down = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"], sd[p + "mlp.down_proj.weight"]
    It = CFG.intermediate_size
    k = min(inter, It)
    score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    keep = score.topk(k).indices.sort().values
    dropped = [i for i in range(It) if i not in keep.tolist()]
    assert len(dropped) == It - k and (not dropped or float(score[keep].min()) >= float(score[dropped].max()))
    if inter >= It:
        assert keep.tolist() == list(range(It))
    for L, L0 in zip(net.layers, base.layers):
        assert torch.equal(L.ln1, sd[p + "input_layernorm.weight"])
        assert torch.equal(L.ln2, sd[p + "post_attention_layernorm.weight"])
        assert torch.equal(L.w_qkv, torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
        assert torch.equal(L.w_o, sd[p + "self_attn.o_proj.weight"])
        assert torch.equal(L.w_gate_up[:k], gate[keep]) and torch.equal(L.w_gate_up[inter:inter + k], up[keep])
        assert torch.equal(L.w_down[:, :k], down[:, keep])
        # past the target's neurons: the noise of the uninitialised net, untouched
        assert torch.equal(L.w_gate_up[k:inter], L0.w_gate_up[k:inter])
        assert torch.equal(L.w_gate_up[inter + k:], L0.w_gate_up[inter + k:])
        assert torch.equal(L.w_down[:, k:], L0.w_down[:, k:])
    assert all(isinstance(t, torch.nn.Parameter) for t in net.parameters())
    for bad in (-1, CFG.num_layers):
        with pytest.raises(ValueError, match=f"tower_init: expected a layer of the target, 0..{CFG.num_layers - 1}"):
            PDMNet(cfg, m, torch.arange(16), tower_init=bad)


def test_cli_train_pdm_tower_init_past_the_target_exits_2_before_any_work(tmp_path, capsys):
    rc = cli_main(["train-pdm", "--out", str(tmp_path / "o"), "--tower-init", "30"])
    err = capsys.readouterr().err
    assert rc == 2 and "--tower-init: expected a layer of the target, 0..29, got 30" in err
    assert not (tmp_path / "o").exists()


def test_pdm_probe_loads_every_tensor_of_the_file(tmp_path):
    """The probe's loader rebuilds the training net with every tensor of a saved PDM (the options' tensors
    included: a tensor it skipped would stay at its initialisation and the probe would score another PDM)."""
    from spdkernels.bench.pdm_probe import load_net

    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    m = LlamaModel(CFG, sd)
    for i, kw in enumerate([dict(), dict(anchor_norm=True, shift=True)]):
        cfg = untrained_pdm(m, ANCHORS, layers=2, intermediate=48, **kw).cfg
        cfg.target = target_fingerprint(m.config, sd)
        net = PDMNet(cfg, m, torch.arange(CFG.vocab_size), seed=1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        want = net.hf_state_dict()
        d = save_pdm(str(tmp_path / f"p{i}"), cfg, want)
        got = load_net(str(d), m).hf_state_dict()
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v.half().to(v.dtype) if v.is_floating_point() else v, rtol=0, atol=0)


def test_held_out_split_is_seeded_disjoint_and_complete():
    """train_pdm and `bench/spd.py --corpus` take the held-out sequences from this one function."""
    from spdkernels.runtime.spd.train import held_out_split

    held, train = held_out_split(100, 0)
    assert len(held) == 8 and len(train) == 92 and sorted(held + train) == list(range(100))
    assert held == sorted(held) and train == sorted(train)
    assert held_out_split(100, 0) == (held, train) and held_out_split(100, 1)[0] != held
    assert held_out_split(5, 0)[0] and len(held_out_split(5, 0)[0]) == 1  # at least one held out


def test_held_out_split_keeps_a_followup_with_the_reply_it_hands_back():
    """A second-round prompt embeds a first-round reply: with families the split holds out or trains on the
    two together (no held-out text was trained on through its follow-up, and the reverse); seeded; the
    sequences it holds out are at least the fraction asked."""
    from spdkernels.runtime.spd.data import corpus_families
    from spdkernels.runtime.spd.train import held_out_split

    corpus = [dict(kind="doc", round=1) for _ in range(140)]
    corpus += [dict(kind="text", round=2, source=(7 * j) % 140) for j in range(60)]  # some replies twice
    fam = corpus_families(corpus)
    assert fam[:140] == list(range(140)) and fam[140] == 0 and fam[141] == 7
    for seed in range(5):
        held, train = held_out_split(200, seed, families=fam)
        assert sorted(held + train) == list(range(200)) and held == sorted(held) and train == sorted(train)
        assert len(held) >= 16
        hs = set(held)
        assert all((i in hs) == (fam[i] in hs) for i in range(200)), seed
        assert held_out_split(200, seed, families=fam) == (held, train)
    # the split without families (a corpus that predates sources) puts some follow-ups across from their reply
    crossed = 0
    for seed in range(5):
        hs = set(held_out_split(200, seed)[0])
        crossed += sum((i in hs) != (fam[i] in hs) for i in range(140, 200))
    assert crossed > 0
    with pytest.raises(ValueError, match="families"):
        held_out_split(200, 0, families=fam[:10])


def test_generate_corpus_records_the_source_of_each_followup(monkeypatch):
    import dataclasses

    from spdkernels.runtime.spd import data

    seen = {}

    def fake_followups(replies, count, seed, with_source=False):
        assert with_source
        seen["replies"] = replies
        return [("text", f"edit: {replies[i][1]}", i) for i in (2, 0, 2)][:count]

    monkeypatch.setattr(data, "followup_prompts", fake_followups)
    c = dataclasses.replace(CFG, eos_token_ids=[5, 17, 40])
    m = LlamaModel(c, random_state_dict(c), dtype=torch.float64)
    corpus, _ = data.generate_corpus(m, _ChatByteTokenizer(), 10, 4, 0, batch=4, log=lambda *a: None,
                                     followup_fraction=0.3)
    assert len(corpus) == 10 and [s["round"] for s in corpus] == [1] * 7 + [2] * 3
    assert [s.get("source") for s in corpus[7:]] == [2, 0, 2] and all("source" not in s for s in corpus[:7])
    assert data.corpus_families(corpus) == list(range(7)) + [2, 0, 2]


def test_followup_prompts_name_their_source():
    from spdkernels.runtime.spd.prompts import followup_prompts

    docs = [("doc", " ".join(f"w{j}x{i}" for i in range(50))) for j in range(3)]
    code = ("code", "Here:\n```python\ndef g(y):\n    return y * 2\n```")
    replies = docs + [("chat", "hi")] + [code]
    out = followup_prompts(replies, 10, seed=1, with_source=True)
    assert len(out) == 10 and [(k, p) for k, p, _ in out] == followup_prompts(replies, 10, seed=1)
    for kind, text, src in out:
        assert src != 3  # the chat reply is never handed back
        if kind == "code":
            assert src == 4 and "def g(y):" in text
        else:  # a doc (maybe with typos): most of its source's words, none of the other docs'
            words = set(text.split())
            overlap = [len(words & set(d.split())) for _, d in docs]
            assert overlap[src] >= 25 and sum(overlap) == overlap[src], (src, overlap)


def test_corpus_settings_follow_the_tokenizer_template_and_eos():
    from spdkernels.runtime.spd.data import corpus_settings

    tok = _ChatByteTokenizer()
    base = corpus_settings(tok, [5, 17])
    assert corpus_settings(_ChatByteTokenizer(), [17, 5]) == base  # deterministic, order of ids irrelevant
    assert corpus_settings(tok, [5]) != base
    assert corpus_settings(tok, [5, 17], 0.4) != base and corpus_settings(tok, [5, 17], 0.0) == base
    assert corpus_settings(_ByteTokenizer(), [5, 17]) != base  # another chat template
    assert corpus_settings(tok, [5, 17], packed=True) != base  # text of packed weights is cached apart


def test_trained_corpus_and_held_out_windows(tmp_path):
    import os

    from spdkernels.runtime.spd.data import held_out_windows, trained_corpus

    for i, name in enumerate(["corpus-1-1-s0-a.json", "corpus-1-1-s0-b.json"]):
        (tmp_path / name).write_text("{}")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert trained_corpus(tmp_path, {"corpus": "corpus-1-1-s0-a.json"}).name == "corpus-1-1-s0-a.json"
    assert trained_corpus(tmp_path, {"corpus": "gone.json"}).name == "corpus-1-1-s0-b.json"  # the newest
    assert trained_corpus(tmp_path, None).name == "corpus-1-1-s0-b.json"
    w = list(range(100))
    got = held_out_windows(w, 12, 0)
    assert len(got) == 12 and got == sorted(got) and got != w[:12] and got == held_out_windows(w, 12, 0)
    assert held_out_windows(w[:5], 12, 0) == w[:5]


def test_training_that_diverges_stops_with_a_clear_error(tmp_path):
    """A learning rate that sends the weights to inf: the run stops at the first step whose loss is not finite,
    with TrainingDivergedError (a RuntimeError; the CLI exits 1), and writes no PDM (it trained on and failed at
    the final save, 'not finite in float16', which the CLI reported as bad input)."""
    import dataclasses
    from types import SimpleNamespace

    from spdkernels.runtime.spd.train import TrainingDivergedError, train_pdm

    c = dataclasses.replace(CFG, num_layers=3)
    sd = {k: v.float() for k, v in random_state_dict(c).items()}
    ck = SimpleNamespace(config=c, state_dict=sd, tokenizer=_ByteTokenizer())
    with pytest.raises(TrainingDivergedError, match="training diverged at step [2-9]: the loss is (nan|inf)"):
        train_pdm(ck, str(tmp_path / "o"), str(tmp_path / "w"), stages=3, layers=1, num_prompts=4,
                  max_new_tokens=4, intermediate=32, settings=TrainSettings(steps=8, window=16, batch=1, lr=1e30),
                  progress=False, log=lambda *a: None)
    assert not (tmp_path / "o" / "pdm.json").exists()


def test_train_pdm_on_a_target_of_three_layers(tmp_path):
    """Fewer layers than the fixed n = 4 evaluation layouts: they shrink to the target (and the PDM is saved
    before its evaluation)."""
    import dataclasses
    from types import SimpleNamespace

    from spdkernels.runtime.spd.train import train_pdm

    c = dataclasses.replace(CFG, num_layers=3)
    sd = {k: v.float() for k, v in random_state_dict(c).items()}
    ck = SimpleNamespace(config=c, state_dict=sd, tokenizer=_ByteTokenizer())
    res = train_pdm(ck, str(tmp_path / "o"), str(tmp_path / "w"), stages=3, layers=1, num_prompts=4,
                    max_new_tokens=4, intermediate=32,
                    settings=TrainSettings(steps=1, window=16, batch=1, tower_init=2),
                    progress=False, log=lambda *a: None)
    assert set(res["held_out"]) >= {"pipe2_top1", "proposer_chain3_top1"} and (tmp_path / "o" / "pdm.json").exists()
    training = json.loads((tmp_path / "o" / "pdm.json").read_text())["training"]
    assert training["corpus"].startswith("corpus-4-4-s0-")
    # the layouts it can draw on 3 layers: n = 2 and the n its anchors are cut for (added), not 4 or 8
    assert training["stages_trained_for"] == [2, 3] and training["settings"]["tower_init"] == 2
    with pytest.raises(ValueError, match="tower_init: expected a layer of the target, 0..2, got 3"):
        train_pdm(ck, str(tmp_path / "o2"), str(tmp_path / "w"), stages=3, layers=1, num_prompts=4,
                  max_new_tokens=4, intermediate=32, settings=TrainSettings(steps=1, window=16, batch=1, tower_init=3),
                  progress=False, log=lambda *a: None)
    assert not (tmp_path / "o2").exists()
    # one prompt: its sequence is the held-out split and nothing is left to train on (an IndexError in the
    # training loop before); the text is cached, the output folder never made
    with pytest.raises(ValueError, match=r"num_prompts \(--prompts\): 1 prompts gave 0 training"):
        train_pdm(ck, str(tmp_path / "o3"), str(tmp_path / "w"), stages=3, layers=1, num_prompts=1,
                  max_new_tokens=4, intermediate=32, settings=TrainSettings(steps=1, window=16, batch=1),
                  progress=False, log=lambda *a: None)
    assert not (tmp_path / "o3").exists()


def test_bench_spd_refuses_a_bad_corpus(tmp_path, capsys):
    from spdkernels.bench.spd import main as bench_spd

    bad = tmp_path / "corpus.json"
    for text in ["{not json", json.dumps(dict(meta={}, sequences=[])),
                 json.dumps(dict(meta=dict(seed=0), sequences=[dict(prompt_ids=[1, 2])]))]:
        bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            bench_spd(["--corpus", str(bad)])
        assert e.value.code == 2 and "--corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_spd(["--corpus", str(tmp_path / "missing.json")])
    assert e.value.code == 2 and "--corpus" in capsys.readouterr().err
    for lo_hi in (["0", "3"], ["3", "2"]):
        with pytest.raises(SystemExit) as e:
            bench_spd(["--lookup", "--lookup-ngram", *lo_hi])
        assert e.value.code == 2 and "--lookup-ngram: expected 1 <= MIN <= MAX" in capsys.readouterr().err


def test_bench_spd_refuses_another_models_corpus():
    """A corpus whose recorded target fingerprint is not the model's, or with prompts the model refuses (token
    ids past its vocabulary), is named as the problem; a fitting one passes."""
    from types import SimpleNamespace

    from spdkernels.bench.spd import corpus_misfit

    from spdkernels.runtime.spd.pdm import target_fingerprint

    ck = SimpleNamespace(config=CFG, state_dict=random_state_dict(CFG))
    sha = target_fingerprint(CFG, ck.state_dict)["weights_sha256"]
    good = {"held-out": [[1, 2, 3, 4, 5, 6]], "training": [[7, 8, 9, 10, 11]]}
    assert corpus_misfit(dict(target_sha256=sha), good, ck, extra=5, max_new_tokens=8) is None
    assert corpus_misfit({}, good, ck, extra=5, max_new_tokens=8) is None  # corpora from before the fingerprint
    assert "another target" in corpus_misfit(dict(target_sha256="0" * 64), good, ck, extra=5, max_new_tokens=8)
    past = {"held-out": [[1, 2, CFG.vocab_size, 4, 5]], "training": [[1, 2, 3, 4, 5]]}
    assert "cannot run" in corpus_misfit(dict(target_sha256=sha), past, ck, extra=5, max_new_tokens=8)
    room = CFG.max_position - 6 - 5  # the longest prompt (6) + max_new_tokens + extra fill the context
    assert corpus_misfit({}, good, ck, extra=5, max_new_tokens=room) is None
    assert "cannot run" in corpus_misfit({}, good, ck, extra=5, max_new_tokens=room + 1)


def test_corpus_version_follows_the_target_and_the_prompt_code(monkeypatch, tmp_path):
    """train-pdm's corpus cache name carries this tag: another target or edited prompt templates give
    another file, so a stale corpus is never reused."""
    from spdkernels.runtime.spd import prompts
    from spdkernels.runtime.spd.data import corpus_version

    v = corpus_version("a" * 64)
    assert len(v) == 10 and int(v, 16) >= 0 and corpus_version("a" * 64) == v and corpus_version("b" * 64) != v
    assert corpus_version("a" * 64, "self=0.4") != v
    edited = tmp_path / "prompts.py"
    edited.write_bytes(open(prompts.__file__, "rb").read() + b"\n# another template\n")
    monkeypatch.setattr(prompts, "__file__", str(edited))
    assert corpus_version("a" * 64) != v


def test_newest_corpus_picks_the_latest_version(tmp_path):
    """bench/pdm_probe.py and bench/pdm_recipe.py read a work folder's newest corpus: older versions stay beside it."""
    import os

    from spdkernels.runtime.spd.data import newest_corpus

    with pytest.raises(FileNotFoundError, match="corpus"):
        newest_corpus(tmp_path)
    for name, mtime in [("corpus-9-9-s0-ffff.json", 1000), ("corpus-9-9-s0-0000.json", 3000),
                        ("corpus-9-9-s0-aaaa.json", 2000)]:
        (tmp_path / name).write_text("{}")
        os.utime(tmp_path / name, (mtime, mtime))
    assert newest_corpus(tmp_path).name == "corpus-9-9-s0-0000.json"


def test_bench_spd_corpus_sets_are_held_out_and_kind_matched():
    from spdkernels.bench.spd import corpus_prompt_sets

    from spdkernels.runtime.spd.train import held_out_split

    kinds = ["code", "text", "chat", "doc"]
    corpus = [dict(kind=kinds[(i * 7) % 4], prompt_ids=[i, i + 1], output_ids=[0]) for i in range(200)]
    held, train = held_out_split(200, 3)
    sets = corpus_prompt_sets(corpus, 3, 6)
    assert len({p[0] for p in sets["held-out"]}) == 6 and {p[0] for p in sets["held-out"]} <= set(held)
    assert corpus_prompt_sets(corpus, 3, 6) == sets  # seeded
    held = [p[0] for p in sets["held-out"]]
    picked = [p[0] for p in sets["training"]]
    assert len(set(picked)) == 6 and set(picked) <= set(train)
    assert [corpus[i]["kind"] for i in picked] == [corpus[i]["kind"] for i in held]


class _ByteTokenizer(ByteTokenizer):
    """Enough of a tokenizer for generate_corpus on the tiny random model."""

    def __init__(self):
        super().__init__(CFG.vocab_size, 12)


def test_anchor_states_recorded_during_generation_equal_a_prefill_pass():
    """AnchorRecorder keeps, for every token but the last, the hidden states a separate prefill-style pass
    over the generated text computes (fp16), and make_windows takes the one row fewer."""
    from spdkernels.runtime.spd.data import anchor_states, generate_corpus

    m = LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float64)
    # batch 2 < 3 first-round prompts: a request joins mid-run, its anchor rows recorded from its prefill on
    corpus, states = generate_corpus(m, _ByteTokenizer(), 5, 9, 0, batch=2, anchors=ANCHORS, log=lambda *a: None)
    assert len(corpus) == len(states) >= 3
    ref = anchor_states(m, [c["prompt_ids"] + c["output_ids"] for c in corpus], ANCHORS, dtype=torch.float64)
    for c, h, r in zip(corpus, states, ref):
        assert h.dtype == torch.float16 and h.shape[0] == len(c["prompt_ids"]) + len(c["output_ids"]) - 1
        assert h.device.type == "cpu"  # (host memory, whatever the model's device)
        torch.testing.assert_close(h.double(), r[:h.shape[0]].half().double(), rtol=2e-3, atol=2e-3)
    wins = make_windows(states, corpus, 8)
    assert wins and all(int(w.next_ids.min()) >= 0 for w in wins)  # every recorded row has a next token
    with pytest.raises(ValueError, match="states"):
        make_windows([states[0][:-2]], corpus[:1], 8)


class _ChatByteTokenizer(ByteTokenizer):
    def __init__(self):
        super().__init__(CFG.vocab_size)

    def apply_chat_template(self, messages):
        return "<u>" + messages[0]["content"] + "</u>"


def test_self_prompts_are_the_targets_own_finished_messages():
    """self_prompts samples the user's message from the chat template's prefix (here ``<u>``): each one the
    model ended itself (end-of-turn token, dropped from the text) with at least 3 words, none twice, seeded."""
    import dataclasses

    from spdkernels.runtime.spd.data import self_prompts

    c = dataclasses.replace(CFG, eos_token_ids=[5, 17, 40])
    m = LlamaModel(c, random_state_dict(c), dtype=torch.float64)
    tok = _ChatByteTokenizer()
    out = self_prompts(m, tok, 6, 0, batch=4, max_tokens=24, log=lambda *a: None)
    assert len(out) == 6 and len({t for _, t in out}) == 6 and all(k == "self" for k, _ in out)
    prefix = [b % c.vocab_size for b in b"<u>"]
    ref = Engine(m).generate([Request(prefix, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95,
                                                             seed=700001 + j)) for j in range(10)])[0]
    finished = [" ".join(map(str, r.output_ids[:-1])) for r in ref if r.output_ids[-1] in (5, 17, 40)]
    kept = [t for t in finished if len(t.split()) >= 3]
    assert kept and [t for _, t in out][:len(kept)] == kept[:6]  # the first round, in order, ends cut off
    assert all(int(w) not in (5, 17, 40) or i < len(t.split()) - 1 for _, t in out for i, w in enumerate(t.split()))
    assert self_prompts(m, tok, 6, 0, batch=4, max_tokens=24, log=lambda *a: None) == out
    assert self_prompts(m, tok, 6, 1, batch=4, max_tokens=24, log=lambda *a: None) != out
    with pytest.raises(ValueError, match="chat template"):
        self_prompts(m, _ByteTokenizer(), 2, 0)  # the message alone: no user-turn prefix to continue

    class Rewrites(_ChatByteTokenizer):
        def apply_chat_template(self, messages):
            return "<u>" + messages[0]["content"].upper() + "</u>"

    with pytest.raises(ValueError, match="verbatim"):
        self_prompts(m, Rewrites(), 2, 0)


def test_generate_corpus_mixes_in_self_written_prompts():
    import dataclasses

    from spdkernels.runtime.spd.data import generate_corpus, self_prompts

    c = dataclasses.replace(CFG, eos_token_ids=[5, 17, 40])
    m = LlamaModel(c, random_state_dict(c), dtype=torch.float64)
    tok = _ChatByteTokenizer()
    corpus, _ = generate_corpus(m, tok, 10, 6, 0, batch=4, log=lambda *a: None, self_fraction=0.5,
                                followup_fraction=0.0)
    want = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]))
            for _, t in self_prompts(m, tok, 5, 0, batch=4, log=lambda *a: None)]
    assert [s["prompt_ids"] for s in corpus if s["kind"] == "self"] == want and len(corpus) == 10
    with pytest.raises(ValueError, match="self_fraction"):
        generate_corpus(m, tok, 10, 6, 0, self_fraction=-0.1)


def test_followup_prompts_hand_back_the_targets_own_text():
    from spdkernels.runtime.spd.prompts import followup_prompts, training_prompts

    doc = " ".join(f"word{i}" for i in range(60))
    code = "Here:\n```python\ndef f(x):\n    return x + 1\n```\nDone."
    out = followup_prompts([("doc", doc), ("code", code), ("chat", "hello " * 50)], 12, seed=0)
    assert len(out) == 12 and len({p for _, p in out}) == 12
    assert all(("def f(x):" in p) if k == "code" else ("word1" in p) for k, p in out)
    assert any(k == "code" for k, _ in out) and any(k == "text" for k, _ in out)
    assert followup_prompts([("chat", "hi")], 5) == []  # nothing to hand back
    assert followup_prompts([("doc", doc), ("code", code)], 8, seed=3) == followup_prompts(
        [("doc", doc), ("code", code)], 8, seed=3)
    kinds = {k for k, _ in training_prompts(200, 0)}
    assert kinds == {"code", "text", "chat", "doc"}


def test_train_pdm_end_to_end_on_a_tiny_model_reuses_its_corpus(tmp_path):
    """The whole train-pdm pipeline on the tiny random model: text generated (anchor states recorded on the
    way), trained, evaluated, saved, loadable; a second run finds the corpus under its versioned name and
    trains the same PDM from it (seeded), without generating again."""
    from types import SimpleNamespace

    from spdkernels.runtime.spd.data import corpus_settings, corpus_version
    from spdkernels.runtime.spd.pdm import load_pdm, target_fingerprint
    from spdkernels.runtime.spd.train import train_pdm

    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    ck = SimpleNamespace(config=CFG, state_dict=sd, tokenizer=_ByteTokenizer())
    st = TrainSettings(steps=3, window=16, batch=2, stage_choices=(2, 4))
    runs = []
    for out in ("a", "b"):
        log = []
        res = train_pdm(ck, str(tmp_path / out), str(tmp_path / "work"), stages=4, layers=1, num_prompts=6,
                        max_new_tokens=6, intermediate=32, settings=st, progress=False, log=log.append)
        runs.append((res, log))
    version = corpus_version(target_fingerprint(CFG, sd)["weights_sha256"],
                             corpus_settings(ck.tokenizer, CFG.eos_token_ids))
    cached = sorted(p.name for p in (tmp_path / "work").glob("corpus-*.json"))
    assert cached == [f"corpus-6-6-s0-{version}.json"]
    assert not any("from" in line and "corpus-" in line for line in runs[0][1])
    assert any(f"corpus-6-6-s0-{version}.json" in line for line in runs[1][1])
    assert runs[0][0]["held_out"] == runs[1][0]["held_out"]
    pdm = load_pdm(str(tmp_path / "b"), LlamaModel(CFG, sd), sd)
    assert pdm.cfg.anchors == [0, 1, 2, 3, 4]
    # caches cut short (an interrupted write of an older version): read as unreadable, made again, same PDM
    for f in (tmp_path / "work").glob("corpus-*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    log = []
    res = train_pdm(ck, str(tmp_path / "c"), str(tmp_path / "work"), stages=4, layers=1, num_prompts=6,
                    max_new_tokens=6, intermediate=32, settings=st, progress=False, log=log.append)
    assert any("cached text is unreadable" in line for line in log), log
    assert res["held_out"] == runs[0][0]["held_out"]
    (spath,) = (tmp_path / "work").glob("corpus-*.anchors-*.pt")
    spath.write_bytes(spath.read_bytes()[:100])
    log = []
    res = train_pdm(ck, str(tmp_path / "d"), str(tmp_path / "work"), stages=4, layers=1, num_prompts=6,
                    max_new_tokens=6, intermediate=32, settings=st, progress=False, log=log.append)
    assert any("anchor states: the cached file is unreadable" in line for line in log), log
    # recomputed by a prefill pass instead of recorded while decoding: the same states up to rounding
    assert res["held_out"] == pytest.approx(runs[0][0]["held_out"], rel=1e-4)
    assert not [x.name for x in (tmp_path / "work").iterdir() if x.name.endswith(".tmp")]


# ---- resuming an interrupted training run -----------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def _interrupt_at(monkeypatch, cls, call):
    """Make ``cls._loss`` raise on its ``call``-th call (1-based): a run stopped in the middle of a step."""
    seen = [0]
    orig = cls._loss

    def loss(self, *a, **k):
        seen[0] += 1
        if seen[0] == call:
            raise _Interrupted
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, "_loss", loss)


def _weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_training_gives_the_weights_of_a_run_never_stopped(tmp_path, monkeypatch):
    """A run stopped after its step-3 state and resumed gives bit for bit the weights and per-step log of a run never
    stopped (weights, optimizer moments, the layout generator and the epoch's window order all restored); a resume
    that does not restore the optimizer (planted) gives other weights; a state of another run, an unreadable state and
    no state are each handled."""
    m = LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float32)
    wins = _tiny_training_set(m)
    cfg = untrained_pdm(m, ANCHORS, layers=1, intermediate=32, shift=True).cfg
    cfg.training = dict(vocab_ids=list(range(CFG.vocab_size)))
    st = TrainSettings(steps=7, batch=2, lr=3e-3, window=16, seed=7)

    def trainer(settings=st, log=None):
        return Trainer(m, cfg, wins, wins[:2], settings, log=log or (lambda *a: None))

    whole = trainer()
    ref = whole.run(tmp_path / "whole", checkpoint_every=3, progress=False)
    want = whole.net.state_dict()
    # (the run wrote its state at steps 3 and 6; the file holds the last)
    assert torch.load(tmp_path / "whole" / "checkpoint" / STATE_FILE, weights_only=False)["step"] == 6

    with monkeypatch.context() as mp:
        _interrupt_at(mp, Trainer, 4 * st.batch + 1)  # the first loss of step 5: after the step-3 state
        with pytest.raises(_Interrupted):
            trainer().run(tmp_path / "cut", checkpoint_every=3, progress=False)
    state = tmp_path / "cut" / "checkpoint" / STATE_FILE
    assert torch.load(state, weights_only=False)["step"] == 3
    log = []
    resumed = trainer(log=log.append)
    got = resumed.run(tmp_path / "cut", checkpoint_every=3, progress=False, resume=True)
    assert any("continuing at step 4 of 7" in line for line in log), log
    assert _weights_equal(resumed.net.state_dict(), want)
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in ref["history"]]
    assert [h["step"] for h in got["history"]] == list(range(7))

    # planted: a resume that keeps the optimizer it started with (fresh moments) is not the run never stopped
    with monkeypatch.context() as mp:
        _interrupt_at(mp, Trainer, 4 * st.batch + 1)
        with pytest.raises(_Interrupted):
            trainer().run(tmp_path / "cut2", checkpoint_every=3, progress=False)
    with monkeypatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "load_state_dict", lambda self, sd: None)
        planted = trainer()
        planted.run(tmp_path / "cut2", checkpoint_every=3, progress=False, resume=True)
    assert not _weights_equal(planted.net.state_dict(), want)

    # a state written by another run (another learning rate) is refused, naming the setting; nothing is trained
    other = trainer(dataclasses.replace(st, lr=1e-3))
    before = copy.deepcopy(other.net.state_dict())
    with pytest.raises(ValueError, match=r"resume: the training state .* was written by another run .*settings\.lr"):
        other.run(tmp_path / "cut", checkpoint_every=3, progress=False, resume=True)
    assert _weights_equal(other.net.state_dict(), before)
    # an unreadable state: a clear error, not a torch traceback
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match="resume: cannot read the training state"):
        trainer().run(tmp_path / "cut", checkpoint_every=3, progress=False, resume=True)
    # a trainer on another device (a GPU; "meta" stands in for it here): the state is read on the CPU and moved by
    # load_state_dict (read onto the device, its CPU-only parts broke set_rng_state); the device change is said
    with monkeypatch.context() as mp:
        _interrupt_at(mp, Trainer, 4 * st.batch + 1)
        with pytest.raises(_Interrupted):
            trainer().run(tmp_path / "cut3", checkpoint_every=3, progress=False)
    log = []
    elsewhere = trainer(log=log.append)
    elsewhere.device = torch.device("meta")
    assert elsewhere.load_state(tmp_path / "cut3" / "checkpoint" / STATE_FILE)["step"] == 3
    assert any("written on cpu, training goes on on meta" in line for line in log), log
    # no state yet: --resume trains from step 1 (the same run)
    log = []
    fresh = trainer(log=log.append)
    fresh.run(tmp_path / "empty", checkpoint_every=3, progress=False, resume=True)
    assert any("no training state" in line for line in log) and _weights_equal(fresh.net.state_dict(), want)


def test_train_pdm_resume_writes_the_pdm_of_a_run_never_stopped(tmp_path, monkeypatch):
    """The whole train-pdm pipeline stopped mid-training and run again with resume: the PDM file it writes is the one
    an uninterrupted run writes, byte for byte, and the text is not generated again."""
    from types import SimpleNamespace

    from spdkernels.runtime.spd import train as train_mod

    sd = {k: v.float() for k, v in random_state_dict(CFG).items()}
    ck = SimpleNamespace(config=CFG, state_dict=sd, tokenizer=_ByteTokenizer())
    st = TrainSettings(steps=5, window=16, batch=2, stage_choices=(2, 4))
    monkeypatch.setattr(train_mod, "CHECKPOINT_EVERY", 2)
    kw = dict(stages=4, layers=1, num_prompts=6, max_new_tokens=6, intermediate=32, settings=st, progress=False)
    train_mod.train_pdm(ck, str(tmp_path / "a"), str(tmp_path / "wa"), log=lambda *a: None, **kw)
    with monkeypatch.context() as mp:
        _interrupt_at(mp, train_mod.Trainer, 3 * st.batch + 1)  # in step 4, after the step-2 state
        with pytest.raises(_Interrupted):
            train_mod.train_pdm(ck, str(tmp_path / "b"), str(tmp_path / "wb"), log=lambda *a: None, **kw)
    assert not (tmp_path / "b" / "pdm.json").exists()
    log = []
    train_mod.train_pdm(ck, str(tmp_path / "b"), str(tmp_path / "wb"), log=log.append, resume=True, **kw)
    assert any("continuing at step 3 of 5" in line for line in log), log
    assert any("corpus-6-6-s0-" in line and "from" in line for line in log)  # the cached text, not generated again
    assert (tmp_path / "a" / "pdm.safetensors").read_bytes() == (tmp_path / "b" / "pdm.safetensors").read_bytes()
    assert (tmp_path / "a" / "pdm.json").read_text() == (tmp_path / "b" / "pdm.json").read_text()


def test_cli_train_pdm_resume_reaches_the_trainer_and_a_foreign_state_exits_2(tmp_path, monkeypatch, capsys):
    """--resume is handed to train_pdm; the refusal of a state written by another run is bad input (exit 2)."""
    from spdkernels.runtime.spd import train as train_mod

    seen = {}

    def fake(ck, out, work, **kw):
        seen.update(kw)
        raise ValueError("resume: the training state X was written by another run (it differs in settings.lr)")

    monkeypatch.setattr(train_mod, "train_pdm", fake)
    rc = cli_main(["train-pdm", "--out", str(tmp_path / "o"), "--resume", "--no-progress"])
    assert rc == 2 and seen["resume"] is True
    assert "differs in settings.lr" in capsys.readouterr().err
    seen.clear()
    cli_main(["train-pdm", "--out", str(tmp_path / "o"), "--no-progress"])
    assert seen["resume"] is False
