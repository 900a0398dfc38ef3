"""The Pipeline Draft Module (PDM) of Speculative Pipeline Decoding (contract: docs/contract.md section 6).

Anchors ``b_0 = 0 < b_1 < ... < b_m <= L`` are hidden-state indices of the target (0 = the token embedding,
``i`` = the output of decoder layer ``i - 1``, 0-based, i.e. after ``i`` layers). A token that has passed
``d`` of the ``n`` pipeline stages has the anchors up to the stage boundary it reached, and contributes the
row ``g_{f(d)}`` with ``g_k = W_k . concat(h_{b_0}, ..., h_{b_k})`` (one bias-free linear per k) and
``f(d) = max{k : b_k <= boundary(d)}``, ``boundary(d)`` being the number of target layers the first ``d``
stages hold (``d * L / n`` when ``n`` divides ``L``; the stages are those of :meth:`LlamaModel.stages`).
A tower of ``L_s`` Llama decoder layers with its own paged KV cache (rotary at absolute positions) runs
over these rows; the last row goes through the target's final norm and a draft LM head over a subset of
the vocabulary (the most frequent target tokens of the training data, rows taken from the target's LM
head) and gives the draft distribution q, scattered back to the full vocabulary for verification.

The tower runs through :func:`spdkernels.runtime.model.decoder_layer`, the target's own layer code: at
inference through :meth:`LlamaModel.forward_layers` (``tree_attention`` over the paged cache), in training
with a dense structural mask (:mod:`.train`).

Files: ``<dir>/pdm.safetensors`` (fp16 weights) + ``<dir>/pdm.json`` (the config and the target it belongs
to: architecture, layer count, hidden size, vocabulary, and a hash of the target's weights; and the SHA-256 of
the weights file it was saved with, so that a folder whose two files are not one save's pair is refused). Loading
a PDM for another target raises :class:`PDMError`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..linear import linear, pack_exact, weight_formats
from ..model import LlamaModel, rms_norm
from ..weights import LlamaConfig, layer_shapes

PDM_FORMAT = 1
WEIGHTS_FILE = "pdm.safetensors"
CONFIG_FILE = "pdm.json"


class PDMError(ValueError):
    """A PDM file that is missing, corrupt, or made for another target model."""


def target_fingerprint(config: LlamaConfig, state_dict: Dict[str, torch.Tensor]) -> Dict:
    """What identifies the target a PDM was trained for: architecture, sizes, and a SHA-256 over every
    tensor's name and shape and a fixed strided sample of its fp32 values (every 61st element, plus the
    whole final norm): any fine-tune or another checkpoint changes it, and it takes ~0.1 s for 135M
    parameters instead of hashing 540 MB."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu", torch.float32).contiguous().view(-1)
        sample = t if name == "model.norm.weight" else t[::61]
        h.update(name.encode())
        h.update(str(tuple(state_dict[name].shape)).encode())
        h.update(sample.numpy().tobytes())
    return dict(architecture=config.name, num_layers=config.num_layers, hidden_size=config.hidden_size,
                vocab_size=config.vocab_size, weights_sha256=h.hexdigest())


