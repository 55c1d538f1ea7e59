"""Limits the validation rules hold values to: the native code's own, stated as it states them, and vlmcli's."""

from __future__ import annotations

LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h
LLAMA_MAX_EXPERTS = 512  # src/llama-hparams.h
CLIP_MAX_IMAGE_SIZE = 8192  # clip.cpp: "image_size is too large (max 8192)"
CLIP_MAX_PATCH_SIZE = 65535  # clip.cpp: "patch_size must be positive and less than 65536"
MAX_PATCHES = 4096  # patches per encoder pass: attention is quadratic in it (real models: 576..1024)
CLIP_TOWER_MAX_IMAGE_SIZE = 1024  # vlmcli's CLIP graphs: preprocessed pixels are 12 * size^2 bytes per image
MAX_CONTEXT = 2**31 - 1  # context lengths are int32 in llama.cpp's batch and position types
MAX_EPS = 1.0  # layer-norm epsilons are ~1e-6..1e-5; above 1 the norm is meaningless
