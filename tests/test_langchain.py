"""A framework on top of the OpenAI SDK: LangChain's ChatOpenAI with bind_tools, through
Outpost's ZeroMQ transport (the example in examples/langchain_agent.py)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from .conftest import REPO, TINY
from .test_wire import TOOLS

pytest.importorskip("langchain_openai")
sys.path.insert(0, str(REPO / "examples"))
import langchain_agent  # noqa: E402


def test_chatopenai_bind_tools_calls_and_streams(tiny_daemon):
    llm = langchain_agent.make_llm(tiny_daemon.settings.endpoint, TINY).bind_tools(
        TOOLS, tool_choice="required")
    message = llm.invoke("go", max_tokens=300)
    assert message.tool_calls and {c["name"] for c in message.tool_calls} <= {"set_mode", "halt"}
    chunks = list(llm.stream("go", max_tokens=300))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == \
        [(c["name"], c["args"]) for c in message.tool_calls]
    again = asyncio.run(llm.ainvoke("go", max_tokens=300))  # the async transport
    assert [c["name"] for c in again.tool_calls] == [c["name"] for c in message.tool_calls]
