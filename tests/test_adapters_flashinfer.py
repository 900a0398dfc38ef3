"""FlashInfer adapter: chain_speculative_sampling's rules (strict accept test with coins in (0, 1], correction
from relu(target - draft), -1 padding, counters accumulated in place) re-expressed here and compared exactly
with the adapter on every backend and on both of its CPU paths (the fused C++ op, "cpp", and the generic path,
"cpp-generic"); known answers; a distribution test with planted wrong variants."""

import numpy as np
import pytest
import torch
from conftest import (
    adapter_path,
    adapter_paths,
    adapter_refusal_path,
    backend_generator,
    backends_here,
    path_device,
    use_backend,
)
from scipy.stats import chisquare

import spdkernels
from spdkernels.adapters import flashinfer as af

BACKENDS = backends_here()
PATHS = adapter_paths()
I32 = torch.int32


def flashinfer_semantics(dp, tokens, tp, gen):
    """FlashInfer's kernel, written as a loop; coins drawn in the adapter's documented order from ``gen``, in one
    draw: one per draft, request-major, and one final coin per request, clamped into (0, 1); then one per draft for
    the recount, in (0, 1]."""
    B, n, V = dp.shape
    dev = dp.device  # (the generator lives there too)
    drawn = torch.rand(2 * B * n + B, generator=gen, device=dev)
    coins = drawn[:B * n + B].clamp(min=torch.finfo(torch.float32).tiny, max=1 - 2**-24)
    u, uf = coins[:B * n].reshape(B, n), coins[B * n:]
    u2 = 1.0 - drawn[B * n + B:].reshape(B, n)
    out = torch.full((B, n + 1), -1, dtype=I32)
    acc, emitted = torch.zeros(B, dtype=I32), torch.zeros(B, dtype=I32)
    for b in range(B):
        pos = n
        for i in range(n):
            t = int(tokens[b, i])
            if bool(u[b, i] * dp[b, i, t] < tp[b, i, t]):
                out[b, i] = t
            else:
                pos = i
                break
        again = sum(bool(u2[b, i] * dp[b, i, int(tokens[b, i])] < tp[b, i, int(tokens[b, i])]) for i in range(pos, n))
        acc[b], emitted[b] = pos + again, pos
        relu = torch.clamp(tp[b, pos] - (dp[b, pos] if pos < n else 0), min=0).double()
        csum = torch.cumsum(relu, 0)
        hit = (csum > float(uf[b]) * float(csum[-1])).nonzero()
        out[b, pos] = int(hit[0, 0]) if hit.numel() else int((relu > 0).nonzero()[-1, 0])
    return out, acc, emitted


def make(B, n, V, seed, agree=0.5):
    g = torch.Generator().manual_seed(seed)
    dp = torch.softmax(torch.randn(B, n, V, generator=g) * 1.5, -1)
    tp = torch.softmax(torch.randn(B, n + 1, V, generator=g) * 1.5, -1)
    # mix the draft into the target so that a fair share of drafts is accepted
    tp[:, :n] = agree * dp + (1 - agree) * tp[:, :n]
    tokens = torch.multinomial(dp.reshape(B * n, V), 1, generator=g).reshape(B, n).to(I32)
    return dp, tokens, tp


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,n,V,counter", [(6, 3, 20, I32), (3, 1, 7, I32), (4, 5, 300, torch.int64),
                                           (2, 0, 5, I32)])
