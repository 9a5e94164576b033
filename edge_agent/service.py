"""The agent's run loop: verify the bundle, open the backend and the source, infer, report windows.

The timing core (``timed_loop``) is shared with ``edge-agent bench`` so the benchmark measures exactly
what the agent does. Per inference it costs two ``perf_counter_ns`` calls and one append to an
``array('q')``; the window deadline is checked with the clock value already taken. Everything else (the
stop flag, window summaries, telemetry) happens between slices of at most ``SLICE_S`` seconds.

Signals: the CLI installs SIGTERM/SIGINT handlers that set ``stop``; the loop finishes the current
inference, emits the last partial window, publishes the retained ``offline`` status and returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.backends import Backend, create_backend
from edge_agent.errors import InputError, KeyFileError
from edge_agent.hardware import Device, DeviceOptions, open_device, resolve_device
from edge_agent.manifest import Manifest
from edge_agent.sources import Source, open_source
from edge_agent.telemetry import TelemetrySink
from edge_agent.telemetry.mqtt import MqttSettings, check_topic_part
from edge_agent.telemetry.spool import SPOOL_FILE, Spool, SpoolingSink, peek_next_seq

log = logging.getLogger(__name__)

DEFAULT_KEY_PATHS: tuple[Path, ...] = (
    Path("/etc/edge-agent/trusted.pub"),
    Path("~/.config/edgekit/keys/edgekit-signing.pub"),
)
SLICE_S = 0.1  # longest stretch of inferences between two looks at the stop flag
RUN_WARMUP = 10  # inferences run (and not counted) before the first window
DEFAULT_STATE_DIR = "/var/lib/edge-agent"
HEALTH_N = 50  # inferences a new model must run without error after the switch before it is committed
SEQ_FILE = "seq"
SPOOL_MAX_BYTES = 64 * 2**20  # default bound of the telemetry spool (about 100,000 windows)
SPOOL_MAX_AGE_S = 7 * 24 * 3600.0
_NEVER = 1 << 62


# --------------------------------------------------------------------------------------------------
# the timing core (shared with benchmark.py)


def timed_loop(run: Callable[[Sequence[np.ndarray]], Any], next_feeds: Callable[[], list[np.ndarray]],
               lat_buf: array, deadline_ns: int, max_count: int) -> tuple[int, int]:
    """Run inferences until ``deadline_ns`` (perf_counter_ns) or ``max_count``; append each latency (ns).

    Only ``run`` is timed; fetching the next input is not. The deadline is checked before each
    inference with the clock value taken after the previous one, so the last inference may end after
    it. Returns (inferences run, perf_counter_ns at the end).
    """
    clock = time.perf_counter_ns
    append = lat_buf.append
    n = 0
    now = clock()
    while now < deadline_ns and n < max_count:
        feeds = next_feeds()
        t0 = clock()
        run(feeds)
        now = clock()
        append(now - t0)
        n += 1
    return n, now


# --------------------------------------------------------------------------------------------------
# shared setup


def resolve_pubkey(pubkey: str | os.PathLike | None,
                   candidates: Sequence[Path] = DEFAULT_KEY_PATHS) -> Path:
    """The public key to verify bundles with: ``--pubkey``, else the first existing default location."""
    if pubkey is not None:
        path = Path(pubkey).expanduser()
        if not path.is_file():
            raise KeyFileError(f"public key {path} does not exist",
                               hint="pass the host's signing key (edgekit-signing.pub) with --pubkey")
        return path
    for c in candidates:
        path = c.expanduser()
        if path.is_file():
            return path
    where = ", ".join(str(c) for c in candidates)
    raise KeyFileError(f"no public key to verify the bundle with (looked in {where})",
                       hint="pass --pubkey PATH (the host's edgekit-signing.pub), or install it as "
                            f"{candidates[0] if candidates else '/etc/edge-agent/trusted.pub'}; "
                            "the agent never runs an unverified bundle")


@dataclass
class Session:
    """A verified bundle, its backend and its input source, ready to run."""

    manifest: Manifest
    signer: str
    backend: Backend
    source: Source
    init_ms: float
    root: Path | None = None  # the unpacked bundle (members such as labels), valid inside open_session
    device: Device | None = None  # power sampler, thermal/throttle readers (when ``hardware`` was given)
    golden: dict[str, Any] | None = None  # the golden-input run at load (see golden_run), None without one

    @property
    def model_ref(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": m.name, "version": m.version, "sha256": m.files[m.model].sha256}

    ref = model_ref



def golden_run(backend: Backend, golden: tuple[list[np.ndarray], list[np.ndarray]] | None,
               atol: float | None) -> dict[str, Any] | None:
    """Health check at load: run the bundle's first golden input through the real backend.

    An import that works is no proof that a runtime can run the model; running the input the converter
    recorded is. The outputs are compared with the converter's (raw, in the model's dtype: quantization
    steps for integer outputs) and the largest difference is reported; a difference beyond ``atol`` is a
    warning here, not an error (the activation smoke test decides; other CPU kernels may differ by a few
    quantization steps).
    """
    if golden is None:
        return None
    inputs, outputs = golden
    got = backend.run([np.ascontiguousarray(a[0]) for a in inputs])
    diffs = [float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w[0], np.float64))))
             for g, w in zip(got, outputs, strict=True)]
    worst = max(diffs) if diffs else 0.0
    within = atol is None or worst <= atol
    if not within:
        log.warning("golden check: the model's output on its golden input differs from the converter's by "
                    "%g (tolerance %g): this runtime computes differently; check the runtime and delegate",
                    worst, atol)
    return {"max_abs_diff": worst, "atol": atol, "within_atol": within}

@contextlib.contextmanager
def open_session(bundle_path: str | os.PathLike, pubkey: str | os.PathLike | None, *, source: str,
                 threads: int | None = None, hardware: DeviceOptions | None = None,
                 state_dir: str | os.PathLike | None = None,
                 stop: threading.Event | None = None) -> Iterator[Session]:
    """Verify and unpack the bundle to a temporary folder, create the backend, open the source.

    With ``hardware`` the device side is opened too, before the model is loaded (so an absent power
    source fails fast): the profile (``--profile`` or the manifest's), the power source and its sampler,
    thermal/throttle readers and the idle baseline in ``state_dir``.
    """
    from edge_agent.bundle import load_golden, unpack_bundle

    key = resolve_pubkey(pubkey)
    with tempfile.TemporaryDirectory(prefix="edge-agent-") as tmp, contextlib.ExitStack() as stack:
        unpacked = unpack_bundle(Path(bundle_path), Path(tmp) / "bundle", key)
        manifest = unpacked.manifest
        device = None
        if hardware is not None:
            device = open_device(resolve_device(hardware, manifest.profile), state_dir)
            stack.callback(device.close)
        t0 = time.perf_counter_ns()
        backend = create_backend(manifest, unpacked.model_path, threads=threads)
        init_ms = (time.perf_counter_ns() - t0) / 1e6
        stack.callback(backend.close)
        golden = golden_run(backend, load_golden(unpacked), (manifest.golden or {}).get("atol"))
        # ``stop`` lets SIGTERM end a live source's reconnect back-off at once
        src = open_source(source, backend.inputs, manifest.preprocessing, stop=stop)
        stack.callback(src.close)
        yield Session(manifest, unpacked.signer, backend, src, init_ms, unpacked.root, device, golden)


# --------------------------------------------------------------------------------------------------
# process figures


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rss_mb(statm: Path = Path("/proc/self/statm")) -> float:
    """Resident memory now (MiB) from /proc; where there is no /proc, the peak from getrusage."""
    try:
        pages = int(statm.read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# sequence numbers that survive restarts


def load_seq(state_dir: Path | None) -> int:
    """The next window's seq: 0, or what ``<state_dir>/seq`` says."""
    if state_dir is None:
        return 0
    path = Path(state_dir) / SEQ_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", hint="check the --state-dir permissions") from e
    if not text.isdigit():
        raise InputError(f"{path} does not hold a sequence number ({text[:40]!r})",
                         hint="delete the file to restart the numbering at 0")
    return int(text)


def save_seq(state_dir: Path, next_seq: int) -> None:
    """Write the next seq atomically (temp file + os.replace)."""
    path = Path(state_dir) / SEQ_FILE
    tmp = path.with_name(f".{SEQ_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{next_seq}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# the agent


def _summary(w: dict[str, Any]) -> str:
    lat = w["latency_ms"]
    fmt = (lambda v: "-" if v is None else f"{v:.3f}")  # noqa: E731
    temp = "-" if w["temp_c"] is None else f"{w['temp_c']:.1f}C"
    deg = " DEGRADED" if w["degraded"] else ""
    extra = ""
    if w["power_w"]["mean"] is not None:
        extra += f" power={w['power_w']['mean']:.3f}W"
        if w["energy_mj_per_inference"] is not None:
            extra += f" energy={w['energy_mj_per_inference']:.4f}mJ/inf"
            extra += " (idle-subtracted)" if w["power_w"]["idle"] is not None else ""
    if w.get("cpu_mhz") is not None:
        extra += f" cpu_mhz={w['cpu_mhz']:.0f}"
    if w["throttled"] is not None:
        extra += f" throttled={'yes' if w['throttled'] else 'no'}"
    return (f"seq={w['seq']} count={w['count']} fps={w['fps'] or 0:.1f} p50={fmt(lat['p50'])}ms "
            f"p99={fmt(lat['p99'])}ms max={fmt(lat['max'])}ms cpu={w['cpu_pct']}% rss={w['rss_mb']}MB "
            f"temp={temp}{extra}{deg}")


def _open_spool(state: Path, max_bytes: int, max_age_s: float) -> Spool:
    """The state folder's spool; an existing ``seq`` file is migrated into it (then removed)."""
    spool = Spool(state / SPOOL_FILE, max_bytes=max_bytes, max_age_s=max_age_s, min_next_seq=load_seq(state))
    seq_file = state / SEQ_FILE
    if seq_file.exists():
        seq_file.unlink()  # the spool's meta table holds the next seq from now on
        log.info("moved the window sequence number from %s into the telemetry spool", seq_file)
    return spool


def _telemetry_note(sink: SpoolingSink) -> str:
    st = sink.status()
    note = f" | mqtt={st['mqtt_state']}"
    if st["mqtt_error"]:
        note += f" ({st['mqtt_error']})"
    note += f" spool={st['spool_depth']}"
    if st["spool_oldest_age_s"] is not None:
        note += f" oldest={st['spool_oldest_age_s']:.1f}s"
    if st["spool_dropped"]:
        note += f" dropped={st['spool_dropped']}"
    if st["mqtt_rejected"]:
        note += f" rejected={st['mqtt_rejected']}"
    return note


def run_agent(bundle_path: str | os.PathLike | None, pubkey: str | os.PathLike | None, *,
              source: str = "synthetic", duration: float | None = None, window_s: float = 10.0,
              mqtt: tuple[str, int] | None = None, device_id: str | None = None,
              state_dir: str | os.PathLike | None = None, threads: int | None = None,
              on_window: Callable[[dict[str, Any]], None] | None = None, stop: threading.Event | None = None,
              sink: TelemetrySink | None = None, hardware: DeviceOptions | None = None,
              topic_prefix: str = "edgekit", mqtt_settings: MqttSettings | None = None,
              spool_max_bytes: int = SPOOL_MAX_BYTES, spool_max_age_s: float = SPOOL_MAX_AGE_S,
              max_inflight: int = 100, inboxes: Sequence[str | os.PathLike] = (), groups: Sequence[str] = (),
              keep: int = 3, health_n: int = HEALTH_N, notifier: Any = None,
              reload: threading.Event | None = None,
              reloader: Callable[[], dict[str, Any]] | None = None) -> int:
    """Run until ``duration`` seconds pass or ``stop`` is set; return the windows emitted.

    With ``bundle_path`` the agent runs that bundle (verified, unpacked to a temporary folder). Without it
    it serves the model store in ``state_dir`` (docs/deploy.md): the active version, and new bundles that
    arrive in ``inboxes`` (the first one is where ssh pushes land), as MQTT chunks on its deploy topic or a
    ``groups`` topic, each smoke-tested before the switch and watched for ``health_n`` inferences after it;
    signed commands on its ``cmd`` topic are obeyed. With an empty store it waits for a first bundle.

    Windows go to ``on_window`` (the CLI prints them), to the log, and to MQTT when ``mqtt`` is
    (host, port) (or to ``sink`` when one is given; it is closed on return). Without either the agent
    runs fully offline. With ``mqtt`` and ``state_dir`` every window is first written to the durable
    spool ``<state_dir>/spool.db`` (which then also holds the next seq) and forwarded from there; with
    ``mqtt`` and no ``state_dir`` windows wait in memory only (a warning says they are not durable).
    ``hardware`` says which device profile, power source and hardware roots to use
    (default ``DeviceOptions()``: the manifest's profile under /sys); each window then carries the mean
    power over the window, energy per inference (idle-subtracted with a baseline in ``state_dir``), the
    hottest configured thermal zone, the mean CPU frequency and whether the board throttled.

    Under systemd (``notifier``: ``sdnotify.Notifier``) the agent says READY once it serves (or, with an
    empty store, waits for its first bundle), pings the watchdog from the serving loop (so a runtime that
    hangs is restarted; a busy one is not), and says STOPPING on the way out. When ``reload`` is set
    (SIGHUP) the loop calls ``reloader()`` between two windows and applies what it returns
    (``window_s``) without dropping the model.
    """
    if window_s <= 0:
        raise InputError(f"the window must be longer than 0 s, got {window_s}")
    if duration is not None and duration <= 0:
        raise InputError(f"the duration must be longer than 0 s, got {duration}")
    if health_n < 1 or keep < 2:
        raise InputError(f"the health window needs at least 1 inference and the store at least 2 versions "
                         f"(got {health_n} and {keep})")
    device = device_id or socket.gethostname()
    if mqtt is not None:
        check_topic_part(device, "device id")
        check_topic_part(topic_prefix, "topic prefix")
        for g in groups:
            check_topic_part(g, "group name")
    if bundle_path is None:
        pubkey = resolve_pubkey(pubkey)  # before any folder is made: the store never runs without a key
    if bundle_path is None and state_dir is None:
        state_dir = DEFAULT_STATE_DIR  # the service's state folder (the unit's StateDirectory=edge-agent)
        log.info("no --state-dir: serving the model store in %s", state_dir)
    if bundle_path is None and not inboxes:
        inboxes = [Path(state_dir) / "inbox"]  # where `edgekit push ssh://host` lands by default
    if bundle_path is not None and (inboxes or groups):
        raise InputError("--inbox and --group deliver bundles to the model store, which --bundle bypasses",
                         hint="drop --bundle: the agent then serves the store's active version and takes new ones")
    stop = stop or threading.Event()
    state = Path(state_dir) if state_dir is not None else None
    if state is not None:
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the state folder {state}: {e.strerror}",
                             hint="pass --state-dir DIR to a folder this user may write (the service's is "
                                  f"{DEFAULT_STATE_DIR}, made by `edge-agent install-service`)") from e
    spool: Spool | None = None
    if sink is None and mqtt is not None and state is not None:
        spool = _open_spool(state, spool_max_bytes, spool_max_age_s)
        seq = spool.next_seq
    else:
        seq = load_seq(state)
        if state is not None:  # offline after spooled runs: never reuse a seq the spool gave out
            seq = max(seq, peek_next_seq(state / SPOOL_FILE) or 0)
        if mqtt is not None and state is None and sink is None:
            log.warning("no --state-dir: telemetry windows wait for the broker in memory only and are lost "
                        "if the agent restarts (pass --state-dir for the durable spool)")
    from edge_agent.agent import Agent, NoNotifier

    agent = Agent(bundle_path=bundle_path, pubkey=pubkey, source=source, duration=duration, window_s=window_s,
                   mqtt=mqtt, device=device, state=state, threads=threads, on_window=on_window, stop=stop,
                   sink=sink, hardware=hardware if hardware is not None else DeviceOptions(),
                   topic_prefix=topic_prefix, settings=mqtt_settings or MqttSettings(), spool=spool, seq=seq,
                   max_inflight=max_inflight, inboxes=[Path(p) for p in inboxes], groups=list(groups),
                   keep=keep, health_n=health_n, notifier=notifier or NoNotifier(),
                   reload=reload or threading.Event(), reloader=reloader)
    try:
        return agent.run()
    finally:
        if spool is not None and not spool.closed:  # the sink never took it over (failed before)
            spool.close()
