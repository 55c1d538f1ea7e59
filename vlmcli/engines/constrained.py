"""Sampling under a grammar, finished inside the token budget.

llama.cpp's grammar sampler masks the tokens a grammar does not allow next. Alone it cannot keep
an answer complete: a model (a random-weight one above all) can stay inside a JSON string until
--max-tokens cuts it, and a cut answer does not parse. So each sequence also follows its bytes
with gbnf.Recognizer and keeps this invariant: the shortest completion of what it has written
fits in the tokens it has left. A sampled token that would break it is not taken; the sequence
writes that completion instead (each of its tokens checked against llama.cpp's grammar first) and
ends with stop reason "closed". Completions are written with the vocabulary's longest pieces.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from typing import Protocol

import numpy as np

from vlmcli.engines.gbnf import Grammar, GrammarError, Recognizer, State
from vlmcli.engines.json_schema import Constraint
from vlmcli.engines.llama_native import llama
from vlmcli.errors import InvalidOption

MAX_MASKS = 4096  # grammar masks kept per grammar (a packed bit per token: 6 KiB each for 49,152 tokens)
_MASKS: weakref.WeakKeyDictionary[Grammar, dict[State, np.ndarray]] = weakref.WeakKeyDictionary()
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama.llama_token_data)


class Sampler(Protocol):
    """One sequence's sampler as the engine's decoding loops use it."""

    @property
    def closed(self) -> bool:
        """The answer was completed at the budget (sample returned None, or it ended complete)."""
        ...

    def sample(self, row: int) -> int | None: ...

    def free(self) -> None: ...


class Pieces:
    """The vocabulary's pieces as bytes, for writing a completion with as few tokens as it takes."""

    def __init__(self, n_vocab: int, piece: Callable[[int], bytes], usable: Callable[[int], bool]):
        self.by_bytes: dict[bytes, int] = {}
        for tok in range(n_vocab):
            data = piece(tok)
            if data and usable(tok) and data not in self.by_bytes:
                self.by_bytes[data] = tok
        self.longest = max((len(b) for b in self.by_bytes), default=1)

    def tokens(self, data: bytes) -> list[int] | None:
        """`data` as tokens, longest piece first; None when some byte has no piece."""
        out, i = [], 0
        while i < len(data):
            for n in range(min(self.longest, len(data) - i), 0, -1):
                tok = self.by_bytes.get(data[i : i + n])
                if tok is not None:
                    out.append(tok)
                    i += n
                    break
            else:
                return None
        return out


