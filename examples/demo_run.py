"""Demo step 5: run `edge-agent run` against a private Mosquitto and print what arrived over MQTT.

Starts its own broker on a free 127.0.0.1 port (never the system one), subscribes to the agent's topics,
runs the agent as a real subprocess for --duration seconds, then prints one row per telemetry window that
the broker delivered, and the device's retained status. Without mosquitto installed the agent runs
offline and the table comes from its --json output instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

DEVICE = "demo-box"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int] | None:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        return None
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"log_dest file {workdir / 'mosquitto.log'}\nmax_queued_messages 0\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("demo: mosquitto did not start; see " + str(workdir / "mosquitto.log"))


def print_table(windows: list[dict], source: str) -> None:
    cols = ("seq", "count", "p50 ms", "p90 ms", "p99 ms", "max ms", "fps", "cpu %", "rss MB")
    print(f"\ntelemetry windows ({source}):")
    print("".join(c.rjust(10) for c in cols))
    for w in windows:
        lat = w.get("latency_ms") or {}
        vals = (w["seq"], w["count"], lat.get("p50"), lat.get("p90"), lat.get("p99"), lat.get("max"),
                w.get("fps"), w.get("cpu_pct"), w.get("rss_mb"))
        print("".join((f"{v:.3f}" if isinstance(v, float) else str(v)).rjust(10) for v in vals))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--pubkey", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--window", type=float, default=2)
    ap.add_argument("--state-dir", required=True)
    args = ap.parse_args()
    agent = Path(sys.executable).parent / "edge-agent"
    cmd = [str(agent), "run", "--bundle", args.bundle, "--pubkey", args.pubkey, "--threads", str(args.threads),
           "--source", f"images:{args.images}", "--duration", str(args.duration), "--window", str(args.window),
           "--device-id", DEVICE, "--state-dir", args.state_dir, "--json",
           "--power", "none"]  # see scripts/demo.sh: RAPL is rarely readable in a VM
    with tempfile.TemporaryDirectory() as tmp:
        started = start_broker(Path(tmp))
        if started is None:
            print("demo: mosquitto is not installed: the agent runs offline (no telemetry delivery)")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            print_table([json.loads(line) for line in out.splitlines() if line.startswith("{")], "agent stdout")
            return 0
        broker, port = started
        windows: list[dict] = []
        status: dict[str, str] = {}
        lock = threading.Lock()

        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            with lock:
                if msg.topic.endswith("/telemetry"):
                    windows.append(json.loads(msg.payload))
                elif msg.topic.endswith("/status"):
                    status["last"] = json.loads(msg.payload).get("state", "?")

        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-monitor")
        sub.on_message = on_message
        sub.connect("127.0.0.1", port)
        sub.subscribe(f"edgekit/{DEVICE}/#", qos=1)
        sub.loop_start()
        try:
            print(f"demo: private broker on 127.0.0.1:{port}; agent runs for {args.duration:g} s ...")
            subprocess.run([*cmd, "--mqtt", f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
            time.sleep(0.5)
        finally:
            sub.loop_stop()
            sub.disconnect()
            broker.terminate()
            broker.wait(timeout=10)
        with lock:
            print_table(sorted(windows, key=lambda w: w["seq"]), f"received over MQTT on port {port}")
            total = sum(w["count"] for w in windows)
            print(f"\n{len(windows)} windows, {total} inferences; the device's retained status is now "
                  f"{status.get('last', 'unknown')!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
