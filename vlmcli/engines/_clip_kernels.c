/* CLIP's two hot ops for ggml's CPU graphs on x86-64 CPUs (engines/clip_kernels.py), each a ggml
   custom op (ggml_custom_4d) run on ggml's own threads. A plain shared library (no Python in it),
   opened with ctypes.

   The matmul: y[m][n] = act(sum_k norm(x[m])[k] w[n][k] + bias[n]) + residual[m][n], x F32
   activations, norm none or a LayerNorm applied to each row as it is read, w packed once at load, y
   F32, act none, quick GELU or GELU's tanh form, residual none or F32; bias, act and residual are applied as a tile
   leaves the registers, so none of them makes a pass of its own over memory. Two kinds of weights,
   three forms:
   - BF16 (AVX512_BF16): x rounded to BF16 as ggml does for a BF16 weight, VDPBF16PS (32
     multiply-adds) per step, 12 x 32 tiles of y in 24 registers;
   - I16 (AVX2): x and w as 16-bit integers with a scale per 128 k, VPMADDWD (16 multiply-adds, twice
     an F32 FMA's) and an integer add per step, 6 x 16 tiles in 12 of the 16 registers; with
     AVX512_VNNI the same bits from VPDPWSSD (32 multiply-adds and the add) in 12 x 32 tiles.
   Why not ggml's mul_mat: its tinyBLAS kernel computes each output as a dot product along k and
   reduces every accumulator horizontally at the end. These are outer products: a tile of y stays
   in registers while k runs, fed per step by a broadcast of x and two vectors of packed w.

   Each y[m][n] is summed in one fixed order (k ascending) whatever the tile, the thread or the
   number of rows, so a row's result never depends on the rows batched with it.

   Packed w (vlm_bf16_pack and vlm_i16_pack, from the file's F16 or F32 values at load): panels of 32
   (BF16) or 16 (I16) output columns; in a panel, for each pair of k, the columns' values side by
   side: [n / 32][k / 2][32][2] and [n / 16][k / 2][16][2].

   The attention (AVX2, for both kinds) replaces ggml's eight ops per layer (permutes, copies, two
   mul_mats, a soft max and the zero padding that lets att @ v use tinyBLAS); it also lets texts of
   different lengths share a batch, each at its own length. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* vlm_clip_kernels_cpu's flags (clip_kernels.Form.needs). */
#define VLM_CPU_AVX2 1        /* AVX2, FMA and F16C */
#define VLM_CPU_AVX512_BF16 2
#define VLM_CPU_AVX512_VNNI 4

/* Mirrored by clip_kernels.MatmulOp (ctypes). */
struct vlm_matmul {
    void *(*get_data)(const void *tensor); /* ggml_get_data: tensors get their memory after this op is built */
    const void *x;                         /* ggml tensor, F32, k x m, contiguous */
    const void *bias;                      /* ggml tensor, F32, n; or NULL */
    const uint16_t *w;                     /* packed BF16 or I16 weights */
    int64_t m, k, n;
    int32_t act;                           /* 0: none, 1: quick GELU, x * sigmoid(1.702 x), 2: GELU (tanh form) */
    const float *w_scales;                 /* I16 only: a scale per column and block of KB k, [n / 16][blocks][16] */
    const void *ln_w, *ln_b;               /* ggml tensors, F32, k: each row of x is layer-normed first; or NULL */
    float ln_eps;
    const void *residual;                  /* ggml tensor, F32, n x m: added to y last; or NULL */
    int64_t next_row;                      /* rows handed out so far in this compute (0 between computes) */
    int32_t finished;                      /* threads done with this compute: the last one resets both */
};

/* Mirrored by clip_kernels.AttentionOp (ctypes). */
struct vlm_attention {
    void *(*get_data)(const void *tensor);
    const void *qkv;      /* ggml tensor, F32, 3 d x m: per token q, k, v (each d = n_heads x hd) */
    const int32_t *seqs;  /* n_seqs pairs (first token, length): the sequences packed into m */
    int64_t n_seqs, d, n_heads;
    float scale;
    int32_t causal;
    const int32_t *queries; /* NULL: every token's output (d x m); else n_queries pairs (sequence, token
                               within it), output row i = query i's (d x n_queries) */
    int64_t n_queries;
    int32_t int16; /* long non-causal sequences: both products on the I16 matmul's tiles (attend_i16) */
    int64_t next_item;  /* work items handed out so far in this compute (0 between computes) */
    int32_t finished;   /* threads done with this compute: the last one resets both */
};

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 11 : __GNUC__ >= 11)
#define HAVE_KERNEL 1
#include <immintrin.h>

/* One op's tensors once ggml has given them memory. */
struct io {
    const float *x, *bias, *ln_w, *ln_b, *res;
    float *y;
};

/* What finish_rows applies to a tile of y: the bias (its panel's part), act, then residual rows (the
   tile's own, stride as y). */
struct tail {
    const float *bias, *res;
    int act;
};

/* The tail of the tile at row r, column c of y. */
static struct tail tail_at(const struct vlm_matmul *op, const struct io *io, int64_t r, int64_t c) {
    struct tail t = {io->bias ? io->bias + c : NULL, io->res ? io->res + r * op->n + c : NULL, op->act};
    return t;
}

/* --- what every matmul does to its rows on the way in and out (AVX2 + FMA + F16C, which every --------
   AVX512_BF16 CPU has): the layer norm, then bias, quick GELU and the residual */

#define TARGET2 __attribute__((target("avx2,fma,f16c")))
#define NR2 16  /* output columns per AVX2 tile (and I16 panel): two vectors of 8 */
#define MR2 6   /* rows per AVX2 tile: 12 accumulators, 2 weight vectors and a broadcast fit 16 registers */

TARGET2 static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

TARGET2 static inline float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* e^x for -87 <= x <= 88 (below: a tiny positive value the callers mask or absorb), to about 3 ulp:
   2^n * p(r), r = x - n ln 2, p of degree 5 (its coefficients fitted for the least largest relative
   error on |r| <= ln 2 / 2), the exponent added to the bits */
TARGET2 static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(8.33380777e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.18985612e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66668867e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.99991428e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale)); /* -126 <= n <= 127: a normal power of two */
}

/* y * sigmoid(-z) = y / (1 + e^z), e^z capped below F32's overflow: past the cap (and once 1 / (1 + e^z) is
   subnormal, which the reciprocal flushes) the result is a signed zero where the true one is below 1e-36 */
TARGET2 static inline __m256 times_sigmoid8(__m256 y, __m256 z) {
    const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_min_ps(z, _mm256_set1_ps(88.0f))));
    const __m256 r = _mm256_rcp_ps(den); /* 1 / den to 12 bits, then 23 */
    return _mm256_mul_ps(y, _mm256_mul_ps(r, _mm256_fnmadd_ps(den, r, _mm256_set1_ps(2.0f))));
}

/* quick GELU (CLIP): y * sigmoid(1.702 y) */
TARGET2 static inline __m256 quick_gelu8(__m256 y) {
    return times_sigmoid8(y, _mm256_mul_ps(y, _mm256_set1_ps(-1.702f)));
}

/* GELU in its tanh form (SigLIP, ggml_gelu): 0.5 y (1 + tanh(c (y + 0.044715 y^3))) = y * sigmoid(2 c (y +
   0.044715 y^3)), c = sqrt(2 / pi) */
TARGET2 static inline __m256 tanh_gelu8(__m256 y) {
    const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(y, y), _mm256_set1_ps(0.044715f), _mm256_set1_ps(1.0f));
    return times_sigmoid8(y, _mm256_mul_ps(_mm256_mul_ps(y, _mm256_set1_ps(-1.5957691216057308f)), inner));
}

/* The end of a tile for every matmul: rows of y (mr rows of n floats, stride ldy) get the bias, act
   and the residual in place, while they are still in L1. */
TARGET2 static void finish_rows(float *y, int64_t ldy, int mr, int n, struct tail t) {
    if (!t.bias && !t.act && !t.res) return;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < n; j += 8) {
            __m256 v = _mm256_loadu_ps(y + i * ldy + j);
            if (t.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(t.bias + j));
            if (t.act == 1) v = quick_gelu8(v);
            else if (t.act == 2) v = tanh_gelu8(v);
            if (t.res) v = _mm256_add_ps(v, _mm256_loadu_ps(t.res + i * ldy + j));
            _mm256_storeu_ps(y + i * ldy + j, v);
        }
}

/* x's row r as the matmul reads it: as it is, or layer-normed into tmp (k floats, k a multiple of 8):
   (x - mean) / sqrt(variance + eps) * ln_w + ln_b, mean and variance summed in F32 in a fixed order. */
