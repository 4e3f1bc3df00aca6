"""Priorities and per-client limits through a real daemon: interactive requests go
ahead of queued batch ones, and a client over its `max_in_flight` is `overloaded`."""

from __future__ import annotations

import json

import pytest

from outpost.runtime.errors import Overloaded

from .conftest import add_tiny, make_data_dir, start_daemon
from .test_sdk import LONG, LONG_CHAT, _dealer, wait_until
from .test_wire import USER


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_gguf):
    data = make_data_dir(tmp_path_factory.mktemp("prio"), tiny_gguf)
    add_tiny(data, LONG, seed=1, context_length=16_384)
    clients = {"greedy": {"max_in_flight": 1}}
    with start_daemon(data, LONG, preload=[LONG], clients=clients) as running:
        yield running


def test_an_interactive_request_goes_ahead_of_queued_batch_ones(daemon):
    sock = _dealer(daemon.settings.endpoint)
    short = {"model": LONG, "messages": USER, "max_tokens": 4}
    with daemon.client() as client:
        sock.send_json({"v": 1, "id": "long", "method": "chat", "params": {**LONG_CHAT, "priority": "batch"}})
        wait_until(client, queued=0)
        for i in range(3):
            sock.send_json({"v": 1, "id": f"b{i}", "method": "chat", "params": {**short, "priority": "batch"}})
        wait_until(client, queued=3)
        sock.send_json({"v": 1, "id": "i0", "method": "chat", "params": short})  # interactive: the default
        wait_until(client, queued=4)
        order = [json.loads(sock.recv())["id"] for _ in range(5)]
    assert order == ["long", "i0", "b0", "b1", "b2"]
    sock.close()


def test_a_client_over_its_limit_is_overloaded_and_others_are_not(daemon):
    sock = _dealer(daemon.settings.endpoint)
    with daemon.client() as client:
        sock.send_json({"v": 1, "id": "long", "method": "chat", "params": {**LONG_CHAT, "client": "greedy"}})
        wait_until(client, queued=0)
        with pytest.raises(Overloaded) as info:
            client.chat(USER, model=LONG, max_tokens=4, client="greedy")
        assert info.value.data["client"] == "greedy" and info.value.data["limit"] == 1
        # Another client (and the unnamed default, with no limit set) is served.
        assert client.chat(USER, model=LONG, max_tokens=4, client="polite")["choices"]
        assert json.loads(sock.recv())["id"] == "long"
        # The limit counts requests in flight: once the long one is done, greedy is served.
        assert client.chat(USER, model=LONG, max_tokens=4, client="greedy")["choices"]
    sock.close()
