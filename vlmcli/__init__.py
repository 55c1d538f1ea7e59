"""vlmcli: local vision-language inference (SmolVLM2 on llama.cpp, CLIP on ggml)."""

__version__ = "0.1.0"
