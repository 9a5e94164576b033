"""Models built in the tests to stress int8 quantization (onnx.helper; fast, deterministic).

``outlier_mlp``: a 4-layer MLP whose second layer has one hidden unit with weights x ``big`` (a huge
activation outlier after its Relu) that the next layer mixes back in with weights / ``big``. The float
model is unaffected, but int8 activations are quantized per tensor: the outlier sets the scale of the whole
tensor and the other 31 units round to zero, so the decisions change. Per-channel weights and other
calibration methods do not help (the outlier is in the activations, and it is 1 of 32 values, too many
for a percentile to clip); keeping that layer's activation in float does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def outlier_mlp(path: Path, *, big: float = 1e4, features: int = 16, hidden: int = 32, classes: int = 4,
                seed: int = 0) -> Path:
    """x[1, features] -> fc1 -> Relu -> fc2 (unit 0 x big) -> Relu -> fc3 (row 0 / big) -> Relu -> fc4.

    Nodes are named fc<i>_matmul, fc<i>_add and relu<i>; activations act<i>; the output is logits.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(features), (features, hidden))
    w2 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden))
    w3 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden))
    w4 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, classes))
    w2[:, 0] *= big
    w3[0, :] /= big
    inits = [_init("w1", w1), _init("b1", rng.normal(0, 0.1, hidden)), _init("w2", w2),
             _init("b2", rng.normal(0, 0.1, hidden)), _init("w3", w3), _init("b3", rng.normal(0, 0.1, hidden)),
             _init("w4", w4), _init("b4", rng.normal(0, 0.1, classes))]
    nodes = []
    x = "x"
    for i in (1, 2, 3, 4):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"fc{i}_matmul"))
        out = "logits" if i == 4 else f"fc{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], name=f"fc{i}_add"))
        if i < 4:
            nodes.append(helper.make_node("Relu", [out], [f"act{i}"], name=f"relu{i}"))
            x = f"act{i}"
    graph = helper.make_graph(nodes, "outlier_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def outlier_keras(path: Path, *, big: float = 1e4, features: int = 16, hidden: int = 32, classes: int = 4,
                  seed: int = 0) -> Path:
    """The same outlier MLP as ``outlier_mlp``, as a Keras model (batch 1) saved to ``path`` (.keras)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape=(features,), batch_size=1, name="x")
    h = keras.layers.Dense(hidden, activation="relu", name="fc1")(inp)
    h = keras.layers.Dense(hidden, activation="relu", name="fc2")(h)
    h = keras.layers.Dense(hidden, activation="relu", name="fc3")(h)
    model = keras.Model(inp, keras.layers.Dense(classes, name="fc4")(h), name="outlier")
    w, b = model.get_layer("fc2").get_weights()
    w[:, 0] *= big
    model.get_layer("fc2").set_weights([w, b])
    w, b = model.get_layer("fc3").get_weights()
    w[0, :] /= big
    model.get_layer("fc3").set_weights([w, b])
    model.save(path)
    return path
