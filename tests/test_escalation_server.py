"""Escalation against a real OpenAI-compatible server on 127.0.0.1: llama-cpp-python's
own server (`python -m llama_cpp.server`) serving the catalog's SmolLM2 as "the
cloud", started by the test. No internet."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from outpost.manifests.catalog import Catalog
from outpost.runtime.logs import queries, schema
from outpost.tools.serve_process import http_server

from .conftest import SMOLLM2, make_data_dir, start_daemon

pytestmark = pytest.mark.slow
TEACHER = "teacher-smollm2"


@pytest.fixture(scope="module")
def cloud_server(model_cache, tmp_path_factory):
    weights = model_cache.weights_path(Catalog.load(model_cache, [], SMOLLM2).get(SMOLLM2))
    with open(tmp_path_factory.mktemp("cloud") / "server.log", "w") as log, http_server(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(weights), "--model_alias", TEACHER,
             "--host", "127.0.0.1", "--n_ctx", "2048", "--n_threads", "1", "--chat_format", "chatml"],
            "/v1/models", "llama_cpp.server", 120, output=log) as url:
        yield f"{url}/v1"


def daemon(tmp_path, model_cache, url: str, policy: str):
    data = make_data_dir(tmp_path, cache=model_cache)
    return start_daemon(data, SMOLLM2, escalation={"policy": policy, "threshold": 0.99},
                        cloud={"base_url": url, "model": TEACHER, "api_key_env": None,
                               "timeout_s": 60.0, "price_in_per_1k": 0.001, "price_out_per_1k": 0.002})


def attempts(d, log_id: int) -> list[dict[str, Any]]:
    return queries.get_request(schema.open_db(d.settings.log_path), log_id)["attempts"]


ASK = [{"role": "user", "content": "Write one short sentence about the sea."}]


def test_low_confidence_escalates_to_the_server_and_logs_both(tmp_path, model_cache, cloud_server):
    with daemon(tmp_path, model_cache, cloud_server, "on_low_confidence") as d, d.client(timeout_s=300) as c:
        reply = c.chat(ASK, max_tokens=24, temperature=0.8, seed=3)
        out = reply["outpost"]
        assert out["confidence"] < 0.99  # sampled text is never that sure
        assert out["escalated"] and out["answered_by"] == TEACHER and not out["degraded"]
        assert reply["choices"][0]["message"]["content"]
        assert out["cloud"]["completion_tokens"] > 0 and out["cloud"]["cost_usd"] > 0
        local, cloud = attempts(d, out["log_id"])
        assert (local["kind"], local["model"]) == ("local", SMOLLM2) and local["decode_ms"] > 0
        assert (cloud["kind"], cloud["model"]) == ("cloud", TEACHER)
        assert cloud["completion_tokens"] == out["cloud"]["completion_tokens"] and cloud["decode_ms"] > 0
        assert cloud["cost_usd"] == pytest.approx(out["cloud"]["cost_usd"])
        # Forbidden for this request: the local answer goes out, nothing is sent.
        private = c.chat(ASK, max_tokens=8, escalation="off")["outpost"]
        assert private["answered_by"] == SMOLLM2 and not private["escalated"]
        assert len(attempts(d, private["log_id"])) == 1


def test_shadow_mode_logs_the_teacher_beside_the_local_answer(tmp_path, model_cache, cloud_server):
    with daemon(tmp_path, model_cache, cloud_server, "shadow") as d, d.client(timeout_s=300) as c:
        out = c.chat(ASK, max_tokens=16)["outpost"]
        assert out["answered_by"] == SMOLLM2 and out["shadow"]
        deadline = time.monotonic() + 120
        while len(attempts(d, out["log_id"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        local, cloud = attempts(d, out["log_id"])
        assert cloud["model"] == TEACHER and cloud["output"] and cloud["error_code"] is None
