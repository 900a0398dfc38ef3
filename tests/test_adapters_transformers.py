"""Hugging Face adapter: model.generate(..., custom_generate=speculative_generate) on a tiny randomly initialised
LlamaForCausalLM and on the embedded SmolLM2 through transformers: greedy output equal to generate(do_sample=False)
with every drafter and with logits processors, the cache cropped after each verification, EOS inside an accepted
run, a sampling distribution check with a planted wrong variant."""

import copy

import numpy as np
import pytest
import torch
from conftest import (
    adapter_path,
    adapter_paths,
    adapter_refusal_path,
    backend_device,
    backends_here,
    to_backend,
)
from scipy.stats import chisquare

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers (runtime extra) not installed")
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

import spdkernels  # noqa: E402
from spdkernels.adapters import transformers as ahf  # noqa: E402
from spdkernels.adapters.transformers import speculative_generate  # noqa: E402
from spdkernels.runtime import NGramProposer  # noqa: E402


def tiny_llama(seed, vocab=64, hidden=32, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


# the prompt repeats itself, so prompt lookup drafts (and the tiny model soon repeats itself too)
PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])


@pytest.mark.parametrize("path", adapter_paths())
def test_greedy_equals_generate_with_prompt_lookup(model, path, monkeypatch):
    """On each backend, with the model on that backend's device (CUDA for Triton on a GPU machine); on CPU with the
    cpp backend through the fused greedy op ("cpp", no public op called) and through the public op ("cpp-generic")."""
    torch.manual_seed(1)
    backend = path.replace("-generic", "")
    dev = backend_device(backend)
    m = model if dev == "cpu" else copy.deepcopy(model).to(dev)
    prompt = to_backend(backend, PROMPT)
    want = m.generate(prompt, do_sample=False, max_new_tokens=24)
    with adapter_path(path, ahf, monkeypatch):
        got = m.generate(prompt, do_sample=False, max_new_tokens=24, custom_generate=speculative_generate)
    assert torch.equal(got.cpu(), want.cpu())


def _step_rows(g, k, V, dtype, accept):
    """``k + 1`` rows of logits on a coarse grid (ties within rows are common) and ``k`` drafts, the first ``accept``
    of them each row's first argmax (so the step accepts exactly those), the next one another token."""
    rows = torch.randint(-3, 4, (k + 1, V), generator=g).to(dtype)
    best = rows.float().argmax(-1)
    drafts = best[:k].tolist()
    if accept < k:
        drafts[accept] = (drafts[accept] + 1 + int(torch.randint(0, V - 1, (1,), generator=g))) % V
    for i in range(accept + 1, k):
        drafts[i] = int(torch.randint(0, V, (1,), generator=g))
    return rows, drafts


def _strided(rows, layout):
    """``rows`` as given ("dense"), as a column slice of a wider tensor (row stride > V), or column-major."""
    if layout == "wide":
        wide = torch.zeros(rows.shape[0], rows.shape[1] + 5, dtype=rows.dtype)
        wide[:, :rows.shape[1]] = rows
        return wide[:, :rows.shape[1]]
    return rows.t().contiguous().t() if layout == "column-major" else rows.clone()


needs_cpp = pytest.mark.skipif("cpp" not in backends_here(),
                               reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP)")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_step_is_the_same_on_the_fused_op_and_the_public_op(dtype, monkeypatch):
    """verify_step's greedy decision through the fused C++ op (cpp) and through verify_greedy (cpp-generic): the
    same accepted count and committed tokens (dtype included: int64 and int32 prompts) for chains of 0-6 drafts on
    rows full of ties (37 tokens: ties across the kernel's vector lanes and its scalar tail), dense, strided and
    column-major rows, every acceptance length, validation on and off; and the known answer (the drafts up to the
    first mismatch, then that row's first argmax)."""
    g = torch.Generator().manual_seed(5)
    procs = LogitsProcessorList()
    cases = 0
    for k in range(7):
        for accept in range(k + 1):
            rows, drafts = _step_rows(g, k, 37, dtype, accept)
            layout = ("dense", "wide", "column-major")[cases % 3]
            ids = torch.tensor([[1, 2, 3]], dtype=(torch.int64, torch.int32)[cases % 2])
            got = {}
            for path in ("cpp", "cpp-generic"):
                for validate in (True, False):
                    with adapter_path(path, ahf, monkeypatch), spdkernels.validation(validate):
                        got[path, validate] = ahf.verify_step(ids, drafts, _strided(rows, layout), procs, None, False)
            a, new = got["cpp", False]
            want = drafts[:accept] + [int(rows[accept].float().argmax())]
            assert a == accept and new.tolist() == want and new.dtype == ids.dtype
            for (a2, new2) in got.values():
                assert a2 == a and torch.equal(new2, new) and new2.dtype == new.dtype
            cases += 1
    assert cases == 28


