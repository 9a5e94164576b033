"""fp32 vs quantized TFLite on held-out validation samples, with LiteRT on this host.

The same figures and key names as ``converters.validate.compare_onnx`` (sizes, per-output agreement and
errors, accuracy when the samples carry labels, interleaved host latency), plus how many nodes LiteRT's
default XNNPACK delegate took. Both models run in LiteRT (never ``tf.lite.Interpreter``) with the default
delegate applied, as on a device. Quantized inputs are fed as the model's integer dtype (the float sample
quantized with the input's scale and zero point) and outputs are dequantized before they are compared.

XNNPACK count: LiteRT lists every node of the model plus one ``DELEGATE`` node per partition the delegate
took. A DELEGATE node's inputs are the tensors flowing into its partition, and its outputs the tensors
flowing out; the nodes it replaced are those reached walking back from its outputs without crossing its
inputs. ``total_nodes`` is the node count without any delegate (BUILTIN_WITHOUT_DEFAULT_DELEGATES).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration import Samples
from converters.tflite_int8 import interpreter, litert_version, spec_from_detail, to_model_input
from converters.validate import BLOCK, comparison_figures, host_cpu
from edge_agent.errors import ConversionError
from edge_agent.preprocess import dequantize


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def delegated_nodes(ops: list[dict[str, Any]]) -> tuple[int, int]:
    """(nodes replaced by delegate partitions, partitions) from LiteRT's ``_get_ops_details()`` list."""
    producer: dict[int, int] = {}
    for op in ops:
        if op["op_name"] != "DELEGATE":
            for t in op["outputs"]:
                producer[int(t)] = int(op["index"])
    by_index = {int(op["index"]): op for op in ops}
    taken: set[int] = set()
    partitions = 0
    for op in ops:
        if op["op_name"] != "DELEGATE":
            continue
        partitions += 1
        boundary = {int(t) for t in op["inputs"]}
        stack = [int(t) for t in op["outputs"]]
        seen: set[int] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in boundary or tensor not in producer:
                continue
            seen.add(tensor)
            node = producer[tensor]
            if node not in taken:
                taken.add(node)
                stack.extend(int(t) for t in by_index[node]["inputs"] if int(t) >= 0)
    return len(taken), partitions


def xnnpack_nodes(model: Path | bytes, threads: int | None = None) -> dict[str, int]:
    """How many of the model's nodes LiteRT's default XNNPACK delegate took on this host."""
    plain = interpreter(model, threads, delegates=False)._get_ops_details()
    delegated_ops = interpreter(model, threads, delegates=True)._get_ops_details()
    total = len(plain)
    taken, partitions = delegated_nodes(delegated_ops)
    listed = sum(1 for op in delegated_ops if op["op_name"] != "DELEGATE")
    if listed != total:  # the delegated graph must list the same nodes plus its DELEGATE nodes
        raise ConversionError(f"cannot count XNNPACK nodes: the model lists {total} nodes without delegates "
                              f"but {listed} with them (step: validate)")
    return {"delegated_nodes": taken, "total_nodes": total, "partitions": partitions}


class _Runner:
    """One LiteRT interpreter (default delegate applied) with float-in/float-out helpers."""

    def __init__(self, path: Path, threads: int, which: str) -> None:
        self.which = which
        try:
            self.it = interpreter(path, threads)
        except Exception as e:  # LiteRT raises RuntimeError/ValueError
            raise ConversionError(f"cannot load the {which} model for validation (step: validate): "
                                  f"{_first_line(e)}") from e
        inputs = self.it.get_input_details()
        if len(inputs) != 1:
            raise ConversionError(f"the {which} model has {len(inputs)} inputs; validation feeds one")
        self.input = inputs[0]
        self.input_spec = spec_from_detail(self.input)
        self.outputs = self.it.get_output_details()
        self.output_specs = [spec_from_detail(d) for d in self.outputs]

    def feed(self, x: np.ndarray) -> np.ndarray:
        """A float sample (with batch axis) -> the model's raw input."""
        return to_model_input(x, self.input_spec)

    def run_raw(self, raw: np.ndarray) -> list[np.ndarray]:
        self.it.set_tensor(self.input["index"], raw)
        self.it.invoke()
        return [self.it.get_tensor(d["index"]) for d in self.outputs]

    def run(self, x: np.ndarray, i: int) -> list[np.ndarray]:
        """Float outputs (dequantized) for one float sample."""
        try:
            raw = self.run_raw(self.feed(x))
        except Exception as e:  # LiteRT raises RuntimeError/ValueError
            raise ConversionError(f"the {self.which} model failed on validation sample {i} (step: validate): "
                                  f"{_first_line(e)}", hint="check the validation samples' shape") from e
        out = []
        for value, spec in zip(raw, self.output_specs, strict=True):
            if spec.scale:
                out.append(dequantize(value, spec.scale, int(spec.zero_point or 0)))
            else:
                out.append(np.asarray(value, dtype=np.float32))
        return out