def test_equals_flashinfer_semantics(path, B, n, V, counter, monkeypatch):
    """Same coins: tokens, padding and both counters equal FlashInfer's; counters (int32 or int64) are added to
    the caller's tensors (pre-filled here), which are also the ones returned."""
    backend = path.replace("-generic", "")
    dp, tokens, tp = path_device(path, make(B, n, V, seed=B * 100 + n * 10 + V))
    acc0 = torch.arange(B, dtype=counter)
    emit0 = torch.full((B,), 7, dtype=counter)
    acc, emit = path_device(path, (acc0.clone(), emit0.clone()))
    with adapter_path(path, af, monkeypatch):
        out, acc_r, emit_r = af.chain_speculative_sampling(dp, tokens, tp, acc, emit,
                                                           generator=backend_generator(backend, 5))
    want, want_acc, want_emit = flashinfer_semantics(dp, tokens, tp, backend_generator(backend, 5))
    assert acc_r is acc and emit_r is emit
    assert out.dtype == I32 and torch.equal(out.cpu(), want)
    assert torch.equal(acc.cpu(), acc0 + want_acc) and torch.equal(emit.cpu(), emit0 + want_emit)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the fused path is the cpp backend's")
@pytest.mark.parametrize("seed", range(8))
def test_fused_op_equals_the_generic_path(seed, monkeypatch):
    """Random batches, counters given or not, coins from (seed, offset), a generator or torch's default generator:
    both paths give identical outputs and leave the generators in the same state."""
    B, n, V = 1 + seed % 6, seed % 5, (5, 64, 2000)[seed % 3]
    dp, tokens, tp = make(B, n, V, seed=seed, agree=0.2 + 0.1 * seed)
    results, states = [], []
    for fused in (True, False):
        monkeypatch.setattr(af, "_FUSED", fused)
        counters = (torch.full((B,), 3, dtype=I32), torch.ones(B, dtype=torch.int64)) if seed % 2 else (None, None)
        gen = torch.Generator().manual_seed(seed)
        rng = (dict(seed=seed, offset=2), dict(generator=gen), {})[seed % 3]  # {}: torch's default generator
        torch.manual_seed(11)
        with use_backend("cpp"):
            results.append(af.chain_speculative_sampling(dp, tokens.long() if seed % 4 == 1 else tokens, tp,
                                                         *counters, **rng))
        states.append((gen.get_state(), torch.default_generator.get_state()))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(*states):  # the generator drawn from advanced alike
        assert torch.equal(a, b)


def test_seed_and_offset_pick_the_stream():
    dp, tokens, tp = make(32, 3, 50, seed=1)
    a = af.chain_speculative_sampling(dp, tokens, tp, seed=11, offset=4)[0]
    b = af.chain_speculative_sampling(dp, tokens, tp, seed=11, offset=4)[0]
    c = af.chain_speculative_sampling(dp, tokens, tp, seed=11, offset=5)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("path", PATHS)
def test_known_answers(path, monkeypatch):
    """FlashInfer's documented example (first draft certain, second impossible, correction from the
    difference, -1 after), and a draft equal to the target: all accepted, the bonus from the last row."""
    with adapter_path(path, af, monkeypatch):
        dp = path_device(path, torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]]))
        tp = path_device(path, torch.tensor([[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]]))
        out, acc, emit = af.chain_speculative_sampling(dp, path_device(path, torch.tensor([[2, 1]], dtype=I32)), tp)
        assert (out.tolist(), acc.tolist(), emit.tolist()) == ([[2, 0, -1]], [1], [1])
        one = torch.zeros(2, 3, 5)
        one[0, :, 1] = one[1, :, 3] = 1.0
        bonus = torch.zeros(2, 4, 5)
        bonus[:, :3] = one
        bonus[:, 3, 4] = 1.0
        tok = torch.tensor([[1, 1, 1], [3, 3, 3]], dtype=I32)
        out, acc, emit = af.chain_speculative_sampling(*path_device(path, (one, tok, bonus)), seed=3)
        assert out.tolist() == [[1, 1, 1, 4], [3, 3, 3, 4]] and acc.tolist() == [3, 3] and emit.tolist() == [3, 3]


# ---- distribution ------------------------------------------------------------------------------------------------

P0 = torch.tensor([0.30, 0.05, 0.15, 0.02, 0.18, 0.10, 0.12, 0.08])
Q0 = torch.tensor([0.05, 0.30, 0.20, 0.05, 0.10, 0.10, 0.15, 0.05])


