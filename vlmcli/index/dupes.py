"""Near-duplicate images: groups of files whose vectors are at least `threshold` alike.

Recompressed, resized and lightly edited copies and burst shots sit very close in CLIP's space; the
same bytes under two names share one vector (score 1). Pairs come from an exact blockwise
comparison of every row with every other; groups are the connected pairs. Each group suggests a
keeper, the largest image (pixels, then bytes). Nothing here deletes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlmcli.index.db import FileRow, Vectors

DEFAULT_THRESHOLD = 0.95
_BLOCK = 2048  # rows compared at a time: a block x N score matrix in memory


@dataclass(frozen=True)
class Pair:
    a: int  # indices into the group's files
    b: int
    score: float


@dataclass
class DupeGroup:
    files: list[FileRow]
    sizes: list[tuple[int, int] | None]  # (width, height) of each file, None if unreadable
    pairs: list[Pair]
    keeper: int  # index into files

    def file_records(self) -> list[dict[str, object]]:
        return [
            {
                "path": f.path,
                "bytes": f.size,
                "width": s[0] if s else None,
                "height": s[1] if s else None,
                "keeper": i == self.keeper,
            }
            for i, (f, s) in enumerate(zip(self.files, self.sizes))
        ]

    def record(self, number: int) -> dict[str, object]:
        return {
            "group": number,
            "keeper": self.files[self.keeper].path,
            "files": self.file_records(),
            "pairs": [
                {"a": self.files[p.a].path, "b": self.files[p.b].path, "score": round(p.score, 6)} for p in self.pairs
            ],
        }


def similar_pairs(matrix: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Every (i, j, score) with i < j and score >= threshold, by an exact blockwise comparison."""
    out: list[tuple[int, int, float]] = []
    n = len(matrix)
    for start in range(0, n, _BLOCK):
        block = matrix[start : start + _BLOCK]
        scores = block @ matrix[start:].T  # only j >= start: each pair once
        rows, cols = np.nonzero(scores >= np.float32(threshold - 1e-6))  # float32 rounding: copies at 1
        for r, c in zip(rows.tolist(), cols.tolist()):
            i, j = start + r, start + c
            if i < j:
                out.append((i, j, float(scores[r, c])))
    return out


def _components(n: int, pairs: list[tuple[int, int, float]]) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in sorted({i for p in pairs for i in p[:2]}):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header (upright, as EXIF orientation shows it), None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _largest(files: list[FileRow], sizes: list[tuple[int, int] | None]) -> int:
    """The keeper: most pixels, then most bytes, then the first."""

    def size(k: int) -> tuple[int, int, int]:
        wh = sizes[k]
        return (wh[0] * wh[1] if wh else -1, files[k].size, -k)

    return max(range(len(files)), key=size)


def find_duplicates(
    vectors: Vectors,
    threshold: float = DEFAULT_THRESHOLD,
    size_of: Callable[[str], tuple[int, int] | None] = image_size,
) -> list[DupeGroup]:
    """Groups of near-duplicates, the largest groups first, then by their first path."""
    pairs = similar_pairs(vectors.matrix, threshold) if len(vectors) else []
    components = _components(len(vectors), pairs)
    group_of = {row: g for g, members in enumerate(components) for row in members}
    where = {row: k for members in components for k, row in enumerate(members)}
    pairs_of: list[list[Pair]] = [[] for _ in components]
    for i, j, s in pairs:
        pairs_of[group_of[i]].append(Pair(where[i], where[j], s))
    groups: list[DupeGroup] = []
    for members, inner in zip(components, pairs_of):
        files = [vectors.files[i] for i in members]
        sizes = [size_of(f.path) for f in files]
        inner.sort(key=lambda p: (-p.score, p.a, p.b))
        groups.append(DupeGroup(files, sizes, inner, _largest(files, sizes)))
    groups.sort(key=lambda g: (-len(g.files), g.files[0].path))
    return groups
