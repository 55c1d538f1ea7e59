/*
 * vlm.h - the C API of vlmcli: SmolVLM2 (ask, caption) and CLIP (embed, classify) in your program.
 *
 * Build the library with `vlm lib build --out DIR`, then: cc app.c -IDIR -LDIR -lvlm
 * (the library records where it finds its runtime, so no environment variables are needed).
 *
 * Conventions
 *   - Every function returns a vlm_status: VLM_OK (0) or a negative error code, except vlm_open,
 *     which returns a handle (> 0) or a negative vlm_status, and the two version/error getters.
 *   - On error, vlm_last_error(handle) gives a one-line UTF-8 message. It is thread-local: it
 *     holds the last failure of a call made *by this thread* with that handle. Failures that have
 *     no handle (vlm_open) are kept under handle 0; vlm_last_error also accepts the negative value
 *     vlm_open returned. The text may change at this thread's next failed call; copy it to keep it.
 *   - Strings in and out are UTF-8. Text results are NUL-terminated.
 *   - A caller buffer that is too small gives VLM_E_BUFFER_TOO_SMALL and sets *needed (bytes for
 *     text, including the NUL; floats for embeddings and scores). Text is then truncated at a
 *     character boundary. `needed` may be NULL.
 *   - NULL pointers, closed handles, and handles that were never opened give errors, not crashes.
 *
 * Thread safety
 *   - Any function may be called from any thread.
 *   - Calls on one handle are serialised: a second thread waits until the first call returns.
 *     A call on the same handle from inside a token callback returns VLM_E_BUSY.
 *   - Separate handles may be used from separate threads at the same time. The library runs the
 *     vlmcli engine on an embedded Python interpreter: the native work (llama.cpp / ggml: image
 *     encoding, prompt evaluation, token generation) runs in parallel, while the short Python
 *     steps between native calls (image decoding, tokenising, sampling bookkeeping) take turns
 *     under Python's global interpreter lock. Expect parallel speed-up, not linear scaling.
 *   - vlm_close waits for a running call on that handle to finish.
 *   - Each model thread pool uses n_threads cores; two handles at once want twice the cores.
 */
#ifndef VLM_H
#define VLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin (the declarations below are also read by the library build; keep them plain C) */

/* The ABI described by this header. vlm_open refuses options whose abi_version differs. */
#define VLM_ABI_VERSION 3 /* 2 added vlm_options.best_of and .select, 3 .json_schema and .grammar;
                            programs built for ABI 1 or 2 keep working */

/* The largest message vlm_last_error returns, in bytes, including the NUL. */
#define VLM_ERROR_MAX 1024

typedef int64_t vlm_handle;

typedef enum vlm_status {
    VLM_OK = 0,
    VLM_E_INVALID_ARGUMENT = -1, /* a NULL pointer, a bad size, an option out of range, bad UTF-8 */
    VLM_E_INVALID_HANDLE = -2,   /* never opened, or already closed (double close included) */
    VLM_E_BUFFER_TOO_SMALL = -3, /* *needed says how much room the result takes */
    VLM_E_ABI_MISMATCH = -4,     /* opts->abi_version is not this library's VLM_ABI_VERSION */
    VLM_E_MODEL = -5,            /* no such model, not a model, corrupt, or cannot be loaded */
    VLM_E_IMAGE = -6,            /* the image is missing, unreadable, unsupported or too large */
    VLM_E_WRONG_KIND = -7,       /* e.g. vlm_ask on a CLIP handle, vlm_embed_texts on SmolVLM2 */
    VLM_E_BUSY = -8,             /* the handle is in use by this thread (a call from a callback) */
    VLM_E_FAILED = -9,           /* inference failed, e.g. the prompt does not fit the context */
    VLM_E_RUNTIME = -10          /* the embedded runtime failed to start, or an internal error */
} vlm_status;

typedef enum vlm_kind {
    VLM_KIND_VLM = 1,  /* SmolVLM2: vlm_ask, vlm_ask_stream, vlm_caption */
    VLM_KIND_CLIP = 2  /* CLIP: vlm_embed_images, vlm_embed_texts, vlm_classify */
} vlm_kind;

