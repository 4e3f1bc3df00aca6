"""LangChain's ChatOpenAI, unchanged, answered by Outpost over ZeroMQ.

    .venv/bin/pip install langchain-openai
    .venv/bin/python examples/langchain_agent.py ipc:///tmp/outpost-0/outpost.sock

The only Outpost-specific line is the `http_client`: the OpenAI SDK inside ChatOpenAI
sends its requests through Outpost's transport instead of over HTTP.
"""

from __future__ import annotations

import sys

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from outpost.runtime.sdk import async_http_client, http_client


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """Current weather for a city."""
    return f"21 degrees {unit} and sunny in {city}"


def make_llm(endpoint: str, model: str = "smollm2-135m-instruct") -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url="http://outpost/v1", api_key="unused", max_retries=0,
                      http_client=http_client(endpoint), http_async_client=async_http_client(endpoint))


def main(endpoint: str) -> None:
    llm = make_llm(endpoint).bind_tools([get_weather], tool_choice="required")
    message = llm.invoke("What is the weather in Paris?")
    for call in message.tool_calls:
        print(f"{call['name']}({call['args']}) -> {get_weather.invoke(call['args'])}")
    for chunk in llm.stream("And in Oslo?"):  # argument deltas as the grammar accepts them
        print(chunk.tool_call_chunks)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ipc:///tmp/outpost-0/outpost.sock")
