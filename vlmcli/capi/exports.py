"""The Python functions behind libvlm's exported symbols (see vlm.h and glue.c).

`install(ffi, lib)` runs inside the embedded interpreter on the first call into the library and
defines one `extern "Python"` function per API call. Each converts the C arguments (checking
every pointer: NULL is an error, not a crash), runs the call in `runtime`, writes results into
the caller's buffers and returns a vlm_status; a failure's message goes to `err`, which glue.c
keeps for vlm_last_error.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from vlmcli.capi import runtime
from vlmcli.capi.runtime import CapiError
from vlmcli.errors import debugging

ERROR_MAX = 1024  # VLM_ERROR_MAX in vlm.h
MAX_ITEMS = 1 << 20  # more images / texts / labels than this in one call is a caller bug

handles = runtime.HandleTable()


def _utf8_prefix(data: bytes, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8 `data`, not ending inside a character."""
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut]


class _Exports:
    def __init__(self, ffi: Any):
        self.ffi = ffi

    # -- argument conversion -------------------------------------------------------------------

    def is_null(self, ptr: Any) -> bool:
        return ptr == self.ffi.NULL

    def need(self, ptr: Any, what: str) -> None:
        if self.is_null(ptr):
            raise CapiError(runtime.E_INVALID_ARGUMENT, f"{what} is NULL")

    def text(self, ptr: Any, what: str) -> str:
        self.need(ptr, what)
        raw = self.ffi.string(ptr)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CapiError(runtime.E_INVALID_ARGUMENT, f"{what} is not valid UTF-8 (byte {e.start})") from None

    def optional_text(self, ptr: Any, field: str) -> str | None:
        return None if self.is_null(ptr) else self.text(ptr, f"vlm_options.{field}")

    def count(self, n: int, what: str) -> int:
        if n == 0 or n > MAX_ITEMS:
            raise CapiError(runtime.E_INVALID_ARGUMENT, f"{what} is {n}; give 1 to {MAX_ITEMS}")
        return int(n)

    def image(self, ptr: Any, what: str = "image") -> str | Any:
        """A vlm_image: its path, or its pixels as a PIL image."""
        self.need(ptr, what)
        if not self.is_null(ptr.path):
            return self.text(ptr.path, f"{what}->path")
        if self.is_null(ptr.rgb):
            raise CapiError(runtime.E_INVALID_ARGUMENT, f"{what} has neither a path nor rgb pixels (both NULL)")
        w, h = int(ptr.width), int(ptr.height)
        if w <= 0 or h <= 0:
            raise CapiError(runtime.E_INVALID_ARGUMENT, f"{what} is {w}x{h}: width and height must be positive")
        if w * h > runtime.DEFAULT_MAX_PIXELS:
            return runtime.image_from_rgb(b"", w, h)  # raises the pixel-limit error
        return runtime.image_from_rgb(bytes(self.ffi.buffer(ptr.rgb, w * h * 3)), w, h)

    def options(self, ptr: Any) -> runtime.OpenOptions:
        if self.is_null(ptr):
            return runtime.OpenOptions()
        # An ABI 1 caller's struct ends at max_tiles, an ABI 2 caller's at select: later fields are not read.
        abi = ptr.abi_version
        json_schema = self.optional_text(ptr.json_schema, "json_schema") if abi >= 3 else None
        grammar = self.optional_text(ptr.grammar, "grammar") if abi >= 3 else None
        return runtime.OpenOptions.from_c(
            ptr.abi_version,
            ptr.n_threads,
            ptr.n_gpu_layers,
            ptr.n_ctx,
            ptr.seed,
            ptr.max_tokens,
            ptr.temperature,
            ptr.top_p,
            ptr.detail,
            ptr.max_tiles,
            best_of=ptr.best_of if abi >= 2 else 0,
            select=ptr.select if abi >= 2 else 0,
            json_schema=json_schema,
            grammar=grammar,
        )

    # -- results -------------------------------------------------------------------------------

    def put_size(self, needed: Any, n: int) -> None:
        if not self.is_null(needed):
            needed[0] = n

    def write_text(self, text: str, out: Any, out_size: int, needed: Any) -> int:
        data = text.encode("utf-8")
        self.put_size(needed, len(data) + 1)
        if self.is_null(out):
            if out_size:
                raise CapiError(runtime.E_INVALID_ARGUMENT, "out is NULL but out_size is not 0")
            raise CapiError(runtime.E_BUFFER_TOO_SMALL, f"the text takes {len(data) + 1} bytes; out is NULL")
        if out_size < len(data) + 1:
            if out_size > 0:
                part = _utf8_prefix(data, out_size - 1)
                self.ffi.memmove(out, part + b"\0", len(part) + 1)
            raise CapiError(
                runtime.E_BUFFER_TOO_SMALL, f"the text takes {len(data) + 1} bytes, the buffer holds {out_size}"
            )
        self.ffi.memmove(out, data + b"\0", len(data) + 1)
        return runtime.OK

    def check_floats(self, out: Any, out_len: int, n: int, needed: Any) -> None:
        """Before computing: is there room for n floats?"""
        self.put_size(needed, n)
        if self.is_null(out) and out_len:
            raise CapiError(runtime.E_INVALID_ARGUMENT, "out is NULL but its length is not 0")
        if self.is_null(out) or out_len < n:
            raise CapiError(runtime.E_BUFFER_TOO_SMALL, f"the result takes {n} floats, the buffer holds {out_len}")

    def write_floats(self, values: np.ndarray, out: Any) -> int:
        data = np.ascontiguousarray(values, dtype=np.float32)
        self.ffi.memmove(out, data.tobytes(), data.nbytes)
        return runtime.OK


