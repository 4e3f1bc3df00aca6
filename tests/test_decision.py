"""Under tool_choice auto the call-or-answer decision is a step of its own: made before
any token, from the model's own evidence, by the served version's rule; recorded in
the reply and the log; used by escalation; fitted by `outpost models calibrate`, stored
with the version and restored by `models rollback`.

The tiny random model makes the mechanics exact (a rule whose bias is +50 always calls,
one whose score sits on its threshold is as unsure as a decision can be); SmolLM2
shows the behaviour (tests/test_decision_smollm2.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import BadRequest
from outpost.manifests.schema import DecisionRule, Manifest
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest
from outpost.models.decision import Decision, Evidence, Rule, probe_layout
from outpost.models.templates import TOOL_CALL_OPEN
from outpost.runtime.logs import queries, schema
from outpost.tools import calibrate, decision_fit
from outpost.tools.oracle_server import OracleServer
from outpost.tools import bfcl

from .conftest import REPO, TINY, make_data_dir, start_daemon, tiny_manifest_toml, write_tiny_gguf
from .test_streaming import reassemble

WEATHER = json.loads((REPO / "examples" / "weather_tool.json").read_text())
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALLER, THIN = "tiny-caller", "tiny-thin"


def rule_table(bias: float, open_weight: float = 0.0, threshold: float = 0.0) -> str:
    return f"\n[decision]\nbias = {bias}\nopen_weight = {open_weight}\nthreshold = {threshold}\n"


def add_with_rule(data: Path, model_id: str, table: str) -> None:
    """Another tiny model, with a fitted rule of its own."""
    gguf = write_tiny_gguf(data / f"{model_id}.gguf")
    text = tiny_manifest_toml(gguf, model_id=model_id) + table
    (data / "manifests" / f"{model_id}.toml").write_text(text)
    store = ModelStore(data / "models")
    store.pull(Catalog.load(store, [data / "manifests"], TINY).get(model_id), text)


def with_rules(root: Path, tiny_gguf: Path) -> Path:
    data = make_data_dir(root, tiny_gguf)
    add_with_rule(data, CALLER, rule_table(50.0))  # a score far above its threshold: always a call
    add_with_rule(data, THIN, rule_table(0.0))  # a score on its threshold: a call at even odds
    return data


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_gguf) -> Path:
    return with_rules(tmp_path_factory.mktemp("decision"), tiny_gguf)


@pytest.fixture(scope="module")
def daemon(data):
    running = start_daemon(data, TINY)
    yield running
    running.stop()


@pytest.fixture
def chat(daemon):
    with daemon.client() as c:
        yield c


def attempt(daemon, log_id: int) -> dict:
    db = schema.open_db(daemon.settings.log_path)
    try:
        return queries.get_request(db, log_id)["attempts"][0]
    finally:
        db.close()


# -- the pieces ------------------------------------------------------------------------------
def test_evidence_is_the_log_odds_of_the_tokens_that_open_a_call():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    opens = np.array([False, True, False, True])
    ev = Evidence.read(logits, opens, None)
    assert ev.p_open == pytest.approx(0.6) and ev.open_logodds == pytest.approx(math.log(0.6 / 0.4))
    # A grammar that opens with every token (or none) stays finite.
    assert math.isfinite(Evidence.read(logits, np.ones(4, bool), None).open_logodds)
    assert math.isfinite(Evidence.read(logits, np.zeros(4, bool), None).open_logodds)


def test_a_rule_scores_log_odds_and_its_confidence_is_the_chosen_sides_probability():
    stride, width = probe_layout(8)
    assert (stride, width) == (1, 8)
    turn_end = np.arange(8, dtype=np.float32)
    ev = Evidence(open_logodds=-2.0, turn_end=turn_end)
    weights = (1.0,) + (0.0,) * 7  # reads the first logit, centred: 0 - 3.5
    rule = Rule(bias=1.0, open_weight=0.5, threshold=-1.0, probe_stride=1, probe_weights=weights, name="m 1")
    d = rule.decide(ev)
    assert d.score == pytest.approx(1.0 - 1.0 - 3.5) and d.choice == "answer"
    assert d.confidence == pytest.approx(1 - 1 / (1 + math.exp(3.5)), abs=1e-4) and d.rule == "m 1"
    calls = Rule(threshold=-3.0).decide(ev)  # uncalibrated weights: the open log-odds alone
    assert calls.choice == "call" and calls.confidence == pytest.approx(1 / (1 + math.exp(2.0)), abs=1e-4)
    # The request and the generation carry them across the worker boundary as JSON.
    request = GenerationRequest(messages=ASK, tools=WEATHER, decision=rule)
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    assert Decision.from_dict(json.loads(json.dumps(d.__dict__))) == d


def test_the_uncalibrated_rule_is_the_models_own_even_odds():
    assert Rule().decide(Evidence(open_logodds=0.01)).choice == "call"
    assert Rule().decide(Evidence(open_logodds=-0.01)).choice == "answer"
    manifest = Manifest.from_toml(tiny_manifest_toml(Path(__file__)))  # any file: only read as TOML
    assert Rule.of(manifest) == Rule()


def test_auroc_and_the_operating_point():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    labels = scores + rng.normal(scale=0.8, size=200) > 0
    brute = np.mean([[(p > n) + 0.5 * (p == n) for n in scores[~labels]] for p in scores[labels]])
    assert decision_fit.auroc(scores, labels) == pytest.approx(brute)
    point = decision_fit.operating_point(scores, labels, 0.9)
    assert point.recall >= 0.9 and np.mean(scores[labels] >= point.threshold) == pytest.approx(point.recall)
    assert not (scores == point.threshold).any()  # between two scores, not on one
    best = decision_fit.operating_point(scores, labels, None)
    assert best.balanced >= point.balanced


def test_a_fit_separates_what_the_evidence_separates():
    rng = np.random.default_rng(1)
    n, k = 200, 16
    labels = rng.random(n) < 0.5
    probe = rng.normal(size=(n, k))
    probe[:, 3] += np.where(labels, 1.5, -1.5)  # one reading carries the label
    features = decision_fit.Features(open_logodds=rng.normal(size=n), probe=probe, stride=1)
    fit = decision_fit.fit(features, labels, [str(i) for i in range(n)])
    assert fit.auroc > 0.9 and abs(fit.weights[4]) == max(abs(fit.weights))
    # The stored rule, applied to raw evidence, scores as the fit does.
    rule = Rule.from_fitted(fit.rule(0.0, 1, "synthetic", int(labels.sum())), "x 1")
    ev = Evidence(open_logodds=float(features.open_logodds[0]), turn_end=np.asarray(probe[0], np.float32))
    centred = probe[0] - probe[0].mean()
    expected = fit.bias + fit.weights[0] * features.open_logodds[0] + fit.weights[1:] @ centred
    assert rule.score(ev) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(decision_fit.TooFewTurns):
        decision_fit.fit(features.take(np.arange(8)), np.array([True] * 7 + [False]), [str(i) for i in range(8)])


def test_labelled_turns_from_a_file_are_checked_line_by_line(tmp_path):
    good = {"messages": ASK, "tools": WEATHER, "call": True}
    exported = {"messages": [*ASK, {"role": "assistant", "content": "Sunny."}], "tools": WEATHER}
    path = tmp_path / "turns.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(exported) + "\n")
    turns = calibrate.from_file(path)
    assert [t.call for t in turns] == [True, False] and turns[1].messages == ASK
    for bad, why in (("{", "not JSON"), (json.dumps({**good, "call": "yes"}), "true or false"),
                     (json.dumps({"messages": ASK, "tools": []}), "nothing to decide"),
                     (json.dumps({"messages": ASK, "tools": WEATHER}), "no `call` label")):
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(calibrate.BadRequest, match=why) as err:
            calibrate.from_file(path)
        assert err.value.data["line"] == 2


# -- through the daemon ----------------------------------------------------------------------
def test_evidence_needs_tools_and_the_grammar(tiny_gguf):
    """`models calibrate` reads evidence through the decoder; a turn without tools, or
    with free decoding, has no call grammar to read it by: a typed error, not a guess."""
    from outpost.models.llama import LlamaModel  # noqa: PLC0415

    model = LlamaModel(Manifest.from_toml(tiny_manifest_toml(tiny_gguf)), tiny_gguf, n_threads=1)
    try:
        for request in (GenerationRequest(messages=ASK), GenerationRequest(messages=ASK, tools=WEATHER, constrained=False)):
            with pytest.raises(BadRequest, match="needs tools and the grammar"):
                model.evidence(request, Rule())
        evidence = model.evidence(GenerationRequest(messages=ASK, tools=WEATHER), Rule())
        assert math.isfinite(evidence.open_logodds)
    finally:
        model.close()


def test_auto_decides_first_and_says_why(chat, daemon):
    reply = chat.chat(ASK, tools=WEATHER, tool_choice="auto", max_tokens=24)
    d = reply["outpost"]["decision"]
    assert d["rule"] == "uncalibrated" and d["threshold"] == 0.0 and 0.0 <= d["p_open"] <= 1.0
    assert d["choice"] == ("call" if d["score"] >= 0 else "answer") and d["ms"] < 1000
    message = reply["choices"][0]["message"]
    assert bool(message.get("tool_calls")) == (d["choice"] == "call")
    assert TOOL_CALL_OPEN not in (message["content"] or "")
    row = attempt(daemon, reply["outpost"]["log_id"])
    assert (row["decision"], row["decision_score"], row["decision_threshold"], row["decision_rule"]) == (
        d["choice"], d["score"], d["threshold"], "uncalibrated")
    assert row["decision_confidence"] == d["confidence"] and "decided=" in row["grammar"]


def test_the_served_versions_rule_decides(chat, daemon):
    reply = chat.chat(ASK, model=CALLER, tools=WEATHER, max_tokens=64)  # tool_choice left out: auto
    d = reply["outpost"]["decision"]
    assert (d["choice"], d["rule"], d["confidence"]) == ("call", f"{CALLER} 1", 1.0)
    [call] = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and reply["outpost"]["validation"][0]["valid"]


@pytest.mark.parametrize("choice", ["required", "none", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_none_and_a_named_function_are_not_decided(chat, choice):
    reply = chat.chat(ASK, model=CALLER, tools=WEATHER, tool_choice=choice, max_tokens=64)
    message = reply["choices"][0]["message"]
    assert reply["outpost"]["decision"] is None
    if choice == "none":
        assert not message.get("tool_calls") and TOOL_CALL_OPEN not in (message["content"] or "")
    else:
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize("model", [TINY, CALLER])
def test_streamed_and_whole_answers_decide_alike(chat, model):
    whole = chat.chat(ASK, model=model, tools=WEATHER, tool_choice="auto", max_tokens=40)
    chunks = list(chat.chat_stream(ASK, model=model, tools=WEATHER, tool_choice="auto", max_tokens=40))
    content, calls, last = reassemble(chunks)
    message = whole["choices"][0]["message"]
    assert last["outpost"]["decision"]["choice"] == whole["outpost"]["decision"]["choice"]
    assert content == message["content"]
    assert [c["function"] for c in calls] == [c["function"] for c in message.get("tool_calls") or []]
    for call in calls:
        assert TOOL_CALL_OPEN not in call["function"]["name"] + call["function"]["arguments"]
    assert "<|im_end|>" not in (content or "") and TOOL_CALL_OPEN not in (content or "")


def test_a_thin_decision_is_a_doubtful_turn_and_escalates(tmp_path, tiny_gguf):
    """A score on its threshold: a call, at even odds. With on_low_confidence the turn
    goes to the cloud (a real HTTP server here), and the cloud's own decision is logged
    beside the local one."""
    item = bfcl.Item(id="w", category="simple_python", messages=ASK, functions=[WEATHER[0]["function"]],
                     answer=[{"get_weather": {"city": ["Paris"]}}])
    with OracleServer([item]) as cloud:
        d = start_daemon(with_rules(tmp_path, tiny_gguf), TINY, escalation={"policy": "on_low_confidence", "threshold": 0.6},
                         cloud={"base_url": cloud.base_url, "model": "teacher", "api_key_env": None})
        with d, d.client() as c:
            reply = c.chat(ASK, model=THIN, tools=WEATHER, max_tokens=64)
            out = reply["outpost"]
            assert out["decision"]["choice"] == "call" and out["decision"]["confidence"] == 0.5
            assert out["confidence_parts"]["decision"] == 0.5 and out["confidence"] <= 0.5
            assert out["escalated"] and out["answered_by"] == cloud.model
            db = schema.open_db(d.settings.log_path)
            local, remote = queries.get_request(db, out["log_id"])["attempts"]
            db.close()
            assert (local["kind"], local["decision"]) == ("local", "call")
            assert (remote["kind"], remote["decision"]) == ("cloud", "call")
            # A sure decision costs the turn's confidence nothing (random weights make
            # doubtful tokens, which escalate on their own account).
            sure = c.chat(ASK, model=CALLER, tools=WEATHER, max_tokens=64)["outpost"]
            assert sure["decision"]["confidence"] == 1.0 and sure["confidence_parts"]["decision"] == 1.0


# -- calibrate, the stored rule and rollback ---------------------------------------------------
def outpost(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("outpost")), *args], capture_output=True, text=True,
                          env={"OUTPOST_DATA_DIR": str(data), "OUTPOST_DEFAULT_MODEL": TINY,
                               "OUTPOST_MANIFEST_DIRS": json.dumps([str(data / "manifests")]),
                               "PATH": "/usr/bin:/bin"}, timeout=300)


def test_calibrate_applies_a_new_version_and_rollback_restores_the_rule(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    turns = tmp_path / "turns.jsonl"
    questions = [f"What is the weather in {city}?" for city in ("Paris", "Rome", "Oslo", "Lima", "Kyiv", "Pune")]
    chat_only = [f"Tell me a joke about {thing}." for thing in ("cats", "maths", "rain", "trains", "tea", "code")]
    turns.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "tools": WEATHER,
                                         "call": call}) + "\n"
                             for q, call in [*((q, True) for q in questions), *((q, False) for q in chat_only)]))
    done = outpost(data, "models", "calibrate", TINY, "--data", str(turns), "--apply", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["turns"] == 12 and report["calls"] == 6 and report["applied"]["active"]
    version = report["applied"]["version"]
    assert version == "1+cal1" and len(report["roc"]) >= 2
    store = ModelStore(data / "models")
    active = store.pulled_manifest(TINY)
    assert active.version == version and active.decision == DecisionRule(**report["rule"])
    with start_daemon(data, TINY) as d, d.client() as c:
        assert c.chat(ASK, tools=WEATHER, max_tokens=8)["outpost"]["decision"]["rule"] == f"{TINY} {version}"
    back = outpost(data, "models", "rollback", TINY)
    assert back.returncode == 0, back.stderr
    assert store.pulled_manifest(TINY).version == "1" and store.pulled_manifest(TINY).decision is None
    with start_daemon(data, TINY) as d, d.client() as c:
        assert c.chat(ASK, tools=WEATHER, max_tokens=8)["outpost"]["decision"]["rule"] == "uncalibrated"
    # Refitting numbers the next version after the last one.
    assert calibrate.next_version(store, store.pulled_manifest(TINY)) == "1+cal2"
    # A refit reads the turns it has read before from the cache, and fits the same rule.
    assert report["evidence_cached"] == 0
    again = outpost(data, "models", "calibrate", TINY, "--data", str(turns), "--json")
    assert again.returncode == 0, again.stderr
    refit = json.loads(again.stdout)
    assert refit["evidence_cached"] == 12 and refit["auroc"] == report["auroc"]
    same = ("bias", "open_weight", "threshold", "probe_stride", "probe_weights")
    assert {k: refit["rule"][k] for k in same} == {k: report["rule"][k] for k in same}


def test_a_rule_that_cannot_read_the_model_fails_the_smoke_test(tmp_path, tiny_gguf):
    """A version whose rule was fitted on another vocabulary is refused at activation (the
    smoke test asks under auto too, for a version with a rule), and a request that meets
    such a rule gets a typed error, not a crash."""
    from outpost.runtime.activation import activate

    data = make_data_dir(tmp_path, tiny_gguf)
    store = ModelStore(data / "models")
    catalog = Catalog.load(store, [data / "manifests"], TINY)
    wide = DecisionRule(bias=0.0, open_weight=1.0, threshold=0.0, probe_stride=10_000, probe_weights=[0.1] * 8)
    text = calibrate.with_rule(catalog.entry(TINY).text, "2", wide, "a rule from elsewhere")
    store.stage(Manifest.from_toml(text, "test"), text)
    d = start_daemon(data, TINY)
    with d:
        done = activate(d.settings, TINY, "2")
        assert not done.active and "reads 8 logits at stride 10000" in done.refused
        assert store.pulled_manifest(TINY).version == "1"
    assert Rule.from_fitted(wide, "x").misfit(1 << 20) is None


def test_calibrate_refuses_options_that_cannot_go_together(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    for extra in (["--data", "x.jsonl", "--task", "t"], ["--min-recall", "0.8", "--balanced"]):
        done = outpost(data, "models", "calibrate", TINY, *extra)
        assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_calibrate_says_what_is_missing(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    done = outpost(data, "models", "calibrate", TINY)  # an empty log: nothing labelled
    assert done.returncode == 1 and "not_enough_labels" in done.stderr and "0 labelled turns" in done.stderr


# -- the log: labels and stats -----------------------------------------------------------------
def test_labels_come_from_the_cloud_and_good_feedback_and_stats_count_the_cloud_checked(tmp_path):
    import asyncio

    from outpost.runtime.logs.decisions import labelled_turns
    from outpost.runtime.logs.records import AttemptKind, AttemptRecord, RequestRecord
    from outpost.runtime.logs.stats import stats
    from outpost.runtime.logs.store import LogStore

    store = LogStore(tmp_path / "logs.db")

    def turn(text: str, local: str | None, cloud: str | None = None, cloud_error: str | None = None,
             feedback: str | None = None, tool_choice: str = "auto", cloud_valid: bool = True) -> None:
        request = RequestRecord(method="chat", model_requested=None, model=TINY, model_version="1", task="t",
                                policy=None, messages=[{"role": "user", "content": text}], tools=WEATHER,
                                tool_choice=tool_choice, params={"parallel_tool_calls": False})
        tries = [AttemptRecord(kind=AttemptKind.LOCAL, model=TINY, model_version="1", output="x", decision=local,
                               decision_score=0.0 if local else None)]
        if cloud is not None:
            tries.append(AttemptRecord(kind=AttemptKind.CLOUD, model="c", model_version="", decision=cloud,
                                       error_code=cloud_error,
                                       validation=[{"name": "get_weather", "valid": cloud_valid}]
                                       if cloud == "call" else None))
        log_id = asyncio.run(store.record(request, tries))
        if feedback is not None:
            asyncio.run(store.record_feedback(log_id, feedback, None))

    turn("a", "call", cloud="call")  # agreed
    turn("b", "answer", cloud="call")  # the local model answered where the cloud called
    turn("c", "answer", cloud="answer")  # agreed
    turn("d", "call", feedback="good")  # labelled by the agent; not a check of the decision
    turn("e", "answer", feedback="bad")  # says the answer was wrong, not which way: no label
    turn("f", "call", cloud="answer", cloud_error="cloud_invalid_answer")  # the cloud failed: no label
    turn("g", None, tool_choice="required")  # nothing decided
    turn("h", "call", cloud="call", cloud_valid=False)  # the cloud's call failed its schema: no label
    db = schema.open_db(tmp_path / "logs.db")
    got = [(t.messages[0]["content"], t.call, t.source, t.local) for t in labelled_turns(db, model=TINY)]
    assert got == [("a", True, "cloud", "call"), ("b", True, "cloud", "answer"), ("c", False, "cloud", "answer"),
                   ("d", True, "feedback", "call")]
    total = stats(db)["total"]
    assert (total["decisions"], total["decisions_checked"], total["decision_accuracy"]) == (7, 3, round(2 / 3, 4))
    store.close()
