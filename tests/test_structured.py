"""Structured output: schemas refused by keyword, GBNF followed as llama.cpp does, and through the real
CLI every answer parses and validates whatever the weights (a random-weight model at temperature 1)."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vlmcli.engines.gbnf import Grammar, GrammarError, Recognizer
from vlmcli.engines.json_schema import constraint_for_schema, json_object_constraint
from vlmcli.errors import InvalidOption
from vlmcli.tasks.structured import Structure, from_grammar, from_schema

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"

TAGS = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "people": {"type": "integer"},
        "scene": {"enum": ["indoor", "outdoor"]},
    },
    "required": ["tags", "people", "scene"],
}
SMALL = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "scene": {"enum": ["in", "out"]},
    },
    "required": ["ok", "scene"],
}
# Every kind of constraint the closing must satisfy: lengths, counts, enums, consts, nesting, optionals, refs.
RICH = {
    "type": "object",
    "$defs": {"box": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
    "properties": {
        "caption": {"type": "string", "minLength": 3, "maxLength": 40},
        "objects": {"type": "array", "items": {"$ref": "#/$defs/box"}, "minItems": 2},
        "kind": {"const": "photo"},
        "mood": {"enum": ["calm", "busy", None]},
        "text": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
        "meta": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        "extra": {"type": "string"},
    },
    "required": ["caption", "objects", "kind", "mood", "text", "flags", "meta"],
}


def vlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}, "minimum"),
        ({"type": "string", "pattern": "^a+$"}, "pattern"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
        ({"allOf": [{"type": "object"}]}, "allOf"),
        ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"$ref": "https://example.com/schema.json"}, "$ref"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
        ({"minLength": 2}, "minLength"),
    ],
)
def test_schemas_vlm_cannot_enforce_are_refused_by_keyword(schema: dict, keyword: str) -> None:
    with pytest.raises(InvalidOption) as e:
        constraint_for_schema(schema)
    assert e.value.option == "json_schema" and repr(keyword) in e.value.message, e.value.message


def test_an_invalid_schema_is_refused_with_where() -> None:
    with pytest.raises(InvalidOption, match="not a valid JSON schema at /properties/a/type"):
        constraint_for_schema({"type": "object", "properties": {"a": {"type": 5}}})


def test_strings_in_the_grammar_are_strict_json() -> None:
    """No raw control characters or lone surrogates: strict parsers (pydantic's) read every answer."""
    g = Recognizer(Grammar.parse(json_object_constraint().gbnf))
    s = g.advance(g.initial(), b'{"a')
    assert s is not None
    assert g.advance(s, b"\n") is None and g.advance(s, b"\x7f") is None
    assert g.advance(s, b"\\ud800") is None and g.advance(s, b"\xed\xa0\x80") is None
    assert g.advance(s, "\\u00e9é😀".encode()) is not None


# ----------------------------------------------------------------------------- the GBNF follower


def test_gbnf_parses_llama_cpp_syntax() -> None:
    text = r"""
root ::= "a" [b-d]{2,3} x? ( "|" | [^\x00-\x1F] )+ "\u00e9" .
x ::= "x" # a comment
"""
    r = Recognizer(Grammar.parse(text))
    assert r.completion(r.initial()) == "abb|éa".encode()
    s = r.advance(r.initial(), b"abcdx||")
    assert s is not None and r.completion(s) == "éa".encode()
    assert r.advance(r.initial(), b"abe") is None
    with pytest.raises(GrammarError, match="not defined"):
        Grammar.parse("root ::= missing")
    with pytest.raises(GrammarError, match="left recursion"):
        r = Recognizer(Grammar.parse('root ::= root | "a"'))
        r.initial()


def test_a_branch_that_can_never_end_is_not_a_completion() -> None:
    """y may go on into x, which never ends: the completion takes the branch that does ("c"), and
    does not follow x forever."""
    r = Recognizer(Grammar.parse('root ::= "a" y\ny ::= "c" | x\nx ::= "b" x'))
    s = r.advance(r.initial(), b"a")
    assert s is not None and r.completion(s) == b"c"
    inside = r.advance(r.initial(), b"ab")  # only the endless branch is left
    assert inside is None or r.completion(inside) is None


def test_a_maxlength_of_1000_nests_1000_deep_and_is_followed() -> None:
    """The converter writes maxLength N as N nested optional groups: past about 480 the parser's
    recursion ended in a RecursionError, with no name (`vlm: error: RecursionError`)."""
    r = Recognizer(Grammar.parse(constraint_for_schema({"type": "string", "maxLength": 1000}).gbnf))
    s = r.advance(r.initial(), b'"' + b"a" * 1000)
    assert s is not None and r.completion(s) == b'"'
    assert r.advance(s, b"a") is None
    deep = Recognizer(Grammar.parse("root ::= " + '("a" ' * 5000 + ")" * 5000))  # 5,000 groups, each needed
    assert deep.completion(deep.initial()) == b"a" * 5000


def test_the_shortest_answer_of_many_nested_groups_takes_one_pass() -> None:
    """200 strings of maxLength 100: 20,000 nested groups, whose shortest strings took a sweep over
    every rule per level of nesting (seconds of CPU per answer)."""
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "maxLength": 100} for i in range(200)},
        "required": ["p0"],
    }
    r = Recognizer(Grammar.parse(constraint_for_schema(schema).gbnf))
    assert json.loads(r.completion(r.initial())) == {"p0": ""}


