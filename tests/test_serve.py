"""`vlm serve`: the real server in a subprocess on 127.0.0.1, the official `openai` client against it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serving import start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
PROMPT = "What is this?"
DATA_URL = "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()


def vlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, timeout=300)


class Server:
    allowed: Path  # the --allow-files folder, where the server has one

    def __init__(self, url: str, process: subprocess.Popen, vlm_id: str, clip_id: str):
        self.url, self.process, self.vlm_id, self.clip_id = url, process, vlm_id, clip_id
        self.port = int(url.rsplit(":", 1)[1])
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read().decode()

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        req = urllib.request.Request(
            self.url + path, data=body, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])


@pytest.fixture(scope="module")
def model_dir(smolvlm2_folder) -> Path:
    return smolvlm2_folder("tiny-smolvlm2")


@pytest.fixture(scope="module")
def server(model_dir: Path, clip_gguf: Path, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    shutil.copy(SAMPLE, allowed / "cat.jpg")
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    args = ["--model", str(model_dir), "--model", str(clip_gguf), "--workers", "1", "--queue", "2", "--max-n", "2"]
    args += ["--max-body", "2000000"]  # no --threads: shared per request
    process, url = start_server([*args, "--allow-files", str(allowed), "--timeout", "60"], log)
    s = Server(url, process, model_dir.name, clip_gguf.stem)
    s.allowed = allowed
    yield s
    pids = [w["pid"] for m in s.health()["models"].values() for w in m["workers"]]
    try:
        assert stop_server(process) == 0  # stops accepting, finishes what is in flight, stops the workers
    finally:
        log.close()
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _chat(server: Server, max_tokens: int = 8, image_url: str = DATA_URL, **kw):
    return server.client.chat.completions.create(
        model=server.vlm_id,
        max_tokens=max_tokens,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": PROMPT}],
            }
        ],
        **kw,
    )


@pytest.fixture(scope="module")
def cli_answer(model_dir: Path) -> dict:
    r = vlm("ask", str(SAMPLE), PROMPT, "--model", str(model_dir), "-n", "8", "-t", "1", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_models_and_health(server: Server) -> None:
    ids = {m.id for m in server.client.models.list()}
    assert ids == {server.vlm_id, server.clip_id}
    h = server.health()
    assert h["status"] == "ok" and all(w["pid"] for m in h["models"].values() for w in m["workers"])


def test_chat_equals_vlm_ask(server: Server, cli_answer: dict) -> None:
    r = _chat(server)
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == cli_answer["answers"][0]["answer"]
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == cli_answer["tokens"]["prompt"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


HISTORY = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": "Hello"}],
    },
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": PROMPT},
]


def _counter(server: Server, name: str, model: str) -> int:
    line = next(x for x in server.get("/metrics")[1].splitlines() if x.startswith(f'{name}{{model="{model}"}}'))
    return int(float(line.split()[-1]))  # Prometheus writes every sample as a float ("3.0")


@pytest.fixture(scope="module")
def direct_engine(model_dir: Path):
    """The server's model opened in this process as a worker opens it (same store path, 1 thread, 2
    sequences), without the image-encoding cache: its encoder passes are the ones a new image costs."""
    from vlmcli.tasks.models import ModelSpec, open_model

    saved = os.environ.get("VLM_CACHE_SIZE")
    os.environ["VLM_CACHE_SIZE"] = "0"
    try:
        opened = open_model(ModelSpec(str(model_dir), offline=True, n_threads=1, n_sequences=2), "vlm")
    finally:
        os.environ.pop("VLM_CACHE_SIZE") if saved is None else os.environ.__setitem__("VLM_CACHE_SIZE", saved)
    yield opened.engine
    opened.engine.close()


def _new_image(tmp_path: Path) -> tuple[str, Path]:
    """The sample with one random pixel, as PNG: an image no earlier request sent (nothing cached)."""
    from PIL import Image

    im = Image.open(SAMPLE).convert("RGB")
    im.putpixel((0, 0), tuple(os.urandom(3)))
    path = tmp_path / "new.png"
    im.save(path)
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), path


def test_chat_history_reaches_the_model(server: Server, cli_answer: dict, direct_engine, tmp_path: Path) -> None:
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.engines.prompt import Turn
    from vlmcli.images import load_image

    url, path = _new_image(tmp_path)
    history = [dict(m) for m in HISTORY]
    history[1] = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hello"}],
    }
    passes = _counter(server, "vlm_encoder_passes_total", server.vlm_id)
    r = server.client.chat.completions.create(model=server.vlm_id, max_tokens=8, messages=history)
    turns = [
        Turn("system", ("You are terse.",)),
        Turn("user", ("Hello",), image_at=0),
        Turn("assistant", ("Hi.",)),
        Turn("user", (PROMPT,)),
    ]
    want = next(direct_engine.chat_turns(load_image(path), turns, GenerationOptions(max_tokens=8)))
    assert r.choices[0].message.content == want.text.strip()
    assert r.usage.prompt_tokens == want.prompt_tokens > cli_answer["tokens"]["prompt"]  # the earlier turns were read
    assert _counter(server, "vlm_encoder_passes_total", server.vlm_id) - passes == want.image.encoder_passes >= 1
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(
            model=server.vlm_id, max_tokens=2, messages=[*history, {"role": "tool", "content": "x"}]
        )
    assert e.value.body["param"] == "messages[4].role"


def test_chat_with_an_allowed_file(server: Server, cli_answer: dict) -> None:
    r = _chat(server, image_url=str(server.allowed / "cat.jpg"))
    assert r.choices[0].message.content == cli_answer["answers"][0]["answer"]


def test_streamed_chunks_concatenate_to_the_answer(server: Server, cli_answer: dict) -> None:
    chunks = list(_chat(server, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cli_answer["answers"][0]["answer"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 3


def test_stop_sequences_end_the_answer(server: Server, cli_answer: dict) -> None:
    answer = cli_answer["answers"][0]["answer"]
    words = answer.split()
    assert len(words) >= 3, answer
    stop = " " + words[2]
    want = answer[: answer.find(stop)].rstrip()
    r = _chat(server, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(_chat(server, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).rstrip() == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_returns_the_best_of_candidates(server: Server) -> None:
    r = server.client.chat.completions.create(
        model=server.vlm_id,
        max_tokens=4,
        n=2,
        temperature=0.7,
        seed=3,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": PROMPT}],
            }
        ],
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as e:  # over --max-n
        _chat(server, n=3)
    assert e.value.body["param"] == "n"


def test_streamed_choices_carry_their_index(server: Server) -> None:
    kw = dict(
        model=server.vlm_id,
        max_tokens=4,
        n=2,
        temperature=0.7,
        seed=3,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": PROMPT}],
            }
        ],
    )
    whole = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(stream=True, **kw))
    texts, finish = {0: "", 1: ""}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert sorted(t.strip() for t in texts.values()) == sorted(c.message.content for c in whole.choices)
    assert set(finish) == {0, 1} and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_embeddings_equal_vlm_embed(server: Server, clip_gguf: Path) -> None:
    r = vlm("embed", "--text", "a cat", "--text", "a dog", "--model", str(clip_gguf))
    assert r.returncode == 0, r.stderr
    want_texts = [json.loads(line)["embedding"] for line in r.stdout.splitlines()]
    r = vlm("embed", str(SAMPLE), "--model", str(clip_gguf))
    assert r.returncode == 0, r.stderr
    want_image = json.loads(r.stdout.splitlines()[0])["embedding"]

    passes = _counter(server, "vlm_encoder_passes_total", server.clip_id)
    got = server.client.embeddings.create(
        model=server.clip_id, input=["a cat", "a dog", DATA_URL], encoding_format="float"
    )
    assert (
        _counter(server, "vlm_encoder_passes_total", server.clip_id) == passes + 1
    )  # one image, texts are no encoder pass
    rows = [d.embedding for d in sorted(got.data, key=lambda d: d.index)]
    assert len(rows) == 3
    for row, want in zip(rows, [*want_texts, want_image]):
        assert row == pytest.approx(want, abs=1e-6)

    got = server.client.embeddings.create(model=server.clip_id, input="a cat", encoding_format="base64")
    raw = base64.b64decode(got.data[0].embedding)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(want_texts[0], abs=1e-6)
    default = server.client.embeddings.create(model=server.clip_id, input="a dog")  # the client asks base64 and decodes
    assert list(default.data[0].embedding) == pytest.approx(want_texts[1], abs=1e-6)


def test_embeddings_take_content_parts_as_chat_does(server: Server, clip_gguf: Path) -> None:
    """An input item may be a content part: an image by path (--allow-files), URL or data: URL, or a text."""
    texts = vlm("embed", "--text", "a cat", "--model", str(clip_gguf))
    image = vlm("embed", str(SAMPLE), "--model", str(clip_gguf))
    assert texts.returncode == 0 and image.returncode == 0, texts.stderr + image.stderr
    want = [json.loads(image.stdout.splitlines()[0])["embedding"], json.loads(texts.stdout)["embedding"]]
    got = server.client.embeddings.create(
        model=server.clip_id,
        encoding_format="float",
        input=[{"type": "image_url", "image_url": {"url": "cat.jpg"}}, {"type": "text", "text": "a cat"}, DATA_URL],
    )
    rows = [d.embedding for d in sorted(got.data, key=lambda d: d.index)]
    for row, w in zip(rows, [want[0], want[1], want[0]]):
        assert row == pytest.approx(w, abs=1e-6)
    for url, code in (("https://example.com/cat.jpg", "remote_image_refused"), ("/etc/passwd", "local_image_refused")):
        with pytest.raises(openai.BadRequestError) as e:  # the same rules as chat's images
            server.client.embeddings.create(
                model=server.clip_id, input=["a cat", {"type": "image_url", "image_url": {"url": url}}]
            )
        assert e.value.body["code"] == code and e.value.body["param"] == "input[1]", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        server.client.embeddings.create(model=server.clip_id, input=["a cat", {"type": "input_audio"}])
    assert e.value.body["param"] == "input[1]" and "input_audio" in e.value.body["message"]


def test_embeddings_errors_name_the_failing_input(server: Server) -> None:
    not_an_image = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()
    for bad_item, code in (
        (not_an_image, "invalid_image"),  # refused by the worker that decodes it
        ({"type": "image_url", "image_url": {"url": not_an_image}}, "invalid_image"),
        ("data:image/png;base64,%%%", "invalid_image_url"),  # refused before any worker sees it
        (7, None),  # a token array's item
    ):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.embeddings.create(model=server.clip_id, input=["a cat", "a dog", bad_item])
        assert e.value.body["param"] == "input[2]" and e.value.body["code"] == code, e.value.body


def _error(status: int, body: dict, code: int) -> dict:
    assert status == code, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_error_statuses(server: Server) -> None:
    _error(*server.post("/v1/chat/completions", b"{not json")[:2], 400)
    _error(
        *server.post("/v1/chat/completions", json.dumps({"model": server.vlm_id, "messages": "hi"}).encode())[:2], 400
    )
    bad_tokens = {
        "model": server.vlm_id,
        "max_tokens": "many",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": "x"}],
            }
        ],
    }
    assert (
        _error(*server.post("/v1/chat/completions", json.dumps(bad_tokens).encode())[:2], 400)["param"] == "max_tokens"
    )
    # Each field the request models refuse is named as OpenAI names it.
    content = bad_tokens["messages"][0]["content"]
    for field, value, param in (
        ("temperature", "hot", "temperature"),
        ("n", True, "n"),
        ("stop", ["ok", ""], "stop[1]"),
        ("messages", [{"role": "user", "content": [*content, {"type": "input_audio"}]}], "messages[0].content[2]"),
        ("messages", [{"role": "user", "content": "\ud800"}], "messages[0].content[0].text"),
        ("messages", [{"role": "user"}], "messages[0].content"),
    ):
        body = json.dumps({**bad_tokens, "max_tokens": 2, field: value}).encode()
        assert _error(*server.post("/v1/chat/completions", body)[:2], 400)["param"] == param, field
    # A body is JSON only when its Content-Type says so (a browser's cross-site form cannot be).
    good = json.dumps({**bad_tokens, "max_tokens": 2}).encode()
    assert _error(*server.post("/v1/chat/completions", good, {"Content-Type": "text/plain"})[:2], 400)["code"] == (
        "invalid_json"
    )
    import http.client

    conn = http.client.HTTPConnection(
        "127.0.0.1", server.port, timeout=30
    )  # a body over --max-body: refused from its length
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "2100000")
    conn.endheaders()
    r = conn.getresponse()
    _error(r.status, json.loads(r.read()), 413)
    conn.close()

    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, image_url="data:image/png;base64," + base64.b64encode(b"this is not an image").decode())
    assert e.value.body["code"] == "invalid_image"
    from PIL import Image

    bomb = server.allowed / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 Mpixels in a few kB: over the 64 Mpixel cap
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, image_url="data:image/png;base64," + base64.b64encode(bomb.read_bytes()).decode())
    assert e.value.body["code"] == "invalid_image" and "pixel" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, image_url="https://example.com/cat.jpg")
    assert e.value.body["code"] == "remote_image_refused"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, image_url="/etc/passwd")
    assert e.value.body["code"] == "local_image_refused"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.embeddings.create(model=server.vlm_id, input="a cat")
    assert e.value.body["code"] == "wrong_model_kind"
    status, text = server.get("/metrics")
    assert 'vlm_requests_total{route="/v1/chat/completions",status="400"}' in text


def test_a_client_leaving_mid_stream_stops_its_generation(server: Server, cli_answer: dict) -> None:
    stream = _chat(server, max_tokens=3000, stream=True)  # about 10 s of tokens if it ran to the end
    pieces = iter(stream)
    next(pieces), next(pieces)
    stream.close()
    t0 = time.monotonic()
    assert _chat(server).choices[0].message.content == cli_answer["answers"][0]["answer"]
    assert time.monotonic() - t0 < 5


def test_a_full_queue_gets_429(server: Server, cli_answer: dict) -> None:
    import threading

    body = json.dumps(
        {
            "model": server.vlm_id,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": DATA_URL}},
                        {"type": "text", "text": PROMPT},
                    ],
                }
            ],
        }
    ).encode()
    stream = _chat(server, max_tokens=1200, stream=True)  # holds the only worker for a few seconds
    pieces = iter(stream)
    next(pieces)
    queued: list = []
    threads = [
        threading.Thread(target=lambda: queued.append(server.post("/v1/chat/completions", body))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while server.health()["models"][server.vlm_id]["queue"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, err, headers = server.post("/v1/chat/completions", body)
    assert _error(status, err, 429)["code"] == "queue_full"
    assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)  # the stream goes on
    for t in threads:
        t.join(60)
    assert [(st, b["choices"][0]["message"]["content"]) for st, b, _ in queued] == [
        (200, cli_answer["answers"][0]["answer"])
    ] * 2
    assert f'vlm_queue_depth{{model="{server.vlm_id}"}} 0' in server.get("/metrics")[1]


def test_a_killed_worker_is_restarted(server: Server, cli_answer: dict) -> None:
    pid = server.health()["models"][server.vlm_id]["workers"][0]["pid"]
    stream = _chat(server, max_tokens=3000, stream=True)
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                os.kill(pid, signal.SIGKILL)
    assert "died" in str(e.value)
    r = _chat(server)  # waits in the queue for the restarted worker
    assert r.choices[0].message.content == cli_answer["answers"][0]["answer"]
    h = server.health()["models"][server.vlm_id]
    assert h["restarts"] == 1 and h["workers"][0]["pid"] != pid
    assert f'vlm_worker_restarts_total{{model="{server.vlm_id}"}} 1' in server.get("/metrics")[1]
    # a non-streamed request whose worker dies gets 503 (killed once /health shows it busy: a fixed
    # delay raced the request itself, which a fast CPU finished first)
    pid = h["workers"][0]["pid"]
    import threading

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(w["busy"] for w in server.health()["models"][server.vlm_id]["workers"]):
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with pytest.raises(openai.APIStatusError) as e2:
        _chat(server, max_tokens=3000)
    killer.join()
    assert e2.value.status_code == 503
    assert _chat(server).choices[0].message.content == cli_answer["answers"][0]["answer"]


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path, tmp_path_factory):
    """Two workers, a queue of 4, a 4 s timeout, an API key, and an 8192-token context: filling it takes
    the tiny model about 12 s here (4096 took under 4 s on an idle machine), the 504 test's margin."""
    log = open(tmp_path_factory.mktemp("keyed-serve-log") / "server.log", "w+")
    args = ["--model", str(model_dir), "--workers", "2", "--queue", "4", "--threads", "1", "--max-n", "1"]
    args += ["--timeout", "4", "--ctx", "8192", "--allow-remote-images", "--max-body", "2000000"]
    process, url = start_server(args, log, env={**os.environ, "VLM_API_KEY": "sesame"})
    yield Server(url, process, model_dir.name, "")
    stop_server(process)
    log.close()


