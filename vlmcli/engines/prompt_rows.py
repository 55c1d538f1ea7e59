"""A prompt's rows into llama.cpp in whole batches: text tokens and image embeddings alike.

mtmd's helper decodes each image chunk (64 rows for SmolVLM2) and each run of text between chunks as
a call of its own, so a full-detail photo is some 40 small decode calls. Here every row goes in as an
embedding, and the rows fill batches of n_batch whatever their kind. A text token's row is its
token_embd row, turned to float32 by ggml's own to_float, the function llama.cpp's get_rows runs for
token ids: the model reads the same numbers either way.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from vlmcli.engines import ggml
from vlmcli.engines.llama_native import batch_positions, llama
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
        self._row_bytes = tensor.n_bytes // self.n_vocab
        self._data = np.memmap(Path(info.path), dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))

    def rows(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens), width] float32 (the ids are the engine's, checked against the vocabulary)."""
        out = np.empty((len(tokens), self.width), np.float32)
        for i, t in enumerate(tokens):
            start = t * self._row_bytes
            out[i] = ggml.dequantize(self._data[start : start + self._row_bytes], self.type)
        return out


class PromptRows:
    """Rows gathered from n_past on and decoded into sequence 0 a batch of n_batch at a time. `flush`
    decodes what is left; its last row can keep its logits (the row generation starts from)."""

    def __init__(self, ctx: object, batch: llama.llama_batch, n_batch: int, tokens: TokenRows, n_past: int):
        self._ctx, self._batch, self._n_batch, self._tokens = ctx, batch, n_batch, tokens
        self.n_past = n_past
        self.decode_s = 0.0
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add_tokens(self, tokens: list[int]) -> None:
        if tokens:
            self.add_embeddings(self._tokens.rows(tokens))

    def add_embeddings(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self._tokens.width:
            raise VlmError(f"embeddings of shape {rows.shape} for a model {self._tokens.width} wide")
        self._pending.append(rows)
        self._n_pending += len(rows)
        while self._n_pending >= self._n_batch:
            self._decode(self._n_batch, logits_last=False)

    def flush(self, logits_last: bool = False) -> int:
        """Decode every row gathered; returns n_past."""
        if self._n_pending:
            self._decode(self._n_pending, logits_last)
        return self.n_past

    def _decode(self, n: int, logits_last: bool) -> None:
        rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        rest = rows[n:]
        self._pending, self._n_pending = ([rest] if len(rest) else []), len(rest)
        t0 = time.perf_counter()
        b = self._batch
        ctypes.memmove(b.embd, rows.ctypes.data, n * rows.shape[1] * 4)
        pos = batch_positions(b)
        b.n_tokens = n
        for i in range(n):
            pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = False
        b.logits[n - 1] = logits_last
        rc = llama.llama_decode(self._ctx, b)
        if rc != 0:
            raise VlmError(f"llama.cpp failed to decode the prompt (code {rc}, at position {self.n_past})")
        self.n_past += n
        self.decode_s += time.perf_counter() - t0
