"""JSON schemas as grammars: what vlm can enforce, and the GBNF that enforces it.

llama-cpp-python ships llama.cpp's JSON-schema-to-GBNF converter (`SchemaConverter`). It enforces
types, properties and required, additionalProperties, items, minItems/maxItems, enum/const, anyOf,
local $ref, minLength/maxLength on strings and a few string formats; other keywords it skips
silently, so an answer could follow its grammar and still fail the schema. `check` refuses those
keywords by name before any model loads; what passes converts to a grammar whose every complete
answer validates. Strings in the grammar exclude raw control characters and lone surrogates (the
converter's own string rule lets them through, and strict JSON parsers reject them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

from vlmcli.engines.gbnf import MAX_GRAMMAR_CHARS
from vlmcli.errors import InvalidOption

# Keywords the converter would skip (or read differently from JSON Schema): refused, with why.
REFUSED = {
    "not": "negation cannot be written as a grammar",
    "if": "conditional schemas cannot be written as a grammar",
    "then": "conditional schemas cannot be written as a grammar",
    "else": "conditional schemas cannot be written as a grammar",
    "allOf": "give the properties in one object instead",
    "oneOf": "use anyOf (oneOf's 'exactly one' cannot be enforced)",
    "dependentSchemas": "not enforceable by the grammar",
    "dependentRequired": "not enforceable by the grammar",
    "dependencies": "not enforceable by the grammar",
    "patternProperties": "not enforceable by the grammar",
    "propertyNames": "not enforceable by the grammar",
    "minProperties": "not enforceable by the grammar",
    "maxProperties": "not enforceable by the grammar",
    "unevaluatedProperties": "not enforceable by the grammar",
    "unevaluatedItems": "not enforceable by the grammar",
    "additionalItems": "use prefixItems alone",
    "contains": "not enforceable by the grammar",
    "minContains": "not enforceable by the grammar",
    "maxContains": "not enforceable by the grammar",
    "minimum": "numeric ranges are not enforceable by this grammar converter (use enum)",
    "maximum": "numeric ranges are not enforceable by this grammar converter (use enum)",
    "exclusiveMinimum": "numeric ranges are not enforceable by this grammar converter (use enum)",
    "exclusiveMaximum": "numeric ranges are not enforceable by this grammar converter (use enum)",
    "multipleOf": "not enforceable by the grammar",
    "pattern": "regular expressions are not supported (use enum, or --grammar)",
    "$dynamicRef": "only local $ref is supported",
    "$recursiveRef": "only local $ref is supported",
}
TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}
# Keywords that hold one subschema, or a map or list of them (walked by `check`).
# llama.cpp's converter writes a length or count bound out as that many grammar items (minLength 10^9
# exhausted memory); no answer within a context reaches this many.
MAX_REPEAT = 4096
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
# The sampler's grammar grows with the alternatives, and each token's check with it (an enum of 100,000
# values or 10,000 anyOf branches took minutes to answer).
MAX_ALTERNATIVES = 4096
# The converter writes the optional part of a bound (maxLength - minLength) as groups nested that deep;
# llama.cpp's grammar parser refuses deeper nesting than this.
MAX_OPTIONAL = 1000
# Every character of the schema's text becomes grammar that each answer's setup parses and searches.
MAX_SCHEMA_CHARS = 262_144
_ONE = ("items", "additionalProperties")
_MAP = ("properties", "$defs", "definitions")
_LIST = ("anyOf", "prefixItems")

_CONVERTER_CHAR = 'char ::= [^"\\\\] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_STRICT_CHAR = (
    'char ::= [^"\\\\\\x7F\\x00-\\x1F\\uD800-\\uDFFF] | "\\\\" (["\\\\/bfnrt] | '
    '"u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F] | [dD] [0-7]) [0-9a-fA-F] [0-9a-fA-F])'
)


@dataclass(frozen=True)
class Constraint:
    """What an answer must follow, as llama.cpp's grammar sampler takes it."""

    gbnf: str
    kind: str  # json_schema | json_object | grammar: what the user gave (for messages)
    closable: bool = True  # the engine may close the answer inside the token budget (gbnf.py can follow it)


def check(schema: Any, option: str = "json_schema") -> None:
    """Refuse a schema vlm cannot enforce, naming the keyword and where it is (a JSON pointer)."""
    if not isinstance(schema, dict):
        raise InvalidOption(option, "a JSON schema is a JSON object")
    from jsonschema import exceptions, validators

    _bounded_sizes(schema, option)
    try:
        size = len(json.dumps(schema, ensure_ascii=False))
    except (TypeError, ValueError) as e:  # a server's request arrives as objects, not checked text
        raise InvalidOption(option, f"not JSON: {e}") from None
    if size > MAX_SCHEMA_CHARS:
        raise InvalidOption(option, f"the schema is {size:,} characters of JSON, more than {MAX_SCHEMA_CHARS:,}")
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/" + "/".join(str(p) for p in e.path)
        raise InvalidOption(option, f"not a valid JSON schema at {where}: {e.message}") from None
    _walk(schema, "", option)


