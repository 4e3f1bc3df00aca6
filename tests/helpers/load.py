"""Chat load from several client threads against a daemon in its own process: what the
budget acceptance tests drive while they sample its memory from outside."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any


def chat_load(daemon: Any, clients: int, requests: int, pick: Callable[[int, int], str],
              tools: list[dict[str, Any]], tools_every: int, max_tokens: int,
              valid: bool = False) -> tuple[Counter[str], list[BaseException]]:
    """`clients` threads (seeds 0..clients-1), each asking `requests` weather questions of
    the model `pick(seed, i)` names, every `tools_every`-th one a required tool call.
    Returns the answers counted by model, and every failure (a wrong model answering,
    an invalid call when `valid`, an error), for the test to assert on."""
    answered: Counter[str] = Counter()
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        with daemon.client(timeout_s=300) as c:
            for i in range(requests):
                model = pick(seed, i)
                kwargs = {"tools": tools, "tool_choice": "required"} if i % tools_every == 0 else {}
                try:
                    reply = c.chat([{"role": "user", "content": f"Weather in city number {i}?"}],
                                   model=model, max_tokens=max_tokens, **kwargs)
                    assert reply["outpost"]["model"] == model
                    assert not valid or all(v["valid"] for v in reply["outpost"]["validation"])
                    with lock:
                        answered[model] += 1
                except BaseException as exc:  # collected for the test to assert on
                    failures.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answered, failures