TARGET2 static const float *input_row(const struct vlm_matmul *op, const struct io *io, int64_t r, float *tmp) {
    const int64_t k = op->k;
    const float *x = io->x + r * k;
    if (!io->ln_w) return x;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(x + j));
    const __m256 mean = _mm256_set1_ps(hsum8(sum) / (float)k);
    __m256 sq = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 8) {
        const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + j), mean);
        sq = _mm256_fmadd_ps(c, c, sq);
    }
    const __m256 rstd = _mm256_set1_ps(1.0f / sqrtf(hsum8(sq) / (float)k + op->ln_eps));
    for (int64_t j = 0; j < k; j += 8) {
        const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), mean), rstd);
        _mm256_storeu_ps(tmp + j, _mm256_fmadd_ps(c, _mm256_loadu_ps(io->ln_w + j), _mm256_loadu_ps(io->ln_b + j)));
    }
    return tmp;
}

/* What each ggml thread keeps between ops, one room per use. */
enum room {
    ROOM_ROW,      /* one layer-normed row (F32) */
    ROOM_BF16,     /* a block of rows rounded to BF16 */
    ROOM_Q,        /* a block of rows quantized to I16, laid out for the tiles */
    ROOM_Q_SCALES, /* their scales */
    ROOM_Q_ROW,    /* one quantized row before it is interleaved (the 512-bit form) */
    ROOM_ATTEND,   /* the attention's transposed keys and scores */
    ROOMS
};

/* The calling thread's room of at least `bytes`, 64-byte aligned; its contents are not kept. */
static void *thread_room(enum room slot, size_t bytes) {
    static __thread void *room[ROOMS];
    static __thread size_t cap[ROOMS];
    if (bytes > cap[slot]) {
        free(room[slot]);
        room[slot] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!room[slot]) abort(); /* as ggml does when it cannot allocate */
        cap[slot] = bytes;
    }
    return room[slot];
}

/* --- AVX512_BF16: the BF16 matmul ------------------------------------------------------------ */

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#define NR 32   /* output columns per tile: two vectors of 16 floats */
#define MR 12   /* rows per tile: 24 accumulators, 2 weight vectors and a broadcast fit 32 registers */
#define MB 96   /* rows rounded to BF16 at a time (at most 576 KB for k = 3072: stays in L2) */

/* One MR' x 32 tile, MR' = mr a constant after inlining (tile_rows' switch) so the accumulators stay
   in registers. a: mr rows of k BF16 values (stride lda), panel: one packed panel of w. */
TARGET static inline __attribute__((always_inline)) void tile(const int mr, const uint16_t *a, int64_t lda,
        const uint16_t *panel, int64_t k, float *y, int64_t ldy, struct tail t) {
    __m512 acc[MR][2];
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k / 2; p++) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * NR);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * NR + NR);
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, a + i * lda + 2 * p, sizeof pair);
            __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, w1);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) {
        _mm512_storeu_ps(y + i * ldy, acc[i][0]);
        _mm512_storeu_ps(y + i * ldy + 16, acc[i][1]);
    }
    finish_rows(y, ldy, mr, NR, t);
}

TARGET static void tile_rows(int mr, const uint16_t *a, int64_t lda, const uint16_t *panel, int64_t k, float *y,
                             int64_t ldy, struct tail t) {
    switch (mr) {
#define CASE(r) case r: tile(r, a, lda, panel, k, y, ldy, t); break;
    CASE(12) CASE(11) CASE(10) CASE(9) CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
    }
}

/* Rows [m0, m1) and panels [p0, p1) of y. */
TARGET static void run(const struct vlm_matmul *op, const struct io *io, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    const int64_t k = op->k, n = op->n;
    uint16_t *rows_bf16 = thread_room(ROOM_BF16, (size_t)MB * k * sizeof(uint16_t));
    for (int64_t mb = m0; mb < m1; mb += MB) {
        const int64_t rows = m1 - mb < MB ? m1 - mb : MB;
        for (int64_t r = 0; r < rows; r++) { /* round to nearest even, as ggml's own conversion */
            const float *x = input_row(op, io, mb + r, thread_room(ROOM_ROW, k * sizeof(float)));
            for (int64_t q = 0; q < k; q += 16)
                _mm256_storeu_si256((__m256i *)(rows_bf16 + r * k + q),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + q)));
        }
        for (int64_t p = p0; p < p1; p++) /* a panel (k x 32) is reused from cache by all the rows */
            for (int64_t r = 0; r < rows; r += MR)
                tile_rows(rows - r < MR ? (int)(rows - r) : MR, rows_bf16 + r * k, k, op->w + p * NR * k, k,
                          io->y + (mb + r) * n + p * NR, n, tail_at(op, io, mb + r, p * NR));
    }
}

/* Rows of x held in L2 while the panels pass over them. */
static int64_t l2_rows(int64_t row_bytes, int64_t mr) { /* whole tiles of mr rows in 256 KB, at least one */
    const int64_t rows = (256 * 1024 / row_bytes) / mr * mr;
    return rows < mr ? mr : rows;
}

/* --- AVX2: the I16 matmul (integer multiply-adds) ----------------------------------------------- */

/* x and w as 16-bit integers, each with a scale per KB values of k (a row of x, a column of w), summed
   exactly in 32 bits by VPMADDWD (16 multiply-adds per instruction against 8 for an F32 FMA) and
   scaled into F32 at the end of each block. |q| <= 4095 on both sides keeps a block's 64 pair-steps
   below 2^31 (2 x 4095^2 x 64); each value is rounded to 1 / 8190 of its block's largest. */
#define KB 128
#define QMAX 4095.0f

/* One mr x 16 tile over k: a mr rows of quantized x (lda values apart), their block scales (stride
   blocks), panel one packed panel of w ([k / 2][16][2]) with its scales ([blocks][16]). A step's six
   broadcasts read six rows, each a sequential stream the prefetchers follow, so rows need no
   interleaving after they are quantized. */
TARGET2 static inline __attribute__((always_inline)) void tile_i16(const int mr, const int16_t *a, int64_t lda,
        const float *a_scales, const int16_t *panel, const float *w_scales, int64_t k, float *y, int64_t ldy) {
    const int64_t blocks = (k + KB - 1) / KB;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t p0 = b * (KB / 2), p1 = (b + 1) * KB < k ? (b + 1) * (KB / 2) : k / 2;
        __m256i acc[MR2][2];
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        if (mr == MR2) { /* all 16 registers: written out, or the compiler hoists the broadcasts and spills */
            const int64_t row_bytes = lda * (int64_t)sizeof(int16_t);
            for (int64_t p = p0; p < p1; p++) {
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)(panel + p * 2 * NR2));
                const __m256i w1 = _mm256_loadu_si256((const __m256i *)(panel + p * 2 * NR2 + NR2));
                __m256i x, t;
#define ROW(addr, i) "vpbroadcastd " addr ", %[x]\n\t" \
                     "vpmaddwd %[w0], %[x], %[t]\n\tvpaddd %[t], %[c" #i "0], %[c" #i "0]\n\t" \
                     "vpmaddwd %[w1], %[x], %[t]\n\tvpaddd %[t], %[c" #i "1], %[c" #i "1]\n\t"
#define THREE_ROWS(r, rows)                                                                                    \
                __asm__(ROW("(%[a])", 0) ROW("(%[a],%[ld],1)", 1) ROW("(%[a],%[ld],2)", 2)                     \
                        : [c00] "+x"(acc[r][0]), [c01] "+x"(acc[r][1]), [c10] "+x"(acc[r + 1][0]),           \
                          [c11] "+x"(acc[r + 1][1]), [c20] "+x"(acc[r + 2][0]), [c21] "+x"(acc[r + 2][1]),   \
                          [x] "=&x"(x), [t] "=&x"(t)                                                         \
                        : [w0] "x"(w0), [w1] "x"(w1), [a] "r"(rows), [ld] "r"(row_bytes) : "memory")
                THREE_ROWS(0, a + 2 * p);
                THREE_ROWS(3, a + 3 * lda + 2 * p);
#undef THREE_ROWS
#undef ROW
            }
        } else for (int64_t p = p0; p < p1; p++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(panel + p * 2 * NR2));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(panel + p * 2 * NR2 + NR2));
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                const __m256i x = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(a + i * lda + 2 * p)));
                acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(x, w0));
                acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(x, w1));
            }
        }
        const __m256 s0 = _mm256_loadu_ps(w_scales + b * NR2), s1 = _mm256_loadu_ps(w_scales + b * NR2 + 8);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const __m256 sa = _mm256_set1_ps(a_scales[i * blocks + b]);
            const __m256 c0 = _mm256_cvtepi32_ps(acc[i][0]), c1 = _mm256_cvtepi32_ps(acc[i][1]);
            const __m256 t0 = _mm256_mul_ps(s0, sa), t1 = _mm256_mul_ps(s1, sa);
            /* fused explicitly: left to the compiler, some tiles' copies would fuse and others not */
            const __m256 v0 = b ? _mm256_fmadd_ps(c0, t0, _mm256_loadu_ps(y + i * ldy)) : _mm256_mul_ps(c0, t0);
            const __m256 v1 = b ? _mm256_fmadd_ps(c1, t1, _mm256_loadu_ps(y + i * ldy + 8)) : _mm256_mul_ps(c1, t1);
            _mm256_storeu_ps(y + i * ldy, v0);
            _mm256_storeu_ps(y + i * ldy + 8, v1);
        }
    }
}

