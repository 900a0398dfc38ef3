"""Training the Pipeline Draft Module (``spdkernels train-pdm``).

The target is frozen. Its own continuations of a prompt set (:mod:`.data`) are the text; its hidden
states at the PDM's anchors are computed once per sequence; the teacher is its next-token distribution
restricted to the draft vocabulary, and the loss is ``KL(teacher || draft)`` on the rows that predict a
generated token.

**The structural mask.** One training sequence of ``S`` tokens becomes one block of ``S`` rows per row
type ``a`` (``g_a`` at every position). A row stands for a token seen at a given depth; which rows another
row may attend to is exactly what inference gives it (:func:`structural_mask`):

* pipeline mode (``n`` stages, fill ``F`` in ``1..n``): the row of type ``a`` at position ``t`` has depth
  ``d_a`` (the smallest depth with ``f(d) = a``) and sees, for each earlier or equal position ``T``, the row
  whose type is ``f(depth)`` with ``D = d_a + t - T`` and ``depth = D if D < F else n``: tokens within
  ``F`` of the newest are in flight at their depth, older ones are completed (their deepest row).
  ``F = n`` is a full pipeline, ``F < n`` a pipeline refilling after a rejection;
* proposer mode (the PDM drafting chains in the ordinary engine): the sequence is cut into segments of
  1..K tokens; a type-0 row sees the type-0 rows of its own segment up to itself and the completed rows of
  every earlier position.

Every sequence draws its mode, ``n`` and ``F`` (or its segments) from the run's seeded generator; the loss
rows are the type-0 rows (the query row of every drafting step) whose next token is generated text."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..linear import PackedWeight
from ..model import LlamaModel, decoder_layer, rope_tables
from .pdm import (
    PDMConfig,
    anchor_norm_init,
    depth_types,
    normalise_anchors,
    save_pdm,
    shift_rows,
    target_fingerprint,
)


# ---- the structural mask --------------------------------------------------------------------------------------
def used_depths(n: int, mode: str, fill: int = 0) -> List[int]:
    """The depth blocks a layout needs: the in-flight depths ``0 .. fill - 1`` and the completed depth
    ``n`` (proposer mode: 0 and ``n``)."""
    return sorted(set(range(fill)) | {n}) if mode == "pipeline" else [0, n]


def structural_mask(S: int, f: Sequence[int], mode: str, fill: int = 0, segments: Sequence[int] = ()
                    ) -> Tuple[torch.Tensor, List[int]]:
    """``(mask [M, M] bool, depths)``: one block of ``S`` rows per depth ``depths[i]`` (the rows of block
    ``d`` are ``g_{f(d)}``), ``mask[i, j]`` = row ``i`` may attend to row ``j``. ``f = depth_types(...)`` for
    ``n = len(f) - 1`` stages; ``mode`` is ``"pipeline"`` (with ``fill`` in 1..n) or ``"proposer"`` (with
    ``segments``: lengths summing to ``S``). Blocks are per depth, not per type, so that a type that two
    depths share (more stages than anchors) still gets each depth's own context."""
    n = len(f) - 1
    t = torch.arange(S)
    delta = t[:, None] - t[None, :]  # t - T
    causal = delta >= 0
    if mode == "pipeline":
        if not 1 <= fill <= n:
            raise ValueError(f"fill: expected 1..{n}, got {fill}")
        depths = used_depths(n, mode, fill)
        col = {d: i for i, d in enumerate(depths)}
        M = len(depths) * S
        mask = torch.zeros(M, M, dtype=torch.bool)
        for d in depths:
            D = d + delta.clamp(min=0)
            key_depth = torch.where(D < fill, D, torch.full_like(D, n))
            r = col[d] * S
            for e in depths:
                c = col[e] * S
                mask[r:r + S, c:c + S] = causal & (key_depth == e)
    elif mode == "proposer":
        if sum(segments) != S or any(x < 1 for x in segments):
            raise ValueError(f"segments: expected positive lengths summing to {S}")
        depths = used_depths(n, mode)
        mask = torch.zeros(2 * S, 2 * S, dtype=torch.bool)
        start = torch.repeat_interleave(torch.tensor([sum(segments[:i]) for i in range(len(segments))]),
                                        torch.tensor(list(segments)))  # segment start of each position
        same = start[:, None] == start[None, :]
        mask[:S, :S] = causal & same
        mask[:S, S:] = t[None, :] < start[:, None]
        mask[S:, S:] = causal
    else:
        raise ValueError(f"mode: expected 'pipeline' or 'proposer', got {mode!r}")
    return mask, depths


def previous_types(S: int, f: Sequence[int], mode: str, depths: Sequence[int], fill: int = 0,
                   segments: Sequence[int] = ()) -> torch.Tensor:
    """``[len(depths), S]``: for the row of block ``depths[i]`` at position ``t``, the type (deepest anchor)
    the token at ``t - 1`` had when that row was formed at inference, ``-1`` at ``t = 0``. Pipeline mode:
    the previous token is one stage deeper (``depth(d + 1)``, completed past the fill; completed for the
    completed block). Proposer mode: a draft's previous token is the draft before it in its segment (type 0)
    or a completed token."""
    n = len(f) - 1
    out = torch.empty(len(depths), S, dtype=torch.int64)
    for i, d in enumerate(depths):
        if mode == "pipeline":
            e = n if d == n or d + 1 >= fill else d + 1
            out[i] = f[e]
        elif d == n:
            out[i] = f[n]
        else:
            start = torch.repeat_interleave(torch.tensor([sum(segments[:j]) for j in range(len(segments))]),
                                            torch.tensor(list(segments)))
            out[i] = torch.where(torch.arange(S) - 1 >= start, f[0], f[n])
    out[:, 0] = -1
    return out


