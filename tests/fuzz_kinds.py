"""The input kinds issue 36 added to the fuzz campaign, each run through the real `vlm` command line:

    index      the photo index's SQLite file: bytes flipped or cut, pages zeroed, its header, a newer
               schema version, odd values in its tables, junk beside it (-wal), locked by another
               connection; then `vlm search`, `vlm dupes` or `vlm index` on it
    query      hostile `vlm search` queries (texts, term syntax, weights, image terms, dates, folders)
    video      videos (truncated, bit flips, no frames, audio only, 4K, an hour long, huge declared
               dimensions) through `vlm ask`
    multi      several images and videos in one prompt (`vlm ask -i ... -i ...`), good ones and bad
    schema     JSON schemas for --json-schema (deep nesting, huge enums, recursive $ref, invalid or
               catastrophic regex patterns, huge bounds, not JSON at all)
    grammar    GBNF grammars for --grammar (undefined and left-recursive rules, huge repetitions,
               deep nesting, bad escapes and ranges)

Each generator writes its files under a folder and returns fuzzing.Job values carrying the command's
arguments; fuzzing.py's child runs them in-process through vlmcli.cli.main and classifies the exit.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import fuzzing as fz

QUESTION = "What is this?"
KINDS = ("index", "query", "video", "multi", "schema", "grammar")


def _vlm_args(models: fz.Models) -> list[str]:
    return ["--model", models.llm, "--mmproj", models.mmproj, "--max-tokens", "2", "--no-cache", "--threads", "1"]


# --------------------------------------------------------------------------------------------------
# The photo index


def build_index(models: fz.Models, work: Path) -> tuple[Path, Path]:
    """A small real index (`vlm index` over a few images, two of them copies) and its image folder."""
    images = work / "index-images"
    images.mkdir(parents=True)
    for i in range(6):
        (images / f"{i}.png").write_bytes(fz.png_bytes(24 + i, 16, seed=i))
    shutil.copy(images / "0.png", images / "copy-of-0.png")
    db = work / "index.sqlite"
    r = subprocess.run(
        [sys.executable, "-m", "vlmcli", "index", str(images), "--db", str(db), "--model", models.clip, "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    _checkpoint(db)
    return db, images


def _checkpoint(db: Path) -> None:
    """Everything in the main file (no -wal beside it), so mutations of the file are the whole index."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()


def _sql_mutation(db: Path, rng: random.Random) -> str:
    """A change made through SQLite itself: the file stays valid, its contents do not."""
    conn = sqlite3.connect(db)
    op = rng.choice(
        ["newer", "version_text", "generation", "vector_blob", "vector_dim", "dtype", "path", "model", "drop"]
    )
    try:
        if op == "newer":
            v = rng.choice([2, 99, 2**31, 2**63 - 1])
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(v),))
            desc = f"schema_version {v}"
        elif op == "version_text":
            v = rng.choice(["abc", "", "1.5", "-1", "1e9", "\0", "9" * 400])
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (v,))
            desc = f"schema_version {v[:20]!r}"
        elif op == "generation":
            v = rng.choice(["x", "", "-5", "9" * 400])
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?)", (v,))
            desc = f"generation {v[:20]!r}"
        elif op == "vector_blob":
            blob = rng.choice([b"", b"\0" * 3, b"\xff" * 1000, struct.pack("<f", float("nan")) * 32])
            conn.execute("UPDATE vectors SET data=? WHERE sha256 IN (SELECT sha256 FROM vectors LIMIT 1)", (blob,))
            desc = f"a vector of {len(blob)} bytes"
        elif op == "vector_dim":
            v = rng.choice([0, -1, 1, 10**9, 2**62])
            conn.execute("UPDATE vectors SET dim=?", (v,))
            desc = f"dim {v}"
        elif op == "dtype":
            v = rng.choice(["<f8", "", "object", "<f2", "S10"])
            conn.execute("UPDATE vectors SET dtype=?", (v,))
            desc = f"dtype {v!r}"
        elif op == "path":
            v = rng.choice(["", "relative.png", "/", "\n", "a" * 5000, "/nonexistent/\udcff.png"])
            conn.execute(
                "UPDATE files SET path=? WHERE rowid IN (SELECT rowid FROM files LIMIT 1)",
                (v.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),),
            )
            desc = f"a path {v[:20]!r}"
        elif op == "model":
            v = rng.choice(["", "x" * 64, "\0"])
            conn.execute("UPDATE models SET hash=?", (v,))
            desc = f"model hash {v[:20]!r}"
        else:
            table = rng.choice(["meta", "files", "vectors", "models", "captions", "captions_fts"])
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            desc = f"table {table} dropped"
        conn.commit()
    finally:
        conn.close()
    return desc


