"""The real `openai` package, unchanged, talking to a real daemon over ZeroMQ through
Outpost's httpx transports: every tool_choice mode, streaming, the model list, every
error mapping, and a daemon that is not there."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
import zmq

from outpost.runtime.aclient import AsyncOutpostClient
from outpost.runtime.client import reply_id, sliced, split_reply
from outpost.runtime.daemon import protocol
from outpost.runtime.errors import ContextOverflow
from outpost.runtime.logs.queries import get_request
from outpost.runtime.logs.schema import open_db
from outpost.runtime.sdk import async_http_client, http_client

from .conftest import TINY, add_tiny, make_data_dir, start_daemon
from .test_streaming import reassemble
from .test_wire import TOOLS, USER

CHOICES = ["auto", "none", "required", {"type": "function", "function": {"name": "set_mode"}}]


@pytest.fixture
def sdk(tiny_daemon):
    with openai.OpenAI(base_url="http://outpost/v1", api_key="unused", max_retries=0,
                       http_client=http_client(tiny_daemon.settings.endpoint)) as client:
        yield client


def test_the_sdk_path_cuts_the_daemons_replies_out_without_decoding_them():
    """The transport hands the SDK the daemon's JSON as it came (client.split_reply), which
    holds only while protocol.py writes the body last: this ties the two together."""
    result = {"choices": [{"message": {"content": "Zürich \"quoted\" }"}}], "outpost": {"log_id": 7}}
    assert split_reply(protocol.reply_ok("ab12", result), "ab12") == (True, json.dumps(result, ensure_ascii=False).encode())
    assert json.loads(split_reply(protocol.reply_chunk("ab12", {"n": 1}), "ab12")[1]) == {"n": 1}
    assert split_reply(protocol.reply_ok("other", result), "ab12") is None
    assert reply_id(protocol.reply_ok("ab12", result)) == "ab12"
    assert reply_id(protocol.reply_ok(None, result)) is None
    with pytest.raises(ContextOverflow):  # an error frame is decoded and raised, as on the other path
        sliced(protocol.reply_error("ab12", ContextOverflow(9000, 8192)), "ab12")
    written_otherwise = json.dumps({"result": result, "id": "ab12", "v": 1}).encode()
    assert json.loads(sliced(written_otherwise, "ab12")[1]) == result


@pytest.mark.parametrize("tool_choice", CHOICES, ids=["auto", "none", "required", "named"])
def test_tool_calls_through_the_sdk_are_the_daemons(sdk, client, tool_choice):
    got = sdk.chat.completions.create(model=TINY, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                      max_tokens=60)
    want = client.chat(USER, model=TINY, tools=TOOLS, tool_choice=tool_choice, max_tokens=60)
    message = want["choices"][0]["message"]
    assert got.choices[0].message.content == message["content"]
    assert [c.function.model_dump() for c in got.choices[0].message.tool_calls or []] == \
        [c["function"] for c in message.get("tool_calls") or []]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.outpost["log_id"] is not None  # Outpost's block stays readable
    assert got.outpost["validation"] == want["outpost"]["validation"]


@pytest.mark.parametrize("tool_choice", CHOICES, ids=["auto", "none", "required", "named"])
def test_a_streamed_answer_reassembles_to_the_non_streamed_one(sdk, tool_choice):
    whole = sdk.chat.completions.create(model=TINY, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                        max_tokens=60)
    chunks = [c.model_dump() for c in sdk.chat.completions.create(
        model=TINY, messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=60, stream=True)]
    content, calls, last = reassemble(chunks)
    assert content == whole.choices[0].message.content
    assert [c["function"] for c in calls] == \
        [c.function.model_dump() for c in whole.choices[0].message.tool_calls or []]
    assert last["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert last["outpost"]["log_id"] > whole.outpost["log_id"]


def test_models_list_and_retrieve(sdk):
    ids = [m.id for m in sdk.models.list()]
    assert TINY in ids
    model = sdk.models.retrieve(TINY)
    assert model.id == TINY and model.outpost["pulled"] is True
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


@pytest.mark.parametrize("kwargs, exc, code", [
    ({"model": "no-such-model"}, openai.NotFoundError, "unknown_model"),
    ({"temperature": 5}, openai.BadRequestError, "bad_request"),
    ({"extra_body": {"no_such_field": 1}}, openai.BadRequestError, "bad_request"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     openai.BadRequestError, "invalid_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}]},
     openai.BadRequestError, "unsupported_schema"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, openai.BadRequestError, "context_overflow"),
])
def test_errors_come_back_as_the_sdks_own_types(sdk, kwargs, exc, code):
    kwargs = {"model": TINY, "messages": USER, **kwargs}
    with pytest.raises(exc) as info:
        sdk.chat.completions.create(**kwargs)
    assert info.value.code == code
    assert isinstance(info.value.body["outpost"], dict)  # the error's data fields
    with pytest.raises(exc):  # streaming fails the same way, before any chunk
        sdk.chat.completions.create(**kwargs, stream=True)


def test_a_slow_load_is_504(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    # No time to load a model: the daemon gives up waiting, a gateway timeout.
    with start_daemon(data, TINY, pool={"queue_timeout_s": 0.001}) as daemon, \
            openai.OpenAI(base_url="http://x/v1", api_key="unused", max_retries=0,
                          http_client=http_client(daemon.settings.endpoint)) as sdk:
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model=TINY, messages=USER)
        assert info.value.status_code == 504 and info.value.code == "timeout"


LONG = "tiny-long"  # a tiny model with a long context: a generation of seconds
LONG_CHAT = {"model": LONG, "messages": USER, "max_tokens": 5000}


@pytest.fixture(scope="module")
def slow_daemon(tmp_path_factory, tiny_gguf):
    data = make_data_dir(tmp_path_factory.mktemp("slow"), tiny_gguf)
    add_tiny(data, LONG, seed=1, context_length=16_384)
    with start_daemon(data, LONG, pool={"max_queue": 1}, preload=[LONG]) as daemon:
        yield daemon


def wait_until(client, queued: int) -> None:
    """Until the worker generates and `queued` requests wait behind it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.status()
        if status["budget"]["queued"].get(LONG, 0) == queued and status["loaded"][0]["state"] == "busy":
            return
    raise AssertionError(f"never saw {queued} request(s) queued behind a busy worker: {status}")