@needs_cpp
def test_greedy_with_processors_runs_the_fused_op_and_equals_generate(model, monkeypatch):
    """With a logits processor (repetition penalty) the greedy steps still go through the fused op on CPU ("cpp":
    no public op called) and the output equals generate(do_sample=False)."""
    want = model.generate(PROMPT, do_sample=False, max_new_tokens=16, repetition_penalty=1.3)
    with adapter_path("cpp", ahf, monkeypatch):
        got = model.generate(PROMPT, do_sample=False, max_new_tokens=16, repetition_penalty=1.3,
                             custom_generate=speculative_generate)
    assert torch.equal(got, want)


def test_an_extension_without_the_fused_greedy_op_takes_the_generic_path(model, monkeypatch):
    """A C++ build older than the Python package (no _cpu_hf_verify_greedy in it): the public op serves the greedy
    steps, with the same output, instead of an AttributeError."""
    from spdkernels.adapters import _common

    want = model.generate(PROMPT, do_sample=False, max_new_tokens=12)
    monkeypatch.setattr(_common, "_FUSED_OPS", {"_cpu_hf_verify_greedy": None})
    calls = []
    real = spdkernels.verify_greedy
    monkeypatch.setattr(spdkernels, "verify_greedy", lambda *x, **kw: calls.append(1) or real(*x, **kw))
    got = model.generate(PROMPT, do_sample=False, max_new_tokens=12, custom_generate=speculative_generate)
    assert torch.equal(got, want) and calls


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("validate", [True, False], ids=["validation-on", "validation-off"])
def test_greedy_step_refuses_bad_drafts_and_rows_on_both_paths(fused, validate, monkeypatch):
    """A draft outside the vocabulary (a drafter with another vocabulary): with validation on the ValueError naming
    verify_greedy's argument, with it off that draft rejected (greedy verification reads no memory at a draft's id;
    no id outside the vocabulary equals an argmax), on both paths; rows that do not match the drafts, and
    (validation on) NaN logits: the same ValueError on both paths."""
    ids = torch.tensor([[1, 2]])
    procs = LogitsProcessorList()
    rows = torch.randn(4, 10)
    best = rows.argmax(-1).tolist()
    with adapter_refusal_path(fused, ahf, monkeypatch), spdkernels.validation(validate):
        for bad in (10, -1):
            drafts = [best[0], bad, best[2]]
            if validate:
                with pytest.raises(ValueError, match="draft_token_ids"):
                    ahf.verify_step(ids, drafts, rows.clone(), procs, None, False)
            else:
                a, new = ahf.verify_step(ids, drafts, rows.clone(), procs, None, False)
                assert a == 1 and new.tolist() == best[:2]
        with pytest.raises(ValueError, match="target_logits"):
            ahf.verify_step(ids, [1, 2], rows.clone(), procs, None, False)  # 4 rows for 2 drafts
        if validate:
            nan = rows.clone()
            nan[2, 3] = float("nan")
            with pytest.raises(ValueError, match="target_logits"):
                ahf.verify_step(ids, [1, 2, 3], nan, procs, None, False)


