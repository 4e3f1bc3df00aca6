"""The one error tree of Outpost.

It lives in the lowest layer (`manifests`) because every layer above raises from it,
and imports only go downwards. Each error carries its facts as attributes and a
stable snake_case `code` that the wire protocol sends; nobody should ever have to
parse a message to learn what went wrong.

    OutpostError                      code
    ├── BadRequest                    bad_request
    │   ├── RequestTooLarge           request_too_large
    │   ├── UnknownMethod             unknown_method
    │   ├── InvalidSchema             invalid_schema
    │   └── UnsupportedSchema         unsupported_schema
    ├── UnknownModel                  unknown_model
    ├── ModelNotPulled                model_not_pulled
    ├── ContextOverflow               context_overflow
    ├── ModelFileError                model_file_error
    │   └── ChecksumMismatch          checksum_mismatch
    ├── FetchError                    fetch_failed
    ├── ModelLoadFailed               model_load_failed
    ├── WorkerCrashed                 worker_crashed
    ├── BudgetExceeded                budget_exceeded
    ├── Overloaded                    overloaded
    ├── Timeout                       timeout
    ├── NotFound                      not_found
    ├── LogUnavailable                log_unavailable
    │   ├── LogLocked                 log_locked
    │   └── LogDiskFull               log_disk_full
    ├── CloudError                    cloud_failed      (never sent: the reply degrades)
    │   ├── CloudUnconfigured         cloud_not_configured
    │   ├── CloudUnreachable          cloud_unreachable
    │   ├── CloudTimeout              cloud_timeout
    │   ├── CloudRejected             cloud_rejected
    │   ├── CloudOverBudget           cloud_over_daily_cap
    │   ├── CloudCircuitOpen          cloud_circuit_open
    │   └── CloudInvalid              cloud_invalid_answer
    ├── ConfigError                   config_error
    ├── DaemonUnreachable             daemon_unreachable
    └── InternalError                 internal
"""

from __future__ import annotations

from typing import Any


class OutpostError(Exception):
    code = "internal"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


class BadRequest(OutpostError):
    code = "bad_request"


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


class InvalidSchema(BadRequest):
    """A tool's `parameters` is not a valid JSON Schema."""

    code = "invalid_schema"

    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(f"tool {tool!r}: parameters is not a valid JSON Schema: {reason}",
                         tool=tool, reason=reason)
        self.tool, self.reason = tool, reason


class UnsupportedSchema(BadRequest):
    """Valid JSON Schema, but a part of it cannot be enforced while decoding."""

    code = "unsupported_schema"

    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(f"tool {tool!r}: schema cannot be enforced: {reason}",
                         tool=tool, reason=reason)
        self.tool, self.reason = tool, reason


class UnknownModel(OutpostError):
    code = "unknown_model"

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(f"unknown model {model!r}", model=model, known=known)
        self.model, self.known = model, known


class ModelNotPulled(OutpostError):
    code = "model_not_pulled"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is in the catalog but not in the store; "
                         f"run `outpost models pull {model}`", model=model)
        self.model = model


class ContextOverflow(OutpostError):
    code = "context_overflow"

    def __init__(self, n_tokens: int, n_ctx: int) -> None:
        super().__init__(f"prompt is {n_tokens} tokens, the model's context is {n_ctx}",
                         n_tokens=n_tokens, n_ctx=n_ctx)
        self.n_tokens, self.n_ctx = n_tokens, n_ctx


class ModelFileError(OutpostError):
    code = "model_file_error"


class ChecksumMismatch(ModelFileError):
    code = "checksum_mismatch"

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"{name}: sha256 is {actual}, the manifest says {expected}",
                         file=name, expected=expected, actual=actual)
        self.name, self.expected, self.actual = name, expected, actual


class FetchError(OutpostError):
    code = "fetch_failed"


class ModelLoadFailed(OutpostError):
    code = "model_load_failed"


class WorkerCrashed(OutpostError):
    code = "worker_crashed"

    def __init__(self, model: str, exitcode: int | None) -> None:
        super().__init__(f"the worker for {model!r} exited (code {exitcode})",
                         model=model, exitcode=exitcode)
        self.model, self.exitcode = model, exitcode


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


class Timeout(OutpostError):
    code = "timeout"

    def __init__(self, model: str, waited_s: float, stage: str) -> None:
        super().__init__(f"gave up on {model} after {waited_s:.1f} s waiting for {stage}",
                         model=model, waited_s=waited_s, stage=stage)
        self.model, self.waited_s, self.stage = model, waited_s, stage


class NotFound(OutpostError):
    """A thing named by id that does not exist (a logged request, ...)."""

    code = "not_found"

    def __init__(self, kind: str, ident: Any) -> None:
        super().__init__(f"no {kind} {ident!r}", kind=kind, id=ident)


class LogUnavailable(OutpostError):
    """The interaction log could not be written or read."""

    code = "log_unavailable"

    def __init__(self, message: str, path: str, **data: Any) -> None:
        super().__init__(message, path=path, **data)
        self.path = path


class LogLocked(LogUnavailable):
    """Another process held the log's database past the busy timeout."""

    code = "log_locked"


class LogDiskFull(LogUnavailable):
    """The log's filesystem (or the process's file-size limit) has no room left."""

    code = "log_disk_full"


class CloudError(OutpostError):
    """The cloud gave no usable answer. Never sent to an agent: the reply carries the
    local answer with `degraded` and this error's `reason`."""

    code = "cloud_failed"
    reason = "failed"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message, reason=self.reason, **data)


class CloudUnconfigured(CloudError):
    code, reason = "cloud_not_configured", "not_configured"


class CloudUnreachable(CloudError):
    code, reason = "cloud_unreachable", "unreachable"


class CloudTimeout(CloudError):
    code, reason = "cloud_timeout", "timeout"


class CloudRejected(CloudError):
    """A 4xx that another try would not fix."""

    code, reason = "cloud_rejected", "rejected"


class CloudOverBudget(CloudError):
    code, reason = "cloud_over_daily_cap", "over_daily_cap"


class CloudCircuitOpen(CloudError):
    code, reason = "cloud_circuit_open", "circuit_open"


class CloudInvalid(CloudError):
    """Malformed, truncated, empty, or a tool call that fails its schema."""

    code, reason = "cloud_invalid_answer", "invalid_answer"


class ConfigError(OutpostError):
    code = "config_error"


class DaemonUnreachable(OutpostError):
    code = "daemon_unreachable"

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        super().__init__(f"no reply from {endpoint} within {timeout_s:g} s; is `outpost serve` running?",
                         endpoint=endpoint, timeout_s=timeout_s)
        self.endpoint = endpoint


class InternalError(OutpostError):
    code = "internal"


# code -> class, for the client side: a wire error becomes the same typed exception.
BY_CODE: dict[str, type[OutpostError]] = {}


def _register(cls: type[OutpostError]) -> None:
    BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _register(sub)


_register(OutpostError)


def from_wire(error: dict[str, Any]) -> OutpostError:
    """Rebuild a typed error from a reply's `error` object (client side)."""
    cls = BY_CODE.get(error.get("code", ""), OutpostError)
    exc = OutpostError.__new__(cls)
    OutpostError.__init__(exc, error.get("message", ""), **(error.get("data") or {}))
    exc.code = error.get("code", "internal")  # keep a code this client does not know yet
    for key, value in (error.get("data") or {}).items():
        setattr(exc, key, value)
    return exc
