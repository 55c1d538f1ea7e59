"""Defaults and limits shared by the engines, the tasks and the front ends (importable without
numpy or Pillow, so the CLI can declare its options and still start fast)."""

# Larger images are refused unless the user raises the cap (--max-pixels): a
# small PNG can decompress to gigabytes ("decompression bomb").
DEFAULT_MAX_PIXELS = 64_000_000

# CLIP: images and texts encoded together in one graph.
DEFAULT_IMAGE_BATCH = 8
DEFAULT_TEXT_BATCH = 64

# GPU offload, for SmolVLM2 and CLIP alike: -1 = every layer on the GPU when the build has a GPU backend
# and none otherwise (llama.cpp and ggml then stay on the CPU), as llama.cpp and Ollama default; 0 forces
# the CPU. The C ABI keeps its own default: a zeroed vlm_options.n_gpu_layers is 0, the CPU.
DEFAULT_N_GPU_LAYERS = -1

# SmolVLM2: the context, in tokens, a model is opened with.
DEFAULT_N_CTX = 4096

# SmolVLM2: most tokens generated per answer when a request or command names no limit (ask, chat, serve).
DEFAULT_MAX_TOKENS = 256

# SmolVLM2 captions: the instruction given with each image, and the most tokens of a caption.
DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."
DEFAULT_CAPTION_MAX_TOKENS = 96
