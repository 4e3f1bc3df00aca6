"""The GGUF's own quantized blocks carried into the ONNX graph, so an int4 conversion
does not quantize the weights a second time.

A catalog model is a GGUF whose weights are already block-quantized (SmolLM2-135M:
Q4_1 in every projection, Q8_0 for the tied embedding). The model builder only sees
them dequantized and rounds them again onto its own grid, which moves every weight:
SmolLM2 int4 scored 50% BFCL AST where its GGUF scored 54% (k-quant; 43% with the
builder's defaults). This pass rewrites each MatMulNBits node the builder made so it
computes with the GGUF's values exactly:

- Q4_0 (w = d·(q−8)) and Q8_0 (w = d·q) are MatMulNBits' own 4- and 8-bit formats at
  block 32: the codes are repacked (GGUF puts element j and j+16 in one byte, MatMulNBits
  j and j+1) and the scales copied.
- Q4_1 (w = d·q + m) has a per-block minimum that MatMulNBits holds exactly only as a
  float zero point, and onnxruntime 1.32's CPU kernel runs that ~35x slower (it
  dequantizes). So the node keeps an integer zero point z = round(−m/d), and the
  remainder r = m + d·z (|r| ≤ d/2, per block) is added as a small correction:
  y = MatMulNBits(x) + blocksum(x)·R, blocksum summing x over each 32-wide block and R
  the [K/32, N] fp32 matrix of remainders — a matmul 1/32 the size of the weight's.

Every tensor is checked against the transformers folder the builder read (the same
GGUF dequantized by transformers) before it is used; one that does not match (another
quantization type, an unknown name, a layout this pass does not know) keeps the
builder's weights, and the count of each is returned.

What this module must not do: change the graph's inputs, outputs or anything but the
MatMulNBits weights it can prove equal and the correction nodes they need.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("outpost.convert")

BLOCK = 32
# GGUF tensor names (llama.cpp's) for the projections the builder names by HF module;
# the builder fuses q, k and v into one node, rows in that order.
SOURCES = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"), "q_proj": ("attn_q",), "k_proj": ("attn_k",),
    "v_proj": ("attn_v",), "o_proj": ("attn_output",), "gate_proj": ("ffn_gate",),
    "up_proj": ("ffn_up",), "down_proj": ("ffn_down",),
}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
NODE_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(?:attn|mlp)\.(\w+)\.MatMul\.weight_Q[48]")


@dataclass(frozen=True)
class Blocks:
    """One weight as GGUF blocks along K, rows in the HF (output) order:
    w[n, b*32 + j] = scale[n, b] · (codes[n, b, j] − zero) + offset[n, b]."""

    codes: np.ndarray  # uint8 [N, K/32, 32]
    scale: np.ndarray  # float32 [N, K/32]
    zero: int
    offset: np.ndarray | None  # float32 [N, K/32]; Q4_1's per-block minimum
    bits: int

    def dequantize(self) -> np.ndarray:
        w = self.scale[..., None] * (self.codes.astype(np.float32) - self.zero)
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(w.shape[0], -1)


def read_blocks(tensor) -> Blocks | None:
    """A GGUF tensor (gguf.ReaderTensor) as Blocks; None for a type this pass cannot
    carry exactly (K-quants, floats)."""
    import gguf

    kind = tensor.tensor_type
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    if kind == gguf.GGMLQuantizationType.Q8_0:  # d:f16, 32 x int8
        b = raw.reshape(rows, -1, 34)
        scale = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = (b[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(codes, scale, 128, None, 8)
    if kind in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        q4_1 = kind == gguf.GGMLQuantizationType.Q4_1
        head = 4 if q4_1 else 2  # d:f16 (and m:f16), then 16 bytes of nibbles
        b = raw.reshape(rows, -1, head + 16)
        scale = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        offset = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if q4_1 else None
        qs = b[..., head:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte j holds elements j and j+16
        return Blocks(codes, scale, 0 if q4_1 else 8, offset, 4)
    return None


def _rows(blocks: Blocks, order: np.ndarray) -> Blocks:
    return Blocks(blocks.codes[order], blocks.scale[order], blocks.zero,
                  None if blocks.offset is None else blocks.offset[order], blocks.bits)


def rope_order(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the two rotary halves of each head of a llama
    model's Q and K rows; the HF row order is this permutation of the GGUF's."""
    return np.arange(rows).reshape(heads, -1, 2).swapaxes(1, 2).reshape(-1)


