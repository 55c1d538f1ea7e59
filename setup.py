"""Only the C part of the build; everything else is in pyproject.toml.

vlmcli/engines/_clip_kernels.c is CLIP's BF16 matmul for CPUs with AVX512_BF16 (engines/clip_kernels.py).
It is optional: where it does not compile (no C compiler, an old one, not x86), vlm installs without
it and CLIP runs on ggml's own kernels.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vlmcli.engines._clip_kernels",
            ["vlmcli/engines/_clip_kernels.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
