/*
 * The C side of libvlm: the public vlm_* functions of vlm.h.
 *
 * This file is pasted by cffi into the generated library source (after Python.h and cffi's
 * embedding support). It does only what must not depend on Python: starting the embedded
 * interpreter with the right installation, the thread-local error messages, the version
 * strings, and turning a runtime that failed to start into an error code instead of the
 * "0 = success" that cffi would return. Everything else is one call to the Python function of
 * the same name in vlmcli/capi/exports.py.
 *
 * The build defines VLM_PYTHON_EXECUTABLE (the interpreter of the installation the library was
 * built from, e.g. /path/to/venv/bin/python) and VLM_PACKAGE_VERSION.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#include "vlm.h"

#if defined(__GNUC__)
#define VLM_EXPORT __attribute__((visibility("default")))
#else
#define VLM_EXPORT
#endif

/* The Python functions (extern "Python", defined by cffi further down this file). Each returns a
 * status and writes its message into err[VLM_ERROR_MAX] on failure. */
/* python-functions-begin */
int32_t _vlm_py_open(const char *model, const vlm_options *opts, vlm_handle *out, char *err);
int32_t _vlm_py_close(vlm_handle h, char *err);
int32_t _vlm_py_kind(vlm_handle h, int32_t *kind, char *err);
int32_t _vlm_py_ask(vlm_handle h, const vlm_image *image, const char *prompt, int32_t caption,
                    char *out, size_t out_size, size_t *needed,
                    vlm_token_callback on_token, void *user_data, char *err);
int32_t _vlm_py_ask_media(vlm_handle h, const vlm_image *media, size_t n_media, const char *prompt,
                          char *out, size_t out_size, size_t *needed,
                          vlm_token_callback on_token, void *user_data, char *err);
int32_t _vlm_py_embedding_size(vlm_handle h, size_t *dim, char *err);
int32_t _vlm_py_embed_images(vlm_handle h, const vlm_image *images, size_t n, float *out,
                             size_t out_len, size_t *needed, char *err);
int32_t _vlm_py_embed_texts(vlm_handle h, const char *const *texts, size_t n, float *out,
                            size_t out_len, size_t *needed, char *err);
int32_t _vlm_py_classify(vlm_handle h, const vlm_image *image, const char *const *labels,
                         size_t n_labels, float *scores, size_t scores_len, size_t *needed,
                         char *err);
/* python-functions-end */

/* ---- starting the embedded interpreter ---------------------------------------------------- */

static int vlm__py_config_status = 0; /* 0 = fine, -1 = Python could not be configured */
static char vlm__py_config_error[512];
static pthread_once_t vlm__py_once = PTHREAD_ONCE_INIT;

/* Start Python as the build's own interpreter would start, so that the installation it was built
 * from (a virtual environment's site-packages included, found through its pyvenv.cfg) is on
 * sys.path without any activation. The host's PYTHONHOME / PYTHONPATH are ignored: they belong to
 * whatever other Python the user has, not to this library. VLM_PYTHON overrides the interpreter
 * (for a moved installation). The host's locale and signal handlers are left alone. */
static void vlm__configure_python(void)
{
    PyStatus status;
    PyPreConfig preconfig;
    PyConfig config;
    const char *exe = getenv("VLM_PYTHON");

    if (Py_IsInitialized())
        return; /* a Python host (e.g. a ctypes script): use its interpreter */
    if (exe == NULL || exe[0] == 0)
        exe = VLM_PYTHON_EXECUTABLE;

    PyPreConfig_InitPythonConfig(&preconfig);
    preconfig.configure_locale = 0; /* do not call setlocale() in someone else's process */
    preconfig.coerce_c_locale = 0;
    preconfig.utf8_mode = 1;        /* the API is UTF-8 whatever the locale */
    status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status))
        goto fail;

    PyConfig_InitPythonConfig(&config);
    config.use_environment = 0;
    config.user_site_directory = 0;
    config.install_signal_handlers = 0;
    config.parse_argv = 0;
    status = PyConfig_SetBytesString(&config, &config.program_name, exe);
    if (PyStatus_Exception(status)) {
        PyConfig_Clear(&config);
        goto fail;
    }
    status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status))
        goto fail;
    PyEval_SaveThread(); /* release the GIL: each call takes it as it needs it */
    return;