@pytest.mark.parametrize(
    "schema, needle",
    [
        ({"const": "x" * 100_000}, "'const' at / is not supported: a string of 100,000 characters, more than 4,096"),
        ({"enum": ["a", "b" * 5000]}, "'enum' at / is not supported: a string of 5,000 characters"),
        ({"type": "object", "properties": {"k" * 5000: {"type": "null"}}}, "'properties' at / is not supported"),
        ({"type": "string", "maxLength": 4096}, "'maxLength' at / is not supported: 4096 optional items nest deeper"),
        ({"type": "array", "items": {"type": "null"}, "minItems": 10, "maxItems": 1011}, "1001 optional items"),
        ({"enum": [f"v{i}" + "y" * 1000 for i in range(300)]}, "the schema is 302,"),
        (
            {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(200)}},
            "too large to follow: its grammar is 1,626,",
        ),
    ],
)
def test_schemas_past_what_a_grammar_can_hold_are_refused_by_name(schema: dict, needle: str) -> None:
    """A 100,000-character const took seconds to set up for each answer (34 s on a busy machine);
    llama.cpp's own parser refuses more than 1,000 nested optional groups."""
    with pytest.raises(InvalidOption) as e:
        constraint_for_schema(schema)
    assert needle in e.value.message, e.value.message
    constraint_for_schema({"type": "string", "minLength": 3000, "maxLength": 4000})  # 1,000 optional: fine
    with pytest.raises(InvalidOption, match="the grammar is 300,011 characters, more than 262,144"):
        from_grammar('root ::= "' + "a" * 300_000 + '"')


@pytest.mark.parametrize("schema", [TAGS, RICH], ids=["tags", "rich"])
def test_every_prefix_of_an_answer_closes_to_a_valid_answer(schema: dict) -> None:
    """Cut a random valid document anywhere (inside strings, escapes, numbers, keys, UTF-8
    sequences) and its shortest completion parses and validates: what the engine writes at --max-tokens."""
    structure = from_schema(schema)
    recognizer = Recognizer(Grammar.parse(structure.gbnf))
    rnd = random.Random(0)
    docs = [_random_document(recognizer, rnd) for _ in range(30)]
    for doc in docs:
        assert structure.parse(doc.decode())[1] is None, doc
        for cut in range(len(doc) + 1):
            state = recognizer.advance(recognizer.initial(), doc[:cut])
            assert state is not None, doc[:cut]
            completion = recognizer.completion(state)
            assert completion is not None
            value, error = structure.parse((doc[:cut] + completion).decode())
            assert error is None, (doc[:cut], completion, error)


def _random_document(r: Recognizer, rnd: random.Random) -> bytes:
    """A random walk through the grammar, then its shortest completion."""
    alphabet = [c.encode() for c in 'ab "\\u0041{}[],:-.0123456789eEtrufalsn'] + ["é".encode(), "😀".encode()]
    state, out = r.initial(), b""
    for _ in range(rnd.randint(0, 80)):
        options = [(c, s) for c in alphabet if (s := r.advance(state, c)) is not None]
        if not options:
            break
        c, state = rnd.choice(options)
        out += c
    completion = r.completion(state)
    assert completion is not None
    return out + completion


