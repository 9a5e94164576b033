"""Monitor ingest rate into SQLite: MQTT windows in, rows stored, windows/s.

A private Mosquitto (``max_queued_messages 0``, loopback, free port) and real paho clients. Three figures,
each over the same N valid telemetry windows (default 20,000, from 50 devices):

  store    ``SqliteStore.add_windows`` alone, batches of 500 (the ceiling of the storage side)
  backlog  the monitor was away (persistent session); the broker queued N windows for it; from its
           reconnect until every window is stored: the monitor's own ingest rate (the figure the
           requirement "≥ 5,000 windows/s" is about). Every window is decoded, validated, de-duplicated,
           counted in the fleet state and stored; the counters are checked afterwards.
  live     the monitor is connected while one paho publisher sends N windows (QoS 1) as fast as it can;
           from the first window received until the last is stored (bounded by the publisher: ≈ 9,000
           msg/s on this machine, see DEPENDENCIES.md)

and, for scale, a bare paho subscriber that only counts the same backlog (the ceiling of any paho-based
ingester: paho's own per-message work is about half of the monitor's CPU) and the publisher's rate.

The monitor is bound by one core (paho's network thread and the GIL), so on a shared machine its rate
follows the CPU share it gets: run it 2-3 times. The CPU time of the process per window while draining
the backlog is printed too; it moves much less with the machine's load than the rate does.

    .venv/bin/python bench/monitor_ingest.py [--count 20000] [--devices 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.monitor import Monitor  # noqa: E402
from converters.store import SqliteStore, WindowRecord  # noqa: E402
from edge_agent.telemetry.schema import build_window, validate_window  # noqa: E402
from tests.mosquitto import Mosquitto  # noqa: E402


def windows(count: int, devices: int) -> list[bytes]:
    out = []
    lat = [1_000_000 + 1000 * i for i in range(200)]
    for i in range(count):
        dev, seq = f"dev-{i % devices:03d}", i // devices
        w = build_window(device=dev, seq=seq, ts_start=1.795e9 + seq * 10, ts_end=1.795e9 + seq * 10 + 10,
                         model={"name": "mobilenet_v2", "version": "1.2.0", "sha256": "ab" * 32},
                         backend_info={"engine": "litert", "delegate": "xnnpack", "providers": ["xnnpack"]},
                         latencies_ns=lat, power={"source": "ina3221", "mean_w": 4.2, "idle_w": 2.9}, temp_c=61.2,
                         cpu_pct=180.0, rss_mb=141.0, throttled=False, dropped=0, cpu_mhz=1800.0)
        assert validate_window(w) == []
        out.append(json.dumps(w).encode())
    return out


def publisher(b: Mosquitto) -> Any:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-devices", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(b.host, b.port, 60)
    c.loop_start()
    return c


def publish_all(c: Any, payloads: list[bytes]) -> float:
    t = time.perf_counter()
    infos = [c.publish(f"edgekit/{json.loads(p)['device']}/telemetry", p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(60)
    return len(payloads) / (time.perf_counter() - t)


def wait_stored(mon: Monitor, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while mon.counters.stored + mon.counters.duplicates < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {mon.counters.stored} of {n} windows stored: {mon.counters}")
        time.sleep(0.002)


def bench_store(payloads: list[bytes], tmp: Path) -> float:
    store = SqliteStore(tmp / "store-only.db")
    recs = [WindowRecord(json.loads(p), p.decode(), time.time()) for p in payloads]
    t = time.perf_counter()
    for i in range(0, len(recs), 500):
        store.add_windows(recs[i:i + 500])
    rate = len(recs) / (time.perf_counter() - t)
    assert store.count() == len(recs)
    store.close()
    return rate


def bench_backlog(b: Mosquitto, payloads: list[bytes], tmp: Path) -> tuple[float, float, float]:
    """(windows/s, publisher msg/s, CPU µs of this process per window while draining)."""
    store = SqliteStore(tmp / "backlog.db")
    mon = Monitor(b.host, b.port, store=store, client_id="bench-monitor-backlog").start()
    mon.stop()  # the session (and its subscriptions) stays on the broker
    pub = publisher(b)
    pub_rate = publish_all(pub, payloads)
    mon = Monitor(b.host, b.port, store=store, client_id="bench-monitor-backlog")
    t, cpu = time.perf_counter(), time.process_time()
    mon.start()
    wait_stored(mon, len(payloads))
    rate = len(payloads) / (time.perf_counter() - t)
    cpu_us = (time.process_time() - cpu) / len(payloads) * 1e6
    assert store.count() == len(payloads), (store.count(), mon.counters)
    c = mon.counters
    assert (c.received, c.stored, c.errors, c.store_errors) == (len(payloads), len(payloads), 0, 0), c
    mon.stop()
    pub.disconnect()
    pub.loop_stop()
    store.close()
    return rate, pub_rate, cpu_us


def bench_bare(b: Mosquitto, payloads: list[bytes]) -> float:
    """A paho subscriber that only counts, draining the same backlog: the ceiling of any Python ingester."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got = [0]
    done, subscribed = threading.Event(), threading.Event()

    def on_message(c: Any, u: Any, m: Any) -> None:
        got[0] += 1
        if got[0] >= len(payloads):
            done.set()

    def client() -> Any:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=mqtt.MQTTv5)
        c.on_message = on_message
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_connect = lambda cl, *a: cl.subscribe("edgekit/+/telemetry", qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect(b.host, b.port, 60, clean_start=False, properties=props)
        return c

    c = client()
    c.loop_start()
    subscribed.wait(10)
    c.disconnect()
    c.loop_stop()
    pub = publisher(b)
    publish_all(pub, payloads)
    pub.disconnect()
    pub.loop_stop()
    c = client()
    t = time.perf_counter()
    c.loop_start()
    done.wait(300)
    rate = got[0] / (time.perf_counter() - t)
    c.disconnect()
    c.loop_stop()
    return rate


def bench_live(b: Mosquitto, payloads: list[bytes], tmp: Path) -> float:
    store = SqliteStore(tmp / "live.db")
    mon = Monitor(b.host, b.port, store=store, client_id="bench-monitor-live").start()
    first: list[float] = []
    orig = mon._client.on_message  # paho calls it for every message, in arrival order

    def timed(client: Any, userdata: Any, msg: Any) -> None:
        if not first:
            first.append(time.perf_counter())
        orig(client, userdata, msg)

    mon._client.on_message = timed
    pub = publisher(b)
    publish_all(pub, payloads)
    wait_stored(mon, len(payloads))
    rate = len(payloads) / (time.perf_counter() - first[0])
    assert store.count() == len(payloads), (store.count(), mon.counters)
    mon.stop()
    pub.disconnect()
    pub.loop_stop()
    store.close()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    payloads = windows(args.count, args.devices)
    size = sum(map(len, payloads)) / len(payloads)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as d:
        tmp = Path(d)
        b = Mosquitto(tmp / "broker").start()
        try:
            store_rate = bench_store(payloads, tmp)
            backlog_rate, pub_rate, backlog_cpu = bench_backlog(b, payloads, tmp)
            live_rate = bench_live(b, payloads, tmp)
            bare_rate = bench_bare(b, payloads)
        finally:
            b.stop()
    result = {"windows": args.count, "devices": args.devices, "payload_bytes": round(size),
              "store_only_per_s": round(store_rate), "monitor_backlog_per_s": round(backlog_rate),
              "monitor_live_per_s": round(live_rate), "publisher_per_s": round(pub_rate),
              "bare_paho_backlog_per_s": round(bare_rate),
              "monitor_vs_bare": round(backlog_rate / bare_rate, 2),
              "monitor_backlog_cpu_us_per_window": round(backlog_cpu, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.count} windows from {args.devices} devices, {size:.0f} bytes each, SQLite WAL, batches of ≤ 500")
    print(f"{'path':<40} {'windows/s':>10}")
    for name, key in (("SqliteStore.add_windows alone", "store_only_per_s"),
                      ("monitor, backlog (persistent session)", "monitor_backlog_per_s"),
                      ("monitor, live (publisher-bound)", "monitor_live_per_s"),
                      ("bare paho subscriber, backlog (ceiling)", "bare_paho_backlog_per_s"),
                      ("paho QoS 1 publisher (for scale)", "publisher_per_s")):
        print(f"{name:<40} {result[key]:>10,}")
    print(f"monitor backlog / bare paho: {result['monitor_vs_bare']:.2f}; "
          f"CPU of the process while draining: {result['monitor_backlog_cpu_us_per_window']} µs/window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