def test_overloaded_is_429(slow_daemon):
    endpoint = slow_daemon.settings.endpoint
    sock = _dealer(endpoint)
    with slow_daemon.client() as client:
        sock.send_json({"v": 1, "id": "long", "method": "chat", "params": LONG_CHAT})
        wait_until(client, queued=0)
        sock.send_json({"v": 1, "id": "queued", "method": "chat", "params": {**LONG_CHAT, "max_tokens": 5}})
        wait_until(client, queued=1)
    with openai.OpenAI(base_url="http://x/v1", api_key="unused", max_retries=0,
                       http_client=http_client(endpoint)) as sdk:
        with pytest.raises(openai.RateLimitError) as info:
            sdk.chat.completions.create(model=LONG, messages=USER)
    assert info.value.code == "overloaded" and info.value.body["outpost"]["limit"] == 1
    assert {json.loads(sock.recv())["id"] for _ in range(2)} == {"long", "queued"}
    sock.close()


def _dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def test_a_daemon_that_is_not_there_is_a_connection_error(tmp_path):
    with openai.OpenAI(base_url="http://x/v1", api_key="unused", max_retries=0,
                       http_client=http_client(f"ipc://{tmp_path}/nobody.sock")) as missing:
        with pytest.raises(openai.APIConnectionError):
            missing.chat.completions.create(model=TINY, messages=USER)
    # TCP connects to nothing without an error: the SDK's timeout ends the wait.
    with openai.OpenAI(base_url="http://x/v1", api_key="unused", max_retries=0, timeout=0.5,
                       http_client=http_client("tcp://127.0.0.1:9")) as silent:
        with pytest.raises(openai.APITimeoutError):
            silent.models.list()


