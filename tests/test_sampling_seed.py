"""SamplingParams(seed=None): every request draws its own seed, once, and every engine and proposer uses it;
a seeded request is reproducible; the result records the seed, so an unseeded run can be repeated."""
import dataclasses

import pytest
import torch

from spdkernels.runtime import Engine, LlamaModel, NGramProposer, Request, SamplingParams
from spdkernels.runtime.engine import validate_requests
from spdkernels.runtime.model import random_config, random_state_dict
from spdkernels.runtime.spd.proposer import PDMProposer
from spdkernels.runtime.spd.schedule import SPDEngine
from spdkernels.runtime.spd.train import untrained_pdm

CFG = random_config(vocab_size=64, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, random_state_dict(CFG, seed=2, std=0.3), dtype=torch.float32)


@pytest.fixture(scope="module")
def pdm(model):
    return untrained_pdm(model, [0, 1, 2, 3, 4], layers=1, intermediate=32, noise=0.3, seed=5)


def sampled(n=12, **kw):
    return SamplingParams(max_new_tokens=n, temperature=1.0, ignore_eos=True, **kw)


def test_unseeded_requests_draw_different_seeds():
    shared = sampled()
    reqs = [Request(PROMPT, shared) for _ in range(8)] + [Request(PROMPT) for _ in range(8)]
    seeds = [r.params.seed for r in reqs]
    assert all(isinstance(s, int) and 0 <= s < 2 ** 63 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    assert shared.seed is None  # parameters shared by several requests are copied, never changed
    assert SamplingParams().seed is None
    seeded = Request(PROMPT, sampled(seed=11))
    assert seeded.params.seed == 11


def test_seed_drawn_once_at_validation_when_params_replaced_later():
    req = Request(PROMPT, sampled(seed=3))
    req.params = sampled()  # replaced after creation: left to chance again
    validate_requests(CFG, [req])
    s = req.params.seed
    assert isinstance(s, int)
    validate_requests(CFG, [req])  # drawn once: a second validation keeps it
    assert req.params.seed == s
    with pytest.raises(ValueError, match="seed"):
        sampled(seed="1").validate()
    with pytest.raises(ValueError, match="seed"):
        sampled(seed=2 ** 63).validate()


def test_unseeded_requests_sample_differently_and_record_their_seed(model):
    res, _ = Engine(model).generate([Request(PROMPT, sampled(16)) for _ in range(6)])
    assert len({r.seed for r in res}) == 6
    assert len({tuple(r.output_ids) for r in res}) > 1  # before: every unseeded request had the same coins
    # the recorded seed reproduces the text of the same engine
    again, _ = Engine(model).generate([Request(PROMPT, sampled(16, seed=r.seed)) for r in res])
    assert [r.output_ids for r in again] == [r.output_ids for r in res]
    # with a proposer too (coins are keyed by seed and step, so a proposer's text is its own)
    reqs = [Request(PROMPT, sampled(16)) for _ in range(3)]
    first, _ = Engine(model, NGramProposer(k=3, min_ngram=1)).generate(reqs)
    second, _ = Engine(model, NGramProposer(k=3, min_ngram=1)).generate(
        [Request(PROMPT, sampled(16, seed=r.seed)) for r in first])
    assert [r.output_ids for r in second] == [r.output_ids for r in first]


def test_seeded_request_reproducible(model):
    def run():
        res, _ = Engine(model).generate([Request(PROMPT, sampled(16, seed=7))])
        return res[0]

    a, b = run(), run()
    assert a.output_ids == b.output_ids and a.seed == b.seed == 7


def test_spd_engine_and_pdm_proposer_use_the_request_seed(model, pdm):
    req = Request(PROMPT, sampled(10))
    seed = req.params.seed
    res, _ = SPDEngine(model, pdm, n=2).generate([req])
    assert res[0].seed == seed
    # the same seed given explicitly: the same tokens from SPD (its coins are keyed by the seed alone)
    res2, _ = SPDEngine(model, pdm, n=2).generate([Request(PROMPT, dataclasses.replace(req.params))])
    assert res2[0].output_ids == res[0].output_ids
    res3, _ = Engine(model, PDMProposer(pdm, k=3)).generate([req])
    assert res3[0].seed == seed
