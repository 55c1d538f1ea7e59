"""Build libvlm: the C API of vlm.h as a shared library that embeds this Python installation.

cffi's embedding mode generates the C source of a shared library whose exported functions start
an embedded interpreter on first use and call the Python functions in `vlmcli.capi.exports`, which
run the same tasks and engines as the CLI. This module writes that source and compiles it with the
system C compiler (no setuptools involved), linking libpython with an rpath, so the result runs
from any program without a virtual environment being activated:

    build_library(Path("out"))  ->  out/vlm.h, out/libvlm.so (libvlm.dylib on macOS)
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vlmcli.errors import VlmError

MODULE_NAME = "_vlm_capi"  # the Python module the library registers itself as
HEADER_NAME = "vlm.h"

# Run once, inside the embedded interpreter, on the first call into the library.
INIT_CODE = """
import sys
for _p in {paths!r}:
    if _p not in sys.path:
        sys.path.append(_p)
from {module} import ffi, lib
from vlmcli.capi.exports import install
install(ffi, lib)
"""


@dataclass
class BuiltLibrary:
    header: Path
    library: Path
    python: str  # the interpreter whose installation the library embeds


def library_filename() -> str:
    return "libvlm.dylib" if sys.platform == "darwin" else "libvlm.so"


def capi_file(name: str) -> str:
    return resources.files("vlmcli.capi").joinpath(name).read_text(encoding="utf-8")


def python_functions(glue: str) -> str:
    """The prototypes of the Python side of each vlm_* function, declared once in glue.c (between
    its python-functions markers); cffi exports them under these internal names."""
    m = re.search(r"/\* python-functions-begin \*/(.*)/\* python-functions-end \*/", glue, re.S)
    if not m:
        raise VlmError("glue.c has no python-functions-begin / -end markers")
    return m.group(1)


def header_cdef(header: str) -> str:
    """The plain declarations of vlm.h (between its cdef markers), for cffi's parser."""
    m = re.search(r"/\* cdef-begin.*?\*/(.*)/\* cdef-end \*/", header, re.S)
    if m is None:
        raise VlmError("vlm.h has no cdef-begin / cdef-end markers")
    return m.group(1)


def _python_paths() -> list[str]:
    """Where this installation's packages live, as a fallback after the interpreter's own sys.path
    (the interpreter normally finds them itself through the venv's pyvenv.cfg)."""
    import vlmcli

    paths = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), str(Path(vlmcli.__file__).parent.parent)]
    seen: list[str] = []
    for p in paths:
        if p and p not in seen:
            seen.append(p)
    return seen


def _python_link_args() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for embedding this interpreter's libpython."""
    include = sysconfig.get_paths()["include"]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldversion = sysconfig.get_config_var("LDVERSION") or f"{sys.version_info.major}.{sys.version_info.minor}"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and sys.platform != "darwin":
        raise VlmError(
            f"this Python ({sys.executable}) was built without a shared libpython, which embedding needs; "
            "use a Python built with --enable-shared (distribution Pythons, pyenv with "
            "PYTHON_CONFIGURE_OPTS=--enable-shared, uv/python-build-standalone)"
        )
    cflags = [f"-I{include}"]
    ldflags = [f"-L{libdir}", f"-lpython{ldversion}", f"-Wl,-rpath,{libdir}"]
    return cflags, ldflags


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = shlex.split(cc)
    if shutil.which(cmd[0]) is None:
        for alt in ("cc", "gcc", "clang"):
            if shutil.which(alt):
                return [alt]
        raise VlmError("no C compiler found (install gcc or clang, or set CC)")
    return cmd


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def generate_source(c_file: Path) -> None:
    """Write the library's C source (cffi's embedding support + glue.c + the extern "Python" stubs)."""
    try:
        import cffi
    except ImportError:
        raise VlmError("building the C library needs cffi: pip install 'vlmcli[lib]' (or pip install cffi)") from None

    header = capi_file(HEADER_NAME)
    ffi = cffi.FFI()
    ffi.cdef(header_cdef(header))
    glue = capi_file("glue.c")
    ffi.embedding_api(python_functions(glue))
    ffi.set_source(MODULE_NAME, glue)
    ffi.embedding_init_code(INIT_CODE.format(paths=_python_paths(), module=MODULE_NAME))
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # cffi prints "generating ..."
        ffi.emit_c_code(str(c_file))


def build_library(out_dir: str | os.PathLike[str], *, relocatable: bool = False, verbose: bool = False) -> BuiltLibrary:
    """Write out_dir/vlm.h and the shared library built against this interpreter and installation."""
    from vlmcli import __version__

    out = Path(out_dir)
    header_path = out / HEADER_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        header_path.write_text(capi_file(HEADER_NAME), encoding="utf-8")
    except OSError as e:
        raise VlmError(f"cannot write the library here ({e.strerror})", out) from None
    lib_path = out / library_filename()
    cflags, ldflags = _python_link_args()
    with tempfile.TemporaryDirectory(prefix=".vlm-lib-", dir=out) as tmp:
        c_file = Path(tmp) / f"{MODULE_NAME}.c"
        generate_source(c_file)
        tmp_lib = Path(tmp) / lib_path.name
        # The library's own name, recorded in every program linked against it. By default it is the
        # absolute path, so `cc app.c -IDIR -LDIR -lvlm` gives a program that runs as it is (no
        # rpath, no LD_LIBRARY_PATH); the library is tied to this Python installation anyway.
        # relocatable=True records the bare file name: link with -Wl,-rpath,DIR or set the path.
        install_name = lib_path.name if relocatable else str(lib_path.resolve())
        if sys.platform == "darwin":
            shared = ["-dynamiclib", f"-Wl,-install_name,{'@rpath/' if relocatable else ''}{install_name}"]
        else:
            shared = ["-shared", f"-Wl,-soname,{install_name}"]
        cmd = [
            *_compiler(),
            *shared,
            "-fPIC",
            "-O2",
            "-pthread",
            "-fvisibility=hidden",
            f"-I{out}",
            *cflags,
            f"-DVLM_PYTHON_EXECUTABLE={_c_string(sys.executable)}",
            f"-DVLM_PACKAGE_VERSION={_c_string(__version__)}",
            str(c_file),
            "-o",
            str(tmp_lib),
            *ldflags,
        ]
        if verbose:
            print(shlex.join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise VlmError(f"compiling the library failed ({shlex.join(cmd[:1])}):\n{proc.stderr.strip()}")
        # Replace atomically: a program may have the old library loaded.
        os.replace(tmp_lib, lib_path)
    return BuiltLibrary(header=header_path, library=lib_path, python=sys.executable)
