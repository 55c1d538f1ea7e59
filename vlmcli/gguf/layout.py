"""One tensor of a model's GGUF layout, as the converter writes it and the loaders check it."""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class GgufTensor:
    """`shapes` are in ggml order (innermost first): the first is what the converter writes, any others
    are layouts loaders also take (files by other converters). `source` is the Hugging Face checkpoint's
    name for the tensor (None where no checkpoint tensor maps to it one to one)."""

    name: str
    source: str | None
    shapes: tuple[Shape, ...]
    types: tuple[str, ...]
    required: bool = True  # whether a loader needs it in the file

    @property
    def shape(self) -> Shape:
        return self.shapes[0]

    @property
    def hf_shape(self) -> Shape:
        """The shape in the checkpoint (row-major, outermost first)."""
        return tuple(reversed(self.shapes[0]))