def test_api_key_is_required(keyed_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client.models.list()
    keyed = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
    assert [m.id for m in keyed.models.list()] == [keyed_server.vlm_id]
    # The scheme is case-insensitive (RFC 7235); the key is not.
    for header, status in (("bearer sesame", 200), ("BEARER  sesame", 200), ("Bearer Sesame", 401), ("sesame", 401)):
        req = urllib.request.Request(keyed_server.url + "/v1/models", headers={"Authorization": header})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                got = r.status
        except urllib.error.HTTPError as e:
            got = e.code
        assert got == status, header


def test_metrics_label_unknown_paths_as_one_route(keyed_server: Server) -> None:
    """Paths a client makes up, with or without the key, add no series of their own."""
    paths = [f"/v1/made-up-{i}" for i in range(3)]
    for path in paths:
        assert keyed_server.post(path, b"{}")[0] == 401  # no key
    status, err, _ = keyed_server.post(paths[0], b"{}", {"Authorization": "Bearer sesame"})
    assert _error(status, err, 404)["type"] == "not_found_error"
    text = keyed_server.get("/metrics")[1]
    assert "made-up" not in text
    assert 'vlm_requests_total{route="other",status="401"}' in text
    assert 'vlm_requests_total{route="other",status="404"}' in text
    assert keyed_server.post("/v1/models", b"{}")[0] == 401  # a known route without the key keeps its name
    assert 'vlm_requests_total{route="/v1/models",status="401"}' in keyed_server.get("/metrics")[1]


def test_concurrent_clients_get_their_own_answers(keyed_server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
    prompts = [f"Question {i}: what is shown?" for i in range(8)]

    def ask(prompt: str):
        try:
            r = client.chat.completions.create(
                model=keyed_server.vlm_id,
                max_tokens=6,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": DATA_URL}},
                            {"type": "text", "text": prompt},
                        ],
                    }
                ],
            )
            return r.choices[0].message.content
        except openai.RateLimitError:
            return 429

    alone = [ask(p) for p in prompts]  # one at a time: each prompt's own answer
    assert 429 not in alone and len(set(alone)) > 1  # the prompts give different answers, so a mix-up would show
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert all(t in (a, 429) for t, a in zip(together, alone)), (together, alone)
    # The queue's 4 at least (2 more when both workers are free at that instant, which a loaded
    # machine does not promise: a worker may still be reporting its previous answer).
    assert sum(t != 429 for t in together) >= 4