/* A tile of mr rows by np panels (the AVX2 form: always 1); a as the form lays out quantized rows. */
typedef void (*i16_tile_fn)(int mr, int np, const int16_t *a, int64_t lda, const float *a_scales,
                            const int16_t *panel, const float *w_scales, int64_t k, float *y, int64_t ldy);

TARGET2 static void tile_i16_rows(int mr, int np, const int16_t *a, int64_t lda, const float *a_scales,
                                  const int16_t *panel, const float *w_scales, int64_t k, float *y, int64_t ldy) {
    (void)np;
    switch (mr) {
#define CASE(r) case r: tile_i16(r, a, lda, a_scales, panel, w_scales, k, y, ldy); break;
    CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
    }
}

/* 16 values (lo, hi) times inv, rounded to nearest even, stored as 16-bit integers at q. */
TARGET2 static inline void store_rounded16(int16_t *q, __m256 lo, __m256 hi, __m256 inv) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(lo, inv)), b = _mm256_cvtps_epi32(_mm256_mul_ps(hi, inv));
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
}

/* One block of len values (x, whose largest |x| is peak) -> q rounded to nearest even in units of
   peak / QMAX, that unit stored in *scale: the rounding every quantized value of the kernels takes. */
TARGET2 static inline void round_block(const float *x, int64_t len, float peak, int16_t *q, float *scale) {
    const int64_t vec = len / 16 * 16;
    const float inv = peak > 0.0f ? QMAX / peak : 0.0f;
    *scale = peak / QMAX;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t j = 0; j < vec; j += 16) store_rounded16(q + j, _mm256_loadu_ps(x + j), _mm256_loadu_ps(x + j + 8), vinv);
    for (int64_t j = vec; j < len; j++) /* nearest even, as the vectors (no libm) */
        q[j] = (int16_t)_mm_cvtss_si32(_mm_set_ss(x[j] * inv));
}

/* A row of k floats -> 16-bit integers and a scale per block of KB (the block's largest |x| / QMAX),
   rounded to nearest even. */
TARGET2 static void quantize_row(const float *x, int64_t k, int16_t *q, float *scales) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b0 = 0, b = 0; b0 < k; b0 += KB, b++) {
        const int64_t len = k - b0 < KB ? k - b0 : KB, vec = len / 16 * 16;
        __m256 top = _mm256_setzero_ps();
        for (int64_t j = 0; j < vec; j += 8) top = _mm256_max_ps(top, _mm256_and_ps(abs_mask, _mm256_loadu_ps(x + b0 + j)));
        float peak = hmax8(top);
        for (int64_t j = vec; j < len; j++) peak = fabsf(x[b0 + j]) > peak ? fabsf(x[b0 + j]) : peak;
        round_block(x + b0, len, peak, q + b0, scales + b);
    }
}

/* Rows of quantized x that stay in L2 while the panels pass over them, in tiles of mr rows. */
static int64_t i16_block(int64_t k, int64_t mr) { return l2_rows(2 * k, mr); }

/* How a form's tiles read quantized rows: mr_max rows by np_max panels, the rows as they are (k apart)
   or each tile's rows interleaved by pairs ([k / 2][mr][2], the last tile at its own count). */
struct i16_form {
    int mr_max, np_max, interleaved;
    i16_tile_fn tile;
};

/* A block of rows of x (rows <= i16_block(k, mr)) quantized for the form's tiles, scales [rows][blocks].
   Both live in the calling ggml thread's room, kept for its next op. */
TARGET2 static const int16_t *quantize_tiles(const struct vlm_matmul *op, const struct io *io, int64_t row0,
                                             int64_t rows, const struct i16_form *form, const float **scales_out) {
    const int64_t k = op->k, blocks = (k + KB - 1) / KB, mr_max = form->mr_max, cap_rows = i16_block(k, mr_max);
    int16_t *rows_q = thread_room(ROOM_Q, (size_t)cap_rows * k * sizeof(int16_t));
    int16_t *row = form->interleaved ? thread_room(ROOM_Q_ROW, k * sizeof(int16_t)) : NULL;
    float *rows_scales = thread_room(ROOM_Q_SCALES, (size_t)cap_rows * blocks * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        const float *x = input_row(op, io, row0 + r, thread_room(ROOM_ROW, k * sizeof(float)));
        if (!form->interleaved) {
            quantize_row(x, k, rows_q + r * k, rows_scales + r * blocks);
            continue;
        }
        /* row r goes to place r % mr_max of its tile's pairs */
        const int64_t tile0 = r / mr_max * mr_max, mr = rows - tile0 < mr_max ? rows - tile0 : mr_max;
        quantize_row(x, k, row, rows_scales + r * blocks);
        int16_t *dst = rows_q + tile0 * k + 2 * (r - tile0);
        for (int64_t p = 0; p < k / 2; p++) memcpy(dst + 2 * mr * p, row + 2 * p, 2 * sizeof(int16_t));
    }
    *scales_out = rows_scales;
    return rows_q;
}

/* Rows [m0, m1) and panels [p0, p1) of y for either form: each block of rows that stays in L2 is
   quantized once, then every panel (np_max at a time) passes over it in tiles of mr_max rows. */
static void run_i16_form(const struct vlm_matmul *op, const struct io *io, int64_t m0, int64_t m1, int64_t p0,
                         int64_t p1, const struct i16_form *form) {
    const int mr_max = form->mr_max, np_max = form->np_max;
    const int64_t k = op->k, n = op->n, mb_rows = i16_block(k, mr_max), blocks = (k + KB - 1) / KB;
    const int16_t *w = (const int16_t *)op->w;
    for (int64_t mb = m0; mb < m1; mb += mb_rows) {
        const int64_t rows = m1 - mb < mb_rows ? m1 - mb : mb_rows;
        const float *rows_scales;
        const int16_t *rows_q = quantize_tiles(op, io, mb, rows, form, &rows_scales);
        for (int64_t p = p0; p < p1; p += np_max) {
            const int np = p1 - p < np_max ? (int)(p1 - p) : np_max;
            for (int64_t r = 0; r < rows; r += mr_max) {
                const int mr = rows - r < mr_max ? (int)(rows - r) : mr_max;
                float *out = io->y + (mb + r) * n + p * NR2;
                /* the tile's lines of y and of the residual, each row in a stream the prefetchers lose
                   among the block's rows: asked for now, they arrive while the tile runs */
                for (int i = 0; i < mr; i++)
                    for (int c = 0; c < np * NR2; c += 8) { /* every 32 bytes: ggml aligns rows to 32, not 64 */
                        _mm_prefetch((const char *)(out + i * n + c), _MM_HINT_T0);
                        if (io->res) _mm_prefetch((const char *)(io->res + (mb + r + i) * n + p * NR2 + c), _MM_HINT_T0);
                    }
                form->tile(mr, np, rows_q + r * k, k, rows_scales + r * blocks, w + p * NR2 * k,
                           op->w_scales + p * blocks * NR2, k, out, n);
                finish_rows(out, n, mr, np * NR2, tail_at(op, io, mb + r, p * NR2));
            }
        }
    }
}

static void run_i16(const struct vlm_matmul *op, const struct io *io, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    static const struct i16_form avx2 = {MR2, 1, 0, tile_i16_rows};
    run_i16_form(op, io, m0, m1, p0, p1, &avx2);
}

/* --- AVX512_VNNI: the I16 matmul in 512-bit registers ------------------------------------------ */

/* The same numbers as tile_i16 (the same packed w, the same exact block sums, the same float32 steps
   per block), so the two give identical bits; VPDPWSSD does VPMADDWD's 16 multiply-adds and the add in
   one instruction, 32 to a register. A tile is MR rows by two panels (32 columns, 24 accumulators). */
