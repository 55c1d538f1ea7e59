"""resolve_model: store names (pulled on first use from a real local HTTP hub), GGUF paths, folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fixtures.hub_server import CLIP_REPO, SMOLVLM2_GGUF_REPO, FakeHub, hub_content, start_fake_hub

from vlmcli.errors import ModelError
from vlmcli.store.resolve import ResolvedModel, resolve_model

LM = "SmolVLM2-256M-Video-Instruct-Q8_0.gguf"
PROJ = "mmproj-SmolVLM2-256M-Video-Instruct-f16.gguf"
CLIP = "clip-vit-base-patch32-F16.gguf"


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    return hub_content(tmp_path_factory.mktemp("hub-content"))


@pytest.fixture
def hub(content, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server = start_fake_hub(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # read by vlmcli.store.hub at call time
    monkeypatch.setenv("VLM_HOME", str(tmp_path / "vlm"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


# ---------------------------------------------------------------------------------------------
# Store names


def test_default_vlm_is_pulled_on_first_use_then_used_offline(hub: FakeHub, content, tmp_path: Path):
    notices: list[str] = []
    r = resolve_model(None, "vlm", notify=notices.append)
    assert isinstance(r, ResolvedModel)
    assert (r.kind, r.name, r.quant, r.source) == ("vlm", "smolvlm2-256m", "Q8_0", "store")
    assert r.model.read_bytes() == content[SMOLVLM2_GGUF_REPO][LM]
    assert r.mmproj is not None and r.mmproj.read_bytes() == content[SMOLVLM2_GGUF_REPO][PROJ]
    assert r.model.parent == tmp_path / "vlm" / "models" / "smolvlm2-256m" / "Q8_0"
    assert any("not installed yet" in n and "vlm pull smolvlm2-256m" in n for n in notices)
    assert any(n.startswith("installed smolvlm2-256m Q8_0") for n in notices)

    # Installed now: no network, no notice, also in offline mode and with an explicit quant.
    seen = len(hub.requests())
    notices.clear()
    again = resolve_model("smolvlm2-256m", "vlm", offline=True, notify=notices.append)
    assert again == r and notices == []
    assert resolve_model("SMOLVLM2-256M:q8_0", "vlm", pull=False) == r
    assert resolve_model("smolvlm2-256m", "vlm", quant="Q8_0", pull=False) == r
    assert len(hub.requests()) == seen

    # Another quantization is not installed: offline, the error says what to run.
    with pytest.raises(ModelError) as e:
        resolve_model("smolvlm2-256m:f16", "vlm", offline=True)
    assert "vlm pull smolvlm2-256m --quant F16" in str(e.value)

    # An installed file that changed is reported, not handed to llama.cpp.
    with open(r.mmproj, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelError, match="changed size"):
        resolve_model("smolvlm2-256m", "vlm")


def test_not_installed_and_offline_names_the_pull_command(hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ModelError) as e:
        resolve_model("smolvlm2-256m", "vlm", offline=True)
    assert "offline" in str(e.value) and "vlm pull smolvlm2-256m" in str(e.value)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline=None follows the environment
    with pytest.raises(ModelError, match="vlm pull clip-vit-b32"):
        resolve_model(None, "clip")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    with pytest.raises(ModelError, match=r"not installed; run: vlm pull smolvlm2-256m --quant F16"):
        resolve_model("smolvlm2-256m", "vlm", quant="f16", pull=False)
    assert hub.requests() == []


def test_kind_mismatch_and_unknown_names_fail_before_any_download(hub: FakeHub):
    with pytest.raises(ModelError, match="this is a clip model; this command needs a vlm model"):
        resolve_model("clip-vit-b32", "vlm")
    with pytest.raises(ModelError, match="this is a vlm model"):
        resolve_model("smolvlm2-256m", "clip")
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("no-such-model", "vlm")
    with pytest.raises(ModelError, match="no such model file"):
        resolve_model("missing/model.gguf", "vlm")
    with pytest.raises(ModelError, match="two quantizations"):
        resolve_model("smolvlm2-256m:Q8_0", "vlm", quant="F16")
    with pytest.raises(ModelError, match="--mmproj only applies"):
        resolve_model(None, "clip", mmproj="x.gguf")
    assert hub.requests() == []


def test_user_registry_model_is_pulled_by_name(hub: FakeHub, content, tmp_path: Path):
    hub.add_repo("me/clip-GGUF", {CLIP: content["tests/clip-vit-b32-GGUF"][CLIP]})
    (tmp_path / "config" / "vlmcli").mkdir(parents=True)
    (tmp_path / "config" / "vlmcli" / "models.toml").write_text(
        '[models.my-clip]\nkind = "clip"\n[models.my-clip.gguf]\nrepo = "me/clip-GGUF"\n'
        f'[models.my-clip.gguf.quants.F16]\nmodel = "{CLIP}"\n'
    )
    r = resolve_model("my-clip", "clip")
    assert (r.kind, r.name, r.quant, r.source, r.mmproj) == ("clip", "my-clip", "F16", "store", None)
    assert r.model.read_bytes() == content["tests/clip-vit-b32-GGUF"][CLIP]
    assert not any(CLIP_REPO in q.path for q in hub.requests())


# ---------------------------------------------------------------------------------------------
# Paths


def _one_pair(content) -> dict[str, bytes]:
    """The model, its registry projector (f16) and the README: the repository without its second projector."""
    return {k: v for k, v in content[SMOLVLM2_GGUF_REPO].items() if not (k.startswith("mmproj") and k != PROJ)}


def test_gguf_file_finds_the_projector_beside_it(content, tmp_path: Path):
    folder = write(tmp_path / "m", _one_pair(content))  # model, mmproj and a README
    r = resolve_model(str(folder / LM), "vlm")
    assert (r.model, r.mmproj, r.quant, r.source, r.name) == (folder / LM, folder / PROJ, "Q8_0", "file", LM[:-5])


def test_gguf_file_without_projector_is_a_clear_error(content, tmp_path: Path):
    lm_only = write(tmp_path / "lm", {LM: content[SMOLVLM2_GGUF_REPO][LM]})
    with pytest.raises(ModelError, match="no vision projector: pass --mmproj"):
        resolve_model(str(lm_only / LM), "vlm")
    proj = write(tmp_path / "p", {PROJ: content[SMOLVLM2_GGUF_REPO][PROJ]}) / PROJ
    r = resolve_model(str(lm_only / LM), "vlm", mmproj=str(proj))
    assert r.mmproj == proj


def test_files_of_the_wrong_kind_are_rejected(content, tmp_path: Path):
    folder = write(tmp_path / "m", {**content[SMOLVLM2_GGUF_REPO], CLIP: content["tests/clip-vit-b32-GGUF"][CLIP]})
    with pytest.raises(ModelError, match="vision projector.*expected a language model"):
        resolve_model(str(folder / PROJ), "vlm")
    with pytest.raises(ModelError, match="two-tower CLIP.*expected a language model"):
        resolve_model(str(folder / CLIP), "vlm", mmproj=str(folder / PROJ))
    with pytest.raises(ModelError, match="language model GGUF, expected a vision projector"):
        resolve_model(str(folder / LM), "vlm", mmproj=str(folder / LM))
    with pytest.raises(ModelError, match="expected a two-tower CLIP"):
        resolve_model(str(folder / PROJ), "clip")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "junk.gguf"), "clip")


def test_folders(content, tmp_path: Path):
    pair = write(tmp_path / "pair", _one_pair(content))
    r = resolve_model(str(pair), "vlm")
    assert (r.model, r.mmproj, r.source, r.name) == (pair / LM, pair / PROJ, "folder", "pair")

    clip = write(tmp_path / "clip", content["tests/clip-vit-b32-GGUF"])
    r = resolve_model(str(clip), "clip")
    assert (r.model, r.mmproj, r.quant, r.source) == (clip / CLIP, None, "F16", "folder")

    shutil.copy(pair / PROJ, pair / "mmproj-other.gguf")  # ambiguous: two projectors
    with pytest.raises(ModelError) as e:
        resolve_model(str(pair), "vlm")
    assert "several vision projectors" in str(e.value) and PROJ in str(e.value) and "mmproj-other.gguf" in str(e.value)
    assert resolve_model(str(pair), "vlm", mmproj=str(pair / "mmproj-other.gguf")).mmproj == pair / "mmproj-other.gguf"

    lm_only = write(tmp_path / "lm-only", {LM: content[SMOLVLM2_GGUF_REPO][LM]})
    with pytest.raises(ModelError, match="no vision projector"):
        resolve_model(str(lm_only), "vlm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no .gguf files"):
        resolve_model(str(tmp_path / "empty"), "clip")
