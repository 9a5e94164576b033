"""USB power meters on a serial port (``[power] source = "serial:<meter>"``, ``serial_port``).

RDTech UM25C / UM34C (Bluetooth SPP, e.g. ``/dev/rfcomm0``, 9600 baud 8N1)
---------------------------------------------------------------------------
The meter sends nothing by itself. Writing the single byte ``0xF0`` asks for one 130-byte record; all
values are big-endian and unsigned:

| offset | size | field |
|---|---|---|
| 0 | 2 | model id: 0x0963 UM24C, 0x09C9 UM25C, 0x0D4C UM34C |
| 2 | 2 | voltage: UM25C in 1 mV (÷1000 → V); UM24C/UM34C in 10 mV (÷100 → V) |
| 4 | 2 | current: UM25C in 0.1 mA (÷10000 → A); UM24C/UM34C in 1 mA (÷1000 → A) |
| 6 | 4 | power in mW (÷1000 → W), all models |
| 10 | 2 | temperature, °C |
| 12 | 2 | temperature, °F |
| 14 | 2 | selected data group |
| 16 | 80 | 10 data groups × (mAh u32, mWh u32) |
| 96, 98 | 2, 2 | D+ / D- voltage in 10 mV |
| 100 .. 127 | | charging mode, threshold recording, screen settings, resistance |
| 128 | 2 | UM24C/UM25C: end marker 0xFFF1. UM34C: byte 129 is a checksum (``UM34C_CHECKSUM_POSITIONS``) |

The UM34C checksum is the XOR of the bytes at 1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57,
59, 63, 67, 69, 73, 79, 83, 89, 97, 99, 109, 111, 113, 119, 121 and 127.

Sources: libsigrok's rdtech-um driver (sigrokproject/libsigrok, src/hardware/rdtech-um/protocol.c and
protocol.h: model ids, per-model scales, the 0xFFF1 marker and the UM34C checksum positions), the sigrok
wiki page "RDTech UM series" (https://sigrok.org/wiki/RDTech_UM_series: 0xF0 request, 130-byte dump,
UM25C 1 mV / 0.1 mA vs UM24C/UM34C 10 mV / 1 mA resolution) and rfinnie/rdserialtool
(rdserial/um/__init__.py: field offsets). Note that 0x0963 is the UM24C's id; the UM25C answers 0x09C9.

INA219 behind a microcontroller (``ina219-csv``, 115200 baud; USB CDC ignores the rate)
-----------------------------------------------------------------------------------
The microcontroller prints one line per measurement, ``bus_V,current_mA,power_mW`` (e.g.
``5.012,431.5,2163.0``), ending in ``\\n`` (a ``\\r`` before it is fine). A header line
``bus_V,current_mA,power_mW`` is optional and may appear again after a reset; blank lines are ignored.
Any other line is an error (no guessing). The first line after the port is opened is dropped, because the
port may have been opened in the middle of it. ``read_w`` returns the newest complete line
(``power_mW`` ÷ 1000), draining older ones.
"""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path
from typing import Any

from edge_agent.errors import MissingDependencyError, SourceError
from edge_agent.power.base import SourceContext, absent

KIND = "serial"
RECORD_LEN = 130
REQUEST = b"\xf0"
UM_BAUD = 9600
CSV_BAUD = 115200
TIMEOUT_S = 2.0
END_MARKER = 0xFFF1
UM34C_CHECKSUM_POSITIONS = (1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57, 59, 63, 67, 69, 73,
                            79, 83, 89, 97, 99, 109, 111, 113, 119, 121, 127)
# model id -> (name, volts per count, amps per count, checksum kind)
UM_MODELS: dict[int, tuple[str, float, float, str]] = {
    0x0963: ("UM24C", 0.01, 0.001, "fff1"),
    0x09C9: ("UM25C", 0.001, 0.0001, "fff1"),
    0x0D4C: ("UM34C", 0.01, 0.001, "xor"),
}
CSV_HEADER = ("bus_v", "current_ma", "power_mw")
MAX_LINE = 4096


def um34c_checksum(data: bytes) -> int:
    """The UM34C record checksum: XOR of the bytes at ``UM34C_CHECKSUM_POSITIONS``."""
    c = 0
    for i in UM34C_CHECKSUM_POSITIONS:
        c ^= data[i]
    return c