def _bounded_sizes(schema: dict[str, Any], option: str) -> None:
    """Long enum and anyOf lists refused before the meta-schema check, which takes a minute over 10,000;
    a const, enum value or property name longer than a string's length bound allows, likewise."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, where = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if key in ("enum", "anyOf") and isinstance(value, list) and len(value) > MAX_ALTERNATIVES:
                raise _refuse(option, where, str(key), f"{len(value):,} alternatives, more than {MAX_ALTERNATIVES:,}")
            literals = [value] if key == "const" else value if key == "enum" and isinstance(value, list) else []
            if key == "properties" and isinstance(value, dict):
                literals = list(value)
            longest = max((len(v) for v in literals if isinstance(v, str)), default=0)
            if longest > MAX_REPEAT:
                raise _refuse(option, where, str(key), f"a string of {longest:,} characters, more than {MAX_REPEAT:,}")
            stack.append((value, f"{where}/{key}"))


def _number(value: Any) -> TypeGuard[int | float]:  # a JSON number: bool is an int in Python, not in JSON
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse(option: str, where: str, keyword: str, why: str) -> InvalidOption:
    return InvalidOption(option, f"the schema keyword {keyword!r} at {where or '/'} is not supported: {why}")


def _walk(node: Any, where: str, option: str) -> None:
    if isinstance(node, bool):
        if node is False:
            raise _refuse(option, where, "false", "a schema nothing matches")
        return
    if not isinstance(node, dict):
        return
    for keyword, why in REFUSED.items():
        if keyword in node:
            raise _refuse(option, where, keyword, why)
    if node.get("uniqueItems") is True:
        raise _refuse(option, where, "uniqueItems", "not enforceable by the grammar")
    ref = node.get("$ref")
    if ref is not None and not str(ref).startswith("#/"):
        raise _refuse(option, where, "$ref", f"{ref!r}: only references inside the schema (#/...) are supported")
    types = node.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in TYPES:
            raise _refuse(option, where, "type", f"unknown type {t!r}")
    for key in _COUNTS:
        value = node.get(key)
        if _number(value) and not 0 <= value <= MAX_REPEAT:
            raise _refuse(option, where, key, f"{value:g} is outside 0..{MAX_REPEAT}, more than an answer holds")
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
        hi, lo = node.get(high), node.get(low, 0)
        if _number(hi) and _number(lo) and hi - max(lo, 0) > MAX_OPTIONAL:
            why = f"{hi - max(lo, 0):g} optional items nest deeper than llama.cpp's grammar goes ({MAX_OPTIONAL:,})"
            raise _refuse(option, where, high, why)
    if ("minLength" in node or "maxLength" in node) and types != "string":
        raise _refuse(option, where, "minLength", 'string lengths need "type": "string" beside them')
    if "enum" in node and not node["enum"]:
        raise _refuse(option, where, "enum", "an empty enum matches nothing")
    if "prefixItems" in node and any(k in node for k in ("items", "minItems", "maxItems")):
        raise _refuse(option, where, "prefixItems", "give prefixItems alone (a fixed tuple)")
    props: dict[str, Any] = node["properties"] if isinstance(node.get("properties"), dict) else {}
    missing = [r for r in node.get("required", []) if r not in props]
    if missing:
        raise _refuse(option, where, "required", f"{missing[0]!r} is required but not under properties")
    for key in _ONE:
        if isinstance(node.get(key), (dict, bool)) and not (key == "additionalProperties" and node[key] is False):
            _walk(node[key], f"{where}/{key}", option)
    for key in _MAP:
        for name, sub in (node.get(key) or {}).items():
            _walk(sub, f"{where}/{key}/{name}", option)
    for key in _LIST:
        for i, sub in enumerate(node.get(key) or []):
            _walk(sub, f"{where}/{key}/{i}", option)


def to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF of a checked schema (llama.cpp's converter, with strict JSON strings)."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
    converter.visit(resolved, "")
    return strict_strings(converter.format_grammar())


def strict_strings(gbnf: str) -> str:
    lines = [(_STRICT_CHAR if line == _CONVERTER_CHAR else line) for line in gbnf.splitlines()]
    return "\n".join(lines) + "\n"


def constraint_for_schema(schema: Any, option: str = "json_schema") -> Constraint:
    check(schema, option)
    try:
        gbnf = to_gbnf(schema)
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise InvalidOption(option, f"the schema cannot be converted to a grammar: {e}") from None
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        why = f"its grammar is {len(gbnf):,} characters, more than {MAX_GRAMMAR_CHARS:,} (fewer or lower bounds)"
        raise InvalidOption(option, f"the schema is too large to follow: {why}")
    return Constraint(gbnf, "json_schema")


def json_object_constraint() -> Constraint:
    """Any JSON object (OpenAI's response_format json_object)."""
    return Constraint(to_gbnf({"type": "object"}), "json_object")
