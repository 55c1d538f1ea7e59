"""What will run here, and how fast it can be: the facts `vlm doctor` reports, gathered without
loading a model or touching the network.

`system_report()` returns one JSON-ready dict. Each section that needs native code (llama.cpp, ggml)
is gathered on its own: a broken install still gets a report, with an `error` in that section.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable
from typing import Any

from vlmcli import __version__
from vlmcli.defaults import DEFAULT_N_GPU_LAYERS
from vlmcli.engines import cores  # no native code: cheap to import

# The flag that builds llama.cpp (inside llama-cpp-python) with each GPU backend.
CMAKE_FLAGS = {
    "cuda": "-DGGML_CUDA=on",
    "rocm": "-DGGML_HIP=on",
    "metal": "-DGGML_METAL=on",
    "vulkan": "-DGGML_VULKAN=on",
}
REBUILD = 'CMAKE_ARGS="{flag}" pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python=={version}'
GPU_DEVICE_TYPES = ("gpu", "igpu")


def _section(gather: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return gather()
    except Exception as e:  # noqa: BLE001 - a doctor reports what is broken instead of failing
        return {"error": f"{type(e).__name__}: {e}"}


def default_threads() -> dict[str, int]:
    """The CPU threads an engine started now would use without -t: its share of the CPUs this
    process may use, with the vlm work running now elsewhere (engines/cores.py)."""
    cpus, running = cores.available_cpus(), cores.running_units()
    return {"threads": cores.share(cpus, running), "cpus": cpus, "running_elsewhere": running}


def cpu_model() -> str:
    """The CPU's name as the OS reports it."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                        return value.strip()
        except OSError:
            pass
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def visible_gpus() -> list[dict[str, str]]:
    """GPUs the machine shows whether or not this build can use them: [{kind, evidence}]."""
    found = []
    nvidia = [
        e
        for e, ok in (
            ("nvidia-smi on PATH", shutil.which("nvidia-smi")),
            ("/dev/nvidia0", os.path.exists("/dev/nvidia0")),
        )
        if ok
    ]
    if nvidia:
        found.append({"kind": "cuda", "evidence": ", ".join(nvidia)})
    if os.path.exists("/dev/kfd"):
        found.append({"kind": "rocm", "evidence": "/dev/kfd"})
    if sys.platform == "darwin" and platform.machine() == "arm64":
        found.append({"kind": "metal", "evidence": "Apple silicon (macOS arm64)"})
    return found


def _versions() -> dict[str, Any]:
    from importlib import metadata

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "vlmcli": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "llama_cpp_python": dist("llama-cpp-python"),
        "huggingface_hub": dist("huggingface-hub"),
    }


def _llama() -> dict[str, Any]:
    from vlmcli.engines import llama_native

    info = llama_native.system_info()
    return {
        "llama_cpp": llama_native.llama_cpp_version(),
        "system_info": info.strip(),
        "features": llama_native.parse_system_info(info),
        "gpu_offload": llama_native.supports_gpu_offload(),
        "amx_compiled_in": llama_native.amx_compiled_in(),
        "extra_buffers": llama_native.extra_buffers_allowed(),
        "vlm_amx": os.environ.get("VLM_AMX") or None,
    }


def _ggml() -> dict[str, Any]:
    from vlmcli.engines import ggml

    version, commit = ggml.version()
    return {
        "version": version,
        "commit": commit,
        "library": str(ggml.lib().path),
        "backends": [{"name": n, "devices": d} for n, d in ggml.backends()],
        "devices": [
            {
                "name": d.name,
                "description": d.description,
                "type": d.type,
                "backend": d.backend,
                "memory_total": d.memory_total,
                "memory_free": d.memory_free,
            }
            for d in ggml.devices()
        ],
    }


def _store() -> dict[str, Any]:
    from vlmcli.store.store import Store, dir_size

    store = Store()
    models = [m.to_json() for m in store.installed()]
    return {
        "root": str(store.root),
        "exists": store.root.is_dir(),
        "models": models,
        "models_bytes": sum(int(m["size"]) for m in models),
        # files of pulls that stopped before installing, kept so a retry resumes
        "downloads_bytes": dir_size(store.downloads_dir) if store.downloads_dir.is_dir() else 0,
    }


def _image_cache() -> dict[str, Any]:
    from vlmcli.tasks.models import encoding_cache

    cache = encoding_cache()
    if cache is None:
        return {"enabled": False, "path": None, "entries": 0, "bytes": 0, "max_bytes": 0}
    stats = cache.stats()
    return {
        "enabled": True,
        "path": str(stats.path),
        "entries": stats.entries,
        "bytes": stats.bytes,
        "max_bytes": stats.max_bytes,
    }


def _hub() -> dict[str, Any]:
    from vlmcli.store import hub
    from vlmcli.store.registry import env_flag

    source = hub.token_source()
    return {
        "endpoint": hub.endpoint(),
        "HF_ENDPOINT": os.environ.get("HF_ENDPOINT") or None,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE") or None,
        "offline": env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE"),
        "token": source is not None,  # never the token itself
        "token_source": source,
    }


