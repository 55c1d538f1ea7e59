"""What an AVX2 integer matmul tile can reach on this CPU, and what an 8-bit one would cost in error.

Two questions behind the i16 kernels (engines/_clip_kernels.c) on AVX2-only CPUs:
- Peak: the inner step of the i16 kernel's 6 x 16 tile (a broadcast pair of x, VPMADDWD + VPADDD
  against two weight vectors, per row) and of an 8-bit 5 x 16 tile (VPMADDUBSW, VPMADDWD against ones,
  VPADDD), in a loop over data that stays in L1, one thread: G multiply-adds per second. The kernel's
  own rate (bench_matmul.py) divided by this is how near it runs to its tile's peak. Beside them, an
  F32 FMA tile of the same shape: the ceiling of an AVX2 sgemm, so of PyTorch on this CPU. The i16
  tile's lead over it bounds vlm's lead over transformers (bench_clip.py): 2x needs transformers to
  run below half of i16 / F32 of its own ceiling.
- Error: the 8-bit tile needs 7-bit weights (VPMADDUBSW saturates at 16 bits: 2 x 255 x 63 fits,
  2 x 255 x 127 does not). One 768 -> 768 matmul with outlier channels in x (as a ViT's residual
  stream has) is rounded each way, with one scale per block of k, against the F32 product.

    python benchmarks/tile_peaks.py        (needs gcc; x86 with AVX2)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

C_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int8_t W[64 * 96] __attribute__((aligned(64))), A[64 * 24] __attribute__((aligned(64)));
#define STEPS 64
#define SUM(...) { __m256i v[] = {__VA_ARGS__}, s = v[0]; \
    for (unsigned i = 1; i < sizeof v / sizeof v[0]; i++) s = _mm256_add_epi32(s, v[i]); \
    volatile int sink = _mm256_extract_epi32(s, 0); (void)sink; }

/* 6 x 16 i16 tile: per step 2 weight vectors (16 columns x a k pair) and 6 broadcast pairs of x */
__attribute__((target("avx2"))) static double i16_tile(long reps) {
    register __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
                     c8 = c0, c9 = c0, c10 = c0, c11 = c0;
    const double t = now();
    for (long r = 0; r < reps; r++) {
        const int8_t *w = W, *a = A;
        for (int p = 0; p < STEPS; p++, w += 64, a += 24) {
            const __m256i w0 = _mm256_load_si256((const void *)w), w1 = _mm256_load_si256((const void *)(w + 32));
            __m256i x, u;
#define ROW(i) "vpbroadcastd " #i "*4(%[a]), %[x]\n\t" \
               "vpmaddwd %[w0], %[x], %[u]\n\tvpaddd %[u], %[c" #i "0], %[c" #i "0]\n\t" \
               "vpmaddwd %[w1], %[x], %[u]\n\tvpaddd %[u], %[c" #i "1], %[c" #i "1]\n\t"
#define THREE(p0, p1, p2, p3, p4, p5, rows) \
            __asm__(ROW(0) ROW(1) ROW(2) : [c00] "+x"(p0), [c01] "+x"(p1), [c10] "+x"(p2), [c11] "+x"(p3), \
                    [c20] "+x"(p4), [c21] "+x"(p5), [x] "=&x"(x), [u] "=&x"(u) \
                    : [w0] "x"(w0), [w1] "x"(w1), [a] "r"(rows) : "memory")
            THREE(c0, c1, c2, c3, c4, c5, a);
            THREE(c6, c7, c8, c9, c10, c11, a + 12);
#undef THREE
#undef ROW
        }
    }
    const double s = now() - t;
    SUM(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11)
    return reps * (double)STEPS * 6 * 16 * 2 / s;
}

/* 6 x 16 F32 tile, an AVX2 sgemm's (PyTorch's, OpenBLAS's): per step 2 weight vectors (16 columns x
   one k) and 6 broadcast floats of x, an FMA per accumulator */
__attribute__((target("avx2,fma"))) static double f32_tile(long reps) {
    register __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
                    c8 = c0, c9 = c0, c10 = c0, c11 = c0;
    const double t = now();
    for (long r = 0; r < reps; r++) {
        const float *w = (const float *)W, *a = (const float *)A;
        for (int p = 0; p < STEPS; p++, w += 16, a += 6) {
            const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8);
            __m256 x;
#define ROW(i) "vbroadcastss " #i "*4(%[a]), %[x]\n\tvfmadd231ps %[w0], %[x], %[c" #i "0]\n\t" \
               "vfmadd231ps %[w1], %[x], %[c" #i "1]\n\t"
#define SIX(p0, p1, p2, p3, p4, p5, rows) \
            __asm__(ROW(0) ROW(1) ROW(2) : [c00] "+x"(p0), [c01] "+x"(p1), [c10] "+x"(p2), [c11] "+x"(p3), \
                    [c20] "+x"(p4), [c21] "+x"(p5), [x] "=&x"(x) : [w0] "x"(w0), [w1] "x"(w1), [a] "r"(rows) : "memory")
            SIX(c0, c1, c2, c3, c4, c5, a);
            SIX(c6, c7, c8, c9, c10, c11, a + 3);
#undef SIX
#undef ROW
        }
    }
    const double s = now() - t;
    const __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                                   _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)),
                                                 _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11))));
    volatile float sink = _mm256_cvtss_f32(v); (void)sink;
    return reps * (double)STEPS * 6 * 16 / s;
}

/* 5 x 16 8-bit tile: per step 2 weight vectors (16 columns x 4 k) and 5 broadcast quads of x;
   15 registers with the vector of ones */
__attribute__((target("avx2"))) static double i8_tile(long reps) {
    register __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
                     c8 = c0, c9 = c0;
    const __m256i ones = _mm256_set1_epi16(1);
    const double t = now();
    for (long r = 0; r < reps; r++) {
        const int8_t *w = W, *a = A;
        for (int p = 0; p < STEPS; p++, w += 64, a += 20) {
            const __m256i w0 = _mm256_load_si256((const void *)w), w1 = _mm256_load_si256((const void *)(w + 32));
            __m256i x, u;
#define ROW(i) "vpbroadcastd " #i "*4(%[a]), %[x]\n\t" \
               "vpmaddubsw %[w0], %[x], %[u]\n\tvpmaddwd %[one], %[u], %[u]\n\t" \
               "vpaddd %[u], %[c" #i "0], %[c" #i "0]\n\t" \
               "vpmaddubsw %[w1], %[x], %[u]\n\tvpmaddwd %[one], %[u], %[u]\n\t" \
               "vpaddd %[u], %[c" #i "1], %[c" #i "1]\n\t"
            __asm__(ROW(0) ROW(1) ROW(2) ROW(3) ROW(4)
                    : [c00] "+x"(c0), [c01] "+x"(c1), [c10] "+x"(c2), [c11] "+x"(c3), [c20] "+x"(c4), [c21] "+x"(c5),
                      [c30] "+x"(c6), [c31] "+x"(c7), [c40] "+x"(c8), [c41] "+x"(c9), [x] "=&x"(x), [u] "=&x"(u)
                    : [w0] "x"(w0), [w1] "x"(w1), [one] "x"(ones), [a] "r"(a) : "memory");
#undef ROW
        }
    }
    const double s = now() - t;
    SUM(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9)
    return reps * (double)STEPS * 5 * 16 * 4 / s;
}

int main(void) {
    for (int run = 0; run < 5; run++)
        printf("%.2f %.2f %.2f\n", i16_tile(1000000) / 1e9, i8_tile(1000000) / 1e9, f32_tile(1000000) / 1e9);
    return 0;
}
"""


