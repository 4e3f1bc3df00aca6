"""The auto benchmark's own pieces: the split keeps scored questions out of the fit, the
follow-up turns are an agent loop's second turn, answers are judged by BFCL's checker;
and the one command, end to end in miniature (Outpost and one peer)."""

from __future__ import annotations

import json

import pytest

from outpost.tools import bench_auto, bfcl

pytest.importorskip("bfcl_eval")


def test_the_halves_are_disjoint_stable_and_every_scored_question_is_out_of_the_fit():
    categories = ["simple_python", "irrelevance"]
    fit = bench_auto.questions(categories, "calibration", None, 10)
    scored = bench_auto.questions(categories, "scored", 5, 3)
    assert not {q.item.id for q in fit} & {q.item.id for q in scored}
    both = bench_auto.questions(categories, "calibration", None, 10, ("bfcl", "plain"))
    assert [q.id for q in both] == [q.id for q in fit] + [q.id + "~plain" for q in fit]
    plain = both[len(fit):]
    assert all(m["role"] != "system" for q in plain for m in q.messages)
    assert [q.messages for q in plain] == [q.messages[1:] for q in fit]  # the same turns, no system prompt
    assert [q.id for q in bench_auto.questions(categories, "scored", 5, 3)] == [q.id for q in scored]
    assert [q.category for q in scored].count("simple_python") == 5 and len(scored) == 5 + 5 + 3
    follow = [q for q in scored if q.category == bench_auto.FOLLOW_UP]
    for q in follow:  # the question, its reference call, the tool's result: an answer is right
        assert [m["role"] for m in q.messages[-2:]] == ["assistant", "tool"] and not q.expects_call
        call = q.messages[-2]["tool_calls"][0]["function"]
        assert call["name"] == q.item.functions[0]["name"] and isinstance(json.loads(call["arguments"]), dict)
    labels = [json.loads(bench_auto.labelled_line(q)) for q in fit]
    assert {row["call"] for row in labels} == {True, False}
    assert all(row["call"] == bfcl.expects_call(q.category) for row, q in zip(labels, fit) if q.category != "follow_up")


def test_answers_are_judged_on_the_decision_and_by_bfcls_checker():
    check = bfcl._checker()
    [q] = [q for q in bench_auto.questions(["simple_python"], "scored", 1, 0)]
    right = {"tool_calls": [bench_auto.reference_call(q.item)]}
    a = bench_auto.judge("s", q, right, 10.0, check)
    assert (a.called, a.decision_right, a.ast, a.valid) == (True, True, True, True)
    text = bench_auto.judge("s", q, {"content": "It is 42."}, 10.0, check)
    assert (text.decision_right, text.ast, text.valid) == (False, False, False)
    broken = {"tool_calls": [{"function": {"name": q.item.functions[0]["name"], "arguments": "{not json"}}]}
    bad = bench_auto.judge("s", q, broken, 10.0, check)
    assert bad.decision_right and not bad.ast and not bad.valid
    failed = bench_auto.judge("s", q, {}, 10.0, check, error="context_overflow: too long")
    assert not (failed.decision_right or failed.ast or failed.valid)
    [irrelevant] = bench_auto.questions(["irrelevance"], "scored", 1, 0)
    assert bench_auto.judge("s", irrelevant, {"content": "I cannot."}, 1.0, check).ast


@pytest.mark.slow  # a small fit, the daemon and llama-cpp-python's server: about 4 minutes
def test_the_benchmark_runs_end_to_end_in_miniature(tmp_path, model_cache, capsys):
    code = bench_auto.main(["--categories", "simple_python", "irrelevance", "--limit", "2",
                            "--calibration-limit", "8", "--follow-ups", "3", "--peers", "llama-cpp-python",
                            "--store", str(model_cache.root), "--out", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "bench_auto.json").read_text())
    assert doc["calibration"]["turns"] == 2 * (8 + 8 + 3)  # asked with BFCL's system prompt and plain
    results = doc["results"]
    assert set(results) == {"outpost-uncalibrated", "outpost-auto", "outpost-required", "llama-cpp-python",
                            "outpost-auto/plain", "llama-cpp-python/plain"}
    for system in ("outpost-uncalibrated", "outpost-auto", "llama-cpp-python", "outpost-auto/plain",
                   "llama-cpp-python/plain"):
        assert {c: s["n"] for c, s in results[system]["categories"].items()} == {
            "simple_python": 2, "irrelevance": 2, "follow_up": 2}
    assert set(results["outpost-required"]["categories"]) == {"simple_python"}
    assert "auroc" in results["outpost-auto"]["summary"]
    printed = capsys.readouterr().out
    assert "balanced" in printed and "llama-cpp-python" in printed
    # A second run resumes: every answer is read back, none asked again.
    assert bench_auto.main(["--categories", "simple_python", "irrelevance", "--limit", "2",
                            "--calibration-limit", "8", "--follow-ups", "3", "--peers",
                            "--store", str(model_cache.root), "--out", str(tmp_path)]) == 0
