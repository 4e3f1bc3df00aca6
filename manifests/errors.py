"""The root of Outpost's error tree, and the errors of what a model is and where it lives.

Every error is an `OutpostError`: it carries its facts as attributes and a stable
snake_case `code` that the wire protocol sends, so nobody has to parse a message to
learn what went wrong. Each error is defined in the lowest layer that raises it
(imports only go downwards); the whole tree, layer by layer, is documented in one
place: `outpost/runtime/errors.py`.

    OutpostError                      internal
    ├── BadRequest                    bad_request
    ├── UnknownModel                  unknown_model
    ├── ModelNotPulled                model_not_pulled
    ├── ModelFileError                model_file_error
    │   └── ChecksumMismatch          checksum_mismatch
    ├── FetchError                    fetch_failed
    ├── NotFound                      not_found
    ├── ConfigError                   config_error
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


class NotFound(OutpostError):
    """A thing named by id that does not exist (a logged request, ...)."""

    code = "not_found"

    def __init__(self, kind: str, ident: Any) -> None:
        super().__init__(f"no {kind} {ident!r}", kind=kind, id=ident)


class ConfigError(OutpostError):
    code = "config_error"


class InternalError(OutpostError):
    code = "internal"


def _subclasses(cls: type[OutpostError]) -> list[type[OutpostError]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def error_class(code: str) -> type[OutpostError]:
    """The class whose `code` this is, among the errors of the layers imported so far.

    Looked up at call time, not registered at import: the layers above define their own
    errors after this module is loaded. A parent comes before its children, so a code a
    subclass merely inherits still maps to the class that declared it; the root's
    `internal` maps to `InternalError`.
    """
    for cls in _subclasses(OutpostError):
        if cls.__dict__.get("code") == code:
            return cls
    return OutpostError


def from_wire(error: dict[str, Any]) -> OutpostError:
    """Rebuild a typed error from a reply's `error` object (client side, or a worker's)."""
    code = error.get("code", "internal")
    exc = OutpostError.__new__(error_class(code))
    OutpostError.__init__(exc, error.get("message", ""), **(error.get("data") or {}))
    exc.code = code  # keep a code this side does not know yet
    for key, value in (error.get("data") or {}).items():
        setattr(exc, key, value)
    return exc
