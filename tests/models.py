"""Tiny ONNX models built in tests with onnx.helper (fast, deterministic, real graphs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr.astype(np.float32), name)


def tiny_mlp(path: Path, in_features: int = 16, hidden: int = 32, classes: int = 4, *, opset: int = 13,
             batch: int | str = 1, seed: int = 0) -> Path:
    """x[batch, in] -> MatMul+Add -> Relu -> MatMul+Add -> logits[batch, classes]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(in_features), (in_features, hidden))
    b1 = rng.normal(0, 0.1, (hidden,))
    w2 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, classes))
    b2 = rng.normal(0, 0.1, (classes,))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_cnn(path: Path, channels: int = 1, size: int = 8, classes: int = 10, *, opset: int = 13,
             batch: int | str = 1, seed: int = 0) -> Path:
    """image[batch, C, size, size] -> Conv3x3(8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    wc = rng.normal(0, 0.5, (8, channels, 3, 3))
    bc = rng.normal(0, 0.1, (8,))
    wf = rng.normal(0, 0.5, (classes, 8))
    bf = rng.normal(0, 0.1, (classes,))
    nodes = [
        helper.make_node("Conv", ["image", "wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [_init("wc", wc), _init("bc", bc), _init("wf", wf), _init("bf", bf)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
