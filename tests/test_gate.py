"""The promotion gate's statistics and the comparison of calls, on counted outcomes."""

from __future__ import annotations

import json

import pytest

from outpost.tools.specialise.data import BadExample, Call, Example, load
from outpost.tools.specialise.evaluate import same_calls
from outpost.tools.specialise.gate import decide, mcnemar_p


def test_mcnemar_exact_one_sided():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_p(6, 1) == pytest.approx(8 / 128)  # P(X >= 6), X ~ B(7, 1/2)
    assert mcnemar_p(1, 6) > 0.9


def test_the_gate_promotes_only_a_clear_improvement():
    right, wrong = (True, True), (False, True)
    # 40 held-out examples: 20 both right, 12 only the candidate, 2 only the incumbent.
    cand = [right] * 20 + [right] * 12 + [wrong] * 2 + [wrong] * 6
    inc = [right] * 20 + [wrong] * 12 + [right] * 2 + [wrong] * 6
    verdict = decide(cand, inc)
    assert verdict.promote and verdict.wins == 12 and verdict.losses == 2 and verdict.p_value < 0.01
    # Better by one example out of 40 is not evidence.
    close = decide([right] * 21 + [wrong] * 19, [right] * 20 + [wrong] * 20)
    assert not close.promote and close.reason.startswith("better, but not clearly: 1 win, 0 losses, p = 0.500")
    assert decide(inc, cand).reason == "not better (2 wins, 12 losses)"
    # A worse candidate is kept out, and so is one with fewer valid calls.
    assert not decide(inc, cand).promote
    invalid = [(True, False)] + cand[1:]
    assert "valid" in decide(invalid, inc).reason


def test_the_gate_keeps_out_a_candidate_that_decides_worse():
    """More examples right, but it calls where the incumbent rightly answered: refused."""
    right, wrong_call = (True, True, True), (False, True, False)
    inc = [right] * 20 + [(False, True, True)] * 12 + [right] * 8
    cand = [right] * 20 + [right] * 12 + [wrong_call] * 8
    verdict = decide(cand, inc)
    assert verdict.wins == 12 and verdict.losses == 8 and not verdict.promote
    assert verdict.reason == "decides worse between calling and answering (80.0% vs 100.0%)"
    assert (verdict.candidate_decisions, verdict.incumbent_decisions) == (0.8, 1.0)
    # Rows without the decision (required-only evaluations) count it as right.
    assert decide([(True, True)] * 6, [(False, True)] * 6).promote


def test_calls_compare_by_name_and_parsed_arguments():
    want = [Call("f", {"a": 1, "b": [1, 2]}), Call("g", {})]
    got = [{"function": {"name": "g", "arguments": "{}"}},
           {"function": {"name": "f", "arguments": json.dumps({"b": [1.0, 2], "a": 1.0})}}]
    assert same_calls(got, want)
    assert not same_calls(got[:1], want)
    assert not same_calls([{"function": {"name": "f", "arguments": "{\"a\": 2, \"b\": [1, 2]}"}}, got[0]], want)


def test_a_malformed_examples_file_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(BadExample) as info:
        load(path)
    assert info.value.line == 2 and info.value.code == "bad_example"
    path.write_text(json.dumps(good) + "\n")
    (ex,) = load(path)
    assert isinstance(ex, Example) and ex.answer["content"] == "hello" and ex.tool_choice == "auto"
