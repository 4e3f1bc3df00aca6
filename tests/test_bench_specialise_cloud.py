"""bench_specialise with a real teacher (`--cloud-url`) rather than its own oracle: the
daemon asks that server over HTTP in shadow, with the key named by `--cloud-key-env`,
and the loop (export, S4-S6, the held-out half) runs on what it answered. The teacher
here is an OracleServer the test starts itself, requiring a key as a cloud does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from outpost.tools import bench_specialise, bfcl
from outpost.tools.oracle_server import OracleServer, ground_truth_call, question_of

LIMIT = 16  # BFCL questions: about half trained on, the rest held out


def test_the_teacher_refuses_a_request_without_its_key():
    items = bfcl.load("simple_python", 1)
    body = json.dumps({"model": "teacher-x", "messages": items[0].messages}).encode()
    with OracleServer(items, model="teacher-x", api_key="sk-test-teacher") as cloud:
        def post(headers: dict[str, str]) -> int:
            req = urllib.request.Request(f"{cloud.base_url}/chat/completions", body,
                                         {"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(req, timeout=10) as reply:
                    return reply.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post({}) == 401
        assert post({"Authorization": "Bearer sk-wrong"}) == 401
        assert post({"Authorization": "Bearer sk-test-teacher"}) == 200
        assert cloud.requests == 1  # a refused request is not an answer


@pytest.mark.slow
def test_a_cloud_url_teaches_the_loop_with_its_key(tmp_path, model_cache, monkeypatch, capsys):
    pytest.importorskip("peft")
    items = bfcl.load("simple_python", LIMIT)
    train_items, _ = bench_specialise.split(items)
    monkeypatch.setenv("OUTPOST_TEST_TEACHER_KEY", "sk-test-teacher")
    with OracleServer(items, model="teacher-x", api_key="sk-test-teacher") as cloud:
        rc = bench_specialise.main([
            "--cloud-url", cloud.base_url, "--cloud-model", "teacher-x",
            "--cloud-key-env", "OUTPOST_TEST_TEACHER_KEY", "--limit", str(LIMIT), "--heldout-limit", "2",
            "--sizes", "", "--epochs", "1", "--threads", "2", "--no-gemma", "--store", str(model_cache.root),
            "--out", str(tmp_path / "run"),
            "--json"])
        asked = cloud.requests
    assert rc == 0
    run = json.loads(capsys.readouterr().out)
    assert run["teacher"] == f"cloud (teacher-x at {cloud.base_url})" and run["oracle"] is None
    # Every training question reached the teacher once, bearing the key (a request
    # without it is answered 401, which shadow would log as a failed cloud attempt).
    assert asked == len(train_items)
    assert run["export"]["train"] + run["export"]["val"] == len(train_items)
    assert run["export"]["val"] >= 1  # the gate had examples (the export's hash split)
    # The exported targets are the teacher's answers, not the local model's.
    truth = {question_of(i.messages): ground_truth_call(i) for i in train_items}
    for line in (tmp_path / "run" / "export" / "examples.jsonl").read_text().splitlines():
        example = json.loads(line)
        answer = example["messages"][-1]
        expected = truth[question_of(example["messages"][:-1])]
        assert [c["function"] for c in answer["tool_calls"]] == [c["function"] for c in expected]
    # S4-S6 ran on them, and the held-out questions were asked of the base and the adapter.
    assert run["specialise"]["train"]["examples"] == run["export"]["train"]
    assert run["base"]["n"] == 2 and run["curve"][0]["n"] == 2
