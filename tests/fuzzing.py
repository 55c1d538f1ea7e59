"""Seeded, bounded mutation fuzzing of what vlmcli reads: model files, images, texts.

Shared by tests/test_fuzz.py (CI: a small corpus touching every numeric key of each kind of model
file) and benchmarks/fuzz_campaign.py (thousands of mutations). Nothing here is random unless seeded:
the same seed gives the same corpus.

- Model files: a GGUF header is parsed into its fields (each key/value, each tensor info) with their
  byte ranges, and a mutation re-serialises one field (a hostile value, another GGUF type, the key
  removed, an array cut short; a tensor's dimension, dimension count, type or offset), keeping the
  tensor data behind the header and its alignment.
- Images: bit flips, truncation, PNG headers with other sizes (CRC fixed), and generated extreme
  shapes (1 x 20000, 20000 x 1, 1 x 1, ...).
- Texts: long words, whitespace runs, control characters, lone surrogates, special tokens, markup.

Every job runs in a child process (one per batch, see `run_jobs`) under RLIMIT_AS, which calls the
engines directly, the way the tasks do. The parent classifies each job: "accepted" (it worked),
"refused" (a VlmError: the message must be one line and, for a model file, name that file), "bug"
(any other exception: its traceback) or "crashed" (the child died: a signal, an abort, a hang).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent

# --------------------------------------------------------------------------------------------------
# GGUF layout

SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
INT_TYPES = {
    0: (0, 255),
    1: (-128, 127),
    2: (0, 65535),
    3: (-32768, 32767),
    4: (0, 2**32 - 1),
    5: (-(2**31), 2**31 - 1),
    10: (0, 2**64 - 1),
    11: (-(2**63), 2**63 - 1),
}
FLOAT_TYPES = {6, 12}
BOOL, STRING, ARRAY = 7, 8, 9


@dataclass
class KV:
    key: str
    start: int  # offset of the key's length prefix
    type_at: int  # offset of the value type
    end: int  # end of the value
    vtype: int
    itype: int | None = None
    count: int = 0  # array length
    value: Any = None  # scalars and numeric arrays (strings: the string; string arrays: None)


@dataclass
class TensorInfo:
    name: str
    dims_at: int  # offset of n_dims
    end: int
    dims: list[int]
    type: int
    offset: int


@dataclass
class Layout:
    raw: bytes
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    infos_end: int  # end of the tensor infos
    data_start: int
    alignment: int

    @property
    def data(self) -> bytes:
        return self.raw[self.data_start :]

    def kv(self, key: str) -> KV | None:
        return next((k for k in self.kvs if k.key == key), None)


def parse_gguf(raw: bytes) -> Layout:
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        v = struct.unpack_from(fmt, raw, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = raw[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    assert raw[:4] == b"GGUF"
    pos = 4
    version = take("<I")
    n_tensors, n_kv = take("<Q"), take("<Q")
    kvs = []
    for _ in range(n_kv):
        start = pos
        key = string()
        type_at = pos
        vtype = take("<I")
        kv = KV(key, start, type_at, 0, vtype)
        if vtype in SCALAR_FMT:
            kv.value = take(SCALAR_FMT[vtype])
        elif vtype == STRING:
            kv.value = string()
        elif vtype == ARRAY:
            kv.itype, kv.count = take("<I"), take("<Q")
            if kv.itype in SCALAR_FMT:
                fmt = SCALAR_FMT[kv.itype]
                kv.value = list(struct.unpack_from(f"<{kv.count}{fmt[1]}", raw, pos))
                pos += struct.calcsize(fmt) * kv.count
            elif kv.itype == STRING:
                for _ in range(kv.count):
                    n = take("<Q")
                    pos += n
            else:
                raise ValueError(f"array of {kv.itype}")
        else:
            raise ValueError(f"type {vtype}")
        kv.end = pos
        kvs.append(kv)
    tensors = []
    for _ in range(n_tensors):
        name = string()
        at = pos
        n_dims = take("<I")
        dims = [take("<Q") for _ in range(n_dims)]
        ttype, offset = take("<I"), take("<Q")
        tensors.append(TensorInfo(name, at, pos, dims, ttype, offset))
    align_kv = next((k for k in kvs if k.key == "general.alignment"), None)
    alignment = int(align_kv.value) if align_kv is not None else 32
    data_start = (pos + alignment - 1) // alignment * alignment
    return Layout(raw, version, kvs, tensors, pos, data_start, alignment)


def _encode_value(vtype: int, value: Any) -> bytes:
    if vtype in SCALAR_FMT:
        return struct.pack("<I", vtype) + struct.pack(SCALAR_FMT[vtype], value)
    if vtype == STRING:
        b = value.encode("utf-8", errors="surrogateescape")
        return struct.pack("<I", vtype) + struct.pack("<Q", len(b)) + b
    raise ValueError(vtype)


def _encode_array(itype: int, values: list[Any]) -> bytes:
    fmt = SCALAR_FMT[itype]
    return struct.pack("<IIQ", ARRAY, itype, len(values)) + struct.pack(f"<{len(values)}{fmt[1]}", *values)


def rebuild(layout: Layout, header: bytes) -> bytes:
    """A file with this header (magic .. tensor infos) and the original tensor data, realigned."""
    a = layout.alignment
    pad = (-len(header)) % a
    return header + b"\0" * pad + layout.data


def splice(layout: Layout, start: int, end: int, new: bytes, kv_delta: int = 0) -> bytes:
    header = layout.raw[:start] + new + layout.raw[end : layout.infos_end]
    if kv_delta:
        n_kv = struct.unpack_from("<Q", header, 16)[0] + kv_delta
        header = header[:16] + struct.pack("<Q", n_kv) + header[24:]
    return rebuild(layout, header)


# --------------------------------------------------------------------------------------------------
# Hostile values


def hostile_ints(orig: int, lo: int, hi: int) -> list[int]:
    cands = [
        0,
        1,
        2,
        3,
        5,
        7,
        8,
        16,
        100,
        1000,
        4096,
        65535,
        65536,
        2**31 - 1,
        2**31,
        2**32 - 1,
        2**63 - 1,
        -1,
        -2,
        -(2**31),
        orig - 1,
        orig + 1,
        orig * 2,
        orig // 2,
        orig * 1000,
        orig + 3,
    ]
    return sorted({c for c in cands if lo <= c <= hi and c != orig})


def hostile_floats(orig: float) -> list[float]:
    return [
        0.0,
        -0.0,
        -1.0,
        math.nan,
        math.inf,
        -math.inf,
        1e-45,
        1e-12,
        1e30,
        3.4e38,
        orig * 10,
        orig / 10,
        -orig,
        1.0,
    ]


def _float_ok(vtype: int, v: float) -> bool:
    if vtype == 6 and math.isfinite(v) and abs(v) > 3.4e38:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Mutations of one model file


@dataclass
class Mutation:
    kind: str  # llm | mmproj | clip (the file kind)
    target: str  # the key or tensor mutated
    op: str  # value | retype | delete | element | cut | dim | ndims | ttype | offset
    detail: str  # what was done, for reports
    data: bytes = field(repr=False, default=b"")


def numeric_keys(layout: Layout) -> list[KV]:
    """Every key whose value is a number or a bool, or an array of numbers."""
    return [k for k in layout.kvs if k.vtype in SCALAR_FMT or (k.vtype == ARRAY and k.itype in SCALAR_FMT)]


def string_keys(layout: Layout) -> list[KV]:
    """Every key whose value is a string or an array of strings (names, vocabularies, the template)."""
    return [k for k in layout.kvs if k.vtype == STRING or (k.vtype == ARRAY and k.itype == STRING)]


def string_items(layout: Layout, kv: KV) -> list[bytes]:
    pos = kv.type_at + 4 + 4 + 8
    out = []
    for _ in range(kv.count):
        n = struct.unpack_from("<Q", layout.raw, pos)[0]
        out.append(layout.raw[pos + 8 : pos + 8 + n])
        pos += 8 + n
    return out


def _encode_string_array(items: list[bytes]) -> bytes:
    return struct.pack("<IIQ", ARRAY, STRING, len(items)) + b"".join(struct.pack("<Q", len(b)) + b for b in items)


HOSTILE_STRINGS = [
    "",
    " ",
    "idefics3",
    "llama",
    "gpt2",
    "\x00",
    "{% if %}",
    "{{ messages[0]['content'][5] }}",
    "<__media__>",
    "x" * 300,
    "\udcff",
    "clip",
    "mlp",
    "none",
]


def mutate_string_kv(layout: Layout, kv: KV, rng: random.Random, kind: str) -> Mutation:
    op = rng.choice(
        ["value", "value", "edit", "retype", "delete"]
        if kv.vtype == STRING
        else ["item", "item", "dup", "cut", "delete"]
    )
    if op == "delete":
        return Mutation(kind, kv.key, op, "removed", splice(layout, kv.start, kv.end, b"", kv_delta=-1))
    if kv.vtype == STRING:
        text = kv.value
        if op == "value":
            new = rng.choice(HOSTILE_STRINGS)
        elif op == "edit":  # a character inserted, removed or changed
            i = rng.randint(0, len(text))
            new = text[:i] + rng.choice(["{", "}", "%", "'", "", "\n", "\x00"]) + text[i + rng.choice([0, 1]) :]
        else:
            return Mutation(
                kind, kv.key, op, "string -> uint32", splice(layout, kv.type_at, kv.end, _encode_value(4, len(text)))
            )
        return Mutation(
            kind, kv.key, op, f"= {new[:40]!r}", splice(layout, kv.type_at, kv.end, _encode_value(STRING, new))
        )
    items = string_items(layout, kv)
    if op == "cut":
        n = rng.choice([0, 1, len(items) // 2, max(0, len(items) - 1)])
        items, detail = items[:n], f"{kv.count} -> {n} items"
    elif op == "dup" and len(items) > 1:
        i, j = rng.randrange(len(items)), rng.randrange(len(items))
        items[i], detail = items[j], f"[{i}] = [{j}]"
    else:
        i = rng.randrange(len(items)) if items else 0
        new = rng.choice([b"", b" ", b"\xff\xfe", b"a b c", b"x" * 1000, b"<image>"])
        items = items[:i] + [new] + items[i + 1 :]
        detail = f"[{i}] = {new[:20]!r}"
    return Mutation(kind, kv.key, op, detail, splice(layout, kv.type_at, kv.end, _encode_string_array(items)))


def mutate_kv(layout: Layout, kv: KV, rng: random.Random, kind: str) -> Mutation:
    """One mutation of one key, chosen by rng among what fits its type."""
    ops = ["value", "value", "value", "retype", "delete"]
    if kv.vtype == ARRAY:
        ops = ["element", "element", "cut", "retype", "delete"]
    op = rng.choice(ops)
    if op == "delete":
        return Mutation(kind, kv.key, op, "removed", splice(layout, kv.start, kv.end, b"", kv_delta=-1))
    if kv.vtype == ARRAY:
        values = list(kv.value)
        if op == "cut":
            n = rng.choice([0, 1, max(0, len(values) - 1), len(values) // 2])
            return Mutation(
                kind,
                kv.key,
                op,
                f"{len(values)} -> {n} items",
                splice(layout, kv.type_at, kv.end, _encode_array(kv.itype, values[:n])),
            )
        if op == "retype":
            new_itype = rng.choice([t for t in (4, 5, 6, 0, 12) if t != kv.itype])
            conv = [(_to_type(new_itype, v)) for v in values]
            return Mutation(
                kind,
                kv.key,
                op,
                f"items {kv.itype} -> {new_itype}",
                splice(layout, kv.type_at, kv.end, _encode_array(new_itype, conv)),
            )
        if not values:
            return Mutation(kind, kv.key, "cut", "empty stays empty", layout.raw)
        i = rng.randrange(len(values))
        values[i] = _hostile(kv.itype, values[i], rng)
        return Mutation(
            kind,
            kv.key,
            op,
            f"[{i}] = {values[i]!r}",
            splice(layout, kv.type_at, kv.end, _encode_array(kv.itype, values)),
        )
    if op == "retype":
        choices = [t for t in (0, 1, 4, 5, 6, 7, 10, 11, 12) if t != kv.vtype]
        new = rng.choice(choices)
        v = _to_type(new, kv.value)
        return Mutation(
            kind,
            kv.key,
            op,
            f"type {kv.vtype} -> {new} ({v!r})",
            splice(layout, kv.type_at, kv.end, _encode_value(new, v)),
        )
    v = _hostile(kv.vtype, kv.value, rng)
    return Mutation(kind, kv.key, op, f"= {v!r}", splice(layout, kv.type_at, kv.end, _encode_value(kv.vtype, v)))


def _hostile(vtype: int, orig: Any, rng: random.Random) -> Any:
    if vtype == BOOL:
        return not orig
    if vtype in INT_TYPES:
        lo, hi = INT_TYPES[vtype]
        cands = hostile_ints(int(orig), lo, hi)
        return rng.choice(cands) if rng.random() < 0.85 else rng.randint(lo, min(hi, 2**33))
    cands = [c for c in hostile_floats(float(orig)) if _float_ok(vtype, c)]
    return rng.choice(cands)


def _to_type(vtype: int, v: Any) -> Any:
    if vtype == BOOL:
        return bool(v)
    if vtype in INT_TYPES:
        lo, hi = INT_TYPES[vtype]
        try:
            iv = int(v)
        except (ValueError, OverflowError):
            iv = 0
        return min(hi, max(lo, iv))
    fv = float(v)
    return fv if _float_ok(vtype, fv) else 3.4e38


def mutate_tensor(layout: Layout, t: TensorInfo, rng: random.Random, kind: str) -> Mutation:
    op = rng.choice(["dim", "dim", "ndims", "ttype", "offset"])
    dims, ttype, offset = list(t.dims), t.type, t.offset
    if op == "dim" and dims:
        i = rng.randrange(len(dims))
        dims[i] = rng.choice([0, 1, 2, dims[i] - 1, dims[i] + 1, dims[i] * 2, dims[i] // 2, 3, 2**40, 2**62])
        detail = f"dim {i} = {dims[i]}"
    elif op == "ndims":
        dims = rng.choice([dims[:-1], dims + [1], dims + [2], [], dims[::-1], dims + [1, 1, 1]])
        detail = f"dims {t.dims} -> {dims}"
    elif op == "ttype":
        ttype = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 12, 14, 16, 24, 25, 26, 27, 28, 30, 31, 39, 40, 99, 2**31])
        detail = f"type {t.type} -> {ttype}"
    else:
        offset = rng.choice([offset + layout.alignment, max(0, offset - layout.alignment), offset + 1, 2**40, 0])
        detail = f"offset {t.offset} -> {offset}"
    new = (
        struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset)
    )
    return Mutation(kind, t.name, op, detail, splice(layout, t.dims_at, t.end, new))


def metadata_mutations(
    layout: Layout, kind: str, rng: random.Random, per_key: int = 1, keys: list[str] | None = None
) -> Iterator[Mutation]:
    """`per_key` mutations of every numeric key (or of `keys`)."""
    for kv in numeric_keys(layout):
        if keys is not None and kv.key not in keys:
            continue
        for _ in range(per_key):
            yield mutate_kv(layout, kv, rng, kind)


def tensor_mutations(layout: Layout, kind: str, rng: random.Random, n: int) -> Iterator[Mutation]:
    for _ in range(n):
        yield mutate_tensor(layout, rng.choice(layout.tensors), rng, kind)


def set_value(layout: Layout, key: str, value: Any, kind: str) -> Mutation:
    """One key set to a given value of its own type (the named cases of the issue)."""
    kv = layout.kv(key)
    assert kv is not None, key
    return Mutation(
        kind, key, "value", f"= {value!r}", splice(layout, kv.type_at, kv.end, _encode_value(kv.vtype, value))
    )


# --------------------------------------------------------------------------------------------------
# Images


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A small valid RGB PNG of any size (rows compressed by zlib: 1 x 20000 is a few KB)."""
    rng = random.Random(seed)
    row = bytes(rng.randrange(256) for _ in range(3 * width))
    raw = b"".join(b"\0" + row for _ in range(height))
    return _png(width, height, zlib.compress(raw, 9))