typedef enum vlm_detail {
    VLM_DETAIL_AUTO = 0, /* as `vlm ask --detail auto` */
    VLM_DETAIL_LOW = 1,  /* one 512 px view of the image */
    VLM_DETAIL_HIGH = 2  /* full tiling */
} vlm_detail;

/* How vlm_options.best_of picks one of its candidates (`vlm ask --select`). */
typedef enum vlm_select {
    VLM_SELECT_LOGPROB = 0, /* the highest mean token log-probability */
    VLM_SELECT_VOTE = 1     /* the most frequent short answer (VQA normalisation), ties by log-probability */
} vlm_select;

/* Options for vlm_open. Zero means "the CLI's default" for every field but abi_version and
 * n_gpu_layers (0 = the CPU here; the CLI's default is -1), so VLM_OPTIONS_INIT (or
 * { VLM_ABI_VERSION } and zeros) is a complete, valid set of options that runs on the CPU.
 * Passing NULL to vlm_open also means all defaults (and skips the ABI check). */
typedef struct vlm_options {
    uint32_t abi_version; /* must be VLM_ABI_VERSION */
    int32_t n_threads;    /* CPU threads; 0 = a share of the cores (see README) */
    int32_t n_gpu_layers; /* layers offloaded to a GPU (when the build has one); -1 = all, 0 = none (CPU) */
    int32_t n_ctx;        /* context size in tokens (SmolVLM2); 0 = 4096 */
    uint32_t seed;        /* sampling seed (used when temperature > 0) */
    int32_t max_tokens;   /* most tokens per answer; 0 = 256 for ask, 96 for caption */
    float temperature;    /* 0 = greedy (deterministic) */
    float top_p;          /* nucleus sampling; 0 = 1.0 (off) */
    int32_t detail;       /* a vlm_detail */
    int32_t max_tiles;    /* cap on image tiles, as `--max-tiles N` (overrides detail); 0 = no cap */
    /* ABI 2: */
    int32_t best_of;      /* candidates sampled from one image encoding, the best kept (`--best-of`); 0 = 1;
                             with more than 1, temperature 0 means 0.7 (greedy candidates would all be equal) */
    int32_t select;       /* a vlm_select */
    /* ABI 3: */
    const char *json_schema; /* answers follow this JSON schema (the schema's JSON text, UTF-8), as
                                `vlm ask --json-schema`; NULL = free text. Checked by vlm_open: a schema
                                it cannot enforce is VLM_E_INVALID_ARGUMENT naming the keyword */
    const char *grammar;     /* answers follow this GBNF grammar (its text), as `--grammar`; NULL = none;
                                not together with json_schema. vlm_open copies both strings */
} vlm_options;

/* An input image: a file (any format `vlm` reads), or packed RGB8 pixels when path is NULL:
 * width * height * 3 bytes, rows top to bottom, no padding between rows. */
typedef struct vlm_image {
    const char *path;
    const uint8_t *rgb;
    int32_t width;
    int32_t height;
} vlm_image;

/* Called with each piece of generated text (piece[len] == 0; whole UTF-8 characters).
 * Return 0 to go on, anything else to stop generation (the call then returns VLM_OK). */
typedef int (*vlm_token_callback)(const char *piece, size_t len, void *user_data);

/* cdef-end */

/* All defaults: vlm_options opts = VLM_OPTIONS_INIT; then change what you need. */
#define VLM_OPTIONS_INIT {VLM_ABI_VERSION, 0, 0, 0, 0u, 0, 0.0f, 0.0f, VLM_DETAIL_AUTO, 0, 0, VLM_SELECT_LOGPROB, NULL, NULL}

/* ---- version and errors -------------------------------------------------------------------- */

