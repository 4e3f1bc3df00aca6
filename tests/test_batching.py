"""Continuous batching in one llama.cpp context (models/batching.py): several requests
decode together on their own slots and each answer is the one it gets alone. Real
llama.cpp, the tiny random model (F32 weights, so batched and single-row products
agree), real xgrammar grammars."""

from __future__ import annotations

import json

import pytest

from outpost.manifests.schema import Manifest
from outpost.models.backend import AdapterRef, GenerationRequest
from outpost.models.batching import MIN_SHARED, Batch
from outpost.models.errors import ContextOverflow, DecodeFailed
from outpost.models.llama import LlamaModel
from outpost.tools.tiny_gguf import tiny_manifest_toml

from .conftest import REPO

WEATHER = json.loads((REPO / "examples" / "weather_tool.json").read_text())
FLIGHT = [{"type": "function", "function": {"name": "book_flight", "parameters": {
    "type": "object", "properties": {"to": {"type": "string", "enum": ["OSL", "LIS", "NRT"]},
                                     "seats": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["to", "seats"], "additionalProperties": False}}}]
SYSTEM = {"role": "system", "content": "You are the planner of a field robot. " * 8}


def ask(i: int, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[SYSTEM, {"role": "user", "content": f"request {i}: " + "go " * i}],
                             max_tokens=kw.pop("max_tokens", 60 + 3 * i), **kw)


# Eight requests of every kind a planner sends: free text, each tool_choice mode, two
# schemas, one or several calls.
EIGHT = [ask(0), ask(1, tools=WEATHER, tool_choice="required"),
         ask(2, tools=FLIGHT, tool_choice="book_flight"), ask(3, tools=WEATHER + FLIGHT),
         ask(4, tools=FLIGHT, tool_choice="required", parallel_tool_calls=False), ask(5),
         ask(6, tools=WEATHER, tool_choice="none"), ask(7, tools=WEATHER + FLIGHT, tool_choice="required")]


@pytest.fixture(scope="module")
def manifest(tiny_gguf) -> Manifest:
    return Manifest.from_toml(tiny_manifest_toml(tiny_gguf))


@pytest.fixture(scope="module")
def solo(manifest, tiny_gguf):
    model = LlamaModel(manifest, tiny_gguf)
    yield model
    model.close()


@pytest.fixture
def batched(manifest, tiny_gguf):
    model = LlamaModel(manifest, tiny_gguf, n_slots=4, n_batch=64)
    yield model
    model.close()


def drain(batch: Batch, queue: list[GenerationRequest]) -> dict[int, object]:
    """Feed `queue` in as slots free up; every sequence by its index in `queue`."""
    waiting, done = list(enumerate(queue)), {}
    while waiting or batch.active:
        while waiting and batch.admits(waiting[0][1]):
            i, request = waiting.pop(0)
            seq = batch.join(request)
            seq.index = i
        for seq in batch.step():
            done[getattr(seq, "index", -len(done) - 1)] = seq
    return done


def test_text_the_grammar_forces_takes_one_pass_not_one_per_token(solo):
    """Jump-forward (Decoder._ahead): the tag, the name of the tool asked for, the keys
    come in one forward pass each run of them, and the answer is the one decoded token
    by token (this tokenizer has a token per character, so nearly all of it is forced)."""
    def run(jump: bool) -> tuple[int, object]:
        solo.jump_forward = jump
        seq = solo.start(ask(2, tools=FLIGHT, tool_choice="book_flight", max_tokens=200))
        seq.slot, passes = 0, 0
        for tokens in seq.steps:
            solo._eval(tokens, 0)
            passes += 1
        return passes - 1, seq.result  # the first pass evaluated the prompt

    try:
        (jumped, gen), (stepped, alone) = run(True), run(False)
    finally:
        solo.jump_forward = True
    assert gen.text == alone.text and gen.tool_calls[0]["function"]["name"] == "book_flight"
    assert stepped == gen.completion_tokens and jumped < gen.completion_tokens // 2
    assert gen.validation[0]["valid"] and gen.validation[0]["logprob"]["free"] == alone.validation[0]["logprob"]["free"]


def test_eight_requests_on_four_slots_answer_as_they_do_alone(solo, batched):
    alone = [solo.generate(r) for r in EIGHT]
    batch = Batch(batched)
    done = drain(batch, EIGHT)
    for i, expected in enumerate(alone):
        got = done[i]
        assert got.error is None
        assert got.result.text == expected.text
        assert [c["function"] for c in got.result.tool_calls] == [c["function"] for c in expected.tool_calls]
        assert got.result.logprobs == pytest.approx(expected.logprobs, abs=1e-3)
        verdict = lambda g: [(v["name"], v["valid"], v["errors"], v["repaired"]) for v in g.validation]  # noqa: E731
        assert verdict(got.result) == verdict(expected)
    # They shared passes: fewer forward passes than the requests took alone, and every
    # request saw company.
    assert batch.passes < sum(len(g.logprobs) + 1 for g in alone)
    assert all(done[i].result.batch_size > 1 for i in range(8))


def test_a_request_joins_a_running_batch_and_a_short_one_leaves_early(solo, batched):
    batch = Batch(batched)
    long = batch.join(ask(1, max_tokens=60))
    for _ in range(5):
        assert not batch.step()
    short = batch.join(ask(2, max_tokens=4))  # joins at the next pass, not after `long`
    left = []
    while batch.active:
        now = batch.step()
        if short in now:
            assert long in batch.active.values()  # nobody waited for the batch to drain
        left += now
    assert left == [short, long]
    assert short.result.text == solo.generate(ask(2, max_tokens=4)).text
    assert long.result.text == solo.generate(ask(1, max_tokens=60)).text


def test_a_long_prompt_is_prefilled_in_pieces_while_others_decode(solo, batched):
    batch = Batch(batched)  # n_batch 64: a pass takes 64 tokens at most
    chat = GenerationRequest(messages=[{"role": "user", "content": "talk"}], max_tokens=40)
    talker = batch.join(chat)
    batch.step()  # its prompt, in one pass: it decodes from now on
    reader = batch.join(GenerationRequest(messages=[{"role": "user", "content": "read this: " + "x y " * 120}],
                                          max_tokens=4))
    assert len(reader.prompt) > 4 * 64
    before = talker.passes
    for k in range(1, 4):  # while the reader's prompt goes in, 63 tokens a pass
        batch.step()
        assert reader.passes == k and talker.passes - before == k  # the talker decoded in each
    drain(batch, [])
    assert talker.result.text == solo.generate(chat).text
    assert reader.result.text == solo.generate(reader.request).text


def test_a_shared_system_prompt_is_evaluated_once(solo, batched):
    batch = Batch(batched)
    first = batch.join(ask(1, max_tokens=8))
    batch.step()
    second = batch.join(ask(3, max_tokens=8))  # another slot, the same system block
    assert second.slot != first.slot and batch.shared >= MIN_SHARED
    drain(batch, [])
    assert second.result.text == solo.generate(ask(3, max_tokens=8)).text


def test_a_cancelled_request_frees_its_slot(batched):
    batch = Batch(batched)
    seqs = [batch.join(ask(i, max_tokens=50)) for i in range(4)]
    batch.step()
    assert not batch.admits(ask(9))
    batch.cancel(seqs[1])
    assert batch.admits(ask(9))
    late = batch.join(ask(9, max_tokens=6))
    assert late.slot == seqs[1].slot
    done = drain(batch, [])
    assert seqs[1] not in done.values() and seqs[1].result is None


def test_a_refused_request_does_not_join_and_others_go_on(batched):
    batch = Batch(batched)
    ok = batch.join(ask(1, max_tokens=10))
    with pytest.raises(ContextOverflow):
        batch.join(GenerationRequest(messages=[{"role": "user", "content": "x " * 5000}]))
    assert list(batch.active.values()) == [ok]
    drain(batch, [])
    assert ok.result is not None and ok.error is None


def test_requests_for_another_adapter_wait_for_the_batch_to_drain(batched):
    """llama.cpp applies an adapter to the whole context: one batch, one adapter."""
    batch = Batch(batched)
    batch.join(ask(1, max_tokens=5))
    other = AdapterRef(id="planner-lora", version="1", sha256="0" * 64, size=1)
    assert batch.admits(ask(2)) and not batch.admits(ask(2, adapter=other))
    drain(batch, [])
    assert batch.admits(ask(2, adapter=other))


def test_a_pass_llama_cpp_refuses_is_a_typed_error_and_the_slot_stays_usable(solo, batched):
    with pytest.raises(DecodeFailed) as refused:
        batched._eval_many([(0, [batched.n_vocab + 7], True)])  # a token id past the vocabulary
    assert refused.value.status != 0 and batched._cached(0) == []
    batch = Batch(batched)
    seq = batch.join(ask(1, max_tokens=6))
    drain(batch, [])
    assert seq.result.text == solo.generate(ask(1, max_tokens=6)).text
