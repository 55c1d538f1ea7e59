"""`vlm ask`: questions about one image, answered by SmolVLM2."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vlmcli.engines.llama import EncodeProgress, Generation, GenerationOptions, TokenCallback, VlmEngine
from vlmcli.images import DEFAULT_MAX_PIXELS, load_image


@dataclass
class Answer:
    """One answer, with what produced it: the record `--json` prints."""

    path: str
    model: str
    mmproj: str
    generation: Generation

    def to_record(self) -> dict[str, Any]:
        g = self.generation
        return {
            "path": self.path,
            "model": self.model,
            "mmproj": self.mmproj,
            "prompt": g.prompt,
            "answer": g.text,
            "stop_reason": g.stop_reason,
            "detail": g.image.detail,
            "tiles": g.image.tiles,
            "image_size": [g.image.width, g.image.height],
            "tokens": {"prompt": g.prompt_tokens, "image": g.image.image_tokens, "generated": g.generated_tokens},
            "timings": g.timings.as_dict(),
        }


def ask(
    engine: VlmEngine,
    image_path: str | os.PathLike[str],
    prompts: list[str],
    options: GenerationOptions | None = None,
    on_token: TokenCallback | None = None,
    on_answer_start: Callable[[int], None] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_progress: EncodeProgress | None = None,
) -> list[Answer]:
    """Answer every prompt about one image; the image is decoded and encoded once."""
    image = load_image(image_path, max_pixels=max_pixels)
    answers = []
    gens = engine.ask(image, prompts, options, on_token, on_progress)
    for i in range(len(prompts)):
        if on_answer_start is not None:
            on_answer_start(i)
        g = next(gens)
        answers.append(Answer(str(image_path), str(engine.model_path), str(engine.mmproj_path), g))
    return answers


def model_label(engine: VlmEngine) -> str:
    return Path(engine.model_path).name
