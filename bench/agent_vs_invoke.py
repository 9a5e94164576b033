"""The agent's run loop vs a bare ``interpreter.invoke()`` loop, and the cost of preprocessing a camera frame.

In one process, on the real MobileNetV2 int8 model (``../shared/realmodels/mobilenet_v2_int8``), with the same
thread count for both:

  bare   ai_edge_litert ``Interpreter(num_threads=T)`` (XNNPACK applied by default), the input set once,
         then ``invoke()`` in a loop for S seconds (no input fetch, no output copy, no timing per call)
  agent  ``edge_agent.service.run_agent`` on a signed bundle around the same .tflite (LiteRT, delegates
         ["xnnpack"], T threads), synthetic source, telemetry windows of 1 s (ten times more windows than
         the default 10 s) published QoS 1 to a private Mosquitto this script starts on a free loopback
         port (offline, with a note, when mosquitto is not installed), and power sampling on with the real
         RAPL counter when it is readable here (else ``--power none``, said in the output)

Rounds alternate the order (bare, agent / agent, bare); many short rounds make the paired ratios robust
to other load on a shared machine (the load average is printed with the result). The agent's throughput
is the inferences of all its windows divided by the time from the first window's start to the last one's
end (per-window work between windows included; model loading and warm-up excluded, as for bare).
Printed: the ratio agent / bare per round, their median (target >= 0.97) and the ratio of the medians.

Then the preprocessing of one 640x480 BGR camera frame (random uint8) into the model's input with
``edge_agent.preprocess.image_to_input`` (RGB, resize to 224x224, ImageNet mean/std, NCHW: the layout is
read from the model's input shape, quantized to int8 with the input's scale / zero point), as a share
of one inference's p50 (``invoke()`` timed in the same loop, alternating with the preprocessing).

    .venv/bin/python bench/agent_vs_invoke.py [--rounds 20] [--seconds 2] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.keys import init_keys  # noqa: E402
from converters.package import build_bundle  # noqa: E402
from edge_agent.errors import SourceError  # noqa: E402
from edge_agent.hardware import DeviceOptions  # noqa: E402
from edge_agent.manifest import TensorSpec  # noqa: E402
from edge_agent.power import open_power_source  # noqa: E402
from edge_agent.preprocess import Preprocessing, image_to_input  # noqa: E402
from edge_agent.service import run_agent  # noqa: E402
from edge_agent.stats import latency_summary_ms  # noqa: E402

MODEL = Path("mobilenet_v2_int8") / "mobilenet_v2_quantized_1x3x224x224.tflite"
WINDOW_S = 1.0
IMAGENET = {"color": "rgb", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


# --------------------------------------------------------------------------------------------------
# a private broker (only the process started here is ever stopped)


class Broker:
    def __init__(self, workdir: Path, exe: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 0\n"
                        + (f"user {pwd.getpwuid(os.getuid()).pw_name}\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start (code {self.proc.returncode})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------------------------------


def tensor_spec(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": d["name"], "shape": [int(x) for x in d["shape_signature"]],
                           "dtype": np.dtype(d["dtype"]).name}
    scale, zero_point = d["quantization"]
    if scale:
        out.update(scale=float(scale), zero_point=int(zero_point))
    return out


def bare_loop(interp: Any, seconds: float) -> float:
    """Inferences per second of a bare invoke() loop (input set once before)."""
    invoke = interp.invoke
    clock = time.perf_counter_ns
    n = 0
    start = clock()
    end = start + int(seconds * 1e9)
    now = start
    while now < end:
        invoke()
        n += 1
        now = clock()
    return n / ((now - start) / 1e9)


def agent_loop(bundle: Path, pub: Path, seconds: float, threads: int, mqtt: tuple[str, int] | None,
               power: str) -> tuple[float, list[dict[str, Any]]]:
    windows: list[dict[str, Any]] = []
    run_agent(bundle, pub, source="synthetic", duration=seconds, window_s=WINDOW_S, mqtt=mqtt, device_id="bench",
              threads=threads, on_window=windows.append, hardware=DeviceOptions(power=power))
    count = sum(w["count"] for w in windows)
    span = windows[-1]["ts_end"] - windows[0]["ts_start"]
    return count / span, windows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per loop and round")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--frames", type=int, default=300, help="camera frames to preprocess")
    ap.add_argument("--realmodels", default=os.environ.get("EDGEKIT_REALMODELS",
                                                           str(ROOT.parent / "shared" / "realmodels")))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from ai_edge_litert.interpreter import Interpreter

    model = Path(args.realmodels) / MODEL
    if not model.is_file():
        print(f"{model} not found (set --realmodels or EDGEKIT_REALMODELS)", file=sys.stderr)
        return 2
    notes: list[str] = []
    interp = Interpreter(model_path=str(model), num_threads=args.threads)
    interp.allocate_tensors()
    in_d, out_d = interp.get_input_details(), interp.get_output_details()
    inputs, outputs = [tensor_spec(d) for d in in_d], [tensor_spec(d) for d in out_d]
    shape = inputs[0]["shape"]
    layout = "NCHW" if shape[1] == 3 else "NHWC"
    size = [shape[2], shape[3]] if layout == "NCHW" else [shape[1], shape[2]]
    pre = {**IMAGENET, "size": size, "layout": layout}

    try:  # the real RAPL counter when readable here; no fake sensor in a benchmark
        src = open_power_source("rapl")
        assert src is not None
        src.close()
        power = "rapl"
    except SourceError as e:
        power = "none"
        notes.append(f"power sampling OFF: RAPL is not readable here ({e.message})")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="agent-vs-invoke-") as tmp:
        work = Path(tmp)
        priv, pub = init_keys(work / "keys")
        manifest = {"name": "mobilenet_v2_int8", "version": "1.0.0", "profile": "x86-64", "format": "tflite",
                    "engine": "litert", "model": "model.tflite", "inputs": inputs, "outputs": outputs,
                    "runtime": {"engine": "litert", "delegates": ["xnnpack"], "threads": args.threads,
                                "cpu_fallback": True},
                    "preprocessing": pre, "tools": {"edgekit": "0.1.0"}}
        bundle = build_bundle(work / "mobilenet.edgebundle", manifest, {"model.tflite": model}, priv)

        exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).is_file()), None)
        broker = None
        if exe is None:
            notes.append("telemetry OFFLINE: mosquitto is not installed (windows are still built and logged)")
        else:
            (work / "broker").mkdir()
            broker = Broker(work / "broker", exe)
        mqtt = ("127.0.0.1", broker.port) if broker is not None else None
        try:
            feed = np.random.default_rng(0).integers(-128, 128, size=shape, dtype=np.int8)
            interp.set_tensor(in_d[0]["index"], feed)
            for _ in range(20):  # warm-up
                interp.invoke()
            bare_tp: list[float] = []
            agent_tp: list[float] = []
            agent_windows: list[dict[str, Any]] = []
            for r in range(args.rounds):
                order = ("bare", "agent") if r % 2 == 0 else ("agent", "bare")
                for which in order:
                    if which == "bare":
                        bare_tp.append(bare_loop(interp, args.seconds))
                    else:
                        tp, windows = agent_loop(bundle, pub, args.seconds, args.threads, mqtt, power)
                        agent_tp.append(tp)
                        agent_windows += windows
        finally:
            if broker is not None:
                broker.stop()

    load_after = os.getloadavg()[0]
    ratios = [a / b for a, b in zip(agent_tp, bare_tp, strict=True)]
    w0 = agent_windows[0]
    # (c) preprocessing of a 640x480 BGR frame vs one inference, alternated so both see the same load
    clock = time.perf_counter_ns
    p = Preprocessing.from_dict(pre)
    scale, zp, dtype = inputs[0].get("scale"), inputs[0].get("zero_point"), inputs[0]["dtype"]
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(8)]
    spec = TensorSpec(inputs[0]["name"], tuple(shape), dtype, scale, zp)
    inf = np.empty(args.frames, np.int64)
    t_all = np.empty(args.frames, np.int64)
    for i in range(args.frames):
        frame = frames[i % len(frames)]
        t0 = clock()
        q = image_to_input(frame, p, spec)  # what the agent's image/camera sources do
        t1 = clock()
        interp.invoke()
        t2 = clock()
        t_all[i], inf[i] = t1 - t0, t2 - t1
    assert q.shape == tuple(shape) and q.dtype == np.dtype(dtype)
    inf_p50 = latency_summary_ms(inf)["p50"]
    pre_p50 = latency_summary_ms(t_all)["p50"]
    result = {
        "model": str(MODEL),
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds_per_loop": args.seconds,
        "window_s": WINDOW_S,
        "telemetry": "mqtt://127.0.0.1 (private mosquitto, QoS 1)" if mqtt else "offline",
        "power": power,
        "agent_providers": w0["providers"],
        "bare_ips": [round(x, 2) for x in bare_tp],
        "agent_ips": [round(x, 2) for x in agent_tp],
        "ratio_per_round": [round(x, 4) for x in ratios],
        "agent_over_bare_throughput": round(statistics.median(ratios), 4),
        "median_agent_over_median_bare": round(statistics.median(agent_tp) / statistics.median(bare_tp), 4),
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
        "windows": len(agent_windows),
        "input": {"shape": shape, "dtype": dtype, "layout": layout},
        "inference_p50_ms": round(inf_p50, 4),
        "preprocess_p50_ms": round(pre_p50, 4),
        "preprocess_share_of_inference": round(pre_p50 / inf_p50, 4),
        "notes": notes,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"MobileNetV2 int8 (LiteRT, delegates in use: {', '.join(w0['providers']) or 'none'}), "
          f"{args.threads} threads, {args.rounds} interleaved rounds of {args.seconds:g} s")
    print(f"  telemetry: {result['telemetry']}, windows of {WINDOW_S:g} s; power sampling: {power}")
    for i, (b, a, r) in enumerate(zip(bare_tp, agent_tp, ratios, strict=True)):
        print(f"  round {i + 1}: bare {b:8.1f}/s  agent {a:8.1f}/s  agent/bare {r:.3f}")
    print(f"agent/bare throughput: median of paired ratios {result['agent_over_bare_throughput']:.3f}, "
          f"ratio of medians {result['median_agent_over_median_bare']:.3f}  (target >= 0.97)")
    print(f"  machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"one inference p50 {inf_p50:.3f} ms; 640x480 BGR frame -> {layout} {tuple(shape)} {dtype}: "
          f"p50 {pre_p50:.3f} ms (resize, colour, normalise and quantize in one pass) = "
          f"{100 * pre_p50 / inf_p50:.1f}% of one inference")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
