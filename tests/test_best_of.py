"""--best-of N: candidates sampled from one image encoding and one prompt evaluation (shared KV
cells, one batch per step), chosen by log-probability, vote or CLIP; on the tiny random-weight
SmolVLM2 through the real llama.cpp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmcli.engines.llama import Candidate, EngineOptions, GenerationOptions, VlmEngine
from vlmcli.images import load_image
from vlmcli.tasks import best_of

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
# The candidates decode in one batch of n tokens per step, a plain run one token per step: llama.cpp
# picks other matmul kernels for the two shapes, so logits agree to F32 accumulation order, not bitwise.
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def engine(smolvlm2_gguf):
    with VlmEngine(
        smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(n_seq_max=4, detail="low", n_threads=2)
    ) as e:
        yield e


@pytest.fixture(scope="module")
def image():
    return load_image(SAMPLE)


def _run(engine, image, **kw):
    return next(engine.ask(image, ["What is in the picture?"], GenerationOptions(max_tokens=6, temperature=0.9, **kw)))


def test_candidates_differ_and_repeat_with_the_seed(engine, image) -> None:
    a, b = _run(engine, image, seed=3, n=4), _run(engine, image, seed=3, n=4)
    assert [c.tokens for c in a.candidates] == [c.tokens for c in b.candidates]
    assert len({tuple(c.tokens) for c in a.candidates}) == 4
    assert [c.tokens for c in _run(engine, image, seed=4, n=4).candidates] != [c.tokens for c in a.candidates]
    assert a.generated_tokens == sum(len(c.tokens) for c in a.candidates)


def test_shared_prompt_gives_the_plain_runs_first_candidate(engine, image) -> None:
    plain = _run(engine, image, seed=11)
    shared = _run(engine, image, seed=11, n=3)
    assert shared.candidates[0].text == plain.text and shared.text == plain.text


def test_reported_logprobs_equal_teacher_forcing(engine, image) -> None:
    g = _run(engine, image, seed=5, n=3)
    for c in g.candidates:
        forced = engine.score(image, "What is in the picture?", c.tokens)
        np.testing.assert_allclose(c.logprobs, forced, atol=LOGPROB_ATOL)
        assert all(lp < 0 for lp in c.logprobs)


def test_more_candidates_than_the_model_was_opened_for(engine, image) -> None:
    from vlmcli.errors import InvalidOption

    with pytest.raises(InvalidOption) as e:
        _run(engine, image, n=5)
    assert e.value.option == "best_of"


def _candidate(text: str, mean: float) -> Candidate:
    return Candidate(text, [1, 2], [mean, mean], "eos")


def test_vote_counts_normalised_answers_and_breaks_ties_by_logprob() -> None:
    cands = [
        _candidate("Two.", -3.0),
        _candidate("a cat", -0.5),
        _candidate("2", -2.0),
        _candidate("two", -2.5),
        _candidate("The cat", -0.1),
    ]
    choice = best_of.by_vote(cands)
    assert choice.scores == [3.0, 2.0, 3.0, 3.0, 2.0]  # "Two." = "2" = "two"; "a cat" = "The cat"
    assert choice.index == 2  # the likeliest of the largest group
    assert best_of.by_logprob(cands).index == 4


def vlm(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def model_args(smolvlm2_gguf) -> list[str]:
    return ["--model", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj), "-n", "5"]


def test_best_of_one_is_the_plain_answer(model_args, tmp_path: Path) -> None:
    plain = json.loads(vlm("ask", str(SAMPLE), "What is it?", *model_args, "--json", home=tmp_path).stdout)
    one = json.loads(
        vlm("ask", str(SAMPLE), "What is it?", *model_args, "--json", "--best-of", "1", home=tmp_path).stdout
    )
    assert one["answers"] == plain["answers"] and one["options"] == plain["options"]
    assert "candidates" not in one["answers"][0]


@pytest.mark.parametrize("select", ["logprob", "vote"])
def test_records_carry_every_candidate_and_the_best_is_chosen(model_args, tmp_path: Path, select: str) -> None:
    r = vlm(
        "ask",
        str(SAMPLE),
        "What is it?",
        *model_args,
        "--json",
        "--best-of",
        "3",
        "--select",
        select,
        "--seed",
        "2",
        home=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    (a,) = rec["answers"]
    assert (
        rec["options"]["best_of"] == 3 and rec["options"]["select"] == select and rec["options"]["temperature"] == 0.7
    )
    assert a["select"] == select and len(a["candidates"]) == 3
    scores = [c["score"] for c in a["candidates"]]
    best = max(scores)
    assert scores[a["chosen"]] == best and a["answer"] == a["candidates"][a["chosen"]]["text"]
    if select == "logprob":
        assert scores == [c["mean_logprob"] for c in a["candidates"]]
    ties = [i for i, s in enumerate(scores) if s == best]
    assert a["candidates"][a["chosen"]]["mean_logprob"] == max(a["candidates"][i]["mean_logprob"] for i in ties)
    # Text output: the chosen answer; -v lists them all on stderr.
    t = vlm(
        "ask",
        str(SAMPLE),
        "What is it?",
        *model_args,
        "--best-of",
        "3",
        "--select",
        select,
        "--seed",
        "2",
        "-v",
        home=tmp_path,
    )
    assert t.stdout == a["answer"] + "\n"
    assert all(c["text"] in t.stderr for c in a["candidates"])


def test_clip_rerank_picks_the_most_similar_caption(model_args, clip_gguf: Path, tmp_path: Path) -> None:
    r = vlm(
        "caption",
        str(SAMPLE),
        *model_args,
        "--json",
        "--best-of",
        "3",
        "--select",
        "clip",
        "--clip-model",
        str(clip_gguf),
        home=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    texts = [c["text"] for c in rec["candidates"]]
    assert rec["options"]["judge"] == clip_gguf.stem
    emb = vlm("embed", str(SAMPLE), *sum((["--text", t] for t in texts), []), "--model", str(clip_gguf), home=tmp_path)
    rows = [json.loads(line) for line in emb.stdout.splitlines()]
    image = np.array(rows[0]["embedding"], np.float64)
    sims = [float(np.array(row["embedding"], np.float64) @ image) for row in rows[1:]]
    assert rec["chosen"] == int(np.argmax(sims))
    np.testing.assert_allclose([c["score"] for c in rec["candidates"]], sims, atol=1e-5)


def test_bad_combinations_are_explained(model_args, tmp_path: Path) -> None:
    r = vlm("ask", str(SAMPLE), "q", *model_args, "--best-of", "0", home=tmp_path)
    assert r.returncode == 2 and "--best-of" in r.stderr
    r = vlm("ask", str(SAMPLE), "q", *model_args, "--best-of", "2", "--select", "loudest", home=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("vlm: error: --select: unknown selection 'loudest'")
    # --select clip with no CLIP model in an empty store, offline: the one line says what to pull.
    r = vlm("ask", str(SAMPLE), "q", *model_args, "--best-of", "2", "--select", "clip", "--offline", home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "vlm pull clip-vit-b32" in r.stderr
    r = vlm("caption", str(SAMPLE), *model_args, "--best-of", "2", "--select", "vote", home=tmp_path)
    assert r.returncode == 0 and "meant for short answers" in r.stderr
