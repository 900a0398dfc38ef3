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


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("kind", ["none", "ngram", "early-exit-tree", "pdm-chain", "pdm-tree", "spd"])
def test_generate_builds_every_tensor_on_the_model_device(model, deviceless, kind, temperature):
    pdm = untrained_pdm(model, [0, 1, 2, 3, 4], layers=1, intermediate=32, noise=0.05)
    if kind == "spd":
        eng = SPDEngine(model, pdm, 2)
    else:
        proposer = {"none": None, "ngram": NGramProposer(k=3),
                    "early-exit-tree": EarlyExitProposer(layers=1, k=3, branching=2, width=2),
                    "pdm-chain": PDMProposer(pdm, k=3), "pdm-tree": PDMProposer(pdm, k=3, branching=2, width=2)}[kind]
        eng = Engine(model, proposer)
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
