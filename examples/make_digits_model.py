"""Make the demo's sample model from real data that ships inside scikit-learn (nothing is downloaded).

    python examples/make_digits_model.py OUT_DIR [--seed 0] [--epochs 15] [--json]

scikit-learn's ``load_digits`` holds 1797 handwritten digits as 8x8 images with values 0..16. Each image
is stored as an 8-bit grayscale PNG (pixel = round(value * 255 / 16)) and the model is trained on exactly
what edgekit's preprocessing makes of those PNGs (pixel / 255, NCHW), so the float model, the calibration
images and the device's preprocessing agree bit for bit.

A small Keras CNN (Conv 16 -> Conv 32 -> MaxPool -> Dense 64 -> Dense 10) is trained with a fixed seed, then
exported to ONNX by hand with onnx.helper (opset 13, input "image" [1,1,8,8] float32 NCHW, output "logits"
[1,10]); the ONNX model must equal Keras on the whole test split within 1e-4, else the script fails.

Writes into OUT_DIR:
  digits_fp32.onnx   the float model
  digits.keras       the same model in Keras format (fixed batch of 1)
  calib/<class>/     training-split images as PNGs, one subfolder per class "0".."9"
  test/<class>/      held-out split as PNGs
  test.npz           x float32 (N, 1, 8, 8) from the test PNGs, y int64 labels
  labels.txt         "0".."9"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ONNX_TOLERANCE = 1e-4
OPSET = 13
CLASSES = 10
SCALE = np.float32(1.0 / 255.0)  # exactly what edge_agent.preprocess.image_to_tensor multiplies by


def load_data(seed: int) -> dict[str, np.ndarray]:
    """Digits as 8-bit pixels plus the float inputs the model sees; stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=0.2, stratify=labels, random_state=seed)
    return {"pixels": pixels, "labels": labels, "train": np.sort(train_idx), "test": np.sort(test_idx)}


def to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, 8, 8) -> float32 (N, 1, 8, 8), as edgekit's gray/NCHW/scale 1/255 preprocessing does."""
    return (pixels.astype(np.float32) * SCALE)[:, None, :, :]


def build_keras(batch_size: int | None) -> Any:
    import keras

    inp = keras.Input(shape=(8, 8, 1), batch_size=batch_size, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="dense1")(x)
    out = keras.layers.Dense(CLASSES, name="logits")(x)
    return keras.Model(inp, out, name="digits_cnn")


def train(x_train: np.ndarray, y_train: np.ndarray, seed: int, epochs: int) -> Any:
    """Train on NHWC inputs with a dynamic batch; return the same weights in a batch-1 model."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_keras(None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0, shuffle=True)
    fixed = build_keras(1)
    fixed.set_weights(model.get_weights())
    return fixed


def export_onnx(model: Any, path: Path) -> None:
    """The Keras CNN as an ONNX graph written with onnx.helper (NCHW; kernels and flatten order converted)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def weights(layer: str) -> list[np.ndarray]:
        return [np.asarray(w, dtype=np.float32) for w in model.get_layer(layer).get_weights()]

    (k1, b1), (k2, b2) = weights("conv1"), weights("conv2")
    (w3, b3), (w4, b4) = weights("dense1"), weights("logits")
    inits = {
        "conv1.w": k1.transpose(3, 2, 0, 1),  # Keras (kh, kw, in, out) -> ONNX (out, in, kh, kw)
        "conv1.b": b1,
        "conv2.w": k2.transpose(3, 2, 0, 1),
        "conv2.b": b2,
        "flatten.shape": np.asarray([1, -1], dtype=np.int64),
        "dense1.w": w3,  # Keras Dense kernels are (in, out): Gemm without transB
        "dense1.b": b3,
        "logits.w": w4,
        "logits.b": b4,
    }
    nodes = [
        helper.make_node("Conv", ["image", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        # Keras flattens NHWC: transpose first so the 512 features come in the same order
        helper.make_node("Transpose", ["p"], ["p_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["p_nhwc", "flatten.shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "dense1.w", "dense1.b"], ["d1"], name="dense1"),
        helper.make_node("Relu", ["d1"], ["h"], name="relu3"),
        helper.make_node("Gemm", ["h", "logits.w", "logits.b"], ["logits"], name="logits"),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="edgekit examples/make_digits_model.py")
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model, full_check=True)
    partial = path.with_name(f".{path.name}.partial")
    onnx.save(onnx_model, str(partial))
    os.replace(partial, path)


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"image": sample[None]})[0] for sample in x])