#define TARGETV __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* One mr x (16 np) tile, np 1 or 2 panels: a mr rows of quantized x interleaved by pairs ([k / 2][mr][2])
   with their block scales (stride blocks); panel, panel + NR2 * k: the packed panels, w_scales theirs
   (stride blocks * NR2); y mr rows of 16 np floats. */
TARGETV static inline __attribute__((always_inline)) void tile_vnni(const int mr, const int np, const int16_t *a,
        const float *a_scales, const int16_t *panel, const float *w_scales, int64_t k, float *y, int64_t ldy) {
    const int64_t blocks = (k + KB - 1) / KB, stride = NR2 * k;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t p0 = b * (KB / 2), p1 = (b + 1) * KB < k ? (b + 1) * (KB / 2) : k / 2;
        __m512i acc[MR][2];
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        if (mr == MR && np == 2) { /* written out, or the compiler copies accumulators around and spills */
            for (int64_t p = p0; p < p1; p++) {
                const __m512i w0 = _mm512_loadu_si512(panel + p * 2 * NR2);
                const __m512i w1 = _mm512_loadu_si512(panel + stride + p * 2 * NR2);
                __m512i x;
#define ROW(disp, i) "vpbroadcastd " disp "(%[a]), %[x]\n\t" \
                     "vpdpwssd %[w0], %[x], %[c" #i "0]\n\tvpdpwssd %[w1], %[x], %[c" #i "1]\n\t"
#define THREE_ROWS(r)                                                                                       \
                __asm__(ROW("0", 0) ROW("4", 1) ROW("8", 2)                                                 \
                        : [c00] "+v"(acc[r][0]), [c01] "+v"(acc[r][1]), [c10] "+v"(acc[r + 1][0]),        \
                          [c11] "+v"(acc[r + 1][1]), [c20] "+v"(acc[r + 2][0]), [c21] "+v"(acc[r + 2][1]), \
                          [x] "=&v"(x)                                                                    \
                        : [w0] "v"(w0), [w1] "v"(w1), [a] "r"(a + 2 * (MR * p + r)) : "memory")
                THREE_ROWS(0);
                THREE_ROWS(3);
                THREE_ROWS(6);
                THREE_ROWS(9);
#undef THREE_ROWS
#undef ROW
            }
        } else for (int64_t p = p0; p < p1; p++) {
            const __m512i w0 = _mm512_loadu_si512(panel + p * 2 * NR2);
            const __m512i w1 = np == 2 ? _mm512_loadu_si512(panel + stride + p * 2 * NR2) : w0;
#pragma GCC unroll 16
            for (int i = 0; i < mr; i++) {
                int32_t pair;
                memcpy(&pair, a + 2 * (p * mr + i), sizeof pair);
                const __m512i x = _mm512_set1_epi32(pair);
                acc[i][0] = _mm512_dpwssd_epi32(acc[i][0], x, w0);
                if (np == 2) acc[i][1] = _mm512_dpwssd_epi32(acc[i][1], x, w1);
            }
        }
        const __m512 s0 = _mm512_loadu_ps(w_scales + b * NR2);
        const __m512 s1 = np == 2 ? _mm512_loadu_ps(w_scales + blocks * NR2 + b * NR2) : s0;
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) {
            const __m512 sa = _mm512_set1_ps(a_scales[i * blocks + b]);
            const __m512 c0 = _mm512_cvtepi32_ps(acc[i][0]), t0 = _mm512_mul_ps(s0, sa);
            float *out = y + i * ldy;
            _mm512_storeu_ps(out, b ? _mm512_fmadd_ps(c0, t0, _mm512_loadu_ps(out)) : _mm512_mul_ps(c0, t0));
            if (np == 2) {
                const __m512 c1 = _mm512_cvtepi32_ps(acc[i][1]), t1 = _mm512_mul_ps(s1, sa);
                _mm512_storeu_ps(out + NR2, b ? _mm512_fmadd_ps(c1, t1, _mm512_loadu_ps(out + NR2)) : _mm512_mul_ps(c1, t1));
            }
        }
    }
}

TARGETV static void tile_vnni_rows(int mr, int np, const int16_t *a, int64_t lda, const float *a_scales,
                                   const int16_t *panel, const float *w_scales, int64_t k, float *y, int64_t ldy) {
    (void)lda; /* interleaved rows */
    switch (mr * 2 + np - 1) {
#define CASE(r) case 2 * r: tile_vnni(r, 1, a, a_scales, panel, w_scales, k, y, ldy); break; \
                case 2 * r + 1: tile_vnni(r, 2, a, a_scales, panel, w_scales, k, y, ldy); break;
    CASE(12) CASE(11) CASE(10) CASE(9) CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
    }
}

static void run_vnni(const struct vlm_matmul *op, const struct io *io, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    static const struct i16_form vnni = {MR, 2, 1, tile_vnni_rows};
    run_i16_form(op, io, m0, m1, p0, p1, &vnni);
}

#define KEY_BLOCK 64 /* keys scored at once: up to 8 vectors of 8 scores accumulate in registers */

/* Room attend needs for a sequence of len tokens and heads of hd floats. */
#define KT_PAD 16     /* see attend */
#define QUERY_BLOCK 6 /* queries of a non-causal sequence scored and weighed together (see attend_block) */

static int64_t attend_scratch(int64_t len, int64_t hd) {
    const int64_t width = (len + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    return hd * (width + KT_PAD) + (hd + QUERY_BLOCK) * width;
}

/* out[0 : 8 n] = sum_j p_j inv v_j[0 : 8 n] for j < keys (v_j at v + j * stride), n a constant after
   inlining so the sums stay in registers */
TARGET2 static inline __attribute__((always_inline)) void weigh(const int n, const float *v, int64_t stride,
        const float *p, float inv, int64_t keys, float *out) {
    __m256 o[8];
#pragma GCC unroll 8
    for (int u = 0; u < n; u++) o[u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < keys; j++) {
        const __m256 pj = _mm256_set1_ps(p[j] * inv);
#pragma GCC unroll 8
        for (int u = 0; u < n; u++) o[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * stride + 8 * u), o[u]);
    }
#pragma GCC unroll 8
    for (int u = 0; u < n; u++) _mm256_storeu_ps(out + 8 * u, o[u]);
}

TARGET2 static void weigh_values(int n, const float *v, int64_t stride, const float *p, float inv, int64_t keys,
                                 float *out) {
    switch (n) {
#define CASE(r) case r: weigh(r, v, stride, p, inv, keys, out); break;
    CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
    }
}

/* scores[0 : n) (n a multiple of 8) = e^(score - peak), -inf ones 0; returns their sum */
TARGET2 static float exp_scores(float *scores, int64_t n, float top) {
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY), peak = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 sv = _mm256_loadu_ps(scores + j);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(sv, peak)), _mm256_cmp_ps(sv, minus_inf, _CMP_NEQ_OQ));
        _mm256_storeu_ps(scores + j, e);
        total = _mm256_add_ps(total, e);
    }
    return hsum8(total);
}

/* scores[0 : 8 n) = scale q . k_j for keys j0 + [0, 8 n), kt pointing at key j0 of the transposed keys
   (row stride width), n a constant after inlining so the sums stay in registers; keys from `live` on
   get -inf. Returns the running maximum. */
TARGET2 static inline __attribute__((always_inline)) __m256 score(const int n, const float *q, const float *kt,
        int64_t width, int64_t hd, float scale, int64_t live, float *scores, __m256 top) {
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), minus_inf = _mm256_set1_ps(-INFINITY);
    __m256 acc[8];
#pragma GCC unroll 8
    for (int v = 0; v < n; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < hd; c++) {
        const __m256 qc = _mm256_broadcast_ss(q + c);
#pragma GCC unroll 8
        for (int v = 0; v < n; v++) acc[v] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kt + c * width + 8 * v), acc[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < n; v++) {
        const __m256 in = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(live - 8 * v)), _CMP_LT_OQ);
        const __m256 sv = _mm256_blendv_ps(minus_inf, _mm256_mul_ps(acc[v], _mm256_set1_ps(scale)), in);
        _mm256_storeu_ps(scores + 8 * v, sv);
        top = _mm256_max_ps(top, sv);
    }
    return top;
}

TARGET2 static __m256 score_keys(int n, const float *q, const float *kt, int64_t width, int64_t hd, float scale,
                                 int64_t live, float *scores, __m256 top) {
    switch (n) {
#define CASE(r) case r: return score(r, q, kt, width, hd, scale, live, scores, top);
    CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
    }
    return top;
}

