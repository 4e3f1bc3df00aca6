"""The JSON Schema coverage table, walked.

Enforced keywords: the grammar Outpost really builds for a tool (structural tag,
schema rewritten by `for_grammar`) accepts a call whose arguments keep the keyword
and refuses one that breaks it. The vocabulary is one token per byte, so the grammar
is checked on exact text, independent of any model's tokenizer.

Unsupported keywords: a chat request carrying one is refused by a real daemon with
`unsupported_schema`, naming the keyword, before any model is loaded.
"""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from outpost.runtime.errors import InvalidSchema, UnsupportedSchema
from outpost.models.grammar import GrammarCache, TokenMask, Vocabulary
from outpost.models.schemas import ANNOTATIONS, ENFORCED, FORMATS, UNSUPPORTED, check_tools
from outpost.models.templates import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

BYTES = Vocabulary(pieces=[bytes([i]) for i in range(256)] + [b""], stop_ids=[256], size=257)


def obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props)}


# keyword -> (parameters schema, arguments that keep it, arguments that break it)
CASES: dict[str, tuple[dict, dict, dict]] = {
    "type": (obj(a={"type": ["integer", "null"]}), {"a": None}, {"a": "1"}),
    "enum": (obj(a={"enum": ["eco", "fast"]}), {"a": "eco"}, {"a": "slow"}),
    "const": (obj(a={"const": 3}), {"a": 3}, {"a": 4}),
    "properties": (obj(a={"type": "boolean"}), {"a": True}, {"a": 1}),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a"]}, {"a": 1}, {"b": 1}),
    "additionalProperties": ({"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}},
                             {"x": 1}, {"x": "1"}),
    "items": (obj(a={"type": "array", "items": {"type": "integer"}}), {"a": [1, 2]}, {"a": [1, "2"]}),
    "prefixItems": (obj(a={"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                           "items": False}), {"a": [1, "x"]}, {"a": ["x", 1]}),
    "minItems": (obj(a={"type": "array", "items": {"type": "integer"}, "minItems": 2}), {"a": [1, 2]}, {"a": [1]}),
    "maxItems": (obj(a={"type": "array", "items": {"type": "integer"}, "maxItems": 1}), {"a": [1]}, {"a": [1, 2]}),
    "minLength": (obj(a={"type": "string", "minLength": 3}), {"a": "abc"}, {"a": "ab"}),
    "maxLength": (obj(a={"type": "string", "maxLength": 2}), {"a": "ab"}, {"a": "abc"}),
    "pattern": (obj(a={"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"}), {"a": "ABC-12"}, {"a": "AB-12"}),
    "format": (obj(a={"type": "string", "format": "date"}), {"a": "2026-11-22"}, {"a": "22/11/2026"}),
    "minimum": (obj(a={"type": "number", "minimum": 1.5}), {"a": 1.5}, {"a": 1.25}),
    "maximum": (obj(a={"type": "integer", "maximum": 10}), {"a": 10}, {"a": 11}),
    "exclusiveMinimum": (obj(a={"type": "integer", "exclusiveMinimum": 0}), {"a": 1}, {"a": 0}),
    "exclusiveMaximum": (obj(a={"type": "number", "exclusiveMaximum": 1}), {"a": 0.5}, {"a": 1}),
    "multipleOf": (obj(a={"type": "integer", "multipleOf": 5}), {"a": 15}, {"a": 12}),
    "anyOf": (obj(a={"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}), {"a": "ab"}, {"a": "abc"}),
    "oneOf": (obj(a={"oneOf": [{"type": "integer"}, {"type": "boolean"}]}), {"a": False}, {"a": "no"}),
    "allOf": (obj(a={"allOf": [{"type": "integer", "minimum": 3}], "description": "n"}), {"a": 3}, {"a": 2}),
    "$ref": ({"type": "object", "$defs": {"unit": {"enum": ["C", "F"]}},
              "properties": {"u": {"$ref": "#/$defs/unit"}}, "required": ["u"]}, {"u": "C"}, {"u": "K"}),
    "$defs": ({"type": "object", "$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["kids"]}},
        "properties": {"tree": {"$ref": "#/$defs/n"}}, "required": ["tree"]},
        {"tree": {"kids": [{"kids": []}]}}, {"tree": {"kids": [{"leaves": []}]}}),
    "definitions": ({"type": "object", "definitions": {"p": {"type": "integer"}},
                     "properties": {"a": {"$ref": "#/definitions/p"}}, "required": ["a"]},
                    {"a": 7}, {"a": "7"}),
}


@pytest.fixture(scope="module")
def grammars() -> GrammarCache:
    return GrammarCache(BYTES)


def accepts(grammars: GrammarCache, params: dict, arguments: dict) -> bool:
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    check_tools(tools)
    mask = TokenMask(grammars.compiled(tools, "required", False), BYTES.size)
    text = f'{TOOL_CALL_OPEN}\n{{"name": "f", "arguments": {json.dumps(arguments)}}}\n{TOOL_CALL_CLOSE}'
    return mask.matcher.accept_string(text.encode()) and mask.matcher.accept_token(256) and mask.finished


def test_every_enforced_keyword_has_a_case():
    assert set(CASES) == set(ENFORCED)


@pytest.mark.parametrize("keyword", sorted(CASES))
def test_enforced_keyword_is_kept_by_the_grammar(grammars, keyword):
    params, good, bad = CASES[keyword]
    validator = Draft202012Validator(params, format_checker=Draft202012Validator.FORMAT_CHECKER)
    assert validator.is_valid(good) and not validator.is_valid(bad)  # the case itself is right
    assert accepts(grammars, params, good)
    assert not accepts(grammars, params, bad)


@pytest.mark.parametrize("fmt, good, bad", [
    ("date", "2026-11-22", "2026-13-40x"), ("time", "12:30:00Z", "25:61"),
    ("date-time", "2026-11-22T12:30:00Z", "yesterday"), ("duration", "P3D", "3 days"),
    ("email", "ops@example.com", "not an email"), ("hostname", "jetson-01.local", "-bad-"),
    ("ipv4", "192.168.0.1", "999.1"), ("ipv6", "::1", "zz::"),
    ("uri", "https://example.com/x", "not a uri"), ("uri-reference", "/a/b", "\\bad"),
    ("uuid", "123e4567-e89b-12d3-a456-426614174000", "xyz"),
])
def test_every_enforced_format(grammars, fmt, good, bad):
    assert fmt in FORMATS
    params = obj(a={"type": "string", "format": fmt})
    assert accepts(grammars, params, {"a": good})
    assert not accepts(grammars, params, {"a": bad})


def test_enforced_formats_are_exactly_those_tested():
    tested = {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6",
              "uri", "uri-reference", "uuid"}
    assert FORMATS == tested


def test_object_without_properties_takes_any_members(grammars):
    params = obj(meta={"type": "object"})
    assert accepts(grammars, params, {"meta": {"anything": [1, "two"]}})


def test_annotations_pass(grammars):
    params = obj(a={"type": "integer", "title": "A", "description": "d", "default": 1,
                    "examples": [1], "deprecated": False, "x-ui-order": 3})
    assert accepts(grammars, params, {"a": 2})


# keyword -> a parameters schema that uses it
UNSUPPORTED_CASES = {
    "allOf": obj(a={"allOf": [{"type": "integer"}, {"minimum": 1}]}),
    "not": obj(a={"not": {"type": "string"}}),
    "if": obj(a={"if": {"type": "integer"}, "then": {"minimum": 0}}),
    "then": obj(a={"then": {"minimum": 0}}),
    "else": obj(a={"else": {"minimum": 0}}),
    "uniqueItems": obj(a={"type": "array", "uniqueItems": True}),
    "contains": obj(a={"type": "array", "contains": {"const": 1}}),
    "minContains": obj(a={"type": "array", "minContains": 1}),
    "maxContains": obj(a={"type": "array", "maxContains": 1}),
    "patternProperties": obj(a={"type": "object", "patternProperties": {"^x": {}}}),
    "propertyNames": obj(a={"type": "object", "propertyNames": {"maxLength": 3}}),
    "minProperties": obj(a={"type": "object", "minProperties": 1}),
    "maxProperties": obj(a={"type": "object", "maxProperties": 1}),
    "dependentRequired": {"type": "object", "properties": {"a": {}}, "dependentRequired": {"a": ["b"]}},
    "dependentSchemas": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
    "dependencies": {"type": "object", "dependencies": {"a": ["b"]}},
    "unevaluatedProperties": {"type": "object", "unevaluatedProperties": False},
    "unevaluatedItems": obj(a={"type": "array", "unevaluatedItems": False}),
    "additionalItems": obj(a={"type": "array", "additionalItems": False}),
    "$dynamicRef": obj(a={"$dynamicRef": "#node"}),
    "$dynamicAnchor": obj(a={"$dynamicAnchor": "node"}),
    "$recursiveRef": obj(a={"$recursiveRef": "#"}),
    "$recursiveAnchor": obj(a={"$recursiveAnchor": "node"}),
    "contentEncoding": obj(a={"type": "string", "contentEncoding": "base64"}),
    "contentMediaType": obj(a={"type": "string", "contentMediaType": "application/json"}),
    "contentSchema": obj(a={"type": "string", "contentSchema": {}}),
}


def test_every_unsupported_keyword_has_a_case():
    assert set(UNSUPPORTED_CASES) == set(UNSUPPORTED)
    assert not (set(ENFORCED) - {"allOf"}) & set(UNSUPPORTED)
    assert not ANNOTATIONS & (set(ENFORCED) | set(UNSUPPORTED))


@pytest.mark.parametrize("keyword", sorted(UNSUPPORTED_CASES))
def test_unsupported_keyword_is_refused_over_the_wire_and_named(client, keyword):
    tools = [{"type": "function", "function": {"name": "f", "parameters": UNSUPPORTED_CASES[keyword]}}]
    with pytest.raises(UnsupportedSchema) as err:
        client.chat([{"role": "user", "content": "go"}], tools=tools, tool_choice="required")
    assert err.value.data["keyword"] == keyword
    assert keyword in err.value.message
    assert client.ping()["pong"]


@pytest.mark.parametrize("params, keyword", [
    (obj(a={"type": "string", "format": "iri"}), "format: iri"),
    (obj(a={"type": "string", "maxlength": 3}), "maxlength"),  # misspelt: would be ignored
    (obj(a={"$ref": "https://example.com/schema.json"}), "$ref"),
    ({**obj(a={"type": "array", "items": [{"type": "integer"}]}),
      "$schema": "http://json-schema.org/draft-07/schema#"}, "items"),
    (obj(a={"type": "number", "multipleOf": 0.5}), "multipleOf"),
    (obj(a={"allOf": [{"type": "integer"}], "type": "string"}), "allOf"),
])
def test_unenforceable_uses_of_known_keywords_are_refused(params, keyword):
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    with pytest.raises(UnsupportedSchema) as err:
        check_tools(tools)
    assert err.value.data["keyword"] == keyword


def test_parameters_must_be_an_object_schema():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
    with pytest.raises(InvalidSchema):
        check_tools(tools)


def test_an_accepted_tool_list_is_not_checked_again_and_a_refused_one_always_is():
    import hashlib

    from outpost.models import schemas

    good = [{"type": "function", "function": {"name": "f", "parameters": obj(a={"type": "integer"})}}]
    bad = [{"type": "function", "function": {"name": "f", "parameters": obj(a={"type": "intger"})}}]
    check_tools(good)
    canonical = json.dumps(good, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(canonical).digest() in schemas._accepted
    check_tools(json.loads(json.dumps(good)))  # the same list, another object: accepted from memory
    for _ in range(2):  # a refusal is not remembered: refused each time, with its reason
        with pytest.raises(InvalidSchema):
            check_tools(bad)
    good[0]["function"]["parameters"]["properties"]["a"]["type"] = "intger"  # the same object, changed
    with pytest.raises(InvalidSchema):
        check_tools(good)


def test_the_docs_table_is_the_code_table():
    from pathlib import Path

    from outpost.models.schemas import coverage_table

    docs = (Path(__file__).resolve().parent.parent / "docs" / "json-schema.md").read_text()
    assert coverage_table() in docs


def test_required_members_without_a_schema_are_still_required(grammars):
    """BFCL has objects that list `required` names but no `properties` for them."""
    params = obj(population={"type": "object", "required": ["adults", "children"]})
    assert accepts(grammars, params, {"population": {"adults": 2, "children": 1}})
    assert accepts(grammars, params, {"population": {"adults": 2, "children": 1, "pets": 3}})
    assert not accepts(grammars, params, {"population": {"adults": 2}})