def _outputs(runner: _Runner, arrays: np.ndarray) -> list[np.ndarray]:
    per_sample = [runner.run(x, i) for i, x in enumerate(arrays)]
    return [np.stack([s[k] for s in per_sample]) for k in range(len(per_sample[0]))]


def interleaved_latency_raw(runners: list[_Runner], arrays: np.ndarray, warmup: int, runs: int) -> list[list[int]]:
    """Latency samples (ns) per runner, in alternating blocks of ``BLOCK``; warm-up runs are not recorded.

    Each runner is fed its own raw inputs, quantized beforehand, so a quantized model's timing does not
    include numpy's quantization of the input. A run is set_tensor + invoke + reading the outputs.
    """
    feeds = [[r.feed(x) for x in arrays] for r in runners]
    for r, f in zip(runners, feeds, strict=True):
        for i in range(warmup):
            r.run_raw(f[i % len(f)])
    samples: list[list[int]] = [[] for _ in runners]
    done = block_no = 0
    while done < runs:
        size = min(BLOCK, runs - done)
        order = list(range(len(runners)))
        if block_no % 2:
            order.reverse()
        for k in order:
            runner, feed, out = runners[k], feeds[k], samples[k]
            for j in range(size):
                raw = feed[(done + j) % len(feed)]
                t0 = time.perf_counter_ns()
                runner.run_raw(raw)
                out.append(time.perf_counter_ns() - t0)
        done += size
        block_no += 1
    return samples


def compare_tflite(fp32: Path, quant: Path, val: Samples, threads: int, warmup: int = 10,
                   runs: int = 200) -> dict[str, Any]:
    """fp32 vs quantized .tflite on the validation samples: sizes, agreement, errors, accuracy, host latency,
    and the XNNPACK node count of both models."""
    fp32, quant = Path(fp32), Path(quant)
    if len(val) == 0:
        raise ConversionError("no validation samples (step: validate)", hint="give more calibration samples")
    r_fp32 = _Runner(fp32, threads, "fp32")
    r_quant = _Runner(quant, threads, "quantized")
    names = [s.name for s in r_quant.output_specs]
    if len(r_fp32.output_specs) != len(names):
        raise ConversionError(f"the fp32 model has {len(r_fp32.output_specs)} outputs and the quantized model "
                              f"{len(names)} (step: validate)")
    out_fp32 = _outputs(r_fp32, val.arrays)
    out_quant = _outputs(r_quant, val.arrays)
    lat_fp32, lat_quant = interleaved_latency_raw([r_fp32, r_quant], val.arrays, warmup, runs)
    result = comparison_figures(fp32, quant, val, names, out_fp32, out_quant, lat_fp32, lat_quant, runs=runs,
                                warmup=warmup, where="with LiteRT and its default XNNPACK delegate on the host "
                                                     "that converted the model")
    result.update({
        "xnnpack": xnnpack_nodes(quant, threads),
        "xnnpack_fp32": xnnpack_nodes(fp32, threads),
        "host": {"cpu": host_cpu(), "threads": threads, "litert": litert_version(),
                 "machine": platform.machine()},
    })
    return result


def tflite_outputs(path: Path, arrays: np.ndarray, threads: int, which: str) -> tuple[list[str], list[np.ndarray]]:
    """(output names, one (N, *shape) float array per output, dequantized) of a .tflite run on every sample."""
    runner = _Runner(Path(path), threads, which)
    return [s.name for s in runner.output_specs], _outputs(runner, arrays)


def quality_tflite(quant: Path, val: Samples, reference: tuple[list[str], list[np.ndarray]],
                   threads: int) -> dict[str, Any]:
    """The gate's figures (``quality_figures``) of a quantized .tflite against fp32 outputs computed once
    (``reference`` = ``tflite_outputs`` of the fp32 model on the same samples): no sizes, no latency."""
    from converters.validate import quality_figures

    if len(val) == 0:
        raise ConversionError("no validation samples (step: validate)", hint="give more calibration samples")
    names, out_fp32 = reference
    _, out_quant = tflite_outputs(quant, val.arrays, threads, "quantized")
    if len(out_quant) != len(out_fp32):
        raise ConversionError(f"the fp32 model has {len(out_fp32)} outputs and the quantized model "
                              f"{len(out_quant)} (step: validate)")
    return quality_figures(val, names, out_fp32, out_quant)
