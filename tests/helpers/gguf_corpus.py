"""Malicious and broken GGUF files, made from the tiny random model by byte surgery.

`Raw` is a GGUF file taken apart (read with the `gguf` package's reader) into values a
test can break on purpose, and `pack` writes exactly what it holds, however wrong:
counts, lengths, types and offsets are written as given, not recomputed. `corpus()`
returns each broken file with what the refusal must mention.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
          11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class Kv:
    key: str
    vtype: int
    value: Any  # a scalar, a str, or (element type, [values]) for an array
    key_len: int | None = None  # written instead of the key's real length
    value_len: int | None = None  # a string's, or an array's element count
    type_as: int | None = None  # written instead of vtype (the value stays packed as vtype)


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int


@dataclass
class Raw:
    version: int = 3
    kvs: list[Kv] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32
    n_tensors: int | None = None  # written instead of len(tensors)
    n_kv: int | None = None
    magic: bytes = b"GGUF"

    def kv(self, key: str) -> Kv:
        return next(k for k in self.kvs if k.key == key)

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)


def read(path: Path) -> Raw:
    """A valid GGUF file taken apart."""
    r = gguf.GGUFReader(path)
    raw = Raw(alignment=r.alignment)
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = int(f.types[0])
        value = f.contents()
        if vtype == ARRAY:
            value = (int(f.types[1]), list(value))
        raw.kvs.append(Kv(key, vtype, value))
    blob = path.read_bytes()
    raw.data = blob[r.data_offset:]
    for t in r.tensors:
        raw.tensors.append(TensorInfo(t.name, [int(d) for d in t.shape], int(t.tensor_type),
                                      int(t.data_offset) - r.data_offset))
    return raw


def _value(vtype: int, value: Any, length: int | None) -> bytes:
    if vtype in SCALAR:
        return struct.pack(SCALAR[vtype], value)
    if vtype == STRING:
        data = value.encode()
        return struct.pack("<Q", len(data) if length is None else length) + data
    etype, items = value
    count = len(items) if length is None else length
    return struct.pack("<IQ", etype, count) + b"".join(_value(etype, item, None) for item in items)


def pack(raw: Raw) -> bytes:
    out = [raw.magic, struct.pack("<IQQ", raw.version,
                                  len(raw.tensors) if raw.n_tensors is None else raw.n_tensors,
                                  len(raw.kvs) if raw.n_kv is None else raw.n_kv)]
    for kv in raw.kvs:
        key = kv.key.encode()
        out.append(struct.pack("<Q", len(key) if kv.key_len is None else kv.key_len) + key)
        out.append(struct.pack("<I", kv.vtype if kv.type_as is None else kv.type_as)
                   + _value(kv.vtype, kv.value, kv.value_len))
    for t in raw.tensors:
        name = t.name.encode()
        out.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.dims)))
        out.append(b"".join(struct.pack("<q", d) for d in t.dims))
        out.append(struct.pack("<IQ", t.ggml_type, t.offset))
    head = b"".join(out)
    head += b"\0" * (-len(head) % raw.alignment)
    return head + raw.data


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    reason: str  # a phrase the refusal's reason must contain ("a|b": one of them)

    def explains(self, reason: str) -> bool:
        return any(phrase in reason for phrase in self.reason.split("|"))
    template: str | None = None  # the manifest's chat_template ("gguf": the file's)


def corpus(tiny: Path) -> list[Case]:
    base = read(tiny)
    good = pack(base)
    cases: list[Case] = []

    def mutated(name: str, reason: str, change: Any, **kw: Any) -> None:
        raw = copy.deepcopy(base)
        change(raw)
        cases.append(Case(name, pack(raw), reason, **kw))

    def patched(name: str, reason: str, data: bytes, **kw: Any) -> None:
        cases.append(Case(name, data, reason, **kw))

    header = 24
    meta_end = len(pack(Raw(kvs=base.kvs, alignment=1)))  # magic..metadata, no tensors
    table_end = len(pack(Raw(kvs=base.kvs, tensors=base.tensors, alignment=1)))
    # Truncated in every section.
    patched("empty", "too short", b"")
    patched("truncated-header", "too short", good[:20])
    patched("truncated-metadata", "remain|cannot hold|past the end", good[:header + (meta_end - header) // 2])
    patched("truncated-tensor-table", "remain|past the end", good[:meta_end + (table_end - meta_end) // 2])
    patched("truncated-data", "past the end of the file", good[:-1000])
    # Who it claims to be.
    patched("bad-magic", "bad magic", b"GGML" + good[4:])
    mutated("version-1", "version 1", lambda r: setattr(r, "version", 1))
    mutated("version-99", "version 99", lambda r: setattr(r, "version", 99))
    # Counts near 2^64.
    mutated("tensor-count-2^64", "cannot fit", lambda r: setattr(r, "n_tensors", 2**64 - 1))
    mutated("kv-count-2^64", "cannot fit", lambda r: setattr(r, "n_kv", 2**64 - 2))
    mutated("array-count-2^64", "cannot hold",
            lambda r: setattr(r.kv("tokenizer.ggml.tokens"), "value_len", 2**64 - 1))
    mutated("int-array-count-2^62", "remain",
            lambda r: setattr(r.kv("tokenizer.ggml.token_type"), "value_len", 2**62))
    # Strings.
    mutated("string-claims-1GB", "cap", lambda r: setattr(r.kv("general.name"), "value_len", 1 << 30))
    mutated("key-length-2^63", "cap", lambda r: setattr(r.kvs[0], "key_len", 2**63))
    name_at = good.index(b"outpost-tiny-random")
    patched("string-not-utf8", "not UTF-8", good[:name_at] + b"\xff" + good[name_at + 1:])
    # Types.
    mutated("unknown-value-type", "unknown value type", lambda r: setattr(r.kv("general.file_type"), "type_as", 99))
    mutated("nested-array", "array of arrays",
            lambda r: r.kvs.append(Kv("x.nested", ARRAY, (ARRAY, [(4, [1, 2])]))))
    mutated("bool-of-7", "bool", lambda r: setattr(r.kv("tokenizer.ggml.add_bos_token"), "value", 7))
    mutated("duplicate-key", "repeated", lambda r: r.kvs.append(copy.deepcopy(r.kvs[0])))
    mutated("alignment-3", "power of two", lambda r: r.kvs.append(Kv("general.alignment", 4, 3)))
    # Tensors.
    mutated("tensor-5-dims", "dimensions", lambda r: setattr(r.tensors[1], "dims", [64, 1, 1, 1, 1]))
    mutated("tensor-negative-dim", "negative", lambda r: setattr(r.tensors[1], "dims", [-64]))
    mutated("tensor-elements-overflow", "overflows", lambda r: setattr(r.tensors[0], "dims", [2**62, 2**62]))
    mutated("tensor-unknown-type", "unknown ggml type", lambda r: setattr(r.tensors[0], "ggml_type", 200))
    mutated("tensor-block-mismatch", "multiple of its type's block",  # Q4_K: blocks of 256
            lambda r: setattr(r.tensors[1], "ggml_type", 12))
    mutated("tensor-offset-unaligned", "not aligned", lambda r: setattr(r.tensors[1], "offset", r.tensors[1].offset + 1))
    mutated("tensor-offset-2^64", "out of range", lambda r: setattr(r.tensors[1], "offset", 2**64 - 32))
    mutated("tensor-offset-past-end", "past the end of the file",
            lambda r: setattr(r.tensors[-1], "offset", len(r.data) + 4096))
    mutated("tensors-overlap", "overlaps", lambda r: setattr(r.tensors[2], "offset", r.tensors[1].offset))
    mutated("tensor-name-twice", "twice", lambda r: setattr(r.tensors[2], "name", r.tensors[1].name))
    mutated("tensor-name-100-bytes", "name is 100 bytes", lambda r: setattr(r.tensors[1], "name", "n" * 100))
    # Shapes against the model's own hyper-parameters, and the manifest's.
    mutated("block-past-block-count", "past the", lambda r: setattr(r.kv("llama.block_count"), "value", 1))
    mutated("embedding-width-mismatch", "embedding_length",
            lambda r: setattr(r.kv("llama.embedding_length"), "value", 128))
    mutated("vocabulary-mismatch", "vocabulary", lambda r: r.kv("tokenizer.ggml.tokens").value[1].pop())
    mutated("no-architecture", "general.architecture",
            lambda r: setattr(r.kv("general.architecture"), "value", "../../etc"))
    # A chat template that reaches for Python's internals (CVE-2024-34359's shape).
    mutated("template-class-escape", "reaches for",
            lambda r: r.kvs.append(Kv("tokenizer.chat_template", STRING,
                                      "{{ ''.__class__.__mro__[1].__subclasses__() }}")), template="gguf")
    return cases
