"""What every backend takes and gives back, and the protocol it satisfies.

A `LoadedModel` owns native memory and must be closed; one `generate` call is one
generation. These types are plain data so they cross the worker boundary as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

from .decision import Decision, Rule

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class LoadOptions:
    """How a worker loads its model: the daemon's `[llama]` and `[onnx]` settings, with
    the GPU layers the VRAM ledger grants. Handed to the worker process at its fork."""

    n_threads: int | None = None  # None: half the physical cores
    n_batch: int = 512  # llama.cpp's prompt batch
    n_gpu_layers: int | str = "auto"  # llama.cpp's offload
    providers: tuple[str, ...] = ()  # ONNX execution providers, best first; (): the default order
    grammar_timeout_s: float | None = None  # a tool grammar's compile, at most
    n_parallel: int = 1  # sequences decoded together (models/batching.py); llama.cpp only


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter to apply to one generation: which version, and the file's identity
    (the worker checks size and sha256 before llama.cpp reads it)."""

    id: str
    version: str
    sha256: str
    size: int
    scale: float = 1.0

    @property
    def name(self) -> str:  # how errors about its file name it
        return f"adapter {self.id} {self.version}"


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"  # auto | none | required | a function name
    parallel_tool_calls: bool = True
    constrained: bool = True  # false: tools are offered but decoding is free
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 40
    seed: int | None = None
    adapter: AdapterRef | None = None  # None: the base model alone
    # How tool_choice auto decides between calling and answering: the served version's
    # rule (decision.py); None: the uncalibrated one.
    decision: Rule | None = None

    def to_dict(self) -> dict[str, Any]:
        """The worker boundary's form (JSON-ready; the messages and tools are not copied)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adapter"] = asdict(self.adapter) if self.adapter else None
        out["decision"] = self.decision.to_dict() if self.decision else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        adapter, decision = data.get("adapter"), data.get("decision")
        return cls(**{**data, "adapter": AdapterRef(**adapter) if adapter else None,
                      "decision": Rule.from_dict(decision) if decision else None})


@dataclass
class Generation:
    text: str  # everything the model wrote
    content: str | None  # the text outside tool calls
    tool_calls: list[dict[str, Any]]  # OpenAI shape, arguments as a JSON string
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    decode_ms: float
    constrained: bool  # an xgrammar grammar masked the output
    grammar_dead_end: bool = False  # the grammar left no token to choose
    logprobs: list[float] = field(default_factory=list)  # chosen tokens, after the mask
    validation: list[dict[str, Any]] = field(default_factory=list)  # one per tool call
    repaired: int = 0  # calls cut short and closed (a loop, or max_tokens; see llama.py)
    prompt: str = ""  # the prompt exactly as the model saw it
    grammar: str | None = None  # what constrained decoding, if anything
    batch_size: float = 1.0  # sequences per forward pass it took part in, on average
    decision: Decision | None = None  # tool_choice auto: call or answer, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        """The far side of the worker boundary: a missing or unknown field is a TypeError."""
        decision = data.get("decision")
        return cls(**{**data, "decision": Decision.from_dict(decision) if decision else None})


class LoadedModel(Protocol):
    n_ctx: int

    def generate(self, request: GenerationRequest) -> Generation: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