@dataclass
class PDMConfig:
    anchors: List[int]  # hidden-state indices b_0 = 0 < ... < b_m <= L
    num_layers: int  # tower layers L_s
    intermediate_size: int  # the tower's MLP width
    draft_vocab: int  # size of the draft vocabulary
    target: Dict = field(default_factory=dict)  # target_fingerprint() of the target
    train_head: bool = False  # False: the head is the target's rows (not stored, rebuilt at load)
    anchor_norm: bool = False  # True: each anchor is RMS-normalised (weights ``anchor_norm.{j}.weight``) first
    shift: bool = False  # True: each row also gets the previous token's deepest anchor (:func:`shift_rows`)
    training: Dict = field(default_factory=dict)  # how it was trained (informational)
    format: int = PDM_FORMAT
    # SHA-256 of the pdm.safetensors written with this config ("" in files saved before it was recorded: unchecked)
    weights_file_sha256: str = ""

    @property
    def m(self) -> int:
        return len(self.anchors) - 1

    def validate(self, target: LlamaConfig) -> None:
        a = self.anchors
        if not a or a[0] != 0 or any(x >= y for x, y in zip(a, a[1:])) or a[-1] > target.num_layers:
            raise PDMError(f"anchors: expected 0 = b_0 < b_1 < ... <= {target.num_layers}, got {a}")
        if self.num_layers < 1:
            raise PDMError(f"num_layers: expected >= 1 tower layers, got {self.num_layers}")
        if not 1 <= self.draft_vocab <= target.vocab_size:
            raise PDMError(f"draft_vocab: expected 1..{target.vocab_size}, got {self.draft_vocab}")
        if self.intermediate_size < 1:
            raise PDMError(f"intermediate_size: expected >= 1, got {self.intermediate_size}")

    def tower_config(self, target: LlamaConfig) -> LlamaConfig:
        return dataclasses.replace(target, num_layers=self.num_layers, intermediate_size=self.intermediate_size,
                                   attention_bias=False, tie_word_embeddings=False, name="pdm-tower")


def stage_bounds(num_layers: int, n: int) -> List[int]:
    """Layer boundaries of ``n`` near-equal consecutive stages (as :meth:`LlamaModel.stages`)."""
    if not 1 <= n <= num_layers:
        raise ValueError(f"n: expected 1 <= n <= {num_layers} stages, got {n}")
    return [round(i * num_layers / n) for i in range(n + 1)]


def depth_types(anchors: Sequence[int], num_layers: int, n: int) -> List[int]:
    """``f(d)`` for ``d = 0 .. n``: the deepest anchor a token that passed ``d`` of ``n`` stages has."""
    bounds = stage_bounds(num_layers, n)
    return [max(k for k, b in enumerate(anchors) if b <= bounds[d]) for d in range(n + 1)]


