"""Starting and stopping a real `vlm serve` for the server tests: one place for the port, the wait for
/health and the shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import IO

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: list[str], log: IO[str], env: dict[str, str] | None = None, port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """`vlm serve ARGS --port PORT` with its output in log, once /health answers: (process, base URL).
    A server that exits or is not up within two minutes fails the test with its log."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "vlmcli", "serve", *args, "--port", str(port)]
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.seek(0)
                pytest.fail(f"the server did not start:\n{log.read()}")
            time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> int:
    """SIGTERM (finish what is in flight, stop the workers), 30 s, then a kill: its exit status."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
