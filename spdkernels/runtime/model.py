"""A minimal Llama-family forward (Llama, SmolLM, Qwen2): embedding, RMSNorm, rotary embeddings, GQA
attention through :func:`spdkernels.tree_attention` over a :class:`PagedKVCache`, SwiGLU MLP, tied or
untied LM head.

One forward pass serves prefill, plain decode and tree verification: a :class:`Batch` names, per request,
the query tokens (ragged), their positions, the cache slots their K/V go to and the tree mask. The layers
can be run in consecutive stages (``forward_layers(..., start, end, taps)``) that return the hidden states
at chosen layers, for pipelined runtimes and for early-exit drafting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from spdkernels import _cpp
from spdkernels import tree as tree_utils
from spdkernels.ops.tree_attention import tree_attention

from .kv_cache import PagedKVCache
from .linear import PackedWeight, linear, pack_exact
from .weights import LlamaConfig, ModelLoadError, StateDict, layer_shapes


@dataclass(frozen=True)
class Batch:
    """The query tokens of one forward pass, ragged over R requests. Frozen: the bounds below describe the
    tensors, so a batch with other tensors is a new batch (``build_batch``), not an edited one."""
    token_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]: rotary positions (depth in the tree for draft nodes)
    slot_mapping: torch.Tensor  # int64 [T]: flat cache slot of each token's K/V
    cu_q_lens: torch.Tensor  # int32 [R + 1]
    kv_lens: torch.Tensor  # int32 [R]: cache entries per request, the query tokens included
    block_table: torch.Tensor  # int32 [R, max_blocks]
    tree_mask: Optional[torch.Tensor] = None  # int32 [T, W]; None = causal chain
    # Host-side upper bounds of the query rows of one request and of ``kv_lens`` (None: unknown). Given,
    # ``tree_attention`` launches its GPU kernel without reading them back from the device: no host sync per
    # layer (two per layer otherwise, which serialise every launch of a forward). They must not be below the
    # tensors' values; with op validation on, the op checks that they are not.
    max_q_len: Optional[int] = None
    max_kv_len: Optional[int] = None


def sync_device(device) -> None:
    """Block until the work queued on ``device`` is done (a no-op on the CPU): timings read clocks after it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_batch(cache: PagedKVCache, rids: Sequence, starts: Sequence[int], positions: Sequence[Sequence[int]],
                tokens: Optional[Sequence[int]] = None, tree_parents: Optional[Sequence[Sequence[int]]] = None,
                device=None) -> Batch:
    """The :class:`Batch` of one forward pass, built from host lists and moved to ``device`` (default: the
    cache's) in one transfer per tensor: the runtime's paths (prefill, verification, drafting, SPD stages, the
    PDM) build their batches here, so they all land on the model's device. (The PDM proposer's trees build
    theirs by hand: one sequence per frontier node, whose block table mixes shared and private blocks.)

    Request ``rids[i]`` has ``len(positions[i])`` query rows; their K/V go to cache positions ``starts[i]``,
    ``starts[i] + 1``, ... (reserved here) and they attend to every cached position before ``starts[i]``;
    ``positions[i]`` are their rotary positions (a draft node's depth, not its slot, in a tree). ``tokens``:
    the flat query token ids (zeros when the caller feeds hidden states). ``tree_parents[i]``: the parent of
    each query row after the first, as an index among those rows minus one (-1 = the first row), which gives
    the tree mask; None = causal rows."""
    dev = torch.device(device) if device is not None else cache.k.device
    pos, slots, cu, kv = [], [], [0], []
    max_q = 0
    for rid, start, ps in zip(rids, starts, positions):
        ps = list(ps)
        max_q = max(max_q, len(ps))
        cache.reserve(rid, start + len(ps))
        pos += ps
        slots += cache.slots(rid, range(start, start + len(ps)))
        cu.append(cu[-1] + len(ps))
        kv.append(start + len(ps))
    mask = None
    if tree_parents is not None:
        flat = [p for ps in tree_parents for p in ps]
        cund = [0]
        for ps in tree_parents:
            cund.append(cund[-1] + len(ps))
        if any(len(ps) + 1 != b - a for ps, a, b in zip(tree_parents, cu, cu[1:])):
            raise ValueError("tree_parents: expected one parent per query row after the first, per request")
        mask = tree_utils.build_tree_mask(torch.tensor(flat, dtype=torch.int32, device=dev),
                                          torch.tensor(cund, dtype=torch.int32, device=dev),
                                          max_q_len=max(max_q, 1))
    return Batch(torch.tensor(list(tokens) if tokens is not None else [0] * len(pos), dtype=torch.int64, device=dev),
                 torch.tensor(pos, dtype=torch.int64, device=dev), torch.tensor(slots, dtype=torch.int64, device=dev),
                 torch.tensor(cu, dtype=torch.int32, device=dev), torch.tensor(kv, dtype=torch.int32, device=dev),
                 cache.block_table(list(rids), device=dev), mask,
                 max_q_len=max_q, max_kv_len=max(kv, default=0))