def first_tokens(B, seed):
    g = torch.Generator().manual_seed(seed)
    V = P0.shape[0]
    dp = torch.stack([Q0, torch.softmax(torch.randn(V, generator=g), -1)])[None].repeat(B, 1, 1)
    tp = torch.stack([P0, torch.softmax(torch.randn(V, generator=g), -1), P0])[None].repeat(B, 1, 1)
    tokens = torch.multinomial(dp.reshape(2 * B, V), 1, generator=g).reshape(B, 2).to(I32)
    out, _, _ = af.chain_speculative_sampling(dp, tokens, tp, generator=g)
    return out[:, 0].numpy()


def chi2_pvalue(samples, p):
    counts = np.bincount(samples, minlength=len(p)).astype(float)
    p = np.asarray(p, dtype=float)
    return chisquare(counts, counts.sum() * p / p.sum()).pvalue


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_emitted_tokens_follow_the_target(fused, monkeypatch):
    monkeypatch.setattr(af, "_FUSED", fused)
    assert chi2_pvalue(first_tokens(4000, seed=2), P0.double().numpy()) > 1e-4


@pytest.mark.parametrize("bug", ["probabilities-read-as-logits", "wrong-draft-distribution"])
def test_distribution_test_catches_a_wrong_adapter(monkeypatch, bug):
    """Planted bugs on the way to the op: the probability rows read as logits (``target_is_probs`` forgotten), or
    the accept test and residual against the wrong draft distribution (uniform rows instead of ``draft_probs``).
    The same test must reject both. (Planted in the generic path, whose steps are Python.)"""
    monkeypatch.setattr(af, "_FUSED", False)
    real = spdkernels.rejection_sample

    def buggy(*a, draft_probs=None, target_is_probs=False, **kw):
        if bug == "probabilities-read-as-logits":
            return real(*a, draft_probs=draft_probs, **kw)
        return real(*a, draft_probs=torch.full_like(draft_probs, 1.0 / draft_probs.shape[1]),
                    target_is_probs=target_is_probs, **kw)

    monkeypatch.setattr(spdkernels, "rejection_sample", buggy)
    assert chi2_pvalue(first_tokens(4000, seed=2), P0.double().numpy()) < 1e-6


# ---- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,args", [
    ("draft_probs", lambda dp, t, tp: (dp[0], t, tp)),
    ("draft_probs", lambda dp, t, tp: (dp.double(), t, tp)),
    ("draft_token_ids", lambda dp, t, tp: (dp, t[:, :2], tp)),
    ("draft_token_ids", lambda dp, t, tp: (dp, t.float(), tp)),
    ("target_probs", lambda dp, t, tp: (dp, t, tp[:, :3])),
    ("target_probs", lambda dp, t, tp: (dp, t, tp[..., :9])),
    ("maybe_output_accepted_token_num", lambda dp, t, tp: (dp, t, tp, torch.zeros(5, dtype=I32))),
    ("maybe_output_emitted_draft_token_num", lambda dp, t, tp: (dp, t, tp, None, torch.zeros(2, dtype=torch.float32))),
    ("draft_token_ids", lambda dp, t, tp: (dp, t.tolist(), tp)),
    ("draft_token_ids", lambda dp, t, tp: (dp, t.clamp(max=0) + 10, tp)),
    ("draft_token_ids", lambda dp, t, tp: (dp, t.clamp(min=0) - 1, tp)),
], ids=["rank", "dtype", "n", "token-dtype", "bonus-row", "vocab", "counter", "counter-dtype", "token-list",
        "token-too-large", "token-negative"])
@pytest.mark.parametrize("validate", [True, False], ids=["validation-on", "validation-off"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_layouts_flashinfer_rejects_raise_value_errors(name, args, fused, validate, monkeypatch):
    """The same refusal, naming the argument, on both paths, with validation on and off."""
    dp, t, tp = make(2, 3, 10, seed=0)
    with adapter_refusal_path(fused, af, monkeypatch), spdkernels.validation(validate):
        with pytest.raises(ValueError, match=name):
            af.chain_speculative_sampling(*args(dp, t, tp))
