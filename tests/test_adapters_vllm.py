"""vLLM adapter: the V1 rejection sampler's rules re-expressed here in plain torch (coins from the per-request
generators, recovered tokens by exponential race, accept rule, padding, bonus), compared exactly with the
adapter on every backend and on both CPU paths (the fused C++ op serves unseeded calls on the cpp backend; the generic
path seeded ones and every other backend); known answers; a distribution test with planted wrong variants; the
plugin."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapter_refusal_path, backend_device, backend_generator, backends_here, to_backend, use_backend
from scipy.stats import chisquare

import spdkernels
from spdkernels.adapters import vllm as av

BACKENDS = backends_here()
I32 = torch.int32


# ---- vLLM's semantics, re-expressed ------------------------------------------------------------------------

def vllm_semantics(draft, ks, max_spec_len, draft_probs, target, bonus, temps, all_greedy, generators,
                   fp64=False, target_is_probs=False):
    """What vLLM's rejection_sample returns, written as a plain loop from its documented behaviour."""
    B, N, V = len(ks), sum(ks), target.shape[1]
    dev = target.device  # (the generators live there too)
    out = torch.full((B, max_spec_len + 1), -1, dtype=I32)
    greedy = [True] * B if all_greedy else [float(t) == 0 for t in temps]
    probs = target.float() if target_is_probs else torch.softmax(target, dim=-1, dtype=torch.float32)
    if not all_greedy:
        u = torch.rand(N, dtype=torch.float64, device=dev)
        s = 0
        for r, n in enumerate(ks):
            if n:
                if r in generators:
                    u[s:s + n].uniform_(generator=generators[r])
                s += n
        q = torch.empty(B, V, dtype=torch.float64 if fp64 else torch.float32, device=dev).exponential_()
        for r, g in generators.items():
            if ks[r] > 0:
                q[r].exponential_(generator=g)
        inv_q = q.reciprocal()
    argmax = target.argmax(-1)
    s = 0
    for r, kr in enumerate(ks):
        rejected = False
        for i in range(kr):
            j = s + i
            t = int(draft[j])
            if greedy[r]:
                out[r, i] = int(argmax[j])
                if t != int(argmax[j]):
                    rejected = True
                    break
                continue
            if t < 0:
                acc = False
            else:
                dp = torch.tensor(1.0, device=dev) if draft_probs is None else draft_probs[j, t]
                acc = bool(dp > 0) and float(probs[j, t] / dp) >= float(u[j])
            if acc:
                out[r, i] = t
                continue
            if draft_probs is None:
                res = probs[j].clone()
                if t >= 0:
                    res[t] = 0
            else:
                res = torch.clamp(probs[j] - draft_probs[j], min=0)
            out[r, i] = min(int((res * inv_q[r]).argmax()), V - 1)
            rejected = True
            break
        if not rejected:
            out[r, kr] = int(bonus.reshape(-1)[r])
        s += kr
    return out


def make_case(ks, V, seed, with_q, match=0.6, pad=False):
    """Drafts that agree with the target's argmax with probability ``match`` (else random), so walks go deep;
    ``pad``: every fifth draft is the padding id -1."""
    g = torch.Generator().manual_seed(seed)
    N = sum(ks)
    logits = torch.randn(N, V, generator=g) * 2
    draft = torch.randint(0, V, (N,), generator=g, dtype=I32)
    agree = torch.rand(N, generator=g) < match
    draft = torch.where(agree, logits.argmax(-1).to(I32), draft)
    if pad:
        draft[3::5] = -1
    q = torch.softmax(torch.randn(N, V, generator=g), -1) if with_q else None
    bonus = torch.randint(0, V, (len(ks), 1), generator=g, dtype=I32)
    cu = torch.tensor(ks, dtype=torch.int64).cumsum(0).to(I32)
    return draft, cu, q, logits, bonus


def gens(seeds, backend="cpp"):
    """One generator per seeded request, on the backend's device (vLLM's generators live on its device)."""
    return {r: backend_generator(backend, s) for r, s in seeds.items()}


# ---- exact equality with vLLM's semantics ---------------------------------------------------------------------

