"""`vlm chat` as a real subprocess with its input on a pipe: turns, /image, /video, /clear, /exit, errors
that leave the session going, and the history kept in the KV cache (-v says what each turn evaluated)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.engines.prompt import Turn
from vlmcli.images import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"


@pytest.fixture(scope="module")
def model_dir(smolvlm2_folder) -> Path:
    return smolvlm2_folder("chat-model")


def chat(model_dir: Path, lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --no-cache: what a turn evaluates depends on this session only, not on encodings other tests left
        [
            sys.executable,
            "-m",
            "vlmcli",
            "chat",
            *args,
            "--model",
            str(model_dir),
            "-n",
            "4",
            "--detail",
            "low",
            "--no-cache",
        ],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_conversation_on_a_pipe(model_dir: Path, smolvlm2_gguf, tmp_path: Path) -> None:
    r = chat(
        model_dir,
        ["What is this?", "/image " + str(tmp_path / "missing.jpg"), "/bogus", "And now?", "/exit", "never read"],
        str(SAMPLE),
        "-v",
    )
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 2  # /exit ended it
    errors = [line for line in r.stderr.splitlines() if line.startswith("vlm: error:")]
    assert len(errors) == 2 and "missing.jpg" in errors[0] and "unknown command /bogus" in errors[1]
    stats = [
        tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) evaluated now, (\d+) encoder", r.stderr)
    ]
    (first_prompt, first_now, first_passes), (second_prompt, second_now, second_passes) = stats
    assert first_now == first_prompt and first_passes >= 1
    # The second turn evaluated only what it added: the image and the first exchange stayed in the KV cache.
    assert second_passes == 0 and second_now < second_prompt - first_prompt + 8
    # The same answers as the engine gives for that history.
    with VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail="low", n_threads=2)) as engine:
        opts = GenerationOptions(max_tokens=4)
        image = load_image(SAMPLE)
        turns = [Turn("user", ("What is this?",), media=((0, "image"),))]
        assert next(engine.chat_turns([image], turns, opts)).text.strip() == answers[0]
        turns += [Turn("assistant", (answers[0],)), Turn("user", ("And now?",))]
        assert next(engine.chat_turns([image], turns, opts)).text.strip() == answers[1]


def test_video_text_only_and_clear(model_dir: Path, tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    from test_video import write_video

    assert av
    clip = write_video(tmp_path / "clip.mp4", frames=10, fps=5)
    r = chat(
        model_dir,
        ["Hello", f"/video {clip}", "What happens?", f"/image {clip}", "/clear", "Hello"],
        "-v",
        "--system",
        "Be brief.",
    )
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 3
    assert answers[0] == answers[2]  # /clear started over: the same first message, the same answer
    assert "this is a video; use /video" in r.stderr
    stats = re.findall(r"\[(\d+) prompt tokens, (\d+) evaluated now, (\d+) encoder passes", r.stderr)
    assert [int(s[2]) for s in stats] == [0, 2, 0]  # the video's two frames encoded once
