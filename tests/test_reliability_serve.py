"""Reliability, second round (issue 36): `vlm serve`'s supervisor notices a worker's exit when it happens.

A worker killed while idle stayed listed in /health (with its dead pid) and was only replaced when a
request was sent to it, which then failed with 503.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serving import start_server, stop_server


class Server:
    def __init__(self, url: str, model: str):
        self.url, self.model = url, model

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            return json.loads(r.read())["models"][self.model]

    def embed(self, text: str) -> int:
        body = json.dumps({"model": self.model, "input": text}).encode()
        req = urllib.request.Request(
            self.url + "/v1/embeddings", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def _serve(clip_gguf: Path, log_dir: Path, workers: int):
    log = open(log_dir / "server.log", "w+")
    process, url = start_server(["--model", str(clip_gguf), "--workers", str(workers), "--timeout", "60"], log)
    return process, Server(url, clip_gguf.stem), log


@pytest.fixture(scope="module")
def server(clip_gguf, tmp_path_factory):
    process, server, log = _serve(Path(clip_gguf), tmp_path_factory.mktemp("serve-log"), workers=2)
    yield server
    stop_server(process)
    log.close()


def _wait_replaced(server: Server, index: int, old_pid: int, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        w = server.health()["workers"][index]
        if w["pid"] not in (None, old_pid) and w["alive"]:
            return w
        time.sleep(0.05)
    pytest.fail(f"worker {index} was not replaced within {seconds} s: {server.health()}")


def _wait_reaped(pid: int, seconds: float) -> None:
    """Until the killed process is gone, zombie included: its parent, the server, has waited for it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    pytest.fail(f"the server did not notice its worker {pid} exit within {seconds} s")


def test_a_worker_killed_while_idle_is_replaced_at_once(server: Server) -> None:
    assert server.embed("warm") == 200
    before = server.health()
    assert all(w["alive"] for w in before["workers"]) and before["restarts"] == 0
    pid = before["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    _wait_reaped(pid, 5)  # the server noticed the exit by itself (before, nothing reaped it until a request)
    assert server.embed("right after the kill") == 200  # never sent to the dead worker
    w = _wait_replaced(server, 0, pid, 60)
    assert server.health()["restarts"] == 1 and w["restarts"] == 1
    assert [server.embed(f"text {i}") for i in range(4)] == [200] * 4


def test_a_request_waits_for_a_replacement_when_every_worker_died(server: Server) -> None:
    pids = [w["pid"] for w in server.health()["workers"]]
    restarts = server.health()["restarts"]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _wait_reaped(pid, 5)
    assert server.embed("after both") == 200  # queued until a worker is back, not 503
    for i, pid in enumerate(pids):
        _wait_replaced(server, i, pid, 60)
    h = server.health()
    assert h["restarts"] == restarts + 2 and all(w["alive"] for w in h["workers"])
