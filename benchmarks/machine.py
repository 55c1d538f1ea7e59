"""What a benchmark ran on: the CPU model and the SIMD extensions ggml picks kernels by."""

from __future__ import annotations

import os
import platform

# /proc/cpuinfo flag -> the name in results: the extensions ggml and vlm's CLIP kernels pick their forms by.
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("f16c", "F16C"),
    ("avx_vnni", "AVX_VNNI"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX512_VNNI"),
    ("avx512_bf16", "AVX512_BF16"),
)


def cpu_description() -> str:
    """e.g. "AMD EPYC 7B13, 2 cores, AVX2 FMA F16C (no AVX-512)"."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    simd = [label for flag, label in ISA_FLAGS if flag in flags]
    wide = "" if "avx512f" in flags or not flags else " (no AVX-512)"
    return f"{name}, {os.cpu_count()} cores, {' '.join(simd) or 'no x86 SIMD flags'}{wide}"


if __name__ == "__main__":
    print(cpu_description())
