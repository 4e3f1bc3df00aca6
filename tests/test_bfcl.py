"""The BFCL harness: BFCL's data and AST checker without its dependencies, and a short
run through a real daemon with SmolLM2."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from outpost.tools import bfcl

from .conftest import SMOLLM2, TINY, make_data_dir


def test_the_checker_scores_without_the_model_client_packages():
    check = bfcl._checker()
    [item] = [i for i in bfcl.load("simple_python", 3) if i.id == "simple_python_1"]
    right = [{"math.factorial": {"number": 5}}]
    wrong = [{"math.factorial": {"number": 6}}]
    assert check(item, right)["valid"] is True
    assert check(item, wrong)["valid"] is False
    assert not any(name.startswith("bfcl_eval.model_handler") for name in sys.modules)


def test_every_category_loads_with_its_answers():
    for category in bfcl.CATEGORIES:
        items = bfcl.load(category, 5)
        assert len(items) == 5 and all(i.messages and i.functions for i in items)
        assert all((i.answer is None) == (category == "irrelevance") for i in items)


def test_bfcl_functions_become_valid_openai_tools():
    from outpost.models.schemas import check_tools

    for category in bfcl.CATEGORIES:
        for item in bfcl.load(category):
            check_tools(bfcl.to_tools(item.functions))  # raises if any would be refused


def test_executable_means_the_arguments_bind_to_the_signature():
    fn = [{"name": "f", "parameters": {"type": "dict", "properties": {"a": {}, "b": {}}, "required": ["a"]}}]
    assert bfcl.executable([{"f": {"a": 1}}], fn)
    assert not bfcl.executable([{"f": {"b": 1}}], fn)  # required a is missing
    assert not bfcl.executable([{"f": {"a": 1, "c": 2}}], fn)  # c is not a parameter
    assert not bfcl.executable([{"g": {"a": 1}}], fn)


@pytest.mark.slow
def test_a_short_run_through_an_in_process_daemon(tmp_path, model_cache, tiny_gguf, capsys,
                                                  monkeypatch):
    data = make_data_dir(tmp_path, tiny_gguf, model_cache)
    monkeypatch.setenv("OUTPOST_DATA_DIR", str(data))
    monkeypatch.delenv("OUTPOST_ENDPOINT", raising=False)
    monkeypatch.delenv("OUTPOST_CONFIG", raising=False)
    code = bfcl.main(["--in-process", "--model", SMOLLM2, TINY, "--limit", "2", "--json",
                      "--categories", "simple_python", "irrelevance",
                      "--outcomes", str(tmp_path / "out.jsonl")])
    assert code == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert set(results) == {SMOLLM2, TINY}  # two models, one report
    for summary in results.values():
        for category in ("simple_python", "irrelevance"):
            constrained = summary[category]["constrained"]
            assert constrained["n"] == 2 and constrained["valid"] == 1.0 and constrained["errors"] == 0
            assert set(summary[category]) == {"constrained", "unconstrained"}
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["mode"] for r in rows} == {"constrained", "unconstrained"}
    assert {r["model"] for r in rows} == {SMOLLM2, TINY}
    text = bfcl.table(bfcl.summarize_all([bfcl.Outcome(**r) for r in rows], [SMOLLM2, TINY],
                                         ["simple_python"], ["constrained"]))
    assert [line.split()[0] for line in text.splitlines()[2:]] == [SMOLLM2, TINY]


def test_auroc_and_the_routing_replay():
    assert bfcl.auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert bfcl.auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert bfcl.auroc([0.5, 0.5], [True, False]) == 0.5
    assert bfcl.auroc([0.5], [True]) is None
    outcomes = [bfcl.Outcome(str(i), "simple_python", "constrained", ast=ok, valid=True, executable=True,
                             repaired=0, latency_ms=1.0, tokens=1, score=score, cloud_ast=True, cloud_tokens=100)
                for i, (score, ok) in enumerate([(0.9, True), (0.8, True), (0.6, False), (0.3, True), (0.1, False)])]
    r = bfcl.routing(outcomes, [0.0, 0.5, 1.0])
    assert r["local_accuracy"] == 0.6 and r["auroc"] == pytest.approx(5 / 6)
    everything, half, none = r["thresholds"]
    assert everything["kept_share"] == 1.0 and everything["cloud_tokens"] == 0
    assert half["kept_share"] == 0.6 and half["kept_accuracy"] == pytest.approx(2 / 3)
    assert half["end_to_end_accuracy"] == 0.8 and half["cloud_tokens"] == 200
    assert none["kept_accuracy"] is None and none["end_to_end_accuracy"] == 1.0
    png = Path(tempfile.mkdtemp()) / "curve.png"
    bfcl.plot(r, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
