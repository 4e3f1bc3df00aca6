"""The int4 conversion carries the GGUF's own blocks into MatMulNBits: a real GGUF file
(written with the gguf package), a transformers-style safetensors folder holding what
transformers would dequantize from it, and a graph of MatMulNBits nodes named the way
the model builder names them, run by onnxruntime before and after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from outpost.tools.gguf_blocks import Carried, carry  # noqa: E402

Q = gguf.GGMLQuantizationType
K, HEADS, KV_HEADS, HEAD_DIM, FF, VOCAB = 64, 4, 2, 8, 48, 40


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """How llama.cpp's converter lays out a llama model's Q and K rows (its definition,
    written out here independently of the code under test)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_source(tmp: Path, broken: bool = False) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A GGUF with Q4_1 attention, a Q4_0 up-projection, an F32 down-projection and a
    Q8_0 embedding; the HF folder with the same weights dequantized (the HF row order);
    those weights by HF name."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(tmp / "m.gguf"), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    hf: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, rows: int, kind, heads: int | None = None) -> None:
        w = rng.standard_normal((rows, K)).astype(np.float32) * 0.1
        if kind == Q.F32:
            writer.add_tensor(gguf_name, w)
            hf[hf_name] = w
            return
        raw = gguf.quants.quantize(w, kind)
        deq = gguf.quants.dequantize(raw, kind).astype(np.float32)
        if heads is not None:  # the GGUF holds permuted rows; the HF folder the originals
            order = llama_cpp_permute(np.arange(rows), heads)
            hf_deq = np.empty_like(deq)
            hf_deq[order] = deq
            deq = hf_deq
        writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=kind)
        hf[hf_name] = deq

    add("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", HEADS * HEAD_DIM, Q.Q4_1, HEADS)
    add("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, Q.Q4_1, KV_HEADS)
    add("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, Q.Q4_1)
    add("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", FF, Q.Q4_0)
    add("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", K, Q.F32)
    add("token_embd.weight", "model.embed_tokens.weight", VOCAB, Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp / "hf"
    folder.mkdir()
    saved = dict(hf)
    if broken:  # the folder no longer holds what the GGUF does: nothing may be carried for it
        saved["model.layers.0.mlp.up_proj.weight"] = saved["model.layers.0.mlp.up_proj.weight"] + 0.01
    save_file(saved, str(folder / "model.safetensors"))
    return tmp / "m.gguf", folder, hf


def node(name: str, module: str, n: int, bits: int, zero_points: bool, rng) -> tuple[list, list]:
    """A MatMulNBits node with garbage weights, named as the builder names them."""
    nb, blob = K // 32, 32 * bits // 8
    w = f"{module}.MatMul.weight_Q{bits}G32"
    inits = [numpy_helper.from_array(rng.integers(0, 255, (n, nb, blob), dtype=np.uint8), w),
             numpy_helper.from_array(rng.random((n, nb), dtype=np.float32), f"{module}.MatMul.weight_scale")]
    inputs = ["x", w, f"{module}.MatMul.weight_scale"]
    if zero_points:
        zp = np.full((n, nb if bits == 8 else (nb + 1) // 2), 0x88 if bits == 4 else 128, np.uint8)
        inits.append(numpy_helper.from_array(zp, f"{module}.MatMul.weight_zp"))
        inputs.append(f"{module}.MatMul.weight_zp")
    made = helper.make_node("MatMulNBits", inputs, [name], domain="com.microsoft", K=K, N=n, bits=bits,
                            block_size=32, accuracy_level=0)
    return [made], inits


def make_graph(folder: Path) -> None:
    rng = np.random.default_rng(1)
    nodes, inits, outputs = [], [], []
    for name, module, n, bits, zp in (
            ("qkv", "model.layers.0.attn.qkv_proj", (HEADS + 2 * KV_HEADS) * HEAD_DIM, 4, True),
            ("up", "model.layers.0.mlp.up_proj", FF, 4, False),
            ("down", "model.layers.0.mlp.down_proj", K, 4, True),
            ("head", "lm_head", VOCAB, 8, True)):
        made, weights = node(name, module, n, bits, zp, rng)
        nodes += made
        inits += weights
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "S", n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)


def run(folder: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x}), strict=True))


def test_the_graph_computes_with_the_ggufs_own_weights(tmp_path):
    gguf_path, hf, weights = make_source(tmp_path)
    make_graph(tmp_path / "onnx")
    x = np.random.default_rng(3).standard_normal((1, 5, K)).astype(np.float32)
    before = run(tmp_path / "onnx", x)

    assert carry(gguf_path, hf, tmp_path / "onnx") == Carried(exact=3, kept=1, corrected=1)

    after = run(tmp_path / "onnx", x)
    layer = "model.layers.0."
    qkv = np.concatenate([weights[f"{layer}self_attn.{p}_proj.weight"] for p in "qkv"])
    # Q4_1 (q and k with their rotary rows put back in HF order), with its correction.
    np.testing.assert_allclose(after["qkv"], x @ qkv.T, atol=2e-5)
    np.testing.assert_allclose(after["up"], x @ weights[f"{layer}mlp.up_proj.weight"].T, atol=2e-5)  # Q4_0
    np.testing.assert_allclose(after["head"], x @ weights["model.embed_tokens.weight"].T, atol=2e-5)  # Q8_0
    np.testing.assert_array_equal(after["down"], before["down"])  # F32 in the GGUF: the builder's stays
    assert not np.allclose(before["qkv"], after["qkv"])


def test_a_tensor_that_does_not_match_keeps_the_builders_weights(tmp_path):
    gguf_path, hf, _ = make_source(tmp_path, broken=True)
    make_graph(tmp_path / "onnx")
    x = np.random.default_rng(3).standard_normal((1, 2, K)).astype(np.float32)
    before = run(tmp_path / "onnx", x)

    assert carry(gguf_path, hf, tmp_path / "onnx") == Carried(exact=2, kept=2, corrected=1)
    np.testing.assert_array_equal(run(tmp_path / "onnx", x)["up"], before["up"])
