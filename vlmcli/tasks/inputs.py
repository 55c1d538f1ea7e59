"""Batch inputs: files, folders, globs, `-` (paths on stdin) and --files-from, expanded to image paths.

Rules (the same for caption, ask, classify and embed):
- A path the user names (argument, stdin line, --files-from line) is taken as it is, image or not:
  if it is missing or not an image, its record says so. A folder named there is walked.
- Folders are walked recursively in sorted order; hidden files and folders (name starting with ".")
  are skipped unless include_hidden; a folder reached twice within one input (symlink loops, links
  to a sibling) is walked once. From folders and globs only images are taken: a file with an image
  extension (so a broken photo.jpg is reported, not silently dropped) or whose first bytes are an
  image's; for ask and caption (InputSpec.videos) videos too, by extension or content.
- A glob (`photos/**/*.jpg`; `**` matches any number of folders) is expanded in sorted walk order.
- --exclude GLOB drops files and prunes folders: a pattern without "/" matches the name, one with
  "/" matches the path as found (fnmatch rules, `*` also crosses "/").
- The same file given twice (same absolute path) is processed once, at its first place.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from vlmcli.errors import VlmError
from vlmcli.images import looks_like_image

# Extensions taken from folders even when the content does not sniff as an image, so that a
# corrupt or unsupported photo gives an error record instead of vanishing from the run.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".webp",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".mpo",
        ".heic",
        ".heif",
        ".avif",
    }
)

_GLOB_CHARS = set("*?[")


@dataclass
class InputSpec:
    """What the user asked for, before expansion."""

    paths: list[str] = field(default_factory=list)  # arguments: files, folders, globs, "-"
    files_from: list[str] = field(default_factory=list)  # files holding one path per line ("-" = stdin)
    null_separated: bool = False  # stdin / --files-from lists are NUL-separated (find -print0)
    exclude: list[str] = field(default_factory=list)
    include_hidden: bool = False
    videos: bool = False  # folders and globs yield videos too (SmolVLM2's ask and caption)


@dataclass
class Expansion:
    paths: list[str]
    warnings: list[str]
    batch_like: bool  # a folder, glob, stdin or --files-from list was given (not just named files)


def is_glob(spec: str) -> bool:
    return any(c in _GLOB_CHARS for c in spec)


def is_hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".", "..")


def wants_image(path: str, videos: bool = False) -> bool:
    """A file worth taking from a folder or glob: an image extension, or image content (with `videos`,
    a video's extension or content as well)."""
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS or looks_like_image(path):
        return True
    if not videos:
        return False
    from vlmcli.tasks.video import has_video_extension, is_video

    return has_video_extension(path) or is_video(path)


def read_path_list(stream: IO[str] | IO[bytes], null_separated: bool) -> list[str]:
    """Paths from a stream: one per line (blank lines and a trailing CR ignored) or NUL-separated.

    Bytes are decoded with the filesystem encoding and surrogateescape, so any file name
    round-trips; with -0 names may hold newlines.
    """
    return [p for _, p in numbered_path_list(stream, null_separated)]


def numbered_path_list(stream: IO[str] | IO[bytes], null_separated: bool) -> list[tuple[int, str]]:
    """read_path_list's paths with their line numbers (with NUL separators: their ordinals)."""
    data = stream.read()
    if isinstance(data, str):
        text = data
    else:
        text = os.fsdecode(data)
    if null_separated:
        return [(n, p) for n, p in enumerate(text.split("\0"), 1) if p]
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.endswith("\r"):
            line = line[:-1]
        if line.strip():
            out.append((n, line))
    return out


# A NUL byte cannot be in a file name, and a path holding one breaks every call that opens it (and the
# runner's several-files inputs are NUL-joined): in a newline-separated list it is shown as this symbol
# instead, so the line's record says no such file and the batch goes on.
NUL_SHOWN = "\u2400"


class _Excluder:
    def __init__(self, patterns: Iterable[str]):
        self.name_patterns = [p for p in patterns if "/" not in p]
        self.path_patterns = [p.rstrip("/") for p in patterns if "/" in p]

    def __call__(self, path: str) -> bool:
        name = os.path.basename(path.rstrip("/")) or path
        if any(fnmatch.fnmatchcase(name, p) for p in self.name_patterns):
            return True
        norm = os.path.normpath(path)
        return any(fnmatch.fnmatchcase(norm, p) or fnmatch.fnmatchcase(path, p) for p in self.path_patterns)


def _entries_once(folder: str, seen_dirs: set[tuple[int, int]]) -> list[os.DirEntry[str]]:
    """A folder's entries in name order; none if it cannot be read or was entered before (through
    another path or a symlink loop: folders are known by device and inode)."""
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            return []
        seen_dirs.add(key)
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def walk_folder(
    root: str, include_hidden: bool, excluded: _Excluder, seen_dirs: set[tuple[int, int]], videos: bool = False
) -> Iterator[str]:
    """Image files under root, depth first in sorted order, each folder once (symlink-loop safe)."""
    for entry in _entries_once(root, seen_dirs):
        if not include_hidden and is_hidden(entry.name):
            continue
        path = os.path.join(root, entry.name)
        if excluded(path):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            yield from walk_folder(path, include_hidden, excluded, seen_dirs, videos)
        else:
            try:
                if not entry.is_file(follow_symlinks=True):
                    # A dangling link named like an image is reported (its record says so);
                    # sockets, fifos and other links are not images.
                    if entry.is_symlink() and os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
                        yield path
                    continue
            except OSError:
                continue
            if wants_image(path, videos):
                yield path


def _match_parts(rel: list[str], pat: list[str]) -> bool:
    """Path parts against pattern parts: "**" matches any number of parts, others fnmatch one part."""
    if not pat:
        return not rel
    if pat[0] == "**":
        return any(_match_parts(rel[i:], pat[1:]) for i in range(len(rel) + 1))
    return bool(rel) and fnmatch.fnmatchcase(rel[0], pat[0]) and _match_parts(rel[1:], pat[1:])


def _could_match_below(rel: list[str], pat: list[str]) -> bool:
    """Whether some path under the folder `rel` can still match the pattern."""
    for i, part in enumerate(rel):
        if i >= len(pat):
            return False
        if pat[i] == "**":
            return True
        if not fnmatch.fnmatchcase(part, pat[i]):
            return False
    return len(pat) > len(rel)


def expand_glob(
    pattern: str, include_hidden: bool, excluded: _Excluder, seen_dirs: set[tuple[int, int]], videos: bool = False
) -> Iterator[str]:
    """Images matching a glob, in sorted walk order. The folders under the pattern's fixed prefix
    are walked like any folder (each once, so symlink loops end; hidden ones only if asked):
    Python's glob.glob follows a symlink loop 40 levels deep and returns the same file 40 times."""
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not is_glob(parts[fixed]):
        fixed += 1
    root_parts, pat = parts[:fixed], [p for p in parts[fixed:] if p]
    root = os.sep.join(root_parts) if root_parts else ""
    if root == "" and pattern.startswith(os.sep):
        root = os.sep

    def walk(folder: str, rel: list[str]) -> Iterator[str]:
        for entry in _entries_once(folder or ".", seen_dirs):
            if not include_hidden and is_hidden(entry.name):
                continue
            path = os.path.join(folder, entry.name) if folder else entry.name
            if excluded(path):
                continue
            sub = [*rel, entry.name]
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if _match_parts(sub, pat):
                    yield from walk_folder(path, include_hidden, excluded, seen_dirs, videos)
                elif _could_match_below(sub, pat):
                    yield from walk(path, sub)
            elif _match_parts(sub, pat):
                try:
                    if entry.is_file(follow_symlinks=True) and wants_image(path, videos):
                        yield path
                except OSError:
                    continue

    if root and not os.path.isdir(root):
        return
    yield from walk(root, [])


def expand_inputs(spec: InputSpec, stdin: IO[bytes] | IO[str] | None = None) -> Expansion:
    """Expand the user's inputs into an ordered, de-duplicated list of paths to process."""
    excluded = _Excluder(spec.exclude)
    seen_files: set[str] = set()
    out: list[str] = []
    warnings: list[str] = []
    batch_like = bool(spec.files_from)
    stdin_used = False

    def add(path: str) -> None:
        key = os.path.abspath(path)
        if key not in seen_files:
            seen_files.add(key)
            out.append(path)

    def named(path: str, from_list: bool) -> None:
        nonlocal batch_like
        if os.path.isdir(path):
            batch_like = True
            if excluded(path):
                return
            # Folders already walked are remembered per input (loops end there); files given twice
            # are dropped by add().
            for p in walk_folder(path, spec.include_hidden, excluded, set(), spec.videos):
                add(p)
        elif not from_list and is_glob(path) and not os.path.lexists(path):
            batch_like = True
            taken = 0
            for m in expand_glob(path, spec.include_hidden, excluded, set(), spec.videos):
                add(m)
                taken += 1
            if not taken:
                warnings.append(f"{path}: no images match this pattern")
        else:
            if not excluded(path):
                add(path)  # taken as named: a missing or broken file gets an error record

    def from_stream(stream: IO[bytes] | IO[str] | None, label: str) -> None:
        if stream is None:
            raise VlmError("no standard input to read paths from", label)
        for n, p in numbered_path_list(stream, spec.null_separated):
            if "\0" in p:
                p = p.replace("\0", NUL_SHOWN)
                where = "standard input" if label == "-" else label
                warnings.append(
                    f"{where} line {n}: the path holds a NUL byte (shown as {NUL_SHOWN}), which no file name can: "
                    "its record says no such file (a list of NUL-separated paths needs -0)"
                )
            named(p, from_list=True)

    for p in spec.paths:
        if p == "-":
            if stdin_used:
                continue
            stdin_used = True
            batch_like = True
            from_stream(stdin, "-")
        else:
            named(p, from_list=False)
    for f in spec.files_from:
        if f == "-":
            if stdin_used:
                continue
            stdin_used = True
            from_stream(stdin, "-")
            continue
        try:
            with open(f, "rb") as fh:
                from_stream(fh, f)
        except OSError as e:
            raise VlmError(f"cannot read the list of files ({e.strerror})", f) from None
    return Expansion(out, warnings, batch_like)
