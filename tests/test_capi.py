"""The C ABI: libvlm built by `vlm lib build`, called from C programs compiled with the system
compiler and run outside any virtual environment (a bare environment: no VIRTUAL_ENV, no PATH to
the venv, no PYTHONPATH), on the tiny SmolVLM2 and CLIP fixtures.

The library is built once per session; each C program is compiled once. Answers and embeddings are
compared with the CLI's (`python -m vlmcli ... --json`) for the same inputs and options.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmcli.capi import runtime

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HEADER = ROOT / "vlmcli" / "capi" / "vlm.h"
CAT = ROOT / "vlmcli" / "data" / "chelsea.jpg"
MAX_TOKENS = "6"

CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")


def bare_env(**extra: str) -> dict[str, str]:
    """What a user's shell gives a C program: no venv activation, no Python variables."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1"}
    # keep the test run's model store, if it set one, its settings from conftest (caches, thread shares) and
    # a CLIP kernels override (clip_path.py) the run was started with
    for key in ("VLM_HOME", "XDG_CACHE_HOME", "VLM_CACHE_DIR", "VLM_CORES_DIR", "VLM_CLIP_KERNELS"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra)
    return env


def compile_c(source: Path, out: Path, lib_dir: Path) -> Path:
    cmd = [
        CC,
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-g",
        "-O1",
        str(source),
        f"-I{lib_dir}",
        f"-L{lib_dir}",
        "-lvlm",
        "-pthread",
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return out


def run(
    cmd: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env or bare_env(), timeout=timeout)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def capi_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vlm lib build --out DIR`, run as a user would (the CLI), once per session."""
    pytest.importorskip("cffi", reason="building libvlm needs cffi (the `lib` extra)")
    if CC is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("libvlm") / "lib"
    proc = subprocess.run(
        [sys.executable, "-m", "vlmcli", "lib", "build", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def c_example(capi_lib: Path) -> Path:
    return compile_c(EXAMPLES / "vlm_example.c", capi_lib.parent / "vlm_example", capi_lib)


@pytest.fixture(scope="session")
def c_harness(capi_lib: Path) -> Path:
    src = capi_lib.parent / "harness.c"
    src.write_text(HARNESS_C)
    return compile_c(src, capi_lib.parent / "harness", capi_lib)


@pytest.fixture(scope="session")
def vlm_model(smolvlm2_gguf) -> Path:
    return Path(smolvlm2_gguf.model)


@pytest.fixture(scope="session")
def small_png(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, int]:
    """A small PNG of the sample photo and the same pixels as a raw RGB8 file (w, h)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("capi-images")
    im = Image.open(CAT).convert("RGB").resize((96, 64))
    png, raw = d / "cat.png", d / "cat.rgb"
    im.save(png)
    raw.write_bytes(im.tobytes())
    return png, raw, im.width, im.height


# ---- the header and the build ---------------------------------------------------------------


def test_header_agrees_with_the_python_side() -> None:
    text = HEADER.read_text()
    assert int(re.search(r"#define VLM_ABI_VERSION (\d+)", text).group(1)) == runtime.ABI_VERSION
    enum = dict((name, int(v)) for name, v in re.findall(r"(VLM_(?:OK|E_\w+)) = (-?\d+)", text))
    for name, value in enum.items():
        assert getattr(runtime, name.removeprefix("VLM_")) == value, name
    assert len(enum) == 11


@needs_cc
def test_build_writes_header_and_library(capi_lib: Path) -> None:
    from vlmcli.capi import library_filename

    lib = capi_lib / library_filename()
    assert (capi_lib / "vlm.h").read_text() == HEADER.read_text()
    assert lib.is_file()
    if sys.platform.startswith("linux") and shutil.which("nm"):
        symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        for name in (
            "vlm_open",
            "vlm_close",
            "vlm_ask",
            "vlm_ask_stream",
            "vlm_caption",
            "vlm_embed_images",
            "vlm_embed_texts",
            "vlm_classify",
            "vlm_last_error",
            "vlm_version",
            "vlm_abi_version",
        ):
            assert re.search(rf" T {name}$", symbols, re.M), name
        # glue helpers stay private
        assert " T vlm__" not in symbols


# ---- the C example against the CLI -----------------------------------------------------------


@needs_cc
def test_c_example_ask_equals_cli(c_example: Path, vlm_model: Path, tmp_path: Path) -> None:
    prompt = "What is in this image?"
    c = run([str(c_example), "ask", "-n", MAX_TOKENS, str(vlm_model), str(CAT), prompt], tmp_path)
    assert c.returncode == 0, c.stderr
    # -ngl 0: the C library's zeroed options run on the CPU, the CLI's default offloads when it can
    expected = json.loads(
        cli("ask", str(CAT), prompt, "-m", str(vlm_model), "-n", MAX_TOKENS, "--json", "-ngl", "0", cwd=tmp_path).stdout
    )
    answer = expected["answers"][0]["answer"]
    assert answer
    assert c.stdout == answer + "\n"

    # Sampling with a seed: the same seed gives the CLI's text; the streaming call gives it too.
    sampled = ["-n", MAX_TOKENS, "-t", "0.9", "-s", "7"]
    c_sampled = run([str(c_example), "stream", *sampled, str(vlm_model.parent), str(CAT), prompt], tmp_path)
    assert c_sampled.returncode == 0, c_sampled.stderr
    cli_sampled = json.loads(
        cli(
            "ask",
            str(CAT),
            prompt,
            "-m",
            str(vlm_model),
            "-n",
            MAX_TOKENS,
            "--temperature",
            "0.9",
            "--seed",
            "7",
            "--json",
            "-ngl",
            "0",
            cwd=tmp_path,
        ).stdout
    )
    assert c_sampled.stdout == cli_sampled["answers"][0]["answer"] + "\n"


def _parse_vectors(text: str) -> dict[str, np.ndarray]:
    lines = text.splitlines()
    return {lines[i]: np.array([float(v) for v in lines[i + 1].split()], np.float32) for i in range(0, len(lines), 2)}


@needs_cc
def test_c_example_embed_equals_cli(c_example: Path, clip_gguf: Path, small_png, tmp_path: Path) -> None:
    png = small_png[0]
    texts = ["a photo of a cat", "a dog"]
    c = run([str(c_example), "embed", str(clip_gguf), str(CAT), str(png), "--", *texts], tmp_path)
    assert c.returncode == 0, c.stderr
    got = _parse_vectors(c.stdout)
    records = [
        json.loads(line)
        for line in cli(
            "embed",
            str(CAT),
            str(png),
            *sum((["--text", t] for t in texts), []),
            "-m",
            str(clip_gguf),
            "-ngl",
            "0",
            cwd=tmp_path,
        ).stdout.splitlines()
    ]
    assert len(records) == 4
    for r in records:
        vec = got[f"{r['kind']} {r['input']}"]
        assert vec.shape == (len(r["embedding"]),)
        np.testing.assert_allclose(vec, np.array(r["embedding"], np.float32), rtol=0, atol=1e-6)
        assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5


# ---- error paths, streaming, buffers, threads ------------------------------------------------


def _report(proc: subprocess.CompletedProcess) -> dict[str, tuple[int, str]]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        name, status, message = line.split("\t", 2)
        out[name] = (int(status), message)
    return out


@pytest.fixture(scope="session")
def corrupt_models(tmp_path_factory: pytest.TempPathFactory, vlm_model: Path) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corrupt")
    garbage = d / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(200))
    truncated = d / "truncated.gguf"
    data = vlm_model.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return garbage, truncated


@needs_cc
def test_error_paths_and_buffers(
    c_harness: Path, vlm_model: Path, smolvlm2_gguf, clip_gguf: Path, small_png, corrupt_models, tmp_path: Path
) -> None:
    png, raw, w, h = small_png
    garbage, truncated = corrupt_models
    r = _report(
        run(
            [
                str(c_harness),
                "errors",
                str(vlm_model),
                str(clip_gguf),
                str(png),
                str(raw),
                str(w),
                str(h),
                str(garbage),
                str(truncated),
                str(smolvlm2_gguf.mmproj),
            ],
            tmp_path,
        )
    )
    E = runtime

    # Opening: bad path, corrupt files, NULL, wrong ABI, bad options, a projector instead of a model.
    assert r["open_missing"][0] == E.E_MODEL and "/nonexistent/model.gguf" in r["open_missing"][1]
    assert r["open_missing_by_status"] == r["open_missing"]  # vlm_last_error(<negative status>) works too
    assert r["open_garbage"][0] == E.E_MODEL and "garbage.gguf" in r["open_garbage"][1]
    assert r["open_truncated"][0] == E.E_MODEL and "truncated" in r["open_truncated"][1]
    assert r["open_null"][0] == E.E_INVALID_ARGUMENT and "NULL" in r["open_null"][1]
    assert r["open_empty"][0] == E.E_INVALID_ARGUMENT
    assert r["open_abi"][0] == E.E_ABI_MISMATCH and "999" in r["open_abi"][1]
    assert r["open_bad_ctx"][0] == E.E_INVALID_ARGUMENT and "n_ctx" in r["open_bad_ctx"][1]
    assert r["open_bad_tiles"][0] == E.E_INVALID_ARGUMENT and "max_tiles" in r["open_bad_tiles"][1]
    assert r["open_mmproj"][0] == E.E_MODEL and "projector" in r["open_mmproj"][1]
    assert r["kind_vlm"] == (E.OK, str(E.KIND_VLM))
    assert r["kind_clip"] == (E.OK, str(E.KIND_CLIP))

    # NULL pointers and bad images are errors with a message.
    for name in (
        "ask_null_image",
        "ask_null_prompt",
        "stream_null_callback",
        "ask_null_out_with_size",
        "ask_image_empty",
        "ask_rgb_zero_size",
        "embed_null_images",
        "embed_texts_null_entry",
        "embed_zero_count",
        "kind_null",
        "classify_null_labels",
    ):
        assert r[name][0] == E.E_INVALID_ARGUMENT, (name, r[name])
        assert r[name][1], name
    assert r["ask_missing_image"][0] == E.E_IMAGE and "/nonexistent/cat.jpg" in r["ask_missing_image"][1]

    # A buffer too small: the size needed, a NUL-terminated prefix; then the whole answer.
    full_status, full = r["ask_full"]
    assert full_status == E.OK and full
    st, msg = r["ask_small"]
    assert st == E.E_BUFFER_TOO_SMALL
    assert int(r["ask_small_needed"][1]) == len(full.encode()) + 1
    assert full.startswith(r["ask_small_text"][1]) and len(r["ask_small_text"][1].encode()) <= 4
    assert r["ask_size_query"] == (E.E_BUFFER_TOO_SMALL, str(len(full.encode()) + 1))
    assert r["ask_retry"] == (E.OK, full)
    caption = json.loads(cli("caption", str(png), "-m", str(vlm_model), "-n", "6", "--json", cwd=tmp_path).stdout)
    assert r["caption"] == (E.OK, caption["caption"].replace("\n", " "))
    assert r["ask_rgb"] == (E.OK, full)  # the same pixels as a buffer give the file's answer

    # Streaming: pieces concatenate to the answer; a callback can stop; re-entry is refused.
    assert r["stream_all"] == (E.OK, full)
    assert r["stream_stop"] == (E.OK, "1")
    assert r["reentrant_ask"][0] == E.E_BUSY and r["reentrant_close"][0] == E.E_BUSY

    # Kinds: SmolVLM2 calls on CLIP and the reverse.
    assert r["ask_on_clip"][0] == E.E_WRONG_KIND and r["embed_on_vlm"][0] == E.E_WRONG_KIND

    # CLIP buffers.
    dim = int(r["embedding_size"][1])
    assert r["embed_small"] == (E.E_BUFFER_TOO_SMALL, str(dim))
    assert r["embed_rgb_vs_file"] == (E.OK, "same")
    assert r["classify_small"] == (E.E_BUFFER_TOO_SMALL, "3")
    st, scores = r["classify"]
    assert st == E.OK and abs(sum(float(s) for s in scores.split()) - 1.0) < 1e-5

    # Handles: double close, use after close, never-opened handles.
    assert r["close"][0] == E.OK
    for name in ("close_again", "ask_after_close", "close_never_opened", "close_zero", "close_negative"):
        assert r[name][0] == E.E_INVALID_HANDLE, (name, r[name])
    assert "closed" in r["close_again"][1] or "not open" in r["close_again"][1]

    # vlm_last_error is thread-local.
    assert r["thread_sees_no_error"] == (E.OK, "")
    assert r["thread_own_error"][0] == E.E_INVALID_HANDLE
    assert r["main_error_kept"] == r["open_missing"]


@needs_cc
def test_two_threads_two_handles(c_harness: Path, vlm_model: Path, clip_gguf: Path, tmp_path: Path) -> None:
    """Two SmolVLM2 handles and a CLIP handle used from three threads at once give the answers
    each gives alone; two threads sharing one handle are serialised and also agree."""
    r = _report(run([str(c_harness), "threads", str(vlm_model), str(clip_gguf), str(CAT)], tmp_path))
    assert r["sequential"][0] == runtime.OK
    assert r["parallel_handles"] == (runtime.OK, "same")
    assert r["shared_handle"] == (runtime.OK, "same")
    assert r["answers_differ"] == (runtime.OK, "yes")  # the two prompts really are two jobs


# ---- ctypes ----------------------------------------------------------------------------------


@needs_cc
def test_ctypes_script(capi_lib: Path, vlm_model: Path, clip_gguf: Path, small_png, tmp_path: Path) -> None:
    png = small_png[0]
    script = str(EXAMPLES / "vlm_ctypes.py")
    by_path = subprocess.run(
        [sys.executable, script, str(capi_lib), "ask", str(vlm_model), str(png), "What is it?", "-n", MAX_TOKENS],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    by_pixels = subprocess.run(
        [
            sys.executable,
            script,
            str(capi_lib),
            "ask",
            str(vlm_model),
            str(png),
            "What is it?",
            "-n",
            MAX_TOKENS,
            "--rgb",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert by_path.returncode == 0, by_path.stderr
    assert by_path.stdout.strip() and by_path.stdout == by_pixels.stdout

    labels = ["cat", "dog", "car"]
    proc = subprocess.run(
        [sys.executable, script, str(capi_lib), "classify", str(clip_gguf), str(png), *labels],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    scores = {label: float(s) for s, label in (line.split("\t") for line in proc.stdout.splitlines())}
    rec = json.loads(
        cli("classify", str(png), "-m", str(clip_gguf), "-l", ",".join(labels), "--json", cwd=tmp_path).stdout
    )
    for item in rec["labels"]:
        assert scores[item["label"]] == pytest.approx(item["score"], rel=1e-5, abs=1e-7)


@needs_cc
@pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc is not installed")
def test_rust_example(capi_lib: Path, c_example: Path, vlm_model: Path, small_png, tmp_path: Path) -> None:
    """examples/vlm_example.rs (the README's Rust snippet) links with -lvlm and gives the C answer."""
    exe = tmp_path / "vlm_example_rs"
    proc = subprocess.run(
        ["rustc", "--edition", "2021", str(EXAMPLES / "vlm_example.rs"), "-L", str(capi_lib), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    png = str(small_png[0])
    rust = run([str(exe), str(vlm_model), png, "What is it?"], tmp_path)
    assert rust.returncode == 0, rust.stderr
    c = run([str(c_example), "ask", "-n", "32", str(vlm_model), png, "What is it?"], tmp_path)
    assert rust.stdout == c.stdout and rust.stdout.strip()


# ---- valgrind --------------------------------------------------------------------------------

# glibc's SSE2 strncmp in the dynamic loader reads a whole word past short rpath strings while
# Python loads extension modules: a known false positive, nothing to do with this library.
VALGRIND_SUPPRESSIONS = """
{
   glibc-ld.so-is_dst-strncmp
   Memcheck:Addr8
   fun:strncmp
   fun:is_dst
}
"""

# Frames that are ours, or that move data between Python and the caller's buffers for us.
OWN_FRAME = re.compile(r"vlm_example|libvlm\.so|_vlm_capi|_cffi_backend|glue\.c")


def _memcheck(cmd: list[str], tmp_path: Path, timeout: float) -> tuple[subprocess.CompletedProcess, str, list[str]]:
    supp = tmp_path / "vlm.supp"
    supp.write_text(VALGRIND_SUPPRESSIONS)
    log = tmp_path / "memcheck.log"
    vg = [
        "valgrind",
        "--tool=memcheck",
        "--undef-value-errors=no",
        "--leak-check=no",
        "--num-callers=300",
        f"--suppressions={supp}",
        f"--log-file={log}",
    ]
    proc = run(vg + cmd, tmp_path, timeout=timeout)
    text = log.read_text(errors="replace")
    errors = re.split(r"\n==\d+== \n", text)
    ours = [
        e
        for e in errors
        if re.search(r"Invalid (read|write)", e) and any(OWN_FRAME.search(line) for line in e.splitlines()[1:5])
    ]
    return proc, text, ours


def _valgrind_runs_ggml(tmp_path: Path) -> str | None:
    """None if valgrind can run ggml's CPU code here, else why not (e.g. AVX-512 it cannot decode)."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    cpu = next(iter(sorted(libdir.glob("libggml-cpu.so*")) + sorted(libdir.glob("libggml.so*"))), None)
    if cpu is None:
        return "no ggml CPU library found to probe"
    probe = tmp_path / "probe.c"
    probe.write_text(
        "#include <dlfcn.h>\n#include <stdio.h>\n"
        "int main(int c, char **v) { (void)c; void *h = dlopen(v[1], RTLD_NOW); if (!h) return 2;\n"
        '  void *(*init)(void) = (void *(*)(void))dlsym(h, "ggml_backend_cpu_init");\n'
        "  return init && init() ? 0 : 3; }\n"
    )
    subprocess.run([CC, str(probe), "-o", str(tmp_path / "probe"), "-ldl"], check=True, capture_output=True)
    proc = subprocess.run(
        ["valgrind", "--error-exitcode=0", str(tmp_path / "probe"), str(cpu)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 or "unhandled instruction" in proc.stderr or "Unrecognised instruction" in proc.stderr:
        return (
            f"valgrind cannot execute this llama.cpp build's CPU code ({cpu.name}: e.g. AVX-512 instructions "
            "valgrind does not decode), so model inference cannot run under memcheck here"
        )
    return None


needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")


@needs_cc
@needs_valgrind
def test_c_example_under_valgrind_startup_and_error_path(c_example: Path, tmp_path: Path) -> None:
    """Library load, the embedded interpreter's start, a call's round trip into Python and back,
    the thread-local error message and the example's own code: no invalid reads or writes in the
    example's frames, the library's glue, or cffi's copies between Python and the caller."""
    proc, log, ours = _memcheck([str(c_example), "embed", str(tmp_path / "missing.gguf"), str(CAT)], tmp_path, 900)
    assert proc.returncode == 1 and "VLM_E_MODEL" in proc.stderr and "missing.gguf" in proc.stderr, proc.stderr
    assert "ERROR SUMMARY" in log
    assert not ours, "\n\n".join(ours)


@needs_cc
@needs_valgrind
def test_c_example_under_valgrind_full_run(c_example: Path, clip_gguf: Path, small_png, tmp_path: Path) -> None:
    """The whole embedding path under memcheck, where valgrind can execute ggml's CPU code."""
    why_not = _valgrind_runs_ggml(tmp_path)
    if why_not:
        pytest.skip(why_not + "; test_c_example_under_address_sanitizer covers the full path instead")
    proc, log, ours = _memcheck(
        [str(c_example), "embed", str(clip_gguf), str(small_png[0]), "--", "a cat"], tmp_path, 1800
    )
    assert proc.returncode == 0, proc.stderr
    assert not ours, "\n\n".join(ours)


# ---- AddressSanitizer -------------------------------------------------------------------------

LIAR_C = r"""
#include <stdlib.h>
#include <stdio.h>
#include "vlm.h"
/* Claims room for a whole embedding but allocates 8 bytes: the library's write must be caught. */
int main(int argc, char **argv)
{
    (void)argc;
    vlm_handle h = vlm_open(argv[1], NULL);
    if (h <= 0) return 3;
    size_t dim = 0;
    vlm_embedding_size(h, &dim);
    float *out = malloc(8);
    vlm_image img = {argv[2], NULL, 0, 0};
    printf("%d\n", vlm_embed_images(h, &img, 1, out, dim, NULL));
    free(out);
    return 0;
}
"""


def _asan_build(source: Path, out: Path, lib_dir: Path) -> Path | None:
    cmd = [
        CC,
        "-g",
        "-fsanitize=address",
        "-fno-omit-frame-pointer",
        str(source),
        f"-I{lib_dir}",
        f"-L{lib_dir}",
        "-lvlm",
        "-o",
        str(out),
    ]
    return out if subprocess.run(cmd, capture_output=True).returncode == 0 else None


@needs_cc
def test_c_example_under_address_sanitizer(
    capi_lib: Path, vlm_model: Path, clip_gguf: Path, small_png, tmp_path: Path
) -> None:
    """The C example built with AddressSanitizer runs the whole path (model inference included,
    which valgrind may not be able to run): no overflow of its buffers by the library. A program
    that lies about its buffer size shows the check would catch one."""
    example = _asan_build(EXAMPLES / "vlm_example.c", tmp_path / "example_asan", capi_lib)
    if example is None:
        pytest.skip("the C compiler cannot build with -fsanitize=address here")
    env = bare_env(ASAN_OPTIONS="detect_leaks=0")  # the embedded interpreter is never finalised
    png = str(small_png[0])
    for cmd in (
        [str(example), "ask", "-n", MAX_TOKENS, str(vlm_model), png, "What is it?"],
        [str(example), "stream", "-n", MAX_TOKENS, str(vlm_model), png, "What is it?"],
        [str(example), "embed", str(clip_gguf), png, "--", "a cat", "a dog"],
    ):
        proc = run(cmd, tmp_path, env=env)
        assert proc.returncode == 0 and "AddressSanitizer" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stdout.strip()

    liar_src = tmp_path / "liar.c"
    liar_src.write_text(LIAR_C)
    liar = _asan_build(liar_src, tmp_path / "liar", capi_lib)
    assert liar is not None
    proc = run([str(liar), str(clip_gguf), png], tmp_path, env=env)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr


# ---- the C test harness ----------------------------------------------------------------------

HARNESS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vlm.h"

/* One result per line: name TAB status TAB text (tabs and newlines in text become spaces). */
static void put(const char *name, int status, const char *text)
{
    printf("%s\t%d\t", name, status);
    for (const char *p = text ? text : ""; *p; p++)
        putchar(*p == '\t' || *p == '\n' ? ' ' : *p);
    putchar('\n');
    fflush(stdout);
}
static void put_err(const char *name, int status, vlm_handle h) { put(name, status, status ? vlm_last_error(h) : ""); }
static void put_num(const char *name, int status, long long n) {
    char b[32]; snprintf(b, sizeof b, "%lld", n); put(name, status, b);
}

static vlm_options opts(void) { vlm_options o = VLM_OPTIONS_INIT; o.max_tokens = 6; return o; }

static unsigned char *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END); *n = (size_t)ftell(f); fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(*n);
    if (fread(data, 1, *n, f) != *n) { free(data); data = NULL; }
    fclose(f);
    return data;
}

/* streaming callbacks */
typedef struct {
    char text[4096]; int pieces; int stop_after; vlm_handle h; int reenter_ask; int reenter_close;
} stream_state;
static int collect(const char *piece, size_t len, void *user)
{
    stream_state *s = user;
    if (piece[len] != 0) return 1;
    strncat(s->text, piece, sizeof s->text - strlen(s->text) - 1);
    s->pieces++;
    if (s->h) {
        char buf[64]; size_t needed;
        vlm_image img = {"x.png", NULL, 0, 0};
        s->reenter_ask = vlm_ask(s->h, &img, "again", buf, sizeof buf, &needed);
        s->reenter_close = vlm_close(s->h);
    }
    return s->stop_after && s->pieces >= s->stop_after;
}

/* thread-locality of vlm_last_error */
static void *thread_errors(void *arg)
{
    (void)arg;
    put("thread_sees_no_error", 0, vlm_last_error(0));
    int st = vlm_close(987654);
    put_err("thread_own_error", st, 987654);
    return NULL;
}

static int errors(char **a)
{
    const char *vlm_model = a[0], *clip_model = a[1], *png = a[2], *raw = a[3];
    int w = atoi(a[4]), h_px = atoi(a[5]);
    const char *garbage = a[6], *truncated = a[7], *mmproj = a[8];
    vlm_options o = opts();
    char buf[4096], small[4];
    size_t needed = 0;
    int st;
    vlm_handle h;

    h = vlm_open("/nonexistent/model.gguf", &o); put_err("open_missing", (int)h, 0);
    put("open_missing_by_status", (int)h, vlm_last_error(h));
    char main_error[VLM_ERROR_MAX]; strcpy(main_error, vlm_last_error(0));
    h = vlm_open(garbage, &o); put_err("open_garbage", (int)h, 0);
    h = vlm_open(truncated, &o); put_err("open_truncated", (int)h, 0);
    h = vlm_open(NULL, &o); put_err("open_null", (int)h, 0);
    h = vlm_open("", &o); put_err("open_empty", (int)h, 0);
    vlm_options bad = o; bad.abi_version = 999;
    h = vlm_open(vlm_model, &bad); put_err("open_abi", (int)h, 0);
    bad = o; bad.n_ctx = 5;
    h = vlm_open(vlm_model, &bad); put_err("open_bad_ctx", (int)h, 0);
    bad = o; bad.max_tiles = -2;
    h = vlm_open(vlm_model, &bad); put_err("open_bad_tiles", (int)h, 0);
    h = vlm_open(mmproj, &o); put_err("open_mmproj", (int)h, 0);
    /* the open failures above must not have replaced the first message in another thread's view */
    vlm_open("/nonexistent/model.gguf", &o);

    vlm_handle v = vlm_open(vlm_model, &o);
    if (v <= 0) { put_err("open_vlm", (int)v, 0); return 1; }
    vlm_handle c = vlm_open(clip_model, NULL);
    if (c <= 0) { put_err("open_clip", (int)c, 0); return 1; }
    int32_t kind = 0;
    st = vlm_model_kind(v, &kind); put_num("kind_vlm", st, kind);
    st = vlm_model_kind(c, &kind); put_num("kind_clip", st, kind);
    st = vlm_model_kind(v, NULL); put_err("kind_null", st, v);

    vlm_image img = {png, NULL, 0, 0};
    st = vlm_ask(v, NULL, "hi", buf, sizeof buf, &needed); put_err("ask_null_image", st, v);
    st = vlm_ask(v, &img, NULL, buf, sizeof buf, &needed); put_err("ask_null_prompt", st, v);
    st = vlm_ask(v, &img, "hi", NULL, 10, &needed); put_err("ask_null_out_with_size", st, v);
    vlm_image empty = {NULL, NULL, 0, 0};
    st = vlm_ask(v, &empty, "hi", buf, sizeof buf, &needed); put_err("ask_image_empty", st, v);
    unsigned char px[3] = {0, 0, 0};
    vlm_image zero = {NULL, px, 0, 1};
    st = vlm_ask(v, &zero, "hi", buf, sizeof buf, &needed); put_err("ask_rgb_zero_size", st, v);
    vlm_image missing = {"/nonexistent/cat.jpg", NULL, 0, 0};
    st = vlm_ask(v, &missing, "hi", buf, sizeof buf, &needed); put_err("ask_missing_image", st, v);

    const char *prompt = "What is in this image?";
    st = vlm_ask(v, &img, prompt, buf, sizeof buf, &needed); put("ask_full", st, buf);
    memset(small, 'X', sizeof small);
    st = vlm_ask(v, &img, prompt, small, sizeof small, &needed); put_err("ask_small", st, v);
    put_num("ask_small_needed", st, (long long)needed);
    put("ask_small_text", st, memchr(small, 0, sizeof small) ? small : "<not terminated>");
    needed = 0;
    st = vlm_ask(v, &img, prompt, NULL, 0, &needed); put_num("ask_size_query", st, (long long)needed);
    char *exact = malloc(needed);
    st = vlm_ask(v, &img, prompt, exact, needed, &needed); put("ask_retry", st, exact);
    free(exact);
    st = vlm_caption(v, &img, buf, sizeof buf, NULL); put("caption", st, buf);

    size_t n_raw = 0;
    unsigned char *pixels = read_file(raw, &n_raw);
    vlm_image rgb = {NULL, pixels, w, h_px};
    st = vlm_ask(v, &rgb, prompt, buf, sizeof buf, NULL); put("ask_rgb", st, buf);

    stream_state s; memset(&s, 0, sizeof s);
    st = vlm_ask_stream(v, &img, prompt, collect, &s); put("stream_all", st, s.text);
    st = vlm_ask_stream(v, &img, prompt, NULL, NULL); put_err("stream_null_callback", st, v);
    memset(&s, 0, sizeof s); s.stop_after = 1;
    st = vlm_ask_stream(v, &img, prompt, collect, &s); put_num("stream_stop", st, s.pieces);
    memset(&s, 0, sizeof s); s.stop_after = 1; s.h = v;
    vlm_ask_stream(v, &img, prompt, collect, &s);
    put_err("reentrant_ask", s.reenter_ask, v);
    put_err("reentrant_close", s.reenter_close, v);

    st = vlm_ask(c, &img, prompt, buf, sizeof buf, NULL); put_err("ask_on_clip", st, c);
    float f[4096];
    const char *texts[2] = {"a cat", NULL};
    st = vlm_embed_texts(v, texts, 1, f, 4096, NULL); put_err("embed_on_vlm", st, v);

    size_t dim = 0;
    st = vlm_embedding_size(c, &dim); put_num("embedding_size", st, (long long)dim);
    st = vlm_embed_images(c, NULL, 1, f, 4096, NULL); put_err("embed_null_images", st, c);
    st = vlm_embed_texts(c, texts, 2, f, 4096, NULL); put_err("embed_texts_null_entry", st, c);
    st = vlm_embed_texts(c, texts, 0, f, 4096, NULL); put_err("embed_zero_count", st, c);
    needed = 0;
    st = vlm_embed_images(c, &img, 1, f, dim - 1, &needed); put_num("embed_small", st, (long long)needed);
    float *from_file = malloc(dim * sizeof(float)), *from_rgb = malloc(dim * sizeof(float));
    int st1 = vlm_embed_images(c, &img, 1, from_file, dim, NULL);
    int st2 = vlm_embed_images(c, &rgb, 1, from_rgb, dim, NULL);
    int same = st1 == 0 && st2 == 0;
    for (size_t i = 0; same && i < dim; i++) {
        float d = from_file[i] - from_rgb[i];
        same = d < 1e-6f && d > -1e-6f;
    }
    put("embed_rgb_vs_file", st1 ? st1 : st2, same ? "same" : "different");
    free(from_file); free(from_rgb); free(pixels);

    const char *labels[3] = {"cat", "dog", "car"};
    float scores[3];
    st = vlm_classify(c, &img, NULL, 3, scores, 3, NULL); put_err("classify_null_labels", st, c);
    needed = 0;
    st = vlm_classify(c, &img, labels, 3, scores, 2, &needed); put_num("classify_small", st, (long long)needed);
    st = vlm_classify(c, &img, labels, 3, scores, 3, NULL);
    snprintf(buf, sizeof buf, "%.9g %.9g %.9g", scores[0], scores[1], scores[2]); put("classify", st, buf);

    st = vlm_close(v); put_err("close", st, v);
    st = vlm_close(v); put_err("close_again", st, v);
    st = vlm_ask(v, &img, prompt, buf, sizeof buf, NULL); put_err("ask_after_close", st, v);
    st = vlm_close(424242); put_err("close_never_opened", st, 424242);
    st = vlm_close(0); put_err("close_zero", st, 0);
    st = vlm_close(-3); put_err("close_negative", st, -3);
    vlm_close(c);

    pthread_t t;
    pthread_create(&t, NULL, thread_errors, NULL);
    pthread_join(t, NULL);
    vlm_open("/nonexistent/model.gguf", &o); /* same message again in this thread */
    put("main_error_kept", -5, strcmp(main_error, vlm_last_error(0)) == 0 ? main_error : vlm_last_error(0));
    return 0;
}

/* ---- threads ---- */
typedef struct {
    vlm_handle h; const char *image; const char *prompt; int clip;
    char out[4096]; float vec[2048]; size_t dim; int status;
} job;

static void do_job(job *j)
{
    vlm_image img = {j->image, NULL, 0, 0};
    if (j->clip) {
        const char *texts[1] = {j->prompt};
        float tmp[2048];
        j->status = vlm_embed_images(j->h, &img, 1, j->vec, j->dim, NULL);
        if (!j->status) j->status = vlm_embed_texts(j->h, texts, 1, tmp, j->dim, NULL);
        if (!j->status) memcpy(j->vec + j->dim, tmp, j->dim * sizeof(float));
    } else {
        j->status = vlm_ask(j->h, &img, j->prompt, j->out, sizeof j->out, NULL);
    }
}
static void *run_job(void *arg) { do_job(arg); return NULL; }

static int same_result(const job *a, const job *b)
{
    if (a->status || b->status) return 0;
    if (a->clip) return memcmp(a->vec, b->vec, 2 * a->dim * sizeof(float)) == 0;
    return strcmp(a->out, b->out) == 0;
}

static int threads(char **a)
{
    vlm_options o = opts();
    o.n_threads = 1;
    vlm_handle v1 = vlm_open(a[0], &o), v2 = vlm_open(a[0], &o), c = vlm_open(a[1], &o);
    if (v1 <= 0 || v2 <= 0 || c <= 0) { put("open", -1, vlm_last_error(0)); return 1; }
    size_t dim = 0;
    vlm_embedding_size(c, &dim);
    static job seq[3], par[3], shared[2];
    job proto[3] = {
        {.h = v1, .image = a[2], .prompt = "What is in this image?"},
        {.h = v2, .image = a[2], .prompt = "Describe the colours."},
        {.h = c, .image = a[2], .prompt = "a photo of a cat", .clip = 1, .dim = dim},
    };
    for (int i = 0; i < 3; i++) { seq[i] = proto[i]; do_job(&seq[i]); }
    put("sequential", seq[0].status | seq[1].status | seq[2].status, seq[0].out);

    pthread_t t[3];
    for (int i = 0; i < 3; i++) { par[i] = proto[i]; pthread_create(&t[i], NULL, run_job, &par[i]); }
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    int ok = 1;
    for (int i = 0; i < 3; i++) ok &= same_result(&seq[i], &par[i]);
    put("parallel_handles", par[0].status | par[1].status | par[2].status, ok ? "same" : "different");

    for (int i = 0; i < 2; i++) { shared[i] = proto[0]; pthread_create(&t[i], NULL, run_job, &shared[i]); }
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    ok = same_result(&seq[0], &shared[0]) && same_result(&seq[0], &shared[1]);
    put("shared_handle", shared[0].status | shared[1].status, ok ? "same" : "different");
    put("answers_differ", 0, strcmp(seq[0].out, seq[1].out) ? "yes" : "no");
    vlm_close(v1); vlm_close(v2); vlm_close(c);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 11 && strcmp(argv[1], "errors") == 0) return errors(argv + 2);
    if (argc >= 5 && strcmp(argv[1], "threads") == 0) return threads(argv + 2);
    fprintf(stderr, "usage: harness errors|threads ...\n");
    return 2;
}
"""


@needs_cc
def test_best_of_through_the_c_options(capi_lib: Path, vlm_model: Path, small_png, tmp_path: Path) -> None:
    """vlm_options.best_of / .select (ABI 2) give the CLI's chosen answer."""
    png = small_png[0]
    script = str(EXAMPLES / "vlm_ctypes.py")
    for select in ("logprob", "vote"):
        c = subprocess.run(
            [
                sys.executable,
                script,
                str(capi_lib),
                "ask",
                str(vlm_model),
                str(png),
                "What is it?",
                "-n",
                MAX_TOKENS,
                "--best-of",
                "3",
                "--select",
                select,
                "-s",
                "4",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )
        assert c.returncode == 0, c.stderr
        rec = json.loads(
            cli(
                "ask",
                str(png),
                "What is it?",
                "-m",
                str(vlm_model),
                "-n",
                MAX_TOKENS,
                "--best-of",
                "3",
                "--select",
                select,
                "--seed",
                "4",
                "--json",
                cwd=tmp_path,
            ).stdout
        )
        (answer,) = rec["answers"]
        assert len(answer["candidates"]) == 3
        assert c.stdout == answer["answer"] + "\n"


STRUCTURED_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include "vlm.h"

/* vlm_options.json_schema (ABI 3): answers at temperature 1 that follow the schema; a bad schema refused. */
int main(int argc, char **argv) {
    if (argc != 5) return 2;
    vlm_options o = VLM_OPTIONS_INIT;
    o.json_schema = "{\"type\": \"object\", \"properties\": {\"minimum\": {\"type\": \"integer\", \"minimum\": 1}}}";
    vlm_handle bad = vlm_open(argv[1], &o);
    printf("%s\t%s\n", vlm_status_name((int)bad), vlm_last_error(0));
    o.json_schema = argv[3];
    o.temperature = 1.0f;
    o.max_tokens = 40;
    for (int seed = 0; seed < atoi(argv[4]); seed++) {
        o.seed = (uint32_t)seed;
        vlm_handle h = vlm_open(argv[1], &o);
        if (h < 0) { fprintf(stderr, "%s\n", vlm_last_error(0)); return 1; }
        vlm_image img = {argv[2], NULL, 0, 0};
        char out[4096];
        size_t needed = 0;
        vlm_status s = vlm_ask(h, &img, "Tag this image as JSON.", out, sizeof out, &needed);
        if (s != VLM_OK) { fprintf(stderr, "%s\n", vlm_last_error(h)); return 1; }
        printf("%s\n", out);
        vlm_close(h);
    }
    return 0;
}
"""


@needs_cc
def test_json_schema_through_the_c_options(capi_lib: Path, vlm_model: Path, small_png, tmp_path: Path) -> None:
    """ABI 3's vlm_options.json_schema: every answer follows the schema; a schema vlm cannot enforce is
    VLM_E_INVALID_ARGUMENT naming the keyword. (ABI 2 programs: examples/vlm_ctypes.py, above.)"""
    from vlmcli.tasks.structured import from_schema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "scene": {"enum": ["in", "out"]}},
        "required": ["ok", "scene"],
    }
    src = tmp_path / "structured.c"
    src.write_text(STRUCTURED_C)
    exe = compile_c(src, tmp_path / "structured", capi_lib)
    r = subprocess.run(
        [str(exe), str(vlm_model), str(small_png[0]), json.dumps(schema), "5"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LD_LIBRARY_PATH": str(capi_lib)},
    )
    assert r.returncode == 0, r.stderr
    refused, *answers = r.stdout.splitlines()
    assert refused.startswith("VLM_E_INVALID_ARGUMENT\tvlm_options.json_schema: ") and "'minimum'" in refused
    assert len(answers) == 5
    for a in answers:
        assert from_schema(schema).parse(a)[1] is None, a
