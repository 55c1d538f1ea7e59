"""A CLIP GGUF's hyper-parameters and tokenizer, read from its metadata (ClipConfig.from_gguf).

Files written by clip.cpp itself (its converter and quantizer) load too: a missing logit scale falls
back to trained CLIP's 100 and missing BPE merges to the CLIP merges vlm ships (only for a vocabulary
that is exactly CLIP's); each fallback is recorded in ClipConfig.notes for the front end to show.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcli.engines.clip_tokenizer import (
    BOS_TOKEN,
    DEFAULT_MERGES_FILE,
    EOS_TOKEN,
    read_merges_file,
    vocabulary_from_merges,
)
from vlmcli.errors import ModelError
from vlmcli.gguf.reader import quote

# CLIP's training clamps the logit scale at 100; files written by clip.cpp's converter do not store it.
TRAINED_LOGIT_SCALE = 100.0


@dataclass
class ClipConfig:
    name: str
    image_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    context_length: int
    vocab_size: int
    projection_dim: int
    logit_scale: float  # already exp()-ed
    use_gelu: bool  # True: exact (erf) gelu; False: quick_gelu
    text_width: int
    text_layers: int
    text_heads: int
    text_ffn: int
    text_eps: float
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    vision_eps: float
    tokens: list[str] = field(repr=False)
    merges: list[str] = field(repr=False)
    bos_id: int = 49406
    eos_id: int = 49407
    file_type: str | None = None
    # What the loader filled in for keys the file lacks (e.g. a file from clip.cpp's converter), one
    # sentence each, for the front end to show; the engine itself prints nothing.
    notes: list[str] = field(default_factory=list)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], path: Path, file_type: str | None = None) -> ClipConfig:
        def get(key: str, kind: type, default: Any = None) -> Any:
            value = metadata.get(key)
            if value is None:
                if default is not None:
                    return default
                raise ModelError(f"CLIP GGUF lacks {key}", path)
            try:
                if kind is tuple:
                    value = tuple(float(v) for v in value)
                    if len(value) != 3:
                        raise ValueError
                    return value
                if kind is list:
                    return list(value)
                return kind(value)
            except (TypeError, ValueError):
                raise ModelError(f"CLIP GGUF has a bad {key}: {quote(repr(value))}", path) from None

        notes: list[str] = []
        tokens = get("tokenizer.ggml.tokens", list, [])
        merges = get("tokenizer.ggml.merges", list, [])
        if tokens and not merges:  # clip.cpp's converter stores the vocabulary only
            merges = _shipped_merges_for(tokens, path)
            notes.append(
                "the file has no BPE merges (tokenizer.ggml.merges); its vocabulary is CLIP's, "
                "so the CLIP merges shipped with vlm are used"
            )
        if metadata.get("clip.logit_scale") is None:  # clip.cpp's converter leaves it out
            log_scale = math.log(TRAINED_LOGIT_SCALE)
            notes.append(
                f"the file has no logit scale (clip.logit_scale); using trained CLIP's "
                f"{TRAINED_LOGIT_SCALE:g} (classify scores depend on it, embeddings do not)"
            )
        else:
            log_scale = get("clip.logit_scale", float)
        cfg = cls(
            name=get("general.name", str, path.stem) or path.stem,
            image_size=get("clip.vision.image_size", int),
            patch_size=get("clip.vision.patch_size", int),
            image_mean=get("clip.vision.image_mean", tuple),
            image_std=get("clip.vision.image_std", tuple),
            context_length=get("clip.text.context_length", int),
            vocab_size=len(tokens),  # checked against the token embedding below
            projection_dim=get("clip.vision.projection_dim", int),
            logit_scale=_exp_logit_scale(log_scale, path),
            use_gelu=get("clip.use_gelu", bool, False),
            text_width=get("clip.text.embedding_length", int),
            text_layers=get("clip.text.block_count", int),
            text_heads=get("clip.text.attention.head_count", int),
            text_ffn=get("clip.text.feed_forward_length", int),
            text_eps=get("clip.text.attention.layer_norm_epsilon", float),
            vision_width=get("clip.vision.embedding_length", int),
            vision_layers=get("clip.vision.block_count", int),
            vision_heads=get("clip.vision.attention.head_count", int),
            vision_ffn=get("clip.vision.feed_forward_length", int),
            vision_eps=get("clip.vision.attention.layer_norm_epsilon", float),
            tokens=tokens,
            merges=merges,
            bos_id=get("tokenizer.ggml.bos_token_id", int, _token_id(tokens, BOS_TOKEN, 49406)),
            eos_id=get("tokenizer.ggml.eos_token_id", int, _token_id(tokens, EOS_TOKEN, 49407)),
            file_type=file_type,
            notes=notes,
        )
        text_proj = get("clip.text.projection_dim", int, cfg.projection_dim)
        cfg._validate(path, text_proj)
        return cfg

    def _validate(self, path: Path, text_projection_dim: int) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ModelError(f"inconsistent CLIP GGUF: {what}", path)

        positive = (
            "image_size",
            "patch_size",
            "context_length",
            "projection_dim",
            "text_width",
            "text_layers",
            "text_heads",
            "text_ffn",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "vision_ffn",
        )
        for key in positive:
            need(getattr(self, key) > 0, f"{key} = {getattr(self, key)}")
        need(self.image_size % self.patch_size == 0, "image_size is not a multiple of patch_size")
        need(self.text_width % self.text_heads == 0, "text width is not a multiple of the head count")
        need(self.vision_width % self.vision_heads == 0, "vision width is not a multiple of the head count")
        need(text_projection_dim == self.projection_dim, "text and vision projection sizes differ")
        need(self.text_eps > 0 and self.vision_eps > 0, "layer norm epsilon must be positive")
        need(all(s > 0 for s in self.image_std), "image_std must be positive")


@functools.lru_cache(maxsize=1)
def _shipped_clip_tokenizer() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(merges, the vocabulary they generate) of the CLIP merges file vlm ships."""
    merges = read_merges_file(DEFAULT_MERGES_FILE)
    return tuple(merges), tuple(vocabulary_from_merges(merges))


def _shipped_merges_for(tokens: list[str], path: Path) -> list[str]:
    """The shipped CLIP merges, for a file whose vocabulary is exactly CLIP's (same tokens, same ids)."""
    merges, vocab = _shipped_clip_tokenizer()
    if tuple(tokens) != vocab:
        if len(tokens) != len(vocab):
            why = f"{len(tokens)} tokens, CLIP has {len(vocab)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(tokens, vocab)) if a != b)
            why = f"token {i} is {tokens[i][:40]!r}, CLIP's is {vocab[i]!r}"
        raise ModelError(
            "CLIP GGUF has no BPE merges (tokenizer.ggml.merges) and its vocabulary is not "
            f"CLIP's ({why}), so its texts cannot be tokenized",
            path,
        )
    return list(merges)


def _token_id(tokens: list[str], token: str, default: int) -> int:
    """The id of a special token in the vocabulary, for files without tokenizer.ggml.bos/eos_token_id."""
    try:
        return tokens.index(token)
    except ValueError:
        return default


def _exp_logit_scale(log_scale: float, path: Path) -> float:
    # trained CLIPs store ln(100) ~ 4.6; refuse values whose exp() is meaningless or overflows
    if not math.isfinite(log_scale) or abs(log_scale) > 20:
        raise ModelError(f"CLIP GGUF has a bad clip.logit_scale: {log_scale!r}", path)
    return math.exp(log_scale)
