"""converters/monitor.py and `edgekit monitor` against a private Mosquitto (never the system broker).

Covers: windows stored once although published twice; malformed, oversized, wrong-schema and mismatched
messages counted and skipped while the monitor keeps working; the persistent session (windows published
while the monitor is away arrive when it is back); shared subscriptions splitting a fleet between two
monitors; --once --json with online/offline from retained status; --headless alert lines; the alerts as a
pure function.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from converters.monitor import (
    AlertLog,
    DeviceState,
    Monitor,
    compute_alerts,
    device_row,
)
from converters.monitor_cli import fleet_table, parse_broker, register
from converters.store import SqliteStore
from edge_agent.errors import InputError
from tests.fixtures_mqtt import broker  # noqa: F401
from tests.mosquitto import Mosquitto
from tests.test_store import T0, make_window

NOW = T0 + 1000.0


def _until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


class Publisher:
    """A plain paho 2.x QoS 1 publisher (plays the devices)."""

    def __init__(self, b: Mosquitto, client_id: str = "test-devices") -> None:
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.connect(b.host, b.port, 30)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str | dict, *, retain: bool = False) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def pub(broker: Mosquitto) -> Iterator[Publisher]:  # noqa: F811
    p = Publisher(broker)
    yield p
    p.close()


def _monitor(b: Mosquitto, store: SqliteStore | None, **kw: Any) -> Monitor:
    kw.setdefault("client_id", "test-monitor")
    return Monitor(b.host, b.port, store=store, **kw).start(timeout=10)


def birth(device: str, profile: str = "x86-64") -> dict[str, Any]:
    return {"state": "online", "device": device, "agent_version": "0.1.0",
            "model": {"name": "mlp", "version": "1.0.0", "sha256": "ab" * 32}, "profile": profile,
            "device_profile": profile, "engine": "onnxruntime", "ts": time.time()}


# ------------------------------------------------------------------------------------------------ ingest


@pytest.mark.mqtt
def test_windows_stored_once_even_when_published_twice(broker: Mosquitto, pub: Publisher,  # noqa: F811
                                                       tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "t.db")
    mon = _monitor(broker, store)
    try:
        for seq in range(20):
            pub.send("edgekit/pi-1/telemetry", make_window("pi-1", seq))
        for seq in range(20):  # the same windows again (a QoS 1 redelivery, a spool replay)
            pub.send("edgekit/pi-1/telemetry", make_window("pi-1", seq))
        _until(lambda: mon.counters.received == 40)
        assert mon.flush(10)
        c = mon.counters
        assert (c.stored, c.duplicates) == (20, 20)
        assert store.count() == 20
        assert sorted(r["seq"] for r in store.query()) == list(range(20))
        (row,) = mon.rows()
        assert row["device"] == "pi-1" and row["seq"] == 19 and row["windows"] == 40
    finally:
        mon.stop()
        store.close()


@pytest.mark.mqtt
def test_bad_messages_are_counted_and_skipped(broker: Mosquitto, pub: Publisher, tmp_path: Path,  # noqa: F811
                                              caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStore(tmp_path / "t.db")
    mon = _monitor(broker, store, max_bytes=4096)
    wrong = make_window("pi-1", 1)
    wrong["latency_ms"] = {"p50": 5.0}  # wrong schema
    extra = {**make_window("pi-1", 2), "surprise": 1}  # unknown field
    nan = json.dumps(make_window("pi-1", 3)).replace('"temp_c": 50.0', '"temp_c": NaN')
    bad = [
        b"not json at all {",  # malformed
        b"\xff\xfe\x00garbage",  # not UTF-8: malformed
        b"[" * 5000,  # oversized (cap 4096)
        b"[" * 4000,  # deeply nested: malformed, not a RecursionError crash
        json.dumps([1, 2, 3]),  # JSON, not a window: wrong schema
        json.dumps(wrong),
        json.dumps(extra),
        nan,  # NaN is not a number the schema accepts
        json.dumps(make_window("pi-2", 4)),  # device in payload != topic
        json.dumps({"x": "a" * 10_000}),  # oversized
    ]
    try:
        with caplog.at_level(logging.WARNING):
            for payload in bad:
                pub.send("edgekit/pi-1/telemetry", payload)
            pub.send("edgekit/pi-1/status", b"{\"state\": \"sleeping\"}", retain=False)  # wrong schema
            pub.send("edgekit/pi-1/events", b"\x00\x01")  # malformed
            pub.send("edgekit/pi-1/telemetry", make_window("pi-1", 7))  # and it keeps working
            _until(lambda: mon.counters.received == len(bad) + 3)
            assert mon.flush(10)
        c = mon.counters
        assert c.malformed == 4
        assert c.oversized == 2
        assert c.wrong_schema == 5
        assert c.device_mismatch == 1
        assert c.errors == 0 and c.stored == 1
        assert [r["seq"] for r in store.query()] == [7]
        assert mon.fleet()["pi-1"].last_window["seq"] == 7  # type: ignore[index]
    finally:
        mon.stop()
        store.close()


def test_unexpected_error_is_counted_and_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    mon = Monitor("127.0.0.1", 1, store=None, client_id="never-connects")

    def boom(*a: Any) -> str:
        raise RuntimeError("bug in a handler")

    mon._take_window = boom  # type: ignore[method-assign]
    msg = argparse.Namespace(topic="edgekit/pi-1/telemetry", payload=json.dumps(make_window()).encode())
    with caplog.at_level(logging.ERROR):
        mon._on_message(None, None, msg)  # must not raise
    assert mon.counters.errors == 1
    assert "bug in a handler" in caplog.text and "Traceback" in caplog.text
    # a topic outside the layout is malformed; a device outside --devices is filtered
    assert mon.handle("edgekit/pi-1/telemetry/extra", b"{}") == "malformed"
    mon.devices_pattern = "cam-*"
    assert mon.handle("edgekit/pi-1/telemetry", b"{}") == "filtered"


@pytest.mark.mqtt
def test_persistent_session_keeps_windows_while_the_monitor_is_away(broker: Mosquitto, pub: Publisher,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "t.db")
    mon = _monitor(broker, store, client_id="persistent-mon")
    pub.send("edgekit/pi-1/telemetry", make_window("pi-1", 0))
    _until(lambda: mon.counters.received == 1)
    mon.stop()
    for seq in range(1, 31):  # the monitor is away: the broker queues these for its session
        pub.send("edgekit/pi-1/telemetry", make_window("pi-1", seq))
    mon2 = _monitor(broker, store, client_id="persistent-mon")
    try:
        _until(lambda: mon2.counters.received >= 30)
        assert mon2.flush(10)
        assert store.count() == 31
    finally:
        mon2.stop()
        store.close()


@pytest.mark.mqtt
def test_shared_subscription_splits_the_fleet(broker: Mosquitto, pub: Publisher, tmp_path: Path) -> None:  # noqa: F811
    stores = [SqliteStore(tmp_path / f"m{i}.db") for i in range(2)]
    mons = [_monitor(broker, s, client_id=f"mon-{i}", share_group="fleet") for i, s in enumerate(stores)]
    n_dev, n_win = 4, 50
    try:
        assert mons[0].subscriptions[0] == ("$share/fleet/edgekit/+/telemetry", 1)
        pub.send("edgekit/pi-0/status", birth("pi-0"), retain=True)
        for seq in range(n_win):
            for d in range(n_dev):
                pub.send(f"edgekit/pi-{d}/telemetry", make_window(f"pi-{d}", seq))
        _until(lambda: sum(m.counters.received for m in mons) >= n_dev * n_win + 2)
        for m in mons:
            assert m.flush(10)
        got = [{(r["device"], r["seq"]) for r in s.query()} for s in stores]
        assert got[0].isdisjoint(got[1])  # each window went to one monitor only ...
        assert len(got[0] | got[1]) == n_dev * n_win  # ... and together they have every window once
        assert all(len(g) > 0 for g in got), "both monitors took a share"
        # status is not shared: every monitor sees the fleet's state
        assert all(m.fleet()["pi-0"].state == "online" for m in mons)
    finally:
        for m in mons:
            m.stop()
        for s in stores:
            s.close()


def _msg(w: dict[str, Any] | bytes, device: str = "pi-1") -> argparse.Namespace:
    """What paho hands to on_message (topic and payload are all the monitor reads)."""
    payload = w if isinstance(w, bytes) else json.dumps(w).encode()
    return argparse.Namespace(topic=f"edgekit/{device}/telemetry", payload=payload)


def test_a_burst_is_taken_in_groups_and_its_tail_by_the_writer(tmp_path: Path) -> None:
    # messages back to back (as paho delivers a backlog) wait and are taken together; the last ones of
    # the burst are taken by the writer shortly after the burst ends, without any flush()
    store = SqliteStore(tmp_path / "t.db")
    mon = Monitor("127.0.0.1", 1, store=store, client_id="never-connects")
    mon.start(wait=False)  # the writer runs; paho keeps trying a port nobody listens on
    try:
        n = 150  # not a multiple of the group size: a tail is left waiting
        for seq in range(n):
            mon._on_message(None, None, _msg(make_window("pi-1", seq)))
        _until(lambda: mon.counters.stored == n, timeout=5)
        c = mon.counters
        assert (c.received, c.stored, c.duplicates, c.errors) == (n, n, 0, 0)
        assert mon.fleet()["pi-1"].last_window["seq"] == n - 1  # type: ignore[index]
        assert mon.fleet()["pi-1"].windows == n
        assert sorted(r["seq"] for r in store.query()) == list(range(n))
    finally:
        mon.stop()
        store.close()


def test_flush_takes_the_messages_waiting_in_a_burst() -> None:
    mon = Monitor("127.0.0.1", 1, store=None, client_id="never-connects")  # no writer thread at all
    bad = [b"not json", json.dumps({**make_window("pi-1", 99), "surprise": 1}).encode()]
    for seq in range(40):
        mon._on_message(None, None, _msg(make_window("pi-1", seq)))
    for payload in bad:
        mon._on_message(None, None, _msg(payload))
    assert mon.flush(5)
    c = mon.counters
    assert (c.received, c.malformed, c.wrong_schema, c.errors) == (42, 1, 1, 0)
    assert mon.fleet()["pi-1"].windows == 40 and mon.fleet()["pi-1"].last_window["seq"] == 39  # type: ignore[index]


def test_the_writer_survives_what_the_store_cannot_write(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # a window with an integer SQLite cannot hold passes the schema; its batch is counted and logged as a
    # store error, and so is an unexpected exception in a store; the windows after them are stored
    store = SqliteStore(tmp_path / "t.db")
    calls = [0]
    add = store.add_windows

    def flaky(records: Any) -> int:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("bug in a store")
        return add(records)

    store.add_windows = flaky  # type: ignore[method-assign]
    mon = Monitor("127.0.0.1", 1, store=store, client_id="never-connects")
    mon.start(wait=False)
    try:
        with caplog.at_level(logging.ERROR):
            huge = make_window("pi-1", 0)
            huge["seq"] = 2**70
            for w in (huge, make_window("pi-1", 1), make_window("pi-1", 2)):
                mon.handle("edgekit/pi-1/telemetry", json.dumps(w).encode())
                assert mon.flush(5)
        c = mon.counters
        assert (c.received, c.store_errors, c.stored, c.errors) == (3, 2, 1, 0)
        assert [r["seq"] for r in store.query()] == [2]
        assert "not stored" in caplog.text and "bug in a store" in caplog.text and "Traceback" in caplog.text
    finally:
        mon.stop()
        store.close()


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    return p


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


@pytest.mark.mqtt
def test_once_json_fleet_with_retained_status(broker: Mosquitto, pub: Publisher, tmp_path: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pub.send("edgekit/pi-1/status", birth("pi-1", "rpi5"), retain=True)
    pub.send("edgekit/pi-2/status", {"state": "offline", "device": "pi-2"}, retain=True)
    pub.send("edgekit/cam-1/status", birth("cam-1"), retain=True)
    hot = make_window("pi-1", 0, temp_c=82.0, t0=time.time() - 10)  # rpi5 throttles at 85 °C: alert from 80

    def device_sends() -> None:
        time.sleep(0.8)
        pub.send("edgekit/pi-1/telemetry", hot)

    t = threading.Thread(target=device_sends)
    t.start()
    store = tmp_path / "once.db"
    rc = _run(["monitor", "--broker", broker.address, "--once", "--json", "--wait", "2", "--store", str(store),
               "--devices", "pi-*"])
    t.join()
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["device"]: r for r in out["devices"]}
    assert set(rows) == {"pi-1", "pi-2"}  # cam-1 is not selected by --devices
    assert rows["pi-1"]["state"] == "online" and rows["pi-1"]["profile"] == "rpi5"
    assert rows["pi-1"]["model"] == "mlp" and rows["pi-1"]["temp_c"] == 82.0 and rows["pi-1"]["p99_ms"] == 2.0
    assert rows["pi-2"]["state"] == "offline"
    kinds = {(a["device"], a["kind"]) for a in out["alerts"]}
    assert kinds == {("pi-1", "temperature"), ("pi-2", "offline")}
    assert out["counters"]["stored"] == 1 and out["counters"]["filtered"] == 1
    assert [r["seq"] for r in SqliteStore(store).query()] == [0]


@pytest.mark.mqtt
def test_once_table_output(broker: Mosquitto, pub: Publisher, tmp_path: Path,  # noqa: F811
                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "220")  # rich squeezes 15 columns into 80 otherwise
    pub.send("edgekit/pi-9/status", birth("pi-9"), retain=True)
    rc = _run(["monitor", "--broker", broker.address, "--once", "--wait", "0.5", "--no-store"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "pi-9" in out and "online" in out and "edgekit fleet" in out


@pytest.mark.mqtt
def test_headless_logs_alert_changes(broker: Mosquitto, pub: Publisher, tmp_path: Path,  # noqa: F811
                                     capsys: pytest.CaptureFixture[str]) -> None:
    pub.send("edgekit/pi-1/status", birth("pi-1"), retain=True)

    def device() -> None:
        time.sleep(0.7)
        pub.send("edgekit/pi-1/telemetry", make_window("pi-1", 0, p99_ms=30.0, t0=time.time() - 10))
        time.sleep(0.7)
        pub.send("edgekit/pi-1/status", {"state": "offline", "device": "pi-1"}, retain=True)

    t = threading.Thread(target=device)
    t.start()
    rc = _run(["monitor", "--broker", broker.address, "--headless", "--json", "--duration", "2.5",
               "--slo-ms", "10", "--store", str(tmp_path / "h.db"), "--client-id", "headless-test"])
    t.join()
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    changes = [(e["event"], e["kind"]) for e in events if e["event"] in ("alert", "clear")]
    assert changes == [("alert", "slo"), ("alert", "offline")]  # state changes only, one line each
    assert events[-1]["event"] == "counters" and events[-1]["stored"] == 1


def test_cli_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not HOST:PORT"):
        parse_broker("localhost")
    with pytest.raises(InputError, match="port 70000"):
        parse_broker("h:70000")
    assert parse_broker("[::1]:1883") == ("::1", 1883)
    with pytest.raises(InputError, match="--password-file"):
        _run(["monitor", "--once", "--no-store", "--username", "u", "--password-file", str(tmp_path / "nope")])
    with pytest.raises(SystemExit):
        _parser().parse_args(["monitor", "--once", "--headless"])


def test_unreachable_broker_is_a_failure(tmp_path: Path) -> None:
    from edge_agent.errors import TelemetryError
    from tests.mosquitto import free_port

    with pytest.raises(TelemetryError, match="cannot subscribe") as e:
        _run(["monitor", "--broker", f"127.0.0.1:{free_port()}", "--once", "--no-store",
              "--connect-timeout", "1"])
    assert e.value.exit_code == 1 and e.value.hint


# ------------------------------------------------------------------------------------------------ alerts


def _dev(name: str = "pi-1", **kw: Any) -> DeviceState:
    kw.setdefault("state", "online")
    return DeviceState(name, **kw)


def _with_window(d: DeviceState, w: dict[str, Any], at: float = NOW) -> DeviceState:
    d.last_window, d.last_window_at, d.windows = w, at, d.windows + 1
    return d


def test_alerts_none_for_a_healthy_device() -> None:
    d = _with_window(_dev(slo_p99_ms=10.0, throttle_c=85.0), make_window(p99_ms=5.0, temp_c=60.0))
    assert compute_alerts({"pi-1": d}, NOW + 5) == []


def test_alert_offline_by_status_and_by_silence() -> None:
    assert [a.kind for a in compute_alerts({"pi-1": _dev(state="offline")}, NOW)] == ["offline"]
    d = _with_window(_dev(), make_window(span=10.0), at=NOW)
    assert compute_alerts({"pi-1": d}, NOW + 29) == []
    (a,) = compute_alerts({"pi-1": d}, NOW + 31)  # > 3 windows of 10 s without a window
    assert a.kind == "offline" and "no window for 31 s" in a.message
    # the profile's window length counts when the newest window was a short one
    d.profile_window_s = 60.0
    assert compute_alerts({"pi-1": d}, NOW + 100) == []


def test_alert_slo_from_profile_or_option() -> None:
    d = _with_window(_dev(slo_p99_ms=10.0), make_window(p99_ms=12.0))
    (a,) = compute_alerts({"pi-1": d}, NOW)
    assert a.kind == "slo" and "12 ms above the SLO 10 ms" in a.message
    assert compute_alerts({"pi-1": d}, NOW, slo_ms=20.0) == []  # --slo-ms wins
    d.slo_p99_ms = None  # profile without an SLO (slo_p99_ms = 0)
    assert compute_alerts({"pi-1": d}, NOW) == []
    assert [a.kind for a in compute_alerts({"pi-1": d}, NOW, slo_ms=5.0)] == ["slo"]


def test_alert_temperature_and_throttling() -> None:
    d = _with_window(_dev(throttle_c=85.0), make_window(temp_c=79.9))
    assert compute_alerts({"pi-1": d}, NOW) == []
    d.last_window = make_window(temp_c=80.0)  # 85 - 5
    assert [a.kind for a in compute_alerts({"pi-1": d}, NOW)] == ["temperature"]
    assert compute_alerts({"pi-1": d}, NOW, throttle_c=95.0) == []
    d.throttle_c = None  # unknown profile: 80 °C default
    assert [a.kind for a in compute_alerts({"pi-1": d}, NOW)] == ["temperature"]
    d.last_window = make_window(temp_c=None, throttled=True)
    assert [a.kind for a in compute_alerts({"pi-1": d}, NOW)] == ["throttled"]


def test_alert_dropped_increase_through_the_ingest_path() -> None:
    mon = Monitor("127.0.0.1", 1, store=None, client_id="never-connects")
    send = lambda w: mon.handle("edgekit/pi-1/telemetry", json.dumps(w).encode(), now=NOW)  # noqa: E731
    assert send(make_window(seq=0, dropped=2)) == "window"
    assert compute_alerts(mon.fleet(), NOW) == []  # no earlier window to compare with
    send(make_window(seq=1, dropped=5))
    (a,) = compute_alerts(mon.fleet(), NOW)
    assert a.kind == "dropped" and "dropped 3 more" in a.message
    send(make_window(seq=2, dropped=5))
    assert compute_alerts(mon.fleet(), NOW) == []
    send(make_window(seq=1, dropped=9))  # an older window arriving late does not move the state
    assert mon.fleet()["pi-1"].last_window["seq"] == 2  # type: ignore[index]


def test_alert_log_reports_changes_only() -> None:
    log = AlertLog()
    off = compute_alerts({"a": _dev("a", state="offline")}, NOW)
    assert log.update(off) == (off, [])
    assert log.update(off) == ([], [])
    assert log.update([]) == ([], off)


def test_fleet_table_renders_every_column() -> None:
    from rich.console import Console

    d = _with_window(_dev(profile="rpi5", throttle_c=85.0), make_window(seq=2, temp_c=83.0, throttled=True))
    rows = [device_row(d, NOW + 3), device_row(_dev("pi-2", state="offline"), NOW)]
    alerts = compute_alerts({"pi-1": d, "pi-2": _dev("pi-2", state="offline")}, NOW + 3)
    console = Console(record=True, width=220)
    counters = {k: 0 for k in ("received", "stored", "duplicates", "malformed", "oversized", "wrong_schema",
                               "device_mismatch", "errors", "store_errors")}
    console.print(fleet_table(rows, alerts, counters))
    text = console.export_text()
    for col in ("device", "state", "profile", "model", "p50 ms", "p99 ms", "fps", "mJ/inf", "°C", "throttled",
                "last seen", "spool"):
        assert col in text
    assert rows[0]["spool_depth"] == 2
    assert "mlp 1.0.0" in text and "temperature, throttled" in text and "3 s" in text and "offline" in text
