"""`vlm ask` / `vlm caption` through the real CLI process, including every bad-input case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"


def vlm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, input=stdin, timeout=600
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vlm: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_dir(smolvlm2_folder) -> Path:
    """A folder holding the model and its mmproj, as `--model DIR` takes it."""
    return smolvlm2_folder("model-dir")


def test_ask_streams_an_answer(model_dir: Path) -> None:
    r = vlm("ask", str(SAMPLE), "What is this?", "--model", str(model_dir), "-n", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert r.stderr.strip() == ""  # llama.cpp's load logs stay out of the way


def test_ask_json_schema_and_determinism(smolvlm2_gguf) -> None:
    args = [
        "ask",
        str(SAMPLE),
        "What is this?",
        "--model",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "-n",
        "5",
        "--json",
    ]
    r1, r2 = vlm(*args), vlm(*args)
    assert r1.returncode == 0, r1.stderr
    rec = json.loads(r1.stdout)
    assert rec["answers"] == json.loads(r2.stdout)["answers"]
    assert rec["task"] == "ask" and rec["path"] == str(SAMPLE) and rec["prompts"] == ["What is this?"]
    assert rec["model"].endswith("Q8_0.gguf") and rec["mmproj"].startswith("mmproj-") and rec["quant"]
    (answer,) = rec["answers"]
    assert answer["prompt"] == "What is this?" and answer["generated_tokens"] == 5 and answer["stop_reason"] == "length"
    assert (
        rec["tokens"]["generated"] == 5
        and rec["tokens"]["image"] > 0
        and rec["tokens"]["prompt"] > rec["tokens"]["image"]
    )
    assert set(rec["timings"]) == {"load_ms", "image_encode_ms", "prefill_ms", "decode_ms", "prepare_ms"}
    assert rec["detail"] in ("low", "high", "tiles") and rec["file"]["size"] == SAMPLE.stat().st_size


def test_one_record_schema_for_one_image_and_a_batch(model_dir: Path, tmp_path: Path) -> None:
    """`vlm ask IMAGE --json` prints the record batch mode writes for that image."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / SAMPLE.name).write_bytes(SAMPLE.read_bytes())
    image = folder / SAMPLE.name
    single = json.loads(vlm("ask", str(image), "What is this?", "--model", str(model_dir), "-n", "3", "--json").stdout)
    out = tmp_path / "answers.jsonl"
    r = vlm("ask", str(folder), "What is this?", "--model", str(model_dir), "-n", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    (batch,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(single) == set(batch)
    for key in single:
        if key != "timings":
            assert single[key] == batch[key], key


def test_ask_several_prompts_in_one_record(model_dir: Path) -> None:
    r = vlm("ask", str(SAMPLE), "What is this?", "Is it a cat?", "--model", str(model_dir), "-n", "3", "--json")
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["prompt"] for a in rec["answers"]] == ["What is this?", "Is it a cat?"]
    assert rec["tokens"]["generated"] == sum(a["generated_tokens"] for a in rec["answers"])


def test_caption_several_images(model_dir: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.png"
    from PIL import Image

    Image.open(SAMPLE).rotate(90, expand=True).save(second)
    r = vlm("caption", str(SAMPLE), str(second), "--model", str(model_dir), "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["path"] for x in recs] == [str(SAMPLE), str(second)]
    assert all(x["caption"] for x in recs)


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "text", "unsupported", "bomb"])
def test_bad_images(model_dir: Path, tmp_path: Path, case: str) -> None:
    from PIL import Image

    path = tmp_path / f"{case}.jpg"
    extra: list[str] = []
    if case == "directory":
        # A folder is a batch of images (batch mode); one with no images in it is an error.
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "truncated":
        path.write_bytes(SAMPLE.read_bytes()[:2000])
    elif case == "text":
        path.write_text("not an image")
    elif case == "unsupported":
        path = tmp_path / "icon.ico"
        Image.new("RGB", (16, 16)).save(path, "ICO")
    elif case == "bomb":
        Image.new("RGB", (400, 400)).save(path)
        extra = ["--max-pixels", "1000"]
    r = vlm("ask", str(path), "q", "--model", str(model_dir), *extra)
    assert_one_line_error(r, str(path))


def test_bad_models(smolvlm2_gguf, tmp_path: Path) -> None:
    model, mmproj = str(smolvlm2_gguf.model), str(smolvlm2_gguf.mmproj)
    # Missing model file.
    assert_one_line_error(
        vlm("ask", str(SAMPLE), "q", "--model", str(tmp_path / "none.gguf"), "--mmproj", mmproj, "--offline"),
        "none.gguf",
    )
    # Not a GGUF at all.
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 1000)
    assert_one_line_error(
        vlm("ask", str(SAMPLE), "q", "--model", str(junk), "--mmproj", mmproj), "junk.gguf", "not a GGUF"
    )
    # A truncated (corrupt) GGUF.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(model).read_bytes()[: Path(model).stat().st_size // 2])
    assert_one_line_error(vlm("ask", str(SAMPLE), "q", "--model", str(cut), "--mmproj", mmproj), "cut.gguf")
    # Wrong kinds: the projector given as the model, and the model given as the projector.
    assert_one_line_error(
        vlm("ask", str(SAMPLE), "q", "--model", mmproj, "--mmproj", mmproj), mmproj, "vision projector"
    )
    assert_one_line_error(vlm("ask", str(SAMPLE), "q", "--model", model, "--mmproj", model), model, "language model")


