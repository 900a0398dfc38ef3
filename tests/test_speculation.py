"""AdaptiveSpeculation: the cost fit, the acceptance estimate, the per-batch depth plan (deeper drafts when
verification is nearly free and drafts are accepted, shallower as the batch grows or acceptance falls),
probing, validation, and on the tiny float64 model: outputs still equal autoregressive decoding."""
import math

import pytest
import torch

from spdkernels.runtime import (
    AdaptiveSpeculation,
    DraftModelProposer,
    Engine,
    LlamaModel,
    NGramProposer,
    Request,
    SamplingParams,
)
from spdkernels.runtime.model import greedy_reference, random_config, random_state_dict
from spdkernels.runtime.proposers import Draft


def timed(spec, a, b, sizes, c=0.0, levels=0):
    for T in sizes:
        spec.observe_step(T, a + b * T, levels, c * levels)


def expected_rate(ks, alphas, a, b):
    E = sum(sum(al ** i for i in range(k + 1)) for k, al in zip(ks, alphas))
    return E / (a + b * (len(ks) + sum(ks)))


def test_cost_fit_recovers_a_linear_cost():
    spec = AdaptiveSpeculation(halflife=1e9)
    timed(spec, 0.040, 0.003, [1, 5, 9, 3, 2, 7], c=0.001, levels=4)
    a, b, c = spec.cost_model()
    assert a == pytest.approx(0.040, rel=1e-6) and b == pytest.approx(0.003, rel=1e-6)
    assert c == pytest.approx(0.001, rel=1e-9)


def test_cost_fit_with_one_size_uses_the_prior_slope():
    spec = AdaptiveSpeculation(prior_token_cost=0.1)
    timed(spec, 0.05, 0.0, [1, 1, 1])
    a, b, _ = spec.cost_model()
    assert a + b == pytest.approx(0.05) and b == pytest.approx(0.1 * a)


def test_acceptance_estimate_moves_with_evidence_and_is_released():
    spec = AdaptiveSpeculation(prior_acceptance=0.5, prior_weight=2.0, halflife=1e9)
    assert spec.acceptance("r") == 0.5
    for _ in range(10):
        spec.observe_request("r", 4, 4)  # all accepted: 4 successes, no failure
    assert spec.acceptance("r") == pytest.approx((40 + 1) / (40 + 2))
    for _ in range(30):
        spec.observe_request("s", 4, 0)  # rejected at once: one failure each
    assert spec.acceptance("s") == pytest.approx(1 / 32)
    spec.observe_request("s", 0, 0)  # no draft: no evidence
    assert spec.acceptance("s") == pytest.approx(1 / 32)
    spec.release("r")
    assert spec.acceptance("r") == 0.5


def test_plan_is_optimal_and_shrinks_with_batch_size():
    """With alpha = 0.8 and a token costing 2% of a step, the greedy plan matches the exhaustive optimum of
    a uniform depth, and the depth per request falls as the batch grows (Su et al.)."""
    a, b = 1.0, 0.02
    depths = {}
    for R in (1, 8, 64):
        spec = AdaptiveSpeculation(max_depth=8, prior_acceptance=0.8, prior_weight=1e9, halflife=1e9)
        timed(spec, a, b, [1, 9, 5])
        ks = spec.plan(list(range(R)), [8] * R)
        best = max(range(9), key=lambda k: expected_rate([k] * R, [0.8] * R, a, b))
        assert expected_rate(ks, [0.8] * R, a, b) >= expected_rate([best] * R, [0.8] * R, a, b) - 1e-12
        assert max(ks) - min(ks) <= 1  # identical requests get (nearly) the same depth
        depths[R] = sum(ks) / R
    assert depths[1] > depths[8] > depths[64]
    assert depths[1] >= 6 and depths[64] <= 3


def test_plan_charges_a_tree_level_its_width():
    """A level of a width-w tree adds w query tokens (it charged one token per level): for one request the plan is
    the depth that maximises E(k) / (a + b (1 + w k)), the exhaustive optimum, and where tokens cost it drafts
    fewer tree levels than chain levels."""
    a, b, al = 1.0, 0.05, 0.8
    for w in (1.0, 2.0, 3.0, 5.0):
        spec = AdaptiveSpeculation(max_depth=8, prior_acceptance=al, prior_weight=1e9, halflife=1e9)
        timed(spec, a, b, [1, 9, 5])
        k = spec.plan(["x"], [8], tokens_per_level=w)[0]
        rates = [sum(al ** i for i in range(d + 1)) / (a + b * (1 + w * d)) for d in range(9)]
        assert rates[k] == pytest.approx(max(rates))
    spec = AdaptiveSpeculation(max_depth=8, prior_acceptance=al, prior_weight=1e9, halflife=1e9)
    timed(spec, a, b, [1, 9, 5])
    assert sum(spec.plan(list(range(8)), [8] * 8, tokens_per_level=3.0)) < sum(spec.plan(list(range(8)), [8] * 8))
    with pytest.raises(ValueError, match="tokens_per_level"):
        spec.plan(["x"], [8], tokens_per_level=0.5)


def test_plan_prefers_the_requests_that_get_accepted():
    spec = AdaptiveSpeculation(max_depth=8, halflife=1e9)
    timed(spec, 1.0, 0.05, [1, 9])
    for _ in range(20):
        spec.observe_request("good", 5, 5)
        spec.observe_request("bad", 5, 0)
    ks = spec.plan(["good", "bad"], [8, 8])
    assert ks[0] >= 4 and ks[1] == 0