fail:
    vlm__py_config_status = -1;
    snprintf(vlm__py_config_error, sizeof vlm__py_config_error,
             "could not start the embedded Python of %s: %s", exe,
             status.err_msg ? status.err_msg : "unknown error");
}

/* 0 when the runtime is up; otherwise -1 with *why set. */
static int vlm__start(const char **why)
{
    pthread_once(&vlm__py_once, vlm__configure_python);
    if (vlm__py_config_status != 0) {
        *why = vlm__py_config_error;
        return -1;
    }
    if (cffi_start_python() != 0) {
        *why = "the embedded Python runtime failed to start: vlmcli or one of its dependencies "
               "could not be imported (details on stderr); rebuild with `vlm lib build`";
        return -1;
    }
    return 0;
}

/* ---- thread-local error messages ---------------------------------------------------------- */

#define VLM__ERROR_SLOTS 8

typedef struct vlm__error_slot {
    vlm_handle handle;
    char message[VLM_ERROR_MAX];
} vlm__error_slot;

/* A few (handle, message) slots per thread: no allocation, nothing to free at thread exit. */
static __thread vlm__error_slot vlm__errors[VLM__ERROR_SLOTS];
static __thread unsigned vlm__error_next;

static vlm_handle vlm__error_key(vlm_handle h) { return h > 0 ? h : 0; }

static vlm__error_slot *vlm__find_slot(vlm_handle key)
{
    for (int i = 0; i < VLM__ERROR_SLOTS; i++)
        if (vlm__errors[i].message[0] != 0 && vlm__errors[i].handle == key)
            return &vlm__errors[i];
    return NULL;
}

static void vlm__record(vlm_handle h, int32_t st, const char *message)
{
    vlm_handle key = vlm__error_key(h);
    vlm__error_slot *slot = vlm__find_slot(key);
    size_t n;
    if (slot == NULL) {
        slot = &vlm__errors[vlm__error_next++ % VLM__ERROR_SLOTS];
        slot->handle = key;
    }
    if (message == NULL || message[0] == 0)
        message = vlm_status_name(st);
    n = strlen(message);
    if (n >= VLM_ERROR_MAX) {
        n = VLM_ERROR_MAX - 1;
        while (n > 0 && ((unsigned char)message[n] & 0xC0) == 0x80)
            n--; /* do not cut a UTF-8 character in two */
    }
    memcpy(slot->message, message, n);
    slot->message[n] = 0;
}

VLM_EXPORT const char *vlm_last_error(vlm_handle handle)
{
    vlm__error_slot *slot = vlm__find_slot(vlm__error_key(handle));
    return slot ? slot->message : "";
}

VLM_EXPORT const char *vlm_status_name(int status)
{
    switch (status) {
    case VLM_OK: return "VLM_OK";
    case VLM_E_INVALID_ARGUMENT: return "VLM_E_INVALID_ARGUMENT";
    case VLM_E_INVALID_HANDLE: return "VLM_E_INVALID_HANDLE";
    case VLM_E_BUFFER_TOO_SMALL: return "VLM_E_BUFFER_TOO_SMALL";
    case VLM_E_ABI_MISMATCH: return "VLM_E_ABI_MISMATCH";
    case VLM_E_MODEL: return "VLM_E_MODEL";
    case VLM_E_IMAGE: return "VLM_E_IMAGE";
    case VLM_E_WRONG_KIND: return "VLM_E_WRONG_KIND";
    case VLM_E_BUSY: return "VLM_E_BUSY";
    case VLM_E_FAILED: return "VLM_E_FAILED";
    case VLM_E_RUNTIME: return "VLM_E_RUNTIME";
    default: return "VLM_E_UNKNOWN";
    }
}

/* ---- versions ------------------------------------------------------------------------------ */

#define VLM__STR2(x) #x
#define VLM__STR(x) VLM__STR2(x)

VLM_EXPORT const char *vlm_version(void)
{
    return VLM_PACKAGE_VERSION " (abi " VLM__STR(VLM_ABI_VERSION) ")";
}

VLM_EXPORT uint32_t vlm_abi_version(void) { return VLM_ABI_VERSION; }

/* ---- the calls ----------------------------------------------------------------------------- */