def test_a_request_over_the_timeout_gets_504(keyed_server: Server) -> None:
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
    content = [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": PROMPT}]
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        # Up to the whole 8192-token context (see keyed_server): about 3x the 4 s timeout here; random
        # weights rarely end early. A fixed 3000 tokens came in under the timeout on an idle machine.
        client.chat.completions.create(
            model=keyed_server.vlm_id, max_tokens=100_000, messages=[{"role": "user", "content": content}]
        )
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    assert time.monotonic() - t0 < 15
    r = client.chat.completions.create(
        model=keyed_server.vlm_id, max_tokens=4, messages=[{"role": "user", "content": content}]
    )
    assert r.choices[0].message.content
    deadline = time.monotonic() + 30
    while keyed_server.health()["models"][keyed_server.vlm_id]["restarts"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert keyed_server.health()["models"][keyed_server.vlm_id]["restarts"] == 1
    status, err, _ = keyed_server.post("/v1/no-such-route", b"{}", {"Authorization": "Bearer sesame"})
    assert _error(status, err, 404)["type"] == "not_found_error"


# ---- remote images -----------------------------------------------------------------------------

BIG = b"\x89PNG\r\n\x1a\n" + bytes(2_100_000)  # sniffs as PNG, over the 2,000,000-byte --max-body


@pytest.fixture(scope="module")
def image_host():
    """A real HTTP server on 127.0.0.1: an image, a web page, bodies too large, redirects, a trickle."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def send(self, status: int, body: bytes, kind: str = "image/jpeg", length: bool = True, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            if length:
                self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # the client stopped reading (a body over the cap)
                pass

        def do_GET(self) -> None:
            path = self.path
            if path == "/cat.jpg":
                self.send(200, SAMPLE.read_bytes())
            elif path == "/cat":  # no image type given: the bytes are what count
                self.send(200, SAMPLE.read_bytes(), "application/octet-stream")
            elif path == "/page.html":
                self.send(200, b"<html><body>not an image</body></html>", "text/html")
            elif path == "/big.png":
                self.send(200, BIG, "image/png")
            elif path == "/big-unsized.png":  # no Content-Length: the cap applies while reading
                self.send(200, BIG, "image/png", length=False)
            elif path == "/redirect":
                self.send(302, b"", Location="/cat.jpg")
            elif path.startswith("/loop/"):
                self.send(302, b"", Location=f"/loop/{int(path[6:]) + 1}")
            elif path == "/to-ftp":
                self.send(302, b"", Location="ftp://127.0.0.1/cat.jpg")
            elif path == "/slow":
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(40):
                        self.wfile.write(b"\xff")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
            else:
                self.send(404, b"no such thing", "text/plain")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    "path, code, words",
    [
        ("/page.html", "invalid_image", "not an image"),
        ("/big.png", "image_too_large", "2,100,008 bytes"),
        ("/big-unsized.png", "image_too_large", "over 2,000,000"),
        ("/loop/0", "invalid_image_url", "more than 3 redirects"),
        ("/to-ftp", "remote_image_refused", "not http(s)"),
        ("/missing", "invalid_image_url", "HTTP 404"),
    ],
)
def test_fetching_refuses_what_is_not_a_small_image(image_host: str, path: str, code: str, words: str) -> None:
    from vlmcli.serve.remote import FetchError, fetch_image

    with pytest.raises(FetchError) as e:
        fetch_image(image_host + path, 2_000_000, timeout=5)
    assert e.value.code == code and words in e.value.message


def test_fetching_follows_a_redirect_sniffs_and_keeps_its_deadline(image_host: str) -> None:
    from vlmcli.serve.remote import FetchError, fetch_image

    assert fetch_image(image_host + "/redirect", 2_000_000) == SAMPLE.read_bytes()
    assert fetch_image(image_host + "/cat", 2_000_000) == SAMPLE.read_bytes()
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="more than 1 s"):
        fetch_image(image_host + "/slow", 2_000_000, timeout=1)  # bytes keep coming, but too slowly
    assert time.monotonic() - t0 < 3
    with pytest.raises(FetchError) as e:
        fetch_image("file:///etc/passwd", 2_000_000)
    assert e.value.code == "remote_image_refused"


def test_remote_images_only_with_the_flag(server: Server, keyed_server: Server, image_host: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:  # `server` runs without --allow-remote-images
        _chat(server, image_url=image_host + "/cat.jpg")
    assert e.value.body["code"] == "remote_image_refused" and "--allow-remote-images" in e.value.body["message"]
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sesame", max_retries=0, timeout=60)

    def ask(url: str) -> str | None:
        r = client.chat.completions.create(
            model=keyed_server.vlm_id,
            max_tokens=4,
            temperature=0,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}],
                }
            ],
        )
        return r.choices[0].message.content

    assert ask(image_host + "/redirect") == ask(DATA_URL)
    for path, code in (("/page.html", "invalid_image"), ("/big-unsized.png", "image_too_large")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(image_host + path)
        assert e.value.body["code"] == code


def test_the_most_recently_idle_worker_takes_the_next_job() -> None:
    """One request at a time stays on one worker (it keeps every core, engines/cores.py); a second
    waiting job goes to the next idle worker."""
    import threading

    from vlmcli.serve.workers import Job, ModelPool, WorkerSpec

    pool = ModelPool(WorkerSpec(model="m", kind="clip", name="m"), workers=2, queue_size=4)
    first, second = pool.workers
    got: dict[str, object] = {}

    def take(name: str, worker) -> None:
        got[name] = pool.take(worker)

    def wait_idle(worker) -> None:
        deadline = time.monotonic() + 10
        while worker not in pool._idle:
            assert time.monotonic() < deadline, "the worker never became idle"
            time.sleep(0.01)

    a = threading.Thread(target=take, args=("first", first))
    a.start()
    wait_idle(first)
    b = threading.Thread(target=take, args=("second", second))
    b.start()
    wait_idle(second)
    job1, job2 = (Job("embed", {}, lambda event: None, 60.0) for _ in range(2))
    pool.submit(job1)
    b.join(5)
    assert got == {"second": job1} and a.is_alive()  # the later idle one took it
    pool.submit(job2)
    a.join(5)
    assert got["first"] is job2
    pool.closing = True
    assert pool.take(first) is None