def gray_png(width: int, height: int) -> bytes:
    """A valid mid-grey 8-bit grayscale PNG of any size, compressed as it is made (1 x 64,000,000 is 125 KB,
    made in about a second without holding its pixels)."""
    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * width
    rows_per_block = max(1, (1 << 16) // len(row))
    block = row * rows_per_block
    parts = [z.compress(block) for _ in range(height // rows_per_block)]
    parts += [z.compress(row * (height % rows_per_block)), z.flush()]
    return _png(width, height, b"".join(parts), color_type=0)


def _png(width: int, height: int, idat: bytes, color_type: int = 2) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


EXTREME_SHAPES = [
    (1, 20000),
    (20000, 1),
    (1, 1),
    (2, 9000),
    (9000, 2),
    (3, 3000),
    (1, 2049),
    (2049, 1),
    (1, 4097),
    (5000, 5000),
    (640, 1),
]


def image_mutations(seeds: list[bytes], rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """(description, bytes) of mutated images: flips, cuts, PNG headers of other sizes, extreme shapes."""
    for i in range(n):
        op = rng.choice(["flip", "flip", "cut", "png_size", "shape", "splice"])
        base = rng.choice(seeds)
        if op == "flip":
            b = bytearray(base)
            for _ in range(rng.choice([1, 2, 8, 64])):
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
            yield f"{i}: {rng.randrange(10**6)} bit flips", bytes(b)
        elif op == "cut":
            yield f"{i}: cut", base[: rng.randrange(1, len(base))]
        elif op == "splice":
            j = rng.randrange(len(base))
            yield (
                f"{i}: splice",
                base[:j] + bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 256]))) + base[j:],
            )
        elif op == "png_size":
            w, h = rng.choice(
                [(0, 10), (10, 0), (2**31 - 1, 1), (1, 2**31 - 1), (65535, 65535), (100000, 100000), (7, 5)]
            )
            idat = zlib.compress(b"\0" * 64)
            yield f"{i}: png header {w}x{h}", _png(w, h, idat)
        else:
            w, h = rng.choice(EXTREME_SHAPES)
            yield f"{i}: {w}x{h}", png_bytes(w, h, seed=i)


