"""Errors raised while running a model: bad tool schemas, a prompt too long, a model
that will not load. Children of the root tree in `outpost.manifests.errors`; the whole
tree is documented in `outpost/runtime/errors.py`.
"""

from __future__ import annotations

from outpost.manifests.errors import BadRequest, OutpostError


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


class GrammarTooComplex(UnsupportedSchema):
    """The tools' grammar did not compile within `[server] grammar_timeout_s`: the worker
    that tried is replaced (its compile cannot be stopped), the daemon serves on."""

    def __init__(self, tool: str, timeout_s: float) -> None:
        super().__init__(tool, f"the grammar did not compile within {timeout_s:g} s; simplify "
                               "the schema (fewer enum values, less nesting)")
        self.data.update(keyword="compile_timeout", timeout_s=timeout_s)


class ContextOverflow(OutpostError):
    code = "context_overflow"

    def __init__(self, n_tokens: int, n_ctx: int) -> None:
        super().__init__(f"prompt is {n_tokens} tokens, the model's context is {n_ctx}",
                         n_tokens=n_tokens, n_ctx=n_ctx)
        self.n_tokens, self.n_ctx = n_tokens, n_ctx


class ModelLoadFailed(OutpostError):
    code = "model_load_failed"


class DecodeFailed(OutpostError):
    """llama.cpp refused a forward pass (`status` 1: no room in its KV cache for the
    batch; 2: aborted; negative: an invalid batch). It fails the requests in that pass;
    the worker and the others go on."""

    code = "decode_failed"

    def __init__(self, model: str, n_tokens: int, status: int) -> None:
        super().__init__(f"llama.cpp could not decode a pass of {n_tokens} tokens for {model} "
                         f"(llama_decode returned {status})", model=model, n_tokens=n_tokens, status=status)
        self.model, self.n_tokens, self.status = model, n_tokens, status


class ModelInvalid(ModelLoadFailed):
    """A model file that fails Outpost's own structural check (models/gguf_check.py), or
    a chat template it carries that reaches outside the sandbox: refused before native
    code parses it."""

    code = "model_invalid"

    def __init__(self, file: str, reason: str, offset: int = 0) -> None:
        super().__init__(f"{file} refused: {reason}", file=file, reason=reason, offset=offset)
        self.file, self.reason, self.offset = file, reason, offset


class AdapterLoadFailed(ModelLoadFailed):
    """A task adapter could not be applied to its base (the base keeps serving)."""

    code = "adapter_load_failed"

    def __init__(self, base: str, adapter: str | None, reason: str) -> None:
        super().__init__(f"adapter {adapter!r} on {base}: {reason}", model=base, adapter=adapter,
                         reason=reason)
        self.base, self.adapter, self.reason = base, adapter, reason
