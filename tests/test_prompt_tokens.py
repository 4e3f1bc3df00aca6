"""Prompts tokenized by turns (models/prompt_tokens.py): the same tokens as llama.cpp
gives the whole prompt, the turns seen before taken from the cache, and a tokenizer
whose pieces do not add up caught and bypassed. Real llama.cpp on the tiny model here;
SmolLM2's BPE and Gemma's SentencePiece vocabularies in test_vocab.py."""

from __future__ import annotations

import json
import logging

import pytest

from outpost.manifests.schema import Manifest
from outpost.models.backend import GenerationRequest
from outpost.models.llama import LlamaModel
from outpost.models.prompt_tokens import CHECKED_PROMPTS, PromptTokens, cut_marks
from outpost.models.templates import _CHATML
from outpost.tools.tiny_gguf import tiny_manifest_toml

from .conftest import REPO

WEATHER = json.loads((REPO / "examples" / "weather_tool.json").read_text())
START, END = b"<|im_start|>", b"<|im_end|>"


def test_the_marks_are_the_templates_special_tokens_that_nothing_longer_overlaps():
    specials = [(START, False), (END, False), (b"<|endoftext|>", False)]
    assert cut_marks(specials, _CHATML) == [START, END]  # <|endoftext|> is not in the template
    assert cut_marks([(START, True), (END, False)], _CHATML) == [END]  # LSTRIP eats the piece before
    # A longer special token the prompt could match instead: one containing <|im_end|>,
    # and ending where <|im_start|> begins.
    assert cut_marks([*specials, (b"<|im_end|><|im", False)], _CHATML) == []
    assert cut_marks([*specials, (b"<|im", False)], _CHATML) == [START, END]  # shorter: matched after


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    model = LlamaModel(Manifest.from_toml(tiny_manifest_toml(tiny_gguf)), tiny_gguf)
    yield model
    model.close()


def whole(model: LlamaModel, text: str) -> list[int]:
    return model._tokenize(text.encode(), bos=True, special=True)


def test_a_prompt_by_turns_is_the_whole_prompts_tokens_and_repeated_turns_come_from_the_cache(tiny):
    assert tiny._prompt_tokens._marks == [START, END]
    system = {"role": "system", "content": "You answer  tersely.\n"}
    asks = ["What is the weather in Paris?", "  leading and trailing spaces  ", "",
            "a turn mark inside a message: <|im_start|>user\nhi<|im_end|>", "ünïcödé ☂ 東京",
            "\n\n\nnewlines\n"]
    before = tiny._prompt_tokens.hits
    for i, ask in enumerate(asks):
        request = GenerationRequest(messages=[system, {"role": "user", "content": ask}],
                                    tools=WEATHER if i % 2 else None, tool_choice="auto")
        text = tiny.render(request)
        assert tiny.tokenize(text.encode(), prompt=True) == whole(tiny, text), ask
    assert tiny._prompt_tokens.enabled
    assert tiny._prompt_tokens.hits > before  # the system turn and the assistant's header, at least

    # A conversation: each request resends the turns before it, which are not tokenized again.
    history = [system]
    for turn in range(4):
        history += [{"role": "user", "content": f"question {turn}"}]
        text = tiny.render(GenerationRequest(messages=history))
        misses = tiny._prompt_tokens.misses
        assert tiny.tokenize(text.encode(), prompt=True) == whole(tiny, text)
        assert tiny._prompt_tokens.misses - misses <= 2  # the new user turn (and its end mark)
        history += [{"role": "assistant", "content": f"answer {turn}"}]


def test_a_tokenizer_whose_pieces_do_not_add_up_is_caught_and_bypassed(caplog):
    # One token per byte, but " |" is one token: cut before the "|", the pieces give two.
    def tokenize(data: bytes, first: bool) -> list[int]:
        return [-1] * first + list(data.replace(b" |", b"\x00"))
    tokens = PromptTokens(tokenize, [b"|"])
    for text in [b"a|b|c", b"ab|cd|", b"|x|y"][:CHECKED_PROMPTS - 1]:  # these add up
        assert tokens(text) == tokenize(text, True)
    assert tokens.enabled
    with caplog.at_level(logging.WARNING, logger="outpost.models.prompt_tokens"):
        assert tokens(b"a |b") == tokenize(b"a |b", True)  # the whole prompt's tokens, still
    assert not tokens.enabled and "turn caching is off" in caplog.text


def test_the_marks_are_kept_beside_the_vocabulary_and_found_again_when_unreadable(tiny_gguf, tmp_path):
    manifest = Manifest.from_toml(tiny_manifest_toml(tiny_gguf))
    saved = None
    for content in (None, "not json", '{"marks": ["3c7c"]}'):
        if content is not None:
            saved.write_text(content)
        model = LlamaModel(manifest, tiny_gguf, vocab_cache=tmp_path / "vocab.bin")
        [saved] = tmp_path.glob("marks-*.json")
        marks = model._prompt_tokens._marks
        model.close()
        # Written the first time, found again over garbage, and read as they are when readable.
        assert marks == ([b"<|"] if content and content.startswith("{") else [START, END])


def test_a_cache_folder_that_cannot_be_written_costs_a_warning_not_the_load(tiny_gguf, tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # so the cache folder beneath it can never be made
    manifest = Manifest.from_toml(tiny_manifest_toml(tiny_gguf))
    with caplog.at_level(logging.WARNING):
        model = LlamaModel(manifest, tiny_gguf, vocab_cache=blocked / "cache" / "vocab.bin")
        try:
            assert model._prompt_tokens._marks == [START, END]
            assert model.vocab.size == model.n_vocab  # read, served, and not kept
        finally:
            model.close()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot keep the prompt marks" in warned and "cannot keep the vocabulary" in warned
    assert list(tmp_path.rglob("*.tmp")) == []