class _Layer:
    __slots__ = ("ln1", "ln2", "w_qkv", "b_qkv", "w_o", "w_gate_up", "w_down")
    MATRICES = ("w_qkv", "w_o", "w_gate_up", "w_down")
    MATRIX_PARTS = {"w_qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                    "w_o": ("self_attn.o_proj.weight",),
                    "w_gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                    "w_down": ("mlp.down_proj.weight",)}  # each matrix: the state dict's tensors, rows in order


def _one_pass(*ts: torch.Tensor) -> bool:
    """Whether the C++ one-pass RMSNorm / rotary embedding (csrc/norm_rope.cpp) can stand in for the torch ops:
    fp32 CPU tensors, nothing to differentiate, the extension loaded."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and _cpp.load())


def _layer_one_pass(h: torch.Tensor, L, cos: torch.Tensor) -> bool:
    """:func:`_one_pass` for a decoder layer, once per layer: fp32 CPU activations, norms and tables, and no gradient
    to flow through the norms or the rotary embedding (from ``h``, the norms, or the weights that make q, k and the
    second norm's input). The layer's tensors share one dtype and device; the C++ ops check theirs anyway."""
    if not (h.dtype == torch.float32 and h.device.type == "cpu" and L.ln1.dtype == torch.float32
            and cos.dtype == torch.float32 and _cpp.load()):
        return False
    return not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                for t in (h, L.ln1, L.ln2, L.w_qkv, L.b_qkv, L.w_o)))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, one_pass: Optional[bool] = None) -> torch.Tensor:
    """Rotary embedding (Hugging Face's half-split layout) of ``x: [T, H, D]`` (``cos``/``sin``: ``[T, 1, D]``).
    On CPU in fp32, one C++ pass equal to the torch ops below bit for bit (``one_pass``: the caller's
    :func:`_one_pass` of these tensors, to skip the check)."""
    if one_pass is None:
        one_pass = _one_pass(x, cos, sin) and cos.dim() == 3 and cos.shape == sin.shape
    if one_pass:
        return torch.ops.spdkernels._cpu_rotary.default(x, cos, sin)
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, one_pass: Optional[bool] = None) -> torch.Tensor:
    """RMSNorm of the rows of ``x: [T, hidden]`` times ``w``. On CPU in fp32, one C++ pass (the sum of squares in
    double: within an ulp or so of torch's rms_norm, each row independent of the others)."""
    if one_pass is None:
        one_pass = x.dim() == 2 and _one_pass(x, w)
    if one_pass:
        return torch.ops.spdkernels._cpu_rms_norm.default(x, w, eps)
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def decoder_layer(h: torch.Tensor, L, c: LlamaConfig, cos: torch.Tensor, sin: torch.Tensor,
                  attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One pre-norm Llama decoder layer on ``h: [T, hidden]``: RMSNorm, fused QKV, rotary (``cos``/``sin``:
    ``[T, 1, D]``), ``attend(q [T', Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T', Hq, D]``, output projection,
    RMSNorm, SwiGLU. ``rows`` (optional): compute the output of these rows only (``T' = len(rows)``; every
    row still gives its K/V), as the last layer of a model whose other rows' outputs are not needed.
    ``L`` holds ``ln1, ln2, w_qkv, b_qkv, w_o, w_gate_up, w_down`` (tensors or parameters). The target's
    forward attends with ``tree_attention`` over the paged cache; the SPD draft module reuses this function
    (the same attention at inference, a dense structural mask in training)."""
    T = h.shape[0]
    Hq, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    eps = c.rms_norm_eps
    fast = _layer_one_pass(h, L, cos)  # the C++ norm and rotary passes (no autograd kernel)
    x = rms_norm(h, L.ln1, eps, fast)
    if rows is None:
        qkv = linear(x, L.w_qkv, L.b_qkv)
        q = rotate(qkv[:, :Hq * D].view(T, Hq, D), cos, sin, fast)
        kv = qkv[:, Hq * D:]
    else:
        wq, wkv = L.w_qkv[:Hq * D], L.w_qkv[Hq * D:]
        bq, bkv = (None, None) if L.b_qkv is None else (L.b_qkv[:Hq * D], L.b_qkv[Hq * D:])
        q = rotate(linear(x[rows], wq, bq).view(len(rows), Hq, D), cos[rows], sin[rows], fast)
        kv = linear(x, wkv, bkv)
        h = h[rows]
    k = rotate(kv[:, :Hkv * D].view(T, Hkv, D), cos, sin, fast)
    v = kv[:, Hkv * D:].reshape(T, Hkv, D)
    a = attend(q, k, v)
    h = h + linear(a.reshape(q.shape[0], Hq * D), L.w_o)
    gu = linear(rms_norm(h, L.ln2, eps, fast), L.w_gate_up)
    g, u = gu.split(L.w_down.shape[1], dim=-1)
    return h + linear(F.silu(g) * u, L.w_down)


def rope_tables(c: LlamaConfig, dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_position, head_dim]``, computed as Hugging Face does (fp32 inverse
    frequencies), then cast."""
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
    pos = torch.arange(c.max_position, dtype=torch.float32)
    emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


class LlamaModel:
    """Inference-only weights and forward. ``state_dict`` uses Hugging Face names and layouts."""

    def __init__(self, config: LlamaConfig, state_dict: Dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device="cpu", layers: Optional[Tuple[int, int]] = None, head: bool = True, packed: bool = True):
        """``layers=(start, end)`` loads only decoder layers ``start .. end - 1`` (a pipeline stage: the
        state dict needs only those); ``head=False`` skips the embedding, final norm and LM head.
        ``packed`` (CPU fp32 with the C++ extension only): hold each matrix that a compact format reproduces
        exactly in that format (:func:`~spdkernels.runtime.linear.pack_exact`: a GGUF checkpoint's Q4_1 / Q8_0
        blocks, fp16 values), which the skinny GEMM widens block by block: the same outputs bit for bit, 2-6x
        fewer weight bytes per decoding step. ``lm_head`` and ``embed`` stay fp32 tensors (for indexing); the
        forward's head product reads ``head_weight``."""
        self.config = c = config
        self.dtype, self.device = dtype, torch.device(device)
        start, end = (0, c.num_layers) if layers is None else layers
        if not 0 <= start <= end <= c.num_layers:
            raise ValueError(f"layers: expected 0 <= start <= end <= {c.num_layers}, got {layers}")
        self.layer_start, self.layer_end = start, end

        def get(name, shape):
            if name not in state_dict:
                raise ModelLoadError(f"model: checkpoint has no tensor {name}")
            t = state_dict[name]
            if tuple(t.shape) != tuple(shape):
                raise ModelLoadError(f"model: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            return t.to(device=self.device, dtype=dtype).contiguous()

        self.embed = self.norm = self.lm_head = None
        if head:
            self.embed = get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
            self.norm = get("model.norm.weight", (c.hidden_size,))
            self.lm_head = self.embed if c.tie_word_embeddings else get("lm_head.weight",
                                                                        (c.vocab_size, c.hidden_size))
        # (packed weights need the C++ skinny GEMM: without the extension every product would widen the whole
        # matrix first, 2.8x the time of fp32 weights)
        self.packed = packed and self.device.type == "cpu" and dtype == torch.float32 and _cpp.load()
        blocks = state_dict.packed_form if self.packed and isinstance(state_dict, StateDict) else None

        def matrix(names, tensors):
            """The rows of ``tensors`` (the state dict's ``names``) one after the other: packed, where asked, from
            the checkpoint's own blocks when every part has them in one format, else by pack_exact."""
            parts = [blocks(n) for n in names] if blocks is not None else [None]
            if None not in parts:
                pw = PackedWeight.cat(parts)  # (None for parts of two formats)
                if pw is not None:
                    return pw
            w = tensors[0] if len(tensors) == 1 else torch.cat(tensors).contiguous()
            return pack_exact(w) if self.packed else w

        shapes = dict(layer_shapes(c))
        self.layers: List[_Layer] = []
        for i in range(start, end):
            names = {n: f"model.layers.{i}.{n}" for n in shapes}
            w = {n: get(names[n], s) for n, s in shapes.items()}
            L = _Layer()
            L.ln1, L.ln2 = w["input_layernorm.weight"], w["post_attention_layernorm.weight"]
            # q, k, v as one matmul; gate and up as one matmul
            for attr, parts in _Layer.MATRIX_PARTS.items():
                setattr(L, attr, matrix([names[n] for n in parts], [w[n] for n in parts]))
            L.b_qkv = (torch.cat([w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"]])
                       if c.attention_bias else None)
            self.layers.append(L)
        self.head_weight = self.lm_head
        if self.packed and self.lm_head is not None:
            head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
            self.head_weight = matrix([head_name], [self.lm_head])
        self._cos, self._sin = rope_tables(c, dtype, self.device)
        self.scale = c.head_dim ** -0.5

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def matrices(self) -> List:
        """Every weight matrix a forward multiplies by (tensors or packed): the layers', then the head's."""
        out = [getattr(L, n) for L in self.layers for n in _Layer.MATRICES]
        return out + ([self.head_weight] if self.head_weight is not None else [])

    def new_cache(self, num_blocks: int, block_size: int = 16, layers: Optional[Tuple[int, int]] = None,
                  scrub: bool = False) -> PagedKVCache:
        """A paged cache for layers ``layers = (start, end)`` (default: the layers this model holds)."""
        c = self.config
        start, end = layers if layers is not None else (self.layer_start, self.layer_end)
        return PagedKVCache(end - start, c.num_kv_heads, c.head_dim, num_blocks, block_size,
                            self.dtype, self.device, scrub=scrub, first_layer=start)

    # -- pieces ---------------------------------------------------------------------------------------
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.config.rms_norm_eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[T, hidden] -> [T, V]``."""
        return linear(self._rms(h, self.norm), self.head_weight)

    def forward_layers(self, h: torch.Tensor, batch: Batch, cache: PagedKVCache, start: int = 0,
                       end: Optional[int] = None, taps: Iterable[int] = ()
                       ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """Run layers ``start .. end - 1`` on hidden states ``h: [T, hidden]``, writing each layer's K/V of
        the query tokens into ``cache`` (cache layer ``i`` for model layer ``i``) before attending.
        Returns the output hidden states and ``{i: h after layer i}`` for ``i`` in ``taps``."""
        c = self.config
        end = c.num_layers if end is None else end
        if not self.layer_start <= start <= end <= self.layer_end:
            raise ValueError(f"start/end: layers {start}..{end - 1} requested, this model holds layers "
                             f"{self.layer_start}..{self.layer_end - 1}")
        taps = set(taps)
        cos = self._cos[batch.positions][:, None, :]
        sin = self._sin[batch.positions][:, None, :]
        tapped: Dict[int, torch.Tensor] = {}
        for i in range(start, end):
            def attend(q, k, v, i=i):
                cache.write(i, batch.slot_mapping, k, v)
                return tree_attention(q, cache.layer_k(i), cache.layer_v(i), batch.block_table, batch.kv_lens,
                                      batch.cu_q_lens, batch.tree_mask, self.scale, max_q_len=batch.max_q_len,
                                      max_kv_len=batch.max_kv_len)
            h = decoder_layer(h, self.layers[i - self.layer_start], c, cos, sin, attend)
            if i in taps:
                tapped[i] = h
        return h, tapped

    def forward(self, batch: Batch, cache: PagedKVCache, logit_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of the query tokens (or of the rows ``logit_rows`` only): ``[T, V]`` in the model dtype."""
        h, _ = self.forward_layers(self.embed_tokens(batch.token_ids), batch, cache)
        if logit_rows is not None:
            h = h[logit_rows]
        return self.logits(h)

    def stages(self, n: int) -> List[Tuple[int, int]]:
        """Split the layers into ``n`` consecutive stages of near-equal size: ``[(start, end), ...]``."""
        if not 1 <= n <= self.config.num_layers:
            raise ValueError(f"n: expected 1 <= n <= {self.config.num_layers} stages, got {n}")
        bounds = [round(i * self.config.num_layers / n) for i in range(n + 1)]
        return list(zip(bounds[:-1], bounds[1:]))


def random_config(vocab_size: int = 97, hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4,
                  num_kv_heads: int = 2, intermediate_size: int = 96, max_position: int = 512,
                  attention_bias: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=hidden_size // num_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position=max_position, tie_word_embeddings=False, attention_bias=attention_bias,
                       eos_token_ids=[])


def random_state_dict(c: LlamaConfig, seed: int = 0, std: float = 0.3) -> Dict[str, torch.Tensor]:
    """Random weights for a tiny model (tests): large enough that the next-token distributions are far
    from uniform, so greedy decoding is not dominated by near-ties."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(c.vocab_size, c.hidden_size, generator=g, dtype=torch.float64),
          "model.norm.weight": 1 + 0.1 * torch.randn(c.hidden_size, generator=g, dtype=torch.float64),
          "lm_head.weight": torch.randn(c.vocab_size, c.hidden_size, generator=g, dtype=torch.float64) * std}
    for i in range(c.num_layers):
        for name, shape in layer_shapes(c):
            if name.endswith("layernorm.weight"):
                t = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
            else:
                t = torch.randn(shape, generator=g, dtype=torch.float64) * (std / shape[-1] ** 0.5 * 3)
            sd[f"model.layers.{i}.{name}"] = t
    return sd


@torch.inference_mode()
def prefill_logits(model: LlamaModel, ids: Sequence[int], rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Logits of a single sequence run from scratch in a fresh cache (rows ``rows`` only, or all):
    the oracle the tests and the demo's near-tie check compare against."""
    T = len(ids)
    cache = model.new_cache(-(-T // 16), 16)
    cache.add(0)
    batch = build_batch(cache, [0], [0], [range(T)], list(ids))
    return model.forward(batch, cache, None if rows is None else torch.tensor(list(rows), device=model.device))


def greedy_reference(model: LlamaModel, prompt: Sequence[int], n: int) -> List[int]:
    """Plain greedy decoding without a cache: the whole sequence re-run each step (an oracle for tests)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(prefill_logits(model, seq, [len(seq) - 1])[0].argmax()))
    return seq[len(prompt):]
