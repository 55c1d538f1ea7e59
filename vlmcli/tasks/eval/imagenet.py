"""CLIP's ImageNet zero-shot prompt set, shipped as package data (vlmcli/data/, MIT licence: LICENSE-CLIP.txt).

imagenet_classes(): the 1000 class names of CLIP's "Prompt Engineering for ImageNet" notebook, in the
standard class-index order (the sorted WordNet ids of an ImageNet ImageFolder tree). As published,
two names repeat ("missile" at 657 and 744, "sunglasses" at 836 and 837); they are kept, so class
indices line up. imagenet_templates(): its 80 prompt templates.
"""

from __future__ import annotations

from pathlib import Path

from vlmcli.files import read_lines

DATA = Path(__file__).resolve().parents[2] / "data"


def imagenet_classes() -> list[str]:
    names = read_lines(DATA / "imagenet_classes.txt", "class-names")
    assert len(names) == 1000, len(names)
    return names


def imagenet_templates() -> list[str]:
    templates = read_lines(DATA / "imagenet_templates.txt", "templates")
    assert len(templates) == 80, len(templates)
    return templates
