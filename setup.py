"""Only the C part of the build; everything else is in pyproject.toml.

vlmcli/engines/_clip_kernels.c holds vlm's CLIP kernels for x86-64 CPUs (engines/clip_kernels.py). It
is built as a plain shared library, with no Python in it, and opened with ctypes: its functions are
handed to ggml as custom ops, which needs their addresses, not Python callables. It is optional: where
it does not compile (no C compiler, an old one), vlm installs without it and CLIP runs on ggml's kernels.
vlmcli/engines/_sampling.c (engines/sampling.py) draws next tokens; portable C, optional the same way
(numpy draws the same tokens where it is missing).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# clip_kernels.LIBRARY and sampling.LIBRARY name the same files
LIBRARY = "vlmcli.engines.libvlm_clip_kernels"
SAMPLING = "vlmcli.engines.libvlm_sampling"
LIBRARIES = (LIBRARY, SAMPLING)


class build_shared_library(build_ext):
    """build_ext for a library that ctypes opens, not a module that Python imports: a plain file name
    (no interpreter ABI tag: any Python opens it) and no PyInit_ function to export."""

    def get_ext_filename(self, fullname: str) -> str:  # (called with the full name and with its last part)
        if fullname.split(".")[-1] not in {name.split(".")[-1] for name in LIBRARIES}:
            return super().get_ext_filename(fullname)
        return os.path.join(*fullname.split(".")) + (".dll" if sys.platform == "win32" else ".so")

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return list(ext.export_symbols) if ext.name in LIBRARIES else super().get_export_symbols(ext)


setup(
    cmdclass={"build_ext": build_shared_library},
    ext_modules=[
        Extension(LIBRARY, ["vlmcli/engines/_clip_kernels.c"], extra_compile_args=["-O2"], optional=True),
        # -O3 vectorizes the passes over a row; exp is written out, so no -ffast-math is needed
        Extension(
            SAMPLING,
            ["vlmcli/engines/_sampling.c"],
            extra_compile_args=["-O3"],
            libraries=[] if sys.platform == "win32" else ["m"],
            export_symbols=["vlm_sample_rows"],
            optional=True,
        ),
    ],
)
