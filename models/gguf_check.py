"""A bounds-checked reader for GGUF files, run before llama.cpp opens one.

A model file comes from a fleet hub, a USB stick or a web page: it is input, and
parsers of it have shipped out-of-bounds reads and writes (llama.cpp's GGUF CVEs,
Ollama's "Bleeding Llama"). A sha256 that matches its manifest only says the file is
the one the publisher signed, not that it is well formed. So the worker reads the
header with this reader first, and llama.cpp only sees files it accepted:

- magic, version (2 or 3), counts that the file's size can hold at all (a tensor
  count near 2^64 is refused before anything is allocated for it);
- every string and array inside the file and under a cap (`MAX_STRING`, and
  `MAX_HEADER` for everything before the tensor data), value types known, no nested
  arrays, keys and tensor names unique, booleans 0 or 1;
- tensors: 1-4 dimensions, none negative, element counts that do not overflow, a
  known ggml type whose block divides the first dimension, offsets aligned to
  `general.alignment` (a power of two), data inside the file, no two overlapping;
- a model's shapes agree with its own hyper-parameters: an architecture name, `blk.N`
  below the block count, the embedding matrix `embedding_length` x the tokenizer's
  vocabulary. (A context longer than the model was trained on is llama.cpp's to allow.)

It reads through a read-only mmap, touching only the header's pages. It allocates
nothing in proportion to a count it has not checked against the bytes that remain.

What this module must not do: import llama_cpp (it runs before it), or trust any
number in the file before checking it against the file's size.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelInvalid

CHECKER = "1"  # bump when the checks change: files passed by an older checker are read again
MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_HEADER = 256 << 20  # metadata and tensor table; Gemma-3's 262k-token vocabulary is ~6 MiB
MAX_STRING = 16 << 20  # one string value (a chat template is kilobytes)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME - 1
INT64_MAX = (1 << 63) - 1
DEFAULT_ALIGNMENT = 32

# GGUF value types: fixed-size scalars by struct format; 8 is a string, 9 an array.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
           11: "<q", 12: "<d"}
STRING, ARRAY, BOOL = 8, 9, 7
# ggml tensor types this reader accepts: id -> (elements per block, bytes per block).
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}
ARCH = re.compile(r"^[a-z0-9_.-]{1,64}$")
BLOCK = re.compile(r"^blk\.(\d+)\.")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # arrays as ("array", type, count)
    tensors: list[Tensor] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0


class _Bad(Exception):
    """The first thing wrong with the file, and where."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason, self.offset = reason, offset


class _Cursor:
    def __init__(self, buf: mmap.mmap, limit: int) -> None:
        self.buf, self.limit, self.pos = buf, limit, 0

    def remaining(self) -> int:
        return self.limit - self.pos

    def take(self, n: int, what: str) -> int:
        """Reserve `n` bytes at the cursor; their start offset."""
        if n < 0 or n > self.remaining():
            raise _Bad(f"{what} needs {n} bytes at offset {self.pos}, but only "
                       f"{max(self.remaining(), 0)} remain", self.pos)
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, cap: int = MAX_STRING, decode: bool = True) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        if n > cap:
            raise _Bad(f"{what} claims {n} bytes (the cap is {cap})", self.pos - 8)
        start = self.take(n, what)
        if not decode:  # an array's strings (a vocabulary): llama.cpp reads their bytes
            return ""
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not UTF-8", start) from None


def read_header(path: Path, max_header: int = MAX_HEADER, name: str | None = None) -> GgufHeader:
    """Parse and check a GGUF file's structure; ModelInvalid says what is wrong and where
    (naming the file `name`, its manifest's name for it, rather than its blob's)."""
    name = name or path.name
    try:
        size = path.stat().st_size
        if size < 24:
            raise _Bad(f"{size} bytes is too short for a GGUF header", 0)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, min(size, max_header)), size)
    except _Bad as bad:
        raise ModelInvalid(name, bad.reason, bad.offset) from None
    except OSError as exc:
        raise ModelInvalid(name, f"cannot read: {exc.strerror}", 0) from exc


