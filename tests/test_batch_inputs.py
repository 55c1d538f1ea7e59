"""Batch inputs: files, folders, globs, stdin lists (newline and NUL), --files-from, --exclude, hidden files,
symlink loops."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.errors import VlmError
from vlmcli.tasks.inputs import InputSpec, expand_inputs, read_path_list


def _img(path: Path, fmt: str = "JPEG", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (np.random.default_rng(seed).random((12, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    _img(root / "b.jpg")
    _img(root / "a.png", "PNG")
    _img(root / "sub" / "c.jpg")
    _img(root / "sub" / "deeper" / "d.webp", "WEBP")
    _img(root / "no_extension", "PNG")  # taken by content
    (root / "broken.jpg").write_bytes(b"not really a jpeg")  # taken by extension -> error record later
    (root / "notes.txt").write_text("a caption sidecar, not an image")
    (root / "data.bin").write_bytes(os.urandom(64))
    _img(root / ".hidden.jpg")
    _img(root / ".cache" / "e.jpg")
    return root


def _rel(paths: list[str], root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def test_folder_is_recursive_sorted_images_only_and_skips_hidden(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree)]))
    assert _rel(exp.paths, tree) == [
        "a.png",
        "b.jpg",
        "broken.jpg",
        "no_extension",
        "sub/c.jpg",
        "sub/deeper/d.webp",
    ]
    assert exp.batch_like


def test_include_hidden(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree)], include_hidden=True))
    rel = _rel(exp.paths, tree)
    assert ".hidden.jpg" in rel and ".cache/e.jpg" in rel


def test_order_is_deterministic(tree: Path) -> None:
    a = expand_inputs(InputSpec([str(tree)])).paths
    b = expand_inputs(InputSpec([str(tree)])).paths
    assert a == b


def test_named_files_are_taken_as_given_and_deduplicated(tree: Path) -> None:
    named = [str(tree / "notes.txt"), str(tree / "missing.jpg"), str(tree / "b.jpg"), str(tree)]
    exp = expand_inputs(InputSpec(named))
    rel = _rel(exp.paths, tree)
    # A named non-image and a missing file stay (their records will say what is wrong);
    # b.jpg is not repeated when the folder brings it again.
    assert rel[:3] == ["notes.txt", "missing.jpg", "b.jpg"]
    assert rel.count("b.jpg") == 1
    assert "a.png" in rel


def test_single_named_file_is_not_batch_like(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree / "b.jpg")]))
    assert exp.paths == [str(tree / "b.jpg")] and not exp.batch_like


def test_glob_recursive_and_sorted(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree / "**" / "*.jpg")]))
    assert _rel(exp.paths, tree) == ["b.jpg", "broken.jpg", "sub/c.jpg"]
    assert exp.batch_like


def test_glob_without_match_warns(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree / "*.gif")]))
    assert exp.paths == [] and exp.warnings and "no images match" in exp.warnings[0]


def test_glob_matching_folders_walks_them(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree / "su*")]))
    assert _rel(exp.paths, tree) == ["sub/c.jpg", "sub/deeper/d.webp"]


def test_exclude_by_name_and_by_path(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree)], exclude=["*.png", "deeper"]))
    assert _rel(exp.paths, tree) == ["b.jpg", "broken.jpg", "no_extension", "sub/c.jpg"]
    exp = expand_inputs(InputSpec([str(tree)], exclude=[str(tree / "sub") + "/*"]))
    assert not any(p.startswith("sub") for p in _rel(exp.paths, tree))


def test_symlink_loops_are_safe(tree: Path) -> None:
    os.symlink(tree, tree / "sub" / "loop")  # sub/loop -> photos (a cycle)
    os.symlink(tree / "sub", tree / "again")  # a second way into sub
    exp = expand_inputs(InputSpec([str(tree)]))
    rel = _rel(exp.paths, tree)
    assert len(rel) == 6, rel  # every image once, no endless walk
    assert len({os.path.realpath(p) for p in exp.paths}) == len(rel)


def test_stdin_newline_list(tree: Path) -> None:
    data = f"{tree / 'b.jpg'}\n\n{tree / 'sub'}\r\n".encode()
    exp = expand_inputs(InputSpec(["-"]), stdin=io.BytesIO(data))
    assert _rel(exp.paths, tree) == ["b.jpg", "sub/c.jpg", "sub/deeper/d.webp"]
    assert exp.batch_like


def test_stdin_nul_list_with_spaces_and_newlines_in_names(tmp_path: Path) -> None:
    weird = [
        _img(tmp_path / "with space.jpg"),
        _img(tmp_path / "new\nline.jpg"),
        _img(tmp_path / "tab\tand ü.png", "PNG"),
    ]
    data = b"\0".join(os.fsencode(p) for p in weird) + b"\0"
    exp = expand_inputs(InputSpec(["-"], null_separated=True), stdin=io.BytesIO(data))
    assert exp.paths == [str(p) for p in weird]


def test_non_utf8_name_round_trips(tmp_path: Path) -> None:
    raw = os.fsencode(str(tmp_path)) + b"/bad\xff.jpg"
    with open(raw, "wb") as f:
        f.write(b"x")
    (paths,) = [read_path_list(io.BytesIO(raw + b"\n"), False)]
    assert os.fsencode(paths[0]) == raw


def test_files_from(tree: Path, tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tree / 'sub' / 'c.jpg'}\n{tree / 'a.png'}\n")
    exp = expand_inputs(InputSpec([], files_from=[str(lst)]))
    assert _rel(exp.paths, tree) == ["sub/c.jpg", "a.png"]
    with pytest.raises(VlmError, match="cannot read the list"):
        expand_inputs(InputSpec([], files_from=[str(tmp_path / "nope.txt")]))


def test_list_entries_are_not_globbed(tmp_path: Path) -> None:
    # A name from a list is a name, even with glob characters in it.
    p = _img(tmp_path / "star[1].jpg")
    _img(tmp_path / "star1.jpg")
    exp = expand_inputs(InputSpec(["-"]), stdin=io.BytesIO(os.fsencode(p) + b"\n"))
    assert exp.paths == [str(p)]


def test_glob_through_a_symlink_loop_takes_each_image_once(tmp_path: Path) -> None:
    root = tmp_path / "loop"
    _img(root / "a" / "x.jpg")
    os.symlink(root, root / "a" / "back")
    exp = expand_inputs(InputSpec([str(root / "**" / "*.jpg")]))
    assert exp.paths == [str(root / "a" / "x.jpg")]


def test_relative_glob_keeps_relative_paths(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    assert expand_inputs(InputSpec(["*.png"])).paths == ["a.png"]
    assert expand_inputs(InputSpec(["sub/**/*.webp"])).paths == ["sub/deeper/d.webp"]
    assert expand_inputs(InputSpec(["**/c.jpg"])).paths == ["sub/c.jpg"]


def test_a_glob_then_its_folder_takes_everything_once(tree: Path) -> None:
    exp = expand_inputs(InputSpec([str(tree / "*.png"), str(tree)]))
    rel = _rel(exp.paths, tree)
    assert rel[0] == "a.png" and sorted(rel) == sorted(set(rel)) and len(rel) == 6