/* score, for QUERY_BLOCK queries (rows qstride apart) at once: each load of the keys feeds QUERY_BLOCK
   FMAs instead of one (a long sequence's keys do not stay in L1), every score summed as score sums it
   (the same bits); their scores go to rows width apart, tops[r] their running maxima. n <= 2. */
TARGET2 static inline __attribute__((always_inline)) void score_block(const int n, const float *q, int64_t qstride,
        const float *kt, int64_t ldk, int64_t width, int64_t hd, float scale, int64_t live, float *scores,
        __m256 *tops) {
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), minus_inf = _mm256_set1_ps(-INFINITY);
    __m256 acc[QUERY_BLOCK][2];
#pragma GCC unroll 6
    for (int r = 0; r < QUERY_BLOCK; r++)
#pragma GCC unroll 2
        for (int v = 0; v < n; v++) acc[r][v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < hd; c++) {
        __m256 kc[2];
#pragma GCC unroll 2
        for (int v = 0; v < n; v++) kc[v] = _mm256_loadu_ps(kt + c * ldk + 8 * v);
#pragma GCC unroll 6
        for (int r = 0; r < QUERY_BLOCK; r++) {
            const __m256 qc = _mm256_broadcast_ss(q + r * qstride + c);
#pragma GCC unroll 2
            for (int v = 0; v < n; v++) acc[r][v] = _mm256_fmadd_ps(qc, kc[v], acc[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < QUERY_BLOCK; r++)
#pragma GCC unroll 2
        for (int v = 0; v < n; v++) {
            const __m256 in = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(live - 8 * v)), _CMP_LT_OQ);
            const __m256 sv = _mm256_blendv_ps(minus_inf, _mm256_mul_ps(acc[r][v], _mm256_set1_ps(scale)), in);
            _mm256_storeu_ps(scores + r * width + 8 * v, sv);
            tops[r] = _mm256_max_ps(tops[r], sv);
        }
}

/* weigh, for QUERY_BLOCK queries (probabilities, already times inv, in rows width apart, outputs d apart) and 8 n floats of
   the head (n <= 2): each load of v feeds QUERY_BLOCK FMAs, each output summed as weigh sums it. */
