"""Structured answers: --json-schema and --grammar, from the option's text to the record's fields.

A `Structure` is what the user asked the answers to follow. It is checked and converted before any
model loads (engines/json_schema.py refuses what it cannot enforce, naming the keyword); the engine
samples under its grammar (engines/constrained.py); each answer is parsed and validated here and its
object goes into the record beside the text ("json"). The schema is part of the task's identity,
so a folder tagged with one schema resumes as any batch does and a new schema redoes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vlmcli.errors import InvalidOption
from vlmcli.tasks.resume import Record

SCALARS = {"string", "integer", "number", "boolean", "null"}


@dataclass(frozen=True)
class Structure:
    kind: str  # json_schema | json_object | grammar
    gbnf: str
    schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    closable: bool = True  # gbnf.py can follow the grammar, so answers are closed inside --max-tokens

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_schema", "json_object")

    def constraint(self) -> Any:
        from vlmcli.engines.json_schema import Constraint

        return Constraint(self.gbnf, self.kind, self.closable)

    def identity(self) -> dict[str, Any]:
        """What makes earlier records reusable: the schema itself, or the grammar's digest."""
        if self.kind == "json_schema":
            return {"json_schema": self.schema}
        if self.kind == "json_object":
            return {"json_object": True}
        return {"grammar": hashlib.sha256(self.gbnf.encode("utf-8")).hexdigest()[:16]}

    def parse(self, text: str) -> tuple[Any, str | None]:
        """The answer's object and None, or None and why it is not one (a grammar's answers are text)."""
        if not self.is_json:
            return None, None
        try:
            value = json.loads(text)
        except ValueError as e:
            return None, f"not JSON: {e}"
        if self.kind == "json_object" and not isinstance(value, dict):
            return None, "not a JSON object"
        if self.schema is not None:
            from jsonschema import validators

            cls = validators.validator_for(self.schema)
            error = next(iter(cls(self.schema).iter_errors(value)), None)
            if error is not None:
                where = "/" + "/".join(str(p) for p in error.absolute_path)
                return None, f"does not follow the schema at {where}: {error.message}"
        return value, None

    def answer_fields(self, text: str) -> Record:
        """The record fields beside an answer's text: "json" (the object, or null) and "json_error"."""
        if not self.is_json:
            return {}
        value, error = self.parse(text)
        return {"json": value, **({"json_error": error} if error else {})}

    def vote_key(self, text: str) -> str:
        """What --select vote compares: the parsed object as canonical JSON (the text when it is none)."""
        value, error = self.parse(text)
        if error is not None or not self.is_json:
            return " ".join(text.split())
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    def flat_properties(self) -> list[str] | None:
        """The top-level properties when each holds a scalar or a list of scalars (one CSV column each)."""
        schema = self.schema or {}
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            return None
        for sub in props.values():
            if not (_scalar(sub, schema) or (_kind(sub, schema) == "array" and _scalar(sub.get("items", {}), schema))):
                return None
        return list(props)

    def csv_columns(self) -> list[str]:
        return self.flat_properties() or ["json"]

    def csv_row(self, value: Any) -> dict[str, Any]:
        """One answer's object as CSV cells: a column per property (lists joined with "; "), or its JSON."""
        flat = self.flat_properties()
        if flat is None:
            return {"json": "" if value is None else json.dumps(value, ensure_ascii=False)}
        if not isinstance(value, dict):
            return {}
        return {k: _cell(value.get(k)) for k in flat}


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    ref = node.get("$ref") if isinstance(node, dict) else None
    if isinstance(ref, str) and ref.startswith("#/"):
        for part in ref[2:].split("/"):
            root = root.get(part, {}) if isinstance(root, dict) else {}
        return root
    return node


def _kind(node: Any, root: dict[str, Any]) -> str | None:
    node = _resolve(node, root)
    if not isinstance(node, dict):
        return None
    if "enum" in node or "const" in node:
        values = node.get("enum", [node.get("const")])
        return "string" if all(not isinstance(v, (dict, list)) for v in values) else None
    t = node.get("type")
    if isinstance(t, list):
        return "string" if set(t) <= SCALARS else None
    if "anyOf" in node:
        return "string" if all(_kind(s, root) in SCALARS for s in node["anyOf"]) else None
    return t if isinstance(t, str) else None


def _scalar(node: Any, root: dict[str, Any]) -> bool:
    return _kind(node, root) in SCALARS


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return "; ".join(str(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else v


def load(json_schema: str | None, grammar: str | None) -> Structure | None:
    """--json-schema FILE|JSON and --grammar FILE as a checked Structure (None: neither given); a
    schema vlm cannot enforce is refused here, before any model loads."""
    if json_schema is not None and grammar is not None:
        raise InvalidOption("json_schema", "give --json-schema or --grammar, not both")
    if json_schema is not None:
        return from_schema(_schema_value(json_schema))
    if grammar is not None:
        return from_grammar(_read(grammar, "grammar"))
    return None


def from_schema(schema: Any, option: str = "json_schema") -> Structure:
    from vlmcli.engines.json_schema import constraint_for_schema

    try:
        c = constraint_for_schema(schema, option)
    except RecursionError:  # the checks and llama.cpp's converter recurse per level
        raise InvalidOption(option, "the schema is nested too deeply to follow") from None
    return Structure("json_schema", c.gbnf, schema)


def json_object() -> Structure:
    from vlmcli.engines.json_schema import json_object_constraint

    return Structure("json_object", json_object_constraint().gbnf)


def from_grammar(gbnf: str, option: str = "grammar") -> Structure:
    """A GBNF grammar. gbnf.py checks its syntax; one it parses but cannot follow (token elements)
    is sampled without closing, so its answers may end at --max-tokens."""
    from vlmcli.engines.gbnf import Grammar, GrammarError

    try:
        Grammar.parse(gbnf)
        closable = True
    except GrammarError as e:
        if "token elements" not in str(e):
            raise InvalidOption(option, f"not a GBNF grammar: {e}") from None
        closable = False
    except RecursionError:
        closable = False
    return Structure("grammar", gbnf, None, closable)


def _schema_value(value: str) -> Any:
    text = value if value.lstrip().startswith("{") else _read(value, "json_schema")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the decoder goes
        raise InvalidOption("json_schema", f"not JSON: {e}") from None


def _read(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise InvalidOption(option, f"cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InvalidOption(option, f"{os.fspath(path)} is not UTF-8 text") from None
