"""`vlm serve` with the official openai client: two images in one message, a video_url part, a text-only
request, a follow-up turn about an image sent in an earlier turn; each answer is the engine's own for that
conversation (the worker's KV reuse between requests changes nothing of what is answered)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from serving import start_server, stop_server

from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.engines.prompt import Turn
from vlmcli.images import load_image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
av = pytest.importorskip("av")

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_video import write_video

    d = tmp_path_factory.mktemp("serve-media")
    small = d / "small.png"
    load_image(SAMPLE).resize((200, 130)).save(small)
    return {"cat": SAMPLE, "small": small, "clip": write_video(d / "clip.mp4", frames=10, fps=5)}


@pytest.fixture(scope="module")
def client(smolvlm2_folder, media, tmp_path_factory: pytest.TempPathFactory):
    model = smolvlm2_folder("tiny")
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    args = ["--model", str(model), "--workers", "1", "--detail", "low", "--timeout", "120"]
    process, url = start_server([*args, "--allow-files", str(media["clip"].parent)], log)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stop_server(process)
    log.close()


@pytest.fixture(scope="module")
def engine(smolvlm2_gguf):
    with VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail="low", n_threads=2)) as e:
        yield e


def _answer(client, messages: list) -> tuple[str, int]:
    r = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=messages)
    return r.choices[0].message.content, r.usage.prompt_tokens


def _want(engine: VlmEngine, media: list, turns: list[Turn]) -> tuple[str, int]:
    g = next(engine.chat_turns(media, turns, GenerationOptions(max_tokens=6)))
    return g.text.strip(), g.prompt_tokens


def test_two_images_in_one_message(client, engine, media) -> None:
    content = [
        {"type": "image_url", "image_url": {"url": _data_url(media["cat"], "image/jpeg")}},
        {"type": "image_url", "image_url": {"url": _data_url(media["small"], "image/png")}},
        {"type": "text", "text": "What changed?"},
    ]
    got = _answer(client, [{"role": "user", "content": content}])
    images = [load_image(media["cat"]), load_image(media["small"])]
    assert got == _want(engine, images, [Turn("user", ("What changed?",), media=((0, "image"), (0, "image")))])


def test_a_video_part(client, engine, media) -> None:
    from vlmcli.tasks.video import load_video

    video = load_video(str(media["clip"]), engine.vision.tile_size)
    want = _want(engine, [video], [Turn("user", ("What happens?",), media=((0, "video"),))])
    for url in (_data_url(media["clip"], "video/mp4"), "clip.mp4"):  # inline, and a file under --allow-files
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
        assert _answer(client, [{"role": "user", "content": content}]) == want


def test_text_only(client, engine) -> None:
    assert _answer(client, [{"role": "user", "content": "Say hi."}]) == _want(engine, [], [Turn("user", ("Say hi.",))])


def test_a_follow_up_about_an_earlier_image(client, engine, media) -> None:
    first = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look at this."},
                {"type": "image_url", "image_url": {"url": _data_url(media["cat"], "image/jpeg")}},
            ],
        }
    ]
    reply, _ = _answer(client, first)
    follow = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "What colour is it?"}]
    turns = [
        Turn("user", ("Look at this.",), media=((1, "image"),)),
        Turn("assistant", (reply,)),
        Turn("user", ("What colour is it?",)),
    ]
    assert _answer(client, follow) == _want(engine, [load_image(media["cat"])], turns)


def test_bad_video_parts_are_refused(client, media) -> None:
    for url, code in (
        ("https://example.com/v.mp4", "remote_video_refused"),
        ("data:video/mp4,abc", "invalid_video_url"),
    ):
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "?"}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": content}])
        assert e.value.body["code"] == code
    garbage = base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + bytes(200)).decode()
    content = [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + garbage}}]
    with pytest.raises(openai.BadRequestError, match="cannot read this video"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": content}])
