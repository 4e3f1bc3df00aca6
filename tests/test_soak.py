"""The soak's short version (tools/soak.py): two minutes of mixed load on `outpost serve`
(two models swapping, tool calls, errors, escalations to a local OpenAI-compatible
server, log export and sync push in the background), in 30-second windows; the daemon
must live, answer no `internal` error, and not grow from the first window to the last
beyond soak.TOLERANCE."""

from __future__ import annotations

import pytest

from outpost.tools import soak


@pytest.mark.slow
def test_two_minutes_of_mixed_load_do_not_grow_the_daemon(tmp_path):
    result = soak.run(duration_s=120, window_s=30, clients=2, root=tmp_path)
    soak.print_result(result)
    assert soak.check(result) == []
    windows = result["windows"]
    assert len(windows) >= 4
    outcomes = {k for w in windows for k in w["outcomes"]}
    assert {"result", "unknown_model", "unsupported_schema", "context_overflow", "bad_request"} <= outcomes
    assert result["evictions"] > 0 and result["oracle_requests"] > 0
    assert sum(w["escalated"] for w in windows) > 0
