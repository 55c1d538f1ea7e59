"""`vlm pull` / `vlm models` / `vlm rm` against a real HTTP server speaking the Hub's download protocol.

The CLI runs in subprocesses (huggingface-hub reads HF_ENDPOINT at import) with VLM_HOME, HF_HOME and
the config dir in tmp folders. Files served are the project's own tiny checkpoints and their GGUFs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from fixtures.hub_server import (
    SMOLVLM2_GGUF_REPO,
    SMOLVLM2_REPO,
    FakeHub,
    cli_env,
    error_line,
    hub_content,
    run_vlm,
    start_fake_hub,
    vlm_command,
)

from vlmcli.gguf.validate import require_kind

GGUF_MODEL = "SmolVLM2-256M-Video-Instruct-Q8_0.gguf"
GGUF_MMPROJ = "mmproj-SmolVLM2-256M-Video-Instruct-f16.gguf"


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    return hub_content(tmp_path_factory.mktemp("hub-content"))


@pytest.fixture
def hub(content, tmp_path: Path):
    server = start_fake_hub(tmp_path)
    yield server
    server.stop()


def installed(env: dict[str, str]) -> list[dict]:
    r = run_vlm(env, "models", "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def store_files(vlm_home: Path, sub: str) -> list[str]:
    """The files under one of the store's folders (models/, tmp/, downloads/)."""
    return sorted(str(p.relative_to(vlm_home)) for p in (vlm_home / sub).rglob("*") if p.is_file())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_user_registry(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Pulls of each source kind


def test_pull_ready_gguf_installs_the_two_files_with_a_manifest(hub: FakeHub, content, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    r = run_vlm(env, "pull", "smolvlm2-256m")
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    assert folder == tmp_path / "vlm" / "models" / "smolvlm2-256m" / "Q8_0"

    served = content[SMOLVLM2_GGUF_REPO]
    assert (folder / GGUF_MODEL).read_bytes() == served[GGUF_MODEL]
    assert (folder / GGUF_MMPROJ).read_bytes() == served[GGUF_MMPROJ]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["name"] == "smolvlm2-256m" and manifest["kind"] == "vlm" and manifest["quant"] == "Q8_0"
    assert manifest["source"] == "gguf" and manifest["repo"] == SMOLVLM2_GGUF_REPO
    assert manifest["revision"] == "main" and manifest["commit"] == hub.repos[SMOLVLM2_GGUF_REPO].commit
    assert manifest["files"] == {"model": GGUF_MODEL, "mmproj": GGUF_MMPROJ}
    assert manifest["sha256"] == {GGUF_MODEL: sha256(served[GGUF_MODEL]), GGUF_MMPROJ: sha256(served[GGUF_MMPROJ])}

    # Only the two files were downloaded (not the README), pinned to the commit the revision resolved to.
    commit = hub.repos[SMOLVLM2_GGUF_REPO].commit
    assert not hub.requests(pattern="*README.md")
    assert {r.path.rsplit("/", 1)[-1] for r in hub.requests("HEAD")} == {GGUF_MODEL, GGUF_MMPROJ}
    assert all(f"/resolve/{commit}/" in r.path for r in hub.requests("HEAD"))
    # Nothing left behind besides the model.
    assert not (tmp_path / "vlm" / "downloads" / "smolvlm2-256m").exists()

    (record,) = installed(env)
    assert record["name"] == "smolvlm2-256m" and record["quant"] == "Q8_0" and record["commit"] == commit
    assert record["size"] == len(served[GGUF_MODEL]) + len(served[GGUF_MMPROJ])

    # A second pull finds it installed and downloads nothing.
    before = len(hub.requests())
    r2 = run_vlm(env, "pull", "smolvlm2-256m")
    assert r2.returncode == 0 and "already installed" in r2.stderr
    assert len(hub.requests()) == before

    table = run_vlm(env, "models")
    assert table.returncode == 0
    for text in ("smolvlm2-256m", "vlm", "Q8_0", str(folder), commit[:12]):
        assert text in table.stdout


def test_pull_converts_a_safetensors_checkpoint(hub: FakeHub, content, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    r = run_vlm(env, "pull", "smolvlm2-256m", "--from", "convert", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["source"] == "convert" and record["repo"] == SMOLVLM2_REPO and record["quant"] == "Q8_0"
    # The converter's output is a real model + projector pair, named after the repository.
    assert require_kind(record["model"], "llm").file_type == "Q8_0"
    require_kind(record["mmproj"], "mmproj")
    assert Path(record["model"]).name == "SmolVLM2-256M-Video-Instruct-Q8_0.gguf"
    manifest = json.loads((Path(record["path"]) / "manifest.json").read_text())
    served = content[SMOLVLM2_REPO]
    assert manifest["source_files"]["model.safetensors"] == sha256(served["model.safetensors"])
    # Root-level checkpoint files only: no ONNX export, no README.
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests("HEAD")}
    assert "model.safetensors" in fetched and "tokenizer.json" in fetched and "config.json" in fetched
    assert "vision_encoder.onnx" not in fetched and "README.md" not in fetched
    assert not (tmp_path / "vlm" / "downloads" / "smolvlm2-256m").exists()


def test_pull_clip_converts_and_rm_removes(hub: FakeHub, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    r = run_vlm(env, "pull", "clip-vit-b32", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["kind"] == "clip" and record["quant"] == "F16" and record["mmproj"] is None
    require_kind(record["model"], "clip")
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests("HEAD")}
    assert "open_clip_model.safetensors" not in fetched  # another layout, not for the converter

    r = run_vlm(env, "rm", "clip-vit-b32")
    assert r.returncode == 0, r.stderr
    assert "removed clip-vit-b32 F16" in r.stderr
    assert installed(env) == []
    assert not Path(record["path"]).exists()
    assert "not installed" in error_line(run_vlm(env, "rm", "clip-vit-b32"))


def test_unknown_name_and_unavailable_quant_are_one_line_errors(hub: FakeHub, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    line = error_line(run_vlm(env, "pull", "no-such-model"))
    assert "unknown model" in line and "smolvlm2-256m" in line
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m", "--quant", "Q2_K"))
    assert "Q2_K is not available" in line and "Q8_0" in line
    line = error_line(run_vlm(env, "pull", "clip-vit-b32", "--from", "gguf"))
    assert "no 'gguf' source" in line
    assert hub.requests() == []


# ---------------------------------------------------------------------------------------------
# Interrupted downloads


def test_dropped_connection_is_resumed_with_a_range_request(hub: FakeHub, content, tmp_path: Path):
    # huggingface-hub writes what it received in 10 MiB chunks and, when the connection drops,
    # asks for the rest with a Range request: drop the 13 MB checkpoint after 11 MB.
    served = content[SMOLVLM2_REPO]["model.safetensors"]
    assert len(served) > 11_000_000
    blob = f"/cdn/{sha256(served)}"
    hub.add_fault(blob, "drop", after_bytes=11_000_000, times=1)
    env = cli_env(tmp_path, hub)
    r = run_vlm(env, "pull", "smolvlm2-256m", "--from", "convert", "--json")
    assert r.returncode == 0, r.stderr
    gets = hub.requests("GET", blob)
    assert len(gets) == 2
    assert gets[0].range is None and gets[0].sent == 11_000_000
    assert gets[1].range == f"bytes={10 * 1024 * 1024}-" and gets[1].status == 206
    manifest = json.loads((Path(json.loads(r.stdout)["path"]) / "manifest.json").read_text())
    assert manifest["source_files"]["model.safetensors"] == sha256(served)


def test_killed_pull_installs_nothing_and_the_rerun_keeps_finished_files(hub: FakeHub, content, tmp_path: Path):
    served = content[SMOLVLM2_GGUF_REPO]
    model_blob = f"/cdn/{sha256(served[GGUF_MODEL])}"
    mmproj_blob = f"/cdn/{sha256(served[GGUF_MMPROJ])}"
    stall = hub.add_fault(mmproj_blob, "stall", after_bytes=100_000, times=1)
    env = cli_env(tmp_path, hub)
    proc = subprocess.Popen(
        vlm_command("pull", "smolvlm2-256m"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert stall.started.wait(120), "the pull never reached the second file"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        stall.release.set()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    # The first file was complete, the second half-way: nothing is installed.
    assert installed(env) == []
    assert not (tmp_path / "vlm" / "models" / "smolvlm2-256m").exists()

    r = run_vlm(env, "pull", "smolvlm2-256m")
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    assert (folder / GGUF_MODEL).read_bytes() == served[GGUF_MODEL]
    assert (folder / GGUF_MMPROJ).read_bytes() == served[GGUF_MMPROJ]
    assert len(hub.requests("GET", model_blob)) == 1  # the finished file was not fetched again
    assert len(hub.requests("GET", mmproj_blob)) == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", GGUF_MODEL, GGUF_MMPROJ])
    assert store_files(tmp_path / "vlm", "tmp") == []  # the killed pull's staging folder is gone
    assert store_files(tmp_path / "vlm", "downloads") == []


def test_checksum_mismatch_installs_nothing(hub: FakeHub, content, tmp_path: Path):
    served = content[SMOLVLM2_GGUF_REPO][GGUF_MODEL]
    blob = f"/cdn/{sha256(served)}"
    fault = hub.add_fault(blob, "corrupt", times=None)
    env = cli_env(tmp_path, hub)
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m"))
    assert "checksum mismatch" in line and "nothing was installed" in line and GGUF_MODEL in line
    assert installed(env) == []
    assert not (tmp_path / "vlm" / "models" / "smolvlm2-256m").exists()

    # The corrupt file is not kept: once the server is fixed, the retry downloads it again.
    hub.faults.remove(fault)
    r = run_vlm(env, "pull", "smolvlm2-256m")
    assert r.returncode == 0, r.stderr
    assert (Path(r.stdout.strip()) / GGUF_MODEL).read_bytes() == served
    assert len(hub.requests("GET", blob)) == 2


# ---------------------------------------------------------------------------------------------
# Server and network failures: one line each, nothing installed


def test_server_error_on_the_api_is_one_line(hub: FakeHub, tmp_path: Path):
    hub.add_fault("/api/models/*", "status", status=500, times=None)
    env = cli_env(tmp_path, hub)
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m"))
    assert "HTTP 500" in line and "server error" in line
    assert installed(env) == []


def test_server_error_on_a_download_is_one_line(hub: FakeHub, content, tmp_path: Path):
    blob = f"/cdn/{sha256(content[SMOLVLM2_GGUF_REPO][GGUF_MODEL])}"
    hub.add_fault(blob, "status", status=503, times=None)
    env = cli_env(tmp_path, hub)
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m"))
    assert "HTTP 503" in line and GGUF_MODEL in line
    assert installed(env) == []


def test_missing_repo_revision_and_file_are_one_line_each(hub: FakeHub, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m", "--revision", "no-such-branch"))
    assert "revision 'no-such-branch' not found" in line

    write_user_registry(
        tmp_path / "vlm" / "models.toml",
        """
[models.ghost]
kind = "vlm"
[models.ghost.gguf]
repo = "nobody/ghost-GGUF"
[models.ghost.gguf.quants.Q8_0]
model = "ghost-Q8_0.gguf"
mmproj = "mmproj-ghost-Q8_0.gguf"

[models.typo]
kind = "vlm"
[models.typo.gguf]
repo = "ggml-org/SmolVLM2-256M-Video-Instruct-GGUF"
[models.typo.gguf.quants.Q8_0]
model = "SmolVLM2-256M-Video-Instruct-Q8_O.gguf"
mmproj = "mmproj-SmolVLM2-256M-Video-Instruct-f16.gguf"
""",
    )
    line = error_line(run_vlm(env, "pull", "ghost"))
    assert "nobody/ghost-GGUF" in line and "repository not found" in line and "HF_TOKEN" in line
    line = error_line(run_vlm(env, "pull", "typo"))
    assert "SmolVLM2-256M-Video-Instruct-Q8_O.gguf" in line and "file not found" in line
    assert GGUF_MODEL in line  # says what the repository does have
    assert installed(env) == []


def test_gated_repo_needs_hf_token(hub: FakeHub, content, tmp_path: Path):
    hub.add_repo("corp/gated-clip-GGUF", dict(content["tests/clip-vit-b32-GGUF"]), gated_token="hf_secret")
    write_user_registry(
        tmp_path / "config" / "vlmcli" / "models.toml",
        """
[models.gated-clip]
kind = "clip"
[models.gated-clip.gguf]
repo = "corp/gated-clip-GGUF"
[models.gated-clip.gguf.quants.F16]
model = "clip-vit-base-patch32-F16.gguf"
""",
    )
    line = error_line(run_vlm(cli_env(tmp_path, hub), "pull", "gated-clip"))
    assert "gated" in line and "HF_TOKEN" in line
    r = run_vlm(cli_env(tmp_path, hub, HF_TOKEN="hf_secret"), "pull", "gated-clip")
    assert r.returncode == 0, r.stderr
    assert any(q.authorization == "Bearer hf_secret" for q in hub.requests("HEAD"))


def test_vanished_server_is_one_line(tmp_path: Path):
    gone = FakeHub().start()
    url = gone.url
    gone.stop()  # nothing listens on its port any more
    env = cli_env(tmp_path, None, HF_ENDPOINT=url)
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m"))
    assert f"cannot download from {url}: connection refused" in line


def test_offline_mode_refuses_to_pull(hub: FakeHub, tmp_path: Path):
    env = cli_env(tmp_path, hub, HF_HUB_OFFLINE="1")
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m"))
    assert "offline" in line
    assert hub.requests() == []


# ---------------------------------------------------------------------------------------------
# A store that cannot be written


def test_store_under_a_file_is_one_line(hub: FakeHub, tmp_path: Path):
    (tmp_path / "afile").write_text("not a folder")
    env = cli_env(tmp_path, hub, VLM_HOME=str(tmp_path / "afile" / "store"))
    line = error_line(run_vlm(env, "pull", "smolvlm2-256m"))
    assert "cannot create the model store" in line and "not a folder" in line and "VLM_HOME" in line


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    r = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


needs_mount = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare --mount` and tmpfs mounts (root)")


def _run_in_tmpfs(env: dict[str, str], mount_opts: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a private mount namespace with VLM_HOME on a fresh tmpfs mounted with `mount_opts`."""
    home = env["VLM_HOME"]
    os.makedirs(home, exist_ok=True)
    script = f'mount -t tmpfs -o {mount_opts} tmpfs "$VLM_HOME" && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", *vlm_command(*args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_mount
def test_read_only_store_is_one_line(hub: FakeHub, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    line = error_line(_run_in_tmpfs(env, "ro,size=64m", "pull", "smolvlm2-256m"))
    assert "read-only file system" in line and "VLM_HOME" in line
    assert hub.requests(pattern="/cdn/*") == []


@needs_mount
def test_full_disk_is_one_line(hub: FakeHub, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    # 2 MB cannot hold the 8 MB model: refused before downloading.
    line = error_line(_run_in_tmpfs(env, "size=2m", "pull", "smolvlm2-256m"))
    assert "not enough free space" in line and "VLM_HOME" in line
    assert hub.requests(pattern="/cdn/*") == []


@needs_mount
def test_disk_filling_up_during_the_pull_is_one_line(hub: FakeHub, tmp_path: Path):
    env = cli_env(tmp_path, hub)
    # Plenty of bytes but room for only a few files (inodes): the space check passes and the pull
    # then meets a real ENOSPC from the kernel on a file it creates mid-way.
    line = error_line(_run_in_tmpfs(env, "size=64m,nr_inodes=16", "pull", "smolvlm2-256m", "--from", "convert"))
    assert "no space left on the device" in line
    assert not list((tmp_path / "vlm").glob("models/*/*/manifest.json"))


# ---------------------------------------------------------------------------------------------
# Concurrency and user registries


def test_two_pulls_at_once_keep_the_store_consistent(hub: FakeHub, content, tmp_path: Path):
    served = content[SMOLVLM2_GGUF_REPO]
    blob = f"/cdn/{sha256(served[GGUF_MODEL])}"
    hub.add_fault(blob, "slow", delay=0.01, times=None)  # about 1.3 s per download: the pulls overlap
    env = cli_env(tmp_path, hub)
    procs = [
        subprocess.Popen(
            vlm_command("pull", "smolvlm2-256m"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]  # both print the same installed folder
    assert sum("already installed" in err for _, err in outs) == 1
    assert len(hub.requests("GET", blob)) == 1  # the second pull waited, then found it installed
    (record,) = installed(env)
    folder = Path(record["path"])
    assert (folder / GGUF_MODEL).read_bytes() == served[GGUF_MODEL]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", GGUF_MODEL, GGUF_MMPROJ])


def test_user_registry_entry_is_listed_pulled_and_overrides(hub: FakeHub, content, tmp_path: Path):
    hub.add_repo("me/my-clip-GGUF", dict(content["tests/clip-vit-b32-GGUF"]))
    user_toml = tmp_path / "vlm" / "models.toml"
    write_user_registry(
        user_toml,
        """
# my own models
[models.my-clip]
kind = "clip"
description = "my CLIP"
repo = "openai/clip-vit-base-patch32"
default_quant = "F16"

[models.my-clip.gguf]
repo = "me/my-clip-GGUF"
revision = "main"

[models.my-clip.gguf.quants.F16]
model = "clip-vit-base-patch32-F16.gguf"
""",
    )
    env = cli_env(tmp_path, hub)
    r = run_vlm(env, "models", "--available", "--json")
    assert r.returncode == 0, r.stderr
    entries = {e["name"]: e for e in map(json.loads, r.stdout.splitlines())}
    assert entries["my-clip"]["registry"] == str(user_toml)
    assert entries["my-clip"]["sources"]["gguf"]["repo"] == "me/my-clip-GGUF"
    assert "smolvlm2-256m" in entries  # the package's entries are still there

    r = run_vlm(env, "pull", "my-clip", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["source"] == "gguf" and record["repo"] == "me/my-clip-GGUF"
    assert Path(record["model"]).read_bytes() == content["tests/clip-vit-b32-GGUF"]["clip-vit-base-patch32-F16.gguf"]

    # A wrong kind in a user entry is caught before anything is installed.
    write_user_registry(
        user_toml,
        """
[models.not-a-vlm]
kind = "vlm"
[models.not-a-vlm.gguf]
repo = "me/my-clip-GGUF"
[models.not-a-vlm.gguf.quants.F16]
model = "clip-vit-base-patch32-F16.gguf"
mmproj = "clip-vit-base-patch32-F16.gguf"
""",
    )
    line = error_line(run_vlm(env, "pull", "not-a-vlm"))
    assert "two-tower CLIP" in line and "expected a language model" in line
    assert not (tmp_path / "vlm" / "models" / "not-a-vlm").exists()

    # A broken user registry names its file.
    write_user_registry(user_toml, '[models.bad]\nkind = "llm"\n')
    line = error_line(run_vlm(env, "models", "--available"))
    assert str(user_toml) in line and "kind must be one of" in line