def parse_um_record(data: bytes) -> dict[str, Any]:
    """Decode one 130-byte UM24C/UM25C/UM34C record (pure).

    Returns ``{"model", "volts", "amps", "watts", "temp_c"}``. A record of the wrong length, an unknown
    model id, a missing end marker or a bad UM34C checksum is a ``SourceError``.
    """
    if len(data) != RECORD_LEN:
        raise SourceError(f"UM meter record is {len(data)} bytes, expected {RECORD_LEN}",
                          hint="check serial_port and that the meter is a UM24C/UM25C/UM34C (9600 baud)")
    model_id, raw_v, raw_a, raw_mw, temp_c = struct.unpack_from(">HHHIH", data, 0)
    if model_id not in UM_MODELS:
        known = ", ".join(f"0x{k:04X} {v[0]}" for k, v in UM_MODELS.items())
        raise SourceError(f"UM meter record starts with model id 0x{model_id:04X}, not a known one ({known})",
                          hint="check that serial_port is the meter's port and that nothing else talks on it")
    model, v_scale, a_scale, check = UM_MODELS[model_id]
    if check == "fff1":
        (end,) = struct.unpack_from(">H", data, RECORD_LEN - 2)
        if end != END_MARKER:
            raise SourceError(f"{model} record ends with 0x{end:04X}, expected the end marker 0x{END_MARKER:04X}",
                              hint="the record was cut or shifted; check the link (Bluetooth range, baud 9600)")
    else:
        want, got = um34c_checksum(data), data[RECORD_LEN - 1]
        if want != got:
            raise SourceError(f"{model} record checksum is 0x{got:02X}, computed 0x{want:02X}",
                              hint="the record was cut or shifted; check the link (Bluetooth range, baud 9600)")
    return {"model": model, "volts": raw_v * v_scale, "amps": raw_a * a_scale, "watts": raw_mw / 1000.0,
            "temp_c": float(temp_c)}


def parse_ina219_csv_line(line: str) -> tuple[float, float, float] | None:
    """``"5.012,431.5,2163.0"`` -> ``(5.012, 431.5, 2163.0)`` (V, mA, mW); None for a header or blank line."""
    text = line.strip()
    if not text:
        return None
    fields = [f.strip() for f in text.split(",")]
    if tuple(f.lower() for f in fields) == CSV_HEADER:
        return None
    bad = SourceError(f"not an INA219 CSV line: {line.strip()!r}; expected bus_V,current_mA,power_mW "
                      "(three numbers, e.g. 5.012,431.5,2163.0)",
                      hint="make the microcontroller print exactly that, one line per measurement")
    if len(fields) != 3:
        raise bad
    try:
        values = tuple(float(f) for f in fields)
    except ValueError as e:
        raise bad from e
    if not all(math.isfinite(v) for v in values):
        raise bad
    return values[0], values[1], values[2]


def _serial_module() -> Any:
    try:
        import serial
    except ImportError as e:
        raise MissingDependencyError(
            "serial power meters need the Python package 'pyserial', which is not installed",
            hint="pip install pyserial (a dependency of edgekit: reinstall edgekit)") from e
    return serial


def open_port(url: str, baudrate: int, ctx: SourceContext, timeout_s: float = TIMEOUT_S) -> Any:
    """Open a serial device path or pyserial URL (``loop://``, ``rfc2217://``); errors name the port."""
    serial = _serial_module()
    if "://" not in url and not Path(url).exists():
        raise absent(ctx, KIND, f"serial port {url} does not exist", [url],
                     fix="plug in / pair the meter (e.g. `rfcomm bind 0 <MAC>` for /dev/rfcomm0) and set "
                         "[power] serial_port")
    try:
        return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout_s)
    except (serial.SerialException, ValueError, OSError) as e:
        raise SourceError(f"power source {KIND!r}: cannot open serial port {url}: {e}",
                          hint=ctx.hint(KIND, "check the port name and that the agent's user is in the "
                                              "'dialout' group")) from e


class UmMeter:
    """An RDTech UM25C/UM34C: one 0xF0 request and one 130-byte record per reading."""

    energy_counter = False

    def __init__(self, port: Any, meter: str, ctx: SourceContext, timeout_s: float = TIMEOUT_S) -> None:
        self._ser = port
        self._ctx = ctx
        self.timeout_s = timeout_s
        self.name = f"serial:{meter}"
        self.port_name = str(getattr(port, "name", None) or getattr(port, "port", "") or ctx.serial_port)
        self.expected_model = meter.upper()
        self._serial = _serial_module()
        self.last_record: dict[str, Any] | None = None
        rec = self._request()
        if rec["model"] != self.expected_model:
            raise SourceError(
                f"power source {self.name!r}: the meter on {self.port_name} is a {rec['model']}, "
                f"not a {self.expected_model}",
                hint=ctx.hint(KIND, f"set [power] source = \"serial:{rec['model'].lower()}\""))
        self.note = f"{rec['model']} USB meter on {self.port_name}: everything behind the meter, not wall power"

    def _request(self) -> dict[str, Any]:
        try:
            self._ser.reset_input_buffer()
            self._ser.write(REQUEST)
            self._ser.flush()
            data = self._ser.read(RECORD_LEN)
        except (self._serial.SerialException, OSError) as e:
            raise SourceError(f"power source {self.name!r}: serial I/O on {self.port_name} failed: {e}",
                              hint=self._ctx.hint(KIND)) from e
        if len(data) != RECORD_LEN:
            raise SourceError(
                f"power source {self.name!r}: the meter on {self.port_name} answered {len(data)} of "
                f"{RECORD_LEN} bytes within {self.timeout_s} s",
                hint=self._ctx.hint(KIND, "check that the meter is on, paired and in range, at 9600 baud"))
        rec = parse_um_record(bytes(data))
        self.last_record = rec
        return rec

    def read_w(self) -> float:
        rec = self._request()
        if rec["model"] != self.expected_model:
            raise SourceError(f"power source {self.name!r}: a {rec['model']} answered on {self.port_name}")
        return rec["watts"]

    def read_energy_j(self) -> float | None:
        return None

    def rails(self) -> dict[str, float]:
        return {} if self.last_record is None else {self.last_record["model"]: self.last_record["watts"]}

    def close(self) -> None:
        self._ser.close()