def _caller_level() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function point at the first frame
    outside the package (the user's line that made the engine, through however many of our constructors)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "spdkernels":
        frame, level = frame.f_back, level + 1
    return level


def check_model_fits(pdm: PipelineDraftModule, model) -> None:
    """``ValueError`` when ``model`` is not the kind of target the PDM was built for (its width, vocabulary and
    layer count; ``load_pdm`` also compares the weights' hash)."""
    tc, mc = pdm.target_config, model.config
    have, want = (mc.hidden_size, mc.vocab_size, mc.num_layers), (tc.hidden_size, tc.vocab_size, tc.num_layers)
    if have != want:
        raise ValueError(f"pdm: this PDM was built for another target model (hidden size, vocabulary, layers "
                         f"{want}; this model has {have})")


def check_stages(cfg: PDMConfig, num_layers: int, n: int) -> List[int]:
    """The depth-type map for ``n`` stages, or a clear error when ``n`` does not fit the target or the
    PDM's anchors (every anchor must be reached: the deepest at the pipeline's exit)."""
    if not 2 <= n <= num_layers:
        raise ValueError(f"stages: expected 2 <= n <= {num_layers} (the target's layer count), got {n}")
    f = depth_types(cfg.anchors, num_layers, n)
    if f[n] != cfg.m:
        raise ValueError(f"stages: the PDM's deepest anchor {cfg.anchors[-1]} is never reached")
    trained = (getattr(cfg, "training", None) or {}).get("stages_trained_for")
    if isinstance(trained, list) and trained and n not in trained:
        # any n fits anchors 0 = b_0 < ... <= L; an n it was not trained for gives it layouts of depths it has not
        # seen: still lossless (verification decides), but its drafts are accepted less often
        warnings.warn(f"stages: the PDM was trained for n in {trained}, not for n = {n}: its drafts will be "
                      "accepted less often (the output is the target's either way)", stacklevel=_caller_level())
    return f


def anchor_norm_init(target: LlamaModel, anchors: Sequence[int], state_dict=None) -> List[torch.Tensor]:
    """Initial per-anchor RMSNorm weights: the norm the target itself applies to hidden state ``b_j`` next
    (layer ``b_j``'s input norm, the final norm for ``b_j = L``). The residual stream of a trained LM grows
    by orders of magnitude with depth and a few dimensions carry massive activations (SmolLM2-135M: mean
    norms 2.8 at the embedding, ~750 after layer 22), so without a norm the deepest anchor swamps the
    aggregation and every context row looks alike to the tower."""
    L = target.config.num_layers
    out = []
    for b in anchors:
        if b == L:
            w = target.norm
        elif state_dict is not None:
            w = state_dict[f"model.layers.{b}.input_layernorm.weight"]
        else:
            w = target.layers[b - target.layer_start].ln1
        out.append(w.detach().float().clone())
    return out


def normalise_anchors(anchor_h: torch.Tensor, norms: Optional[Sequence[torch.Tensor]], eps: float,
                      upto: Optional[int] = None) -> torch.Tensor:
    """``anchor_h [T, m + 1, H]`` with anchor ``j`` RMS-normalised by ``norms[j]`` (unchanged when
    ``norms`` is None); only the first ``upto`` anchors are returned when given."""
    k = anchor_h.shape[1] if upto is None else upto
    if norms is None:
        return anchor_h[:, :k]
    return torch.stack([rms_norm(anchor_h[:, j], norms[j], eps) for j in range(k)], dim=1)


def group_rows(types: Union[torch.Tensor, Sequence[int]], count: int, rows: int, name: str = "types",
               allow_none: bool = False) -> Dict[int, List[int]]:
    """``{type: [row indices in order]}`` for a vector of ``rows`` row types (a 1-D integer tensor, read once to
    the host, or a list of ints, which costs no device round trip): the PDM applies one matrix per type, of
    ``count``. Types lie in ``[0, count)``, or are -1 (no previous token) where ``allow_none``; else a
    ValueError naming ``name``."""
    if isinstance(types, torch.Tensor):
        if types.dim() != 1 or types.is_floating_point() or types.is_complex() or types.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor, got {types.dtype} of shape {tuple(types.shape)}")
        types = types.tolist()
    if len(types) != rows:
        raise ValueError(f"{name}: {len(types)} row types for {rows} rows")
    groups: Dict[int, List[int]] = {}
    for i, k in enumerate(types):
        if isinstance(k, bool) or int(k) != k:
            raise ValueError(f"{name}: row types must be integers, got {k!r}")
        groups.setdefault(int(k), []).append(i)
    lo = -1 if allow_none else 0
    if groups and not (lo <= min(groups) and max(groups) < count):
        raise ValueError(f"{name}: row types must lie in [{lo}, {count}), got {sorted(groups)}")
    return groups


def aggregate(weights: Sequence[torch.Tensor], anchor_h: torch.Tensor, types: Union[torch.Tensor, Sequence[int]],
              norms: Optional[Sequence[torch.Tensor]] = None, eps: float = 1e-5) -> torch.Tensor:
    """Rows ``g_{types[i]}`` for hidden states ``anchor_h: [T, m + 1, H]`` (entries past a row's type are
    ignored): ``g_k = W_k . concat(n_0(h_{b_0}), .., n_k(h_{b_k}))`` with ``weights[k]: [H, (k + 1) H]`` and
    ``n_j`` the anchor's RMSNorm (the identity when ``norms`` is None). ``types``: a list of ints (grouped on
    the host) or a 1-D integer tensor; a type outside ``[0, len(weights))`` or a count other than ``T`` is a
    ValueError."""
    T, _, H = anchor_h.shape
    groups = group_rows(types, len(weights), T)
    if len(groups) == 1:  # one type (completed rows, a prefill): no gather, no scatter
        (k, _), = groups.items()
        return linear(normalise_anchors(anchor_h, norms, eps, k + 1).reshape(T, (k + 1) * H), weights[k])
    out = anchor_h.new_empty(T, H)
    for k, idx in groups.items():
        idx = torch.tensor(idx, dtype=torch.int64, device=anchor_h.device)
        x = normalise_anchors(anchor_h[idx], norms, eps, k + 1).reshape(len(idx), (k + 1) * H)
        out[idx] = linear(x, weights[k])
    return out


def shift_rows(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], prev_h: torch.Tensor,
               prev_types: Union[torch.Tensor, Sequence[int]], eps: float = 1e-5) -> torch.Tensor:
    """The previous-token term of the rows (``PDMConfig.shift``): row ``i`` gets
    ``S_k . n_k(h_{b_k})`` of the token before it, ``k = prev_types[i]`` the deepest anchor that token had
    when the row was formed (``-1``: no previous token, the term is zero). ``prev_h: [T, m + 1, H]`` holds
    the previous token's anchors (entries past its type are ignored), ``weights[k]: [H, H]``, ``norms[k]``
    its RMSNorm weight. EAGLE-style: the deepest feature of the previous token reaches the row directly,
    not only through attention."""
    T, _, H = prev_h.shape
    groups = group_rows(prev_types, len(weights), T, "prev_types", allow_none=True)
    if len(groups) == 1 and -1 not in groups:  # every row's previous token of one type
        (k, _), = groups.items()
        return linear(rms_norm(prev_h[:, k], norms[k], eps), weights[k])
    out = prev_h.new_zeros(T, H)
    for k, idx in groups.items():
        if k < 0:
            continue
        idx = torch.tensor(idx, dtype=torch.int64, device=prev_h.device)
        out[idx] = linear(rms_norm(prev_h[idx, k], norms[k], eps), weights[k])
    return out


