"""Fuzzing vlmcli's own inputs (issue 11): no model file, image, text or option may crash the process
or exhaust the machine.

A seeded corpus (tests/fuzzing.py) of mutated GGUF metadata (every numeric key of each kind of file:
language model, vision projector, two-tower CLIP), tensor infos, images and texts runs in a child
process under RLIMIT_AS, calling the engines as the tasks do. Every input must end accepted or
refused with one line naming the file (or the cause); a signal, an abort, a hang or a traceback
fails the test. A few cases then go through the real `vlm` CLI under the same limit.
benchmarks/fuzz_campaign.py runs the same machinery at scale.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import fuzz_kinds as fk
import fuzzing as fz
import pytest

SEED = 11
RLIMIT_AS = fz.DEFAULT_RLIMIT_AS


@pytest.fixture(scope="module")
def good(smolvlm2_gguf, clip_gguf, tmp_path_factory) -> fz.Models:
    d = tmp_path_factory.mktemp("fuzz-good")
    image = d / "small.png"
    image.write_bytes(fz.png_bytes(64, 48))
    return fz.Models(str(smolvlm2_gguf.model), str(smolvlm2_gguf.mmproj), str(clip_gguf), str(image))


def _files(good: fz.Models) -> dict[str, Path]:
    return {"llm": Path(good.llm), "mmproj": Path(good.mmproj), "clip": Path(good.clip)}


# The cases the issue names: (kind, key, value, what the refusal must mention besides file and key).
ISSUE_CASES = [
    ("mmproj", "clip.vision.patch_size", 7, "7"),
    ("mmproj", "clip.vision.patch_size", 0, "0"),
    ("mmproj", "clip.vision.image_size", 0, "0"),
    ("mmproj", "clip.vision.attention.head_count", 0, "0"),
    ("mmproj", "clip.vision.attention.head_count", 5, "5"),
    ("mmproj", "clip.vision.projector.scale_factor", 1000, "1000"),
    ("mmproj", "clip.vision.attention.layer_norm_epsilon", float("nan"), "nan"),
    ("llm", "llama.block_count", 0, "0"),
    ("llm", "llama.block_count", 1000, "1000"),
    ("llm", "llama.attention.layer_norm_rms_epsilon", float("nan"), "nan"),
    ("llm", "llama.attention.head_count_kv", 0, "0"),
    ("llm", "tokenizer.chat_template", "{% for message in messages %}{{ message['role'] }", "syntax error"),
    ("clip", "tokenizer.ggml.bos_token_id", 10**9, "1000000000"),
    ("clip", "clip.vision.attention.layer_norm_epsilon", float("nan"), "nan"),
]


# Issue 36's kinds, each through the command line: a few seeded mutations, and the cases the first
# campaign over them found (each a traceback before).
NEW_KIND_CASES = [
    ("grammar", "root ::= [z-a]", "matches no character"),
    ("grammar", "root ::= []", "matches no character"),
    ("grammar", "root ::= [\\U00110000]", "not a Unicode code point"),
    ("schema", "[" * 100_000, "not JSON"),
    ("schema", '{"type": "string", "minLength": 1000000000}', "outside 0..4096"),
    ("schema", '{"enum": [' + ", ".join(map(str, range(5000))) + "]}", "5,000 alternatives"),
    ("schema", fk.nested_schema(100, "object"), "nested too deeply"),
    ("grammar", "root ::= " + " | ".join(f'"w{i}"' for i in range(5000)), "more than 4,096 alternatives"),
    ("schema", '{"const": "' + "x" * 100_000 + '"}', "a string of 100,000 characters"),
    ("schema", '{"type": "string", "maxLength": 4096}', "4096 optional items nest deeper than llama.cpp"),
]


@pytest.fixture(scope="module")
def new_kinds(good: fz.Models, tmp_path_factory) -> list[fz.Job]:
    d = tmp_path_factory.mktemp("fuzz-new")
    rng = random.Random(SEED)
    db, images = fk.build_index(good, d / "fixtures")
    videos = fk.video_seeds(("plain", "no-frames", "audio-only"))
    seeds = [Path(good.image).read_bytes()]
    jobs = []
    for kind in fk.KINDS:
        out = d / kind
        out.mkdir()
        if kind == "index":
            jobs += fk.index_jobs(db, images, good, rng, 2, out)
        elif kind == "query":
            jobs += fk.query_jobs(db, images, good, rng, 2, out)
        elif kind == "video":
            jobs += fk.video_jobs(good, videos, rng, 1, out)
        elif kind == "multi":
            jobs += fk.multi_jobs(good, seeds, videos["plain"], rng, 1, out)
        else:
            jobs += fk.structure_jobs(kind, good, rng, 1, out, limit=100)  # the suite's sizes: seconds, not minutes
    image = d / "case.png"
    image.write_bytes(fz.png_bytes(16, 12))
    for i, (kind, text, _) in enumerate(NEW_KIND_CASES):
        path = d / f"case-{i}.txt"
        path.write_text(text)
        flag = "--grammar" if kind == "grammar" else "--json-schema"
        args = ["ask", str(image), "q", "--model", good.llm, "--mmproj", good.mmproj, flag, str(path)]
        jobs.append(fz.Job(kind, f"case {i}", str(path), args=args))
    return jobs


def test_new_input_kinds_through_the_command_line(new_kinds: list[fz.Job], good: fz.Models) -> None:
    results, _ = fz.run_jobs(new_kinds, good, rlimit_as=RLIMIT_AS)
    _check(results)
    assert {r.job.kind for r in results} == set(fk.KINDS)
    cases = results[-len(NEW_KIND_CASES) :]
    for r, (_, _, needle) in zip(cases, NEW_KIND_CASES):
        assert r.outcome == "refused" and needle in r.message, r.message


@pytest.fixture(scope="module")
def corpus(good: fz.Models, tmp_path_factory) -> dict[str, list[fz.Job]]:
    """The seeded jobs, by group; the mutated files are written once for the module."""
    rng = random.Random(SEED)
    d = tmp_path_factory.mktemp("fuzz")
    groups: dict[str, list[fz.Job]] = {"issue": [], "keys": [], "tensors": [], "images": [], "texts": []}

    def add(group: str, kind: str, m: fz.Mutation, name: str) -> None:
        path = d / f"{name}-{files[kind].name}"  # the original name inside, so messages can be checked
        path.write_bytes(m.data)
        groups[group].append(fz.Job(kind, f"{m.target} {m.op} {m.detail}", str(path)))

    files = _files(good)
    layouts = {kind: fz.parse_gguf(p.read_bytes()) for kind, p in files.items()}
    for i, (kind, key, value, _) in enumerate(ISSUE_CASES):
        add("issue", kind, fz.set_value(layouts[kind], key, value, kind), f"issue{i}")
    for kind, layout in layouts.items():
        keys = fz.numeric_keys(layout)
        assert len(keys) >= 15, kind  # the fixtures carry the real key sets
        for i, m in enumerate(fz.metadata_mutations(layout, kind, rng)):
            add("keys", kind, m, f"key{i}")
        for i, m in enumerate(fz.tensor_mutations(layout, kind, rng, 4)):
            add("tensors", kind, m, f"tensor{i}")
    seeds = [
        Path(good.image).read_bytes(),
        (Path(__file__).parents[1] / "vlmcli" / "data" / "chelsea.jpg").read_bytes(),
    ]
    shapes = [(1, 20000), (20000, 1), (1, 1)]
    for w, h in shapes:
        p = d / f"shape-{w}x{h}.png"
        p.write_bytes(fz.png_bytes(w, h))
        groups["images"].append(fz.Job("image", f"{w}x{h}", str(p)))
    for i, (desc, data) in enumerate(fz.image_mutations(seeds, rng, 10)):
        p = d / f"image{i}.img"
        p.write_bytes(data)
        groups["images"].append(fz.Job("image", desc, str(p)))
    texts = ["a" * 100_000, "a" + " " * 100_000 + "b", "caf\udce9", *fz.text_mutations(rng, 8)]
    groups["texts"] = [fz.Job("text", repr(t[:40]), text=t) for t in texts]
    return groups


@pytest.fixture(scope="module")
def outcome(corpus: dict[str, list[fz.Job]], good: fz.Models):
    """Every job of the corpus, run in one child process (a new one after a crash)."""
    jobs = [j for group in corpus.values() for j in group]
    results, stats = fz.run_jobs(jobs, good, rlimit_as=RLIMIT_AS)
    by_group: dict[str, list[fz.Result]] = {}
    it = iter(results)
    for name, group in corpus.items():
        by_group[name] = [next(it) for _ in group]
    return by_group, stats


def _check(results: list[fz.Result]) -> None:
    bad = fz.problems(results)
    assert not bad, "\n".join(bad)


def test_issue_cases_are_refused_naming_file_key_and_value(outcome) -> None:
    results = outcome[0]["issue"]
    _check(results)
    for r, (_kind, key, value, needle) in zip(results, ISSUE_CASES):
        assert r.outcome == "refused", (key, value, r.outcome)
        assert key in r.message and needle in r.message.lower(), r.message
        assert Path(r.job.path).name in r.message


def test_every_numeric_key_of_each_model_kind(outcome, corpus) -> None:
    results = outcome[0]["keys"]
    _check(results)
    kinds = {r.job.kind for r in results}
    assert kinds == {"llm", "mmproj", "clip"}
    # each kind saw some mutations refused by the rules and some the engines took
    for kind in kinds:
        seen = {r.outcome for r in results if r.job.kind == kind}
        assert "refused" in seen, kind


def test_tensor_info_mutations(outcome) -> None:
    _check(outcome[0]["tensors"])


def test_images(outcome) -> None:
    results = outcome[0]["images"]
    _check(results)
    by_desc = {r.job.desc: r for r in results}
    # the elongated images are classified and captioned (auto detail on a CPU caps the tiles)
    for shape in ("1x20000", "20000x1", "1x1"):
        assert by_desc[shape].outcome == "accepted", (shape, by_desc[shape].message)


def test_texts(outcome) -> None:
    results = outcome[0]["texts"]
    _check(results)
    long_word, _spaces, surrogate = results[:3]
    assert surrogate.outcome == "refused" and "surrogate" in surrogate.message
    # the 100,000-letter word tokenizes for CLIP (bounded BPE); for SmolVLM2 it overflows the context
    assert long_word.outcome == "refused" and "context" in long_word.message


def test_children_stay_within_the_memory_limit(outcome) -> None:
    stats = outcome[1]
    assert 0 < stats["max_rss_kb"] * 1024 < RLIMIT_AS
    assert stats["children"] == 1  # nothing crashed, so one child ran everything


# --- a handful through the real CLI, under the same address-space limit --------------------------------


def vlm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(cwd)}
    env.pop("VLM_DEBUG", None)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (RLIMIT_AS, RLIMIT_AS))

    return subprocess.run(
        [sys.executable, "-m", "vlmcli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        preexec_fn=limit,
    )


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode > 0, (r.returncode, r.stderr)  # an exit status, not a signal
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlm: error: "), r.stderr
    return lines[0]


def test_cli_classifies_a_1x20000_image_in_bounded_memory(good, corpus, tmp_path: Path) -> None:
    image = next(Path(j.path) for j in corpus["images"] if j.desc == "1x20000")
    r = vlm("classify", str(image), "--labels", "cat,dog", "--model", good.clip, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cat" in r.stdout and "dog" in r.stdout


def test_cli_full_detail_refuses_a_1x20000_image_with_its_size(good, corpus, tmp_path: Path) -> None:
    image = next(Path(j.path) for j in corpus["images"] if j.desc == "1x20000")
    r = vlm(
        "ask",
        str(image),
        "What is this?",
        "--model",
        good.llm,
        "--mmproj",
        good.mmproj,
        "--detail",
        "high",
        cwd=tmp_path,
    )
    line = one_error_line(r)
    assert str(image) in line and "1x20000" in line


def test_cli_refuses_a_context_beyond_32_bits_before_allocating(good, tmp_path: Path) -> None:
    r = vlm(
        "ask",
        good.image,
        "What is this?",
        "--model",
        good.llm,
        "--mmproj",
        good.mmproj,
        "--ctx",
        "4294967553",
        cwd=tmp_path,
    )
    assert "--ctx" in one_error_line(r)


def test_cli_names_the_projector_file_and_key(good, corpus, tmp_path: Path) -> None:
    job = corpus["issue"][0]  # clip.vision.patch_size = 7: an abort in ggml before
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(good.llm, model_dir)
    shutil.copy(job.path, model_dir / Path(good.mmproj).name)
    r = vlm("ask", good.image, "What is this?", "--model", str(model_dir), cwd=tmp_path)
    line = one_error_line(r)
    assert Path(good.mmproj).name in line and "clip.vision.patch_size = 7" in line