def _byte_mutation(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    op = rng.choice(["flip", "flip", "cut", "page", "header"])
    b = bytearray(data)
    if op == "flip":
        n = rng.choice([1, 4, 32, 256])
        for _ in range(n):
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
        return f"{n} bit flips", bytes(b)
    if op == "cut":
        j = rng.randrange(0, len(b))
        return f"cut at {j}", bytes(b[:j])
    if op == "page":
        page = rng.randrange(max(1, len(b) // 4096))
        b[page * 4096 : (page + 1) * 4096] = bytes(min(4096, len(b) - page * 4096))
        return f"page {page} zeroed", bytes(b)
    j = rng.randrange(16, 100)  # the 100-byte database header after its magic string
    b[j] = rng.randrange(256)
    return f"header byte {j} = {b[j]}", bytes(b)


def index_jobs(base: Path, images: Path, models: fz.Models, rng: random.Random, n: int, out: Path) -> list[fz.Job]:
    jobs = []
    raw = base.read_bytes()
    for i in range(n):
        db = out / f"index-{i}.sqlite"
        op = rng.choice(["bytes", "bytes", "sql", "sql", "locked", "wal"])
        lock = 0.0
        if op == "bytes":
            desc, data = _byte_mutation(raw, rng)
            db.write_bytes(data)
        else:
            db.write_bytes(raw)
            if op == "sql":
                desc = _sql_mutation(db, rng)
            elif op == "locked":
                lock = rng.choice([0.2, 1.0, 5.0])
                desc = f"locked by another connection for {lock:g} s"
            else:
                junk = bytes(rng.randrange(256) for _ in range(rng.choice([32, 4096, 40000])))
                Path(str(db) + "-wal").write_bytes(junk)
                desc = f"{len(junk)} bytes of junk in -wal"
        command = rng.choice(["search", "search", "dupes", "index"])
        if command == "search":
            args = ["search", "a photo", "--db", str(db), "--model", models.clip, "--json"]
        elif command == "dupes":
            args = ["dupes", "--db", str(db), "--json"]
        else:
            args = ["index", str(images), "--db", str(db), "--model", models.clip, "--quiet"]
        jobs.append(fz.Job("index", f"{desc}; {command}", str(db), args=args, lock=lock))
    return jobs


# --------------------------------------------------------------------------------------------------
# Queries


QUERY_PIECES = [
    "dog",
    "+",
    "-",
    "*",
    "2*dog",
    "0*cat",
    "-1*x",
    "1e308*cat",
    "nan*x",
    "inf*y",
    "1e-320*z",
    '"',
    "(",
    ")",
]


def query_jobs(base: Path, images: Path, models: fz.Models, rng: random.Random, n: int, out: Path) -> list[fz.Job]:
    db = out / "query-index.sqlite"
    shutil.copy(base, db)
    jobs = []
    for _ in range(n):
        op = rng.choice(["text", "text", "syntax", "many", "image", "filters", "empty"])
        extra: list[str] = []
        if op == "text":
            terms = [next(fz.text_mutations(rng, 1))]
        elif op == "syntax":
            terms = [" ".join(rng.choice(QUERY_PIECES) for _ in range(rng.randint(1, 12)))]
        elif op == "many":
            terms = [rng.choice(["dog", "+", "-", "cat", "2*sea"]) for _ in range(rng.choice([100, 1000]))]
        elif op == "image":
            terms = ["dog"]
            extra = ["--image", rng.choice([str(images / "0.png"), str(images), str(out / "missing.png"), "", "-"])]
        elif op == "filters":
            terms = ["cat"]
            flag = rng.choice(["--since", "--until", "--in", "--limit"])
            value = rng.choice(["2024-13-45", "0000-01-01", "9999-12-31", "yesterday", "", "\t", str(images), "10"])
            if flag == "--limit":
                value = rng.choice(["1", "1000000000", "99999999999999999999"])
            extra = [flag, value]
        else:
            terms = [rng.choice(["", " ", "\n"])]
        args = ["search", *terms, *extra, "--db", str(db), "--model", models.clip, "--json"]
        desc = f"{op}: " + repr(" ".join(terms)[:60])
        jobs.append(fz.Job("query", desc, str(db), args=args))
    return jobs


# --------------------------------------------------------------------------------------------------
# Videos


def _encode_video(
    width: int, height: int, frames: int, fps: int, *, gap_s: int = 0, audio_only: bool = False, container: str = "mp4"
) -> bytes:
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        if audio_only:
            stream = out.add_stream("aac", rate=16000)
            samples = np.zeros((1, 1024), dtype=np.float32)
            for i in range(frames):
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, i * 1024
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
            return buf.getvalue()
        v = out.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        if gap_s:
            v.time_base = Fraction(1, 1)
        rng = np.random.default_rng(0)
        out.start_encoding()  # the header even when no frame follows
        for i in range(frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if gap_s:
                frame.pts, frame.time_base = i * gap_s, Fraction(1, 1)
            for packet in v.encode(frame):
                out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
    return buf.getvalue()


def video_seeds(names: tuple[str, ...] = ("plain", "hour", "4k", "no-frames", "audio-only", "mkv")) -> dict[str, bytes]:
    """Small real videos of each shape the campaign starts from (`names`: some of them)."""
    makers = {
        "plain": lambda: _encode_video(64, 48, 8, 4),
        "hour": lambda: _encode_video(64, 48, 3, 1, gap_s=1800),
        "4k": lambda: _encode_video(3840, 2160, 2, 1),
        "no-frames": lambda: _encode_video(64, 48, 0, 4),
        "audio-only": lambda: _encode_video(0, 0, 8, 1, audio_only=True),
        "mkv": lambda: _encode_video(64, 48, 4, 2, container="matroska"),
    }
    return {name: makers[name]() for name in names}


def _declared_size(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """The sample entry's width and height (what a container says before any frame is decoded)."""
    at = data.find(b"mp4v")
    if at < 0:
        return "no sample entry", data
    w, h = rng.choice([(65535, 65535), (0, 0), (1, 65535), (65535, 1)])
    b = bytearray(data)
    struct.pack_into(">HH", b, at + 28, w, h)
    return f"declared {w}x{h}", bytes(b)


def video_jobs(models: fz.Models, seeds: dict[str, bytes], rng: random.Random, n: int, out: Path) -> list[fz.Job]:
    jobs = []
    for i in range(n):
        name = rng.choice(list(seeds))
        data = seeds[name]
        op = rng.choice(["as is", "flip", "flip", "cut", "splice", "declared"])
        if op == "flip":
            b = bytearray(data)
            for _ in range(rng.choice([1, 8, 64])):
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif op == "cut":
            data = data[: rng.randrange(1, len(data))]
        elif op == "splice":
            j = rng.randrange(len(data))
            data = data[:j] + bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 512]))) + data[j:]
        elif op == "declared":
            op, data = _declared_size(data, rng)
        suffix = ".mkv" if name == "mkv" else ".mp4"
        path = out / f"video-{i}{suffix}"
        path.write_bytes(data)
        frames = rng.choice(["2", "4", "64"])
        args = ["ask", str(path), QUESTION, *_vlm_args(models), "--max-frames", frames]
        jobs.append(fz.Job("video", f"{name}: {op}, --max-frames {frames}", str(path), args=args))
    return jobs


# --------------------------------------------------------------------------------------------------
# Several images in one prompt


def multi_jobs(
    models: fz.Models, seeds: list[bytes], video: bytes, rng: random.Random, n: int, out: Path
) -> list[fz.Job]:
    good = out / "multi-good.png"
    good.write_bytes(fz.png_bytes(40, 30))
    clip = out / "multi-clip.mp4"
    clip.write_bytes(video)
    jobs = []
    for i in range(n):
        count = rng.choice([2, 2, 2, 3, 3, 5, 8, 16, 64])
        files = []
        for k in range(count):
            what = rng.choice(["good"] * 12 + ["mutated", "mutated", "missing", "folder", "video", "video"])
            if what == "mutated":
                p = out / f"multi-{i}-{k}.img"
                p.write_bytes(next(fz.image_mutations(seeds, rng, 1))[1])
                files.append(str(p))
            elif what == "missing":
                files.append(str(out / f"missing-{k}.png"))
            elif what == "folder":
                files.append(str(out))
            elif what == "video":
                files.append(str(clip))
            else:
                files.append(str(good))
        args = ["ask", *(a for f in files for a in ("-i", f)), QUESTION, *_vlm_args(models)]
        jobs.append(fz.Job("multi", f"{count} files", files[0], args=args))
    return jobs


# --------------------------------------------------------------------------------------------------
# JSON schemas and GBNF grammars


def nested_schema(depth: int, kind: str) -> str:
    """A schema nested `depth` deep, as text (json.dumps itself recurses)."""
    if kind == "object":
        return '{"type": "object", "required": ["a"], "properties": {"a": ' * depth + '{"type": "null"}' + "}}" * depth
    return '{"type": "array", "items": ' * depth + '{"type": "null"}' + "}" * depth


def hostile_schema(rng: random.Random, limit: int = 10**9) -> tuple[str, str]:
    """(description, the schema's text); `limit` caps the sizes (depths, enum and anyOf lengths)."""
    op = rng.choice(
        [
            *("nest", "enum", "ref_self", "ref_cycle", "ref_missing", "pattern", "bounds", "anyof", "types", "text"),
            *("const", "wide"),
        ]
    )
    if op == "nest":
        depth = min(limit, rng.choice([10, 100, 1000, 5000]))
        return f"nested {depth} deep", nested_schema(depth, rng.choice(["object", "array"]))
    elif op == "enum":
        size = min(limit, rng.choice([1, 1000, 100000]))
        schema = {"enum": [f"v{i}" for i in range(size)] + rng.choice([[], [None, 1.5, [], {}]])}
        desc = f"enum of {size}"
    elif op == "ref_self":
        schema = {"$ref": "#"}
        desc = "$ref to itself"
    elif op == "ref_cycle":
        schema = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
        desc = "$ref cycle"
    elif op == "ref_missing":
        schema = {"$ref": rng.choice(["#/$defs/none", "http://example.com/s.json", "#/properties/" + "x" * 300, ""])}
        desc = "$ref elsewhere"
    elif op == "pattern":
        pattern = rng.choice(
            ["(", "[z-a]", "(a+)+$", "\\", "a{99999999}", "(?<=x)y", "\\p{L}+", "[[:alpha:]]", ".*" * 50]
        )
        schema = {"type": "string", "pattern": pattern}
        desc = f"pattern {pattern[:20]!r}"
    elif op == "bounds":
        key, value = rng.choice(
            [
                ("minLength", 10**9),
                ("maxLength", -1),
                ("minItems", 10**12),
                ("maxItems", 2**64),
                ("minimum", 1e308),
                ("multipleOf", 0),
                ("minProperties", 10**6),
            ]
        )
        schema = {"type": "array" if "Items" in key else "string" if "Length" in key else "object", key: value}
        desc = f"{key} {value}"
    elif op == "anyof":
        size = min(limit, rng.choice([2, 100, 10000]))
        schema = {"anyOf": [{"const": i} for i in range(size)]}
        desc = f"anyOf of {size}"
    elif op == "types":
        schema = rng.choice([{"type": "nonsense"}, {"type": []}, {"type": ["string", "null", 5]}, True, False, [], 7])
        desc = f"types {json.dumps(schema)[:30]}"
    elif op == "const":
        schema = {"const": "x" * rng.choice([10, 100000])}
        desc = "a long const"
    elif op == "wide":  # bounds within what is allowed, on many properties: nested optional groups by the thousand
        n, key = min(limit, rng.choice([1, 20, 200])), rng.choice(["maxLength", "maxItems"])
        bound = rng.choice([100, 500, 1000, 1001, 4096])
        item = {"type": "string"} if key == "maxLength" else {"type": "array", "items": {"type": "null"}}
        schema = {"type": "object", "properties": {f"p{i}": {**item, key: bound} for i in range(n)}}
        desc = f"{n} properties of {key} {bound}"
    else:
        text = rng.choice(["{", "", "null", "{'a': 1}", "\0", '{"type": "string"' * 1000, "[" * 100000])
        return f"text {text[:20]!r}", text
    return desc, json.dumps(schema)


GBNF_PIECES = [
    '"a"',
    "[a-z]",
    "[^\\n]",
    "x",
    "ws",
    "(",
    ")",
    "|",
    "*",
    "+",
    "?",
    "{2,5}",
    "{0,}",
    " ",
    "root",
    "\\u00e9",
]


def hostile_grammar(rng: random.Random, limit: int = 10**9) -> tuple[str, str]:
    op = rng.choice(["undefined", "left", "repeat", "nest", "escape", "range", "empty", "random", "huge_alt"])
    if op == "undefined":
        return op, "root ::= missing"
    if op == "left":
        return op, 'root ::= root "a" | "b"'
    if op == "repeat":
        n = rng.choice([1000, 100000, 2**31])
        return f"repeat {n}", f'root ::= "a"{{{n}}}'
    if op == "nest":
        depth = min(limit, rng.choice([100, 10000]))
        return f"nest {depth}", "root ::= " + "(" * depth + '"a"' + ")" * depth
    if op == "escape":
        return op, rng.choice(['root ::= "\\q"', 'root ::= "\\x"', 'root ::= "\\uZZZZ"', 'root ::= "unterminated'])
    if op == "range":
        return op, rng.choice(["root ::= [z-a]", "root ::= [", "root ::= [\\U0010FFFF-\\U0010FFFF]", "root ::= []"])
    if op == "empty":
        return op, rng.choice(["", "root ::=", "root ::= ()", "# only a comment\n", 'notroot ::= "a"'])
    if op == "huge_alt":
        n = min(limit, rng.choice([1000, 50000]))
        return f"{n} alternatives", "root ::= " + " | ".join(f'"w{i}"' for i in range(n))
    body = " ".join(rng.choice(GBNF_PIECES) for _ in range(rng.randint(1, 30)))
    return "random", f'root ::= {body}\nx ::= "x"\nws ::= [ \\t]*'


def structure_jobs(
    kind: str, models: fz.Models, rng: random.Random, n: int, out: Path, limit: int = 10**9
) -> list[fz.Job]:
    image = out / "structure.png"
    image.write_bytes(fz.png_bytes(32, 24))
    jobs = []
    for i in range(n):
        desc, text = hostile_schema(rng, limit) if kind == "schema" else hostile_grammar(rng, limit)
        path = out / f"{kind}-{i}.{'json' if kind == 'schema' else 'gbnf'}"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        flag = "--json-schema" if kind == "schema" else "--grammar"
        args = ["ask", str(image), QUESTION, *_vlm_args(models), flag, str(path)]
        jobs.append(fz.Job(kind, desc, str(path), args=args))
    return jobs