/* Start the runtime, run one Python function, keep its message if it failed. */
#define VLM__CALL(handle, call)                                                                \
    do {                                                                                       \
        char err[VLM_ERROR_MAX];                                                               \
        const char *why = NULL;                                                                \
        int32_t st;                                                                            \
        err[0] = 0;                                                                            \
        if (vlm__start(&why) != 0) {                                                           \
            vlm__record((handle), VLM_E_RUNTIME, why);                                         \
            return VLM_E_RUNTIME;                                                              \
        }                                                                                      \
        st = (call);                                                                           \
        if (st != VLM_OK)                                                                      \
            vlm__record((handle), st, err);                                                    \
        return (vlm_status)st;                                                                 \
    } while (0)

VLM_EXPORT vlm_handle vlm_open(const char *model, const vlm_options *opts)
{
    char err[VLM_ERROR_MAX];
    const char *why = NULL;
    vlm_handle h = 0;
    int32_t st;
    err[0] = 0;
    if (vlm__start(&why) != 0) {
        vlm__record(0, VLM_E_RUNTIME, why);
        return VLM_E_RUNTIME;
    }
    st = _vlm_py_open(model, opts, &h, err);
    if (st != VLM_OK || h <= 0) {
        if (st == VLM_OK)
            st = VLM_E_RUNTIME;
        vlm__record(0, st, err);
        return st;
    }
    return h;
}

VLM_EXPORT vlm_status vlm_close(vlm_handle handle)
{
    VLM__CALL(handle, _vlm_py_close(handle, err));
}

VLM_EXPORT vlm_status vlm_model_kind(vlm_handle handle, int32_t *kind)
{
    VLM__CALL(handle, _vlm_py_kind(handle, kind, err));
}

VLM_EXPORT vlm_status vlm_ask(vlm_handle handle, const vlm_image *image, const char *prompt,
                              char *out, size_t out_size, size_t *needed)
{
    VLM__CALL(handle, _vlm_py_ask(handle, image, prompt, 0, out, out_size, needed, NULL, NULL, err));
}

VLM_EXPORT vlm_status vlm_ask_stream(vlm_handle handle, const vlm_image *image, const char *prompt,
                                     vlm_token_callback on_token, void *user_data)
{
    if (on_token == NULL) { /* NULL would mean "not streaming" to the Python side */
        vlm__record(handle, VLM_E_INVALID_ARGUMENT, "on_token is NULL");
        return VLM_E_INVALID_ARGUMENT;
    }
    VLM__CALL(handle, _vlm_py_ask(handle, image, prompt, 0, NULL, 0, NULL, on_token, user_data, err));
}

VLM_EXPORT vlm_status vlm_caption(vlm_handle handle, const vlm_image *image,
                                  char *out, size_t out_size, size_t *needed)
{
    VLM__CALL(handle, _vlm_py_ask(handle, image, NULL, 1, out, out_size, needed, NULL, NULL, err));
}

VLM_EXPORT vlm_status vlm_ask_media(vlm_handle handle, const vlm_image *media, size_t n_media, const char *prompt,
                                    char *out, size_t out_size, size_t *needed,
                                    vlm_token_callback on_token, void *user_data)
{
    VLM__CALL(handle, _vlm_py_ask_media(handle, media, n_media, prompt, out, out_size, needed, on_token,
                                        user_data, err));
}

VLM_EXPORT vlm_status vlm_embedding_size(vlm_handle handle, size_t *dim)
{
    VLM__CALL(handle, _vlm_py_embedding_size(handle, dim, err));
}

VLM_EXPORT vlm_status vlm_embed_images(vlm_handle handle, const vlm_image *images, size_t n_images,
                                       float *out, size_t out_len, size_t *needed)
{
    VLM__CALL(handle, _vlm_py_embed_images(handle, images, n_images, out, out_len, needed, err));
}

VLM_EXPORT vlm_status vlm_embed_texts(vlm_handle handle, const char *const *texts, size_t n_texts,
                                      float *out, size_t out_len, size_t *needed)
{
    VLM__CALL(handle, _vlm_py_embed_texts(handle, texts, n_texts, out, out_len, needed, err));
}

VLM_EXPORT vlm_status vlm_classify(vlm_handle handle, const vlm_image *image,
                                   const char *const *labels, size_t n_labels,
                                   float *scores, size_t scores_len, size_t *needed)
{
    VLM__CALL(handle, _vlm_py_classify(handle, image, labels, n_labels, scores, scores_len, needed, err));
}
