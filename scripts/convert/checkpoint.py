"""Reading the non-weight files of a Hugging Face checkpoint folder: config, tokenizer, templates.

Everything raises ModelError naming the file that is missing or malformed, so `vlm convert`
reports "PATH: cause" instead of a KeyError deep inside a converter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcli.errors import ModelError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


def read_json(path: Path, *, required: bool = True) -> dict[str, Any] | None:
    """A JSON object from a file; ModelError naming it when missing (if required) or malformed."""
    if not path.is_file():
        if required:
            raise ModelError(f"missing {path.name} in the checkpoint folder", path)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"cannot read file ({e.strerror})", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"not valid JSON ({e})", path) from None
    if not isinstance(data, dict):
        raise ModelError("expected a JSON object", path)
    return data


def checkpoint_folder(checkpoint_dir: str | os.PathLike[str]) -> Path:
    p = Path(checkpoint_dir)
    if not p.exists():
        raise ModelError("no such checkpoint folder", p)
    if not p.is_dir():
        raise ModelError("not a folder (expected a Hugging Face checkpoint folder)", p)
    return p


def read_config(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    folder = checkpoint_folder(checkpoint_dir)
    config = read_json(folder / CONFIG_FILE)
    assert config is not None
    return config


def architecture(config: dict[str, Any], config_path: Path) -> str:
    arches = config.get("architectures")
    if not isinstance(arches, list) or not arches or not isinstance(arches[0], str):
        raise ModelError("config.json has no 'architectures' list", config_path)
    return arches[0]


def read_preprocessor_config(folder: Path) -> dict[str, Any]:
    """preprocessor_config.json merged with processor_config.json's image_processor, as llama.cpp does."""
    merged: dict[str, Any] = {}
    pre = read_json(folder / PREPROCESSOR_FILE, required=False)
    if pre is not None:
        merged.update(pre)
        if isinstance(pre.get("media_proc_cfg"), dict):
            merged.update(pre["media_proc_cfg"])
    proc = read_json(folder / PROCESSOR_FILE, required=False)
    if proc is not None:
        merged.update(proc)
        if isinstance(proc.get("image_processor"), dict):
            merged.update(proc["image_processor"])
    return merged


def read_chat_template(folder: Path) -> str | list[dict[str, str]] | None:
    """The chat template with the precedence llama.cpp's converter uses:
    tokenizer_config.json's chat_template, else chat_template.jinja, else chat_template.json."""
    tok_cfg = read_json(folder / TOKENIZER_CONFIG_FILE, required=False) or {}
    if isinstance(tok_cfg.get("chat_template"), (str, list)):
        return tok_cfg["chat_template"]
    jinja = folder / CHAT_TEMPLATE_JINJA
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    ct = read_json(folder / CHAT_TEMPLATE_JSON, required=False)
    if ct is not None and isinstance(ct.get("chat_template"), str):
        return ct["chat_template"]
    return None


@dataclass
class BpeVocab:
    """A Hugging Face byte-level BPE tokenizer as llama.cpp's converter lays it out."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    n_padded: int  # ids with no token in tokenizer.json, written as [PAD<id>]


def _looks_special(token: str) -> bool:
    # The heuristic llama.cpp's converter applies to added tokens not flagged special.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def read_bpe_vocab(folder: Path, vocab_size: int | None) -> BpeVocab:
    """tokens and token types for ids 0..vocab_size-1 from tokenizer.json (base vocab + added tokens)."""
    import gguf

    path = folder / TOKENIZER_FILE
    tok = read_json(path)
    assert tok is not None
    model = tok.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise ModelError("tokenizer.json has no model.vocab (expected a BPE tokenizer)", path)
    if model.get("type", "BPE") != "BPE":
        raise ModelError(f"tokenizer.json model type is {model.get('type')}, expected BPE", path)
    vocab: dict[str, int] = {}
    for token, tid in model["vocab"].items():
        if not isinstance(tid, int) or tid < 0:
            raise ModelError(f"tokenizer.json has a bad id for token {token!r}", path)
        vocab[token] = tid
    added: dict[str, dict[str, Any]] = {}
    for entry in tok.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and isinstance(entry.get("id"), int):
            added[entry["content"]] = entry
            vocab[entry["content"]] = entry["id"]  # added tokens override the base vocabulary
    if not vocab:
        raise ModelError("tokenizer.json has an empty vocabulary", path)
    n_vocab = vocab_size if vocab_size is not None else max(vocab.values()) + 1
    if max(vocab.values()) >= n_vocab:
        raise ModelError(f"tokenizer.json has token ids up to {max(vocab.values())}, beyond vocab_size {n_vocab}", path)

    by_id = {tid: token for token, tid in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    padded = 0
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            padded += 1
        elif token in added:
            if added[token].get("special") or _looks_special(token):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces, as llama.cpp does
                types.append(int(gguf.TokenType.USER_DEFINED))
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(int(gguf.TokenType.NORMAL))
    return BpeVocab(tokens=tokens, token_types=types, n_padded=padded)
