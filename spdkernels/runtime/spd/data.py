"""Training data for the PDM: the target's own continuations of the training prompts
(:mod:`.prompts`), generated in batches through the runtime's engine, and the target's hidden states at the
PDM's anchors for every token of them (recorded while the text is generated: the engine computes them
anyway, so no second pass over the text is needed)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..engine import Engine, Request, SamplingParams
from ..files import write_text_atomic
from ..model import LlamaModel, build_batch
from ..proposers import Draft, Proposer
from . import prompts as _prompts
from .prompts import followup_prompts, training_prompts


class AnchorRecorder(Proposer):
    """A proposer that drafts nothing and records the hidden states at ``anchors`` of every token the engine
    commits (prefill and decode passes) as ``dtype``: plain autoregressive decoding that keeps the features the
    PDM is trained on. A request's rows stay on the model's device while it runs (on a GPU: ``len(anchors) x
    hidden`` values per token besides the KV cache) and move to host memory when it ends."""
    name = "anchor-recorder"

    def __init__(self, anchors: Sequence[int], dtype=torch.float16):
        super().__init__(1, 1)
        self.taps = tuple(int(b) for b in anchors)
        self.dtype = dtype
        self.rows: Dict[object, Dict[int, torch.Tensor]] = {}

    def propose(self, states, depth_limits):
        return [Draft() for _ in states]

    def observe(self, state, positions, hidden):
        # kept on the model's device until the request ends (release), so a GPU run copies each request's rows
        # to host memory once instead of syncing on a copy for every request at every step
        rows = self.rows.setdefault(state.rid, {})
        hidden = hidden.to(self.dtype)
        for i, p in enumerate(positions):
            rows[p] = hidden[i]

    def release(self, state):
        rows = self.rows.get(state.rid)
        if rows and next(iter(rows.values())).device.type != "cpu":
            keys = sorted(rows)
            host = torch.stack([rows[p] for p in keys]).cpu()
            self.rows[state.rid] = {p: host[j] for j, p in enumerate(keys)}

    def states(self, rid, length: int) -> torch.Tensor:
        """``[length, len(anchors), hidden]`` in host memory: the recorded rows of positions ``0 .. length - 1``."""
        rows = self.rows.pop(rid)
        missing = [p for p in range(length) if p not in rows]
        if missing:
            raise RuntimeError(f"anchor recorder: positions {missing[:5]} of request {rid!r} were never observed")
        return torch.stack([rows[p] for p in range(length)]).cpu()


def self_prompts(model: LlamaModel, tokenizer, count: int, seed: int, batch: int = 128, max_tokens: int = 96,
                 temperature: float = 1.0, log=print) -> List[Tuple[str, str]]:
    """Up to ``count`` user requests ``("self", text)`` written by the target itself: it is given its chat
    template up to where the user's message begins (the template rendered around a marker, cut at the
    marker) and samples the message (at ``temperature``, top-p 0.95, a seed per request), as an instruction-tuned
    model writes the kind of requests it was tuned on. A message counts when the model ended it itself
    (end of turn within ``max_tokens``), has at least 3 words and is new; up to 4 rounds make up for the others.
    Prompts no template list can exhaust, in the model's own idea of what users ask."""
    if count <= 0:
        return []
    marker = "\x00user-message\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}])
    if marker not in rendered:
        raise ValueError("self_prompts: the chat template does not place the user's message verbatim")
    prefix = tokenizer.encode(rendered[:rendered.index(marker)])
    if not prefix:
        raise ValueError("self_prompts: the chat template puts nothing before the user's message to continue")
    out: List[Tuple[str, str]] = []
    seen = set()
    drawn = 0
    for _ in range(4):
        want = count - len(out)
        if want <= 0:
            break
        n = want + want // 2 + 1
        reqs = [Request(list(prefix), SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=0.95,
                                                     seed=seed * 1000003 + 700001 + drawn + j)) for j in range(n)]
        drawn += n
        res, _ = Engine(model).generate(reqs, max_batch=batch)
        for r in res:
            if r.finish_reason != "eos":  # cut off at max_tokens: not a whole message
                continue
            text = tokenizer.decode(r.output_ids[:-1]).strip()  # without the end-of-turn token
            if len(text.split()) >= 3 and text not in seen and len(out) < count:
                seen.add(text)
                out.append(("self", text))
    log(f"data: {len(out)} self-written prompts from {drawn} drawn")
    return out