TARGET2 static inline __attribute__((always_inline)) void weigh_block(const int n, const float *v, int64_t stride,
        const float *p, int64_t width, int64_t keys, float *out, int64_t d) {
    __m256 o[QUERY_BLOCK][2];
#pragma GCC unroll 6
    for (int r = 0; r < QUERY_BLOCK; r++)
#pragma GCC unroll 2
        for (int u = 0; u < n; u++) o[r][u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < keys; j++) {
        __m256 vj[2];
#pragma GCC unroll 2
        for (int u = 0; u < n; u++) vj[u] = _mm256_loadu_ps(v + j * stride + 8 * u);
#pragma GCC unroll 6
        for (int r = 0; r < QUERY_BLOCK; r++) {
            const __m256 pj = _mm256_broadcast_ss(p + r * width + j); /* p_j inv, as weigh rounds it */
#pragma GCC unroll 2
            for (int u = 0; u < n; u++) o[r][u] = _mm256_fmadd_ps(pj, vj[u], o[r][u]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < QUERY_BLOCK; r++)
#pragma GCC unroll 2
        for (int u = 0; u < n; u++) _mm256_storeu_ps(out + r * d + 8 * u, o[r][u]);
}

/* QUERY_BLOCK queries from row i of a non-causal sequence of len keys: their scores, softmax and
   weighted values, with the same bits as attend's one query at a time. */
TARGET2 static void attend_block(const float *qkv, float *out, int64_t len, int64_t i, int64_t d, int64_t hd,
                                 float scale, const float *kt, int64_t ldk, const float *vs, int64_t width,
                                 float *scores) {
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    const int64_t scored = (len + 7) / 8 * 8;
    __m256 tops[QUERY_BLOCK];
    for (int r = 0; r < QUERY_BLOCK; r++) tops[r] = minus_inf;
    for (int64_t j0 = 0; j0 < scored; j0 += 16) {
        if (scored - j0 >= 16)
            score_block(2, qkv + i * 3 * d, 3 * d, kt + j0, ldk, width, hd, scale, len - j0, scores + j0, tops);
        else
            score_block(1, qkv + i * 3 * d, 3 * d, kt + j0, ldk, width, hd, scale, len - j0, scores + j0, tops);
    }
    for (int r = 0; r < QUERY_BLOCK; r++) {
        float *row = scores + r * width;
        const float inv = 1.0f / exp_scores(row, scored, hmax8(tops[r]));
        for (int64_t j = 0; j < len; j++) row[j] *= inv;
    }
    for (int64_t c0 = 0; c0 < hd; c0 += 16) {
        if (hd - c0 >= 16)
            weigh_block(2, vs + c0, hd, scores, width, len, out + c0, d);
        else
            weigh_block(1, vs + c0, hd, scores, width, len, out + c0, d);
    }
}

/* Attention of one head over one sequence, in F32: out_i = sum_j softmax_j(scale q_i . k_j) v_j, with
   j <= i when causal, for the queries i in [q0, q1) (out starts at query q0's row). qkv holds each
   token's q, k and v side by side (stride 3 d), out each token's heads side by side (stride d); hd is
   a multiple of 8, at most 128. The keys are transposed first
   (scratch: attend_scratch floats), so 8 scores at a time accumulate along hd in one register each,
   with no horizontal sums; a query scores its keys rounded up to a multiple of 8, not of KEY_BLOCK
   (the same bits: every score is its own sum). The same code serves AVX-512 CPUs: a 512-bit version was no faster. */
TARGET2 static void attend(const float *qkv, float *out, int64_t len, int64_t q0, int64_t q1, int64_t d,
                           int64_t hd, float scale, int causal, float *scratch) {
    const int64_t nv = hd / 8, width = (len + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    /* kt's rows are KT_PAD floats longer than width: rows a power of two apart (1024 keys: 4 KiB) would all
       fall in one set of the L1 cache as the scores walk down them */
    const int64_t ldk = width + KT_PAD;
    float *kt = scratch, *scores = scratch + hd * ldk; /* kt[c][j] = k_j[c], zero past len */
    for (int64_t j = 0; j < len; j++) /* a key at a time: its row is read once (rows are 3 d apart) */
        for (int64_t c = 0; c < hd; c++) kt[c * ldk + j] = qkv[j * 3 * d + d + c];
    for (int64_t c = 0; c < hd; c++)
        for (int64_t j = len; j < width; j++) kt[c * ldk + j] = 0.0f;
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    int64_t i = q0;
    if (!causal && q1 - q0 >= QUERY_BLOCK) { /* a long sequence's keys and values fall out of L1: several
        queries share each load, and the head's values are copied together first (rows 3 d apart cost a
        TLB walk each) */
        float *vs = scores + QUERY_BLOCK * width; /* vs[j][c] = v_j[c] */
        for (int64_t j = 0; j < len; j++) memcpy(vs + j * hd, qkv + j * 3 * d + 2 * d, hd * sizeof(float));
        for (; i + QUERY_BLOCK <= q1; i += QUERY_BLOCK)
            attend_block(qkv, out + (i - q0) * d, len, i, d, hd, scale, kt, ldk, vs, width, scores);
    }
    for (; i < q1; i++) {
        const float *q = qkv + i * 3 * d;
        const int64_t keys = causal ? i + 1 : len, scored = (keys + 7) / 8 * 8;
        __m256 top = minus_inf;
        for (int64_t j0 = 0; j0 < scored; j0 += KEY_BLOCK) /* keys past `keys` (causal, or padding) get -inf */
            top = score_keys(scored - j0 < KEY_BLOCK ? (int)(scored - j0) / 8 : KEY_BLOCK / 8, q, kt + j0, ldk, hd,
                             scale, keys - j0, scores + j0, top);
        const float inv = 1.0f / exp_scores(scores, scored, hmax8(top));
        for (int64_t v0 = 0; v0 < nv; v0 += 8) /* 64 floats of the head at a time, in registers */
            weigh_values(nv - v0 < 8 ? (int)(nv - v0) : 8, qkv + 2 * d + 8 * v0, 3 * d, scores, inv, keys,
                         out + (i - q0) * d + 8 * v0);
    }
}

/* --- attention on the I16 matmul's tiles -------------------------------------------------------- */

#define I16_ATTEND_MIN 512 /* sequences at least this long (SigLIP's 1024 patches; not CLIP's 50 to 257) */

/* Room attend_i16 needs, in bytes, for a sequence of len tokens and heads of hd floats. */
static int64_t attend_i16_scratch(int64_t len, int64_t hd) {
    const int64_t n = (len + NR2 - 1) / NR2 * NR2, bl = (n + KB - 1) / KB, bh = (hd + KB - 1) / KB;
    return 64 * 11 /* each carve's rounding */ + (int64_t)sizeof(int16_t) * (2 * n * hd + MR2 * hd + MR2 * n + NR2 * hd) +
           (int64_t)sizeof(float) * (n * bh + hd * bl + MR2 * bh + MR2 * n + MR2 * bl + NR2 * bh);
}

/* 16 quantized rows (q, k values each, rows k apart) and their block scales (row_scales, [16][blocks]) as
   one panel of the I16 kernel's weights: [k / 2][16][2] and scales [blocks][16]. A pair of k is 32 bits,
   so eight rows' next eight pairs become the panel's next eight pair-steps by one 8 x 8 transpose. */
TARGET2 static void place_panel(const int16_t *q, int64_t k, const float *row_scales, int16_t *panel,
                                float *panel_scales) {
    const int64_t blocks = (k + KB - 1) / KB, pairs = k / 2, whole = pairs / 8 * 8;
    for (int64_t b = 0; b < blocks; b++)
        for (int c = 0; c < NR2; c++) panel_scales[b * NR2 + c] = row_scales[c * blocks + b];
    for (int half = 0; half < NR2; half += 8) {
        for (int64_t p = 0; p < whole; p += 8) {
            __m256i r[8], t[8], u[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(q + (half + i) * k + 2 * p));
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {
                u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
                u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
                u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
                u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
            }
            for (int i = 0; i < 4; i++) { /* pair-steps p + i and p + i + 4 */
                _mm256_storeu_si256((__m256i *)(panel + (p + i) * 2 * NR2 + 2 * half), _mm256_permute2x128_si256(u[i], u[i + 4], 0x20));
                _mm256_storeu_si256((__m256i *)(panel + (p + i + 4) * 2 * NR2 + 2 * half), _mm256_permute2x128_si256(u[i], u[i + 4], 0x31));
            }
        }
        for (int64_t p = whole; p < pairs; p++)
            for (int i = half; i < half + 8; i++) memcpy(panel + p * 2 * NR2 + 2 * i, q + i * k + 2 * p, 2 * sizeof(int16_t));
    }
}

/* Every cache line of a row of n floats, asked for ahead of its use: the attention reads its heads' rows
   of qkv 3 d floats apart, a stride the hardware prefetchers do not follow, so without this each row
   comes from L3 while the tiles wait. */
static inline void prefetch_row(const float *row, int64_t n) {
    for (uintptr_t at = (uintptr_t)row & ~(uintptr_t)63; at < (uintptr_t)(row + n); at += 64) _mm_prefetch((const char *)at, _MM_HINT_T0);
}

/* n rows (rows stride floats apart, n_pad - n more of zeros; n_pad a multiple of 16) of k floats, quantized
   as quantize_row does and packed as pack_i16 packs a weight: [n_pad / 16][k / 2][16][2], scales
   [n_pad / 16][blocks][16]. q and row_scales: room for 16 rows. */
TARGET2 static void pack_rows_i16(const float *x, int64_t stride, int64_t n, int64_t n_pad, int64_t k,
                                  int16_t *packed, float *scales, int16_t *q, float *row_scales) {
    const int64_t blocks = (k + KB - 1) / KB;
    for (int64_t c0 = 0; c0 < n_pad; c0 += NR2) {
        for (int64_t c = c0; c < c0 + NR2; c++) {
            int16_t *qc = q + (c - c0) * k;
            float *sc = row_scales + (c - c0) * blocks;
            if (c < n) {
                if (c + 8 < n) prefetch_row(x + (c + 8) * stride, k); /* rows stride floats apart */
                quantize_row(x + c * stride, k, qc, sc);
            } else {
                memset(qc, 0, k * sizeof(int16_t));
                for (int64_t b = 0; b < blocks; b++) sc[b] = 0.0f;
            }
        }
        place_panel(q, k, row_scales, packed + c0 * k, scales + c0 * blocks);
    }
}

/* The values of one head (len rows of hd floats, stride floats apart; hd a multiple of 16) packed as
   the weight of the product probabilities x values: hd outputs over n >= len keys (a multiple of 16; the
   keys past len zero), [hd / 16][n / 2][16][2], a scale per output and block of KB keys
   ([hd / 16][blocks][16]), rounded as quantize_row rounds. Straight from the rows: a block's largest per
   output is a running max down the rows, and two rows' 16 values interleave into one pair-step. */
TARGET2 static void pack_values_i16(const float *v, int64_t stride, int64_t len, int64_t n, int64_t hd,
                                    int16_t *packed, float *scales) {
    const int64_t blocks = (n + KB - 1) / KB;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), qmax = _mm256_set1_ps(QMAX);
    for (int64_t c = 0; c < hd; c += NR2) {
        int16_t *panel = packed + c * n;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t j0 = b * KB, j1 = n < j0 + KB ? n : j0 + KB, live = len < j1 ? len : j1;
            __m256 top0 = _mm256_setzero_ps(), top1 = _mm256_setzero_ps();
            for (int64_t j = j0; j < live; j++) {
                top0 = _mm256_max_ps(top0, _mm256_and_ps(abs_mask, _mm256_loadu_ps(v + j * stride + c)));
                top1 = _mm256_max_ps(top1, _mm256_and_ps(abs_mask, _mm256_loadu_ps(v + j * stride + c + 8)));
            }
            float *sc = scales + ((c / NR2) * blocks + b) * NR2;
            _mm256_storeu_ps(sc, _mm256_div_ps(top0, qmax));
            _mm256_storeu_ps(sc + 8, _mm256_div_ps(top1, qmax));
            const __m256 zero = _mm256_setzero_ps(); /* QMAX / 0 = inf, masked to 0 as quantize_row's */
            const __m256 inv0 = _mm256_and_ps(_mm256_div_ps(qmax, top0), _mm256_cmp_ps(top0, zero, _CMP_GT_OQ));
            const __m256 inv1 = _mm256_and_ps(_mm256_div_ps(qmax, top1), _mm256_cmp_ps(top1, zero, _CMP_GT_OQ));
            for (int64_t j = j0; j < j1; j += 2) {
                __m256i pair[2];
                for (int t = 0; t < 2; t++) { /* packs leaves [0..3 8..11 | 4..7 12..15]; the unpacks undo it */
                    const float *row = v + (j + t) * stride + c;
                    const int on = j + t < len;
                    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(on ? _mm256_loadu_ps(row) : zero, inv0));
                    const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(on ? _mm256_loadu_ps(row + 8) : zero, inv1));
                    pair[t] = _mm256_packs_epi32(lo, hi);
                }
                _mm256_storeu_si256((__m256i *)(panel + j * NR2), _mm256_unpacklo_epi16(pair[0], pair[1]));
                _mm256_storeu_si256((__m256i *)(panel + j * NR2 + NR2), _mm256_unpackhi_epi16(pair[0], pair[1]));
            }
        }
    }
}

/* 2^y for y <= 0 (the softmax's scaled differences; below -126 the result is 2^-126, which rounds to
   0 against any block whose largest is at least 2^-100), to about 2.4e-7: 2^n p(y - n), n = round(y), p of
   degree 5 fitted for the least largest relative error on |r| <= 1/2, n added to the exponent bits */
