"""What a tool's JSON Schema may say, and what Outpost makes of it.

Every tool schema is walked at request time, in the daemon, before a model is chosen
or loaded. A keyword the grammar enforces passes; an annotation passes (it never
constrains a value); anything else is refused with `unsupported_schema` naming the
keyword and where it sits. Nothing is dropped silently: a keyword the grammar would
ignore is a constraint the agent believes in and the model would not honour.

The table in docs/json-schema.md is generated from ENFORCED and UNSUPPORTED below,
and tests/test_schemas.py walks it: each enforced keyword against xgrammar (an
instance that breaks it is refused by the grammar), each unsupported keyword against
the daemon (the request is refused and the keyword named).

`for_grammar` rewrites a checked schema into the subset xgrammar compiles, without
changing what it accepts: `allOf` with one member is merged into its parent; an
object without `properties` says `additionalProperties: true` explicitly (the
grammar is compiled strictly, so an object that lists properties gets no others);
and a `required` member missing from `properties` is listed there (xgrammar forces
only the members it has a schema for).
Generated calls are still validated against the schema the agent sent.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from jsonschema import Draft202012Validator, SchemaError
from jsonschema.validators import validator_for

from outpost.manifests.errors import BadRequest

from .errors import InvalidSchema, UnsupportedSchema

# keyword -> how the grammar enforces it
ENFORCED: dict[str, str] = {
    "type": "each JSON type, and lists of types",
    "enum": "only the listed values",
    "const": "only that value",
    "properties": "each property's own schema",
    "required": "required properties are always written",
    "additionalProperties": "false (none), or a schema for the extra values; absent: "
                            "no undeclared properties are generated (they would validate)",
    "items": "every item (a schema; the tuple form is `prefixItems`)",
    "prefixItems": "the item at each position",
    "minItems": "at least that many items",
    "maxItems": "at most that many items",
    "minLength": "at least that many characters (not beside `pattern` or `format`: xgrammar "
                 "would drop it there, so that is refused)",
    "maxLength": "at most that many characters (likewise)",
    "pattern": "the regular expression (xgrammar's regex dialect; one it cannot "
               "compile is refused)",
    "format": "date, time, date-time, duration, email, hostname, ipv4, ipv6, uri, "
              "uri-reference, uuid",
    "minimum": "integers and numbers",
    "maximum": "integers and numbers",
    "exclusiveMinimum": "integers and numbers",
    "exclusiveMaximum": "integers and numbers",
    "multipleOf": "integers, from 1 to 1024, without a minimum or maximum beside it (xgrammar "
                  "drops it otherwise, so that is refused)",
    "anyOf": "one of the alternatives",
    "oneOf": "one of the alternatives; that exactly one matches is checked by the "
             "validator, not the grammar",
    "allOf": "with exactly one member, merged into the schema that holds it",
    "$ref": "local references (`#/...`), recursion included",
    "$defs": "definitions for `$ref`",
    "definitions": "definitions for `$ref` (draft 7 spelling)",
}

# keyword -> why it is refused
UNSUPPORTED: dict[str, str] = {
    "allOf": "with more than one member: an intersection of schemas has no grammar",
    "not": "a negation has no grammar",
    "if": "conditional schemas have no grammar",
    "then": "conditional schemas have no grammar",
    "else": "conditional schemas have no grammar",
    "uniqueItems": "xgrammar does not enforce it",
    "contains": "xgrammar does not enforce it",
    "minContains": "xgrammar does not enforce it",
    "maxContains": "xgrammar does not enforce it",
    "patternProperties": "xgrammar does not enforce it",
    "propertyNames": "xgrammar does not enforce it",
    "minProperties": "xgrammar does not enforce it",
    "maxProperties": "xgrammar does not enforce it",
    "dependentRequired": "xgrammar does not enforce it",
    "dependentSchemas": "xgrammar does not enforce it",
    "dependencies": "xgrammar does not enforce it",
    "unevaluatedProperties": "xgrammar does not enforce it",
    "unevaluatedItems": "xgrammar does not enforce it",
    "additionalItems": "the draft 7 tuple form; use prefixItems and items",
    "$dynamicRef": "dynamic references are not resolved",
    "$dynamicAnchor": "dynamic references are not resolved",
    "$recursiveRef": "dynamic references are not resolved",
    "$recursiveAnchor": "dynamic references are not resolved",
    "contentEncoding": "encoded content is not checked",
    "contentMediaType": "encoded content is not checked",
    "contentSchema": "encoded content is not checked",
}

# Annotations describe, they never constrain: always allowed. Names starting with
# "x-" are vendor extensions and annotations too.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$schema", "$id", "$anchor"})

FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6",
                     "uri", "uri-reference", "uuid"})

# What a request's tools may ask of the grammar compiler. Beyond these a compile takes
# seconds to minutes (measured here on a 260-token vocabulary: 20,000 enum values 12 s,
# 200 levels of nesting 1.8 s; a real vocabulary costs more), so they are refused before
# a model is chosen; `[server] grammar_timeout_s` catches what slips between them.
MAX_TOOLS = 128
MAX_DEPTH = 32  # nested objects and arrays in one tool's parameters
MAX_NODES = 4096  # objects and arrays in all the tools' parameters together
MAX_ENUM = 1024  # values in one enum
MAX_PATTERN = 1000  # characters in one pattern

_RANGE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
_ONE = ("additionalProperties", "items")
_LIST = ("prefixItems", "anyOf", "oneOf", "allOf")
_MAP = ("properties", "$defs", "definitions")


# Tool lists already accepted, by the sha256 of their canonical JSON (32 bytes each,
# whatever a request's size). An agent sends the same tools with every request, and
# checking them against the 2020-12 meta-schema cost 1.4 ms idle and ~9 ms with
# llama.cpp busy on both cores (a profile of the daemon: 41% of its own time per
# streamed tool call), on the path before the prompt's prefill, and again in the
# worker. The check depends on nothing but the tools, so an accepted list stays
# accepted; refusals are not kept (they are the rare case).
_accepted: dict[bytes, None] = {}
ACCEPTED_MAX = 256  # forgotten all at once when full: a bound, not an LRU


def check_tools(tools: list[dict[str, Any]]) -> None:
    """Refuse tools that are not OpenAI tools with valid, enforceable JSON Schemas."""
    try:
        canonical = json.dumps(tools, sort_keys=True, separators=(",", ":"), allow_nan=False)
        key = hashlib.sha256(canonical.encode()).digest()  # ASCII: ensure_ascii
    except (TypeError, ValueError, RecursionError):
        key = None  # not plain JSON, or nested past the stack: checked (and refused) below
    if key is not None and key in _accepted:
        return
    _check_tools(tools)
    if key is not None:
        if len(_accepted) >= ACCEPTED_MAX:
            _accepted.clear()
        _accepted[key] = None


def _check_tools(tools: list[dict[str, Any]]) -> None:
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"{len(tools)} tools; a request may carry at most {MAX_TOOLS}",
                         tools=len(tools), limit=MAX_TOOLS)
    seen: set[str] = set()
    nodes = 0
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", index=i)
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(
                c.isalnum() or c in "_-." for c in name):
            raise BadRequest(f"tools[{i}].function.name must be 1-64 letters, digits, _ - or .",
                             index=i)
        if name in seen:
            raise BadRequest(f"tool name {name!r} appears twice", tool=name)
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidSchema(name, "parameters must be a JSON object")
        # Measured before the validator reads it: it walks recursively (a deep enough schema
        # would exhaust Python's stack) and compiles each pattern into `re`'s cache.
        nodes += _limits(name, params, MAX_NODES - nodes)
        try:
            validator_for(params, default=Draft202012Validator).check_schema(params)
        except SchemaError as exc:
            raise InvalidSchema(name, exc.message) from exc
        if params.get("type", "object") != "object":
            raise InvalidSchema(name, "parameters must describe an object (type: object)")
        _walk(name, params, "parameters")


def _walk(tool: str, schema: Any, where: str) -> None:
    if isinstance(schema, bool):
        return
    for key, value in schema.items():
        at = f"{where}.{key}"
        if key in ANNOTATIONS or key.startswith("x-"):
            continue
        if key == "allOf" and isinstance(value, list) and len(value) == 1:
            member = value[0] if isinstance(value[0], dict) else {}
            clash = [k for k in member if k in schema and k not in ANNOTATIONS and member[k] != schema[k]]
            if clash:
                raise _refuse(tool, "allOf", at, f"its member and its parent both set {clash[0]!r}")
        elif key in UNSUPPORTED:
            raise _refuse(tool, key, at, UNSUPPORTED[key])
        elif key not in ENFORCED:
            raise _refuse(tool, key, at, "not a JSON Schema keyword Outpost knows; a "
                                         "misspelt constraint would be silently ignored")
        if key == "format" and value not in FORMATS:
            raise _refuse(tool, f"format: {value}", at, "the grammar cannot enforce this format "
                                                        f"(enforced: {', '.join(sorted(FORMATS))})")
        if key == "$ref" and not str(value).startswith("#"):
            raise _refuse(tool, "$ref", at, f"only local references (#/...) resolve, not {value!r}")
        if key == "items" and isinstance(value, list):
            raise _refuse(tool, "items", at, "the draft 7 tuple form; use prefixItems")
        if key == "multipleOf" and schema.get("type") != "integer":
            raise _refuse(tool, "multipleOf", at, "enforced on integers only")
        # What xgrammar would compile with a warning and not enforce: refused instead.
        if key == "multipleOf" and not (isinstance(value, int) and 1 <= value <= 1024):
            raise _refuse(tool, "multipleOf", at, "enforced from 1 to 1024 only")
        if key == "multipleOf" and any(k in schema for k in _RANGE):
            raise _refuse(tool, "multipleOf", at, "not enforced beside a minimum or maximum")
        if key in ("minLength", "maxLength") and ("pattern" in schema or "format" in schema):
            raise _refuse(tool, key, at, "not enforced beside a pattern or a format")
        if key in _ONE and isinstance(value, dict):
            _walk(tool, value, at)
        elif key in _LIST:
            for i, sub in enumerate(value):
                _walk(tool, sub, f"{at}[{i}]")
        elif key in _MAP:
            for name, sub in value.items():
                _walk(tool, sub, f"{at}.{name}")


def _limits(tool: str, params: dict[str, Any], room: int) -> int:
    """Refuse a schema past the compile limits (MAX_*); the number of objects and arrays
    it holds. Walked without recursion, and stopped at the first limit passed."""
    nodes = 0
    stack: list[tuple[Any, int, str]] = [(params, 1, "parameters")]
    while stack:
        item, level, at = stack.pop()
        if isinstance(item, dict):
            pairs = list(item.items())
        elif isinstance(item, list):
            if len(item) > MAX_ENUM:
                raise _refuse(tool, at.rsplit(".", 1)[-1], at, f"{len(item)} values; the limit is {MAX_ENUM}")
            pairs = [(str(i), v) for i, v in enumerate(item)]
        else:
            if at.endswith(".pattern") and isinstance(item, str) and len(item) > MAX_PATTERN:
                raise _refuse(tool, "pattern", at, f"{len(item)} characters; the limit is {MAX_PATTERN}")
            continue
        nodes += 1
        if level > MAX_DEPTH:
            raise _refuse(tool, "depth", at, f"nested more than {MAX_DEPTH} levels deep")
        if nodes > room:
            raise _refuse(tool, "size", "parameters", f"the tools' schemas hold over {MAX_NODES} "
                                                      "objects and arrays")
        stack.extend((v, level + 1, f"{at}.{k}") for k, v in pairs)
    return nodes


def _refuse(tool: str, keyword: str, where: str, why: str) -> UnsupportedSchema:
    exc = UnsupportedSchema(tool, f"{keyword} at {where}: {why}")
    exc.data.update(keyword=keyword, path=where)
    exc.keyword = keyword
    return exc


def tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def for_grammar(schema: dict[str, Any]) -> dict[str, Any]:
    """The checked schema rewritten into what xgrammar compiles (see the module doc)."""
    return _rewrite(copy.deepcopy(schema))


def _rewrite(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            schema[key] = _rewrite(schema[key])
    for key in _LIST:
        if isinstance(schema.get(key), list):
            schema[key] = [_rewrite(s) for s in schema[key]]
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            schema[key] = {k: _rewrite(v) for k, v in schema[key].items()}
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
        (member,) = schema.pop("allOf")
        for key, value in (member.items() if isinstance(member, dict) else ()):
            schema.setdefault(key, value)  # check_tools refused members that clash
    is_object = schema.get("type") == "object" or (
        isinstance(schema.get("type"), list) and "object" in schema["type"])
    if is_object and "properties" not in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = True
    # xgrammar forces only the required members it has a schema for: a required name
    # with no entry in `properties` gets the schema any extra member would have.
    undeclared = [name for name in schema.get("required", []) if name not in schema.get("properties", {})]
    if is_object and undeclared:
        extra = schema.get("additionalProperties", True)
        schema.setdefault("properties", {}).update(
            {name: extra if isinstance(extra, dict) else {} for name in undeclared})
    return schema


def coverage_table() -> str:
    """The coverage table for docs/json-schema.md (a test keeps the file in step)."""
    rows = ["| keyword | decoding | |", "|---|---|---|"]
    for key, how in ENFORCED.items():
        rows.append(f"| `{key}` | enforced | {how} |")
    for key, why in UNSUPPORTED.items():
        rows.append(f"| `{key}` | refused | {why} |")
    rows.append(f"| {', '.join(f'`{a}`' for a in sorted(ANNOTATIONS))}, `x-*` | allowed | "
                "annotations: they describe, never constrain |")
    rows.append("| anything else | refused | not a keyword Outpost knows: a misspelt constraint "
                "would otherwise be ignored |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(coverage_table())
