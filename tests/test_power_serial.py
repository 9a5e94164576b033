"""edge_agent.power.serial_meter: UM records built from the documented layout, meters behind a real pty, and
the INA219 CSV reader over pyserial's loop://."""

from __future__ import annotations

import os
import select
import struct
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial

from edge_agent.errors import SourceError
from edge_agent.power import open_power_source
from edge_agent.power.base import SourceContext
from edge_agent.power.serial_meter import (
    Ina219CsvMeter,
    UmMeter,
    parse_ina219_csv_line,
    parse_um_record,
)

# The UM34C checksum positions as the libsigrok rdtech-um driver lists them (byte 129 = XOR of these).
UM34C_XOR = (1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57, 59, 63, 67, 69, 73, 79, 83, 89, 97,
             99, 109, 111, 113, 119, 121, 127)


def um_record(model_id: int, raw_v: int, raw_a: int, mw: int, temp_c: int = 27, *, um34c: bool = False) -> bytes:
    """A 130-byte record laid out field by field (big-endian): id, V, A, mW, °C, °F, group, 10 groups, ..."""
    rec = bytearray(130)
    struct.pack_into(">H", rec, 0, model_id)
    struct.pack_into(">H", rec, 2, raw_v)
    struct.pack_into(">H", rec, 4, raw_a)
    struct.pack_into(">I", rec, 6, mw)
    struct.pack_into(">H", rec, 10, temp_c)
    struct.pack_into(">H", rec, 12, temp_c * 9 // 5 + 32)
    struct.pack_into(">H", rec, 14, 1)  # selected data group
    for g in range(10):
        struct.pack_into(">II", rec, 16 + 8 * g, 100 * g + 7, 500 * g + 3)  # mAh, mWh
    struct.pack_into(">HH", rec, 96, 60, 61)  # D+ / D- in 10 mV
    struct.pack_into(">I", rec, 122, 41)  # resistance, 0.1 Ω
    if um34c:
        rec[128] = 0x5A
        c = 0
        for i in UM34C_XOR:
            c ^= rec[i]
        rec[129] = c
    else:
        struct.pack_into(">H", rec, 128, 0xFFF1)
    return bytes(rec)


UM25C = um_record(0x09C9, 5123, 12345, 6324)  # 5.123 V, 1.2345 A, 6.324 W
UM34C = um_record(0x0D4C, 512, 1234, 6318, um34c=True)  # 5.12 V, 1.234 A, 6.318 W


# --------------------------------------------------------------------------------------------------
# parse_um_record


def test_um25c_record_scales() -> None:
    rec = parse_um_record(UM25C)
    assert rec["model"] == "UM25C"
    assert rec["volts"] == pytest.approx(5.123)
    assert rec["amps"] == pytest.approx(1.2345)
    assert rec["watts"] == pytest.approx(6.324)
    assert rec["temp_c"] == 27.0


def test_um34c_record_scales_and_checksum() -> None:
    rec = parse_um_record(UM34C)
    assert (rec["model"], rec["volts"], rec["amps"], rec["watts"]) == pytest.approx(("UM34C", 5.12, 1.234, 6.318))


def test_um24c_uses_the_10mv_1ma_scales() -> None:
    rec = parse_um_record(um_record(0x0963, 503, 420, 2112))
    assert (rec["model"], rec["volts"], rec["amps"]) == ("UM24C", pytest.approx(5.03), pytest.approx(0.42))


@pytest.mark.parametrize("length", [0, 1, 129, 131, 260])
def test_wrong_length_is_refused(length: int) -> None:
    data = (UM25C * 2)[:length]
    with pytest.raises(SourceError, match=f"{length} bytes, expected 130"):
        parse_um_record(data)


def test_unknown_model_id_is_refused() -> None:
    with pytest.raises(SourceError, match="model id 0x1234"):
        parse_um_record(um_record(0x1234, 1, 1, 1))


def test_um25c_without_the_end_marker_is_refused() -> None:
    bad = UM25C[:128] + b"\x00\x00"
    with pytest.raises(SourceError, match="0xFFF1"):
        parse_um_record(bad)


def test_um34c_with_a_bad_checksum_is_refused() -> None:
    bad = bytearray(UM34C)
    bad[3] ^= 0x01  # a voltage bit flipped in transit (position 3 is in the checksum)
    with pytest.raises(SourceError, match="checksum"):
        parse_um_record(bytes(bad))


def test_shifted_record_is_refused() -> None:
    with pytest.raises(SourceError):
        parse_um_record(UM25C[1:] + b"\xc9")


# --------------------------------------------------------------------------------------------------
# a meter behind a real pty


class PtyMeter:
    """The master side of a pty playing a UM meter: answers each 0xF0 with ``record`` (None: stays silent)."""

    def __init__(self, record: bytes | None) -> None:
        self.record = record
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                byte = os.read(self.master, 1)
            except OSError:  # EIO: the slave side was closed
                return
            self.requests.append(byte)
            if byte == b"\xf0" and self.record is not None:
                os.write(self.master, self.record)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_meter() -> Iterator[Callable[[bytes | None], PtyMeter]]:
    made: list[PtyMeter] = []

    def make(record: bytes | None) -> PtyMeter:
        made.append(PtyMeter(record))
        return made[-1]

    yield make
    for m in made:
        m.close()


def test_um25c_over_a_pty(pty_meter: Callable[[bytes | None], PtyMeter]) -> None:
    meter = pty_meter(UM25C)
    src = open_power_source("serial:um25c", serial_port=meter.port)
    assert isinstance(src, UmMeter)
    try:
        assert src.read_w() == pytest.approx(6.324)
        meter.record = um_record(0x09C9, 5001, 20000, 10002)
        assert src.read_w() == pytest.approx(10.002)
        assert src.rails() == pytest.approx({"UM25C": 10.002})
        assert src.last_record is not None and src.last_record["amps"] == pytest.approx(2.0)
        assert meter.requests == [b"\xf0"] * 3  # one request at open (the check), one per reading
        assert "UM25C" in src.note
    finally:
        src.close()


def test_um34c_over_a_pty(pty_meter: Callable[[bytes | None], PtyMeter]) -> None:
    meter = pty_meter(UM34C)
    src = open_power_source("serial:um34c", serial_port=meter.port)
    assert src is not None
    try:
        assert src.read_w() == pytest.approx(6.318)
    finally:
        src.close()


def test_profile_meter_and_real_meter_disagree(pty_meter: Callable[[bytes | None], PtyMeter]) -> None:
    meter = pty_meter(UM34C)
    with pytest.raises(SourceError) as err:
        open_power_source("serial:um25c", serial_port=meter.port)
    assert "is a UM34C, not a UM25C" in str(err.value) and 'serial:um34c' in str(err.value)


def test_silent_meter_times_out_with_a_clear_error(pty_meter: Callable[[bytes | None], PtyMeter]) -> None:
    meter = pty_meter(None)
    port = serial.Serial(meter.port, 9600, timeout=0.2)
    with pytest.raises(SourceError, match="answered 0 of 130 bytes"):
        UmMeter(port, "um25c", SourceContext(serial_port=meter.port), timeout_s=0.2)
    port.close()
    assert meter.requests == [b"\xf0"]


def test_missing_port_names_it(tmp_path: Path) -> None:
    port = str(tmp_path / "rfcomm0")
    with pytest.raises(SourceError) as err:
        open_power_source("serial:um25c", serial_port=port, profile="rpi4")
    msg = str(err.value)
    assert f"serial port {port} does not exist" in msg and "firmware_notes/rpi4.md#power-measurement" in msg


def test_empty_port_setting_says_which_key(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"\[power\] serial_port is empty"):
        open_power_source("serial:ina219-csv")


# --------------------------------------------------------------------------------------------------
# INA219 CSV


@pytest.mark.parametrize(("line", "want"), [
    ("5.012,431.5,2163.0", (5.012, 431.5, 2163.0)),
    (" 5.0 , -12.5 , 62.5 \r\n", (5.0, -12.5, 62.5)),
    ("bus_V,current_mA,power_mW", None),
    ("BUS_V, Current_mA, POWER_MW\r", None),
    ("", None),
    ("\r\n", None),
])
def test_csv_line_parser(line: str, want: tuple[float, float, float] | None) -> None:
    assert parse_ina219_csv_line(line) == want


@pytest.mark.parametrize("line", ["5.0,100", "5.0,100,500,1", "5.0,abc,500", "nan,1,1", "ina219 ready",
                                  "5;100;500"])
def test_csv_line_parser_refuses_anything_else(line: str) -> None:
    with pytest.raises(SourceError, match="bus_V,current_mA,power_mW"):
        parse_ina219_csv_line(line)


def test_csv_reader_over_loop() -> None:
    port = serial.serial_for_url("loop://", timeout=0.1)
    port.write(b"42,partial line from before we opened\r\nbus_V,current_mA,power_mW\r\n5.01,100.0,501.0\r\n")
    meter = Ina219CsvMeter(port, SourceContext(serial_port="loop://"), timeout_s=0.3)
    try:
        assert meter.last == (5.01, 100.0, 501.0)  # the first (partial) line was dropped, the header skipped
        port.write(b"5.0,200,1000\n5.0,300,1500\n")
        assert meter.read_w() == pytest.approx(1.5)  # the newest line, older ones drained
        assert meter.rails() == pytest.approx({"ina219": 1.5})
        port.write(b"5.0,300,1500\nbus_V,current_mA,power_mW\n4.9,")  # header again after a reset + a partial
        assert meter.read_w() == pytest.approx(1.5)
        port.write(b"100,490\n")
        assert meter.read_w() == pytest.approx(0.49)  # the partial line completed
        port.write(b"garbage\n")
        with pytest.raises(SourceError, match="not an INA219 CSV line"):
            meter.read_w()
        with pytest.raises(SourceError, match="no complete"):
            meter.read_w()  # nothing more arrives
    finally:
        meter.close()


def test_csv_meter_streaming_over_a_pty() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    line = [b"5.000,400.0,2000.0\n"]
    stop = threading.Event()

    def stream() -> None:  # a microcontroller printing ~50 lines a second
        while not stop.is_set():
            os.write(master, line[0])
            time.sleep(0.02)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        src = open_power_source("serial:ina219-csv", serial_port=os.ttyname(slave))
        assert src is not None
        try:
            assert src.read_w() == pytest.approx(2.0)
            line[0] = b"5.000,800.0,4000.0\n"
            deadline = time.monotonic() + 10
            while src.read_w() != pytest.approx(4.0):
                assert time.monotonic() < deadline, "the new line never arrived"
        finally:
            src.close()
    finally:
        stop.set()
        t.join(5)
        os.close(master)
        os.close(slave)
