"""Errors of the daemon core: a frame it will not read, a method it does not know, and
the pool's refusals (no room in the budget, too many waiting, too long a wait, a dead
worker). The whole tree is documented in `outpost/runtime/errors.py`.

What this module must not do: import anything above `outpost.manifests.errors`.
"""

from __future__ import annotations

from outpost.manifests.errors import BadRequest, OutpostError


class RequestTooLarge(BadRequest):
    code = "request_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"request is {size} bytes, the limit is {limit}", size=size, limit=limit)
        self.size, self.limit = size, limit


class UnknownMethod(BadRequest):
    code = "unknown_method"

    def __init__(self, method: str, known: list[str]) -> None:
        super().__init__(f"unknown method {method!r}", method=method, known=known)
        self.method = method


class WorkerCrashed(OutpostError):
    code = "worker_crashed"

    def __init__(self, model: str, exitcode: int | None) -> None:
        super().__init__(f"the worker for {model!r} exited (code {exitcode})",
                         model=model, exitcode=exitcode)
        self.model, self.exitcode = model, exitcode


class ModelQuarantined(OutpostError):
    """A model version failed to load several times in a row; it is not tried again
    until its backoff ends (quarantine.py)."""

    code = "model_quarantined"

    def __init__(self, model: str, version: str, failures: int, retry_in_s: float, last_error: str) -> None:
        super().__init__(f"{model} {version} failed to load {failures} times in a row (last: "
                         f"{last_error}); not tried again for {retry_in_s:.0f} s", model=model,
                         version=version, failures=failures, retry_in_s=round(retry_in_s, 1),
                         last_error=last_error)
        self.model, self.version, self.failures = model, version, failures


class BudgetExceeded(OutpostError):
    """The model cannot fit the memory budget even with everything evictable gone."""

    code = "budget_exceeded"

    def __init__(self, model: str, needed: int, available: int) -> None:
        super().__init__(f"{model} needs {needed / 2**20:.0f} MiB; the budget leaves at most "
                         f"{available / 2**20:.0f} MiB for it", model=model, needed=needed,
                         available=available)
        self.model, self.needed, self.available = model, needed, available


class Overloaded(OutpostError):
    code = "overloaded"

    def __init__(self, model: str, queued: int, limit: int) -> None:
        super().__init__(f"{queued} requests already wait for {model} (limit {limit})",
                         model=model, queued=queued, limit=limit)
        self.model, self.queued, self.limit = model, queued, limit


class ClientOverloaded(Overloaded):
    """A client has [clients.<name>] max_in_flight requests being handled already."""

    def __init__(self, client: str, in_flight: int, limit: int) -> None:
        OutpostError.__init__(self, f"client {client!r} has {in_flight} requests in flight "
                              f"(limit {limit})", client=client, in_flight=in_flight, limit=limit)
        self.client, self.in_flight, self.limit = client, in_flight, limit


class Timeout(OutpostError):
    code = "timeout"

    def __init__(self, model: str, waited_s: float, stage: str) -> None:
        super().__init__(f"gave up on {model} after {waited_s:.1f} s waiting for {stage}",
                         model=model, waited_s=waited_s, stage=stage)
        self.model, self.waited_s, self.stage = model, waited_s, stage


class Cancelled(OutpostError):
    """Its agent cancelled it while it generated. Only ever logged: an agent that
    cancels asks for no reply."""

    code = "cancelled"

    def __init__(self, model: str, after_s: float) -> None:
        super().__init__(f"cancelled by its agent after {after_s:.1f} s", model=model, after_s=after_s)
        self.model, self.after_s = model, after_s


class ActivationFailed(OutpostError):
    """A staged model version failed its smoke test; the active version keeps serving."""

    code = "activation_failed"

    def __init__(self, model: str, version: str, reason: str) -> None:
        super().__init__(f"{model} {version} failed its smoke test: {reason}; the active "
                         "version keeps serving", model=model, version=version, reason=reason)


class AdapterBaseMismatch(OutpostError):
    """A task adapter was trained on another version of its base than the one active."""

    code = "adapter_base_mismatch"

    def __init__(self, adapter: str, version: str, base: str, wanted: str, active: str) -> None:
        super().__init__(f"adapter {adapter} {version} applies to {base} {wanted}, but {base} "
                         f"{active} is active; specialise it again on {active}", adapter=adapter,
                         version=version, base=base, wanted=wanted, active=active)
        self.adapter, self.version, self.base, self.wanted, self.active = adapter, version, base, wanted, active
