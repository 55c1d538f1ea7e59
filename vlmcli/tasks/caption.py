"""`vlm caption`: SmolVLM2 describes each image. The work itself is `ask` with a fixed prompt,
run over many images by the batch runner (tasks/batch.py VlmTask); here are its defaults."""

DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."
DEFAULT_CAPTION_MAX_TOKENS = 96
