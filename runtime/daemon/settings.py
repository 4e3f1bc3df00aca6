"""Settings of the daemon core, and `DaemonSettings`: everything a running daemon reads.

`DaemonSettings` is plain frozen data. The front door's `Settings` (runtime/config.py)
is the same model plus the CLI-only sections and the loading from flags, environment
and TOML, so the daemon core never imports the front door.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr

from outpost.runtime.escalation.settings import (CloudSettings, ConfidenceSettings,
                                                 EscalationSettings)
from outpost.runtime.logs.settings import LogSettings

def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "outpost"


def default_endpoint() -> str:
    # The user's runtime dir is private (0700) and cleared at logout: the right home
    # for a socket. Without one, a per-user folder under the temp dir.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "outpost" if runtime else Path(tempfile.gettempdir()) / f"outpost-{os.getuid()}"
    return f"ipc://{base / 'outpost.sock'}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    # A frame larger than this is refused unread (request_too_large).
    max_request_bytes: Annotated[int, Field(gt=0)] = 1 << 20
    # How long a worker may take to start and load its model.
    load_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # How long one generation may take before the worker is declared stuck.
    request_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    # How long a tool grammar may take to compile; beyond it the request gets
    # `unsupported_schema` and the worker that tried is replaced.
    grammar_timeout_s: Annotated[float, Field(gt=0)] = 10.0


class BudgetSettings(_Section):
    """How much of the machine Outpost may use: the daemon, the forkserver and every worker."""

    # None: `ram_share` of the memory available when the daemon starts.
    ram: ByteSize | None = None
    ram_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # Per GPU; None: `vram_share` of each GPU's free memory at start.
    vram: ByteSize | None = None
    vram_share: Annotated[float, Field(gt=0, le=1)] = 0.8
    # Kept free under the budget for the daemon's own growth and measurement lag.
    margin: ByteSize = ByteSize(32 << 20)


class PoolSettings(_Section):
    # Requests waiting for one model beyond this get `overloaded` at once.
    max_queue: Annotated[int, Field(ge=1)] = 32
    # A request that waited this long for its model (load + queue) gets `timeout`.
    queue_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # Unload a model idle this long (None: never); per model in [models.<id>].
    idle_ttl_s: Annotated[float, Field(gt=0)] | None = 900.0
    # A version whose load fails this many times in a row is quarantined: requests get
    # `model_quarantined` without a load for `quarantine_s`, doubling after each further
    # failure (up to an hour).
    quarantine_after: Annotated[int, Field(ge=1)] = 3
    quarantine_s: Annotated[float, Field(gt=0)] = 30.0


class ModelPolicy(_Section):
    pin: bool = False  # never evicted, never unloaded for idleness
    idle_ttl_s: Annotated[float, Field(gt=0)] | None = None  # overrides [pool] idle_ttl_s
    n_parallel: Annotated[int, Field(gt=0, le=64)] | None = None  # overrides [llama] n_parallel
    # Escalate this model's answers below this confidence (overrides [escalation]).
    escalation_threshold: Annotated[float, Field(ge=0, le=1)] | None = None


class ClientLimits(_Section):
    """An agent, known by the `client` name its requests declare: [clients.<name>]."""

    # Its requests being handled at once (queued or generating); more is `overloaded`.
    max_in_flight: Annotated[int, Field(ge=1)] | None = None


class MetricsSettings(_Section):
    """Prometheus metrics on a loopback port (docs/metrics.md)."""

    port: Annotated[int, Field(ge=1, le=65535)] | None = None  # None: off


class HttpSettings(_Section):
    """The optional OpenAI-compatible HTTP door (runtime/daemon/http.py)."""

    listen: str | None = None  # HOST:PORT; None: off
    # Required to listen off loopback; when set, every request must carry it
    # (`Authorization: Bearer <key>`), on loopback too.
    api_key: SecretStr | None = None


class CurveSettings(_Section):
    """CURVE on TCP endpoints off loopback (runtime/curve.py, docs/security.md)."""

    # The daemon's and this client's key pairs and the allow-list; None: <data_dir>/keys.
    keys_dir: Path | None = None
    # A client's view: the daemon's public key (z85, `outpost keys show` on its machine).
    server_key: str | None = None


class LlamaSettings(_Section):
    # None: half the physical cores (at least 1), so two models can decode at once
    # without llama.cpp's spinning threads fighting over the cores.
    n_threads: Annotated[int, Field(gt=0)] | None = None
    n_batch: Annotated[int, Field(gt=0)] = 512
    # "auto": offload every layer when llama.cpp was built with a GPU backend, else 0.
    n_gpu_layers: int | Literal["auto"] = "auto"
    # Requests a worker decodes together (models/batching.py), each with a context's KV
    # cache. "auto": 4 where the model runs on a GPU (decode is memory-bound there, so
    # more sequences cost little), 1 on a CPU (compute-bound: 4 sequences gave
    # llama.cpp's own batched bench 1.24x on 2 cores). Fewer when the budget is short.
    n_parallel: Annotated[int, Field(gt=0, le=64)] | Literal["auto"] = "auto"


class OnnxSettings(_Section):
    # Execution providers to try, best first; []: TensorRT, CUDA, then CPU, as this
    # onnxruntime build has them (the CPU always ends the list). Threads: [llama] n_threads.
    providers: list[str] = []


class DaemonSettings(BaseModel):
    """What a running daemon reads; the front door's `Settings` adds the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    endpoint: str = Field(default_factory=default_endpoint)
    default_model: str = "smollm2-135m-instruct"
    # Extra folders of manifest TOML files, on top of the shipped catalog.
    manifest_dirs: list[Path] = []
    # Models to load when the daemon starts, so the first call does not wait.
    # None: the default model, if it is pulled; []: nothing.
    preload: list[str] | None = None
    server: ServerSettings = ServerSettings()
    budget: BudgetSettings = BudgetSettings()
    pool: PoolSettings = PoolSettings()
    llama: LlamaSettings = LlamaSettings()
    onnx: OnnxSettings = OnnxSettings()
    logs: LogSettings = LogSettings()
    confidence: ConfidenceSettings = ConfidenceSettings()
    escalation: EscalationSettings = EscalationSettings()
    cloud: CloudSettings = CloudSettings()
    # Per-model policy, by manifest id: [models."smollm2-135m-instruct"] pin = true
    models: dict[str, ModelPolicy] = {}
    # Per-agent limits, by the `client` name a request declares; [clients.default]
    # applies to requests that declare none, or a name not listed.
    clients: dict[str, ClientLimits] = {}
    metrics: MetricsSettings = MetricsSettings()
    http: HttpSettings = HttpSettings()
    curve: CurveSettings = CurveSettings()

    @property
    def keys_dir(self) -> Path:
        return self.curve.keys_dir or self.data_dir / "keys"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs.db"
