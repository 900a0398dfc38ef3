"""Tokenizer built with the ``tokenizers`` library from a GGUF file's vocabulary and merges (byte-level
BPE), or read from a Hugging Face ``tokenizer.json``; chat templates rendered with Jinja2."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# llama.cpp's names for the pre-tokenizer of a "gpt2"-model GGUF, mapped to what the original Hugging Face
# tokenizer does before its byte-level split. SmolLM splits every digit on its own.
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "qwen2", "deepseek-coder", "deepseek-llm"}
_STOP_TOKEN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


class Tokenizer:
    def __init__(self, tok, chat_template: Optional[str], bos_token: Optional[str], eos_token: Optional[str],
                 add_bos: bool, stop_token_ids: Sequence[int]):
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.stop_token_ids = sorted(set(stop_token_ids))

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        def get(key, default=None):
            return reader.fields.get(key, default)

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            from .weights import ModelLoadError

            raise ModelLoadError(f"tokenizer: GGUF tokenizer model {model!r} is not supported yet (only 'gpt2' "
                                 "byte-level BPE)")
        from .weights import ModelLoadError

        tokens: List[str] = list(get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ModelLoadError("tokenizer: the GGUF file has no tokenizer.ggml.tokens")
        types = list(get("tokenizer.ggml.token_type", [1] * len(tokens)))
        if len(types) != len(tokens):
            raise ModelLoadError(f"tokenizer: {len(types)} token types for {len(tokens)} tokens")
        raw_merges = get("tokenizer.ggml.merges")
        if not raw_merges:  # a byte-level BPE without merges would split every word into single bytes
            raise ModelLoadError("tokenizer: the GGUF file has no tokenizer.ggml.merges (a 'gpt2' BPE needs them)")
        if any(" " not in m for m in raw_merges):
            raise ModelLoadError("tokenizer: a tokenizer.ggml.merges entry is not two tokens separated by a space")
        merges = [tuple(m.split(" ", 1)) for m in raw_merges]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if get("tokenizer.ggml.pre") in _DIGIT_SPLITTING_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        # control (3) and user-defined (4) tokens are matched whole in the text, as special tokens
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, ty in enumerate(types) if ty in (3, 4)])
        bos_id, eos_id = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
        for name, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
            if v is not None and not 0 <= int(v) < len(tokens):
                raise ModelLoadError(f"tokenizer: tokenizer.ggml.{name} {v} is outside the {len(tokens)} tokens")
        stops = [i for i, t in enumerate(tokens) if t in _STOP_TOKEN_TEXTS and types[i] == 3]
        if eos_id is not None:
            stops.append(int(eos_id))
        return cls(tok, get("tokenizer.chat_template"), None if bos_id is None else tokens[bos_id],
                   None if eos_id is None else tokens[eos_id], bool(get("tokenizer.ggml.add_bos_token", False)),
                   stops)

    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        f = Path(folder) / "tokenizer.json"
        if not f.exists():
            from .weights import ModelLoadError

            raise ModelLoadError(f"tokenizer: no tokenizer.json in {folder}")
        tok = HFTokenizer.from_file(str(f))
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg: Dict = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

        def text(v):
            return v.get("content") if isinstance(v, dict) else v

        tmpl = cfg.get("chat_template")
        if tmpl is None and (Path(folder) / "chat_template.jinja").exists():
            tmpl = (Path(folder) / "chat_template.jinja").read_text()
        stops = [tok.token_to_id(t) for t in _STOP_TOKEN_TEXTS if tok.token_to_id(t) is not None]
        eos = text(cfg.get("eos_token"))
        if eos is not None and tok.token_to_id(eos) is not None:
            stops.append(tok.token_to_id(eos))
        return cls(tok, tmpl, text(cfg.get("bos_token")), eos, bool(cfg.get("add_bos_token", False)), stops)

    def save_hf_folder(self, folder: Path) -> None:
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg = {"chat_template": self.chat_template, "bos_token": self.bos_token, "eos_token": self.eos_token,
               "add_bos_token": self.add_bos}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))

    # -- use -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token is not None:
            ids = [self._tok.token_to_id(self.bos_token)] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the checkpoint's template (Jinja2, as Hugging Face does). Without a
        template, the user contents are joined as plain text."""
        if not self.chat_template:
            return "\n".join(m["content"] for m in messages)
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