def _parse(cur: _Cursor, size: int) -> GgufHeader:
    if bytes(cur.buf[cur.take(4, "the magic"):4]) != MAGIC:
        raise _Bad("not a GGUF file (bad magic)", 0)
    version = cur.unpack("<I", "the version")
    if version not in VERSIONS:
        raise _Bad(f"GGUF version {version} is not supported (only {VERSIONS})", 4)
    head = GgufHeader(version)
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.unpack("<Q", "the metadata count")
    # The least a key/value (8-byte length, a 1-byte key, a type, a 1-byte value) and a
    # tensor entry (name length, name, n_dims, one dim, type, offset) can take: a count
    # the file cannot hold is refused before the loop that would trust it.
    if n_kv * 14 > cur.remaining():
        raise _Bad(f"{n_kv} metadata entries cannot fit in the {cur.remaining()} bytes left", 16)
    if n_tensors * 33 > cur.remaining():
        raise _Bad(f"{n_tensors} tensors cannot fit in the {cur.remaining()} bytes left", 8)
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}", cap=1024)
        if not key or key in head.metadata:
            raise _Bad(f"metadata key {key!r} is empty or repeated", cur.pos)
        head.metadata[key] = _value(cur, cur.unpack("<I", f"the type of {key}"), key)
    alignment = head.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise _Bad(f"general.alignment {alignment!r} is not a power of two", cur.pos)
    head.alignment = alignment
    names: set[str] = set()
    for i in range(n_tensors):
        t = _tensor(cur, i, alignment)
        if t.name in names:
            raise _Bad(f"tensor {t.name!r} appears twice", cur.pos)
        names.add(t.name)
        head.tensors.append(t)
    head.data_offset = -(-cur.pos // alignment) * alignment
    data_size = size - head.data_offset
    if data_size < 0:
        raise _Bad("the tensor data section starts past the end of the file", cur.pos)
    end = 0
    for t in sorted(head.tensors, key=lambda t: t.offset):
        if t.offset < end:
            raise _Bad(f"tensor {t.name!r} at data offset {t.offset} overlaps the one before "
                       f"(which ends at {end})", head.data_offset + t.offset)
        end = t.offset + t.nbytes
        if end > data_size:
            raise _Bad(f"tensor {t.name!r} ({t.nbytes} bytes at data offset {t.offset}) runs past "
                       f"the end of the file", head.data_offset + t.offset)
    return head


def _value(cur: _Cursor, vtype: int, key: str, in_array: bool = False) -> Any:
    if vtype in SCALARS:
        value = cur.unpack(SCALARS[vtype], key)
        if vtype == BOOL and value not in (0, 1):
            raise _Bad(f"{key} is a bool of value {value}", cur.pos - 1)
        return bool(value) if vtype == BOOL else value
    if vtype == STRING:
        return cur.string(key)
    if vtype == ARRAY and not in_array:
        etype = cur.unpack("<I", f"the element type of {key}")
        count = cur.unpack("<Q", f"the length of {key}")
        if etype in SCALARS:
            cur.take(count * struct.calcsize(SCALARS[etype]), f"the {count} elements of {key}")
            return ("array", etype, count)
        if etype == STRING:
            if count * 8 > cur.remaining():
                raise _Bad(f"{key} claims {count} strings; the file cannot hold them", cur.pos)
            _skip_strings(cur, count, key)
            return ("array", etype, count)
        raise _Bad(f"{key} is an array of {'arrays' if etype == ARRAY else f'unknown type {etype}'}",
                   cur.pos)
    raise _Bad(f"{key} has unknown value type {vtype}", cur.pos - 4)


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Step over an array of strings (a vocabulary: 262k of them for Gemma-3), checking
    each length; the loop is `_Cursor.string` inlined, as it runs once per token."""
    buf, pos, limit, length = cur.buf, cur.pos, cur.limit, _U64.unpack_from
    for i in range(count):
        if pos + 8 > limit:
            raise _Bad(f"{key}[{i}]'s length runs past the end of the file", pos)
        n = length(buf, pos)[0]
        pos += 8
        if n > MAX_STRING or n > limit - pos:
            raise _Bad(f"{key}[{i}] claims {n} bytes; {limit - pos} remain", pos - 8)
        pos += n
    cur.pos = pos


def _tensor(cur: _Cursor, i: int, alignment: int) -> Tensor:
    name = cur.string(f"tensor {i}'s name", cap=1024)
    if not 0 < len(name.encode()) <= MAX_NAME:
        raise _Bad(f"tensor {i}'s name is {len(name.encode())} bytes (1 to {MAX_NAME})", cur.pos)
    n_dims = cur.unpack("<I", f"{name}'s dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Bad(f"{name} has {n_dims} dimensions (1 to {MAX_DIMS})", cur.pos - 4)
    dims = tuple(cur.unpack("<q", f"{name}'s dimension {d}") for d in range(n_dims))
    elements = 1
    for d in dims:
        if d < 0:
            raise _Bad(f"{name} has a negative dimension {dims}", cur.pos)
        if d and elements > INT64_MAX // d:
            raise _Bad(f"{name}'s element count {dims} overflows 64 bits", cur.pos)
        elements *= d
    ggml_type = cur.unpack("<I", f"{name}'s type")
    if ggml_type not in GGML_TYPES:
        raise _Bad(f"{name} has unknown ggml type {ggml_type}", cur.pos - 4)
    block, block_bytes = GGML_TYPES[ggml_type]
    if dims[0] % block:
        raise _Bad(f"{name}'s first dimension {dims[0]} is not a multiple of its type's "
                   f"block of {block}", cur.pos)
    offset = cur.unpack("<Q", f"{name}'s offset")
    if offset > INT64_MAX:
        raise _Bad(f"{name}'s offset {offset} is out of range", cur.pos - 8)
    if offset % alignment:
        raise _Bad(f"{name}'s offset {offset} is not aligned to {alignment}", cur.pos - 8)
    return Tensor(name, dims, ggml_type, offset, elements // block * block_bytes)


def check_model(path: Path, name: str | None = None) -> GgufHeader:
    """A model file (or a task adapter, `general.type = "adapter"`) checked in full:
    its structure, then its shapes against its own hyper-parameters."""
    name = name or path.name
    head = read_header(path, name=name)
    md = head.metadata
    if md.get("general.type") == "adapter":
        return head

    def bad(reason: str) -> ModelInvalid:
        return ModelInvalid(name, reason, 0)

    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not ARCH.match(arch):
        raise bad(f"general.architecture is {arch!r}, not an architecture name")
    blocks = md.get(f"{arch}.block_count")
    if not isinstance(blocks, int) or not 0 < blocks <= 4096:
        raise bad(f"{arch}.block_count is {blocks!r}")
    for t in head.tensors:
        m = BLOCK.match(t.name)
        if m and int(m.group(1)) >= blocks:
            raise bad(f"tensor {t.name} is past the {blocks} blocks the model declares")
    embd = md.get(f"{arch}.embedding_length")
    tokens = md.get("tokenizer.ggml.tokens")
    table = next((t for t in head.tensors if t.name == "token_embd.weight"), None)
    if table is not None and isinstance(embd, int) and table.dims[0] != embd:
        raise bad(f"token_embd.weight is {table.dims}, but embedding_length is {embd}")
    if table is not None and isinstance(tokens, tuple) and len(table.dims) > 1 and table.dims[1] != tokens[2]:
        raise bad(f"token_embd.weight has {table.dims[1]} rows for a vocabulary of {tokens[2]} tokens")
    return head
