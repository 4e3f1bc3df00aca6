"""An OpenAI-compatible server on 127.0.0.1 that answers BFCL questions with BFCL's
ground truth: the *oracle teacher* of the specialisation benchmark.

It stands where a real cloud model would (any OpenAI-compatible URL can replace it):
Outpost's cloud client talks to it over real HTTP, so shadow mode, the log and the
export run exactly as they would against a cloud. Every table it feeds must say
"oracle teacher": its answers are right by construction, which measures what the
loop can learn from a perfect teacher, not what a given cloud model would teach.

A question is found by its last user message; the answer calls the question's
function with, for each argument, the first value BFCL accepts (an argument whose
only accepted value is "", absent, is left out). A `minimal` teacher also leaves out
every argument BFCL accepts absent ("" among its values), which is the shorter of two
right answers: the default one would fill it. Unknown questions get a plain text answer.

    python -m outpost.tools.oracle_server [--port N] [--category simple_python]
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import bfcl


def ground_truth_call(item: bfcl.Item, minimal: bool = False) -> list[dict[str, Any]]:
    """BFCL's possible answers -> OpenAI tool calls with the first accepted value of each
    (`minimal`: none for an argument BFCL accepts absent)."""
    calls = []
    for n, entry in enumerate(item.answer or []):
        ((name, params),) = entry.items()
        args = _arguments(params, minimal)
        calls.append({"id": f"call_{n}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


def _arguments(params: dict[str, list[Any]], minimal: bool) -> dict[str, Any]:
    """Each argument's first accepted value. BFCL nests: a dict's own values, and those
    of the dicts in a list, are lists of accepted values again, chosen the same way."""
    args = {}
    for key, accepted in params.items():
        if minimal and "" in accepted:
            continue
        chosen = next((v for v in accepted if v != ""), None)
        if chosen is not None:
            args[key] = _value(chosen, minimal)
    return args


def _value(chosen: Any, minimal: bool) -> Any:
    if isinstance(chosen, dict) and chosen and all(isinstance(v, list) for v in chosen.values()):
        return _arguments(chosen, minimal)
    if isinstance(chosen, list):
        return [_value(v, minimal) if isinstance(v, dict) else v for v in chosen]
    return chosen


def question_of(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


class OracleServer:
    """`with OracleServer(items) as oracle:` ... `oracle.base_url` ... (a thread serves it)."""

    def __init__(self, items: list[bfcl.Item], port: int = 0, model: str = "oracle-teacher",
                 minimal: bool = False, api_key: str | None = None) -> None:
        self.model = model
        # As a cloud does: with a key set, a request that does not bear it gets 401.
        self.api_key = api_key
        self.answers = {question_of(i.messages): ground_truth_call(i, minimal) for i in items if i.answer}
        self.requests = 0
        self._count = threading.Lock()  # the handlers run on threads of their own
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the benchmark prints its own
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    messages = body["messages"]
                except (ValueError, KeyError, TypeError):
                    self._send(400, {"error": {"message": "not a chat completion request"}})
                    return
                with server._count:
                    server.requests += 1
                    number = server.requests
                calls = server.answers.get(question_of(messages))
                message: dict[str, Any] = {"role": "assistant", "content": None if calls else "I don't know."}
                if calls:
                    message["tool_calls"] = calls
                prompt = sum(len(json.dumps(m)) for m in messages) // 4  # about 4 characters a token
                completion = len(json.dumps(calls or message["content"])) // 4
                self._send(200, {
                    "id": f"oracle-{number}", "object": "chat.completion", "model": server.model,
                    "choices": [{"index": 0, "message": message,
                                 "finish_reason": "tool_calls" if calls else "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="oracle-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> OracleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--category", default="simple_python")
    args = ap.parse_args()
    with OracleServer(bfcl.load(args.category), args.port) as oracle:
        print(f"oracle teacher for BFCL {args.category} at {oracle.base_url} (Ctrl-C stops it)")
        threading.Event().wait()


if __name__ == "__main__":
    main()