def test_a_grammar_with_token_elements_is_sampled_without_closing() -> None:
    assert from_grammar('root ::= "yes" | "no"\n').closable
    assert not from_grammar("root ::= <[1]> [a-z]*\n").closable
    with pytest.raises(InvalidOption, match="not a GBNF grammar"):
        from_grammar("root ::= (")


def test_csv_layout_of_flat_and_nested_schemas() -> None:
    flat = from_schema(TAGS)
    assert flat.csv_columns() == ["tags", "people", "scene"]
    assert flat.csv_row({"tags": ["a", "b"], "people": 2, "scene": "indoor"}) == {
        "tags": "a; b",
        "people": 2,
        "scene": "indoor",
    }
    nested = from_schema(RICH)
    assert nested.csv_columns() == ["json"]
    assert json.loads(nested.csv_row({"a": [1]})["json"]) == {"a": [1]}


def test_vote_compares_parsed_objects() -> None:
    s = from_schema(TAGS)
    assert s.vote_key('{"tags": [], "people": 1, "scene": "indoor"}') == s.vote_key(
        '{"tags":[],"people":1, "scene":"indoor"}'
    )
    assert isinstance(s, Structure) and s.identity() == {"json_schema": TAGS}


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def model_args(smolvlm2_gguf) -> list[str]:
    return ["--model", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj)]


def test_a_hundred_answers_at_temperature_1_all_parse_and_validate(model_args: list[str], tmp_path: Path) -> None:
    """100 answers sampled at temperature 1 by random weights that know nothing of JSON, with a token
    budget they would overrun: two questions, 50 --best-of candidates each (decoded together, each
    constrained), every candidate parsed and validated, the vote taken over parsed objects."""
    schema = tmp_path / "tags.json"
    schema.write_text(json.dumps(SMALL))
    r = vlm(
        "ask", str(SAMPLE), "Tag this image.", "What is in it?", *model_args, "--json-schema", str(schema),
        "-n", "24", "--temp", "1", "--best-of", "50", "--select", "vote", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (record,) = [json.loads(line) for line in r.stdout.splitlines()]
    structure = from_schema(SMALL)
    candidates = [c for a in record["answers"] for c in a["candidates"]]
    assert len(candidates) == 100
    for c in candidates:
        assert structure.parse(c["text"])[1] is None, c
        assert c["tokens"] <= 24 and c["stop_reason"] in ("eos", "closed")
    for a in record["answers"]:
        assert "json_error" not in a and a["json"] == json.loads(a["candidates"][a["chosen"]]["text"])
        votes = [structure.vote_key(c["text"]) for c in a["candidates"]]
        assert a["candidates"][a["chosen"]]["score"] == max(votes.count(v) for v in votes)
    assert record["options"]["json_schema"] == SMALL


def test_schema_refused_before_the_model_loads(tmp_path: Path) -> None:
    r = vlm("ask", str(SAMPLE), "q", "--model", str(tmp_path / "none.gguf"), "--json-schema", '{"pattern": "x"}')
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "vlm: error: --json-schema: the schema keyword 'pattern' at / is not supported: "
        "regular expressions are not supported (use enum, or --grammar)"
    )


def test_a_folder_tagged_to_csv_resumes_like_any_batch(model_args: list[str], tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (photos / name).write_bytes(SAMPLE.read_bytes())
    schema = json.dumps(TAGS)
    out = tmp_path / "tags.csv"
    args = ["caption", str(photos), *model_args, "--json-schema", schema, "-n", "40", "--temp", "1", "--out", str(out)]
    r = vlm(*args)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open(newline="")))
    assert [Path(row["path"]).name for row in rows] == ["a.jpg", "b.jpg"]
    assert all(row["scene"] in ("indoor", "outdoor") and row["people"].lstrip("-").isdigit() for row in rows)
    again = vlm(*args)
    assert again.returncode == 0 and "0 done, 2 skipped" in again.stderr
    other = vlm(*args[:-2], "--json-schema", json.dumps({**TAGS, "required": ["tags"]}), "--out", str(out))
    assert "2 done, 0 skipped" in other.stderr  # another schema: not the same records
