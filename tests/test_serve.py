"""`vlm serve`: the real server in a subprocess on 127.0.0.1, the official `openai` client against it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
PROMPT = "What is this?"
DATA_URL = "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()


def vlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, process: subprocess.Popen, vlm_id: str, clip_id: str):
        self.port, self.process, self.vlm_id, self.clip_id = port, process, vlm_id, clip_id
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read().decode()

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])


@pytest.fixture(scope="module")
def model_dir(smolvlm2_gguf, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve-model") / "tiny-smolvlm2"
    d.mkdir()
    shutil.copy(smolvlm2_gguf.model, d)
    shutil.copy(smolvlm2_gguf.mmproj, d)
    return d


@pytest.fixture(scope="module")
def server(model_dir: Path, clip_gguf: Path, tmp_path_factory):
    port = _free_port()
    allowed = tmp_path_factory.mktemp("allowed")
    shutil.copy(SAMPLE, allowed / "cat.jpg")
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmcli", "serve", "--model", str(model_dir), "--model", str(clip_gguf), "--port", str(port),
         "--workers", "1", "--queue", "2", "--threads", "1", "--max-n", "2", "--max-body", "2000000",
         "--allow-files", str(allowed), "--timeout", "60"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    s = Server(port, process, model_dir.name, clip_gguf.stem)
    deadline = time.monotonic() + 120
    while True:
        try:
            s.get("/health")
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                process.kill()
                pytest.fail(f"the server did not start:\n{log.read()}")
            time.sleep(0.2)
    s.allowed = allowed  # type: ignore[attr-defined]
    yield s
    pids = [w["pid"] for m in s.health()["models"].values() for w in m["workers"]]
    process.send_signal(signal.SIGTERM)  # stops accepting, finishes what is in flight, stops the workers
    try:
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _chat(server: Server, max_tokens: int = 8, image_url: str = DATA_URL, **kw):
    return server.client.chat.completions.create(
        model=server.vlm_id, max_tokens=max_tokens, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": PROMPT}]}],
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


def test_chat_several_turns_answers_the_last_user_turn(server: Server, cli_answer: dict) -> None:
    r = server.client.chat.completions.create(
        model=server.vlm_id, max_tokens=8,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": "Hello"}]},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": PROMPT},
        ],
    )
    assert r.choices[0].message.content == cli_answer["answers"][0]["answer"]


def test_chat_with_an_allowed_file(server: Server, cli_answer: dict) -> None:
    r = _chat(server, image_url=str(server.allowed / "cat.jpg"))  # type: ignore[attr-defined]
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
        model=server.vlm_id, max_tokens=4, n=2, temperature=0.7, seed=3,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": PROMPT}]}],
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as e:  # over --max-n
        _chat(server, n=3)
    assert e.value.body["param"] == "n"


def test_embeddings_equal_vlm_embed(server: Server, clip_gguf: Path) -> None:
    r = vlm("embed", "--text", "a cat", "--text", "a dog", "--model", str(clip_gguf))
    assert r.returncode == 0, r.stderr
    want_texts = [json.loads(line)["embedding"] for line in r.stdout.splitlines()]
    r = vlm("embed", str(SAMPLE), "--model", str(clip_gguf))
    assert r.returncode == 0, r.stderr
    want_image = json.loads(r.stdout.splitlines()[0])["embedding"]

    got = server.client.embeddings.create(model=server.clip_id, input=["a cat", "a dog", DATA_URL], encoding_format="float")
    rows = [d.embedding for d in sorted(got.data, key=lambda d: d.index)]
    assert len(rows) == 3
    for row, want in zip(rows, [*want_texts, want_image]):
        assert row == pytest.approx(want, abs=1e-6)

    got = server.client.embeddings.create(model=server.clip_id, input="a cat", encoding_format="base64")
    raw = base64.b64decode(got.data[0].embedding)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(want_texts[0], abs=1e-6)
    default = server.client.embeddings.create(model=server.clip_id, input="a dog")  # the client asks base64 and decodes
    assert list(default.data[0].embedding) == pytest.approx(want_texts[1], abs=1e-6)


def _error(status: int, body: dict, code: int) -> dict:
    assert status == code, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_error_statuses(server: Server) -> None:
    _error(*server.post("/v1/chat/completions", b"{not json")[:2], 400)
    _error(*server.post("/v1/chat/completions", json.dumps({"model": server.vlm_id, "messages": "hi"}).encode())[:2], 400)
    bad_tokens = {"model": server.vlm_id, "max_tokens": "many",
                  "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": "x"}]}]}
    assert _error(*server.post("/v1/chat/completions", json.dumps(bad_tokens).encode())[:2], 400)["param"] == "max_tokens"
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # a body over --max-body: refused from its length
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

    bomb = Path(server.allowed) / "bomb.png"  # type: ignore[attr-defined]
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

    body = json.dumps({"model": server.vlm_id, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": PROMPT}]}]}).encode()
    stream = _chat(server, max_tokens=1200, stream=True)  # holds the only worker for a few seconds
    pieces = iter(stream)
    next(pieces)
    queued: list = []
    threads = [threading.Thread(target=lambda: queued.append(server.post("/v1/chat/completions", body))) for _ in range(2)]
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
    assert [(st, b["choices"][0]["message"]["content"]) for st, b, _ in queued] == [(200, cli_answer["answers"][0]["answer"])] * 2
    assert 'vlm_queue_depth{model="%s"} 0' % server.vlm_id in server.get("/metrics")[1]


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
    # a non-streamed request whose worker dies gets 503
    pid = h["workers"][0]["pid"]
    import threading

    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(openai.APIStatusError) as e2:
        _chat(server, max_tokens=3000)
    assert e2.value.status_code == 503
    assert _chat(server).choices[0].message.content == cli_answer["answers"][0]["answer"]


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path):
    """Two workers, a queue of 4, a 4 s timeout and an API key."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmcli", "serve", "--model", str(model_dir), "--port", str(port), "--workers", "2",
         "--queue", "4", "--threads", "1", "--max-n", "1", "--timeout", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "VLM_API_KEY": "sesame"},
    )
    s = Server(port, process, model_dir.name, "")
    deadline = time.monotonic() + 120
    while True:
        try:
            s.get("/health")
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("the server did not start")
            time.sleep(0.2)
    yield s
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_api_key_is_required(keyed_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client.models.list()
    keyed = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
    assert [m.id for m in keyed.models.list()] == [keyed_server.vlm_id]


def test_concurrent_clients_get_their_own_answers(keyed_server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
    prompts = [f"Question {i}: what is shown?" for i in range(8)]

    def ask(prompt: str):
        try:
            r = client.chat.completions.create(
                model=keyed_server.vlm_id, max_tokens=6,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": prompt}]}])
            return r.choices[0].message.content
        except openai.RateLimitError:
            return 429

    alone = [ask(p) for p in prompts]  # one at a time: each prompt's own answer
    assert 429 not in alone and len(set(alone)) > 1  # the prompts give different answers, so a mix-up would show
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert all(t in (a, 429) for t, a in zip(together, alone)), (together, alone)
    assert sum(t != 429 for t in together) >= 6  # 2 running + 4 queued at least


def test_a_request_over_the_timeout_gets_504(keyed_server: Server) -> None:
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
    content = [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": PROMPT}]
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=keyed_server.vlm_id, max_tokens=3000, messages=[{"role": "user", "content": content}])
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    assert time.monotonic() - t0 < 15
    r = client.chat.completions.create(model=keyed_server.vlm_id, max_tokens=4, messages=[{"role": "user", "content": content}])
    assert r.choices[0].message.content
    deadline = time.monotonic() + 30
    while keyed_server.health()["models"][keyed_server.vlm_id]["restarts"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert keyed_server.health()["models"][keyed_server.vlm_id]["restarts"] == 1
    status, err, _ = keyed_server.post("/v1/no-such-route", b"{}", {"Authorization": "Bearer sesame"})
    assert _error(status, err, 404)["type"] == "not_found_error"
