"""The runtime places every tensor it builds on the model's device.

No GPU here, so this is checked by construction: while the engines generate (every proposer kind, chains
and trees, greedy and sampled, and the SPD schedule), each tensor factory call made from the runtime's own
modules is recorded, and any that does not name its device is a failure: on a CUDA model it would build a
CPU tensor next to CUDA ones. A planted call without a device shows that the check sees such calls."""
import sys

import pytest
import torch

from spdkernels.runtime import Engine, LlamaModel, Request, SamplingParams
from spdkernels.runtime.model import random_config, random_state_dict
from spdkernels.runtime.proposers import EarlyExitProposer, NGramProposer
from spdkernels.runtime.spd.proposer import PDMProposer
from spdkernels.runtime.spd.schedule import SPDEngine
from spdkernels.runtime.spd.train import untrained_pdm

FACTORIES = ("tensor", "zeros", "ones", "full", "empty", "arange", "randn", "rand", "randint")
CFG = random_config(num_layers=4)


class _Seen(list):
    calls = 0


@pytest.fixture()
def deviceless(monkeypatch):
    """Records ``(module, line, factory)`` of every tensor factory called from ``spdkernels.runtime``
    without ``device=``."""
    seen = _Seen()
    for name in FACTORIES:
        orig = getattr(torch, name)

        def wrapped(*a, _orig=orig, _name=name, **kw):
            f = sys._getframe(1)
            mod = f.f_globals.get("__name__", "")
            if mod.startswith("spdkernels.runtime"):
                seen.calls += 1
                if "device" not in kw:
                    seen.append((mod, f.f_lineno, _name))
            return _orig(*a, **kw)

        monkeypatch.setattr(torch, name, wrapped)
    return seen


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float32)


def _requests(temperature):
    g = torch.Generator().manual_seed(0)
    p = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (6, 11)]
    return [Request(x * 2, SamplingParams(max_new_tokens=12, temperature=temperature, seed=3)) for x in p]


KINDS = ["none", "ngram", "early-exit-tree", "pdm-chain", "pdm-tree", "spd"]


def _engine(model, kind):
    """An engine of every kind the runtime has: plain, n-gram, early-exit trees, PDM chains and trees, SPD."""
    pdm = untrained_pdm(model, [0, 1, 2, 3, 4], layers=1, intermediate=32, noise=0.05)
    if kind == "spd":
        return SPDEngine(model, pdm, 2)
    proposer = {"none": None, "ngram": NGramProposer(k=3),
                "early-exit-tree": EarlyExitProposer(layers=1, k=3, branching=2, width=2),
                "pdm-chain": PDMProposer(pdm, k=3), "pdm-tree": PDMProposer(pdm, k=3, branching=2, width=2)}[kind]
    return Engine(model, proposer)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("kind", KINDS)
def test_generate_builds_every_tensor_on_the_model_device(model, deviceless, kind, temperature):
    eng = _engine(model, kind)
    reqs = _requests(temperature)
    deviceless.clear()  # building the models and the PDM is not under test
    res, _ = eng.generate(reqs)
    assert all(len(r.output_ids) == 12 for r in res)
    assert deviceless.calls > 10  # the engine's own tensor factories were seen
    assert deviceless == [], f"tensors built without a device: {sorted(set(deviceless))}"


def test_the_check_sees_a_deviceless_call(deviceless):
    """The planted wrong variant: a runtime-module call without ``device=`` is recorded."""
    g = {"__name__": "spdkernels.runtime.planted", "torch": torch}
    exec("x = torch.tensor([1, 2])\ny = torch.zeros(3, device='cpu')", g)
    assert [(m, n) for m, _, n in deviceless] == [("spdkernels.runtime.planted", "tensor")]


@pytest.fixture()
def attention_calls(monkeypatch):
    """Records ``(max_q_len, max_kv_len, longest query run, largest kv_len)`` of every ``tree_attention`` call of
    the runtime's forward (``spdkernels.runtime.model``)."""
    import spdkernels.runtime.model as model_mod

    seen = []
    orig = model_mod.tree_attention

    def wrapped(q, k, v, block_table, kv_lens, cu_q_lens, *a, **kw):
        seen.append((kw.get("max_q_len"), kw.get("max_kv_len"), int(cu_q_lens.diff().max()), int(kv_lens.max())))
        return orig(q, k, v, block_table, kv_lens, cu_q_lens, *a, **kw)

    monkeypatch.setattr(model_mod, "tree_attention", wrapped)
    return seen


def _unbounded(calls):
    """The calls that did not pass the batch's exact host-side bounds (on a GPU: two host syncs per layer)."""
    return [c for c in calls if c[0] != c[2] or c[1] != c[3]]