def _cat(parts: list[Blocks]) -> Blocks:
    offsets = [p.offset for p in parts]
    return Blocks(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
                  parts[0].zero, None if offsets[0] is None else np.concatenate(offsets), parts[0].bits)


class _Source:
    """The GGUF's tensors and the transformers folder's, matched by name."""

    def __init__(self, gguf_path: Path, hf: Path) -> None:
        import gguf
        from safetensors import safe_open

        self.reader = gguf.GGUFReader(str(gguf_path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        def field(name: str):
            found = self.reader.fields.get(name)
            return found.contents() if found is not None else None

        arch = field("general.architecture")
        self.heads = field(f"{arch}.attention.head_count")
        self.kv_heads = field(f"{arch}.attention.head_count_kv") or self.heads
        # Without head counts the rows cannot be put back: Q and K then fail the check.
        self.llama = arch == "llama" and isinstance(self.heads, int)
        self.hf = {}
        for path in sorted(hf.glob("*.safetensors")):
            handle = safe_open(str(path), framework="numpy")
            self.hf.update({name: handle for name in handle.keys()})

    def hf_weight(self, name: str) -> np.ndarray | None:
        handle = self.hf.get(name)
        return None if handle is None else handle.get_tensor(name)

    def blocks(self, gguf_name: str, hf_name: str) -> Blocks | None:
        """The GGUF tensor in HF row order, if it is carried exactly and equals what the
        builder read."""
        tensor = self.tensors.get(gguf_name)
        blocks = read_blocks(tensor) if tensor is not None else None
        expected = self.hf_weight(hf_name)
        if blocks is None or expected is None or expected.shape != (blocks.codes.shape[0], blocks.codes.shape[1] * BLOCK):
            return None
        if self.llama and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = self.heads if ".attn_q." in gguf_name else self.kv_heads
            blocks = _rows(blocks, rope_order(blocks.codes.shape[0], heads))
        if not np.allclose(blocks.dequantize(), expected, rtol=0, atol=1e-6):
            log.warning("%s does not match the dequantized weights; the builder's are kept", gguf_name)
            return None
        return blocks

    def for_node(self, weight_name: str) -> Blocks | None:
        if weight_name.startswith("lm_head.MatMul.weight_Q"):
            name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
            hf_name = "lm_head.weight" if "lm_head.weight" in self.hf else "model.embed_tokens.weight"
            return self.blocks(name, hf_name)
        m = NODE_WEIGHT.match(weight_name)
        if m is None or m.group(2) not in SOURCES:
            return None
        layer = m.group(1)
        parts = [self.blocks(f"blk.{layer}.{g}.weight", f"model.layers.{layer}.{HF_NAMES[g]}.weight")
                 for g in SOURCES[m.group(2)]]
        if any(p is None for p in parts) or len({(p.bits, p.zero, p.offset is None) for p in parts}) != 1:
            return None
        return _cat(parts)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packing along the last axis: 4-bit values two to a byte, the even
    one in the low nibble (an odd count is padded with a zero)."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


@dataclass(frozen=True)
class Carried:
    exact: int  # MatMulNBits nodes now computing with the GGUF's own blocks
    kept: int  # nodes left with the builder's weights
    corrected: int  # of the exact ones, those with a Q4_1 remainder correction


def carry(gguf_path: Path, hf: Path, folder: Path) -> Carried:
    """Rewrite `folder`'s model.onnx (and model.onnx.data) in place."""
    import onnx
    from onnx import helper, numpy_helper

    source = _Source(gguf_path, hf)
    model = onnx.load(str(folder / "model.onnx"))  # with its external data
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    added: list = []
    sums: dict[str, str] = {}  # an input's block sums, made once for every node reading it
    summers: set[str] = set()  # the [K, K/32] 0/1 matrices that make them, one per K
    exact = kept = corrected = 0
    new_nodes = []
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1]
        blocks = source.for_node(weight) if attrs.get("block_size") == BLOCK else None
        scale_init = inits.get(node.input[2])
        if (blocks is None or blocks.bits != attrs.get("bits") or weight not in inits or scale_init is None
                or scale_init.data_type != onnx.TensorProto.FLOAT
                or blocks.codes.shape[0] != attrs["N"] or blocks.codes.shape[1] * BLOCK != attrs["K"]):
            kept += 1
            continue
        n, nb = blocks.scale.shape
        if blocks.offset is None:  # Q4_0, Q8_0: the node's own format
            zp, remainder = np.full((n, nb), blocks.zero, np.uint8), None
        else:  # Q4_1: the nearest integer zero point, and the rest as a correction
            safe = np.where(blocks.scale > 0, blocks.scale, 1.0)
            zp = np.where(blocks.scale > 0, np.clip(np.rint(-blocks.offset / safe), 0, 15), 8).astype(np.uint8)
            remainder = blocks.offset + blocks.scale * zp
        inits[weight].CopyFrom(numpy_helper.from_array(
            _pack(blocks.codes, blocks.bits).reshape(tuple(inits[weight].dims)), weight))
        scale_init.CopyFrom(numpy_helper.from_array(blocks.scale.reshape(tuple(scale_init.dims)), scale_init.name))
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else f"{weight}_gguf_zp"
        zp_packed = _pack(zp, blocks.bits)
        if zp_name in inits:
            inits[zp_name].CopyFrom(numpy_helper.from_array(zp_packed.reshape(tuple(inits[zp_name].dims)), zp_name))
        else:
            added.append(numpy_helper.from_array(zp_packed, zp_name))
            while len(node.input) < 4:
                node.input.append("")
            node.input[3] = zp_name
        exact += 1
        if remainder is None or not remainder.any():
            continue
        corrected += 1
        x, y = node.input[0], node.output[0]
        if x not in sums:  # one matmul by a 0/1 matrix: fewer ops than reshape + sum
            ones = f"gguf_blocksum_{nb}"
            if ones not in summers:
                summers.add(ones)
                added.append(numpy_helper.from_array(np.repeat(np.eye(nb, dtype=np.float32), BLOCK, axis=0), ones))
            sums[x] = f"{x}_gguf_blocksum"
            new_nodes.append(helper.make_node("MatMul", [x, ones], [sums[x]]))
        r_name = f"{weight}_gguf_remainder"
        added.append(numpy_helper.from_array(np.ascontiguousarray(remainder.T, np.float32), r_name))
        node.output[0] = f"{y}_gguf_q"
        new_nodes += [helper.make_node("MatMul", [sums[x], r_name], [f"{y}_gguf_r"]),
                      helper.make_node("Add", [f"{y}_gguf_q", f"{y}_gguf_r"], [y])]
    # Topological order: every correction follows the node it reads (it was appended
    # right after it), and readers of `y` come later in the original order.
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(added)
    tmp = folder.with_name(folder.name + ".gguf-blocks")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data")
    for name in ("model.onnx", "model.onnx.data"):
        (tmp / name).replace(folder / name)
    tmp.rmdir()
    log.info("GGUF blocks carried into %d MatMulNBits nodes (%d with a Q4_1 correction); %d kept",
             exact, corrected, kept)
    return Carried(exact, kept, corrected)