class Ina219CsvMeter:
    """An INA219 behind a microcontroller that prints ``bus_V,current_mA,power_mW`` lines."""

    name = "serial:ina219-csv"
    energy_counter = False

    def __init__(self, port: Any, ctx: SourceContext, timeout_s: float = TIMEOUT_S) -> None:
        self._ser = port
        self._ctx = ctx
        self.timeout_s = timeout_s
        self.port_name = str(getattr(port, "name", None) or getattr(port, "port", "") or ctx.serial_port)
        self._serial = _serial_module()
        self._buf = b""
        self._synced = False
        self.last: tuple[float, float, float] | None = None
        self.note = f"INA219 (CSV) on {self.port_name}: the circuit behind the shunt, not wall power"
        self.read_w()

    def _latest(self) -> tuple[float, float, float]:
        deadline = time.monotonic() + self.timeout_s
        latest: tuple[float, float, float] | None = None
        while True:
            try:
                waiting = self._ser.in_waiting
                chunk = self._ser.read(waiting or 1)
                more = self._ser.in_waiting
            except (self._serial.SerialException, OSError) as e:
                raise SourceError(f"power source {self.name!r}: serial I/O on {self.port_name} failed: {e}",
                                  hint=self._ctx.hint(KIND)) from e
            self._buf += chunk
            if b"\n" in self._buf:
                *complete, self._buf = self._buf.split(b"\n")
                if not self._synced:
                    complete, self._synced = complete[1:], True  # opened mid-line: drop the first segment
                for raw in complete:
                    try:
                        line = raw.decode("ascii")
                    except UnicodeDecodeError as e:
                        raise SourceError(f"power source {self.name!r}: non-ASCII bytes on {self.port_name}: "
                                          f"{raw[:40]!r}", hint="check the baud rate (115200)") from e
                    parsed = parse_ina219_csv_line(line)
                    if parsed is not None:
                        latest = parsed
            if latest is not None and not more:
                return latest
            if len(self._buf) > MAX_LINE:
                raise SourceError(f"power source {self.name!r}: {len(self._buf)} bytes without a line end on "
                                  f"{self.port_name}", hint="check the baud rate (115200) and the line format")
            if time.monotonic() >= deadline:
                if latest is not None:
                    return latest
                raise SourceError(
                    f"power source {self.name!r}: no complete bus_V,current_mA,power_mW line on {self.port_name} "
                    f"within {self.timeout_s} s",
                    hint=self._ctx.hint(KIND, "check that the microcontroller prints at 115200 baud"))

    def read_w(self) -> float:
        self.last = self._latest()
        return self.last[2] / 1000.0

    def read_energy_j(self) -> float | None:
        return None

    def rails(self) -> dict[str, float]:
        return {} if self.last is None else {"ina219": self.last[2] / 1000.0}

    def close(self) -> None:
        self._ser.close()


def open_source(arg: str, ctx: SourceContext) -> UmMeter | Ina219CsvMeter:
    spec = f"serial:{arg}"
    if not ctx.serial_port:
        raise SourceError(f"power source {spec!r} needs the meter's port: [power] serial_port is empty",
                          hint=ctx.hint(KIND, 'set [power] serial_port, e.g. "/dev/rfcomm0" or "/dev/ttyACM0"'))
    if arg == "ina219-csv":
        port = open_port(ctx.serial_port, CSV_BAUD, ctx)
        try:
            return Ina219CsvMeter(port, ctx)
        except SourceError:
            port.close()
            raise
    port = open_port(ctx.serial_port, UM_BAUD, ctx)
    try:
        return UmMeter(port, arg, ctx)
    except SourceError:
        port.close()
        raise