@pytest.mark.parametrize("drafter", ["draft-model", "self-draft", "ngram-proposer", "callable", "k1"])
def test_greedy_equals_generate_with_every_drafter_and_processors(model, drafter):
    """Each drafter, with a repetition penalty (a processor that depends on each row's own prefix)."""
    torch.manual_seed(2)
    kw = {"draft-model": dict(draft_model=tiny_llama(7, hidden=16, layers=1)), "self-draft": dict(draft_model=model),
          "ngram-proposer": dict(proposer=NGramProposer(k=3, max_ngram=2)),
          "callable": dict(proposer=lambda ctx, k: [ctx[-4]] * k), "k1": dict(num_draft_tokens=1)}[drafter]
    want = model.generate(PROMPT, do_sample=False, max_new_tokens=20, repetition_penalty=1.3)
    got = model.generate(PROMPT, do_sample=False, max_new_tokens=20, repetition_penalty=1.3,
                         custom_generate=speculative_generate, **kw)
    assert torch.equal(got, want)


def test_cache_is_cropped_to_the_committed_tokens(model, monkeypatch):
    """Before every verification pass the cache holds exactly the committed tokens but the last one: its length
    grows by the tokens each pass emitted, not by the tokens it fed (the rejected drafts are cropped)."""
    seen, chunks = [], []
    real = ahf._forward

    def spy(m, ids, cache, keep):
        seen.append((cache.get_seq_length(), ids.shape[1]))
        return real(m, ids, cache, keep)

    class Chunks:
        def put(self, t):
            chunks.append(t.numel())

        def end(self):
            pass

    monkeypatch.setattr(ahf, "_forward", spy)
    cfg = GenerationConfig(do_sample=False, max_length=PROMPT.shape[1] + 24)
    with torch.no_grad():
        out = speculative_generate(model, PROMPT, LogitsProcessorList(), StoppingCriteriaList(), cfg, streamer=Chunks())
    L = PROMPT.shape[1]
    assert seen[0] == (0, L - 1)  # the prompt but its last token
    passes = seen[1:]
    assert len(passes) == len(chunks) and sum(chunks) == out.shape[1] - L
    for i, (cached, _) in enumerate(passes):
        assert cached == L - 1 + sum(chunks[:i])
    fed = [f for _, f in passes]
    assert any(c < f for c, f in zip(chunks, fed)), "no draft was rejected: nothing was cropped"
    assert any(c > 1 for c in chunks), "no draft was accepted"


def test_eos_inside_an_accepted_run_stops_there(model):
    base = model.generate(PROMPT, do_sample=False, max_new_tokens=24)[0, PROMPT.shape[1]:].tolist()
    eos = base[9]  # a token that the speculative run emits mid-way
    want = model.generate(PROMPT, do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    got = model.generate(PROMPT, do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=0,
                         custom_generate=speculative_generate)
    assert torch.equal(got, want) and int(got[0, -1]) == eos


def test_refuses_batches_and_padding(model):
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(PROMPT.repeat(2, 1), do_sample=False, max_new_tokens=4, custom_generate=speculative_generate)
    mask = torch.ones_like(PROMPT)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(PROMPT, attention_mask=mask, do_sample=False, max_new_tokens=4,
                       custom_generate=speculative_generate)
    for bad in (0, -1, 2.5, True):  # 0 was read as "not given" (4 drafts per step)
        with pytest.raises(ValueError, match="num_draft_tokens: expected an integer >= 1"):
            model.generate(PROMPT, do_sample=False, max_new_tokens=4, custom_generate=speculative_generate,
                           num_draft_tokens=bad)


# ---- sampling -----------------------------------------------------------------------------------------------------

DIST_PROMPT = torch.tensor([[11]])
DRAFT = 3


def target_first_token_probs(m):
    with torch.no_grad():
        row = m(DIST_PROMPT).logits[0, -1:].float()
    proc = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(8)])
    return torch.softmax(proc(DIST_PROMPT, row)[0], -1).double().numpy()


class FirstStep(StoppingCriteria):
    def __call__(self, input_ids, scores, **kw):
        return torch.ones(input_ids.shape[0], dtype=torch.bool)


