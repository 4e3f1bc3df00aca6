"""`specialise --augment`: variants of logged tool-call examples, the values the request
spells out swapped in the request and the call alike, and nothing else touched."""

from __future__ import annotations

import json
import re

import pytest

from outpost.runtime.cli import build_parser
from outpost.tools.specialise.augment import augment
from outpost.tools.specialise.data import Example

AREA = {"type": "function", "function": {
    "name": "triangle_area", "description": "Area of a triangle.",
    "parameters": {"type": "object", "properties": {
        "base": {"type": "integer"}, "height": {"type": "number"},
        "unit": {"type": "string", "enum": ["meters", "feet"]}}}}}
CAPITAL = {"type": "function", "function": {
    "name": "capital", "description": "The capital of a country.",
    "parameters": {"type": "object", "properties": {"country": {"type": "string"}}}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}


def example(question: str, tool: dict, arguments: dict, *more: tuple[dict, dict],
            system: str = "Call a function.") -> Example:
    calls = [(tool, arguments), *more]
    return Example.from_json({"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": t["function"]["name"],
                                                             "arguments": json.dumps(a)}}
            for i, (t, a) in enumerate(calls)]}],
        "tools": list({t["function"]["name"]: t for t, _ in calls}.values()), "parallel_tool_calls": len(calls) > 1})


def question(ex: Example) -> str:
    return ex.messages[-1]["content"]


def test_a_number_the_request_spells_out_is_swapped_in_both_and_keeps_its_shape():
    ex = example("Area of a triangle with base 12 and height 4.25 in meters?", AREA,
                 {"base": 12, "height": 4.25, "unit": "meters"})
    variants = augment([ex], copies=3, seed=1)
    assert len(variants) == 3
    for v in variants:
        args = v.calls[0].arguments
        assert v.calls[0].name == "triangle_area" and v.tools == ex.tools
        assert isinstance(args["base"], int) and 10 <= args["base"] <= 99  # two digits, as 12
        assert isinstance(args["height"], float) and re.fullmatch(r"\d\.\d{1,2}", json.dumps(args["height"]))
        height = json.dumps(args["height"])
        assert question(v) == f"Area of a triangle with base {args['base']} and height {height} in meters?"
        assert args["unit"] == "meters"  # an enum member is never swapped
        assert v.messages[0] == ex.messages[0]  # the system prompt is untouched


def test_a_string_is_swapped_only_for_another_logged_under_the_same_argument_name():
    logged = [example("Weather in Boston for 3 days", WEATHER, {"city": "Boston", "days": 3}),
              example("Weather in Lyon for 5 days", WEATHER, {"city": "Lyon", "days": 5}),
              example("What is the capital of France?", CAPITAL, {"country": "France"})]
    variants = augment(logged, copies=4, seed=0)
    assert variants and all(v.calls[0].name == "weather" for v in variants)  # no other country logged
    cities = set()
    for v in variants:
        args = v.calls[0].arguments
        assert question(v) == f"Weather in {args['city']} for {args['days']} days"
        cities.add(args["city"])
    assert cities == {"Boston", "Lyon"}  # never "France"


def test_what_is_not_a_verbatim_copy_is_left_and_an_example_without_one_yields_nothing():
    converted = example("Area with base 3 km and height 250 m", AREA, {"base": 3000, "height": 250.0})
    twice = example("Base 5 and height 5", AREA, {"base": 5, "height": 5.5})
    inside = example("Base 12 and height 123.5", AREA, {"base": 12, "height": 123.5})
    assert augment([converted], copies=3) == []  # 3000 and 250.0 are not spelled out as such
    assert augment([twice], copies=3) == []  # "5" occurs twice, and 5.5 not at all
    variants = augment([inside], copies=3)  # 12 is a token of its own, not the "12" inside 123.5
    assert variants
    for v in variants:
        args = v.calls[0].arguments
        assert question(v) == f"Base {args['base']} and height {json.dumps(args['height'])}"


def test_variants_are_deterministic_in_the_seed_and_never_repeat_the_logged_examples():
    logged = [example(f"Weather in Oslo for {d} days", WEATHER, {"city": "Oslo", "days": d}) for d in (2, 3, 4)]
    first, again, other = augment(logged, 2, seed=0), augment(logged, 2, seed=0), augment(logged, 2, seed=9)
    assert [v.line for v in first] == [v.line for v in again]
    assert [v.line for v in first] != [v.line for v in other]
    lines = [v.line for v in first] + [ex.line for ex in logged]
    assert len(lines) == len(set(lines))
    assert augment(logged, 0) == []