TARGET2 static inline __m256 exp2_8(__m256 y) {
    y = _mm256_max_ps(y, _mm256_set1_ps(-126.0f));
    const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_sub_ps(y, n); /* exact */
    __m256 p = _mm256_set1_ps(1.32764713e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.67554096e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.55071309e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.40221202e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.93146944e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.00000012f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* One query's raw scores s (q . k_j, n of them, a multiple of 16; keys from len on are padding) -> its
   softmax numerators e_j = 2^(c (s_j - max s)), c = scale log2 e (scale > 0), 0 past len, quantized for
   the tile as quantize_row rounds (a scale per block of KB keys: the block's largest e / QMAX). The
   numerators rise with the scores, so a block's largest is its largest score's: one pass finds every
   block's largest score, one takes the exponentials and rounds them as they come, never storing them.
   (An exponential a rounding above its block's largest rounds to QMAX all the same.) A block whose
   largest is below 2^-100 is all zeros: beside the top's 1 its sum is lost in F32 anyway, and its
   1 / largest would overflow. Returns the sum of the e_j. */
TARGET2 static float softmax_quantize(const float *s, int64_t n, int64_t len, float scale, int16_t *q, float *scales) {
    const int64_t blocks = (n + KB - 1) / KB;
    float top = -INFINITY;
    for (int64_t b = 0; b < blocks; b++) { /* each block's largest score (in scales until its scale) */
        const int64_t j0 = b * KB, end = n - j0 < KB ? n : j0 + KB, live = len < end ? len : end;
        const int64_t whole = live > j0 ? j0 + (live - j0) / 8 * 8 : j0;
        __m256 top8 = _mm256_set1_ps(-INFINITY);
        for (int64_t j = j0; j < whole; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(s + j));
        float block_top = hmax8(top8);
        for (int64_t j = whole; j < live; j++) block_top = s[j] > block_top ? s[j] : block_top;
        scales[b] = block_top;
        top = block_top > top ? block_top : top;
    }
    const float c = scale * 1.44269504f;
    const __m256 vc = _mm256_set1_ps(c), vtop = _mm256_set1_ps(top);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 total = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t j0 = b * KB, end = n - j0 < KB ? n : j0 + KB;
        const float y_top = (scales[b] - top) * c; /* s_j - top <= 0 exactly, then scaled */
        if (j0 >= len || y_top < -100.0f) { /* all padding, or nothing F32 keeps beside the top */
            memset(q + j0, 0, (end - j0) * sizeof(int16_t));
            scales[b] = 0.0f;
            continue;
        }
        /* as its largest score's numerator is taken below, so that one rounds to QMAX exactly */
        const float peak = _mm256_cvtss_f32(exp2_8(_mm256_set1_ps(y_top)));
        const __m256 inv = _mm256_set1_ps(QMAX / peak);
        scales[b] = peak / QMAX;
        for (int64_t j = j0; j < end; j += 16) {
            __m256 lo = exp2_8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vtop), vc));
            __m256 hi = exp2_8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), vtop), vc));
            if (j + 16 > len) { /* the padding starts in these 16: its numerators are 0 */
                const __m256i at = _mm256_add_epi32(lanes, _mm256_set1_epi32((int32_t)(j - len)));
                lo = _mm256_and_ps(lo, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setzero_si256(), at)));
                hi = _mm256_and_ps(hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(-8), at)));
            }
            total = _mm256_add_ps(_mm256_add_ps(total, lo), hi);
            store_rounded16(q + j, lo, hi, inv);
        }
    }
    return hsum8(total);
}

static inline void *carve(char **at, int64_t bytes) {
    void *p = *at;
    *at += (bytes + 63) / 64 * 64;
    return p;
}

/* attend's result for a non-causal sequence (every query, hd a multiple of 16) with its two products on
   the I16 matmul's tiles: the keys are packed as a weight of len outputs over hd, the values as a weight
   of hd outputs over the keys, and each block of MR2 queries, then its probabilities, are quantized as a
   matmul's input rows. The softmax between them is in F32; its 1 / sum scales the probabilities'
   quantizing scales, so the output needs no pass of its own. */
TARGET2 static void attend_i16(const float *qkv, float *out, int64_t len, int64_t d, int64_t hd, float scale,
                               int64_t q0, int64_t q1, int pack, void *scratch) {
    const int64_t n = (len + NR2 - 1) / NR2 * NR2, bl = (n + KB - 1) / KB, bh = (hd + KB - 1) / KB;
    char *at = scratch;
    int16_t *keys = carve(&at, n * hd * sizeof(int16_t)), *values = carve(&at, n * hd * sizeof(int16_t));
    int16_t *qa = carve(&at, MR2 * hd * sizeof(int16_t)), *pa = carve(&at, MR2 * n * sizeof(int16_t));
    int16_t *rows = carve(&at, NR2 * hd * sizeof(int16_t));
    float *key_scales = carve(&at, n * bh * sizeof(float)), *value_scales = carve(&at, hd * bl * sizeof(float));
    float *qs = carve(&at, MR2 * bh * sizeof(float));
    float *scores = carve(&at, MR2 * n * sizeof(float)), *ps = carve(&at, MR2 * bl * sizeof(float));
    float *row_scales = carve(&at, NR2 * bh * sizeof(float));

    if (pack) {
        pack_rows_i16(qkv + d, 3 * d, len, n, hd, keys, key_scales, rows, row_scales);
        pack_values_i16(qkv + 2 * d, 3 * d, len, n, hd, values, value_scales); /* zero past len: no weight */
    }

    for (int64_t i = q0; i < q1; i += MR2) {
        const int mr = q1 - i < MR2 ? (int)(q1 - i) : MR2;
        for (int r = 0; r < mr; r++) quantize_row(qkv + (i + r) * 3 * d, hd, qa + r * hd, qs + r * bh);
        for (int64_t r = i + MR2; r < i + 2 * MR2 && r < q1; r++) prefetch_row(qkv + r * 3 * d, hd); /* the next block's queries */
        for (int64_t p = 0; p < n / NR2; p++)
            tile_i16_rows(mr, 1, qa, hd, qs, keys + p * NR2 * hd, key_scales + p * bh * NR2, hd, scores + p * NR2, n);
        for (int r = 0; r < mr; r++) { /* the softmax's 1 / sum goes into the probabilities' scales */
            const float inv = 1.0f / softmax_quantize(scores + r * n, n, len, scale, pa + r * n, ps + r * bl);
            for (int64_t b = 0; b < bl; b++) ps[r * bl + b] *= inv;
        }
        for (int64_t p = 0; p < hd / NR2; p++)
            tile_i16_rows(mr, 1, pa, n, ps, values + p * NR2 * n, value_scales + p * bl * NR2, n, out + i * d + p * NR2, d);
    }
}

/* --- sharing the work between ggml's threads ------------------------------------------------- */

typedef void (*rows_fn)(const struct vlm_matmul *, const struct io *, int64_t, int64_t, int64_t, int64_t);

/* The end of a thread's part in an op whose work is handed out (next, finished: the op's counters):
   every thread has stopped asking once the last one is here, and ggml's barrier follows before the
   op's next compute, so the last one starts the hand-out over. */
static void hand_out_done(int64_t *next, int32_t *finished, int nth) {
    if (__atomic_add_fetch(finished, 1, __ATOMIC_ACQ_REL) == nth) {
        __atomic_store_n(next, 0, __ATOMIC_RELAXED);
        __atomic_store_n(finished, 0, __ATOMIC_RELAXED);
    }
}

/* Thread ith of nth computes its share of y = dst. w passes over the rows one block (`block` rows) at
   a time, so with a block or more of rows per thread, sharing the rows costs little extra reading of w,
   and each thread prepares (quantizes) only its own rows. Rows are handed out as threads ask for them,
   in runs of a 2 nth-th of what is left (whole tiles, at least 4): a thread that the OS or a busy
   sibling slowed takes fewer, so the threads reach ggml's barrier together. w passes over each run,
   so that is some ten passes over w where fixed halves made two; on SigLIP's encoder the waits saved
   outweigh them. With fewer rows (a batch of one image), threads share out the panels instead,
   each reading only its part of w. */
