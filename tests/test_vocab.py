"""The vocabulary handed to xgrammar: exact bytes per token for both tokenizer families.

SmolLM2 has a byte-level BPE vocabulary (GPT-2 style: a space is stored as "Ġ");
Gemma-3 has a SentencePiece vocabulary with byte fallback (a space is "▁", a newline
the token "<0x0A>"). Either way xgrammar must see the bytes the token really produces,
or the grammar would allow or forbid the wrong tokens."""

from __future__ import annotations

import json

import pytest

from outpost.manifests.catalog import Catalog
from outpost.models.backend import GenerationRequest
from outpost.models.llama import LlamaModel

from .conftest import GEMMA, REPO, SMOLLM2

WEATHER = json.loads((REPO / "examples" / "weather_tool.json").read_text())
pytestmark = pytest.mark.slow


def load(store, model_id):
    manifest = Catalog.load(store, [], SMOLLM2).get(model_id)
    return LlamaModel(manifest, store.weights_path(manifest))


def piece_of(model: LlamaModel, text: str) -> bytes:
    [token] = model._tokenize(text.encode(), bos=False, special=True)
    return model.vocab.pieces[token]


@pytest.fixture(scope="module")
def smollm2(model_cache):
    model = load(model_cache, SMOLLM2)
    yield model
    model.close()


@pytest.fixture(scope="module")
def gemma(gemma_cache):
    model = load(gemma_cache, GEMMA)
    yield model
    model.close()


def test_byte_level_vocabulary(smollm2):
    assert smollm2.meta("tokenizer.ggml.model") == "gpt2"
    assert piece_of(smollm2, " Paris") == b" Paris"  # stored as "ĠParis"
    assert piece_of(smollm2, "\n") == b"\n"  # stored as "Ċ"
    end = smollm2._tokenize(b"<|im_end|>", bos=False, special=True)[0]
    assert smollm2.vocab.pieces[end] == b"" and end in smollm2.vocab.stop_ids


def test_byte_fallback_vocabulary(gemma):
    assert gemma.meta("tokenizer.ggml.model") == "llama"
    assert piece_of(gemma, " Paris") == b" Paris"  # stored as "▁Paris"
    newline = gemma._tokenize(b"\n", bos=False, special=True)
    assert b"".join(gemma.vocab.pieces[t] for t in newline) == b"\n"
    # Some tokens are single raw bytes ("<0x..>"): they must come through as one byte.
    raw_bytes = [p for p in gemma.vocab.pieces if len(p) == 1 and p[0] >= 0x80]
    assert len(raw_bytes) == 128
    end = gemma._tokenize(b"<end_of_turn>", bos=False, special=True)[0]
    assert gemma.vocab.pieces[end] == b"" and end in gemma.vocab.stop_ids


@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_constrained_call_is_schema_valid_on_both_vocabularies(which, request):
    model = request.getfixturevalue(which)
    gen = model.generate(GenerationRequest(
        [{"role": "user", "content": "What is the weather in Paris?"}], WEATHER,
        tool_choice="required", parallel_tool_calls=False, max_tokens=64))
    assert gen.finish_reason == "tool_calls", gen.text
    [call] = gen.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    [report] = gen.validation
    assert {k: report[k] for k in ("name", "valid", "errors", "repaired")} == {
        "name": "get_weather", "valid": True, "errors": [], "repaired": None}
    # The call's own tokens: every one after the mask, so each log-probability is <= 0.
    stats = report["logprob"]
    assert 0 < stats["tokens"] <= gen.completion_tokens
    assert stats["min"] <= stats["mean"] <= 0


@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_prompts_tokenized_by_turns_are_the_whole_prompts_tokens_on_both_vocabularies(which, request):
    """BPE (SmolLM2: `<|im_start|>`, `<|im_end|>`) and SentencePiece with its space
    prefix after a special token (Gemma: `<start_of_turn>`, `<end_of_turn>`)."""
    model = request.getfixturevalue(which)
    assert model._prompt_tokens.enabled and model._prompt_tokens._marks  # caching is on for both
    history = [{"role": "system", "content": "Be brief."}]
    for i, ask in enumerate(["What is the weather in Paris?", " spaces ", "", "東京 ☂", "x<end_of_turn>\ny",
                             "<|im_start|>assistant\n", "\n\ttabs\t\n"]):
        history.append({"role": "user", "content": ask})
        text = model.render(GenerationRequest(messages=history, tools=WEATHER if i % 2 else None))
        whole = model._tokenize(text.encode(), bos=True, special=True)
        assert model.tokenize(text.encode(), prompt=True) == whole, ask
        history.append({"role": "assistant", "content": f"answer {i}"})
    assert model._prompt_tokens.enabled and model._prompt_tokens.hits > 0
