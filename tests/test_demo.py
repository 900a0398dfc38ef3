"""spdkernels demo's bookkeeping on a tiny random model (the embedded model's run is `make run`): with repeats,
every prompt runs that many times per run, per-prompt times are medians, the speedup is the geometric mean over
prompts of the median per-repeat ratio to the autoregressive run beside it, every repeat's output is checked,
and a run whose output changes between repeats fails the demo (planted)."""
import math
import statistics

import pytest
from conftest import ByteTokenizer

from spdkernels.runtime import Engine, LlamaModel
from spdkernels.runtime.demo import SUITE, DemoFailure, merge_repeats, run_demo
from spdkernels.runtime.model import random_config, random_state_dict
from spdkernels.runtime.proposers import NGramProposer

CFG = random_config(num_layers=2)


def _Tok():
    return ByteTokenizer(CFG.vocab_size, 10)


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, {k: v.float() for k, v in random_state_dict(CFG, seed=3).items()})


def test_repeats_are_medians_and_the_speedup_is_the_median_ratio(model):
    logs = []
    out = run_demo(model, _Tok(), [NGramProposer(k=2)], max_new_tokens=6, progress=False, log=logs.append,
                   repeats=3)
    assert out["repeats"] == 3 and not out["failures"]
    runs = out["runs"]
    base = runs["ours autoregressive"]["per_prompt"]
    for name, r in runs.items():
        assert r["identical"] == len(SUITE) and len(r["per_prompt"]) == len(SUITE)
        for p in r["per_prompt"]:
            assert len(p["tokens_per_s_repeats"]) == 3
            assert p["tokens_per_s"] == statistics.median(p["tokens_per_s_repeats"])
        row = next(t for t in out["table"] if t["run"] == name)
        want = [statistics.median(a / b for a, b in zip(p["tokens_per_s_repeats"], q["tokens_per_s_repeats"]))
                for p, q in zip(r["per_prompt"], base)]
        assert row["speedup"] == pytest.approx(math.exp(sum(map(math.log, want)) / len(want)), rel=1e-12)
    assert any("3 repeats" in line for line in logs)
    assert any("median over 3 repeats" in line and "token for token in every repeat" in line for line in logs)
    with pytest.raises(ValueError, match="repeats: expected an int >= 1"):
        run_demo(model, _Tok(), [], max_new_tokens=2, progress=False, log=lambda *a: None, repeats=0)


def test_merge_repeats_medians_times_and_keeps_or_averages_the_rest():
    m = merge_repeats([dict(tokens=6, wall_s=1.0, tokens_per_s=6.0, acceptance_rate=0.5),
                       dict(tokens=6, wall_s=3.0, tokens_per_s=2.0, acceptance_rate=0.25),
                       dict(tokens=6, wall_s=2.0, tokens_per_s=3.0, acceptance_rate=0.5)])
    assert m == dict(tokens=6, wall_s=2.0, tokens_per_s=3.0, acceptance_rate=pytest.approx(1.25 / 3),
                     tokens_per_s_repeats=[6.0, 2.0, 3.0])


class _FlakyEngine:
    """Planted: a speculative run whose output changes on its second call for each prompt."""

    def __init__(self, model):
        self.inner, self.calls, self.on_step = Engine(model, NGramProposer(k=2)), {}, None

    def generate(self, reqs):
        res, met = self.inner.generate(reqs)
        key = tuple(reqs[0].prompt_ids)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] == 2:
            res[0].output_ids[1] = (res[0].output_ids[1] + 1) % CFG.vocab_size
        return res, met


def test_an_output_that_changes_between_repeats_fails_the_demo(model):
    with pytest.raises(DemoFailure, match=r"flaky: prompt 0 \(.*\) repeat 1 differs at token 1"):
        run_demo(model, _Tok(), [], max_new_tokens=4, progress=False, log=lambda *a: None,
                 extra_engines={"flaky": _FlakyEngine(model)}, repeats=2)
    # with one repeat the same engine is never called twice per prompt: it passes
    out = run_demo(model, _Tok(), [], max_new_tokens=4, progress=False, log=lambda *a: None,
                   extra_engines={"flaky": _FlakyEngine(model)}, repeats=1)
    assert out["table"][1]["identical"] == f"{len(SUITE)}/{len(SUITE)}"