class ConstrainedSampler:
    """One sequence's sampler: llama.cpp's grammar sampler before the sampling chain, and the closing
    described above (when the grammar is one gbnf.py can follow)."""

    def __init__(
        self,
        vocab: object,
        ctx: object,
        n_vocab: int,
        chain: object,
        constraint: Constraint,
        grammar: Grammar | None,
        pieces: Pieces | None,
        piece: Callable[[int], bytes],
        budget: int,
    ):
        self.ctx, self.n_vocab, self.chain, self.piece, self._vocab = ctx, n_vocab, chain, piece, vocab
        self.grammar = llama.llama_sampler_init_grammar(vocab, constraint.gbnf.encode("utf-8"), b"root")
        if not self.grammar:
            llama.llama_sampler_free(chain)
            raise InvalidOption("grammar", "llama.cpp cannot parse this grammar")
        self.recognizer = Recognizer(grammar) if grammar is not None and pieces is not None else None
        self.pieces = pieces
        # Masks by state, shared by every sequence sampling under this grammar.
        self._masks: dict[State, np.ndarray] = _MASKS.setdefault(grammar, {}) if grammar is not None else {}
        self.state: State | None = None
        if self.recognizer is not None:
            try:
                self.state = self.recognizer.initial()
            except GrammarError:  # one gbnf.py cannot follow (left recursion): no closing
                self.recognizer = None
        self.left = budget  # tokens this sequence may still write
        self.forced: list[int] | None = None  # closing: the completion's tokens still to write
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        if self.state is not None:
            need = self._need(self.state)
            if need is None or need > budget:
                self.free()
                shortest = "" if need is None else f" (the shortest takes {need} tokens)"
                raise InvalidOption(
                    "max_tokens", f"{budget} tokens cannot hold a complete answer to this {constraint.kind}{shortest}"
                )

    def sample(self, row: int) -> int | None:
        """The next token (accepted by the grammar), or None when the answer was closed."""
        if self.forced is not None:
            return self._next_forced()
        tok = self._sample_free(row)
        if llama.llama_vocab_is_eog(self._vocab, tok):
            return tok  # the grammar allows an end only where the answer is complete
        if self.state is not None and not self._fits_after(tok):
            # Taking it could leave the answer unfinished: write the shortest completion instead.
            self.forced = self._completion_tokens()
            if self.forced is not None:
                return self._next_forced()
            self.state = None  # (never expected) it cannot be written: sample on under the grammar alone
        self._accept(tok)
        return tok

    def _fits_after(self, tok: int) -> bool:
        """Whether the answer can still be completed in budget after `tok`; if so the state moves past it."""
        assert self.recognizer is not None and self.state is not None
        try:
            after = self.recognizer.advance(self.state, self.piece(tok))
        except GrammarError:  # too ambiguous to follow from here: no closing
            self.state = None
            return True
        need = self._need(after) if after is not None else None
        if need is None or need > self.left - 1:
            return False
        self.state = after
        return True

    def _completion_tokens(self) -> list[int] | None:
        """The shortest completion's tokens; the state follows them, so that `closed` can tell."""
        assert self.recognizer is not None and self.state is not None and self.pieces is not None
        completion = self.recognizer.completion(self.state)
        tokens = self.pieces.tokens(completion) if completion is not None else None
        if tokens is not None:
            state: State | None = self.state
            for t in tokens:
                state = self.recognizer.advance(state, self.piece(t)) if state is not None else None
            self.state = state
        return tokens

    @property
    def closed(self) -> bool:
        """The answer is complete: its completion was written, or it ended complete at the budget."""
        if self.forced is not None:
            return not self.forced and self.state is not None
        return self.state is not None and self.state.complete

    def _sample_free(self, row: int) -> int:
        """A token the grammar allows, from the chain's distribution masked by the grammar. As
        llama.cpp's common sampler does: the chain first on every token, and the grammar over the whole
        vocabulary (the costly part) only when the grammar refuses that token. Drawing again from the
        masked distribution after a refusal gives the masked distribution exactly. The grammar's mask
        is kept per gbnf.py state: states recur (every character of a string is the same state), and a
        known state's mask is a numpy operation instead of llama.cpp's pass over the vocabulary."""
        tok = self._apply(row, None)
        if self._allowed(tok):
            return tok
        known = self._masks.get(self.state) if self.state is not None else None
        if known is not None:
            tok = self._apply(row, np.unpackbits(known, count=self.n_vocab).astype(bool))
            if self._allowed(tok):
                return tok
        return self._apply(row, True)

    def _apply(self, row: int, mask: np.ndarray | bool | None) -> int:
        """The chain's token over the row's logits: all of them (None), those `mask` allows, or those
        llama.cpp's grammar allows (True; the mask it leaves is kept for this state)."""
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits if not isinstance(mask, np.ndarray) else np.where(mask, logits, -np.inf)
        data["p"] = 0.0
        arr = llama.llama_token_data_array(
            data.ctypes.data_as(ctypes.POINTER(llama.llama_token_data)), self.n_vocab, -1, False
        )
        if mask is True:
            llama.llama_sampler_apply(self.grammar, ctypes.byref(arr))
            if self.state is not None and len(self._masks) < MAX_MASKS:
                self._masks[self.state] = np.packbits(np.isfinite(data["logit"]))
        llama.llama_sampler_apply(self.chain, ctypes.byref(arr))
        return int(arr.data[arr.selected].id)

    def _allowed(self, tok: int) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = tok, 0.0, 0.0
        arr = llama.llama_token_data_array(one.ctypes.data_as(ctypes.POINTER(llama.llama_token_data)), 1, -1, False)
        llama.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return bool(np.isfinite(one["logit"][0]))

    def _next_forced(self) -> int | None:
        assert self.forced is not None
        if not self.forced or not self._allowed(self.forced[0]):
            # Done; or (never expected) llama.cpp's grammar disagrees: stop before it would throw.
            if self.forced:
                self.state = None
            return None
        tok = self.forced.pop(0)
        self._accept(tok)
        return tok

    def _accept(self, tok: int) -> None:
        llama.llama_sampler_accept(self.grammar, tok)
        llama.llama_sampler_accept(self.chain, tok)
        self.left -= 1

    def _need(self, state: State) -> int | None:
        """Tokens the shortest completion from `state` takes (None: it cannot be written)."""
        assert self.recognizer is not None and self.pieces is not None
        completion = self.recognizer.completion(state)
        if completion is None:
            return None
        if len(completion) < self.left:  # a token is at least a byte: no need to count
            return len(completion)
        toks = self.pieces.tokens(completion)
        return None if toks is None else len(toks)

    def free(self) -> None:
        """Both samplers (the chain is this object's from construction on)."""
        if self.grammar:
            llama.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.chain:
            llama.llama_sampler_free(self.chain)
            self.chain = None


def parse_for_closing(constraint: Constraint) -> Grammar | None:
    """The grammar gbnf.py follows for closing, or None (a --grammar it cannot follow: no closing)."""
    if not constraint.closable:
        return None
    try:
        return Grammar.parse(constraint.gbnf)
    except (GrammarError, RecursionError):
        if constraint.kind != "grammar":
            raise
        return None