def test_plan_respects_caps_and_probes_idle_requests():
    spec = AdaptiveSpeculation(max_depth=6, probe_every=3, halflife=1e9)
    assert spec.plan(["x", "y"], [2, 10]) == [2, 6]  # nothing timed yet: as deep as allowed
    timed(spec, 1.0, 1.0, [1, 9])  # a draft token costs a whole step: nothing pays
    for _ in range(20):
        spec.observe_request("x", 3, 0)
    plans = [spec.plan(["x"], [5])[0] for _ in range(9)]
    assert plans == [0, 0, 1] * 3
    assert spec.plan(["x"], [0]) == [0]


@pytest.mark.parametrize("kw,needle", [
    (dict(max_depth=0), "max_depth"), (dict(prior_acceptance=1.0), "prior_acceptance"),
    (dict(prior_weight=0), "prior_weight"), (dict(halflife=0), "halflife"), (dict(probe_every=0), "probe_every"),
    (dict(prior_token_cost=-1), "prior_token_cost"), (dict(prior_acceptance=math.nan), "prior_acceptance"),
])
def test_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        AdaptiveSpeculation(**kw)


CFG = random_config()


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float64)


@pytest.mark.parametrize("name", ["ngram", "draft-model-self"])
def test_engine_with_adaptive_speculation_equals_autoregressive(model, name):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (12, 3, 30)]
    prompts = [p + p[:8] for p in prompts]  # repeats for the n-gram proposer
    prop = NGramProposer(k=6, min_ngram=1) if name == "ngram" else DraftModelProposer(model, k=6)
    spec = AdaptiveSpeculation(max_depth=6)
    eng = Engine(model, prop, scrub_cache=True, validate_ops=True, speculation=spec)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    res, m = eng.generate([Request(p, params) for p in prompts])
    assert [r.output_ids for r in res] == [greedy_reference(model, p, 20) for p in prompts]
    assert len(spec.history) == m.engine_steps and m.drafted > 0
    assert all(q <= R * 7 for R, q in spec.history)
    if name == "draft-model-self":  # every draft accepted: the plan keeps drafting deep
        assert m.accepted == m.drafted and max(q for _, q in spec.history) > 3


@pytest.mark.parametrize("branches", [1, 3])
def test_the_plan_is_told_the_query_tokens_of_a_level(model, branches, monkeypatch):
    """Chains: one query token per level, always; trees: the share the drafts really had (between 1 and the
    branch count), so the plan charges a tree level its width."""
    seen = []
    real = AdaptiveSpeculation.plan

    def plan(self, rids, caps, tokens_per_level=1.0):
        seen.append(tokens_per_level)
        return real(self, rids, caps, tokens_per_level)

    monkeypatch.setattr(AdaptiveSpeculation, "plan", plan)
    g = torch.Generator().manual_seed(4)
    p = torch.randint(0, 6, (40,), generator=g).tolist()  # a small alphabet: lookups find several continuations
    eng = Engine(model, NGramProposer(k=4, min_ngram=1, branches=branches), speculation=AdaptiveSpeculation(4))
    res, _ = eng.generate([Request(p, SamplingParams(max_new_tokens=16, ignore_eos=True))])
    assert res[0].output_ids == greedy_reference(model, p, 16)
    if branches == 1:
        assert seen and all(t == 1.0 for t in seen)
    else:
        assert seen[0] == 3.0 and all(1.0 <= t <= 3.0 for t in seen) and len(set(seen)) > 1


class _CostlyNothing(NGramProposer):
    """Spends time drafting and drafts nothing (a model drafter whose every chain was cut at its first level)."""

    def propose(self, states, depth_limits):
        import time

        time.sleep(0.002)
        return [Draft() for _ in states]


def test_draft_time_that_drafts_nothing_still_counts(model):
    # the draft cost per level is charged per planned level: time spent without drafting must reach the fit
    # (counting drafted depth instead would drop every one of these steps and leave the cost at zero)
    spec = AdaptiveSpeculation(max_depth=4, probe_every=1)
    eng = Engine(model, _CostlyNothing(k=4), speculation=spec)
    res, m = eng.generate([Request([1, 2, 3], SamplingParams(max_new_tokens=12, ignore_eos=True))])
    assert m.drafted == 0 and len(res[0].output_ids) == 12
    a, b, c = spec.cost_model()
    assert c >= 0.002 / 4, c  # at least the sleep spread over the deepest plan


def test_plan_never_exceeds_the_proposers_own_depth(model):
    # the engine hands the plan the proposer's bound as a cap: no level is planned (or charged, or promised) that
    # the proposer cannot draft, even before the first step is timed (when the plan drafts as deep as allowed)
    spec = AdaptiveSpeculation(max_depth=8)
    eng = Engine(model, NGramProposer(k=2, min_ngram=1), speculation=spec)
    reqs = [Request([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_new_tokens=10, ignore_eos=True)) for _ in range(2)]
    eng.generate(reqs)
    assert spec.history and all(q <= R * 3 for R, q in spec.history)
    assert spec.history[0] == (2, 6)  # first step: both requests at the proposer's depth 2
