"""The registry (models.toml, user entries) and the store's folders."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmcli.errors import ModelError
from vlmcli.store.registry import load_registry, package_registry_path, read_registry_file
from vlmcli.store.store import Store, StoreError, config_dir, store_root, write_manifest


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_HOME", str(tmp_path / "vlm"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


# ---------------------------------------------------------------------------------------------
# Registry


def test_package_registry_has_the_known_models():
    reg = load_registry()
    expected = {
        "smolvlm2-256m": ("vlm", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
        "smolvlm2-500m": ("vlm", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
        "smolvlm2-2.2b": ("vlm", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
        "clip-vit-b32": ("clip", "openai/clip-vit-base-patch32"),
        "clip-vit-b32-laion": ("clip", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        "clip-vit-l14": ("clip", "openai/clip-vit-large-patch14"),
    }
    assert {n: (e.kind, e.repo) for n, e in reg.entries.items()} == expected
    for e in reg.entries.values():
        assert e.revision and e.license and e.size_mb and e.default_quant in e.quants()
        assert e.convert is not None and e.convert.repo == e.repo  # every model can be converted here
    smol = reg.require("smolvlm2-256m")
    assert smol.gguf is not None and smol.gguf.repo == "ggml-org/SmolVLM2-256M-Video-Instruct-GGUF"
    q8 = smol.gguf.quants["Q8_0"]
    assert (q8.model, q8.mmproj) == (
        "SmolVLM2-256M-Video-Instruct-Q8_0.gguf",
        "mmproj-SmolVLM2-256M-Video-Instruct-f16.gguf",
    )
    assert smol.default_quant == "Q8_0" and smol.pick_source("Q8_0") == "gguf"
    assert smol.pick_source("Q4_K_M") == "convert"  # no ready Q4_K_M file: converted here
    assert smol.pick_source("Q8_0", prefer="convert") == "convert"
    with pytest.raises(ModelError, match="Q2_K is not available"):
        smol.pick_source("Q2_K")
    clip = reg.require("clip-vit-b32")
    assert clip.gguf is None and clip.default_quant == "F16" and clip.pick_source("F16") == "convert"
    with pytest.raises(ModelError, match="unknown model"):
        reg.require("gpt-5")


def test_the_shipped_file_is_the_package_copy():
    # vlmcli/models.toml links to the repository root's models.toml; an installed wheel carries the content.
    assert package_registry_path().read_text() == (Path(__file__).parent.parent / "models.toml").read_text()


def test_user_files_read_as_toml(tmp_path: Path):
    path = tmp_path / "models.toml"
    path.write_text(
        textwrap.dedent(
            """
            # comment
            [models."my.model"]   # quoted key with a dot
            kind = "clip"         # trailing comment
            description = "a # inside a string, and \\"quotes\\""
            size_mb = 1_200
            [models."my.model".convert]
            repo = "me/clip"
            files = [
                "config.json",    # a list over several lines
                "model.safetensors",
            ]
            """
        )
    )
    entry = read_registry_file(path)["my.model"]
    assert entry.description == 'a # inside a string, and "quotes"'
    assert entry.size_mb == 1200.0 and entry.origin == str(path)
    assert entry.convert is not None and entry.convert.files == ("config.json", "model.safetensors")


@pytest.mark.parametrize(
    "text, where",
    [("[models.m]\nkind = clip\n", "line 2"), ("[models.m]\nkind = 1\nkind = 2\n", "line 3")],
)
def test_invalid_toml_names_the_file_and_line(tmp_path: Path, text: str, where: str):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelError) as e:
        read_registry_file(path)
    assert "invalid TOML" in str(e.value) and where in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    "body, message",
    [
        ('kind = "llm"\n[models.m.convert]\nrepo = "a/b"\n', "kind must be one of"),
        ('kind = "vlm"\n', "needs a [models.m.gguf] or [models.m.convert] source"),
        (
            'kind = "vlm"\n[models.m.gguf]\nrepo = "a/b"\n[models.m.gguf.quants.Q8_0]\nmodel = "m.gguf"\n',
            "needs mmproj",
        ),
        (
            'kind = "clip"\ndefault_quant = "Q4_0"\n[models.m.convert]\nrepo = "a/b"\nquants = ["F16"]\n',
            "default_quant Q4_0",
        ),
        ('kind = "clip"\n[models.m.convert]\nquants = ["F16"]\n', "needs repo"),
        ("kind = 3\n", "'kind' has the wrong type"),
    ],
)
def test_bad_entries_name_the_file(tmp_path: Path, body: str, message: str):
    path = tmp_path / "models.toml"
    path.write_text("[models.m]\n" + body)
    with pytest.raises(ModelError) as e:
        read_registry_file(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_user_registries_add_and_override_entries(tmp_path: Path):
    cfg = config_dir() / "models.toml"
    home = store_root() / "models.toml"
    assert cfg == tmp_path / "config" / "vlmcli" / "models.toml" and home == tmp_path / "vlm" / "models.toml"
    cfg.parent.mkdir(parents=True)
    home.parent.mkdir(parents=True)
    cfg.write_text(
        '[models.mine]\nkind = "clip"\ndescription = "from config"\n[models.mine.convert]\nrepo = "me/clip"\n'
        '[models.clip-vit-b32]\nkind = "clip"\ndescription = "my override"\n'
        '[models.clip-vit-b32.convert]\nrepo = "me/b32"\n'
    )
    home.write_text(
        '[models.mine]\nkind = "clip"\ndescription = "from VLM_HOME"\n[models.mine.convert]\nrepo = "me/clip2"\n'
    )
    reg = load_registry()
    assert reg.files[1:] == [cfg, home]
    assert reg.require("mine").description == "from VLM_HOME" and reg.require("mine").origin == str(home)
    assert reg.require("clip-vit-b32").repo == "me/b32"
    assert reg.require("smolvlm2-256m").origin == str(package_registry_path())


# ---------------------------------------------------------------------------------------------
# Store


def _staged(store: Store, name: str, quant: str, payload: bytes = b"GGUF....") -> Path:
    staging = store.new_staging_dir(name)
    (staging / "m.gguf").write_bytes(payload)
    write_manifest(
        staging, {"name": name, "kind": "clip", "quant": quant, "files": {"model": "m.gguf"}, "revision": "main"}
    )
    return staging


def test_install_is_atomic_and_replaces(tmp_path: Path):
    store = Store()
    store.ensure_writable()
    assert store.installed() == []
    m = store.install(_staged(store, "x", "F16", b"one"), "x", "F16")
    assert m.path == tmp_path / "vlm" / "models" / "x" / "F16" and m.model_path.read_bytes() == b"one"
    assert json.loads((m.path / "manifest.json").read_text())["installed"]
    m2 = store.install(_staged(store, "x", "F16", b"two"), "x", "F16")
    assert m2.model_path.read_bytes() == b"two" and [i.quant for i in store.installed()] == ["F16"]
    assert [p for p in (tmp_path / "vlm" / "tmp").rglob("*") if p.is_file()] == []


def test_incomplete_folders_do_not_count_as_installed(tmp_path: Path):
    store = Store()
    store.ensure_writable()
    half = store.models_dir / "y" / "Q8_0"
    half.mkdir(parents=True)
    (half / "m.gguf").write_bytes(b"partial")  # no manifest: an interrupted copy by hand
    lost = store.install(_staged(store, "z", "F16"), "z", "F16")
    (lost.path / "m.gguf").unlink()  # a manifest naming a missing file
    assert store.installed() == []
    assert store.find("y") is None and store.find("z") is None


def test_find_prefers_the_asked_then_default_quant():
    store = Store()
    store.ensure_writable()
    for q in ("F16", "Q8_0"):
        store.install(_staged(store, "w", q), "w", q)
    assert store.find("w", "F16").quant == "F16"
    assert store.find("w", prefer="Q8_0").quant == "Q8_0"
    assert store.find("w", "Q4_K_M") is None
    removed = store.remove("w", "F16")
    assert [m.quant for m in removed] == ["F16"] and [m.quant for m in store.installed()] == ["Q8_0"]
    store.remove("w")
    assert store.installed() == [] and not (store.models_dir / "w").exists()


def test_the_lock_excludes_other_processes(tmp_path: Path):
    store = Store()
    store.ensure_writable()
    probe = (
        "import sys, fcntl, os\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
        "except OSError:\n    print('held')\n"
    )
    lock_file = store.locks_dir / "m.lock"
    with store.lock("m"):
        held = subprocess.run([sys.executable, "-c", probe, str(lock_file)], capture_output=True, text=True).stdout
        # A second lock in this process on another descriptor must wait too: check without blocking.
        with pytest.raises(BlockingIOError):
            import fcntl
            import os

            fd = os.open(lock_file, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    free = subprocess.run([sys.executable, "-c", probe, str(lock_file)], capture_output=True, text=True).stdout
    assert (held.strip(), free.strip()) == ("held", "free")


def test_unwritable_store_is_a_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("VLM_HOME", str(tmp_path / "file" / "store"))
    with pytest.raises(StoreError) as e:
        Store().ensure_writable()
    assert "cannot create the model store" in str(e.value) and str(tmp_path / "file" / "store") in str(e.value)