def test_async_sdk_many_requests_in_flight_and_a_stream(tiny_daemon):
    async def main() -> None:
        sdk = openai.AsyncOpenAI(base_url="http://outpost/v1", api_key="unused", max_retries=0,
                                 http_client=async_http_client(tiny_daemon.settings.endpoint))
        async with sdk:
            replies = await asyncio.gather(*(
                sdk.chat.completions.create(model=TINY, messages=[{"role": "user", "content": f"go {i}"}],
                                            tools=TOOLS, tool_choice="required", max_tokens=60)
                for i in range(6)))
            assert len({r.outpost["log_id"] for r in replies}) == 6
            stream = await sdk.chat.completions.create(model=TINY, messages=USER, max_tokens=20, stream=True)
            chunks = [c.model_dump() async for c in stream]
            assert chunks[-1]["outpost"]["log_id"] is not None
            with pytest.raises(openai.NotFoundError):
                await sdk.chat.completions.create(model="nope", messages=USER)

    asyncio.run(main())


def test_async_client_matches_replies_by_id_and_cancels_a_queued_request(slow_daemon):
    async def main() -> int:
        async with AsyncOutpostClient(slow_daemon.settings.endpoint, timeout_s=120) as client:
            pings = await asyncio.gather(*(client.ping() for _ in range(20)))
            assert all(p["pong"] for p in pings)
            # One long generation holds the worker; a second request queues behind it.
            with slow_daemon.client() as sync:
                long = asyncio.create_task(client.request("chat", LONG_CHAT))
                await asyncio.to_thread(wait_until, sync, 0)
                queued = asyncio.create_task(client.chat(USER, model=LONG, max_tokens=5))
                await asyncio.to_thread(wait_until, sync, 1)
            queued.cancel()  # the client tells the daemon, which drops it from the queue
            with pytest.raises(asyncio.CancelledError):
                await queued
            while (await client.status())["budget"]["queued"].get(LONG, 0):
                await asyncio.sleep(0.01)
            assert not long.done()  # the place was freed while the worker still generated
            return (await long)["outpost"]["log_id"]

    first = asyncio.run(main())
    with slow_daemon.client() as client:
        later = client.chat(USER, model=LONG, max_tokens=5)
    # Nothing was logged for the cancelled request between the two.
    assert later["outpost"]["log_id"] == first + 1


def test_a_cancel_stops_a_generating_request_in_its_worker_and_logs_it(slow_daemon):
    sock = _dealer(slow_daemon.settings.endpoint)
    with slow_daemon.client() as client:
        served = client.status()["loaded"][0]["served"]
        sock.send_json({"v": 1, "id": "long", "method": "chat", "params": LONG_CHAT})
        wait_until(client, queued=0)
        sock.send_json({"v": 1, "id": "stop", "method": "cancel", "params": {"id": "long"}})
        assert json.loads(sock.recv())["result"] == {"id": "long", "cancelled": True, "state": "generating"}
        client.chat(USER, model=LONG, max_tokens=5)
        # The worker dropped it: it finished one generation (`later`), not two.
        assert client.status()["loaded"][0]["served"] == served + 1
    assert not sock.poll(300)  # and its agent gets no reply
    sock.close()
    db = open_db(slow_daemon.settings.log_path)
    [(log_id,)] = db.execute("select id from requests where error_code = 'cancelled'").fetchall()
    stopped = get_request(db, log_id)
    db.conn.close()
    assert stopped["error_code"] == "cancelled" and stopped["model"] == LONG
    assert stopped["completion_tokens"] is None and stopped["attempts"] == []


def test_cancel_of_an_unknown_request_says_so(client):
    assert client.request("cancel", {"id": "nothing"}) == {"id": "nothing", "cancelled": False,
                                                           "state": "unknown"}


def test_sdk_stream_closed_early_leaves_the_daemon_serving(sdk):
    stream = sdk.chat.completions.create(model=TINY, messages=USER, max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()
    again = sdk.chat.completions.create(model=TINY, messages=USER, max_tokens=5)
    assert again.choices[0].message.content is not None
    assert json.loads(json.dumps(again.outpost))["log_id"] is not None