# --------------------------------------------------------------------------------------------------
# Texts

TEXT_PIECES = [
    "a",
    "cat",
    " ",
    "\u00a0",
    "\t",
    "\n",
    "\x00",
    "\x1b[31m",
    "&amp;",
    "&#9731;",
    "<|endoftext|>",
    "<|startoftext|>",
    "<image>",
    "<__media__>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<row_1_col_1>",
    "<global-img>",
    "\ufeff",
    "\u200b",
    "😂",
    "的",
    "ﬁ",
    "'s",
    "'ll",
    "1",
    "١",
    "é",
    "e\u0301",
    "{{",
    "{%",
    "\U0010ffff",
    "\x85",
    "\u2028",
]
SURROGATES = ["\ud800", "\udfff", "\udc80"]  # what invalid UTF-8 in an argument becomes (surrogateescape)


def text_mutations(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        op = rng.choice(["mix", "mix", "mix", "long_word", "spaces", "repeat", "random", "surrogate"])
        if op == "mix":
            yield "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(1, 40)))
        elif op == "surrogate":
            text = "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(0, 10)))
            i = rng.randint(0, len(text))
            yield text[:i] + rng.choice(SURROGATES) + text[i:]
        elif op == "long_word":
            yield "".join(rng.choice("abcdefghij") for _ in range(rng.choice([1000, 10000, 100000])))
        elif op == "spaces":
            yield "a" + " " * rng.choice([1000, 100000]) + "b"
        elif op == "repeat":
            yield rng.choice(TEXT_PIECES) * rng.choice([10, 1000, 20000])
        else:
            yield "".join(
                chr(
                    rng.choice(
                        [
                            rng.randrange(0x20, 0x7F),
                            rng.randrange(0x80, 0x3000),
                            rng.randrange(0xE000, 0x10000),
                            rng.randrange(0x10000, 0x10FFFF),
                        ]
                    )
                )
                for _ in range(rng.randint(1, 200))
            )


# --------------------------------------------------------------------------------------------------
# Running jobs in children


@dataclass
class Job:
    kind: str  # llm | mmproj | clip | image | text; index | query | video | multi | schema | grammar (fuzz_kinds.py)
    desc: str
    path: str = ""  # the file (model, image, index, video, schema, grammar)
    text: str = ""  # for text jobs (may hold lone surrogates: JSON-escaped)
    args: list[str] = field(default_factory=list)  # a `vlm` command line, run in the child through vlmcli.cli.main
    lock: float = 0.0  # seconds another connection holds an exclusive SQLite lock on `path` as the command starts


@dataclass
class Result:
    job: Job
    outcome: str  # accepted | refused | bug | crashed
    message: str = ""
    seconds: float = 0.0  # time the job took in the child
    rss_kb: int = 0  # the child's peak RSS after the job
    grew: bool = False  # the job raised that peak


@dataclass
class Models:
    """The good files the child pairs a mutated one with."""

    llm: str
    mmproj: str
    clip: str
    image: str  # a small good image for model jobs


# Address space of a child: llama.cpp, ggml, numpy and PIL together map about 1 GB on a CPU build. A GPU
# build's driver may reserve far more virtual memory at load: raise it there with VLM_FUZZ_RLIMIT_GB.
DEFAULT_RLIMIT_AS = int(float(os.environ.get("VLM_FUZZ_RLIMIT_GB", "4")) * 2**30)


def run_jobs(
    jobs: list[Job],
    models: Models,
    *,
    rlimit_as: int = DEFAULT_RLIMIT_AS,
    job_timeout: float = 120.0,
    batch: int = 1000,
    env: dict[str, str] | None = None,
) -> tuple[list[Result], dict[str, Any]]:
    """Run the jobs in child processes (a new one after a crash or every `batch` jobs); one Result per job.

    Returns the results in job order and stats: children started, peak RSS of any child (KB)."""
    results: dict[int, Result] = {}
    stats = {"children": 0, "max_rss_kb": 0}
    todo = list(range(len(jobs)))
    while todo:
        chunk, todo = todo[:batch], todo[batch:]
        done, crashed_at, rss, stderr = _run_child([jobs[i] for i in chunk], models, rlimit_as, job_timeout, env or {})
        stats["children"] += 1
        stats["max_rss_kb"] = max(stats["max_rss_kb"], rss)
        for local, r in done.items():
            results[chunk[local]] = r
        if crashed_at is not None:
            i = chunk[crashed_at]
            results[i] = Result(jobs[i], "crashed", stderr[-2000:])
            todo = chunk[crashed_at + 1 :] + todo
        else:
            missing = [k for k in range(len(chunk)) if k not in done]
            for k in missing:  # the child ended early without a crash mark: count as crashed
                results[chunk[k]] = Result(jobs[chunk[k]], "crashed", stderr[-2000:])
    return [results[i] for i in range(len(jobs))], stats


def _run_child(
    jobs: list[Job], models: Models, rlimit_as: int, job_timeout: float, extra_env: dict[str, str]
) -> tuple[dict[int, Result], int | None, int, str]:
    payload = json.dumps({"jobs": [asdict(j) for j in jobs], "models": asdict(models)})
    r_fd, w_fd = os.pipe()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "0", **extra_env}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import fuzzing; fuzzing.child_main({w_fd})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(w_fd,),
        preexec_fn=limit,
        env=env,
        cwd=str(TESTS_DIR),
    )
    os.close(w_fd)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(payload.encode("utf-8", errors="surrogatepass"))
    proc.stdin.close()
    os.set_blocking(proc.stderr.fileno(), False)
    done: dict[int, Result] = {}
    started: int | None = None
    rss = 0
    buf = b""
    err = b""
    last = time.monotonic()
    timed_out = False
    with os.fdopen(r_fd, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe, proc.stderr], [], [], 1.0)
            if proc.stderr in ready:
                chunk = proc.stderr.read() or b""
                err = (err + chunk)[-20000:]
            if pipe in ready:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    last = time.monotonic()
                    if msg["event"] == "start":
                        started = msg["i"]
                    elif msg["event"] == "done":
                        done[msg["i"]] = Result(
                            jobs[msg["i"]], msg["outcome"], msg["message"], msg["seconds"], msg["rss_kb"], msg["grew"]
                        )
                        started = None
                    elif msg["event"] == "end":
                        rss = msg["max_rss_kb"]
            if time.monotonic() - last > job_timeout:
                timed_out = True
                proc.kill()
                break
    proc.wait()
    try:
        err += proc.stderr.read() or b""
    except (OSError, ValueError):
        pass
    proc.stderr.close()
    stderr = err.decode("utf-8", errors="replace")
    crashed_at = started if (proc.returncode != 0 or timed_out or started is not None) else None
    if crashed_at is not None:
        why = f"exit status {proc.returncode}"
        if proc.returncode is not None and proc.returncode < 0:
            why = f"killed by {signal.Signals(-proc.returncode).name}"
        if timed_out:  # killed here: a hang, whatever the signal says
            why = "timed out"
        stderr = f"[{why}] {stderr}"
    return done, crashed_at, rss, stderr