@pytest.mark.parametrize("kind", KINDS)
def test_every_attention_call_carries_host_bounds(model, attention_calls, kind):
    """Every forward of every path (prefill, verification, early-exit and PDM drafting, PDM trees, the SPD stages
    and the PDM there) hands ``tree_attention`` the longest query run and the largest kv_len from the host, so its
    GPU launch needs no read-back (with validation on, the op checks them; here they are compared exactly)."""
    eng = _engine(model, kind)
    attention_calls.clear()
    res, _ = eng.generate(_requests(0.0))
    assert all(len(r.output_ids) == 12 for r in res)
    assert len(attention_calls) > 20
    assert any(c[2] > 1 for c in attention_calls)  # prefill / verification runs, not only single rows
    assert _unbounded(attention_calls) == []


def test_the_bounds_check_sees_a_batch_without_bounds(model, attention_calls):
    """The planted wrong variant: a batch built by hand without bounds is reported."""
    from spdkernels.runtime.model import Batch, build_batch

    cache = model.new_cache(4, 16)
    cache.add(0)
    b = build_batch(cache, [0], [0], [range(5)], [1, 2, 3, 4, 5])
    assert (b.max_q_len, b.max_kv_len) == (5, 5)
    bare = Batch(b.token_ids, b.positions, b.slot_mapping, b.cu_q_lens, b.kv_lens, b.block_table)
    model.forward(bare, cache)
    assert _unbounded(attention_calls) == [(None, None, 5, 5)] * CFG.num_layers
    # the bounds describe the tensors they came with: a batch cannot have its tensors swapped afterwards
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        b.kv_lens = b.kv_lens + 1


def _tree_step(m):
    """A cache with two prompts (9 and 4 tokens) and the batch of the next step: request 0 verifies a root with
    two children, request 1 decodes one token."""
    from spdkernels.runtime.model import build_batch

    cache = m.new_cache(8, 16)
    for rid in (0, 1):
        cache.add(rid)
    m.forward(build_batch(cache, [0, 1], [0, 0], [range(9), range(4)], list(range(13))), cache)
    cache.set_length(0, 9)
    cache.set_length(1, 4)
    return cache, build_batch(cache, [0, 1], [9, 4], [[9, 10, 10], [4]], [5, 6, 7, 8], tree_parents=[[-1, -1], []])


@pytest.mark.parametrize("validate", [False, True])
def test_the_triton_forward_with_host_bounds_matches_torch(validate):
    """The Triton attention launched from the batch's host bounds (CUDA here where there is a GPU, the Triton
    interpreter elsewhere) gives the torch backend's logits; with validation off, the forward's Python makes no host
    sync (spdkernels.testing.no_host_sync, the interpreter's own reads exempt)."""
    from conftest import DEVICE

    import spdkernels

    m = LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float32, device=DEVICE)
    from spdkernels.testing.sync_guard import no_host_sync

    out = {}
    for backend in ("torch", "triton"):
        with spdkernels.use_backend(backend), spdkernels.validation(validate):
            cache, b = _tree_step(m)
            if backend == "triton" and not validate:  # the Python around the kernels reads nothing back
                with no_host_sync(allow=("triton",)):
                    out[backend] = m.forward(b, cache)
            else:
                out[backend] = m.forward(b, cache)
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_forward_makes_no_host_sync():
    """On a GPU a decoding forward (a batch of two requests, one verifying a 3-node tree) runs without one host
    sync: torch's sync debug mode raises on any."""
    import spdkernels

    m = LlamaModel(CFG, random_state_dict(CFG), dtype=torch.float32, device="cuda")
    old = spdkernels.validation_enabled()
    spdkernels.set_validation(False)
    try:
        cache, b = _tree_step(m)
        m.forward(b, cache)  # the kernels' compilation for these sizes outside the check (it rewrites the same K/V)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = m.forward(b, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert out.shape == (4, CFG.vocab_size) and bool(torch.isfinite(out).all())
    finally:
        spdkernels.set_validation(old)


@pytest.mark.parametrize("device, message", [("tpu", "expected cpu, cuda or cuda:N"), ("cuda:x", "expected cpu"),
                                             ("cuda", "no CUDA device")])
def test_cli_device_errors_exit_2(tmp_path, capsys, device, message):
    from spdkernels.runtime.cli import main as cli_main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --device cuda is valid here")
    out = tmp_path / "o.json"
    rc = cli_main(["generate", "--prompt", "hi", "--device", device, "--json", str(out), "--no-progress"])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--device" in err and message in err
