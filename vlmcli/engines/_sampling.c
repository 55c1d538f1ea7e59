/* Sampling of next tokens from llama.cpp's logits rows, for every sequence of a decoding step at once
   (engines/sampling.py opens this with ctypes).

   llama.cpp's sampler chain copies the whole vocabulary into a candidate list and, for top-p, sorts it:
   when the distribution is flat that sort costs more than a batched decoding step's share of a token.
   Here each row takes a few passes over its floats and sorts one histogram bin at most: the nucleus
   (the fewest most likely tokens whose probability reaches top_p) ends in the bin where the
   cumulative probability crosses top_p, and only that bin's tokens need their order.

   Portable C: the loops are written so that compilers vectorize them (SSE2 on any x86-64, NEON). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 1024 /* histogram bins between the row's largest logit and the last one that can matter */

/* GCC's and Clang's vector types: 4 floats, the SIMD width every x86-64 (SSE2) and Arm (NEON) CPU has,
   so one C source serves them all. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f load4(const float *p) {
    v4f x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline v4f splat(float x) {
    return (v4f){x, x, x, x};
}

/* e^x for x <= 0 with a relative error near float's rounding; 0 below -87 (no subnormals): a power of
   two from the exponent bits, a polynomial for the rest. */
static inline v4f exp4(v4f x) {
    const v4i under = x < splat(-87.0f);
    x = (v4f)((under & (v4i)splat(-87.0f)) | (~under & (v4i)x));
    const v4f magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const v4f n = (x * splat(1.44269504f) + magic) - magic;
    v4f r = x - n * splat(0.693145751953125f);
    r = r - n * splat(1.428606765330187e-06f);
    v4f p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + (r + splat(1.0f));
    const v4i bits = (__builtin_convertvector(n, v4i) + 127) << 23;
    return (v4f)(~under & (v4i)(p * (v4f)bits));
}

static float row_max(const float *l, int64_t v) {
    v4f m = splat(-INFINITY);
    int64_t i = 0;
    for (; i + 4 <= v; i += 4) {
        const v4f x = load4(l + i);
        m = (v4f)(((v4i)(x > m) & (v4i)x) | (~(v4i)(x > m) & (v4i)m));
    }
    float best = -INFINITY;
    for (int j = 0; j < 4; j++) best = m[j] > best ? m[j] : best;
    for (; i < v; i++) best = l[i] > best ? l[i] : best;
    return best;
}

static inline v4f exps4(v4f x, float m, float s, float cut) {
    return (v4f)((v4i)(x >= splat(cut)) & (v4i)exp4((x - splat(m)) * splat(s)));
}

/* e[i] = e^((l[i] - m) s) where l[i] >= cut, else 0; returns their sum (in double: the draw compares a
   running sum with a share of it) */
static double exps(const float *l, int64_t v, float m, float s, float cut, float *e) {
    double total = 0;
    int64_t i = 0;
    while (i + 4 <= v) {
        v4f acc = splat(0.0f); /* float sums of a few hundred terms, then into the double */
        for (const int64_t end = i + 256 < v ? i + 256 : v; i + 4 <= end; i += 4) {
            const v4f y = exps4(load4(l + i), m, s, cut);
            memcpy(e + i, &y, sizeof y);
            acc += y;
        }
        total += (double)acc[0] + (double)acc[1] + (double)acc[2] + (double)acc[3];
    }
    if (i < v) { /* the row's last floats, padded with -inf (e^-inf = 0) */
        float tail[4];
        for (int j = 0; j < 4; j++) tail[j] = i + j < v ? l[i + j] : -INFINITY;
        const v4f y = exps4(load4(tail), m, s, cut);
        memcpy(e + i, &y, (size_t)(v - i) * sizeof(float));
        total += (double)y[0] + (double)y[1] + (double)y[2] + (double)y[3];
    }
    return total;
}

struct scored {
    float logit;
    int32_t token;
};