def test_a_negative_augment_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["specialise", "clock", "--augment", "-1"])
    assert exited.value.code == 2 and "-1 is negative" in capsys.readouterr().err


ROUTE = {"type": "function", "function": {
    "name": "route", "description": "A route through points.",
    "parameters": {"type": "object", "properties": {
        "points": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "speed": {"type": "integer", "enum": [30, 50]},
        "grade": {"type": "number", "maximum": 5}}}}}


def test_negatives_nested_lists_enums_and_limits_are_respected():
    ex = example("Route through (33.44, -112.07) and (34.05, -118.24) at 50, grade 4.5", ROUTE,
                 {"points": [[33.44, -112.07], [34.05, -118.24]], "speed": 50, "grade": 4.5})
    variants = augment([ex], copies=5, seed=3)
    assert variants
    for v in variants:
        args = v.calls[0].arguments
        (a, b), (c, d) = args["points"]
        assert b < 0 and d < 0 and a > 0 and c > 0  # signs kept
        grade = f", grade {json.dumps(args['grade'])}"
        assert question(v) == f"Route through ({a}, {b}) and ({c}, {d}) at 50{grade}"
        assert args["speed"] == 50  # an enum member, a number too
        assert args["grade"] <= 5  # a swap past the schema's maximum is dropped


def test_a_value_the_context_also_says_or_a_longer_number_holds_is_not_swapped():
    in_system = example("Weather in Boston for 3 days", WEATHER, {"city": "Boston", "days": 3},
                        system="The user lives in Boston.")
    other = example("Weather in Lyon for 5 days", WEATHER, {"city": "Lyon", "days": 5})
    for v in augment([in_system, other], copies=3):
        if "lives in Boston" in v.messages[0]["content"]:
            assert v.calls[0].arguments["city"] == "Boston"  # the system prompt says it too
    thousands = example("Weather in Oslo for 1,500 days, starting in 1 day", WEATHER, {"city": "Oslo", "days": 1})
    for v in augment([thousands], copies=3):
        assert "1,500" in question(v)  # the 1 of "1,500" is not the 1 of "1 day"
        assert question(v).endswith(f"starting in {v.calls[0].arguments['days']} day")


def test_a_call_with_nothing_swapped_stays_as_logged():
    ex = example("Weather in Bergen for 4 days, and the capital of Norway", WEATHER, {"city": "Bergen", "days": 4},
                 (CAPITAL, {"country": "Norway"}))
    variants = augment([ex], copies=2)
    assert variants
    for v in variants:
        assert v.answer["tool_calls"][1] == ex.answer["tool_calls"][1]  # Norway has no other country to be
        assert v.answer["tool_calls"][0] != ex.answer["tool_calls"][0]


def test_a_value_the_answer_or_an_earlier_call_repeats_is_not_swapped():
    said = example("Weather in Boston for 3 days", WEATHER, {"city": "Boston", "days": 3})
    said = Example.from_json({**json.loads(said.line), "messages": [
        *said.messages, {**said.answer, "content": "Looking up Boston."}]})
    earlier = Example.from_json({**json.loads(said.line), "messages": [
        {"role": "user", "content": "Weather at home?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c9", "type": "function", "function": {
            "name": "weather", "arguments": json.dumps({"city": "Lyon", "days": 1})}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "rain"},
        {"role": "user", "content": "And in Lyon for 4 days?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {
            "name": "weather", "arguments": json.dumps({"city": "Lyon", "days": 4})}}]}]})
    variants = augment([said, earlier], copies=3)
    assert {v.answer.get("content") for v in variants} == {"Looking up Boston.", None}  # days moved in both
    for v in variants:
        if "Looking up Boston." == v.answer.get("content"):
            assert v.calls[0].arguments["city"] == "Boston"
        else:
            assert v.calls[0].arguments["city"] == "Lyon"  # the earlier call says Lyon too


def test_no_variant_asks_what_a_held_out_example_asks():
    logged = [example("Weather in Boston for 3 days", WEATHER, {"city": "Boston", "days": 3}),
              example("Weather in Lyon for 5 days", WEATHER, {"city": "Lyon", "days": 5})]
    heldout = example("Weather in Lyon for 3 days", WEATHER, {"city": "Lyon", "days": 3})
    rebuilt = [v for v in augment(logged, copies=20) if question(v) == question(heldout)]
    assert rebuilt  # without `exclude`, a variant asks the held-out question
    assert not [v for v in augment(logged, copies=20, exclude=[heldout]) if question(v) == question(heldout)]
