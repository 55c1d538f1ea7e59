"""Command: doctor (what will run here, and how fast it can be)."""

from __future__ import annotations

from typing import Any

import typer

from vlmcli.cli.app import app, print_json
from vlmcli.errors import EXIT_ERROR

_HELP = (
    "Show what will run and how: versions (vlmcli, llama-cpp-python, llama.cpp, ggml), llama.cpp's system info "
    "(AVX2, AVX-512, F16C, FMA, BLAS, AMX...), the ggml backends and devices with their memory, the threads vlm "
    "uses, where SmolVLM2 and CLIP run by default (and which kernels run CLIP on the CPU), the store (models, sizes), "
    "HF_ENDPOINT / HF_HUB_OFFLINE / "
    "whether a Hugging Face token is set (never its value), and warnings such as a CPU-only build on a machine "
    "with a GPU. Loads no model and needs no network.\n\n"
    "Text is one `key  value` line per fact (keys may repeat: device, model, warning); --json prints one record. "
    "Exits 1 if llama.cpp or ggml cannot be loaded."
)


@app.command(help=_HELP)
def doctor(json_out: bool = typer.Option(False, "--json", help="One JSON record instead of text.")) -> None:
    from vlmcli.tasks.system import system_report

    report = system_report()
    if json_out:
        print_json(report)
    else:
        for key, value in _lines(report):
            typer.echo(f"{key:<17} {value}")
    if "error" in report["llama"] or "error" in report["ggml"]:
        raise typer.Exit(EXIT_ERROR)


def _lines(r: dict[str, Any]) -> list[tuple[str, str]]:
    from vlmcli.tasks.system import human_bytes

    v, llama, ggml, cpu, runs, store, hub = (
        r[k] for k in ("versions", "llama", "ggml", "cpu", "runs_on", "store", "hub")
    )
    out = [
        ("vlmcli", str(v.get("vlmcli"))),
        ("python", f"{v.get('python')} ({v.get('python_executable')})"),
        ("platform", str(v.get("platform"))),
        ("llama-cpp-python", str(v.get("llama_cpp_python"))),
    ]
    if "error" in llama:
        out.append(("llama.cpp", f"error: {llama['error']}"))
    else:
        out.append(("llama.cpp", str(llama["llama_cpp"])))
    if "error" in ggml:
        out.append(("ggml", f"error: {ggml['error']}"))
    else:
        out.append(("ggml", f"{ggml['version']} (commit {ggml['commit']})"))
    available = f", {cpu['available']} available" if cpu.get("available") not in (None, cpu.get("logical")) else ""
    out.append(("cpu", f"{cpu['model']} ({cpu['logical']} logical CPUs{available})"))
    for backend, features in llama.get("features", {}).items():
        flags = " ".join(k if val == "1" else f"{k}={val}" for k, val in features.items())
        out.append(("features", f"{backend}: {flags}"))
    if "backends" in ggml:
        out.append(
            (
                "backends",
                ", ".join(
                    f"{b['name']} ({b['devices']} device{'s' if b['devices'] != 1 else ''})" for b in ggml["backends"]
                ),
            )
        )
        for d in ggml["devices"]:
            memory = (
                f"{human_bytes(d['memory_total'])} ({human_bytes(d['memory_free'])} free)"
                if d["memory_total"]
                else "memory unknown"
            )
            out.append(("device", f"{d['name']}: {d['type']}, {d['description']}, {memory}"))
    if "error" not in runs:
        elsewhere = runs["running_elsewhere"]
        shared = (
            f", shared with {elsewhere} vlm computation{'s' if elsewhere != 1 else ''} running now" if elsewhere else ""
        )
        out.append(("threads", f"{runs['threads']} ({runs['cpus']} CPUs for this process{shared}; -t N to fix)"))
        out.append(
            (
                "n-gpu-layers",
                f"{runs['n_gpu_layers']} by default (all layers when the build has a GPU; -ngl 0 forces the CPU)",
            )
        )
        out.append(("smolvlm2", str(runs["smolvlm2"])))
        out.append(("clip", str(runs["clip"])))
        out.append(("clip-cpu-kernels", str(runs["clip_cpu_kernels"])))
        out.append(("smolvlm2-vision", str(runs["smolvlm2_vision"])))
        out.append(("detail-auto", str(runs["detail_auto"])))
    if "extra_buffers" in llama:
        why = " (AMX compiled in)" if llama["amx_compiled_in"] and not llama["extra_buffers"] else ""
        out.append(("extra-buffers", ("on" if llama["extra_buffers"] else "off") + why))
    for gpu in r.get("gpus_visible", []):
        out.append(("gpu-visible", f"{gpu['kind']} ({gpu['evidence']})"))
    if "error" in store:
        out.append(("store", f"error: {store['error']}"))
    else:
        n = len(store["models"])
        summary = (
            f"{n} model{'s' if n != 1 else ''}, {human_bytes(store['models_bytes'])}"
            if store["exists"]
            else "not created yet"
        )
        out.append(("store", f"{store['root']} ({summary})"))
        for m in store["models"]:
            out.append(("model", f"{m['name']}:{m['quant']} {m['kind']} {human_bytes(m['size'])} {m['path']}"))
        if store["downloads_bytes"]:
            out.append(
                ("downloads", f"{human_bytes(store['downloads_bytes'])} of unfinished pulls (rerun the pull to resume)")
            )
    cache = r["image_cache"]
    if "error" in cache:
        out.append(("image-cache", f"error: {cache['error']}"))
    elif not cache["enabled"]:
        out.append(("image-cache", "off (VLM_CACHE_SIZE=0)"))
    else:
        out.append(
            (
                "image-cache",
                f"{cache['path']} ({cache['entries']} entries, {human_bytes(cache['bytes'])} "
                f"of at most {human_bytes(cache['max_bytes'])})",
            )
        )
    if "error" not in hub:
        out.append(("hf-endpoint", hub["endpoint"] + ("" if hub["HF_ENDPOINT"] else " (default)")))
        out.append(
            (
                "hf-offline",
                ("yes" if hub["offline"] else "no")
                + (f" (HF_HUB_OFFLINE={hub['HF_HUB_OFFLINE']})" if hub["HF_HUB_OFFLINE"] else ""),
            )
        )
        out.append(("hf-token", f"set ({hub['token_source']})" if hub["token"] else "not set"))
    for w in r.get("warnings", []):
        out.append(("warning", w))
    return out
