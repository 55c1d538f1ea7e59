"""`vlm caption`: one caption per image, one model load for all of them."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from vlmcli.engines.llama import GenerationOptions, VlmEngine
from vlmcli.errors import VlmError
from vlmcli.images import DEFAULT_MAX_PIXELS
from vlmcli.tasks.ask import Answer, ask

DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."
DEFAULT_CAPTION_MAX_TOKENS = 96


def caption(
    engine: VlmEngine,
    paths: Iterable[str | os.PathLike[str]],
    prompt: str = DEFAULT_CAPTION_PROMPT,
    options: GenerationOptions | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[str, Answer | VlmError]]:
    """Caption each image in turn; a bad image yields its error and the others go on."""
    for path in paths:
        try:
            yield str(path), ask(engine, path, [prompt], options, max_pixels=max_pixels)[0]
        except VlmError as e:
            yield str(path), e
