/*
 * vlm_example.c - ask SmolVLM2 about an image, or embed images and texts with CLIP, through libvlm.
 *
 *   vlm lib build --out lib
 *   cc examples/vlm_example.c -Ilib -Llib -lvlm -o vlm_example
 *
 *   ./vlm_example ask    [-n MAX_TOKENS] [-t TEMPERATURE] [-s SEED] MODEL IMAGE PROMPT
 *   ./vlm_example stream [-n MAX_TOKENS] [-t TEMPERATURE] [-s SEED] MODEL IMAGE PROMPT
 *   ./vlm_example embed  MODEL IMAGE... [-- TEXT...]
 *
 * MODEL is a store name (see `vlm models`), a GGUF file or a folder. `embed` prints one line per
 * input: "image PATH" or "text TEXT", then the vector's floats on the next line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vlm.h"

static int fail(vlm_handle handle, const char *what, int status)
{
    fprintf(stderr, "vlm_example: %s failed: %s: %s\n", what, vlm_status_name(status),
            vlm_last_error(handle));
    return 1;
}

static int usage(void)
{
    fprintf(stderr,
            "usage: vlm_example ask|stream [-n MAX_TOKENS] [-t TEMPERATURE] [-s SEED] MODEL IMAGE PROMPT\n"
            "       vlm_example embed MODEL IMAGE... [-- TEXT...]\n");
    return 2;
}

/* The streaming callback: print each piece as it comes. */
static int print_piece(const char *piece, size_t len, void *user_data)
{
    (void)user_data;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0; /* 0 = go on; anything else stops generation */
}

static int ask(int argc, char **argv, int streaming)
{
    vlm_options opts = VLM_OPTIONS_INIT; /* the CLI's defaults */
    int i = 0;
    for (; i + 1 < argc && argv[i][0] == '-' && argv[i][1] != 0 && argv[i][2] == 0; i += 2) {
        switch (argv[i][1]) {
        case 'n': opts.max_tokens = atoi(argv[i + 1]); break;
        case 't': opts.temperature = (float)atof(argv[i + 1]); break;
        case 's': opts.seed = (uint32_t)strtoul(argv[i + 1], NULL, 10); break;
        default: return usage();
        }
    }
    if (argc - i != 3)
        return usage();
    const char *model = argv[i], *image_path = argv[i + 1], *prompt = argv[i + 2];

    vlm_handle h = vlm_open(model, &opts);
    if (h < 0)
        return fail(h, "vlm_open", (int)h);

    vlm_image image = {image_path, NULL, 0, 0};
    int status;
    if (streaming) {
        status = vlm_ask_stream(h, &image, prompt, print_piece, NULL);
        if (status == VLM_OK)
            printf("\n");
    } else {
        /* Start small; on VLM_E_BUFFER_TOO_SMALL `needed` says how much to allocate. */
        size_t size = 16, needed = 0;
        char *answer = malloc(size);
        status = vlm_ask(h, &image, prompt, answer, size, &needed);
        if (status == VLM_E_BUFFER_TOO_SMALL) {
            free(answer);
            size = needed;
            answer = malloc(size);
            status = vlm_ask(h, &image, prompt, answer, size, &needed);
        }
        if (status == VLM_OK)
            printf("%s\n", answer);
        free(answer);
    }
    if (status != VLM_OK) {
        fail(h, streaming ? "vlm_ask_stream" : "vlm_ask", status);
        vlm_close(h);
        return 1;
    }
    status = vlm_close(h);
    return status == VLM_OK ? 0 : fail(h, "vlm_close", status);
}

static void print_vector(const float *v, size_t dim)
{
    for (size_t j = 0; j < dim; j++)
        printf(j ? " %.9g" : "%.9g", v[j]);
    printf("\n");
}

static int embed(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    int n_images = 0, n_texts = 0;
    char **texts = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            texts = argv + i + 1;
            n_texts = argc - i - 1;
            break;
        }
        n_images++;
    }

    vlm_handle h = vlm_open(argv[0], NULL);
    if (h < 0)
        return fail(h, "vlm_open", (int)h);
    size_t dim = 0;
    int status = vlm_embedding_size(h, &dim);
    if (status != VLM_OK) {
        fail(h, "vlm_embedding_size", status);
        vlm_close(h);
        return 1;
    }

    if (n_images > 0) {
        vlm_image *images = calloc((size_t)n_images, sizeof *images);
        float *vectors = malloc((size_t)n_images * dim * sizeof *vectors);
        for (int i = 0; i < n_images; i++)
            images[i].path = argv[1 + i];
        status = vlm_embed_images(h, images, (size_t)n_images, vectors, (size_t)n_images * dim, NULL);
        if (status == VLM_OK)
            for (int i = 0; i < n_images; i++) {
                printf("image %s\n", images[i].path);
                print_vector(vectors + (size_t)i * dim, dim);
            }
        free(images);
        free(vectors);
        if (status != VLM_OK) {
            fail(h, "vlm_embed_images", status);
            vlm_close(h);
            return 1;
        }
    }
    if (n_texts > 0) {
        float *vectors = malloc((size_t)n_texts * dim * sizeof *vectors);
        status = vlm_embed_texts(h, (const char *const *)texts, (size_t)n_texts, vectors,
                                 (size_t)n_texts * dim, NULL);
        if (status == VLM_OK)
            for (int i = 0; i < n_texts; i++) {
                printf("text %s\n", texts[i]);
                print_vector(vectors + (size_t)i * dim, dim);
            }
        free(vectors);
        if (status != VLM_OK) {
            fail(h, "vlm_embed_texts", status);
            vlm_close(h);
            return 1;
        }
    }
    status = vlm_close(h);
    return status == VLM_OK ? 0 : fail(h, "vlm_close", status);
}

int main(int argc, char **argv)
{
    if (vlm_abi_version() != VLM_ABI_VERSION) {
        fprintf(stderr, "vlm_example: built for ABI %d, the library is %s\n", VLM_ABI_VERSION, vlm_version());
        return 1;
    }
    if (argc < 2)
        return usage();
    if (strcmp(argv[1], "ask") == 0)
        return ask(argc - 2, argv + 2, 0);
    if (strcmp(argv[1], "stream") == 0)
        return ask(argc - 2, argv + 2, 1);
    if (strcmp(argv[1], "embed") == 0)
        return embed(argc - 2, argv + 2);
    return usage();
}