def brute_force_mask(S: int, f: Sequence[int], mode: str, fill: int = 0, segments: Sequence[int] = ()
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same mask built by simulating inference (tests): for every drafting step, which (depth,
    position) rows exist in the PDM's view and what each attended to when it was computed. Returns
    ``(mask, present)``: ``present[i]`` says whether row ``i`` occurs in any view (the dense mask also
    gives the other rows a pattern, which no loss row reads)."""
    n = len(f) - 1
    depths = used_depths(n, mode, fill)
    col = {d: i for i, d in enumerate(depths)}
    M = len(depths) * S
    mask = torch.zeros(M, M, dtype=torch.bool)
    present = torch.zeros(M, dtype=torch.bool)

    def add_view(view):
        for p, d in view.items():
            present[col[d] * S + p] = True
            for q in range(p + 1):
                mask[col[d] * S + p, col[view[q]] * S + q] = True

    if mode == "pipeline":
        # the newest token is at position t and depth 0; the token i back is at depth i while i < fill,
        # completed (depth n) beyond. A row attends to every row of the view at or before its position.
        for t in range(S):
            add_view({p: (t - p if t - p < fill else n) for p in range(t + 1)})
    else:
        s0 = 0
        for L in segments:
            for t in range(s0, s0 + L):
                add_view({p: (0 if p >= s0 else n) for p in range(t + 1)})
            s0 += L
    return mask, present


# ---- the trainable module --------------------------------------------------------------------------------------
class _TowerLayer(torch.nn.Module):
    def __init__(self, c, gen: torch.Generator, num_layers: int):
        super().__init__()
        H, inter = c.hidden_size, c.intermediate_size
        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        std, out_std = 0.02, 0.02 / math.sqrt(2 * num_layers)

        def p(*shape, s):
            return torch.nn.Parameter(torch.randn(*shape, generator=gen) * s)

        self.ln1 = torch.nn.Parameter(torch.ones(H))
        self.ln2 = torch.nn.Parameter(torch.ones(H))
        self.w_qkv = p(qkv, H, s=std)
        self.b_qkv = None
        self.w_o = p(H, c.num_heads * c.head_dim, s=out_std)
        self.w_gate_up = p(2 * inter, H, s=std)
        self.w_down = p(H, inter, s=out_std)


def _dense(w) -> torch.Tensor:
    return (w.dequantize() if isinstance(w, PackedWeight) else w).detach().float().cpu()


def init_tower_from(layers, target: LlamaModel, index: int) -> None:
    """Every tower layer starts as a copy of the target's layer ``index`` (its norms, attention and MLP): a
    tower that starts from a trained layer reaches a given loss in fewer steps than one from noise (measured:
    held-out top-1 agreement at n = 4 after 300 steps 0.251 from layer 29 against 0.221 from noise,
    bench/results/pdm-recipe-*.jsonl). A narrower tower MLP keeps the target's neurons of largest
    ``|gate| |up| |down|`` (in their order); a wider one keeps its noise in the neurons past the target's. The
    tower has no attention biases: a target's (Qwen2) are not copied."""
    L = target.num_layers
    if not target.layer_start <= index < target.layer_end:
        raise ValueError(f"tower_init: expected a layer of the target, {target.layer_start}..{target.layer_end - 1} "
                         f"(of {L}), got {index}")
    src = target.layers[index - target.layer_start]
    I_t = src.w_down.shape[1]
    gate, up = _dense(src.w_gate_up).split(I_t)
    down = _dense(src.w_down)
    with torch.no_grad():
        for t in layers:
            if t.w_qkv.shape != src.w_qkv.shape or t.w_o.shape != src.w_o.shape:
                raise ValueError("tower_init: the tower's attention layout differs from the target's")
            t.ln1.copy_(_dense(src.ln1))
            t.ln2.copy_(_dense(src.ln2))
            t.w_qkv.copy_(_dense(src.w_qkv))
            t.w_o.copy_(_dense(src.w_o))
            inter = t.w_down.shape[1]
            k = min(inter, I_t)
            keep = (gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).topk(k).indices.sort().values
            t.w_gate_up[:k].copy_(gate[keep])
            t.w_gate_up[inter:inter + k].copy_(up[keep])
            t.w_down[:, :k].copy_(down[:, keep])


class PDMNet(torch.nn.Module):
    """The PDM with trainable parameters (fp32). ``hf_state_dict()`` gives the tensors that
    :class:`~.pdm.PipelineDraftModule` loads; both run the tower through ``decoder_layer``."""

    def __init__(self, cfg: PDMConfig, target: LlamaModel, vocab_ids: torch.Tensor, seed: int = 0,
                 tower_init: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.tc = tc = target.config
        self.tower_cfg = cfg.tower_config(tc)
        H = tc.hidden_size
        g = torch.Generator().manual_seed(seed)
        agg = []
        for k in range(cfg.m + 1):
            w = torch.randn(H, (k + 1) * H, generator=g) * (0.02 / math.sqrt(k + 1))
            w[:, k * H:] += torch.eye(H)  # start as the deepest anchor of the row: g_k = h_{b_k}
            agg.append(torch.nn.Parameter(w))
        self.agg = torch.nn.ParameterList(agg)
        self.anchor_norms = None
        if cfg.anchor_norm:
            self.anchor_norms = torch.nn.ParameterList(
                [torch.nn.Parameter(w) for w in anchor_norm_init(target, cfg.anchors)])
        self.shift_w = self.shift_norms = None
        if cfg.shift:  # zero: training starts from the rows without the previous-token term
            self.shift_w = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(H, H)) for _ in range(cfg.m + 1)])
            self.shift_norms = torch.nn.ParameterList(
                [torch.nn.Parameter(w) for w in anchor_norm_init(target, cfg.anchors)])
        self.layers = torch.nn.ModuleList([_TowerLayer(self.tower_cfg, g, cfg.num_layers)
                                           for _ in range(cfg.num_layers)])
        if tower_init is not None:
            init_tower_from(self.layers, target, tower_init)
        self.register_buffer("vocab_ids", vocab_ids.to(torch.int64).clone())
        self.register_buffer("norm", target.norm.detach().float().clone())
        head = target.lm_head[vocab_ids].detach().float().clone()
        if cfg.train_head:
            self.head = torch.nn.Parameter(head)
        else:
            self.register_buffer("head", head)
        cos, sin = rope_tables(self.tower_cfg, torch.float32, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rows(self, anchor_h: torch.Tensor, types: Sequence[int], prev: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """``anchor_h [S, m + 1, H]`` -> the stacked blocks ``[len(types) * S, H]``, block ``i`` of type
        ``types[i]``; with ``shift``, ``prev [len(types), S]`` (:func:`previous_types`) gives each row's
        previous-token type."""
        S, _, H = anchor_h.shape
        x = normalise_anchors(anchor_h, self.anchor_norms, self.tc.rms_norm_eps)
        g = torch.cat([F.linear(x[:, :a + 1].reshape(S, (a + 1) * H), self.agg[a]) for a in types])
        if self.shift_w is not None:
            before = torch.cat([anchor_h[:1], anchor_h[:-1]])  # row t: the anchors of token t - 1
            g = g + shift_rows(self.shift_w, self.shift_norms, before.repeat(len(types), 1, 1),
                               prev.reshape(-1).tolist(), self.tc.rms_norm_eps)
        return g

    def forward(self, anchor_h: torch.Tensor, positions: torch.Tensor, types: Sequence[int], mask: torch.Tensor,
                loss_rows: torch.Tensor, prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draft logits ``[len(loss_rows), Vd]`` of the rows ``loss_rows`` (indices into the stacked blocks)."""
        c = self.tower_cfg
        h = self.rows(anchor_h, types, prev)
        pos = positions.repeat(len(types))
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        groups = c.num_heads // c.num_kv_heads

        def attend(q, k, v, qmask):
            Tq = q.shape[0]
            q = q.transpose(0, 1)[None]
            k = k.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
            v = v.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=qmask[None, None], scale=c.head_dim ** -0.5)
            return o[0].transpose(0, 1).reshape(Tq, c.num_heads, c.head_dim)

        last = len(self.layers) - 1
        for i, L in enumerate(self.layers):
            if i < last:
                h = decoder_layer(h, L, c, cos, sin, lambda q, k, v: attend(q, k, v, mask))
            else:  # only the loss rows' outputs are needed from the last layer
                h = decoder_layer(h, L, c, cos, sin, lambda q, k, v: attend(q, k, v, mask[loss_rows]),
                                  rows=loss_rows)
        return F.linear(F.rms_norm(h, (h.shape[-1],), self.norm, self.tc.rms_norm_eps), self.head)

    def hf_state_dict(self) -> Dict[str, torch.Tensor]:
        c = self.tower_cfg
        qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        out: Dict[str, torch.Tensor] = {f"agg.{k}.weight": w.detach() for k, w in enumerate(self.agg)}
        if self.anchor_norms is not None:
            out.update({f"anchor_norm.{j}.weight": w.detach() for j, w in enumerate(self.anchor_norms)})
        if self.shift_w is not None:
            out.update({f"shift.{k}.weight": w.detach() for k, w in enumerate(self.shift_w)})
            out.update({f"shift_norm.{k}.weight": w.detach() for k, w in enumerate(self.shift_norms)})
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, k, v = L.w_qkv.detach().split([qd, kd, kd])
            gate, up = L.w_gate_up.detach().split(c.intermediate_size)
            out.update({p + "input_layernorm.weight": L.ln1.detach(), p + "post_attention_layernorm.weight":
                        L.ln2.detach(), p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                        p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": L.w_o.detach(),
                        p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                        p + "mlp.down_proj.weight": L.w_down.detach()})
        out["vocab_ids"] = self.vocab_ids
        if self.cfg.train_head:
            out["head.weight"] = self.head.detach()
        return out


# ---- samples -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainSettings:
    stage_choices: Tuple[int, ...] = (2, 4, 4, 4, 8)  # n drawn per sequence (4 three times as often)
    proposer_fraction: float = 0.25  # sequences in proposer mode
    partial_fill: float = 0.5  # pipeline sequences with a partly filled pipeline
    max_segment: int = 6  # proposer mode: segments of 1..max_segment tokens
    window: int = 256  # tokens per training window
    batch: int = 4  # windows per optimizer step
    steps: int = 1800
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.03
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    seed: int = 0
    tower_init: Optional[int] = None  # the target layer every tower layer starts from (None: noise)
    # also learn from the prompts' rows (the target's next-token distribution over the prompt text) after the chat
    # preamble every prompt shares; the held-out windows keep the generated rows only
    prompt_rows: bool = False


@dataclasses.dataclass
class Window:
    anchors: torch.Tensor  # [S, m + 1, H] fp16
    start: int  # absolute position of the first token
    first_loss: int  # first loss row (window-relative): its next token is generated text (or, with prompt rows,
    # the first token after the shared preamble)
    next_ids: torch.Tensor  # [S] int64 next token (-1 past the end)


class TrainingDivergedError(RuntimeError):
    """The training loss stopped being finite (a learning rate too high for the run): the run stops at once."""


# the training state beside the latest weight snapshot: what a resumed run continues from
STATE_FILE = "train_state.pt"
CHECKPOINT_EVERY = 100  # steps between snapshots (train_pdm's)


def _run_differences(have: Dict, want: Dict, prefix: str = "") -> List[str]:
    """The keys (dotted) whose values differ between two JSON-like dicts, in sorted order."""
    out = []
    for k in sorted(set(have) | set(want), key=str):
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _run_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def shared_prefix(corpus: Sequence[Dict]) -> int:
    """The number of leading prompt tokens every sequence shares (the chat template's preamble)."""
    return len(os.path.commonprefix([list(s["prompt_ids"]) for s in corpus]))


def make_windows(states: Sequence[torch.Tensor], corpus: Sequence[Dict], window: int,
                 loss_from: Optional[int] = None) -> List[Window]:
    """Windows of ``window`` tokens over each sequence (a quarter of overlap). The loss rows are those whose next
    token is generated text, or with ``loss_from`` every row from position ``max(loss_from, 1) - 1`` on (the
    prompt's rows after a shared preamble of ``loss_from`` tokens too), with some context before the first. Each
    row is a loss row of one window only: a window's overlap with the one before is its context."""
    out = []
    for h, seq in zip(states, corpus):
        ids = list(seq["prompt_ids"]) + list(seq["output_ids"])
        P = len(seq["prompt_ids"]) if loss_from is None else min(max(1, loss_from), len(seq["prompt_ids"]))
        T = h.shape[0]  # the rows with states: every token, or every token but the last (recorded in generation)
        if T not in (len(ids), len(ids) - 1):
            raise ValueError(f"states: {T} rows for a sequence of {len(ids)} tokens")
        nxt = torch.tensor((ids[1:] + [-1])[:T])
        s = max(0, P - 1 - window // 4)  # keep some prompt context before the first generated token
        done = 0  # rows before this one were loss rows of an earlier window
        while s < T - 1:
            e = min(T, s + window)
            fl = max(0, P - 1 - s, done - s)
            if fl < e - s - 1 or (fl == e - s - 1 and int(nxt[e - 1]) >= 0):  # a loss row (the last one may be)
                out.append(Window(h[s:e], s, fl, nxt[s:e]))
            done = e
            s = e - window // 4 if e < T else e  # overlap so every row has some context
    return out


def draw_layout(rng: random.Random, st: TrainSettings, S: int, anchors, L: int):
    if rng.random() < st.proposer_fraction:
        n = min(4, L)
        segs, left = [], S
        while left:
            x = min(left, rng.randint(1, st.max_segment))
            segs.append(x)
            left -= x
        return "proposer", n, 0, segs
    n = rng.choice([x for x in st.stage_choices if x <= L] or [L])
    fill = n if rng.random() >= st.partial_fill or n == 1 else rng.randint(1, n - 1)
    return "pipeline", n, fill, []


class Trainer:
    def __init__(self, target: LlamaModel, cfg: PDMConfig, train: List[Window], held: List[Window],
                 st: TrainSettings, log=print):
        """Trains on the target's device (the windows stay in host memory, one moved per loss)."""
        self.target, self.cfg, self.train, self.held, self.st, self.log = target, cfg, train, held, st, log
        torch.manual_seed(st.seed)
        self.device = target.device
        # initialised on the CPU (the same numbers on every device), then moved
        self.net = PDMNet(cfg, target, torch.tensor(cfg.training["vocab_ids"]), seed=st.seed,
                          tower_init=st.tower_init).to(self.device)
        # teacher rows: the target's final norm and full LM head (frozen) over the draft vocabulary
        self.vocab_ids = self.net.vocab_ids
        self.teacher_head = target.lm_head[self.vocab_ids].float()
        decay = [p for n_, p in self.net.named_parameters() if p.dim() > 1]
        rest = [p for n_, p in self.net.named_parameters() if p.dim() <= 1]
        self.opt = torch.optim.AdamW([dict(params=decay, weight_decay=st.weight_decay),
                                      dict(params=rest, weight_decay=0.0)], lr=st.lr, betas=(0.9, 0.95))
        self.rng = random.Random(st.seed)
        self.L = target.num_layers

    def lr_at(self, step: int) -> float:
        st = self.st
        w = max(1, int(st.warmup * st.steps))
        if step < w:
            return st.lr * (step + 1) / w
        p = (step - w) / max(1, st.steps - w)
        return st.lr * (st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def _loss(self, w: Window, mode: str, n: int, fill: int, segs) -> Tuple[torch.Tensor, int, int]:
        S = w.anchors.shape[0]
        f = depth_types(self.cfg.anchors, self.L, n)
        mask, depths = structural_mask(S, f, mode, fill, segs)
        types = [f[d] for d in depths]
        rows = torch.arange(w.first_loss, S - 1) if w.next_ids[-1] < 0 else torch.arange(w.first_loss, S)
        rows = rows[w.next_ids[rows] >= 0]
        dev = self.device
        h = w.anchors.to(dev).float()
        rows, mask = rows.to(dev), mask.to(dev)
        prev = previous_types(S, f, mode, depths, fill, segs) if self.cfg.shift else None
        pos = torch.arange(w.start, w.start + S, device=dev)
        logits = self.net(h, pos, types, mask, rows, prev)  # block 0 = depth 0
        with torch.no_grad():
            hl = h[rows, -1] if self.cfg.anchors[-1] == self.L else None
            t_logits = F.linear(F.rms_norm(hl, (hl.shape[-1],), self.net.norm, self.target.config.rms_norm_eps),
                                self.teacher_head)
            p = torch.softmax(t_logits, -1)
        loss = F.kl_div(torch.log_softmax(logits, -1), p, reduction="sum")
        agree = int((logits.argmax(-1) == t_logits.argmax(-1)).sum())
        return loss, agree, len(rows)

    def evaluate(self, windows: Sequence[Window], layouts) -> Dict[str, float]:
        """Held-out mean KL per row and top-1 agreement (the draft's argmax equals the teacher's argmax over
        the draft vocabulary) for each named layout."""
        out = {}
        self.net.eval()
        with torch.no_grad():
            for name, (mode, n, fill, seg) in layouts.items():
                tot, agree, rows = 0.0, 0, 0
                for w in windows:
                    S = w.anchors.shape[0]
                    segs = [] if mode == "pipeline" else [seg] * (S // seg) + ([S % seg] if S % seg else [])
                    loss, a, r = self._loss(w, mode, n, fill if mode == "pipeline" else 0, segs)
                    tot, agree, rows = tot + float(loss), agree + a, rows + r
                out[f"{name}_kl"] = tot / max(rows, 1)
                out[f"{name}_top1"] = agree / max(rows, 1)
        self.net.train()
        return out

    def run_key(self) -> Dict:
        """What a resumed run must share with the run that wrote the state: the PDM's config with the training
        settings, the text (its file name: the prompt count, tokens, seed and version), the draft vocabulary and the
        number of training windows."""
        key = json.loads(json.dumps(dict(config=dataclasses.asdict(self.cfg), settings=dataclasses.asdict(self.st))))
        key["training_windows"] = len(self.train)
        return key

    def save_state(self, path: Path, step: int, order: List[int], run_loss: float, run_agree: float,
                   history: List[Dict], elapsed: float) -> None:
        """Everything the next ``step`` needs, in one file replaced in one step: the fp32 weights, the optimizer's
        moments, the layout generator and the rest of the epoch's window order."""
        from ..files import write_atomic

        state = dict(key=self.run_key(), step=step, net=self.net.state_dict(), opt=self.opt.state_dict(),
                     rng=self.rng.getstate(), order=list(order), run_loss=run_loss, run_agree=run_agree,
                     history=history, elapsed=elapsed, device=self.device.type)
        write_atomic(path, lambda tmp: torch.save(state, tmp))

    def load_state(self, path: Path) -> Dict:
        """The state :meth:`save_state` wrote, loaded into this trainer; ValueError when it is unreadable or was
        written by a run with other settings, text or vocabulary (naming what differs)."""
        try:  # (on the CPU: load_state_dict moves the weights and the optimizer's moments to the trainer's device)
            state = torch.load(path, map_location="cpu", weights_only=True)
            key, step = state["key"], int(state["step"])
        except Exception as e:  # (a truncated or foreign file: torch raises several kinds)
            raise ValueError(f"resume: cannot read the training state {path} ({type(e).__name__}: {e})") from None
        diff = _run_differences(key, self.run_key()) if isinstance(key, dict) else ["everything"]
        if diff:
            raise ValueError(f"resume: the training state {path} was written by another run (it differs in "
                             f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}): resume with the same "
                             f"command, or train from step 1 without --resume")
        if not 0 < step <= self.st.steps:
            raise ValueError(f"resume: the training state {path} is at step {step}, outside 1..{self.st.steps}")
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.rng.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["rng"]))
        if state.get("device") != self.device.type:
            self.log(f"resume: the state was written on {state.get('device')}, training goes on on {self.device.type}: "
                     f"the weights will differ from those of a run never stopped (other kernels)")
        return state

    def run(self, out_dir: Optional[Path] = None, checkpoint_every: int = 100, progress: bool = True,
            eval_every: int = 0, resume: bool = False) -> Dict:
        """Train ``st.steps`` steps; every ``checkpoint_every`` steps a weight snapshot and the training state go to
        ``out_dir/checkpoint``. ``resume``: continue from that state when there is one (the same steps, layouts and
        numbers as a run that was never stopped), else start at step 0."""
        st = self.st
        if resume and out_dir is None:
            raise ValueError("resume: needs out_dir, the folder whose checkpoint holds the training state")
        history: List[Dict] = []
        order: List[int] = []
        run_loss, run_agree = 0.0, 0.0
        first, elapsed = 0, 0.0
        state_path = out_dir / "checkpoint" / STATE_FILE if out_dir is not None else None
        if resume and state_path is not None and state_path.exists():
            state = self.load_state(state_path)
            first, order, history = int(state["step"]), list(state["order"]), list(state["history"])
            run_loss, run_agree, elapsed = float(state["run_loss"]), float(state["run_agree"]), float(state["elapsed"])
            self.log(f"resume: continuing at step {first + 1} of {st.steps} from {state_path}")
        elif resume:
            self.log(f"resume: no training state in {state_path}, training from step 1")
        pb = None
        if progress:
            from tqdm import tqdm

            pb = tqdm(total=st.steps, initial=first, unit="step", file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter() - elapsed
        for step in range(first, st.steps):
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(step)
            self.opt.zero_grad(set_to_none=True)
            tot_rows, agree, loss_sum = 0, 0, 0.0
            parts = []
            for _ in range(st.batch):
                if not order:
                    order = list(range(len(self.train)))
                    self.rng.shuffle(order)
                w = self.train[order.pop()]
                parts.append((w, draw_layout(self.rng, st, w.anchors.shape[0], self.cfg.anchors, self.L)))
            total = 0
            for w, _ in parts:
                total += int(((w.next_ids[w.first_loss:] >= 0)).sum())
            for w, (mode, n, fill, segs) in parts:
                loss, a, r = self._loss(w, mode, n, fill, segs)
                (loss / max(total, 1)).backward()
                tot_rows, agree, loss_sum = tot_rows + r, agree + a, loss_sum + float(loss.detach())
            if not math.isfinite(loss_sum):  # before the step: the weights are still those of the step before
                raise TrainingDivergedError(f"training diverged at step {step + 1}: the loss is {loss_sum} (a lower "
                                            f"--lr than {st.lr:g}?); the PDM was not written")
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), st.clip)
            self.opt.step()
            run_loss = 0.9 * run_loss + 0.1 * loss_sum / max(tot_rows, 1)
            run_agree = 0.9 * run_agree + 0.1 * agree / max(tot_rows, 1)
            history.append(dict(step=step, loss=loss_sum / max(tot_rows, 1), top1=agree / max(tot_rows, 1),
                                lr=self.lr_at(step), t=time.perf_counter() - t0))
            if pb:
                pb.set_postfix(loss=f"{run_loss / (1 - 0.9 ** (step + 1)):.3f}",
                               top1=f"{run_agree / (1 - 0.9 ** (step + 1)):.3f}")
                pb.update(1)
            if eval_every and (step + 1) % eval_every == 0 and self.held:
                ev = self.evaluate(self.held[:8], {"pipe4": ("pipeline", 4, 4, 0)})
                history[-1].update(ev)
                self.log(f"step {step + 1}: held-out (8 windows) {ev}")
            if out_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                self.save(out_dir / "checkpoint")
                self.save_state(state_path, step + 1, order, run_loss, run_agree, history, time.perf_counter() - t0)
        if pb:
            pb.close()
        return dict(history=history, train_s=time.perf_counter() - t0)

    def save(self, path: Path) -> Path:
        cfg = dataclasses.replace(self.cfg, training={k: v for k, v in self.cfg.training.items() if k != "vocab_ids"})
        return save_pdm(str(path), cfg, self.net.hf_state_dict())


def select_vocab(corpus: Sequence[Dict], size: int, vocab_size: int, always: Sequence[int] = ()) -> List[int]:
    """The ``size`` most frequent generated tokens (ties by id), plus ``always`` (EOS ids), sorted."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in corpus:
        counts += torch.bincount(torch.tensor(s["output_ids"], dtype=torch.int64), minlength=vocab_size)
    keep = set(int(t) for t in always if 0 <= t < vocab_size)
    order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))
    for t in order:
        if len(keep) >= size:
            break
        keep.add(t)
    return sorted(keep)[:size]


def held_out_split(num_sequences: int, seed: int, fraction: float = 0.08,
                   families: Optional[Sequence[int]] = None) -> Tuple[List[int], List[int]]:
    """``(held_idx, train_idx)``, both sorted: the corpus sequences ``train_pdm`` keeps out of training (a seeded
    shuffle, ``max(1, int(fraction * num_sequences))`` of them) and the rest. With ``families``
    (:func:`~.data.corpus_families`) whole families are held out, in the seeded order of their first-round
    sequence, until that many sequences are: a second-round prompt, which hands back a first-round reply, is
    never on the other side of the split from that reply."""
    perm = list(range(num_sequences))
    random.Random(seed).shuffle(perm)
    n_held = max(1, int(fraction * num_sequences))
    if families is None:
        return sorted(perm[:n_held]), sorted(perm[n_held:])
    if len(families) != num_sequences:
        raise ValueError(f"families: expected {num_sequences} entries, got {len(families)}")
    members: Dict[int, List[int]] = {}
    for i, f in enumerate(families):
        members.setdefault(int(f), []).append(i)
    held: List[int] = []
    for i in perm:
        if len(held) >= n_held:
            break
        if i in members:  # a family's turn comes with its first-round sequence
            held += members.pop(i)
    held_set = set(held)
    return sorted(held), [i for i in range(num_sequences) if i not in held_set]


def train_pdm(ck, out: str, work: str, stages: int = 4, layers: int = 1, draft_vocab: int = 8192,
              anchors: Optional[Sequence[int]] = None, num_prompts: int = 1800, max_new_tokens: int = 192,
              intermediate: int = 0, settings: Optional[TrainSettings] = None, held_fraction: float = 0.08,
              progress: bool = True, log=print, anchor_norm: bool = False, device="cpu", shift: bool = True,
              gen_batch: int = 128, self_fraction: float = 0.0, packed: bool = True, resume: bool = False) -> Dict:
    """The whole pipeline of ``spdkernels train-pdm``: data (cached in ``work``), anchor states, training,
    held-out evaluation, and the PDM written to ``out`` with ``train_log.json`` and ``heldout.json``.
    Everything runs on ``device``: the text is generated (and its anchor states recorded) by the runtime's
    engine there, with ``gen_batch`` requests in flight; ``self_fraction`` of the first-round prompts are
    written by the target itself (:func:`~.data.self_prompts`); ``packed``: the target's ``LlamaModel`` option
    (CPU fp32: compact exact weights); ``resume``: continue from the training state of an interrupted run with the
    same settings (:meth:`Trainer.run`)."""
    from ..files import write_atomic, write_text_atomic
    from .data import (
        CorpusError,
        anchor_states,
        corpus_families,
        corpus_settings,
        corpus_version,
        generate_corpus,
        load_corpus,
        save_corpus,
    )

    def save_states(states, path):
        write_atomic(path, lambda tmp: torch.save(states, tmp))

    if not 0.0 <= self_fraction <= 1.0:
        raise ValueError(f"self_fraction: expected a fraction in [0, 1], got {self_fraction}")
    st = settings or TrainSettings()
    if stages not in st.stage_choices:  # the n the anchors are cut for is always among the layouts trained
        st = dataclasses.replace(st, stage_choices=tuple(st.stage_choices) + (stages,))
    target = LlamaModel(ck.config, ck.state_dict, device=device, packed=packed)
    L = target.num_layers
    anchors = list(anchors) if anchors is not None else stage_bounds_union(L, (stages,))
    if anchors[-1] != L:
        raise ValueError(f"anchors: the last anchor must be the target's last layer ({L}): the teacher reads it")
    if st.tower_init is not None and not 0 <= st.tower_init < L:  # (before the text is generated, not after)
        raise ValueError(f"tower_init: expected a layer of the target, 0..{L - 1}, got {st.tower_init}")
    cfg = PDMConfig(anchors=anchors, num_layers=layers, intermediate_size=intermediate or ck.config.intermediate_size,
                    draft_vocab=min(draft_vocab, ck.config.vocab_size), anchor_norm=anchor_norm, shift=shift,
                    target=target_fingerprint(ck.config, ck.state_dict))
    cfg.validate(ck.config)
    depth_types(anchors, L, stages)  # n fits the target
    work_p, out_p = Path(work), Path(out)
    t0 = time.perf_counter()
    version = corpus_version(cfg.target["weights_sha256"],
                             corpus_settings(ck.tokenizer, ck.config.eos_token_ids, self_fraction,
                                             packed=any(isinstance(w, PackedWeight) for w in target.matrices())))
    cpath = work_p / f"corpus-{num_prompts}-{max_new_tokens}-s{st.seed}-{version}.json"
    spath = cpath.with_suffix(f".anchors-{'-'.join(map(str, anchors))}.pt")
    states, corpus = None, None
    if cpath.exists():
        try:
            corpus, meta = load_corpus(cpath)
            log(f"data: {len(corpus)} sequences from {cpath} (generated in {meta.get('generate_s', 0):.0f} s)")
        except CorpusError as e:
            log(f"data: the cached text is unreadable, generating it again ({e})")
    if corpus is None:
        # the anchor states are recorded while generating (no second pass over the text)
        corpus, states = generate_corpus(target, ck.tokenizer, num_prompts, max_new_tokens, st.seed, log=log,
                                         anchors=anchors, batch=gen_batch, self_fraction=self_fraction)
        meta = dict(num_prompts=num_prompts, max_new_tokens=max_new_tokens, seed=st.seed, version=version,
                    self_fraction=self_fraction,
                    target_sha256=cfg.target["weights_sha256"],
                    generate_s=time.perf_counter() - t0, anchors_recorded=list(anchors) if states else None)
        save_corpus(cpath, corpus, meta)
        if states is not None:
            save_states(states, spath)
    t_data = time.perf_counter() - t0
    families = corpus_families(corpus)
    held_idx, train_idx = held_out_split(len(corpus), st.seed, held_fraction, families)
    if not any("round" in s for s in corpus):
        log("held-out split: this cached text does not record which reply a second-round prompt hands back, so "
            "the split cannot keep the two together (generate it again for a clean held-out split)")
    # the draft vocabulary from the training sequences only (the held-out ones are scored, not learnt from)
    vocab = select_vocab([corpus[i] for i in train_idx], cfg.draft_vocab, ck.config.vocab_size,
                         ck.config.eos_token_ids)
    cfg.draft_vocab = len(vocab)
    in_vocab = torch.zeros(ck.config.vocab_size, dtype=torch.bool)
    in_vocab[torch.tensor(vocab)] = True

    def covered(idx):  # the share of these sequences' generated tokens that are in the draft vocabulary
        ids = [torch.tensor(corpus[i]["output_ids"], dtype=torch.int64) for i in idx]
        ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        return float(in_vocab[ids].float().mean()) if len(ids) else 0.0

    coverage, held_coverage = covered(train_idx), covered(held_idx)
    log(f"draft vocabulary: {len(vocab)} tokens cover {coverage:.4f} of the training sequences' generated tokens "
        f"(chosen from them) and {held_coverage:.4f} of the held-out ones'")
    t1 = time.perf_counter()
    seqs = [list(s["prompt_ids"]) + list(s["output_ids"]) for s in corpus]
    if states is None and spath.exists():
        try:
            states = torch.load(spath)
        except Exception as e:  # a file torch cannot read back: recompute it below
            log(f"anchor states: the cached file is unreadable, computing them again ({type(e).__name__}: {e})")
            states = None
        if not isinstance(states, list) or not all(isinstance(h, torch.Tensor) for h in states):
            states = None
    if states is None or len(states) != len(seqs) or any(len(h) not in (len(s), len(s) - 1)
                                                         for h, s in zip(states, seqs)):
        states = anchor_states(target, seqs, anchors)
        save_states(states, spath)
        t_feat = time.perf_counter() - t1
        log(f"anchor states: {sum(len(s) for s in seqs)} tokens in {t_feat:.0f} s")
    else:
        t_feat = time.perf_counter() - t1
    train_seqs = [corpus[i] for i in train_idx]
    skip = shared_prefix(train_seqs) if st.prompt_rows else None
    train_w = make_windows([states[i] for i in train_idx], train_seqs, st.window, loss_from=skip)
    if skip is not None:
        log(f"prompt rows: the training windows learn from the prompts too, after their shared {skip}-token preamble")
    held_w = make_windows([states[i] for i in held_idx], [corpus[i] for i in held_idx], st.window)
    if not train_w or not held_w:
        raise ValueError(f"num_prompts (--prompts): {num_prompts} prompts gave {len(train_idx)} training and "
                         f"{len(held_idx)} held-out sequences ({len(train_w)} / {len(held_w)} windows with "
                         f"generated text): too few to train and evaluate on; use more prompts (the text is cached "
                         f"in {work_p}, nothing was written to {out_p})")
    drawn = sorted({x for x in st.stage_choices if x <= L} or {L})  # the n draw_layout can give on this target
    cfg.training = dict(settings=dataclasses.asdict(st), stages_trained_for=drawn,
                        num_prompts=num_prompts, max_new_tokens=max_new_tokens, sequences=len(corpus),
                        held_out_sequences=len(held_idx), tokens=sum(len(s) for s in seqs),
                        vocab_coverage_training=coverage, vocab_coverage_held_out=held_coverage,
                        corpus=cpath.name, vocab_ids=vocab)
    trainer = Trainer(target, cfg, train_w, held_w, st, log=log)
    res = trainer.run(work_p / "checkpoints", checkpoint_every=CHECKPOINT_EVERY, progress=progress, resume=resume)
    trainer.save(out_p)  # before the evaluation: its weights do not depend on it
    layouts = {f"pipe{n}": ("pipeline", n, n, 0) for n in (2, 4, 8) if n <= L}
    layouts.update({f"pipe{n}_fill1": ("pipeline", n, 1, 0) for n in (4,) if n <= L})
    layouts.update({f"proposer_chain{n}": ("proposer", n, 0, n) for n in (min(4, L),)})
    t2 = time.perf_counter()
    held = trainer.evaluate(held_w, layouts)
    log(f"held-out ({len(held_w)} windows, {len(held_idx)} sequences): " + json.dumps(held))
    # generate_s: the text's generation (with the anchor states when recorded then), also when this run
    # found it cached; total_s counts it once either way
    gen_s = float(meta.get("generate_s", 0.0))
    timing = dict(generate_s=gen_s, data_s=t_data, anchor_states_s=t_feat, train_s=res["train_s"],
                  eval_s=time.perf_counter() - t2,
                  total_s=time.perf_counter() - t0 + (gen_s if t_data < gen_s else 0.0))
    write_text_atomic(out_p / "heldout.json", json.dumps(dict(held_out=held, windows=len(held_w), timing=timing,
                                                         vocab_coverage_held_out=held_coverage), indent=1))
    write_text_atomic(out_p / "train_log.json", json.dumps(dict(history=res["history"], timing=timing), indent=0))
    log(f"wrote {out_p} ({timing['total_s'] / 60:.1f} min: data {t_data:.0f} s, anchor states {t_feat:.0f} s, "
        f"training {res['train_s']:.0f} s)")
    return dict(held_out=held, timing=timing)


def stage_bounds_union(L: int, stages: Sequence[int] = (4,)) -> List[int]:
    """Default anchors: the stage boundaries of the given pipeline depths (0 and L included)."""
    from .pdm import stage_bounds

    out = set()
    for n in stages:
        out.update(stage_bounds(L, n))
    return sorted(out)


def untrained_pdm(target: LlamaModel, anchors: Sequence[int], layers: int = 1, draft_vocab: int = 0,
                  intermediate: int = 0, seed: int = 0, noise: float = 0.0, anchor_norm: bool = False,
                  shift: bool = False):
    """A PDM at its initialisation (``noise`` > 0 perturbs every weight): the schedule's correctness does not
    depend on what the drafter predicts, so the tests run it with these."""
    from .pdm import PipelineDraftModule

    c = target.config
    V = draft_vocab or c.vocab_size
    cfg = PDMConfig(anchors=list(anchors), num_layers=layers, intermediate_size=intermediate or c.intermediate_size,
                    draft_vocab=V, anchor_norm=anchor_norm, shift=shift,
                    target=dict(architecture=c.name, num_layers=c.num_layers, hidden_size=c.hidden_size,
                                vocab_size=c.vocab_size))
    net = PDMNet(cfg, target, torch.arange(V), seed=seed)
    sd = net.hf_state_dict()
    if noise:
        g = torch.Generator().manual_seed(seed + 1)
        sd = {k: (v + noise * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v)
              for k, v in sd.items()}
    sd = {k: (v.to(target.dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return PipelineDraftModule(cfg, sd, target)