def child_main(fd: int) -> None:
    """In the child: run each job, reporting start and outcome on `fd` (before and after, so a crash
    is pinned on its job)."""
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass"))
    jobs = [Job(**j) for j in payload["jobs"]]
    runner = _Runner(Models(**payload["models"]))
    out = os.fdopen(fd, "wb", buffering=0)

    def send(msg: dict) -> None:
        out.write(json.dumps(msg).encode() + b"\n")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, job in enumerate(jobs):
        send({"event": "start", "i": i})
        t0 = time.perf_counter()
        outcome, message = runner.run(job)
        seconds = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        done = {"event": "done", "i": i, "outcome": outcome, "message": message, "seconds": seconds}
        send({**done, "rss_kb": rss, "grew": rss > peak})
        peak = rss
    runner.close()
    send({"event": "end", "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
    out.close()


class _Runner:
    """Calls the engines the way the tasks do; keeps the good models loaded across jobs."""

    def __init__(self, models: Models):
        self.models = models
        self._vlm_model = None
        self._clip_model = None

    def close(self) -> None:
        for m in (self._vlm_model, self._clip_model):
            if m is not None:
                m.close()

    def run(self, job: Job) -> tuple[str, str]:
        from vlmcli.errors import VlmError

        if job.args:
            return _run_cli(job)
        try:
            getattr(self, f"_{job.kind}")(job)
            return "accepted", ""
        except VlmError as e:
            if e.path is None and job.kind == "image":
                e.path = job.path  # as the tasks do: an image error is about the image
            return "refused", str(e)
        except Exception:  # the point: anything else is a bug
            return "bug", traceback.format_exc()

    # the good models, loaded once
    def vlm(self):
        if self._vlm_model is None:
            from vlmcli.engines.llama import VlmEngine

            self._vlm_model = VlmEngine(self.models.llm, self.models.mmproj, _vlm_options())
        return self._vlm_model

    def clip(self):
        if self._clip_model is None:
            from vlmcli.engines.clip import ClipModel

            self._clip_model = ClipModel.load(self.models.clip, n_threads=1, batch_size=4)
        return self._clip_model

    def _image_of(self, path: str):
        from vlmcli.images import load_image

        return load_image(path)

    # one job kind each
    def _llm(self, job: Job) -> None:
        self._ask(job.path, self.models.mmproj)

    def _mmproj(self, job: Job) -> None:
        self._ask(self.models.llm, job.path)

    def _ask(self, llm: str, mmproj: str, detail: str = "low") -> None:
        from vlmcli.engines.llama import GenerationOptions, VlmEngine

        with VlmEngine(llm, mmproj, _vlm_options(detail)) as engine:
            next(engine.ask(self._image_of(self.models.image), ["What is this?"], GenerationOptions(max_tokens=2)))

    def _clip_job(self, model, text: str | None, image_path: str | None) -> None:
        import numpy as np

        from vlmcli.engines.clip_preprocess import draft_size, preprocess
        from vlmcli.engines.clip_tokenizer import ClipTokenizer
        from vlmcli.images import load_image

        cfg = model.config
        if text is not None:
            tok = ClipTokenizer(cfg.merges, cfg.tokens or None, bos_id=cfg.bos_id, eos_id=cfg.eos_id)
            ids, _ = tok.tokenize([text], cfg.context_length)
            vec = model.encode_texts(ids)
            assert np.isfinite(vec).all(), "text embedding is not finite"
        if image_path is not None:
            image = load_image(image_path, draft=draft_size(cfg.image_size))
            pixels = preprocess(image, cfg.image_size, cfg.image_mean, cfg.image_std)
            vec = model.encode_images(pixels[None])
            assert vec.shape == (1, cfg.projection_dim)

    def _clip(self, job: Job) -> None:
        from vlmcli.engines.clip import ClipModel

        with ClipModel.load(job.path, n_threads=1, batch_size=4) as model:
            self._clip_job(model, "a photo of a cat", self.models.image)

    def _image(self, job: Job) -> None:
        from vlmcli.engines.llama import GenerationOptions

        self._clip_job(self.clip(), None, job.path)
        image = self._image_of(job.path)
        next(self.vlm().ask(image, ["What is this?"], GenerationOptions(max_tokens=1)))

    def _text(self, job: Job) -> None:
        from vlmcli.engines.llama import GenerationOptions

        self._clip_job(self.clip(), job.text, None)
        image = self._image_of(self.models.image)
        next(self.vlm().ask(image, [job.text], GenerationOptions(max_tokens=1)))


def _run_cli(job: Job) -> tuple[str, str]:
    """The command line in this process, its stdout, stderr and C-level stderr captured; the outcome
    from its exit status and what it printed (classify_cli)."""
    import contextlib
    import io
    import sqlite3
    import tempfile

    from vlmcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    lock = None
    if job.lock:  # another connection holding the file (SQLite locks it against this process's others too),
        # as a concurrent writer does for a while
        lock = sqlite3.connect(job.path, isolation_level=None, check_same_thread=False)
        lock.execute("PRAGMA locking_mode=EXCLUSIVE")
        lock.execute("BEGIN EXCLUSIVE")
        threading.Timer(job.lock, lock.close).start()
    with tempfile.TemporaryFile() as native:
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        code: int
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(list(job.args))
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:  # main() lets nothing out but SystemExit: anything else is a bug
                    return "bug", traceback.format_exc()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        native.seek(0)
        printed = err.getvalue() + native.read().decode("utf-8", errors="replace")
    return classify_cli(code, printed)


def classify_cli(code: int, stderr: str) -> tuple[str, str]:
    """accepted (exit 0), refused (an error the CLI worded), bug (a traceback, or an exception the CLI
    did not expect: its `(run with --debug for details)` line). The message keeps every stderr line
    for problems() to check."""
    if "Traceback (most recent call last)" in stderr or "(run with --debug for details)" in stderr:
        return "bug", stderr.strip()[-1500:]
    if code == 0:
        return "accepted", stderr.strip()[-1500:]
    if code == 2 and "vlm: error:" not in stderr:  # Typer's usage box: an option the generator made up
        return "refused", "usage: " + " ".join(stderr.split())[-300:]
    return "refused", stderr.strip()[-4000:]


def _vlm_options(detail: str = "auto"):
    from vlmcli.engines.llama import EngineOptions

    return EngineOptions(n_threads=1, n_ctx=2048, detail=detail)


# --------------------------------------------------------------------------------------------------
# Checking results


# A refusal quotes what it is about, not the file's contents (a misread name was once 29 MB of stderr).
MAX_MESSAGE_CHARS = 1000


def problems(results: list[Result]) -> list[str]:
    """What is wrong with a list of results: bugs, crashes, and refusals that are not one named line."""
    bad = []
    for r in results:
        j = r.job
        where = f"{j.kind} {j.desc}"
        if r.seconds > MAX_JOB_SECONDS:
            bad.append(f"{where}: took {r.seconds:.0f} s")
        if r.grew and r.rss_kb * 1024 > MAX_JOB_RSS:
            bad.append(f"{where}: the child's peak memory rose to {r.rss_kb // 1024} MB")
        if j.args:
            bad += _cli_problems(r, where)
            continue
        if r.outcome in ("bug", "crashed"):
            bad.append(f"{where}: {r.outcome}: {r.message.strip()[-1500:]}")
        elif r.outcome == "refused":
            if "\n" in r.message.strip() or not r.message.strip():
                bad.append(f"{where}: refusal is not one line: {r.message[:2000]!r}")
            elif len(r.message) > MAX_MESSAGE_CHARS:
                bad.append(f"{where}: refusal is {len(r.message):,} characters: {r.message[:300]!r}")
            elif j.kind in ("llm", "mmproj", "clip", "image") and Path(j.path).name not in r.message:
                bad.append(f"{where}: refusal does not name {Path(j.path).name}: {r.message!r}")
    return bad


def _cli_problems(r: Result, where: str) -> list[str]:
    """A command line's outcome: a bug or crash, or stderr that is more than `vlm:` lines (library
    output), or a refusal that is not one `vlm: error:` line (naming the file, where it is one)."""
    if r.outcome in ("bug", "crashed"):
        return [f"{where}: {r.outcome}: {r.message.strip()[-1500:]}"]
    if r.message.startswith("usage: "):
        return []
    lines = [line for line in r.message.splitlines() if line.strip()]
    noise = [line for line in lines if not line.startswith("vlm: ")]
    if noise:
        return [f"{where}: stderr beyond vlm's own lines: {noise[0][:300]!r}"]
    if r.outcome != "refused":
        return []
    errors = [line for line in lines if line.startswith("vlm: error: ")]
    if len(errors) != 1:
        return [f"{where}: {len(errors)} error lines: {r.message[:300]!r}"]
    if len(errors[0]) > MAX_MESSAGE_CHARS:
        return [f"{where}: an error line of {len(errors[0]):,} characters: {errors[0][:300]!r}"]
    if r.job.kind in NAMED_KINDS and Path(r.job.path).name not in errors[0] and "usage" not in errors[0]:
        return [f"{where}: the error does not name {Path(r.job.path).name}: {errors[0][:300]!r}"]
    return []


# The bounds for any single input on the test models.
MAX_JOB_SECONDS = 30.0
MAX_JOB_RSS = int(1.5 * 2**30)
NAMED_KINDS = {"index", "video"}  # a refusal names the file the mutation is in


def outcome_table(results: list[Result]) -> dict[str, dict[str, int]]:
    """Per kind: mutations, accepted, clean errors, tracebacks, crashes, hangs, blow-ups (over the time or
    memory bound), problems of any kind, and the slowest job (seconds) and the largest peak (MB)."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        row = out.setdefault(
            r.job.kind,
            {
                "mutations": 0,
                "accepted": 0,
                "clean error": 0,
                "traceback": 0,
                "crash": 0,
                "hang": 0,
                "blow-up": 0,
                "problems": 0,
                "max s": 0,
                "max MB": 0,
            },
        )
        row["mutations"] += 1
        hang = r.outcome == "crashed" and "[timed out]" in r.message
        key = {"accepted": "accepted", "refused": "clean error", "bug": "traceback"}.get(r.outcome)
        row[key or ("hang" if hang else "crash")] += 1
        slow = r.seconds > MAX_JOB_SECONDS
        big = r.grew and r.rss_kb * 1024 > MAX_JOB_RSS
        row["blow-up"] += int(slow or big)
        row["problems"] += int(bool(problems([r])))
        row["max s"] = max(row["max s"], round(r.seconds))
        row["max MB"] = max(row["max MB"], r.rss_kb // 1024)
    return out


def counts(results: list[Result]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in results:
        c = out.setdefault(r.job.kind, {"accepted": 0, "refused": 0, "bug": 0, "crashed": 0})
        c[r.outcome] += 1
    return out