CASES = [([3, 0, 2, 4, 1], 50, False, False), ([3, 0, 2, 4, 1], 50, True, False), ([0, 0], 7, False, False),
         ([5], 1000, True, False), ([2, 2, 2, 2, 2, 2, 2, 2], 33, True, False), ([3, 0, 2, 4, 1, 6], 50, False, True),
         ([3, 0, 2, 4, 1, 6], 50, True, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ks,V,with_q,pad", CASES, ids=[
    f"k{'-'.join(map(str, k))}-V{v}-{'q' if q else 'ngram'}{'-padded' if p else ''}" for k, v, q, p in CASES])
def test_equals_vllm_semantics_with_seeded_requests(backend, ks, V, with_q, pad):
    """Every sampled request seeded: the output and each generator's final state equal vLLM's exactly, in a
    batch mixing greedy (temperature 0) and sampled requests, requests with no drafts, padded (-1) drafts, and
    a spec length larger than the longest draft."""
    torch.manual_seed(0)
    draft, cu, q, logits, bonus = to_backend(backend, make_case(ks, V, seed=len(ks) * 7 + V, with_q=with_q, pad=pad))
    B = len(ks)
    temps = to_backend(backend, torch.tensor([0.0 if r % 3 == 1 else 1.0 for r in range(B)]))
    seeds = {r: 100 + r for r in range(B) if r % 3 != 1}
    max_spec = max(ks, default=0) + 1
    mine, ref = gens(seeds, backend), gens(seeds, backend)
    sm = av.SamplingMetadata(temperature=temps, all_greedy=False, all_random=False, generators=mine)
    with use_backend(backend):
        got = av.rejection_sample(draft, ks, max_spec, cu, q, to_backend(backend, logits.clone()), bonus, sm).cpu()
    want = vllm_semantics(draft, ks, max_spec, q, logits, bonus, temps.tolist(), False, ref)
    assert got.dtype == I32 and got.shape == (B, max_spec + 1)
    assert torch.equal(got, want)
    for r in seeds:  # the generators advanced exactly as vLLM advances them
        assert torch.equal(mine[r].get_state(), ref[r].get_state())


@pytest.mark.parametrize("fp64", [False, True])
def test_fp64_noise_and_older_target_probs_keyword(fp64):
    """use_fp64_gumbel draws the recovery noise in float64; target_probs= (older vLLM) gives probabilities."""
    ks, V = [4, 3, 0, 2], 40
    draft, cu, q, logits, bonus = make_case(ks, V, seed=5, with_q=True, match=0.3)
    probs = torch.softmax(logits, -1)
    temps = torch.ones(len(ks))
    seeds = {0: 1, 1: 2, 2: 3, 3: 4}
    sm = av.SamplingMetadata(temperature=temps, all_greedy=False, all_random=True, generators=gens(seeds))
    got = av.rejection_sample(draft, ks, 4, cu, q, bonus_token_ids=bonus, sampling_metadata=sm, target_probs=probs,
                              use_fp64_gumbel=fp64)
    want = vllm_semantics(draft, ks, 4, q, probs, bonus, temps.tolist(), False, gens(seeds), fp64=fp64,
                          target_is_probs=True)
    assert torch.equal(got, want)


