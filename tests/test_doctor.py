"""`vlm doctor` (real subprocesses) and the default GPU setting (-ngl -1) on this build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmcli.engines.cores import available_cpus

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
SECRET = "hf_doctorTestSecretValue_0123456789"


def vlm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmcli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in env.items() if v is not None},
    )


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """An empty store, a token in the environment, a hub that is not there, offline mode on."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "VLM_"))}
    return {
        **e,
        "VLM_HOME": str(tmp_path / "store"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_TOKEN": SECRET,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "VLM_CORES_DIR": str(tmp_path / "cores"),
    }  # no other vlm work running


def _keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out.setdefault(key, []).append(value.strip())
    return out


def test_json_report_agrees_with_llama_cpp_and_ggml(env: dict[str, str]) -> None:
    from llama_cpp import llama_cpp

    from vlmcli.engines import ggml

    r = vlm("doctor", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    (line,) = r.stdout.splitlines()  # one record
    rep = json.loads(line)
    import llama_cpp as package

    import vlmcli

    assert rep["versions"]["vlmcli"] == vlmcli.__version__
    assert rep["versions"]["llama_cpp_python"] == package.__version__
    assert rep["llama"]["llama_cpp"] == llama_cpp.llama_version().decode()
    # llama.cpp's own system info, parsed: every "NAME = VALUE" of its string, per backend
    info = llama_cpp.llama_print_system_info().decode()
    assert rep["llama"]["system_info"] == info.strip()
    flags = {k: v for backend in rep["llama"]["features"].values() for k, v in backend.items()}
    for part in info.split("|"):
        if "=" in part:
            name, value = part.split(" : ")[-1].split("=")
            assert flags[name.strip()] == value.strip()
    assert "CPU" in rep["llama"]["features"]
    assert rep["llama"]["gpu_offload"] == bool(llama_cpp.llama_supports_gpu_offload())
    assert rep["llama"]["amx_compiled_in"] == ("AMX_INT8 = 1" in info)
    # ggml: the devices CLIP chooses from, with memory
    assert [d["name"] for d in rep["ggml"]["devices"]] == [d.name for d in ggml.devices()]
    cpu = next(d for d in rep["ggml"]["devices"] if d["type"] == "cpu")
    assert cpu["memory_total"] > 0 and 0 <= cpu["memory_free"] <= cpu["memory_total"]
    assert sum(b["devices"] for b in rep["ggml"]["backends"]) == len(rep["ggml"]["devices"])
    assert rep["ggml"]["version"] and rep["ggml"]["commit"]
    assert rep["cpu"]["model"] and rep["cpu"]["logical"] == os.cpu_count()
    # what runs by default
    runs = rep["runs_on"]
    cpus = available_cpus()
    assert (runs["threads"], runs["cpus"], runs["running_elsewhere"]) == (cpus, cpus, 0) and runs["n_gpu_layers"] == -1
    on_gpu = rep["llama"]["gpu_offload"]
    assert (runs["smolvlm2"] == "CPU") == (not on_gpu)
    assert (runs["clip"] == "CPU") == (not any(d["type"] in ("gpu", "igpu") for d in rep["ggml"]["devices"]))
    assert runs["detail_auto"] == ("full tiling" if on_gpu else "at most 4 tiles")
    from vlmcli.engines import clip_kernels

    assert runs["clip_cpu_kernels"] == (
        "vlm's BF16 kernels (AVX512_BF16)"
        if clip_kernels.available("bf16")
        else "vlm's I16 kernels (AVX512_VNNI)"
        if clip_kernels.available("i16-vnni")
        else "vlm's I16 kernels (AVX2)"
        if clip_kernels.available("i16-avx2")
        else "ggml"
    )
    # store (empty, not even created), its image-encoding cache (empty), the hub settings; the token only as present
    assert rep["store"] == {
        "root": env["VLM_HOME"],
        "exists": False,
        "models": [],
        "models_bytes": 0,
        "downloads_bytes": 0,
    }
    assert rep["image_cache"] == {
        "enabled": True,
        "path": str(Path(env["VLM_HOME"]) / "cache" / "encodings"),
        "entries": 0,
        "bytes": 0,
        "max_bytes": 2 * 1024**3,
    }
    assert rep["hub"] == {
        "endpoint": "http://127.0.0.1:9",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
        "offline": True,
        "token": True,
        "token_source": "HF_TOKEN",
    }
    assert isinstance(rep["warnings"], list)
    if rep["llama"]["amx_compiled_in"]:
        assert any("VLM_AMX=1" in w for w in rep["warnings"]) and rep["llama"]["extra_buffers"] is False
    assert not Path(env["VLM_HOME"]).exists()  # a doctor looks, it does not create the store


def test_clip_kernels_override_names_what_runs(env: dict[str, str]) -> None:
    """VLM_CLIP_KERNELS=i16-avx2 makes an AVX-512 CPU run what an AVX2-only one does; ggml, ggml's ops; a bad
    value is said, not raised."""
    from vlmcli.engines import clip_kernels

    def kernels(value: str) -> str:
        r = vlm("doctor", "--json", env={**env, "VLM_CLIP_KERNELS": value})
        assert r.returncode == 0, r.stderr
        return str(json.loads(r.stdout)["runs_on"]["clip_cpu_kernels"])

    assert kernels("ggml") == "ggml"
    assert kernels("fast").startswith("error: unknown VLM_CLIP_KERNELS 'fast'")
    if clip_kernels.available("i16-avx2"):
        assert kernels("i16-avx2") == "vlm's I16 kernels (AVX2)"


def test_text_report_has_every_fact_and_no_token(env: dict[str, str]) -> None:
    r = vlm("doctor", env=env)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert r.stderr == ""
    keys = _keys(r.stdout)
    for key in (
        "vlmcli",
        "python",
        "llama-cpp-python",
        "llama.cpp",
        "ggml",
        "cpu",
        "features",
        "backends",
        "device",
        "threads",
        "n-gpu-layers",
        "smolvlm2",
        "clip",
        "clip-cpu-kernels",
        "detail-auto",
        "extra-buffers",
        "store",
        "image-cache",
        "hf-endpoint",
        "hf-offline",
        "hf-token",
    ):
        assert key in keys, r.stdout
    assert keys["hf-token"] == ["set (HF_TOKEN)"]
    assert keys["hf-offline"] == ["yes (HF_HUB_OFFLINE=1)"]
    assert keys["hf-endpoint"] == ["http://127.0.0.1:9"]
    assert keys["store"] == [f"{env['VLM_HOME']} (not created yet)"]
    cpus = available_cpus()
    assert keys["threads"][0] == f"{cpus} ({cpus} CPUs for this process; -t N to fix)"
    assert any(f.startswith("CPU: ") for f in keys["features"])
    # without a token: "not set", with the default endpoint
    del env["HF_TOKEN"], env["HF_ENDPOINT"]
    keys = _keys(vlm("doctor", env=env).stdout)
    assert keys["hf-token"] == ["not set"] and keys["hf-endpoint"] == ["https://huggingface.co (default)"]


def test_a_saved_login_counts_as_a_token_without_showing_it(env: dict[str, str]) -> None:
    del env["HF_TOKEN"]
    (Path(env["HF_HOME"])).mkdir(parents=True)
    (Path(env["HF_HOME"]) / "token").write_text(SECRET)
    r = vlm("doctor", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    hub = json.loads(r.stdout)["hub"]
    assert hub["token"] is True and hub["token_source"] == str(Path(env["HF_HOME"]) / "token")


def test_installed_models_are_listed_without_being_loaded(env: dict[str, str], tmp_path: Path) -> None:
    from vlmcli.store.store import Store, write_manifest

    store = Store(Path(env["VLM_HOME"]))  # the subprocess's store (this process's VLM_HOME is not changed)
    store.ensure_writable()
    staging = store.new_staging_dir("clip-vit-b32")
    (staging / "m.gguf").write_bytes(b"GGUF" + b"\0" * 996)  # not a loadable model: the doctor must not load it
    write_manifest(
        staging,
        {"name": "clip-vit-b32", "kind": "clip", "quant": "F16", "files": {"model": "m.gguf"}, "revision": "main"},
    )
    store.install(staging, "clip-vit-b32", "F16")
    (store.downloads_dir / "smolvlm2-256m").mkdir(parents=True)
    (store.downloads_dir / "smolvlm2-256m" / "part.gguf").write_bytes(b"\0" * 500)
    r = vlm("doctor", "--json", env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["store"]
    assert s["exists"] and s["models_bytes"] == 1000 and s["downloads_bytes"] == 500
    (m,) = s["models"]
    assert (m["name"], m["kind"], m["quant"], m["size"]) == ("clip-vit-b32", "clip", "F16", 1000)
    text = _keys(vlm("doctor", env=env).stdout)
    assert text["store"] == [f"{env['VLM_HOME']} (1 model, 1 kB)"]
    assert text["model"][0].startswith("clip-vit-b32:F16 clip 1 kB ")
    assert "downloads" in text


def test_warnings() -> None:
    from vlmcli.tasks.system import warnings

    cpu_build = {
        "llama": {"gpu_offload": False, "amx_compiled_in": False, "extra_buffers": True},
        "ggml": {"devices": [{"name": "CPU", "type": "cpu"}]},
        "versions": {"llama_cpp_python": "0.3.36"},
    }
    assert warnings(cpu_build) == []
    nvidia = {**cpu_build, "gpus_visible": [{"kind": "cuda", "evidence": "/dev/nvidia0"}]}
    (w,) = warnings(nvidia)
    assert "CPU-only" in w and 'CMAKE_ARGS="-DGGML_CUDA=on"' in w and "--force-reinstall --no-cache-dir" in w
    assert "llama-cpp-python==0.3.36" in w
    rocm = {**cpu_build, "gpus_visible": [{"kind": "rocm", "evidence": "/dev/kfd"}]}
    assert "-DGGML_HIP=on" in warnings(rocm)[0]
    mac = {**cpu_build, "gpus_visible": [{"kind": "metal", "evidence": "Apple silicon (macOS arm64)"}]}
    assert "-DGGML_METAL=on" in warnings(mac)[0]
    cuda_build = {
        **nvidia,
        "llama": {**cpu_build["llama"], "gpu_offload": True},
        "ggml": {"devices": [{"name": "CPU", "type": "cpu"}, {"name": "CUDA0", "type": "gpu"}]},
    }
    assert warnings(cuda_build) == []
    amx = {**cpu_build, "llama": {"gpu_offload": False, "amx_compiled_in": True, "extra_buffers": False}}
    assert ["VLM_AMX=1" in w for w in warnings(amx)] == [True]
    assert warnings({**amx, "llama": {**amx["llama"], "extra_buffers": True}}) == []  # VLM_AMX=1 set
    broken = {**cpu_build, "llama": {"error": "OSError: libllama.so: cannot open"}}
    assert warnings(broken) == ["llama: OSError: libllama.so: cannot open"]


def test_parse_system_info() -> None:
    from vlmcli.engines.llama_native import parse_system_info

    text = "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 | CUDA : ARCHS = 860 | USE_GRAPHS = 1 | "
    assert parse_system_info(text) == {
        "CPU": {"SSE3": "1", "AVX2": "1", "AMX_INT8": "1", "OPENMP": "1", "REPACK": "1"},
        "CUDA": {"ARCHS": "860", "USE_GRAPHS": "1"},
    }
    assert parse_system_info("") == {}


# --- the default GPU setting ---------------------------------------------------------------------


def test_the_default_gpu_setting_leaves_a_cpu_build_on_the_cpu(smolvlm2_gguf, clip_gguf: Path, tmp_path: Path) -> None:
    from vlmcli.engines.ggml import Backend
    from vlmcli.engines.llama_native import supports_gpu_offload
    from vlmcli.tasks.models import ModelSpec, open_model

    assert ModelSpec().n_gpu_layers == -1  # all layers on the GPU when the build has one
    folder = tmp_path / "vlm"
    folder.mkdir()
    for p in (smolvlm2_gguf.model, smolvlm2_gguf.mmproj):
        shutil.copy(p, folder / p.name)
    with open_model(ModelSpec(str(folder), n_ctx=1024), "vlm") as vlm_model:
        assert vlm_model.engine.options.n_gpu_layers == -1
        assert vlm_model.engine.uses_gpu == supports_gpu_offload()
    with open_model(ModelSpec(str(clip_gguf)), "clip") as clip:
        assert clip.engine.backend.is_cpu == (Backend._gpu_device() is None)
    if supports_gpu_offload() or Backend._gpu_device() is not None:
        pytest.skip("a GPU build: the CPU-only checks below do not apply")
    with open_model(ModelSpec(str(folder), n_ctx=1024), "vlm") as vlm_model:
        assert vlm_model.engine.uses_gpu is False
    with open_model(ModelSpec(str(clip_gguf)), "clip") as clip:
        assert clip.engine.backend.is_cpu and clip.engine.backend.name == "CPU"


def _without_timings(text: str) -> list[dict]:
    """Records without what says how a run went rather than what it gave: timings, and whether the
    image encoding came from the cache (the second run finds the first one's)."""
    records = [json.loads(line) for line in text.splitlines()]
    for r in records:
        r.pop("timings", None)
        r.pop("cache", None)
    return records


def test_on_a_cpu_build_the_default_gives_the_records_of_ngl_0(smolvlm2_gguf, clip_gguf: Path, tmp_path: Path) -> None:
    from PIL import Image

    from vlmcli.engines.ggml import Backend
    from vlmcli.engines.llama_native import supports_gpu_offload

    if supports_gpu_offload() or Backend._gpu_device() is not None:
        pytest.skip("a GPU build: the default offloads, so its records may differ from -ngl 0")
    large = tmp_path / "large.png"  # larger than a tile: --detail auto tiles it, as the CPU policy says
    Image.open(SAMPLE).convert("RGB").resize((1400, 930)).save(large)
    env = {k: v for k, v in os.environ.items() if k != "VLM_DEBUG"}
    ask = [
        "ask",
        str(large),
        "What is this?",
        "--model",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "-n",
        "4",
        "--json",
        "-c",
        "2048",
    ]
    default, cpu = vlm(*ask, env=env), vlm(*ask, "-ngl", "0", env=env)
    assert default.returncode == 0 and cpu.returncode == 0, default.stderr + cpu.stderr
    (rec,) = _without_timings(default.stdout)
    assert rec["detail"] == "tiles" and [rec] == _without_timings(cpu.stdout)
    classify = ["classify", str(SAMPLE), "--labels", "cat,dog", "--json", "--model", str(clip_gguf)]
    default, cpu = vlm(*classify, env=env), vlm(*classify, "-ngl", "0", env=env)
    assert default.returncode == 0 and cpu.returncode == 0, default.stderr + cpu.stderr
    assert _without_timings(default.stdout) == _without_timings(cpu.stdout)