/* The library version, e.g. "0.1.0 (abi 1)". Never NULL; needs no handle. */
const char *vlm_version(void);
/* The ABI version the library was built with: compare with VLM_ABI_VERSION. */
uint32_t vlm_abi_version(void);
/* The message of this thread's last failed call with `handle` ("" if none). Never NULL. */
const char *vlm_last_error(vlm_handle handle);
/* A short fixed name for a status, e.g. "VLM_E_MODEL". Never NULL. */
const char *vlm_status_name(int status);

/* ---- handles -------------------------------------------------------------------------------- */

/* Open a model: a store name (see `vlm models`), a GGUF file, or a folder holding a SmolVLM2
 * model and its mmproj or a CLIP GGUF. SmolVLM2 and CLIP both open; vlm_model_kind tells which.
 * Returns a handle > 0, or a negative vlm_status (message: vlm_last_error(0)). */
vlm_handle vlm_open(const char *model, const vlm_options *opts);
/* Free the model. A second close, or a handle never opened, gives VLM_E_INVALID_HANDLE. */
vlm_status vlm_close(vlm_handle handle);
/* *kind = VLM_KIND_VLM or VLM_KIND_CLIP. */
vlm_status vlm_model_kind(vlm_handle handle, int32_t *kind);

/* ---- SmolVLM2 ------------------------------------------------------------------------------ */

/* Answer `prompt` about `image` into out[out_size] (NUL-terminated UTF-8); *needed = bytes the
 * whole answer takes, including the NUL. Same model, image, prompt and options as `vlm ask`
 * give the same answer. */
vlm_status vlm_ask(vlm_handle handle, const vlm_image *image, const char *prompt,
                   char *out, size_t out_size, size_t *needed);
/* As vlm_ask, but each piece of text goes to on_token as it is generated; on_token can stop. */
vlm_status vlm_ask_stream(vlm_handle handle, const vlm_image *image, const char *prompt,
                          vlm_token_callback on_token, void *user_data);
/* vlm_ask with the prompt and defaults of `vlm caption` ("Describe this image in one sentence.",
 * 96 tokens unless max_tokens is set); like `vlm caption`, the caption has no leading or trailing
 * white space (vlm_ask gives the text exactly as generated, as `vlm ask` prints it). */
vlm_status vlm_caption(vlm_handle handle, const vlm_image *image,
                       char *out, size_t out_size, size_t *needed);

/* Answer `prompt` about several images and videos, in order, as `vlm ask -i A -i B PROMPT` does
 * (n_media 0, media may be NULL: a text-only prompt). A path may name a video (told by its content;
 * frames taken as `vlm ask` takes them: 1 per second, at most 64); packed pixels are an image.
 * The answer goes to out[out_size] as with vlm_ask, or, when on_token is not NULL, to on_token as it
 * is generated (out may then be NULL). A new function: no struct changed, so no ABI version bump. */
vlm_status vlm_ask_media(vlm_handle handle, const vlm_image *media, size_t n_media, const char *prompt,
                         char *out, size_t out_size, size_t *needed,
                         vlm_token_callback on_token, void *user_data);

/* ---- CLIP ------------------------------------------------------------------------------------ */

/* *dim = the length of one embedding. */
vlm_status vlm_embedding_size(vlm_handle handle, size_t *dim);
/* n_images embeddings, one after the other, into out[out_len] (needs n_images * dim floats);
 * the same vectors `vlm embed` prints (L2-normalised). */
vlm_status vlm_embed_images(vlm_handle handle, const vlm_image *images, size_t n_images,
                            float *out, size_t out_len, size_t *needed);
/* n_texts embeddings of UTF-8 texts, as vlm_embed_images. */
vlm_status vlm_embed_texts(vlm_handle handle, const char *const *texts, size_t n_texts,
                           float *out, size_t out_len, size_t *needed);
/* Zero-shot classification of one image: scores[i] = probability of labels[i] (they sum to 1),
 * as `vlm classify` computes them. Needs n_labels floats. */
vlm_status vlm_classify(vlm_handle handle, const vlm_image *image,
                        const char *const *labels, size_t n_labels,
                        float *scores, size_t scores_len, size_t *needed);

#ifdef __cplusplus
}
#endif

#endif /* VLM_H */
