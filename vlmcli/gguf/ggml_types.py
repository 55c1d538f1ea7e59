"""The ggml tensor types loaders accept, by role. The matmul sets differ on purpose: llama.cpp and mtmd
multiply every type below, vlm's CLIP loader only those its converter and clip.cpp's quantizer write."""

from __future__ import annotations

# Every type llama.cpp's and mtmd's matmuls take (SmolVLM2's language model and projector).
LLAMA_MATMUL_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ3_XXS",
    "IQ1_S",
    "IQ4_NL",
    "IQ3_S",
    "IQ2_S",
    "IQ4_XS",
    "IQ1_M",
    "TQ1_0",
    "TQ2_0",
    "MXFP4",
)
FLOAT_TYPES = ("F32", "F16", "BF16")
NORM_TYPES = ("F32", "F16")
CONV_TYPES = ("F32", "F16")  # ggml's im2col takes F32 or F16 kernels

# Types a 2-D matmul weight of a CLIP file may have (ggml's CPU mul_mat handles all of them).
CLIP_MATMUL_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# The patch embedding (reshaped to a matrix for mul_mat): vlm and clip.cpp write F16.
CLIP_EMBEDDING_TYPES = ("F32", "F16")
# The token embedding is read by get_rows, which takes every type clip.cpp writes (its quantizer
# quantizes every 2-D weight, the embeddings too).
CLIP_TOKEN_EMBEDDING_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# The position embeddings are added in F32; clip.cpp's files store them F16 (or quantized), so any of
# these types is accepted and converted to F32 when the model is loaded (they are small).
CLIP_POSITION_EMBEDDING_TYPES = CLIP_TOKEN_EMBEDDING_TYPES
