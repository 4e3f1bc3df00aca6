"""The one error tree of Outpost, documented in one place.

Each error is defined in the lowest layer that raises it (imports go downwards), and
every one carries its facts as attributes and a stable snake_case `code` that the
wire protocol sends. This module gathers them all, so a client knows every code
(`from_wire` rebuilds the same typed exception) and a reader finds every class.

    OutpostError                      internal                manifests/errors.py
    ├── BadRequest                    bad_request             manifests/errors.py
    │   ├── RequestTooLarge           request_too_large       runtime/daemon/errors.py
    │   ├── UnknownMethod             unknown_method          runtime/daemon/errors.py
    │   ├── InvalidSchema             invalid_schema          models/errors.py
    │   ├── UnsupportedSchema         unsupported_schema      models/errors.py
    │   └── NotEnoughLabels           not_enough_labels       tools/calibrate.py (above
    │                                                           runtime: not imported here)
    ├── UnknownModel                  unknown_model           manifests/errors.py
    ├── ModelNotPulled                model_not_pulled        manifests/errors.py
    ├── ModelFileError                model_file_error        manifests/errors.py
    │   └── ChecksumMismatch          checksum_mismatch       manifests/errors.py
    ├── FetchError                    fetch_failed            manifests/errors.py
    ├── ContextOverflow               context_overflow        models/errors.py
    ├── ModelLoadFailed               model_load_failed       models/errors.py
    │   ├── ModelInvalid              model_invalid           models/errors.py
    │   └── AdapterLoadFailed         adapter_load_failed     models/errors.py
    ├── DecodeFailed                  decode_failed           models/errors.py
    ├── WorkerCrashed                 worker_crashed          runtime/daemon/errors.py
    ├── ModelQuarantined              model_quarantined       runtime/daemon/errors.py
    ├── BudgetExceeded                budget_exceeded         runtime/daemon/errors.py
    ├── Overloaded                    overloaded              runtime/daemon/errors.py
    ├── Timeout                       timeout                 runtime/daemon/errors.py
    ├── Cancelled                     cancelled               runtime/daemon/errors.py (logged only)
    ├── ActivationFailed              activation_failed       runtime/daemon/errors.py
    ├── AdapterBaseMismatch           adapter_base_mismatch   runtime/daemon/errors.py
    ├── NotFound                      not_found               manifests/errors.py
    ├── LogUnavailable                log_unavailable         runtime/logs/errors.py
    │   ├── LogLocked                 log_locked              runtime/logs/errors.py
    │   └── LogDiskFull               log_disk_full           runtime/logs/errors.py
    ├── CloudError                    cloud_failed            runtime/escalation/errors.py
    │   ├── CloudUnconfigured         cloud_not_configured      (never sent to an agent:
    │   ├── CloudUnreachable          cloud_unreachable          the reply degrades and
    │   ├── CloudTimeout              cloud_timeout              carries the `reason`)
    │   ├── CloudRejected             cloud_rejected
    │   ├── CloudOverBudget           cloud_over_daily_cap
    │   ├── CloudCircuitOpen          cloud_circuit_open
    │   └── CloudInvalid              cloud_invalid_answer
    │       └── CloudInvalidCall      cloud_invalid_answer (a tool call fails its schema)
    ├── ConfigError                   config_error            manifests/errors.py
    ├── DaemonUnreachable             daemon_unreachable      here (the client's)
    ├── SyncError                     sync_failed             sync/errors.py (above runtime:
    │   ├── SyncUntrusted             sync_untrusted            not imported here)
    │   └── SyncDeadline              sync_failed             sync/deadline.py (a transfer
    │                                                           ran past its deadline)
    ├── ConversionFailed              conversion_failed       tools/convert_onnx.py (above
    │                                                           runtime, likewise)
    └── InternalError                 internal                manifests/errors.py

Foreign exceptions are translated at exactly one boundary each: sqlite3 errors by
their result code in `logs/errors.py`, httpx errors in `escalation/cloud.py`, and a
worker's or a daemon's wire error by its code in `from_wire`.

What this module must not do: define errors a lower layer raises (they live there),
or be imported by the layers below the front door.
"""

from __future__ import annotations

from outpost.manifests.errors import (BadRequest, ChecksumMismatch, ConfigError, FetchError,
                                      InternalError, ModelFileError, ModelNotPulled, NotFound,
                                      OutpostError, UnknownModel, error_class, from_wire)
from outpost.models.errors import (AdapterLoadFailed, ContextOverflow, DecodeFailed, InvalidSchema, ModelInvalid,
                                   ModelLoadFailed, UnsupportedSchema)

from .daemon.errors import (ActivationFailed, AdapterBaseMismatch, BudgetExceeded, Cancelled, ModelQuarantined,
                            Overloaded, RequestTooLarge, Timeout, UnknownMethod, WorkerCrashed)
from .escalation.errors import (CloudCircuitOpen, CloudError, CloudInvalid, CloudInvalidCall, CloudOverBudget,
                                CloudRejected, CloudTimeout, CloudUnconfigured, CloudUnreachable)
from .logs.errors import LogDiskFull, LogLocked, LogUnavailable

__all__ = [
    "OutpostError", "BadRequest", "RequestTooLarge", "UnknownMethod", "InvalidSchema",
    "UnsupportedSchema", "UnknownModel", "ModelNotPulled", "ModelFileError", "ChecksumMismatch",
    "FetchError", "ContextOverflow", "ModelLoadFailed", "ModelInvalid", "AdapterLoadFailed", "DecodeFailed", "WorkerCrashed", "ModelQuarantined",
    "BudgetExceeded", "Overloaded", "Timeout", "Cancelled", "ActivationFailed", "AdapterBaseMismatch", "NotFound", "LogUnavailable", "LogLocked", "LogDiskFull",
    "CloudError", "CloudUnconfigured", "CloudUnreachable", "CloudTimeout", "CloudRejected",
    "CloudOverBudget", "CloudCircuitOpen", "CloudInvalid", "CloudInvalidCall", "ConfigError", "DaemonUnreachable",
    "InternalError", "error_class", "from_wire",
]


class DaemonUnreachable(OutpostError):
    code = "daemon_unreachable"

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        super().__init__(f"no reply from {endpoint} within {timeout_s:g} s; is `outpost serve` running?",
                         endpoint=endpoint, timeout_s=timeout_s)
        self.endpoint = endpoint
