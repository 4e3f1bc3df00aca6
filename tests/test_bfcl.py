"""The BFCL harness: BFCL's data and AST checker without its dependencies, and a short
run through a real daemon with SmolLM2."""

from __future__ import annotations

import json
import sys

import pytest

from outpost.tools import bfcl

from .conftest import SMOLLM2, make_data_dir


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
    code = bfcl.main(["--in-process", "--model", SMOLLM2, "--limit", "2", "--json",
                      "--categories", "simple_python", "irrelevance",
                      "--outcomes", str(tmp_path / "out.jsonl")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    for category in ("simple_python", "irrelevance"):
        constrained = summary[category]["constrained"]
        assert constrained["n"] == 2 and constrained["valid"] == 1.0 and constrained["errors"] == 0
        assert set(summary[category]) == {"constrained", "unconstrained"}
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["mode"] for r in rows} == {"constrained", "unconstrained"}