def _runs_on(llama: dict[str, Any], ggml: dict[str, Any]) -> dict[str, Any]:
    """What the default settings (-ngl -1) do with this build."""
    from vlmcli.engines.detail import AUTO_CPU_MAX_TILES

    gpus = [d for d in ggml.get("devices", []) if d.get("type") in GPU_DEVICE_TYPES]
    offload = bool(llama.get("gpu_offload"))
    if len(gpus) > 1:  # llama.cpp splits the layers over every GPU; mtmd takes the first
        smolvlm2 = f"{'+'.join(d['name'] for d in gpus)} (all layers, split; vision encoder on {gpus[0]['name']})"
    else:
        smolvlm2 = f"{gpus[0]['name'] if gpus else 'GPU'} (all layers, vision encoder too)"
    return {
        "n_gpu_layers": DEFAULT_N_GPU_LAYERS,
        **default_threads(),
        "smolvlm2": smolvlm2 if offload else "CPU",
        "clip": gpus[0]["name"] if gpus else "CPU",
        "clip_cpu_kernels": _clip_cpu_kernels(),
        "smolvlm2_vision": "mtmd (GPU)" if offload else _smolvlm2_vision(),
        "detail_auto": "full tiling" if offload else f"at most {AUTO_CPU_MAX_TILES} tiles",
    }


def _clip_cpu_kernels() -> str:
    """What runs a CLIP F16 file on the CPU here by default (or as VLM_CLIP_KERNELS says)."""
    from vlmcli.engines.clip_path import choose_path
    from vlmcli.errors import VlmError

    try:
        return choose_path(on_cpu=True).describe()
    except VlmError as e:  # a bad VLM_CLIP_KERNELS
        return f"error: {e}"


def _smolvlm2_vision() -> str:
    """What encodes SmolVLM2's images on the CPU here by default (or as VLM_VISION_KERNELS says), for an
    idefics3 projector the kernels take (engines/vision_path.py; others keep mtmd's encoder)."""
    from vlmcli.engines.vision_path import choose_vision_path
    from vlmcli.errors import VlmError

    try:
        return choose_vision_path(on_cpu=True).describe()
    except VlmError as e:  # a bad VLM_VISION_KERNELS
        return f"error: {e}"


def warnings(report: dict[str, Any]) -> list[str]:
    """Advice from a report: a GPU this build cannot use, AMX extra buffers turned off."""
    out = []
    llama, ggml = report.get("llama", {}), report.get("ggml", {})
    has_gpu = bool(llama.get("gpu_offload")) or any(d.get("type") in GPU_DEVICE_TYPES for d in ggml.get("devices", []))
    version = report.get("versions", {}).get("llama_cpp_python") or "VERSION"
    for gpu in report.get("gpus_visible", []):
        if not has_gpu:
            flag = CMAKE_FLAGS.get(gpu["kind"], "")
            out.append(
                f"this llama-cpp-python build is CPU-only, but a {gpu['kind'].upper()} GPU is visible "
                f"({gpu['evidence']}): "
                f"rebuild it with {REBUILD.format(flag=flag, version=version)}"
            )
    if llama.get("amx_compiled_in") and not llama.get("extra_buffers"):
        out.append(
            "AMX kernels are compiled in, so llama.cpp's extra CPU buffer types (AMX, repacked weights) are off: "
            "they fault in some VMs that advertise AMX; VLM_AMX=1 turns them on"
        )
    for name in ("versions", "llama", "ggml", "store", "image_cache", "hub"):
        if "error" in report.get(name, {}):
            out.append(f"{name}: {report[name]['error']}")
    return out


def system_report() -> dict[str, Any]:
    """Everything `vlm doctor` shows, as one JSON-ready dict (no model is loaded, nothing is downloaded)."""
    report: dict[str, Any] = {"versions": _section(_versions)}
    report["llama"] = _section(_llama)
    report["ggml"] = _section(_ggml)
    cpu_devices = [d for d in report["ggml"].get("devices", []) if d.get("type") == "cpu"]
    report["cpu"] = {
        "model": cpu_model() if not cpu_devices or not cpu_devices[0]["description"] else cpu_devices[0]["description"],
        "logical": os.cpu_count(),
        "available": cores.available_cpus(),
    }
    report["runs_on"] = _section(lambda: _runs_on(report["llama"], report["ggml"]))
    report["gpus_visible"] = visible_gpus()
    report["store"] = _section(_store)
    report["image_cache"] = _section(_image_cache)
    report["hub"] = _section(_hub)
    report["warnings"] = warnings(report)
    return report


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") or n >= 10 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.0f} TB"


__all__ = ["system_report", "warnings", "visible_gpus", "cpu_model", "default_threads", "human_bytes"]