def _write_error(ffi: Any, err: Any, message: str) -> None:
    if err == ffi.NULL:
        return
    data = _utf8_prefix(message.encode("utf-8", errors="replace"), ERROR_MAX - 1)
    ffi.memmove(err, data + b"\0", len(data) + 1)


def install(ffi: Any, lib: Any) -> None:
    """Define the extern "Python" functions of the library (called by its init code)."""
    x = _Exports(ffi)
    debug = debugging()

    def export(name: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
        """Register fn as `name`; exceptions become a status and a message in fn's last argument."""

        def wrap(fn: Callable[..., int]) -> Callable[..., int]:
            @functools.wraps(fn)
            def call(*args: Any) -> int:
                err = args[-1]
                try:
                    return fn(*args[:-1])
                except BaseException as e:  # nothing may escape into C
                    status, message = runtime.status_of(e)
                    if debug or status == runtime.E_RUNTIME:
                        traceback.print_exc(file=sys.stderr)
                    _write_error(ffi, err, message)
                    return status

            ffi.def_extern(name=name, error=runtime.E_RUNTIME)(call)
            return call

        return wrap

    @export("_vlm_py_open")
    def open_(model: Any, opts: Any, out: Any) -> int:
        x.need(out, "out")
        spec = x.text(model, "model")
        options = x.options(opts)
        out[0] = handles.open(spec, options)
        return runtime.OK

    @export("_vlm_py_close")
    def close(h: int) -> int:
        handles.close(h)
        return runtime.OK

    @export("_vlm_py_kind")
    def kind(h: int, out: Any) -> int:
        x.need(out, "kind")
        with handles.use(h) as handle:
            out[0] = handle.kind_code
        return runtime.OK

    def answer(
        run: Callable[[Callable[[str], bool | None] | None], str],
        out: Any,
        out_size: int,
        needed: Any,
        on_token: Any,
        user_data: Any,
    ) -> int:
        """`run(forward)`'s answer written to out, or streamed to on_token (non-zero from it stops)."""
        if x.is_null(on_token):
            if x.is_null(out) and out_size:
                raise CapiError(runtime.E_INVALID_ARGUMENT, "out is NULL but out_size is not 0")
            return x.write_text(run(None), out, out_size, needed)

        def forward(piece: str) -> bool | None:
            data = piece.encode("utf-8")
            keep_going = on_token(ffi.new("char[]", data), len(data), user_data) == 0
            return None if keep_going else False

        run(forward)
        return runtime.OK

    @export("_vlm_py_ask")
    def ask(
        h: int,
        image: Any,
        prompt: Any,
        caption: int,
        out: Any,
        out_size: int,
        needed: Any,
        on_token: Any,
        user_data: Any,
    ) -> int:
        with handles.use(h, "vlm") as handle:
            img = x.image(image)
            text_prompt = None if caption else x.text(prompt, "prompt")
            return answer(
                lambda forward: runtime.ask(handle, img, text_prompt, forward),
                out,
                out_size,
                needed,
                on_token,
                user_data,
            )

    @export("_vlm_py_ask_media")
    def ask_media(
        h: int,
        media: Any,
        n_media: int,
        prompt: Any,
        out: Any,
        out_size: int,
        needed: Any,
        on_token: Any,
        user_data: Any,
    ) -> int:
        with handles.use(h, "vlm") as handle:
            count = x.count(n_media, "n_media") if n_media else 0  # none: a text-only prompt
            if count:
                x.need(media, "media")
            items = [x.image(media + i, f"media[{i}]") for i in range(count)]
            text_prompt = x.text(prompt, "prompt")
            return answer(
                lambda forward: runtime.ask_media(handle, items, text_prompt, forward),
                out,
                out_size,
                needed,
                on_token,
                user_data,
            )

    @export("_vlm_py_embedding_size")
    def embedding_size(h: int, dim: Any) -> int:
        x.need(dim, "dim")
        with handles.use(h, "clip") as handle:
            dim[0] = runtime.embedding_size(handle)
        return runtime.OK

    @export("_vlm_py_embed_images")
    def embed_images(h: int, images: Any, n: int, out: Any, out_len: int, needed: Any) -> int:
        with handles.use(h, "clip") as handle:
            x.need(images, "images")
            count = x.count(n, "n_images")
            x.check_floats(out, out_len, count * runtime.embedding_size(handle), needed)
            inputs = [x.image(images + i, f"images[{i}]") for i in range(count)]
            return x.write_floats(runtime.embed_images(handle, inputs), out)

    @export("_vlm_py_embed_texts")
    def embed_texts(h: int, texts: Any, n: int, out: Any, out_len: int, needed: Any) -> int:
        with handles.use(h, "clip") as handle:
            x.need(texts, "texts")
            count = x.count(n, "n_texts")
            x.check_floats(out, out_len, count * runtime.embedding_size(handle), needed)
            inputs = [x.text(texts[i], f"texts[{i}]") for i in range(count)]
            return x.write_floats(runtime.embed_texts(handle, inputs), out)

    @export("_vlm_py_classify")
    def classify(h: int, image: Any, labels: Any, n_labels: int, scores: Any, scores_len: int, needed: Any) -> int:
        with handles.use(h, "clip") as handle:
            x.need(labels, "labels")
            count = x.count(n_labels, "n_labels")
            x.check_floats(scores, scores_len, count, needed)
            img = x.image(image)
            names = [x.text(labels[i], f"labels[{i}]") for i in range(count)]
            return x.write_floats(runtime.classify(handle, img, names), scores)
