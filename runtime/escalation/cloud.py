"""The cloud LLM: any OpenAI-compatible `/chat/completions` endpoint, over httpx.

    ask(messages, tools, ...) -> CloudAnswer, or raises a CloudError subclass

What makes it safe to call from a daemon on a poor link:

- One deadline per request (`timeout_s`), retries included: a retry never starts
  when its delay would run past the deadline.
- Retries only where another try can help: connection errors and timeouts, 408,
  429 and 5xx. The delay doubles from `backoff_s` with full jitter, capped at
  `max_backoff_s`; a `Retry-After` header (seconds or an HTTP date) wins when it
  fits the deadline. Other 4xx fail at once.
- A circuit breaker: after `breaker_failures` failed requests in a row the endpoint
  is not called for `breaker_cooldown_s`; then one request may try (half-open), and
  its success closes the breaker. A failure is the endpoint's: unreachable, timed
  out, 5xx, a body that is not a completion. A tool call that fails its schema is
  the model's mistake on one request, not one of these.
- A daily cap on requests and tokens (UTC day), seeded from the log at start so a
  restart does not reset it.
- The answer is checked like a local one: its tool calls must parse and validate
  against the same schemas. A truncated body, malformed JSON or an invalid call is
  a failure (`CloudInvalid`), never passed on as an answer.

The API key is read from the environment variable *named* in config, at call
time; it is never logged or stored.

What this module must not do: decide when to ask (flow.py) or log (the daemon does).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from outpost.models.toolcalls import validate_calls

from .errors import (CloudCircuitOpen, CloudError, CloudInvalid, CloudInvalidCall, CloudOverBudget, CloudRejected,
                     CloudTimeout, CloudUnconfigured, CloudUnreachable)

from .settings import CloudSettings

log = logging.getLogger("outpost.cloud")
# httpx logs every request at INFO; the daemon's own lines say what matters (retries,
# the breaker), and one line per escalation would drown them.
logging.getLogger("httpx").setLevel(logging.WARNING)
RETRY_STATUS = {408, 429} | set(range(500, 600))


@dataclass
class CloudAnswer:
    content: str | None
    tool_calls: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    attempts: int
    cost_usd: float
    model: str


@dataclass
class Breaker:
    failures_to_open: int
    cooldown_s: float
    failures: int = 0
    opened_at: float | None = None
    trial: bool = False  # a half-open request is in flight

    def allow(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if now - self.opened_at < self.cooldown_s or self.trial:
            return False
        self.trial = True  # half-open: this one request may try
        return True

    def record(self, ok: bool, now: float) -> None:
        self.trial = False
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.failures >= self.failures_to_open or self.opened_at is not None:
            if self.opened_at is None:
                log.warning("cloud circuit open for %.0f s after %d failures", self.cooldown_s,
                            self.failures)
            self.opened_at = now

    @property
    def state(self) -> str:
        return "closed" if self.opened_at is None else "open"


@dataclass
class DailyCap:
    max_requests: int | None
    max_tokens: int | None
    day: str = ""
    requests: int = 0
    tokens: int = 0

    def _roll(self) -> None:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        if today != self.day:
            self.day, self.requests, self.tokens = today, 0, 0

    def check(self) -> str | None:
        self._roll()
        if self.max_requests is not None and self.requests >= self.max_requests:
            return f"{self.requests} cloud requests today, the cap is {self.max_requests}"
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return f"{self.tokens} cloud tokens today, the cap is {self.max_tokens}"
        return None

    def spend(self, tokens: int) -> None:
        self._roll()
        self.requests += 1
        self.tokens += tokens


def retry_after(header: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


@dataclass
class CloudClient:
    cfg: CloudSettings
    transport: httpx.AsyncBaseTransport | None = None  # tests script faults with MockTransport
    sleep: Any = asyncio.sleep
    breaker: Breaker = field(init=False)
    cap: DailyCap = field(init=False)
    _http: httpx.AsyncClient | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.breaker = Breaker(self.cfg.breaker_failures, self.cfg.breaker_cooldown_s)
        self.cap = DailyCap(self.cfg.daily_max_requests, self.cfg.daily_max_tokens)

    @property
    def configured(self) -> bool:
        return bool(self.cfg.base_url)

    def seed(self, requests_today: int, tokens_today: int) -> None:
        """Start the daily cap from what the log says was spent today."""
        self.cap._roll()
        self.cap.requests, self.cap.tokens = requests_today, tokens_today

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(transport=self.transport, base_url=self.cfg.base_url or "")
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        cfg = self.cfg
        return (prompt_tokens * cfg.price_in_per_1k + completion_tokens * cfg.price_out_per_1k) / 1000

    async def ask(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  tool_choice: Any = None, parallel_tool_calls: bool | None = None,
                  max_tokens: int | None = None) -> CloudAnswer:
        if not self.configured:
            raise CloudUnconfigured("no cloud endpoint is configured ([cloud] base_url)")
        over = self.cap.check()
        if over:
            raise CloudOverBudget(over)
        now = time.monotonic()
        if not self.breaker.allow(now):
            raise CloudCircuitOpen(f"the cloud endpoint failed {self.breaker.failures} times in a row; "
                                   f"not calling it for {self.cfg.breaker_cooldown_s:g} s")
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages,
                                "max_tokens": min(max_tokens or self.cfg.max_tokens, self.cfg.max_tokens)}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
            if parallel_tool_calls is not None:
                body["parallel_tool_calls"] = parallel_tool_calls
        try:
            answer = await self._post(body, tools or [], now)
        except CloudError as exc:
            # Only the endpoint's own failures count towards the breaker. A 4xx we
            # caused (a bad request) says nothing about its health; a well-formed
            # completion whose tool call fails its schema says it is up (the model got
            # this one request wrong), and must not stop every other request for the
            # cooldown.
            if isinstance(exc, CloudRejected):
                self.breaker.trial = False
            else:
                self.breaker.record(isinstance(exc, CloudInvalidCall), time.monotonic())
            raise
        self.breaker.record(True, time.monotonic())
        return answer

    async def _post(self, body: dict[str, Any], tools: list[dict[str, Any]], start: float) -> CloudAnswer:
        deadline = start + self.cfg.timeout_s
        headers = {"content-type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        attempt = 0
        last: CloudError | None = None
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise last or CloudTimeout(f"no answer within {self.cfg.timeout_s:g} s")
            wait: float | None = None
            try:
                # httpx's timeouts are per read: a server trickling bytes would outlive
                # them. The deadline is for the whole exchange.
                resp = await asyncio.wait_for(
                    self._client().post("chat/completions", json=body, headers=headers,
                                        timeout=httpx.Timeout(left)), left)
            except (httpx.TimeoutException, TimeoutError):
                last = CloudTimeout(f"the cloud did not answer within {self.cfg.timeout_s:g} s",
                                    attempts=attempt)
            except httpx.TransportError as exc:
                last = CloudUnreachable(f"cannot reach the cloud: {type(exc).__name__}: {exc}",
                                        attempts=attempt)
            else:
                if resp.status_code < 300:
                    return self._answer(resp, tools, start, attempt)
                if resp.status_code not in RETRY_STATUS:
                    raise CloudRejected(f"the cloud refused the request: HTTP {resp.status_code} "
                                        f"{resp.text[:200]}", status=resp.status_code)
                last = CloudUnreachable(f"the cloud answered HTTP {resp.status_code}",
                                        status=resp.status_code, attempts=attempt)
                wait = retry_after(resp.headers.get("retry-after"), time.time())
            if attempt > self.cfg.max_retries:
                raise last
            if wait is None:  # full jitter: spread the retries of many devices
                wait = random.uniform(0, min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (attempt - 1)))
            if time.monotonic() + wait >= deadline:
                raise last  # the retry would start after the deadline
            log.info("cloud attempt %d failed (%s); retrying in %.2f s", attempt, last.message, wait)
            await self.sleep(wait)

    def _answer(self, resp: httpx.Response, tools: list[dict[str, Any]], start: float,
                attempts: int) -> CloudAnswer:
        try:
            data = resp.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise CloudInvalid(f"the cloud's answer is not a chat completion: {exc!r} "
                               f"in {resp.text[:200]!r}") from None
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self.cap.spend(prompt_tokens + completion_tokens)
        calls = message.get("tool_calls") or []
        validation = validate_calls(calls, tools) if calls else []
        bad = [v for v in validation if not v["valid"]]
        if bad:
            raise CloudInvalidCall(f"the cloud's tool call {bad[0]['name']!r} is invalid: "
                                   f"{'; '.join(bad[0]['errors'])[:200]}", validation=validation)
        if not calls and not message.get("content"):
            raise CloudInvalid("the cloud's answer is empty")
        return CloudAnswer(
            content=message.get("content"), tool_calls=calls, validation=validation,
            finish_reason=choice.get("finish_reason"), prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, latency_ms=(time.monotonic() - start) * 1e3,
            attempts=attempts, cost_usd=self.cost(prompt_tokens, completion_tokens),
            model=data.get("model") or self.cfg.model)
