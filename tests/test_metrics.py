"""Prometheus metrics from a real daemon, read with `curl` as an operator would: the
counters move with the requests the test sends."""

from __future__ import annotations

import subprocess

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from outpost.runtime.errors import UnknownModel

from .conftest import TINY, free_port, make_data_dir, start_daemon
from .test_wire import TOOLS, USER


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True,
                          text=True, check=True, timeout=30).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metered(tmp_path_factory, tiny_gguf):
    port = free_port()
    data = make_data_dir(tmp_path_factory.mktemp("m"), tiny_gguf)
    with start_daemon(data, TINY, metrics={"port": port}) as daemon:
        yield daemon, port


def test_counters_move_with_the_requests(metered):
    daemon, port = metered
    before = scrape(port)
    with daemon.client() as client:
        for _ in range(3):
            client.chat(USER, tools=TOOLS, tool_choice="required", max_tokens=40)
        list(client.chat_stream(USER, max_tokens=10))
        with pytest.raises(UnknownModel):
            client.chat(USER, model="no-such-model")
    after = scrape(port)
    moved = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert moved("outpost_requests_total", model=TINY, task="plumbing", outcome="local") == 4
    # (An unknown model is counted without its name: agents' strings are not labels.)
    assert moved("outpost_requests_total", model="", task="", outcome="unknown_model") == 1
    assert moved("outpost_request_stage_seconds_count", model=TINY, stage="decode") == 4
    assert moved("outpost_time_to_first_token_seconds_count", model=TINY) == 1
    assert moved("outpost_tokens_total", model=TINY, kind="completion") > 0
    assert moved("outpost_log_write_seconds_count") == 4  # an unknown model is refused before the log
    assert value(after, "outpost_model_loads_total", model=TINY) >= 1
    assert value(after, "outpost_budget_bytes", kind="limit") > value(after, "outpost_budget_bytes", kind="used") > 0
    assert value(after, "outpost_model_loaded", model=TINY, state="ready") == 1
    assert value(after, "outpost_grammar_cache_total", model=TINY, result="miss") >= 1
    assert value(after, "outpost_requests_in_flight") == 0


def test_only_metrics_is_served_and_only_on_loopback(metered):
    _, port = metered
    status = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://127.0.0.1:{port}/other"], capture_output=True, text=True, timeout=30)
    assert status.stdout == "404"
    listening = [c.laddr for c in psutil.Process().net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