def write_pngs(folder: Path, pixels: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    import cv2

    for c in range(CLASSES):
        (folder / str(c)).mkdir(parents=True)
    for i in indices:
        target = folder / str(int(labels[i])) / f"{int(i):04d}.png"
        if not cv2.imwrite(str(target), pixels[i]):
            raise OSError(f"OpenCV could not write {target}")


def _replace(src: Path, dst: Path) -> None:
    """Move a finished file or folder into place, replacing an older one."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(src, dst)


def make(out_dir: Path, seed: int = 0, epochs: int = 15) -> dict[str, Any]:
    """Train, export, check and write everything; returns the summary."""
    t0 = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(seed)
    pixels, labels, train_idx, test_idx = data["pixels"], data["labels"], data["train"], data["test"]
    x_train, x_test = to_input(pixels[train_idx]), to_input(pixels[test_idx])
    y_train, y_test = labels[train_idx], labels[test_idx]

    model = train(x_train.transpose(0, 2, 3, 1), y_train, seed, epochs)
    keras_logits = np.asarray(model.predict(x_test.transpose(0, 2, 3, 1), batch_size=1, verbose=0))
    keras_acc = float(np.mean(keras_logits.argmax(1) == y_test))

    with tempfile.TemporaryDirectory(prefix=".digits-", dir=out_dir) as tmp:
        work = Path(tmp)
        onnx_path = work / "digits_fp32.onnx"
        export_onnx(model, onnx_path)
        logits = onnx_logits(onnx_path, x_test)
        diff = float(np.abs(logits - keras_logits).max())
        if not diff <= ONNX_TOLERANCE:
            raise SystemExit(f"error: the hand-written ONNX model differs from Keras by {diff:.3g} "
                             f"(> {ONNX_TOLERANCE}) on the test split; the export is wrong, nothing was written")
        onnx_acc = float(np.mean(logits.argmax(1) == y_test))
        model.save(work / "digits.keras")
        write_pngs(work / "calib", pixels, labels, train_idx)
        write_pngs(work / "test", pixels, labels, test_idx)
        with (work / "test.npz").open("wb") as f:
            np.savez(f, x=x_test, y=y_test)
        (work / "labels.txt").write_text("".join(f"{c}\n" for c in range(CLASSES)), encoding="utf-8")
        for item in ("digits_fp32.onnx", "digits.keras", "calib", "test", "test.npz", "labels.txt"):
            _replace(work / item, out_dir / item)

    return {
        "model": str(out_dir / "digits_fp32.onnx"),
        "train_samples": len(train_idx),
        "test_samples": len(test_idx),
        "keras_test_accuracy": keras_acc,
        "onnx_test_accuracy": onnx_acc,
        "onnx_vs_keras_max_abs_diff": diff,
        "seed": seed,
        "epochs": epochs,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="folder to write the model and data into")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and the training (default 0)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    summary = make(args.out_dir, args.seed, args.epochs)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"digits CNN: test accuracy {summary['onnx_test_accuracy']:.4f} on {summary['test_samples']} "
              f"held-out images ({summary['train_samples']} for training/calibration), ONNX = Keras within "
              f"{summary['onnx_vs_keras_max_abs_diff']:.1e}; wrote {summary['model']} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