def first_tokens(m, n, seed):
    """n runs of one verification step: draft token DRAFT proposed after the prompt, sampled verification."""
    torch.manual_seed(seed)
    proc = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(8)])
    cfg = GenerationConfig(do_sample=True, max_length=8)
    stop = StoppingCriteriaList([FirstStep()])
    out = []
    with torch.no_grad():
        for _ in range(n):
            ids = speculative_generate(m, DIST_PROMPT, proc, stop, cfg, proposer=lambda ctx, k: [DRAFT])
            out.append(int(ids[0, 1]))
    return np.array(out)


def chi2_pvalue(samples, p):
    counts = np.bincount(samples, minlength=len(p)).astype(float)
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was emitted"
    return chisquare(counts[keep], counts[keep].sum() * p[keep] / p[keep].sum()).pvalue


@pytest.fixture(scope="module")
def small():
    m = tiny_llama(3, vocab=32, hidden=16, layers=1)
    p = target_first_token_probs(m)
    assert 0.02 < p[DRAFT] < 0.6, "the draft should be neither certain nor impossible"
    return m, p


def test_sampling_follows_the_processed_target(small):
    m, p = small
    assert chi2_pvalue(first_tokens(m, 600, seed=4), p) > 1e-4


def test_distribution_check_catches_a_wrong_verification(small, monkeypatch):
    """Planted bug: verify the point-mass lookup draft as if it had been drawn from the uniform distribution.
    The same check must reject it."""
    m, p = small
    real = spdkernels.rejection_sample

    def wrong(logits, tokens, cu, draft_probs=None, **kw):
        uniform = torch.full((tokens.shape[0], logits.shape[1]), 1.0 / logits.shape[1])
        return real(logits, tokens, cu, draft_probs=uniform, **kw)

    monkeypatch.setattr(spdkernels, "rejection_sample", wrong)
    assert chi2_pvalue(first_tokens(m, 300, seed=4), p) < 1e-6


def test_sampling_with_a_draft_model_uses_its_probabilities(model, monkeypatch):
    """do_sample with an HF draft model: the drafts are sampled from its processed distribution and verified
    with those probabilities; with the target drafting for itself (q = p) every draft is accepted."""
    seen = []
    real = spdkernels.rejection_sample

    def spy(logits, tokens, cu, draft_probs=None, **kw):
        seen.append((tokens.shape[0], draft_probs))
        out = real(logits, tokens, cu, draft_probs=draft_probs, **kw)
        seen[-1] += (int(out[1][0]) - 1,)
        return out

    monkeypatch.setattr(spdkernels, "rejection_sample", spy)
    torch.manual_seed(5)
    out = model.generate(PROMPT, do_sample=True, max_new_tokens=13, top_k=20, custom_generate=speculative_generate,
                         draft_model=model, num_draft_tokens=3)
    assert out.shape == (1, PROMPT.shape[1] + 13)
    steps = [(k, q, a) for k, q, a in seen if k > 0]
    assert steps and all(q is not None and q.shape == (k, 64) for k, q, _ in steps)
    assert all(a == k for k, _, a in steps), "a draft equal to the target was rejected"


# ---- the embedded model through transformers ------------------------------------------------------------------

def test_embedded_model_greedy_equals_generate(tmp_path):
    """SmolLM2-135M (the embedded GGUF, written out as a Hugging Face folder and loaded by transformers):
    greedy speculative output equals transformers' own greedy generation on a real prompt."""
    from transformers import AutoModelForCausalLM

    from spdkernels.runtime import load_checkpoint
    from spdkernels.runtime.weights import save_hf_folder

    ck = load_checkpoint()
    save_hf_folder(ck, tmp_path)
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="float32").eval()
    ids = torch.tensor([ck.tokenizer.encode("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return")])
    want = m.generate(ids, do_sample=False, max_new_tokens=12)
    got = m.generate(ids, do_sample=False, max_new_tokens=12, custom_generate=speculative_generate)
    assert torch.equal(got, want)