# ---- known answers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_all_greedy_known_answer_and_no_randomness_consumed(backend):
    """Greedy: accept while the draft equals the row argmax, emit the argmax at the first mismatch, the bonus
    token after a full match, -1 after; no generator is touched when all_greedy."""
    V = 10
    logits = torch.full((5, V), -5.0)
    for row, tok in enumerate([3, 4, 5, 6, 7]):
        logits[row, tok] = 5.0
    draft = torch.tensor([3, 4, 9, 6, 7], dtype=I32)  # request 0: [3, 4, 9] (third wrong); request 1: [6, 7]
    g = torch.Generator().manual_seed(9)
    before = g.get_state()
    sm = av.SamplingMetadata(temperature=None, all_greedy=True, all_random=False, generators={0: g})
    with use_backend(backend):
        out = av.rejection_sample(*to_backend(backend, (draft, [3, 0, 2], 4, torch.tensor([3, 3, 5], dtype=I32), None,
                                                        logits, torch.tensor([[1], [2], [8]], dtype=I32))), sm)
    assert out.tolist() == [[3, 4, 5, -1, -1], [2, -1, -1, -1, -1], [6, 7, 8, -1, -1]]
    assert torch.equal(g.get_state(), before)
    state = torch.default_generator.get_state()
    with use_backend(backend):
        av.rejection_sample(*to_backend(backend, (draft, [3, 0, 2], 4, torch.tensor([3, 3, 5], dtype=I32), None,
                                                  logits, torch.tensor([[1], [2], [8]], dtype=I32))), sm)
    assert torch.equal(torch.default_generator.get_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_drafts_and_zero_draft_probability_are_rejected(backend):
    """A draft id of -1 is rejected (greedy: the argmax is emitted there; sampled: a token from the whole row),
    and so is a sampled draft whose draft probability is 0, even if the target gives it everything."""
    V = 6
    logits = torch.full((4, V), -30.0)
    logits[:, 2] = 30.0  # every row: token 2 is certain
    q = torch.full((4, V), 0.2)
    q[:, 2] = 0.0  # ... but the drafter gave it probability 0
    draft = torch.tensor([-1, 2, 2, 2], dtype=I32)
    sm = av.SamplingMetadata(temperature=to_backend(backend, torch.tensor([0.0, 1.0, 1.0])), all_greedy=False,
                             all_random=False, generators=gens({1: 1, 2: 2}, backend))
    with use_backend(backend):
        out = av.rejection_sample(*to_backend(backend, (draft, [1, 1, 2], 2, torch.tensor([1, 2, 4], dtype=I32), q,
                                                        logits, torch.tensor([[0], [0], [0]], dtype=I32))), sm)
    # greedy request 0 emits the argmax at its padded draft; sampled requests reject the q = 0 draft at once and
    # recover from max(p - q, 0), which is all on token 2
    assert out.tolist() == [[2, -1, -1], [2, -1, -1], [2, -1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_int64_bonus_tokens_after_a_padded_draft(backend, mode):
    """vLLM hands int64 bonus ids as often as int32; the padded-draft path wrote them into the int32 output with
    an index_put that refused the dtype (a RuntimeError on every path)."""
    logits = torch.tensor([[0.0, 5.0, 0.0]])
    greedy = mode == "greedy"
    sm = av.SamplingMetadata(temperature=None if greedy else to_backend(backend, torch.ones(1)), all_greedy=greedy,
                             all_random=not greedy)
    for bonus_dtype in (torch.int32, torch.int64):
        with use_backend(backend):
            out = av.rejection_sample(*to_backend(backend, (torch.tensor([-1], dtype=I32), [1], 1,
                                                            torch.tensor([1], dtype=I32), None, logits,
                                                            torch.tensor([[2]], dtype=bonus_dtype))), sm)
        if greedy:
            assert out.tolist() == [[1, -1]]
        else:  # the padded draft is rejected; the recovered token comes from the whole row
            assert out.shape == (1, 2) and out.dtype == I32 and 0 <= int(out[0, 0]) < 3 and int(out[0, 1]) == -1
        out = av.rejection_sample(*to_backend(backend, (torch.tensor([1], dtype=I32), [1], 1,
                                                        torch.tensor([1], dtype=I32), None, logits,
                                                        torch.tensor([[2]], dtype=bonus_dtype))), sm)
        if greedy:
            assert out.tolist() == [[1, 2]]


# ---- distribution through the adapter -------------------------------------------------------------------------

P0_LOGITS = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.0, 0.7, 1.5])
Q0 = torch.tensor([0.05, 0.30, 0.20, 0.05, 0.10, 0.10, 0.15, 0.05])


def first_tokens(R, seed, with_q, k=2):
    """R unseeded requests with k drafts each; draft 0 drawn from Q0 (with_q; later drafts from another
    distribution) or a fixed n-gram guess (token 3, point mass); the first emitted token of each."""
    g = torch.Generator().manual_seed(seed)
    V = P0_LOGITS.shape[0]
    q_rows = torch.cat([Q0[None], torch.softmax(2 * torch.randn(k - 1, V, generator=g), -1)], 0)  # [k, V]
    d = torch.multinomial(q_rows, R, replacement=True, generator=g).t()  # [R, k]
    if not with_q:
        d[:, 0] = 3
    draft = d.reshape(-1).to(I32)
    logits = torch.cat([P0_LOGITS[None], torch.randn(k - 1, V, generator=g)], 0).repeat(R, 1)
    q = q_rows.repeat(R, 1) if with_q else None
    sm = av.SamplingMetadata(temperature=torch.ones(R), all_greedy=False, all_random=True)
    torch.manual_seed(seed + 1000)  # not the drafts' stream: coins equal to the drafts' own uniforms would be biased
    out = av.rejection_sample(draft, [k] * R, k, torch.arange(1, R + 1, dtype=I32) * k, q, logits,
                              torch.zeros(R, 1, dtype=I32), sm)
    return out[:, 0].numpy()


def chi2_pvalue(samples, p):
    counts = np.bincount(samples, minlength=len(p)).astype(float)
    p = np.asarray(p, dtype=float)
    return chisquare(counts, counts.sum() * p / p.sum()).pvalue


P0 = torch.softmax(P0_LOGITS, -1).double().numpy()


@pytest.mark.parametrize("with_q,k", [(True, 2), (True, 1), (False, 2), (False, 1)],
                         ids=["draft-probs", "draft-probs-k1", "ngram", "ngram-k1"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_emitted_tokens_follow_the_target(with_q, k, fused, monkeypatch):
    """Lossless: the first emitted token is distributed as softmax(target row 0), whatever the drafter, with and
    without draft probabilities, for one draft and for two, on both paths."""
    monkeypatch.setattr(av, "_FUSED", fused)
    assert chi2_pvalue(first_tokens(4000, seed=1, with_q=with_q, k=k), P0) > 1e-4


def test_distribution_test_catches_an_off_by_one_draft_row(monkeypatch):
    """Planted bug: the draft probabilities handed to the op one row off (node i verified with node i+1's q).
    The same chi-square test must reject it."""
    monkeypatch.setattr(av, "_FUSED", False)  # (planted in the generic path, whose steps are Python)
    real = spdkernels.rejection_sample
    monkeypatch.setattr(spdkernels, "rejection_sample",
                        lambda *a, draft_probs=None, **kw: real(*a, draft_probs=draft_probs.roll(-1, 0), **kw))
    assert chi2_pvalue(first_tokens(4000, seed=1, with_q=True, k=3), P0) < 1e-6


def test_distribution_test_catches_a_wrong_draft_distribution(monkeypatch):
    """Planted bug (k = 1): the op handed uniform rows instead of the drafter's q (accept test and residual against
    the wrong distribution)."""
    monkeypatch.setattr(av, "_FUSED", False)  # (planted in the generic path, whose steps are Python)
    real = spdkernels.rejection_sample
    monkeypatch.setattr(spdkernels, "rejection_sample", lambda *a, draft_probs=None, **kw: real(
        *a, draft_probs=torch.full_like(draft_probs, 1.0 / draft_probs.shape[1]), **kw))
    assert chi2_pvalue(first_tokens(4000, seed=1, with_q=True, k=1), P0) < 1e-6


def test_distribution_test_catches_a_fixed_final_coin(monkeypatch):
    """Planted bug on the n-gram path: the op's final coin left at a constant instead of drawn per call (the
    correction after a rejected draft becomes deterministic)."""
    monkeypatch.setattr(av, "_FUSED", False)  # (planted in the generic path, whose steps are Python)
    real = spdkernels.rejection_sample

    def fixed(*a, uniforms=None, **kw):
        n = a[1].shape[0]
        uniforms = uniforms.clone()
        uniforms[n:] = 0.5
        return real(*a, uniforms=uniforms, **kw)

    monkeypatch.setattr(spdkernels, "rejection_sample", fixed)
    assert chi2_pvalue(first_tokens(4000, seed=1, with_q=False, k=1), P0) < 1e-6


def test_sample_recovered_tokens_equals_vllm_rule():
    """Every position's recovered token: argmax(residual / Exp(1)) with one noise row per request, the seeded
    requests' rows redrawn from their generators (requests without drafts draw nothing)."""
    ks, V = [3, 0, 2, 4], 40
    draft, cu, q, logits, _ = make_case(ks, V, seed=12, with_q=True)
    probs = torch.softmax(logits, -1)
    seeds = {0: 5, 1: 6, 3: 7}
    for with_q in (True, False):
        mine, ref = gens(seeds), gens(seeds)
        sm = av.SamplingMetadata(temperature=torch.ones(4), all_greedy=False, all_random=True, generators=mine)
        torch.manual_seed(3)
        got = av.sample_recovered_tokens(4, ks, cu, draft, q if with_q else None, probs, sm, "cpu")
        torch.manual_seed(3)
        noise = torch.empty(4, V).exponential_()
        for r, g in ref.items():
            if ks[r]:
                noise[r].exponential_(generator=g)
        want, s = [], 0
        for r, kr in enumerate(ks):
            for i in range(kr):
                res = torch.clamp(probs[s + i] - q[s + i], min=0) if with_q else probs[s + i].clone()
                if not with_q:
                    res[int(draft[s + i])] = 0
                want.append(int((res * noise[r].reciprocal()).argmax()))
            s += kr
        assert got.tolist() == want and got.dtype == draft.dtype
        assert all(torch.equal(mine[r].get_state(), ref[r].get_state()) for r in seeds)


def test_module_forward_samples_the_constrained_target():
    """RejectionSampler.forward with temperature and top-k (applied by its own apply_sampling_constraints):
    the first emitted token follows softmax(top-4 of logits / 0.8)."""
    R, V = 4000, 8
    g = torch.Generator().manual_seed(8)
    meta = av.SpecDecodeMetadata.make_dummy([[3]] * R)
    logits = torch.stack([P0_LOGITS, torch.randn(V, generator=g)]).repeat(R, 1)
    sm = av.SamplingMetadata(temperature=torch.full((R,), 0.8), all_greedy=False, all_random=True,
                             top_k=torch.full((R,), 4))
    torch.manual_seed(9)
    out = av.RejectionSampler()(meta, None, logits, sm).sampled_token_ids
    x = P0_LOGITS / 0.8
    p = torch.softmax(torch.where(x >= x.topk(4).values[-1], x, torch.tensor(float("-inf"))), -1)
    first = out[:, 0].numpy()
    assert (p[first] > 0).all()
    keep = (p > 0).numpy()
    counts = np.bincount(first, minlength=V)[keep].astype(float)
    assert chisquare(counts, counts.sum() * p.double().numpy()[keep]).pvalue > 1e-4
    assert out.shape == (R, 2) and bool((out[:, 1][out[:, 0] != 3] == -1).all())


# ---- the module ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_module_forward_greedy_equals_verify_greedy(backend):
    """RejectionSampler.forward on the model's [N + B, V] logits: with all requests greedy it is exactly
    spdkernels.verify_greedy on the same rows (they are already our layout), bonus = argmax of the bonus row."""
    g = torch.Generator().manual_seed(3)
    drafts = [[1, 2, 3], [], [4, 5], [6]]
    meta = av.SpecDecodeMetadata.make_dummy(drafts)
    V = 12
    logits = torch.randn(sum(map(len, drafts)) + len(drafts), V, generator=g)
    # make some drafts right so the walks accept
    logits[0, 1] = logits[1, 2] = logits[4, 4] = 9.0
    sm = av.SamplingMetadata(temperature=None, all_greedy=True, all_random=False)
    with use_backend(backend):
        got = av.RejectionSampler()(av.SpecDecodeMetadata.make_dummy(drafts, device=backend_device(backend)), None,
                                    to_backend(backend, logits), sm).sampled_token_ids.cpu()
    cu = torch.tensor([0, 3, 3, 5, 6], dtype=I32)
    want, _, _ = spdkernels.verify_greedy(logits, meta.draft_token_ids, cu, max_depth=3)
    assert torch.equal(got, want)
    assert av.RejectionSampler.parse_output(got, V)[0] == [[t for t in row if t >= 0] for row in want.tolist()]


def test_apply_sampling_constraints_top_k_top_p():
    """Temperature divides the rows (greedy rows by 1); top-k keeps the k largest; top-p masks the tokens whose
    cumulative probability from the bottom stays <= 1 - p, never the top token."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    sm = av.SamplingMetadata(temperature=torch.tensor([1.0, 0.0]), all_greedy=False, all_random=False,
                             top_k=torch.tensor([2, 4]), top_p=torch.tensor([1.0, 0.5]))
    out = av.apply_sampling_constraints(logits.clone(), torch.tensor([1, 3]), sm, [1, 2])
    kept = torch.isfinite(out)
    assert kept.tolist() == [[False, False, True, True], [False, False, True, True], [False, False, True, True]]


# ---- errors ----------------------------------------------------------------------------------------------------

def _args():
    draft, cu, q, logits, bonus = make_case([2, 1], 9, seed=0, with_q=True)
    sm = av.SamplingMetadata(temperature=torch.ones(2), all_greedy=False, all_random=True)
    return dict(draft_token_ids=draft, num_draft_tokens=[2, 1], max_spec_len=2, cu_num_draft_tokens=cu,
                draft_probs=q, target_logits=logits, bonus_token_ids=bonus, sampling_metadata=sm)


REFUSED = [
    ("target_logits", lambda a: a.update(target_logits=a["target_logits"].t().contiguous().t())),
    ("target_logits", lambda a: a.update(target_logits=a["target_logits"][:2])),
    ("draft_probs", lambda a: a.update(draft_probs=a["draft_probs"][:, :5])),
    ("bonus_token_ids", lambda a: a.update(bonus_token_ids=torch.zeros(3, 1, dtype=I32))),
    ("cu_num_draft_tokens", lambda a: a.update(cu_num_draft_tokens=torch.tensor([1, 3], dtype=I32))),
    ("num_draft_tokens", lambda a: a.update(num_draft_tokens=[1, 1])),
    ("max_spec_len", lambda a: a.update(max_spec_len=1)),
    ("target_logits", lambda a: a.update(target_probs=a["target_logits"])),
    ("draft_token_ids", lambda a: a.update(draft_token_ids=a["draft_token_ids"].float())),
    ("draft_token_ids", lambda a: a.update(draft_token_ids=a["draft_token_ids"].tolist())),
    ("draft_token_ids", lambda a: a["draft_token_ids"].__setitem__(1, 9)),  # V = 9
    ("bonus_token_ids", lambda a: a["bonus_token_ids"].__setitem__(0, 9)),
    ("temperature", lambda a: a.update(sampling_metadata=av.SamplingMetadata(temperature=None, all_greedy=False,
                                                                               all_random=False))),
    ("generators", lambda a: a.update(sampling_metadata=av.SamplingMetadata(
        temperature=torch.ones(2), all_greedy=False, all_random=True, generators={2: torch.Generator()}))),
]
REFUSED_IDS = ["non-contiguous", "rows", "vocab", "bonus", "cu", "counts", "spec-len", "both-targets", "dtype", "list",
               "token-too-large", "bonus-too-large", "mixed-without-temperatures", "generator-key-past-batch"]
VALUES_ONLY_WITH_VALIDATION = {"cu", "bonus-too-large"}  # values checked with validation on only: a host sync


@pytest.mark.parametrize("name,change,validate", [
    (n, c, v) for (n, c), i in zip(REFUSED, REFUSED_IDS) for v in (True, False)
    if v or i not in VALUES_ONLY_WITH_VALIDATION
], ids=[f"{i}-validation-{'on' if v else 'off'}" for (n, _), i in zip(REFUSED, REFUSED_IDS) for v in (True, False)
        if v or i not in VALUES_ONLY_WITH_VALIDATION])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_layouts_vllm_rejects_raise_value_errors(name, change, validate, fused, monkeypatch):
    """The same refusal, naming the argument, on both paths, with validation on and off."""
    a = _args()
    change(a)
    with adapter_refusal_path(fused, av, monkeypatch), spdkernels.validation(validate):
        with pytest.raises(ValueError, match=name):
            av.rejection_sample(**a)


UNSEEDED = [([3, 0, 2, 4, 1], 50, False, "random"), ([3, 0, 2, 4, 1], 50, True, "mixed"), ([2, 2], 7, True, "greedy"),
            ([5], 1000, True, "random"), ([1, 4, 0, 2], 33, False, "mixed"), ([3, 0, 2, 4], 50, True, "probs"),
            ([0, 0], 9, False, "random"), ([2, 3, 1], 40, False, "padded"), ([2, 3, 1], 40, True, "q-zero"),
            ([2, 1, 3], 30, True, "probs-mixed"), ([2, 1, 3], 30, False, "mixed-fp64")]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the fused path is the cpp backend's")
@pytest.mark.parametrize("ks,V,with_q,mode", UNSEEDED, ids=[f"{m}-{i}" for i, (_, _, _, m) in enumerate(UNSEEDED)])
@pytest.mark.parametrize("validate", [True, False], ids=["validation-on", "validation-off"])
def test_fused_op_equals_the_generic_path(ks, V, with_q, mode, validate, monkeypatch):
    """Unseeded calls (all sampled, mixed with greedy at fp32 / fp64 temperatures, all greedy, older target_probs,
    padded drafts and q(t) = 0, which the op hands back to the generic path, empty drafts): both paths give the same
    tokens and leave torch's default generator in the same state."""
    draft, cu, q, logits, bonus = make_case(ks, V, seed=len(ks) + V, with_q=with_q, pad=mode == "padded")
    B = len(ks)
    if mode == "q-zero":
        q[1, draft[1]] = 0.0
    # mixed batches: greedy (0) and sampled requests at temperatures other than 1 (the rows are already scaled), the
    # temperatures in fp32 or fp64
    temps = torch.tensor([0.0 if r % 2 else 0.7 for r in range(B)]) if "mixed" in mode else torch.ones(B)
    if mode == "mixed-fp64":
        temps = temps.double()
        temps[0] = 1e-50  # sampled (not greedy), though it rounds to 0 in fp32
    sm = av.SamplingMetadata(temperature=temps, all_greedy=mode == "greedy",
                             all_random="mixed" not in mode and mode != "greedy")
    kw = dict(target_probs=torch.softmax(logits, -1)) if "probs" in mode else dict(target_logits=logits)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(av, "_FUSED", fused)
        torch.manual_seed(7)
        with use_backend("cpp"), spdkernels.validation(validate):
            got = av.rejection_sample(draft, ks, max(ks) + 1, cu, q, bonus_token_ids=bonus, sampling_metadata=sm, **kw)
        results.append((got, torch.default_generator.get_state()))
    assert results[0][0].dtype == I32 and torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_the_fused_op_serves_unseeded_calls(monkeypatch):
    """On the cpp backend an unseeded call makes no call of the public op (one C++ op), a seeded one does."""
    if "cpp" not in BACKENDS:
        pytest.skip("the fused path is the cpp backend's")
    calls = []
    real = spdkernels.rejection_sample
    monkeypatch.setattr(spdkernels, "rejection_sample", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    a = _args()
    with use_backend("cpp"):
        av.rejection_sample(**a)
        assert not calls
        a["sampling_metadata"] = av.SamplingMetadata(temperature=torch.ones(2), all_greedy=False, all_random=True,
                                                     generators={0: torch.Generator().manual_seed(1)})
        av.rejection_sample(**a)
        assert calls


# ---- the plugin ------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in for vllm.v1.sample.rejection_sampler with the current signature."""
    calls = []

    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                         target_logits, bonus_token_ids, sampling_metadata, synthetic_mode=False):
        calls.append(synthetic_mode)
        return "vllm's own"

    mods = {}
    for name in ("vllm", "vllm.v1", "vllm.v1.sample", "vllm.v1.sample.rejection_sampler"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["vllm.v1.sample.rejection_sampler"].rejection_sample = rejection_sample
    return mods["vllm.v1.sample.rejection_sampler"], calls


def test_plugin_installs_our_core_into_vllm(fake_vllm):
    mod, calls = fake_vllm
    assert av.register() and av.register()  # idempotent
    assert mod.rejection_sample.__wrapped__.__name__ == "rejection_sample"
    a = _args()
    out = mod.rejection_sample(*[a[k] for k in ("draft_token_ids", "num_draft_tokens", "max_spec_len",
                                                 "cu_num_draft_tokens", "draft_probs", "target_logits",
                                                 "bonus_token_ids", "sampling_metadata")])
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3) and calls == []
    assert mod.rejection_sample(**a, synthetic_mode=True) == "vllm's own" and calls == [True]


def test_plugin_binds_the_older_target_probs_argument(monkeypatch):
    name = "vllm.v1.sample.rejection_sampler"
    for n in ("vllm", "vllm.v1", "vllm.v1.sample", name):
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))

    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                         target_probs, bonus_token_ids, sampling_metadata):
        raise AssertionError("not ours")

    sys.modules[name].rejection_sample = rejection_sample
    assert av.register()
    a = _args()
    probs = torch.softmax(a["target_logits"], -1)
    ks, seeds = [2, 1], {0: 4, 1: 5}
    a["sampling_metadata"].generators = gens(seeds)
    got = sys.modules[name].rejection_sample(a["draft_token_ids"], ks, 2, a["cu_num_draft_tokens"], a["draft_probs"],
                                             probs, a["bonus_token_ids"], a["sampling_metadata"])
    want = vllm_semantics(a["draft_token_ids"], ks, 2, a["draft_probs"], probs, a["bonus_token_ids"], [1.0, 1.0],
                          False, gens(seeds), target_is_probs=True)
    assert torch.equal(got, want)