def generate_corpus(model: LlamaModel, tokenizer, num_prompts: int, max_new_tokens: int, seed: int,
                    batch: int = 128, sampled_fraction: float = 0.2, log=print,
                    anchors: Optional[Sequence[int]] = None, followup_fraction: float = 0.3,
                    self_fraction: float = 0.0) -> Tuple[List[Dict], Optional[List[torch.Tensor]]]:
    """``(corpus, states)``. ``corpus = [{"kind", "round", "prompt_ids", "output_ids"}]`` (``"source"`` too in
    round 2: the index of the first-round sequence whose reply the prompt hands back): greedy continuations, and
    for ``sampled_fraction`` of the prompts continuations sampled at temperature 0.7 (seeded), so the text
    covers more than one path; ``batch`` requests in flight at a time (continuous batching: a finished
    request's place goes to the next prompt at once). Two rounds: ``1 - followup_fraction`` of the prompts from
    :func:`~.prompts.training_prompts`, then the rest from :func:`~.prompts.followup_prompts` built on the
    first round's replies (the target's own documents and code handed back to edit); ``self_fraction`` of the
    first round's prompts are written by the target itself (:func:`self_prompts`, kind ``"self"``) instead of
    the templates. With ``anchors``,
    ``states[i]`` holds the hidden states at the anchors of every token of sequence ``i`` but its last
    (``[len(prompt) + len(output) - 1, len(anchors), hidden]`` fp16, the rows :func:`anchor_states`
    computes, recorded during generation); otherwise ``states`` is None."""
    if not 0.0 <= self_fraction <= 1.0:
        raise ValueError(f"self_fraction: expected a fraction in [0, 1], got {self_fraction}")
    n2 = int(round(followup_fraction * num_prompts))
    out: List[Dict] = []
    states: Optional[List[torch.Tensor]] = [] if anchors is not None else None
    t0 = time.perf_counter()

    def run(prompts: Sequence[Tuple[str, str]], sources: Optional[Sequence[int]] = None) -> None:
        if not prompts:  # e.g. no first-round reply long enough to hand back
            return
        reqs, kinds = [], []
        for kind, text in prompts:
            i = len(out) + len(reqs)  # the sequence's index in the corpus: its seed and sampling choice
            ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
            sampled = (i * 7919 + seed) % 100 < sampled_fraction * 100
            reqs.append(Request(ids, SamplingParams(max_new_tokens=max_new_tokens,
                                                    temperature=0.7 if sampled else 0.0,
                                                    top_p=0.95 if sampled else 1.0, seed=seed * 100003 + i)))
            kinds.append(kind)
        total = len(out) + len(reqs)
        before = sum(len(x["output_ids"]) for x in out)
        last = [time.perf_counter()]

        def progress(generated: int) -> None:
            if time.perf_counter() - last[0] >= 60:
                last[0] = time.perf_counter()
                done = before + generated
                log(f"data: {done} tokens generated, {done / (last[0] - t0):.0f} tok/s")

        rec = AnchorRecorder(anchors) if anchors is not None else None
        eng = Engine(model, rec)
        eng.on_step = progress
        res, _ = eng.generate(reqs, max_batch=batch)
        for j, (r, kind) in enumerate(zip(res, kinds)):
            seq = dict(kind=kind, prompt_ids=r.prompt_ids, output_ids=r.output_ids, round=1 if sources is None else 2)
            if sources is not None:
                seq["source"] = sources[j]  # the first-round sequence whose reply this prompt hands back
            out.append(seq)
            if rec is not None:
                states.append(rec.states(r.rid, len(r.prompt_ids) + len(r.output_ids) - 1))
        n = sum(len(x["output_ids"]) for x in out)
        log(f"data: {len(out)}/{total} prompts, {n} tokens generated, {n / (time.perf_counter() - t0):.0f} tok/s")

    mine = self_prompts(model, tokenizer, int(round(self_fraction * (num_prompts - n2))), seed, batch=batch, log=log)
    run(training_prompts(num_prompts - n2 - len(mine), seed) + mine)  # the templates make up for any shortfall
    if n2:
        replies = [(x["kind"], tokenizer.decode(x["output_ids"])) for x in out]
        follow = followup_prompts(replies, n2, seed, with_source=True)
        run([(k, p) for k, p, _ in follow], [i for _, _, i in follow])
    return out, states


def corpus_families(corpus: Sequence[Dict]) -> List[int]:
    """Per sequence, the first-round sequence it descends from: itself, or for a second-round prompt the
    sequence whose reply it hands back (``source``; a corpus written before sources were recorded has none,
    and each sequence is then its own family)."""
    return [int(s.get("source", i)) for i, s in enumerate(corpus)]


def corpus_version(target_sha256: str, settings: str = "") -> str:
    """A 10-hex tag of what a generated corpus depends on besides its size and seed: the target's weights
    (``target_fingerprint(...)["weights_sha256"]``) and the source of this module and of :mod:`.prompts`
    (templates, the mix, sampling settings), and ``settings`` (generation options not in the file name).
    ``train-pdm`` puts it in the corpus file's name, so a change of target, templates or generation code gives
    another file (changes elsewhere, in the engine or the kernels, are not hashed)."""
    h = hashlib.sha256((target_sha256 + settings).encode())
    for path in (__file__, _prompts.__file__):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:10]


