"""Hugging Face checkpoint -> GGUF converters (installed as the package `vlmcli.convert`).

`convert_checkpoint` picks the converter from config.json's `architectures`:
SmolVLM2 / Idefics3 -> model + mmproj GGUFs for llama.cpp; CLIP -> one two-tower CLIP GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlmcli.errors import ModelError

SMOLVLM_ARCHITECTURES = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
CLIP_ARCHITECTURES = ("CLIPModel",)


def checkpoint_architecture(checkpoint_dir: str | os.PathLike[str]) -> str:
    """config.json's first `architectures` entry, or ModelError naming the file."""
    from vlmcli.convert.checkpoint import architecture, checkpoint_folder, read_config

    folder = checkpoint_folder(checkpoint_dir)
    return architecture(read_config(folder), folder / "config.json")


def convert_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quant: str | None = None,
    *,
    mmproj_quant: str | None = None,
) -> list[Path]:
    """Convert a Hugging Face checkpoint folder to GGUF file(s) in out_dir; returns their paths.

    quant: the model's type (SmolVLM2: F16, Q8_0 (default), Q4_K_M, Q5_K_M; CLIP: F16 default).
    mmproj_quant: SmolVLM2's vision projector type (F16 (default) or Q8_0).
    """
    arch = checkpoint_architecture(checkpoint_dir)
    if arch in SMOLVLM_ARCHITECTURES:
        from vlmcli.convert.smolvlm2 import convert_smolvlm2

        result = convert_smolvlm2(checkpoint_dir, out_dir, quant=quant or "Q8_0", mmproj_quant=mmproj_quant or "F16")
        return [result.model, result.mmproj]
    if arch in CLIP_ARCHITECTURES:
        if mmproj_quant is not None:
            raise ModelError(
                "--mmproj-quant applies to SmolVLM2 checkpoints only, not CLIP", Path(checkpoint_dir) / "config.json"
            )
        from vlmcli.convert.clip import convert_clip  # written separately; imported only when needed

        return [convert_clip(checkpoint_dir, out_dir, quant=quant or "F16")]
    known = ", ".join(SMOLVLM_ARCHITECTURES + CLIP_ARCHITECTURES)
    raise ModelError(f"unsupported architecture {arch} (supported: {known})", Path(checkpoint_dir) / "config.json")