static int by_logit_descending(const void *a, const void *b) {
    const struct scored *x = a, *y = b;
    return x->logit > y->logit ? -1 : x->logit < y->logit ? 1 : (x->token > y->token) - (x->token < y->token);
}

/* The smallest logit of the nucleus of row l (its softmax terms e, their sum z): tokens in order of
   probability until their sum reaches top_p of the whole. bin: room for v of them. */
static float nucleus_cut(const float *l, const float *e, int64_t v, float m, double z, float top_p,
                         struct scored *bin) {
    if (!(top_p < 1.0f)) return -INFINITY;
    /* A token of probability below (1 - top_p) / v is never in the nucleus: the tokens above it hold
       more than top_p. That bounds the span of logits the bins cover. */
    const double span = log((double)v / (1.0 - top_p)) - log(z);
    const float per_bin = BINS / (float)(span > 1e-6 ? span : 1e-6);
    double mass[BINS] = {0};
    for (int64_t i = 0; i < v; i++) {
        const float d = (m - l[i]) * per_bin;
        if (d < BINS) mass[(int)d] += e[i];
    }
    const double target = (double)top_p * z;
    double before = 0;
    int b = 0;
    for (; b < BINS && before + mass[b] < target; b++) before += mass[b];
    if (b == BINS) return -INFINITY; /* rounding: the bins never reached it; every token stays */
    int64_t n = 0;
    for (int64_t i = 0; i < v; i++) {
        const float d = (m - l[i]) * per_bin;
        if (d < BINS && (int)d == b) bin[n++] = (struct scored){l[i], (int32_t)i};
    }
    qsort(bin, (size_t)n, sizeof *bin, by_logit_descending);
    for (int64_t k = 0; k < n; k++) {
        before += e[bin[k].token];
        if (before >= target) return bin[k].logit;
    }
    return n ? bin[n - 1].logit : -INFINITY;
}

/* For each of n rows (row r at logits + rows[r] * v floats): token[r] drawn and logprob[r], the log
   softmax of the row at that token. temperature <= 0 takes the first largest logit; otherwise the token
   is drawn from softmax(row / temperature) over the row's nucleus for top_p, with u[r] uniform in
   [0, 1). NaN logits are never drawn. scratch: room for 3 v floats. Returns 0, or -1 - r for a row whose
   largest logit is not finite. */
int vlm_sample_rows(const float *logits, int64_t v, const int32_t *rows, int n, float temperature, float top_p,
                    const double *u, int32_t *token, float *logprob, float *scratch) {
    float *e = scratch, *w = scratch + v;
    for (int r = 0; r < n; r++) {
        const float *l = logits + (int64_t)rows[r] * v;
        const float m = row_max(l, v);
        if (!isfinite(m)) return -1 - r;
        const double z = exps(l, v, m, 1.0f, -INFINITY, e);
        int64_t tok = 0;
        if (!(temperature > 0.0f) || !(1.0f / temperature < INFINITY)) { /* or so small 1 / t overflows */
            while (l[tok] != m) tok++;
        } else {
            const float cut = nucleus_cut(l, e, v, m, z, top_p, (struct scored *)w); /* w's room, and more */
            const double total = exps(l, v, m, 1.0f / temperature, cut, w);
            const double goal = u[r] * total;
            double sum = 0;
            tok = 0;
            for (; tok + 4 <= v; tok += 4) { /* whole blocks while the goal lies beyond them */
                const v4f y = load4(w + tok);
                const double block = (double)((y[0] + y[1]) + (y[2] + y[3]));
                if (sum + block > goal) break;
                sum += block;
            }
            for (; tok < v; tok++) {
                sum += w[tok];
                if (sum > goal) break;
            }
            if (tok == v) /* u within rounding of 1: the nucleus's last token */
                for (tok = v - 1; tok > 0 && w[tok] == 0.0f; tok--) {}
        }
        token[r] = (int32_t)tok;
        logprob[r] = (float)((double)(l[tok] - m) - log(z));
    }
    return 0;
}
