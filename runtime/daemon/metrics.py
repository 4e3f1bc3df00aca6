"""Prometheus metrics: what the daemon counts as it serves, and what it reads at scrape.

Counted as it happens (`Metrics.chat`, the pool's events through `MetricsRecorder`,
`Metrics.log_write`): requests by model, task and outcome; the time each spent in
each stage; time to first token; tokens; escalations and cloud spend; loads,
evictions; log writes. Read when scraped (`_StateCollector`): queue depth, the memory
budget used against its limit, loaded workers, grammar cache hits, clients in flight,
the last field sync. docs/metrics.md lists every series.

The exporter is a few lines of asyncio on the daemon's own loop, on a loopback port
(`[metrics] port`, off by default): the scrape-time readers then see the pool from
the thread that owns it, and a scrape needs no thread of its own.

What this module must not do: decide anything; it only counts and reports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from outpost.models.backend import Generation
from outpost.runtime.escalation.flow import Outcome
from outpost.runtime.logs.records import Footprint, PoolEvent, PoolEventKind

log = logging.getLogger("outpost.metrics")
STAGES = ("queue", "load", "prefill", "decode", "total")
# Seconds: from a warm prefill (ms) to a cold load plus a long generation (a minute).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000)
ESCALATION_REASON = {"cloud_only": "cloud_only", "on_low_confidence": "low_confidence"}


class Metrics:
    def __init__(self) -> None:
        # A registry of its own: several daemons in one process (the tests) never mix.
        self.registry = r = CollectorRegistry()
        self.requests = Counter("outpost_requests", "Chats, by who answered (local, cloud) or the error code",
                                ["model", "task", "outcome"], registry=r)
        self.stage_seconds = Histogram("outpost_request_stage_seconds", "Time a chat spent in each stage",
                                       ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("outpost_time_to_first_token_seconds",
                              "Streamed chats: from arrival to the first delta sent",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("outpost_tokens", "Tokens evaluated (prompt) and generated (completion)",
                              ["model", "kind"], registry=r)
        self.decode_rate = Histogram("outpost_decode_tokens_per_second", "Each local generation's decode speed",
                                     ["model"], buckets=RATE_BUCKETS, registry=r)
        self.escalations = Counter("outpost_escalations", "Chats the cloud was asked to answer, by why and how it went",
                                   ["model", "reason", "result"], registry=r)
        self.shadow = Counter("outpost_shadow_requests", "Chats also sent to the cloud for the log only",
                              ["model"], registry=r)
        self.cloud_cost = Counter("outpost_cloud_cost_usd", "What the cloud's answers cost, at [costs] prices",
                                  ["model"], registry=r)
        self.loads = Counter("outpost_model_loads", "Models loaded into a worker", ["model"], registry=r)
        self.load_seconds = Histogram("outpost_model_load_seconds", "Time to load a model in its worker",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.unloads = Counter("outpost_model_unloads", "Workers gone: evicted, idle, crashed or replaced",
                               ["model", "reason"], registry=r)
        self.unload_seconds = Histogram("outpost_model_unload_seconds", "Time to take a worker down",
                                        ["model", "reason"], buckets=LATENCY_BUCKETS, registry=r)
        self.log_seconds = Histogram("outpost_log_write_seconds", "Committing one request's rows to logs.db",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.log_failures = Counter("outpost_log_write_failures", "Requests whose rows could not be written",
                                    registry=r)
        self.in_flight = Gauge("outpost_requests_in_flight", "Requests being handled", registry=r)

    def chat(self, model: str, task: str | None, outcome: Outcome, timings_ms: dict[str, float]) -> None:
        """One chat that reached a model (`failed` counts the ones that end in an error)."""
        task = task or ""
        if outcome.answered:
            self.requests.labels(model, task, "cloud" if outcome.cloud is not None else "local").inc()
        for stage in STAGES:
            if stage in timings_ms:
                self.stage_seconds.labels(model, stage).observe(timings_ms[stage] / 1e3)
        if outcome.generation is not None:
            self._generation(model, outcome.generation)
        if outcome.asked_cloud:
            reason = ESCALATION_REASON.get(str(outcome.policy), str(outcome.policy))
            self.escalations.labels(model, reason, outcome.degraded_reason or "answered").inc()
        if outcome.shadow:
            self.shadow.labels(model).inc()
        if outcome.cloud is not None:
            self.cloud_cost.labels(model).inc(outcome.cloud.cost_usd)

    def failed(self, model: str, task: str, code: str) -> None:
        """A chat answered with an error: `outcome` is its code."""
        self.requests.labels(model, task, code).inc()

    def _generation(self, model: str, gen: Generation) -> None:
        self.tokens.labels(model, "prompt").inc(gen.prompt_tokens)
        self.tokens.labels(model, "completion").inc(gen.completion_tokens)
        if gen.decode_ms > 0 and gen.completion_tokens:
            self.decode_rate.labels(model).observe(gen.completion_tokens / (gen.decode_ms / 1e3))

    def pool_event(self, event: PoolEvent) -> None:
        if event.kind is PoolEventKind.LOAD:
            self.loads.labels(event.model).inc()
            if event.load_ms is not None:
                self.load_seconds.labels(event.model).observe(event.load_ms / 1e3)
        elif event.kind in (PoolEventKind.EVICT, PoolEventKind.UNLOAD, PoolEventKind.CRASH,
                            PoolEventKind.REPLACE):
            self.unloads.labels(event.model, str(event.kind)).inc()
            if event.stop_ms is not None:
                self.unload_seconds.labels(event.model, str(event.kind)).observe(event.stop_ms / 1e3)

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """Report what `state()` returns (the daemon's view: status's fields) at each scrape."""
        self.registry.register(_StateCollector(state))

    async def serve(self, port: int) -> asyncio.Server:
        """The exporter: GET /metrics on 127.0.0.1:`port`."""
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                if path.split(b"?")[0] == b"/metrics":
                    status, body, kind = b"200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
                else:
                    status, body, kind = b"404 Not Found", b"only /metrics is here\n", "text/plain"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind.encode()
                             + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                pass  # a scraper that went away, or something that is not HTTP
            finally:
                writer.close()

        return await asyncio.start_server(handle, "127.0.0.1", port)


class MetricsRecorder:
    """The pool's recorder (pool.PoolRecorder) that counts its events on the way to the log."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def footprints(self) -> dict[tuple[str, str], Footprint]:
        return self.inner.footprints()

    async def record_footprint(self, footprint: Footprint) -> None:
        await self.inner.record_footprint(footprint)

    async def record_event(self, event: PoolEvent) -> None:
        self.metrics.pool_event(event)
        await self.inner.record_event(event)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.state()
        except Exception:  # a scrape must not take the daemon down with it
            log.exception("reading the daemon's state for /metrics failed")
            return
        budget = s["budget"]
        queue = GaugeMetricFamily("outpost_queue_depth", "Requests waiting for each model", labels=["model"])
        for model, n in budget["queued"].items():
            queue.add_metric([model], n)
        yield queue
        mem = GaugeMetricFamily("outpost_budget_bytes", "The memory budget: what Outpost uses, and its limit",
                                labels=["kind"])
        mem.add_metric(["used"], budget["used_bytes"])
        mem.add_metric(["limit"], budget["ram_bytes"])
        yield mem
        loaded = GaugeMetricFamily("outpost_model_loaded", "1 for each model with a worker, by state",
                                   labels=["model", "state"])
        hits = CounterMetricFamily("outpost_grammar_cache", "Tool grammars found compiled (hit) or compiled (miss), "
                                   "per worker since it loaded", labels=["model", "result"])
        for w in s["loaded"]:
            loaded.add_metric([w["model"], str(w["state"])], 1)
            cache = w.get("grammar_cache") or {}
            for result in ("hits", "misses"):
                if result in cache:
                    hits.add_metric([w["model"], result[:-1] if result == "hits" else "miss"], cache[result])
        yield loaded
        yield hits
        clients = GaugeMetricFamily("outpost_client_in_flight", "Chats in flight per declared client",
                                    labels=["client"])
        for name, n in s["clients"].items():
            clients.add_metric([name], n)
        yield clients
        sync = GaugeMetricFamily("outpost_sync_last_ok_timestamp_seconds",
                                 "When the last field pull or push succeeded", labels=["direction"])
        failing = GaugeMetricFamily("outpost_sync_failing", "1 while the last field pull or push failed",
                                    labels=["direction"])
        for direction, rec in (s.get("sync") or {}).items():
            if isinstance(rec, dict):
                if rec.get("ok_at") is not None:
                    sync.add_metric([direction], rec["ok_at"])
                failing.add_metric([direction], 1 if rec.get("error") else 0)
        yield sync
        yield failing
        refused = CounterMetricFamily("outpost_handshakes_refused", "Connections refused at the CURVE "
                                      "handshake, by why (unknown_key, no_curve, bad_handshake)",
                                      labels=["reason"])
        for reason, n in (s.get("security") or {}).get("refused", {}).items():
            refused.add_metric([reason], n)
        yield refused