def tile_peaks() -> tuple[float, float, float]:
    """Median G multiply-adds/s per core of the i16, the 8-bit and the F32 FMA tile (5 runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "tiles.c", Path(tmp) / "tiles"
        src.write_text(C_SOURCE)
        subprocess.run(["gcc", "-O2", str(src), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    runs = np.array([[float(v) for v in line.split()] for line in out.splitlines()])
    return float(np.median(runs[:, 0])), float(np.median(runs[:, 1])), float(np.median(runs[:, 2]))


def rounded(a: np.ndarray, qmax: int, block: int) -> np.ndarray:
    """a with each block of k values rounded to integers of at most qmax times the block's scale."""
    blocks = a.reshape(a.shape[0], -1, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / qmax
    scale[scale == 0] = 1
    return (np.round(blocks / scale) * scale).reshape(a.shape)


def rounding_errors() -> dict[str, float]:
    """Relative RMS error of one 768 -> 768 matmul (512 rows) per rounding (x bits/block, w bits/block)."""
    rng = np.random.default_rng(0)
    k, n, m = 768, 768, 512
    w = rng.standard_normal((n, k)) * 0.02
    x = rng.standard_normal((m, k))
    x[:, rng.choice(k, 4, replace=False)] *= 20  # outlier channels
    ref = x @ w.T
    schemes = {
        "i16 (x 13 bits / 128, w 13 bits / 128)": (4095, 128, 4095, 128),
        "Q8_0-like (x 8 bits / 32, w 8 bits / 32)": (127, 32, 127, 32),
        "8-bit tile (x 8 bits / 128, w 7 bits / 128)": (127, 128, 63, 128),
    }
    errors = {}
    for name, (xq, xb, wq, wb) in schemes.items():
        err = rounded(x, xq, xb) @ rounded(w, wq, wb).T - ref
        errors[name] = float(np.sqrt((err**2).mean() / (ref**2).mean()))
    return errors


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from report import print_table

    i16, i8, f32 = tile_peaks()
    print_table(
        "Matmul tile peaks",
        ["tile", "G multiply-adds/s per core"],
        [
            ["F32 6 x 16 (VFMADD231PS, an AVX2 sgemm's)", f"{f32:.1f}"],
            ["i16 6 x 16 (VPMADDWD + VPADDD)", f"{i16:.1f} ({i16 / f32:.2f}x F32)"],
            ["8-bit 5 x 16 (VPMADDUBSW + VPMADDWD + VPADDD; not built)", f"{i8:.1f} ({i8 / i16:.2f}x i16)"],
        ],
        note="one thread, data in L1, medians of 5",
    )
    print_table(
        "Rounding error of an 8-bit tile",
        ["rounding (x, w: bits / values per scale)", "relative RMS error"],
        [[name, f"{err * 100:.2f}%"] for name, err in rounding_errors().items()],
        note="one 768 -> 768 matmul of 512 rows, outlier channels in x, against the F32 product",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