def corpus_settings(tokenizer, eos_token_ids: Sequence[int], self_fraction: float = 0.0, packed: bool = False) -> str:
    """The ``settings`` of :func:`corpus_version` that the weights' hash misses: the tokenizer and chat template
    (the ids of one fixed chat turn), the end-of-sequence ids, the share of self-written prompts, and whether the
    target held packed weights (any matrix a ``PackedWeight``: a decoding batch of 49-192 rows on AVX-512 is then
    summed in another order than with fp32 weights, which can change a near-tied greedy token, so the texts are
    cached apart)."""
    probe = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Fix this: def f(x):\n    return x+1  # ok?"}]))
    tok = hashlib.sha256(json.dumps([int(t) for t in probe]).encode()).hexdigest()[:16]
    out = f"tok={tok};eos={sorted(int(t) for t in eos_token_ids)}"
    return out + (f";self={self_fraction}" if self_fraction else "") + (";weights=packed" if packed else "")


def newest_corpus(work: Path) -> Path:
    """The most recently written ``corpus-*.json`` of a train-pdm work folder (a change of target, templates or
    options leaves the older ones beside it); ``FileNotFoundError`` when there is none."""
    corpora = sorted(Path(work).glob("corpus-*.json"), key=lambda p: p.stat().st_mtime)
    if not corpora:
        raise FileNotFoundError(f"no corpus-*.json in {work}")
    return corpora[-1]


def trained_corpus(work: Path, training: Optional[Dict] = None) -> Path:
    """The corpus a PDM was trained on (``training``: its ``pdm.json`` ``training`` record, which names the
    file) when the work folder has it, else :func:`newest_corpus` (a PDM trained before the name was
    recorded)."""
    name = (training or {}).get("corpus")
    if name and (Path(work) / name).exists():
        return Path(work) / name
    return newest_corpus(Path(work))


def held_out_windows(windows: Sequence, count: int, seed: int) -> List:
    """``count`` of a held-out split's windows drawn at random (seeded), in their order: the first ones all
    come from the first sequences, which are all of the first round."""
    import random

    if count >= len(windows):
        return list(windows)
    keep = sorted(random.Random(seed + 2).sample(range(len(windows)), count))
    return [windows[i] for i in keep]


def save_corpus(path: Path, corpus: Sequence[Dict], meta: Dict) -> None:
    write_text_atomic(path, json.dumps(dict(meta=meta, sequences=list(corpus))))


class CorpusError(ValueError):
    """A cached training text that cannot be read back."""


def load_corpus(path: Path) -> tuple:
    """``(sequences, meta)`` of a file written by :func:`save_corpus`; :class:`CorpusError` when it is not one."""
    try:
        d = json.loads(Path(path).read_text())
        seqs, meta = d["sequences"], d["meta"]
        if not isinstance(seqs, list) or not isinstance(meta, dict) or not all(
                isinstance(s, dict) and isinstance(s.get("prompt_ids"), list) and isinstance(s.get("output_ids"), list)
                for s in seqs):
            raise TypeError("sequences: expected a list of {prompt_ids, output_ids}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"{path}: not a training text written by train-pdm ({type(e).__name__}: {e})") from None
    return seqs, meta


@torch.inference_mode()
def anchor_states(model: LlamaModel, seqs: Sequence[Sequence[int]], anchors: Sequence[int],
                  max_tokens: int = 2048, dtype=torch.float16) -> List[torch.Tensor]:
    """For each token sequence, the target's hidden states at the anchors, ``[S, m + 1, H]`` in ``dtype``
    (anchor 0 = the embedding, ``b`` = the output of the ``b``-th layer), from one prefill-style forward per
    chunk of sequences on the model's device; the states are returned in host memory."""
    taps = [b - 1 for b in anchors if b > 0]
    out: List[torch.Tensor] = []
    i = 0
    while i < len(seqs):
        chunk = [seqs[i]]
        n = len(seqs[i])
        i += 1
        while i < len(seqs) and n + len(seqs[i]) <= max_tokens:
            chunk.append(seqs[i])
            n += len(seqs[i])
            i += 1
        cache = model.new_cache(sum(-(-len(s) // 16) for s in chunk), 16)
        cu = [0]
        for j, s in enumerate(chunk):
            cache.add(j)
            cu.append(cu[-1] + len(s))
        b = build_batch(cache, list(range(len(chunk))), [0] * len(chunk), [range(len(s)) for s in chunk],
                        [t for s in chunk for t in s])
        h0 = model.embed_tokens(b.token_ids)
        _, tapped = model.forward_layers(h0, b, cache, taps=taps)
        stack = torch.stack([h0] + [tapped[t] for t in taps], dim=1).to("cpu", dtype)  # kept in host memory
        for j in range(len(chunk)):
            out.append(stack[cu[j]:cu[j + 1]].clone())
    return out