def test_prompt_longer_than_context(model_dir: Path) -> None:
    r = vlm("ask", str(SAMPLE), "word " * 600, "--model", str(model_dir), "--ctx", "256", "--detail", "low")
    # The engine says how many tokens were needed; the CLI adds the flag to change.
    assert_one_line_error(r, str(SAMPLE), "more than the context of 256", "(raise --ctx)")


def test_streamed_text_is_the_records_answer(model_dir: Path) -> None:
    text = vlm("ask", str(SAMPLE), "What is this?", "--model", str(model_dir), "-n", "6")
    rec = json.loads(vlm("ask", str(SAMPLE), "What is this?", "--model", str(model_dir), "-n", "6", "--json").stdout)
    assert text.returncode == 0, text.stderr
    assert text.stdout == rec["answers"][0]["answer"] + "\n"


def test_text_arguments_must_be_utf8(model_dir: Path) -> None:
    # argv bytes that are not UTF-8 (a Latin-1 shell, a script's bug): one line naming the argument.
    for args, needle in (
        ([b"ask", str(SAMPLE).encode(), b"caf\xe9?"], "question 1 is not valid UTF-8"),
        ([b"caption", str(SAMPLE).encode(), b"--prompt", b"\xff"], "--prompt: the text is not valid UTF-8"),
    ):
        r = subprocess.run(
            [sys.executable.encode(), b"-m", b"vlmcli", *args, b"--model", str(model_dir).encode()],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 2
        assert_one_line_error(r, needle)


def test_debug_shows_the_traceback(model_dir: Path, tmp_path: Path) -> None:
    r = vlm("ask", str(tmp_path / "missing.jpg"), "q", "--model", str(model_dir), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_llama_cpps_own_logs_come_with_debug_not_with_verbose(model_dir: Path) -> None:
    args = ("ask", str(SAMPLE), "What is this?", "--model", str(model_dir), "-n", "2")
    quiet, debug = vlm(*args, "-v"), vlm(*args, "--debug")
    assert quiet.returncode == 0 and debug.returncode == 0, quiet.stderr + debug.stderr
    assert quiet.stderr.strip() == ""
    assert "llama_model_loader" in debug.stderr  # the model loader's own lines, from llama.cpp
    assert debug.stdout == quiet.stdout


def test_questions_with_brackets_are_not_markup(model_dir: Path) -> None:
    r = vlm("ask", str(SAMPLE), "what is [/x]?", "and [bold]?", "--model", str(model_dir), "-n", "2")
    assert r.returncode == 0, r.stderr
    assert "> what is [/x]?" in r.stderr and "> and [bold]?" in r.stderr
