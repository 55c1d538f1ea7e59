"""A prompt's rows into llama.cpp in whole batches: text tokens and image embeddings alike.

mtmd's helper decodes each image chunk (64 rows for SmolVLM2) and each run of text between chunks as
a call of its own, so a full-detail photo is some 40 small decode calls. Here every row goes in as an
embedding, and the rows fill batches of n_batch whatever their kind. A text token's row is its
token_embd row, turned to float32 by ggml's own to_float: the function llama.cpp's CPU get_rows runs
for token ids, so a llama-architecture model (which scales neither input) reads the same numbers.
The engine checks the architecture and the input width at load.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from vlmcli.engines import ggml
from vlmcli.engines.llama_native import fill_rows, llama
from vlmcli.errors import ModelError, VlmError
from vlmcli.gguf.reader import GgufInfo

TOKEN_EMBD = "token_embd.weight"


class TokenRows:
    """token_embd rows of a GGUF language model, read from the file as tokens need them."""

    def __init__(self, info: GgufInfo):
        tensor = next((t for t in info.tensors if t.name == TOKEN_EMBD), None)
        if tensor is None or len(tensor.shape) != 2:
            raise ModelError(f"has no two-dimensional {TOKEN_EMBD}", info.path)
        self.width, self.n_vocab = int(tensor.shape[0]), int(tensor.shape[1])
        self.type = tensor.type
        data = np.memmap(Path(info.path), dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))
        self._table = data.reshape(self.n_vocab, tensor.n_bytes // self.n_vocab)
        try:
            self.rows([0])  # a type ggml cannot turn into floats fails at load, not at the first prompt
        except VlmError as e:
            raise ModelError(f"{TOKEN_EMBD} cannot be read: {e}", info.path) from None

    def rows(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens), width] float32 (the ids are the engine's, checked against the vocabulary)."""
        raw = self._table[np.asarray(tokens, np.int64)]
        if self.type == "F32":  # stored as the model reads it (ggml has no to_float for F32)
            return raw.view(np.float32).reshape(len(tokens), self.width)
        return ggml.dequantize(raw, self.type).reshape(len(tokens), self.width)


class PromptInput:
    """What an engine keeps for its prompts: the token_embd table and one batch of n_batch embedding rows."""

    def __init__(self, info: GgufInfo, n_batch: int):
        self.tokens = TokenRows(info)
        self.width, self.n_batch = self.tokens.width, n_batch
        self._batch: llama.llama_batch | None = llama.llama_batch_init(n_batch, self.width, 1)

    def rows(self, ctx: object, n_past: int) -> PromptRows:
        """A prompt's rows from n_past on, decoded into ctx through this batch."""
        assert self._batch is not None, "freed"
        return PromptRows(ctx, self._batch, self.n_batch, self.tokens, n_past)

    def free(self) -> None:
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None


class PromptRows:
    """Rows gathered from n_past on and decoded into sequence 0 in batches of n_batch (the batch's size).
    `flush` decodes what is left (never nothing, when rows came since the last flush); its last row can
    keep its logits (the row generation starts from). decode_s: the time spent reading token rows and
    decoding."""

    def __init__(self, ctx: object, batch: llama.llama_batch, n_batch: int, tokens: TokenRows, n_past: int):
        self._ctx, self._batch, self._n_batch, self._tokens = ctx, batch, n_batch, tokens
        self.n_past = n_past
        self.decode_s = 0.0
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add_tokens(self, tokens: list[int]) -> None:
        if tokens:
            t0 = time.perf_counter()
            rows = self._tokens.rows(tokens)
            self.decode_s += time.perf_counter() - t0
            self.add_embeddings(rows)

    def add_embeddings(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self._tokens.width:
            raise VlmError(f"embeddings of shape {rows.shape} for a model {self._tokens.width} wide")
        self._pending.append(rows)
        self._n_pending += len(rows)
        while self._n_pending > self._n_batch:  # more than a batch: flush is left at least one row
            self._decode(self._n_batch, logits_last=False)

    def flush(self, logits_last: bool = False) -> int:
        """Decode every row gathered; returns n_past."""
        if self._n_pending:
            self._decode(self._n_pending, logits_last)
        return self.n_past

    def _decode(self, n: int, logits_last: bool) -> None:
        t0 = time.perf_counter()
        rows = np.ascontiguousarray(np.concatenate(self._pending), dtype=np.float32)
        rest = rows[n:]
        self._pending, self._n_pending = ([rest] if len(rest) else []), len(rest)
        ctypes.memmove(self._batch.embd, rows.ctypes.data, n * rows.shape[1] * 4)
        fill_rows(self._batch, n, self.n_past, "last" if logits_last else "none")
        rc = llama.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise VlmError(f"llama.cpp failed to decode the prompt (code {rc}, at position {self.n_past})")
        self.n_past += n
        self.decode_s += time.perf_counter() - t0