def test_plugin_does_nothing_without_vllm_or_when_disabled(monkeypatch, fake_vllm):
    monkeypatch.setenv(av.PLUGIN_ENV, "0")
    mod, _ = fake_vllm
    assert not av.register() and not hasattr(mod, "_spdkernels_original")
    monkeypatch.setenv(av.PLUGIN_ENV, "1")
    monkeypatch.setitem(sys.modules, "vllm.v1.sample.rejection_sampler", None)  # import fails
    assert not av.register()


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["vllm.general_plugins"]["spdkernels"] == "spdkernels.adapters.vllm:register"


def test_adapters_import_none_of_the_stacks():
    """The stacks are optional: importing every adapter imports neither vLLM, SGLang, FlashInfer nor transformers."""
    import subprocess

    code = ("import sys; import spdkernels.adapters.vllm, spdkernels.adapters.sglang, spdkernels.adapters.flashinfer, "
            "spdkernels.adapters.transformers; "
            "print([m for m in ('vllm', 'sglang', 'sgl_kernel', 'flashinfer', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_extension_without_the_fused_op_takes_the_generic_path(monkeypatch):
    """A C++ build older than the Python package (no _cpu_vllm_rejection_sample in it): the generic path serves the
    call, with the same result, instead of an AttributeError."""
    from spdkernels.adapters import _common

    a = _args()
    torch.manual_seed(3)
    want = av.rejection_sample(**a)
    monkeypatch.setattr(_common, "_FUSED_OPS", {"_cpu_vllm_rejection_sample": None})
    calls = []
    real = spdkernels.rejection_sample
    monkeypatch.setattr(spdkernels, "rejection_sample", lambda *x, **kw: calls.append(1) or real(*x, **kw))
    torch.manual_seed(3)
    assert torch.equal(av.rejection_sample(**a), want) and calls


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_a_tiny_fp64_temperature_is_sampling_not_greedy(fused, monkeypatch):
    """vLLM marks greedy requests by temperature == 0 exactly: an fp64 temperature of 1e-50 (0 once rounded to fp32)
    is a sampled request on both paths."""
    monkeypatch.setattr(av, "_FUSED", fused)
    g = torch.Generator().manual_seed(4)
    V, ks = 30, [3, 2]
    logits = torch.randn(5, V, generator=g) * 0.1  # flat rows: sampling and greedy part ways
    draft = torch.randint(0, V, (5,), generator=g, dtype=I32)
    args = (draft, ks, 3, torch.tensor([3, 5], dtype=I32), None, logits, torch.zeros(2, 1, dtype=I32))

    def run(temps):
        sm = av.SamplingMetadata(temperature=temps, all_greedy=False, all_random=False)
        torch.manual_seed(5)
        with use_backend("cpp" if "cpp" in BACKENDS else "torch"):
            return av.rejection_sample(*args, sm)

    sampled = run(torch.tensor([1.0, 0.0]))
    greedy = run(torch.tensor([0.0, 0.0]))
    assert not torch.equal(sampled[0], greedy[0])  # (the case tells the two apart)
    assert torch.equal(run(torch.tensor([1e-50, 0.0], dtype=torch.float64)), sampled)


@pytest.mark.parametrize("pad", [False, True])
def test_coins_are_drawn_in_one_draw_of_n_plus_b(pad, monkeypatch):
    """The generic path draws its draft and final coins as one torch.rand of N + B values, as vLLM's layout of the op
    and the fused op do, whether padded drafts send the call down the gathered path or not (that path drew its B final
    coins a second time); the padded path's other draws are vLLM's recovery noise (exponential_), not torch.rand."""
    monkeypatch.setattr(av, "_FUSED", False)
    ks = [3, 0, 2, 4, 1, 6]
    draft, cu, q, logits, bonus = make_case(ks, 50, seed=5, with_q=True, pad=pad)
    N, B = sum(ks), len(ks)
    sm = av.SamplingMetadata(temperature=torch.ones(B), all_greedy=False, all_random=True, generators={})
    calls, rand = [], torch.rand

    def counted(*a, **k):
        calls.append(tuple(a[0]) if isinstance(a[0], (tuple, list, torch.Size)) else a[:1])
        return rand(*a, **k)

    monkeypatch.setattr(torch, "rand", counted)
    out = av.rejection_sample(draft, ks, max(ks), cu, q, logits, bonus, sm)
    assert calls == [(N + B,)], calls
    if pad:  # (the case does reach the padded path: a request stops at its padded draft)
        assert (out == av.PLACEHOLDER_TOKEN_ID).any() and bool((draft < 0).any())