class PipelineDraftModule:
    """Inference-time PDM (fp32 or the target's dtype): aggregation weights, the tower (a
    :class:`LlamaModel` of ``L_s`` layers without embedding or head), the target's final norm and the draft
    head. Build with :func:`load_pdm` or from a trained :class:`~.train.PDMTrainer`.

    ``packed`` (CPU fp32 only): hold each matrix in the smallest exact compact form
    (:func:`~spdkernels.runtime.linear.pack_exact`: the shipped weights are fp16, a GGUF target's head rows
    Q8_0), which the skinny GEMM widens block by block: the same logits bit for bit, fewer bytes per forward
    (much of the PDM's cost is its weight traffic on a CPU)."""

    def __init__(self, cfg: PDMConfig, weights: Dict[str, torch.Tensor], target: LlamaModel, packed: bool = True):
        tc = target.config
        cfg.validate(tc)
        self.cfg = cfg
        self.target_config = tc
        dt, dev = target.dtype, target.device
        H = tc.hidden_size
        self.agg = []
        for k in range(cfg.m + 1):
            w = weights.get(f"agg.{k}.weight")
            if w is None or tuple(w.shape) != (H, (k + 1) * H):
                raise PDMError(f"agg.{k}.weight: expected shape {(H, (k + 1) * H)}, got "
                               f"{None if w is None else tuple(w.shape)}")
            self.agg.append(w.to(dev, dt).contiguous())
        self.anchor_norms = None
        if cfg.anchor_norm:
            self.anchor_norms = []
            for j in range(cfg.m + 1):
                w = weights.get(f"anchor_norm.{j}.weight")
                if w is None or tuple(w.shape) != (H,):
                    raise PDMError(f"anchor_norm.{j}.weight: missing or not of shape {(H,)}")
                self.anchor_norms.append(w.to(dev, dt).contiguous())
        self.shift_w = self.shift_norms = None
        if cfg.shift:
            self.shift_w, self.shift_norms = [], []
            for k in range(cfg.m + 1):
                w, nw = weights.get(f"shift.{k}.weight"), weights.get(f"shift_norm.{k}.weight")
                if w is None or tuple(w.shape) != (H, H) or nw is None or tuple(nw.shape) != (H,):
                    raise PDMError(f"shift.{k}.weight / shift_norm.{k}.weight: missing or not of shapes "
                                   f"{(H, H)} / {(H,)}")
                self.shift_w.append(w.to(dev, dt).contiguous())
                self.shift_norms.append(nw.to(dev, dt).contiguous())
        ids = weights.get("vocab_ids")
        if ids is None or ids.shape != (cfg.draft_vocab,) or ids.is_floating_point() or ids.is_complex():
            raise PDMError("vocab_ids: missing, of the wrong length or not integers")
        self.vocab_ids = ids.to(dev, torch.int64)
        if int(self.vocab_ids.min()) < 0 or int(self.vocab_ids.max()) >= tc.vocab_size:
            raise PDMError(f"vocab_ids: ids outside the target's vocabulary [0, {tc.vocab_size})")
        if int(torch.unique(self.vocab_ids).numel()) != cfg.draft_vocab:
            # a repeated id would be drawn with the summed probability but verified against one entry
            raise PDMError("vocab_ids: an id appears more than once")
        self.tower = LlamaModel(cfg.tower_config(tc), weights, dtype=dt, device=dev, head=False, packed=packed)
        self.norm = target.norm
        if cfg.train_head:
            w = weights.get("head.weight")
            if w is None or tuple(w.shape) != (cfg.draft_vocab, H):
                raise PDMError("head.weight: missing or of the wrong shape")
            self.head = w.to(dev, dt).contiguous()
        else:
            self.head = target.lm_head[self.vocab_ids].contiguous()
        self.eps = tc.rms_norm_eps
        self.packed = self.tower.packed  # (CPU fp32 only; the tower, a LlamaModel, packs its own matrices)
        if self.packed:
            self.agg = [pack_exact(w) for w in self.agg]
            if self.shift_w is not None:
                self.shift_w = [pack_exact(w) for w in self.shift_w]
            self.head = pack_exact(self.head)

    def weight_formats(self) -> Dict[str, int]:
        """How many of the PDM's matrices are held in each format (``fp32`` or a packed one)."""
        return weight_formats(list(self.agg) + list(self.shift_w or []) + [self.head] + self.tower.matrices())

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def new_cache(self, num_blocks: int, block_size: int = 16, scrub: bool = False):
        return self.tower.new_cache(num_blocks, block_size, scrub=scrub)

    def rows(self, anchor_h: torch.Tensor, types: Union[torch.Tensor, Sequence[int]],
             prev_h: Optional[torch.Tensor] = None,
             prev_types: Union[torch.Tensor, Sequence[int], None] = None) -> torch.Tensor:
        """The tower's input rows for tokens with anchors ``anchor_h [T, m + 1, H]`` of types ``types [T]``;
        a PDM with ``shift`` also needs each row's previous token: its anchors ``prev_h [T, m + 1, H]`` and
        type ``prev_types [T]`` (-1: none), as they were when the row is formed. Types given as lists of ints
        are grouped on the host (no device round trip)."""
        g = aggregate(self.agg, anchor_h, types, self.anchor_norms, self.eps)
        if self.shift_w is not None:
            if prev_h is None or prev_types is None:
                raise ValueError("prev_h/prev_types: this PDM's rows need the previous token's anchors (shift)")
            g = g + shift_rows(self.shift_w, self.shift_norms, prev_h, prev_types, self.eps)
        return g

    def rows_of(self, rows: Sequence[torch.Tensor], types: Sequence[int],
                prev: Sequence[tuple]) -> torch.Tensor:
        """:meth:`rows` from lists: anchors ``rows[i]`` (``[m + 1, H]``) of type ``types[i]``, whose previous
        token is ``prev[i] = (anchors, type)`` (type -1: none; read only by a PDM with ``shift``)."""
        kw = {}
        if self.shift_w is not None:
            kw = dict(prev_h=torch.stack([p[0] for p in prev]), prev_types=[p[1] for p in prev])
        return self.rows(torch.stack(list(rows)), list(types), **kw)

    def completed_rows(self, anchor_h: torch.Tensor, lengths: Sequence[int],
                       before: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Rows of completed tokens (type ``m``) for consecutive runs of ``lengths[i]`` tokens of one request
        each, stacked in ``anchor_h``; ``before[i]``: the anchors of the completed token preceding run ``i``
        (None: the run starts the sequence)."""
        T = anchor_h.shape[0]
        if any(int(n) < 1 for n in lengths) or sum(int(n) for n in lengths) != T:
            raise ValueError(f"lengths: runs of at least one token summing to the {T} rows, got {list(lengths)}")
        types = [self.cfg.m] * T
        if self.shift_w is None:
            return self.rows(anchor_h, types)
        prev_h = torch.cat([anchor_h[:1], anchor_h[:-1]])
        prev_t = list(types)
        i = 0
        for j, n in enumerate(lengths):
            b = before[j] if before is not None else None
            if b is None:
                prev_t[i] = -1
            else:
                prev_h[i] = b
            i += n
        return self.rows(anchor_h, types, prev_h, prev_t)

    def view_logits(self, rows: Sequence[torch.Tensor], types: Sequence[int]) -> torch.Tensor:
        """The draft logits ``[draft_vocab]`` after a whole view computed from scratch on a fresh cache: the
        anchors ``rows[i]`` (``[m + 1, H]``) of consecutive positions from 0, of types ``types[i]``, each
        row's previous token the row before it. The definition the cached drafting is checked against."""
        from ..model import build_batch

        T, dev = len(rows), rows[0].device
        g = self.rows_of(rows, types, [(rows[0], -1)] + [(rows[i - 1], types[i - 1]) for i in range(1, T)])
        cache = self.new_cache(-(-T // 16), 16)
        cache.add(0)
        h, _ = self.tower.forward_layers(g, build_batch(cache, [0], [0], [list(range(T))], device=dev), cache)
        return self.draft_logits(h[-1:])[0]

    def check_draft(self, rid, logits: torch.Tensor, rows: Sequence[torch.Tensor], types: Sequence[int]) -> None:
        """Debug: ``logits`` of a cached draft equal :meth:`view_logits` of its view (fp64: 1e-6, else 1e-3)."""
        want = self.view_logits(rows, types)
        tol = 1e-6 if want.dtype == torch.float64 else 1e-3
        assert torch.allclose(logits, want, rtol=tol, atol=tol), \
            f"{rid!r}: the PDM's cached draft differs from its from-scratch run by " \
            f"{float((logits - want).abs().max()):.3g}"

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tower output rows ``[T, H]`` -> draft-vocabulary logits ``[T, draft_vocab]``."""
        return linear(rms_norm(h, self.norm, self.eps), self.head)

    def scatter(self, q: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Draft-vocabulary probabilities ``[T, Vd]`` -> full-vocabulary ``[T, V]`` (zeros elsewhere)."""
        out = q.new_zeros(q.shape[0], vocab_size)
        out[:, self.vocab_ids] = q
        return out


def save_pdm(path: str, cfg: PDMConfig, weights: Dict[str, torch.Tensor], dtype=torch.float16) -> Path:
    """Write ``pdm.safetensors`` (weights in ``dtype``; ``vocab_ids`` as int64) and ``pdm.json``, each replaced in
    one step, the weights first; ``pdm.json`` records the weights file's SHA-256, so a save interrupted between the
    two (new weights beside an older config) is refused on loading instead of read as a pair."""
    from safetensors.torch import save

    from ..files import write_atomic, write_text_atomic

    out = {k: (v.detach().to("cpu", torch.int64) if k == "vocab_ids" else v.detach().to("cpu", dtype)).contiguous()
           for k, v in weights.items()}
    for k, v in out.items():  # (load_pdm refuses such a file: say so when writing it, naming the cause)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{k}: not finite in {dtype} (NaN, or a value beyond its range): not saved")
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    blob = save(out)
    write_atomic(d / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(blob))
    cfg = dataclasses.replace(cfg, weights_file_sha256=hashlib.sha256(blob).hexdigest())
    write_text_atomic(d / CONFIG_FILE, json.dumps(dataclasses.asdict(cfg), indent=1))
    return d


def pdm_folder(path: str) -> Path:
    """The PDM folder ``path`` names: the folder itself, or the folder of its ``pdm.json`` /
    ``pdm.safetensors`` (any other file is refused, not read as a pointer to the folder it sits in)."""
    if not str(path):
        raise PDMError("pdm: empty path, expected a folder with pdm.json and pdm.safetensors")
    d = Path(path)
    if d.is_file():
        if d.name not in (CONFIG_FILE, WEIGHTS_FILE):
            raise PDMError(f"pdm: {d} is a file, expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
        d = d.parent
    elif not d.exists():
        raise PDMError(f"pdm: {d} does not exist (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    return d


def read_pdm(path: str) -> tuple:
    """``(PDMConfig, weights)`` from a folder (or its ``pdm.json``), with clear errors for missing or
    corrupt files."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = pdm_folder(path)
    cj, wf = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cj.is_file() or not wf.is_file():
        raise PDMError(f"pdm: expected {CONFIG_FILE} and {WEIGHTS_FILE} in {d}")
    try:
        raw = json.loads(cj.read_text(encoding="utf-8"))
        cfg = PDMConfig(**raw)
        _check_field_types(cfg)
    except OSError as e:
        raise PDMError(f"pdm: cannot read {cj} ({e.strerror or e})") from None
    except (ValueError, TypeError) as e:
        raise PDMError(f"pdm: {cj} is not a PDM config ({e})") from None
    if cfg.format != PDM_FORMAT:
        raise PDMError(f"pdm: {cj}: format {cfg.format} not supported (expected {PDM_FORMAT})")
    try:
        blob = wf.read_bytes()
    except OSError as e:
        raise PDMError(f"pdm: cannot read {wf} ({e.strerror or e})") from None
    if cfg.weights_file_sha256 and hashlib.sha256(blob).hexdigest() != cfg.weights_file_sha256:
        raise PDMError(f"pdm: {wf} is not the weights file {cj} was saved with (its SHA-256 differs from the "
                       f"weights_file_sha256 {cj.name} records): the file is damaged, or the two files are not one "
                       f"save's pair (an interrupted save, or files copied from two PDMs)")
    try:
        weights = load(blob)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PDMError(f"pdm: cannot read {wf} ({e})") from None
    return cfg, weights


def _check_field_types(cfg: PDMConfig) -> None:
    """A config read from a file has the types its fields declare (json gives any type anywhere)."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(cfg.anchors, list) or not all(is_int(a) for a in cfg.anchors):
        raise TypeError(f"anchors: expected a list of layer indices, got {cfg.anchors!r}")
    for name in ("num_layers", "intermediate_size", "draft_vocab", "format"):
        if not is_int(getattr(cfg, name)):
            raise TypeError(f"{name}: expected an integer, got {getattr(cfg, name)!r}")
    for name in ("train_head", "anchor_norm", "shift"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name}: expected true or false, got {getattr(cfg, name)!r}")
    for name in ("target", "training"):
        if not isinstance(getattr(cfg, name), dict):
            raise TypeError(f"{name}: expected an object, got {getattr(cfg, name)!r}")
    h = cfg.weights_file_sha256
    if not isinstance(h, str) or (h and not re.fullmatch("[0-9a-f]{64}", h)):
        raise TypeError(f"weights_file_sha256: expected 64 hex digits, got {h!r}")


def check_target(cfg: PDMConfig, target_config: LlamaConfig, fingerprint: Optional[Dict]) -> None:
    """Refuse a PDM trained for another target."""
    want = cfg.target
    have = dict(architecture=target_config.name, num_layers=target_config.num_layers,
                hidden_size=target_config.hidden_size, vocab_size=target_config.vocab_size)
    for k, v in have.items():
        if want.get(k) != v:
            raise PDMError(f"pdm: made for a target with {k}={want.get(k)!r}, this model has {k}={v!r}")
    if fingerprint is not None and want.get("weights_sha256") != fingerprint["weights_sha256"]:
        raise PDMError("pdm: made for another checkpoint of this architecture (the target's weight hash "
                       f"{fingerprint['weights_sha256'][:12]}... differs from "
                       f"{str(want.get('weights_sha256'))[:12]}...)")


def expected_tensors(cfg: PDMConfig, target: LlamaConfig) -> List[str]:
    """The names of every tensor a PDM file of config ``cfg`` holds (no more, no fewer)."""
    r = range(cfg.m + 1)
    names = [f"agg.{k}.weight" for k in r] + ["vocab_ids"]
    if cfg.anchor_norm:
        names += [f"anchor_norm.{j}.weight" for j in r]
    if cfg.shift:
        names += [f"shift.{k}.weight" for k in r] + [f"shift_norm.{k}.weight" for k in r]
    if cfg.train_head:
        names.append("head.weight")
    return names + [f"model.layers.{i}.{n}" for i in range(cfg.num_layers)
                    for n, _ in layer_shapes(cfg.tower_config(target))]


def check_tensors(cfg: PDMConfig, weights: Dict[str, torch.Tensor], target: LlamaConfig) -> None:
    """The file's tensors are the ones its config asks for (an extra tensor means the config and the weights
    disagree, e.g. anchors edited after training), floating point but for ``vocab_ids``, and finite (a NaN in a
    draft weight gives NaN draft distributions: sampled verification would no longer be lossless)."""
    want = expected_tensors(cfg, target)
    extra = sorted(set(weights) - set(want))
    if extra:
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise PDMError(f"{len(extra)} tensor(s) the config does not use ({shown}): {CONFIG_FILE} and "
                       f"{WEIGHTS_FILE} do not belong together")
    for name in want:
        w = weights.get(name)
        if w is None or name == "vocab_ids":
            continue  # (missing tensors and vocab_ids: the module's own checks, which name the expected shape)
        if not w.is_floating_point():
            raise PDMError(f"{name}: expected a floating-point tensor, got {w.dtype}")
        if not bool(torch.isfinite(w).all()):
            raise PDMError(f"{name}: holds NaN or infinite values (a corrupt weights file)")


def load_pdm(path: str, target: LlamaModel, state_dict: Optional[Dict[str, torch.Tensor]] = None,
             packed: bool = True) -> PipelineDraftModule:
    """Load a PDM for ``target``; ``state_dict`` (the target's checkpoint tensors) enables the weight-hash
    check, which the runtime always passes. ``packed``: see :class:`PipelineDraftModule`. Every refusal is a
    :class:`PDMError` that names the PDM's folder."""
    cfg, weights = read_pdm(path)
    d = pdm_folder(path)
    try:
        fp = target_fingerprint(target.config, state_dict) if state_dict is not None else None
        check_target(cfg, target.config, fp)
        cfg.validate(target.config)
        want = {f"model.layers.{i}.{n}": s for i in range(cfg.num_layers)
                for n, s in layer_shapes(cfg.tower_config(target.config))}
        for name, shape in want.items():
            if name not in weights or tuple(weights[name].shape) != tuple(shape):
                raise PDMError(f"{name} missing or not of shape {shape}")
        check_tensors(cfg, weights, target.config)
        return PipelineDraftModule(cfg, weights, target, packed=packed)
    except PDMError as e:
        msg = str(e)
        raise PDMError(f"pdm {d}: {msg[len('pdm: '):] if msg.startswith('pdm: ') else msg}") from None


def shipped_pdm_path(name: str = "smollm2-135m-instruct") -> Path:
    """The PDM trained for the embedded SmolLM2-135M-Instruct, shipped in the package."""
    return Path(__file__).resolve().parent.parent / "pdm" / name
