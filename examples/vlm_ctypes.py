"""Call libvlm through ctypes: the C API from any program that can load a shared library.

    vlm lib build --out lib
    python examples/vlm_ctypes.py lib ask MODEL IMAGE "What is in this image?" [--rgb] [-n MAX_TOKENS]
    python examples/vlm_ctypes.py lib embed MODEL IMAGE [TEXT...]
    python examples/vlm_ctypes.py lib classify MODEL IMAGE LABEL [LABEL...]

--rgb decodes the image with Pillow and passes its pixels (vlm_image.rgb) instead of the path.
Run it with the Python the library was built from: the library embeds that interpreter, and a
different Python in the same process would clash with it. (From Python you can of course import
vlmcli directly; this script shows the ABI as C, Julia or Rust see it.)
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

VLM_ABI_VERSION = 2
VLM_OK = 0
VLM_E_BUFFER_TOO_SMALL = -3


class VlmOptions(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_uint32),
        ("n_threads", ctypes.c_int32),
        ("n_gpu_layers", ctypes.c_int32),
        ("n_ctx", ctypes.c_int32),
        ("seed", ctypes.c_uint32),
        ("max_tokens", ctypes.c_int32),
        ("temperature", ctypes.c_float),
        ("top_p", ctypes.c_float),
        ("detail", ctypes.c_int32),
        ("max_tiles", ctypes.c_int32),
        ("best_of", ctypes.c_int32),
        ("select", ctypes.c_int32),
    ]


class VlmImage(ctypes.Structure):
    _fields_ = [
        ("path", ctypes.c_char_p),
        ("rgb", ctypes.POINTER(ctypes.c_uint8)),
        ("width", ctypes.c_int32),
        ("height", ctypes.c_int32),
    ]


def load(lib_dir: str) -> ctypes.CDLL:
    name = "libvlm.dylib" if sys.platform == "darwin" else "libvlm.so"
    lib = ctypes.CDLL(str(Path(lib_dir) / name))
    h, st, sz = ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
    img_p, float_p, size_p = ctypes.POINTER(VlmImage), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(sz)
    sigs = {
        "vlm_version": (ctypes.c_char_p, []),
        "vlm_abi_version": (ctypes.c_uint32, []),
        "vlm_last_error": (ctypes.c_char_p, [h]),
        "vlm_status_name": (ctypes.c_char_p, [ctypes.c_int]),
        "vlm_open": (h, [ctypes.c_char_p, ctypes.POINTER(VlmOptions)]),
        "vlm_close": (st, [h]),
        "vlm_ask": (st, [h, img_p, ctypes.c_char_p, ctypes.c_char_p, sz, size_p]),
        "vlm_embedding_size": (st, [h, size_p]),
        "vlm_embed_images": (st, [h, img_p, sz, float_p, sz, size_p]),
        "vlm_embed_texts": (st, [h, ctypes.POINTER(ctypes.c_char_p), sz, float_p, sz, size_p]),
        "vlm_classify": (st, [h, img_p, ctypes.POINTER(ctypes.c_char_p), sz, float_p, sz, size_p]),
    }
    for fname, (restype, argtypes) in sigs.items():
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.vlm_abi_version() < VLM_ABI_VERSION:  # a newer library still reads this script's ABI 2 options
        raise SystemExit(f"this script speaks ABI {VLM_ABI_VERSION}; the library is {lib.vlm_version().decode()}")
    return lib


class VlmFailure(Exception):
    pass


def check(lib: ctypes.CDLL, handle: int, status: int, what: str) -> None:
    if status != VLM_OK:
        name = lib.vlm_status_name(status).decode()
        raise VlmFailure(f"{what}: {name}: {lib.vlm_last_error(handle).decode()}")


def make_image(path: str, rgb: bool) -> tuple[VlmImage, object]:
    """A vlm_image and the object that must stay alive while the library reads it."""
    if not rgb:
        return VlmImage(path.encode(), None, 0, 0), None
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        pixels = ImageOps.exif_transpose(im).convert("RGB")
    data = (ctypes.c_uint8 * (pixels.width * pixels.height * 3)).from_buffer_copy(pixels.tobytes())
    return VlmImage(None, data, pixels.width, pixels.height), data


def ask(lib: ctypes.CDLL, args: argparse.Namespace) -> None:
    opts = VlmOptions(
        abi_version=VLM_ABI_VERSION,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        best_of=args.best_of,
        select={"logprob": 0, "vote": 1}[args.select],
    )
    h = lib.vlm_open(args.model.encode(), ctypes.byref(opts))
    if h < 0:
        check(lib, h, h, "vlm_open")
    try:
        image, keep = make_image(args.image, args.rgb)
        needed = ctypes.c_size_t(0)
        out = ctypes.create_string_buffer(4096)
        st = lib.vlm_ask(h, ctypes.byref(image), args.prompt.encode(), out, len(out), ctypes.byref(needed))
        if st == VLM_E_BUFFER_TOO_SMALL:  # a long answer: make room and ask again
            out = ctypes.create_string_buffer(needed.value)
            st = lib.vlm_ask(h, ctypes.byref(image), args.prompt.encode(), out, len(out), ctypes.byref(needed))
        check(lib, h, st, "vlm_ask")
        print(out.value.decode("utf-8"))
    finally:
        lib.vlm_close(h)


def _open_clip(lib: ctypes.CDLL, model: str) -> tuple[int, int]:
    h = lib.vlm_open(model.encode(), None)
    if h < 0:
        check(lib, h, h, "vlm_open")
    dim = ctypes.c_size_t(0)
    check(lib, h, lib.vlm_embedding_size(h, ctypes.byref(dim)), "vlm_embedding_size")
    return h, dim.value


def embed(lib: ctypes.CDLL, args: argparse.Namespace) -> None:
    h, dim = _open_clip(lib, args.model)
    try:
        image, keep = make_image(args.image, args.rgb)
        vec = (ctypes.c_float * dim)()
        check(lib, h, lib.vlm_embed_images(h, ctypes.byref(image), 1, vec, dim, None), "vlm_embed_images")
        print("image", args.image)
        print(" ".join(f"{v:.9g}" for v in vec))
        if args.texts:
            texts = (ctypes.c_char_p * len(args.texts))(*[t.encode() for t in args.texts])
            out = (ctypes.c_float * (dim * len(args.texts)))()
            check(lib, h, lib.vlm_embed_texts(h, texts, len(args.texts), out, len(out), None), "vlm_embed_texts")
            for i, t in enumerate(args.texts):
                print("text", t)
                print(" ".join(f"{v:.9g}" for v in out[i * dim : (i + 1) * dim]))
    finally:
        lib.vlm_close(h)


def classify(lib: ctypes.CDLL, args: argparse.Namespace) -> None:
    h, _ = _open_clip(lib, args.model)
    try:
        image, keep = make_image(args.image, args.rgb)
        labels = (ctypes.c_char_p * len(args.labels))(*[t.encode() for t in args.labels])
        scores = (ctypes.c_float * len(args.labels))()
        st = lib.vlm_classify(h, ctypes.byref(image), labels, len(args.labels), scores, len(scores), None)
        check(lib, h, st, "vlm_classify")
        for label, score in zip(args.labels, scores):
            print(f"{score:.9g}\t{label}")
    finally:
        lib.vlm_close(h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lib_dir", help="the folder `vlm lib build --out` wrote")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ask")
    a.add_argument("model")
    a.add_argument("image")
    a.add_argument("prompt")
    a.add_argument("-n", "--max-tokens", type=int, default=0)
    a.add_argument("-t", "--temperature", type=float, default=0.0)
    a.add_argument("-s", "--seed", type=int, default=0)
    a.add_argument("--best-of", type=int, default=0)
    a.add_argument("--select", choices=["logprob", "vote"], default="logprob")
    e = sub.add_parser("embed")
    e.add_argument("model")
    e.add_argument("image")
    e.add_argument("texts", nargs="*")
    c = sub.add_parser("classify")
    c.add_argument("model")
    c.add_argument("image")
    c.add_argument("labels", nargs="+")
    for sp in (a, e, c):
        sp.add_argument("--rgb", action="store_true", help="pass decoded pixels instead of the path")
    args = p.parse_args(argv)
    lib = load(args.lib_dir)
    try:
        {"ask": ask, "embed": embed, "classify": classify}[args.command](lib, args)
    except VlmFailure as err:
        print(f"vlm_ctypes: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
