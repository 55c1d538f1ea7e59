"""The three kinds of validation rule (Key, Relation, Tensors), the parsed file they check (Model), and the
error they raise (InvalidModelValue). The table of rules is rules.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vlmcli.errors import ModelError
from vlmcli.gguf.layout import GgufTensor
from vlmcli.gguf.reader import GgufInfo, quote


class InvalidModelValue(ModelError):
    """A model file holds a value vlmcli (or the native code behind it) cannot use.

    `key` is the GGUF key or tensor name, `value` the offending value (None if missing)."""

    def __init__(self, path: Any, key: str, value: Any, reason: str):
        name = quote(key)  # one short line, whatever the file holds
        message = f"{name} {reason}" if value is None else f"{name} = {_show(value)}: {reason}"
        super().__init__(message, path)
        self.key = key
        self.value = value
        self.reason = reason


# GGUF value type codes (gguf.GGUFValueType) and the names the table uses.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_INTS = {U8, I8, U16, I16, U32, I32, U64, I64}
_FLOATS = {F32, F64}
TYPE_NAMES = {
    U8: "uint8",
    I8: "int8",
    U16: "uint16",
    I16: "int16",
    U32: "uint32",
    I32: "int32",
    F32: "float32",
    BOOL: "bool",
    STR: "string",
    ARR: "array",
    U64: "uint64",
    I64: "int64",
    F64: "float64",
}


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else f"{value:g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")  # repr: control characters escaped
    if isinstance(value, bytes):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in list(value)[:4]) + (", ...]" if len(value) > 4 else "]")
    return str(value)


# ----------------------------------------------------------------------------------------------------
# The context a rule sees


class Model:
    """The parsed header a rule checks: metadata, GGUF types, tensors; `arch` fills `{arch}` in keys."""

    def __init__(self, info: GgufInfo):
        self.info = info
        self.path = info.path
        self.kind = info.kind
        self.arch = info.arch
        self.meta = info.metadata
        self.types = info.types
        self.tensors = {t.name: t for t in info.tensors}

    def key(self, template: str) -> str:
        return template.replace("{arch}", self.arch)

    def get(self, template: str, default: Any = None) -> Any:
        return self.meta.get(self.key(template), default)

    def n_tokens(self) -> int | None:
        """The vocabulary size: tokenizer.ggml.tokens (a count, or the list when kept)."""
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            return len(tokens)
        return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None

    def fail(self, key: str, value: Any, reason: str) -> InvalidModelValue:
        return InvalidModelValue(self.path, self.key(key), value, reason)


# ----------------------------------------------------------------------------------------------------
# Rule kinds


@dataclass(frozen=True)
class Key:
    """One key: its GGUF type, whether it is required, its range.

    `type` is "u32", "i32", "f32", "bool", "str", "f32[]", "i32[]", "str[]", "u32|u32[]" (a scalar or
    a per-layer array), or "int"/"float" for vlmcli's own CLIP files (any integer / numeric type).
    Bounds are inclusive; `gt` is an exclusive lower bound (for epsilons)."""

    kinds: tuple[str, ...]
    key: str
    type: str
    required: bool = False
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    choices: tuple[str, ...] | None = None
    why: str = ""
    arch: str | None = None  # language model rules for one architecture only

    def check(self, m: Model) -> None:
        key = m.key(self.key)
        if key not in m.meta:
            if self.required:
                raise m.fail(self.key, None, f"is required ({self.why})" if self.why else "is required")
            return
        value = m.meta[key]
        vtype, itype = m.types.get(key, (None, None))
        values = self._typed(m, key, value, vtype, itype)
        if self.choices is None and self.min is None and self.max is None and self.gt is None:
            values = [v for v in values if isinstance(v, float)]  # finiteness only
        for v in values:
            self._range(m, v, value)

    def _typed(self, m: Model, key: str, value: Any, vtype: int | None, itype: int | None) -> list[Any]:
        want = self.type
        if vtype is None:  # types unknown (an info built by hand): check the values only
            return list(value) if isinstance(value, list) else [value]
        options = want.split("|")
        for opt in options:
            if opt.endswith("[]"):
                base = opt[:-2]
                if vtype == ARR and _type_ok(base, itype):
                    if base == "str" or not isinstance(value, list):  # strings have no range to check
                        return []
                    return value
            elif _type_ok(opt, vtype):
                return [value]
        got = _type_name(vtype)
        if vtype == ARR:
            got = f"array of {_type_name(itype)}"
        raise m.fail(
            self.key,
            value if vtype != ARR else None,
            f"has GGUF type {got}, expected {' or '.join(_type_label(o) for o in options)}",
        )

    def _range(self, m: Model, v: Any, whole: Any) -> None:
        if self.choices is not None:
            if v not in self.choices:
                raise m.fail(self.key, whole, f"is not one of {', '.join(self.choices)}")
            return
        if isinstance(v, (bool, str)) or not isinstance(v, (int, float)):
            return
        if isinstance(v, float) and not math.isfinite(v):
            raise m.fail(self.key, whole, "must be a finite number" + (f" ({self.why})" if self.why else ""))
        lo_ok = (self.min is None or v >= self.min) and (self.gt is None or v > self.gt)
        hi_ok = self.max is None or v <= self.max
        if not (lo_ok and hi_ok):
            raise m.fail(self.key, whole, f"must be {self._range_text()}" + (f" ({self.why})" if self.why else ""))

    def _range_text(self) -> str:
        lo = (
            f"more than {self.gt:g}"
            if self.gt is not None
            else (f"at least {self.min:g}" if self.min is not None else "")
        )
        hi = f"at most {self.max:g}" if self.max is not None else ""
        if self.min is not None and self.max is not None and self.gt is None:
            return f"between {self.min:g} and {self.max:g}"
        return " and ".join(p for p in (lo, hi) if p)


def _type_name(code: int | None) -> str:
    return TYPE_NAMES[code] if code is not None and code in TYPE_NAMES else str(code)


def _type_ok(name: str, code: int | None) -> bool:
    return {
        "u32": code == U32,
        "i32": code == I32,
        "f32": code == F32,
        "bool": code == BOOL,
        "str": code == STR,
        "int": code in _INTS,
        "float": code in _INTS | _FLOATS,
        "anybool": code == BOOL or code in _INTS,
    }[name]


def _type_label(opt: str) -> str:
    base = opt[:-2] if opt.endswith("[]") else opt
    label = {
        "u32": "uint32",
        "i32": "int32",
        "f32": "float32",
        "bool": "bool",
        "str": "string",
        "int": "an integer type",
        "float": "a number type",
        "anybool": "bool",
    }[base]
    return f"array of {label}" if opt.endswith("[]") else label


@dataclass(frozen=True)
class Relation:
    """A check across keys. `check` raises through `m.fail` (naming the key it is about)."""

    kinds: tuple[str, ...]
    name: str
    check: Callable[[Model], None]
    why: str = ""
    arch: str | None = None


@dataclass(frozen=True)
class Tensors:
    """The tensors the hyper-parameters imply: `expected(m)` yields them from the model's layout table."""

    kinds: tuple[str, ...]
    name: str
    expected: Callable[[Model], Iterator[GgufTensor]]
    why: str = ""
    arch: str | None = None

    def check(self, m: Model) -> None:
        for spec in self.expected(m):
            name = spec.name
            t = m.tensors.get(name)
            if t is None:
                if spec.required:
                    raise InvalidModelValue(m.path, name, None, "is required: the file lacks this tensor")
                continue
            got = tuple(int(d) for d in t.shape)
            if not any(_same_shape(got, s) for s in spec.shapes):
                want = " or ".join(str(tuple(s)) for s in spec.shapes)
                raise InvalidModelValue(m.path, name, None, f"has shape {got}, but the hyper-parameters imply {want}")
            if t.type not in spec.types:
                raise InvalidModelValue(
                    m.path, name, None, f"has type {t.type}, expected one of {', '.join(spec.types)}"
                )


def _same_shape(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    n = max(len(got), len(want))
    return got + (1,) * (n - len(got)) == tuple(want) + (1,) * (n - len(want))