static void share_matmul(void *dst, int ith, int nth, struct vlm_matmul *op, int64_t mr, int64_t nr,
                         int64_t block, rows_fn run_rows) {
#define DATA(t) ((t) ? (const float *)op->get_data(t) : NULL)
    const struct io io = {DATA(op->x), DATA(op->bias), DATA(op->ln_w), DATA(op->ln_b), DATA(op->residual), op->get_data(dst)};
#undef DATA
    const int64_t m = op->m, panels = op->n / nr;
    if (m < nth * block && panels >= nth) {
        int64_t p0 = panels * ith / nth, p1 = panels * (ith + 1) / nth;
        if (p0 < p1) run_rows(op, &io, 0, m, p0, p1);
        return;
    }
    for (;;) {
        int64_t start = __atomic_load_n(&op->next_row, __ATOMIC_RELAXED), rows;
        do {
            if (start >= m) break;
            rows = ((m - start + 2 * nth - 1) / (2 * nth) + mr - 1) / mr * mr;
            rows = rows < 4 * mr ? 4 * mr : rows;
            rows = start + rows < m ? rows : m - start;
        } while (!__atomic_compare_exchange_n(&op->next_row, &start, start + rows, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        if (start >= m) break;
        run_rows(op, &io, start, start + rows, 0, panels);
    }
    hand_out_done(&op->next_row, &op->finished, nth);
}

/* Runs of queries each (sequence, head) pair of the i16 attention is cut into: the fewest (at most 4) that
   make the runs a multiple of the threads (12 heads on 8 threads: 24 half-heads, 3 each), so no thread
   is left with an extra head while the others wait. Each run repacks its head's keys and values unless
   its thread packed them for the run it took before. */
static int64_t query_runs(int64_t items, int nth) {
    for (int64_t runs = 1; runs < 4; runs++)
        if (items * runs % nth == 0) return runs;
    return 4;
}

/* Threads take the (sequence, head) pairs, or (query, head) pairs where the op names its queries, one at
   a time as they ask (a thread slowed by the OS takes fewer); each reads only its own sequence, so
   packing several sequences together changes nothing. */
static void share_attention(void *dst, int nth, struct vlm_attention *op) {
    const float *qkv = op->get_data(op->qkv);
    float *out = op->get_data(dst);
    const int64_t hd = op->d / op->n_heads, items = (op->queries ? op->n_queries : op->n_seqs) * op->n_heads;
    int long_seq = 0; /* runs only where some sequence takes attend_i16: elsewhere items are many and short */
    for (int64_t seq = 0; seq < op->n_seqs && op->int16 && !op->causal && !op->queries; seq++)
        long_seq |= op->seqs[2 * seq + 1] >= I16_ATTEND_MIN;
    const int64_t runs = long_seq && hd % NR2 == 0 ? query_runs(items, nth) : 1, total = items * runs;
    int64_t packed_for = -1; /* the item whose keys and values attend_i16 last packed on this thread */
    for (int64_t it; (it = __atomic_fetch_add(&op->next_item, 1, __ATOMIC_RELAXED)) < total;) {
        const int64_t item = it / runs, run = it % runs;
        const int64_t row = item / op->n_heads, h = item % op->n_heads, s = op->queries ? op->queries[2 * row] : row;
        const int64_t first = op->seqs[2 * s], len = op->seqs[2 * s + 1];
        int64_t q0 = len * run / runs / MR2 * MR2, q1 = run + 1 == runs ? len : len * (run + 1) / runs / MR2 * MR2;
        if (op->queries) q0 = op->queries[2 * row + 1], q1 = q0 + 1;
        if (op->int16 && !op->causal && !op->queries && len >= I16_ATTEND_MIN && hd % NR2 == 0) {
            attend_i16(qkv + first * 3 * op->d + h * hd, out + first * op->d + h * hd, len, op->d, hd, op->scale, q0,
                       q1, item != packed_for, thread_room(ROOM_ATTEND, attend_i16_scratch(len, hd)));
            packed_for = item;
        } else {
            packed_for = -1; /* attend's scratch is the same room */
            attend(qkv + first * 3 * op->d + h * hd, out + (op->queries ? row : first + q0) * op->d + h * hd, len, q0,
                   q1, op->d, hd, op->scale, op->causal, thread_room(ROOM_ATTEND, attend_scratch(len, hd) * sizeof(float)));
        }
    }
    hand_out_done(&op->next_item, &op->finished, nth);
}

/* What this CPU runs, as vlm_clip_kernels_cpu() reports it. */
static int cpu_features(void) {
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl");
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return (avx2 ? VLM_CPU_AVX2 : 0) |
           (avx2 && avx512 && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16")
                ? VLM_CPU_AVX512_BF16 : 0) |
           (avx2 && avx512 && __builtin_cpu_supports("avx512vnni") ? VLM_CPU_AVX512_VNNI : 0);
}
#else
#define HAVE_KERNEL 0
#endif

/* Which forms this build has and the CPU runs (VLM_CPU_* flags; 0 where the build has none): AVX2
   the I16 matmul and the attention, AVX512_BF16 the BF16 matmul, AVX512_VNNI the I16 matmul's
   512-bit form. clip_kernels.FORMS mirrors the flags. */
int vlm_clip_kernels_cpu(void) {
#if HAVE_KERNEL
    return cpu_features();
#else
    return 0;
#endif
}

#if HAVE_KERNEL
/* A weight's n rows (n a multiple of 16, as clip_kernels.fits checks) of k F32 or F16 values, each
   quantized as quantize_row does x and placed 16 rows at a time: one pass at load, no F32 copy of a
   whole F16 weight. */
TARGET2 static void pack_i16(const void *w, int f16, int64_t n, int64_t k, int16_t *packed, float *scales) {
    const int64_t blocks = (k + KB - 1) / KB;
    float *row = malloc(k * sizeof(float)), *row_scales = malloc(NR2 * blocks * sizeof(float));
    int16_t *q = malloc(NR2 * k * sizeof(int16_t));
    if (!row || !row_scales || !q) abort();
    for (int64_t c0 = 0; c0 < n; c0 += NR2) {
        for (int64_t c = c0; c < c0 + NR2; c++) {
            const float *values = (const float *)w + c * k;
            if (f16) {
                const uint16_t *h = (const uint16_t *)w + c * k;
                int64_t j = 0;
                for (; j + 8 <= k; j += 8) _mm256_storeu_ps(row + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + j))));
                for (; j < k; j++) row[j] = _cvtsh_ss(h[j]);
                values = row;
            }
            quantize_row(values, k, q + (c - c0) * k, row_scales + (c - c0) * blocks);
        }
        place_panel(q, k, row_scales, packed + c0 * k, scales + c0 * blocks);
    }
    free(row);
    free(row_scales);
    free(q);
}

/* A weight's n rows of k F32 or F16 values (k a multiple of 16) rounded to BF16 (nearest even, as the
   activations are) and written straight into the BF16 kernel's layout, in one pass at load. */
TARGET static void pack_bf16(const void *w, int f16, int64_t n, int64_t k, uint16_t *packed) {
    uint32_t *pairs = malloc(k / 2 * sizeof(uint32_t)); /* a row's BF16 values, a pair of k to an item */
    if (!pairs) abort();
    for (int64_t c = 0; c < n; c++) {
        for (int64_t j = 0; j < k; j += 16) {
            const __m512 v = f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + c * k + j)))
                                 : _mm512_loadu_ps((const float *)w + c * k + j);
            _mm256_storeu_si256((__m256i *)(pairs + j / 2), (__m256i)_mm512_cvtneps_pbh(v));
        }
        uint32_t *column = (uint32_t *)(packed + (c / NR) * NR * k) + c % NR; /* then every 32 pairs */
        for (int64_t p = 0; p < k / 2; p++) column[p * NR] = pairs[p];
    }
    free(pairs);
}
#endif

/* A k -> n weight (rows of k F32 or F16 values, k a multiple of 16) -> the BF16 kernel's layout,
   [n / 32][k / 2][32][2] (clip_kernels.pack). Returns -1 where the CPU lacks AVX512_BF16. */
int vlm_bf16_pack(const void *w, int32_t f16, int64_t n, int64_t k, uint16_t *packed) {
#if HAVE_KERNEL
    if (!(cpu_features() & VLM_CPU_AVX512_BF16)) return -1;
    pack_bf16(w, f16, n, k, packed);
    return 0;
#else
    (void)w; (void)f16; (void)n; (void)k; (void)packed;
    return -1;
#endif
}

/* A k -> n weight (rows of k F32 or F16 values) -> the I16 kernel's layout, packed [n / 16][k / 2][16][2]
   and scales [n / 16][blocks][16] (clip_kernels.pack). Returns -1 where the CPU lacks AVX2. */
int vlm_i16_pack(const void *w, int32_t f16, int64_t n, int64_t k, int16_t *packed, float *scales) {
#if HAVE_KERNEL
    if (!(cpu_features() & VLM_CPU_AVX2)) return -1;
    pack_i16(w, f16, n, k, packed, scales);
    return 0;
#else
    (void)w; (void)f16; (void)n; (void)k; (void)packed; (void)scales;
    return -1;
#endif
}

/* The ggml custom ops (ggml_custom_op_t); Python builds one into a graph only where the CPU runs it.
   Built with n_tasks -1 (ggml.Graph.custom): every thread of a compute calls the op with the same nth,
   which the hand-out of work counts on to start over (hand_out_done); and since the ops keep that
   count in their userdata, one graph is never computed by two threads at once. */
#if HAVE_KERNEL
#define OP(name, body) void name(void *dst, int ith, int nth, void *userdata) { body; }
#else
#define OP(name, body) void name(void *dst, int ith, int nth, void *userdata) { (void)dst; (void)ith; (void)nth; (void)userdata; abort(); }
#endif
OP(vlm_bf16_matmul_op, share_matmul(dst, ith, nth, userdata, MR, NR, MB, run))
OP(vlm_i16_matmul_op, share_matmul(dst, ith, nth, userdata, MR2, NR2, i16_block(((const struct vlm_matmul *)userdata)->k, MR2), run_i16))
OP(vlm_i16_vnni_matmul_op, share_matmul(dst, ith, nth, userdata, MR, NR2, i16_block(((const struct vlm_matmul *)userdata)->k, MR), run_vnni))
OP(vlm_attention_op, (void)ith; share_attention(dst, nth, userdata))
#undef OP
