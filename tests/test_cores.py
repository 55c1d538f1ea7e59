"""Threads per process (engines/cores.py): the CPUs it may use, shared with the vlm work running
in other processes, decided again for every image or batch, through the engines and `vlm doctor`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vlmcli.engines import cores
from vlmcli.engines.cores import CoreShare, available_cpus, running_units, share

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "vlmcli" / "data" / "chelsea.jpg"
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="core sharing needs advisory file locks (POSIX)")

# Another process running one unit of vlm work until its stdin closes (or it is killed).
PEER = textwrap.dedent("""
    import sys
    from vlmcli.engines.cores import CoreShare
    with CoreShare().running() as n:
        print(n, flush=True)
        sys.stdin.read()
""")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cores"
    monkeypatch.setenv("VLM_CORES_DIR", str(d))
    return d


@pytest.fixture
def peer(folder: Path):
    """Start peers: each is a process holding one unit of work; returns (process, threads it took)."""
    started: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, int]:
        p = subprocess.Popen(
            [sys.executable, "-c", PEER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "VLM_CORES_DIR": str(folder)},
        )
        started.append(p)
        return p, int(p.stdout.readline())

    yield start
    for p in started:
        p.kill()
        p.wait()


def age_idle_files(folder: Path) -> None:
    """Let LINGER_S pass for the finished units' files (idle: one byte long, mtime = their end)."""
    for f in folder.glob("*.lock"):
        if f.stat().st_size:
            past = f.stat().st_mtime - 10 * cores.LINGER_S
            os.utime(f, (past, past))


@pytest.fixture
def counter(folder: Path):
    """Another process, started (imports done) ahead, that counts the running units on each call."""
    code = (
        "import sys\nfrom vlmcli.engines.cores import running_units\n"
        "for _ in sys.stdin: print(running_units(), flush=True)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "VLM_CORES_DIR": str(folder)},
    )

    def count() -> int:
        p.stdin.write("\n")
        p.stdin.flush()
        return int(p.stdout.readline())

    count()
    yield count
    p.kill()
    p.wait()


def test_share_divides_the_cpus_and_never_gives_none() -> None:
    assert [share(8, others) for others in range(5)] == [8, 4, 2, 2, 1]
    assert share(1, 3) == 1 and share(2, 1) == 1 and share(3, 1) == 1


def test_a_running_peer_halves_the_share_and_a_killed_one_stops_counting(folder: Path, peer) -> None:
    cpus = available_cpus()
    assert running_units() == 0
    with CoreShare().running() as alone:
        assert alone == cpus
    age_idle_files(folder)
    p, first = peer()
    assert first == cpus  # it was alone
    assert running_units() == 1
    with CoreShare().running() as shared:
        assert shared == share(cpus, 1)
        assert running_units() == 2  # this unit counts for the others
    assert CoreShare(fixed=3).fixed == 3
    with CoreShare(fixed=3).running() as fixed:
        assert fixed == 3  # -t N is used as given
    p.send_signal(signal.SIGKILL)  # no clean-up: the kernel drops its lock
    p.wait()
    assert running_units() == 0
    # its file was removed by the one who looked; what is left is this process's own idle file
    assert [f.name.split("-")[0] for f in folder.iterdir()] == [str(os.getpid())]


def test_nested_units_of_one_thread_count_once(folder: Path) -> None:
    with CoreShare().running() as outer:
        with CoreShare().running() as inner:
            assert inner == outer
            assert len(list(folder.glob("*.lock"))) == 1
    assert [f.stat().st_size for f in folder.glob("*.lock")] == [1]  # idle now


def test_a_finished_unit_counts_for_the_others_a_moment_then_not(folder: Path, counter) -> None:
    with CoreShare().running():
        assert counter() == 1
    # between two units (a server worker between requests): still counted elsewhere, not here
    assert counter() == 1
    assert running_units() == 0
    with CoreShare().running() as n:
        assert n == available_cpus()
        assert len(list(folder.glob("*.lock"))) == 1  # the same file, taken back
    age_idle_files(folder)
    assert counter() == 0
    assert len(list(folder.glob("*.lock"))) == 1  # kept (locked) for this process's next unit


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_threads_follow_the_affinity_mask(folder: Path) -> None:
    one = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{one}}}); "
        "from vlmcli.engines.cores import available_cpus; print(available_cpus())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_llama_engine_takes_its_share_per_image(smolvlm2_gguf, folder: Path, peer) -> None:
    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine, llama
    from vlmcli.images import load_image

    cpus = available_cpus()
    image = load_image(SAMPLE)
    gen = GenerationOptions(max_tokens=2)
    engine = VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail="low", n_ctx=1024))
    try:
        alone = next(engine.ask(image, ["What is this?"], gen)).text
        assert llama.llama_n_threads(engine._ctx) == llama.llama_n_threads_batch(engine._ctx) == cpus
        p, _ = peer()
        shared = next(engine.ask(image, ["What is this?"], gen)).text
        assert llama.llama_n_threads(engine._ctx) == share(cpus, 1)
        assert {threads for _, threads in engine._mtmd} == {cpus, share(cpus, 1)}  # the encoder's too
        assert shared == alone  # greedy: the thread count changes the speed, not the answer's tokens
        p.kill()
        p.wait()
        next(engine.ask(image, ["What is this?"], gen))
        assert llama.llama_n_threads(engine._ctx) == cpus
    finally:
        engine.close()
    fixed = VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail="low", n_ctx=1024, n_threads=1))
    try:
        peer()
        next(fixed.ask(image, ["What is this?"], gen))
        assert llama.llama_n_threads(fixed._ctx) == 1
    finally:
        fixed.close()


def test_clip_engine_takes_its_share_per_call(clip_gguf, folder: Path, peer) -> None:
    from vlmcli.engines.clip import ClipModel

    cpus = available_cpus()
    model = ClipModel.load(clip_gguf)
    try:
        s = model.config.image_size
        pixels = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)
        alone = model.encode_images(pixels)
        assert model.n_threads == cpus
        peer()
        shared = model.encode_images(pixels)
        assert model.n_threads == share(cpus, 1)
        # ggml's CPU matmuls split rows between threads, not the sums inside a row: the same numbers
        np.testing.assert_array_equal(shared, alone)
    finally:
        model.close()


def test_doctor_reports_the_share_with_other_vlm_work(folder: Path, peer, tmp_path: Path) -> None:
    env = {**os.environ, "VLM_HOME": str(tmp_path / "store"), "VLM_CORES_DIR": str(folder), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vlmcli", "doctor", "--json"]
    cpus = available_cpus()
    runs = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout)["runs_on"]
    assert (runs["threads"], runs["cpus"], runs["running_elsewhere"]) == (cpus, cpus, 0)
    peer()
    text = subprocess.run([*cmd[:-1]], capture_output=True, text=True, env=env, check=True).stdout
    line = next(line for line in text.splitlines() if line.startswith("threads "))
    assert line.split()[1] == str(share(cpus, 1)) and "shared with 1 vlm computation running now" in line
