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
import json
import logging
import os
import queue
import resource
import signal
import socket
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import __version__
from edge_agent.backends import Backend, create_backend
from edge_agent.errors import CommandError, EdgekitError, InputError, KeyFileError, TransferError
from edge_agent.hardware import Device, DeviceOptions, open_device, resolve_device
from edge_agent.manifest import Manifest
from edge_agent.sources import Source, SourceEnded, open_source
from edge_agent.stats import latency_summary_ms
from edge_agent.telemetry import TelemetrySink
from edge_agent.telemetry.mqtt import MqttPublisher, MqttSettings, check_topic_part, group_deploy_topic, topics
from edge_agent.telemetry.schema import build_window
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
    agent = _Agent(bundle_path=bundle_path, pubkey=pubkey, source=source, duration=duration, window_s=window_s,
                   mqtt=mqtt, device=device, state=state, threads=threads, on_window=on_window, stop=stop,
                   sink=sink, hardware=hardware if hardware is not None else DeviceOptions(),
                   topic_prefix=topic_prefix, settings=mqtt_settings or MqttSettings(), spool=spool, seq=seq,
                   max_inflight=max_inflight, inboxes=[Path(p) for p in inboxes], groups=list(groups),
                   keep=keep, health_n=health_n, notifier=notifier or _NoNotifier(),
                   reload=reload or threading.Event(), reloader=reloader)
    try:
        return agent.run()
    finally:
        if spool is not None and not spool.closed:  # the sink never took it over (failed before)
            spool.close()


def failpoint(step: str) -> None:
    """Fault injection for the crash tests: ``EDGE_AGENT_FAILPOINT=<step>`` SIGKILLs the agent at that step
    of an activation (docs/deploy.md). Unset in normal operation."""
    if os.environ.get("EDGE_AGENT_FAILPOINT") == step:
        log.warning("failpoint %s: killing the agent (crash test)", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Agent:
    """One run of the agent: the serving loop and, in store mode, activation and commands."""

    bundle_path: str | os.PathLike | None
    pubkey: str | os.PathLike | None
    source: str
    duration: float | None
    window_s: float
    mqtt: tuple[str, int] | None
    device: str
    state: Path | None
    threads: int | None
    on_window: Callable[[dict[str, Any]], None] | None
    stop: threading.Event
    sink: TelemetrySink | None
    hardware: DeviceOptions
    topic_prefix: str
    settings: MqttSettings
    spool: Spool | None
    seq: int
    max_inflight: int
    inboxes: list[Path]
    groups: list[str]
    keep: int
    health_n: int
    notifier: Any
    reload: threading.Event
    reloader: Callable[[], dict[str, Any]] | None
    emitted: int = 0
    spooling: SpoolingSink | None = None
    serving: Any = None  # Session (bundle mode) or activation.Model (store mode)
    dev: Device | None = None
    activator: Any = None
    store: Any = None
    commands: queue.Queue = field(default_factory=queue.Queue)
    _source_seen: tuple[int, int] = (0, 0)  # (reconnect attempts, reconnects) already reported
    _early_events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    # ------------------------------------------------------------------------------ events and telemetry

    def emit(self, kind: str, **fields: Any) -> None:
        """Publish an event (or keep it until the MQTT sink exists); every event is logged too."""
        log.info("event %s %s", kind, json.dumps(fields, default=str)[:400])
        if self.sink is None:
            if self.mqtt is not None:
                self._early_events.append((kind, fields))
            return
        self.sink.publish_event(kind, **fields)

    def _birth(self) -> dict[str, Any]:
        birth: dict[str, Any] = {"agent_version": __version__, "model": None, "profile": None, "engine": None,
                                 "providers": [], "degraded": False, "degraded_reason": None,
                                 "device_profile": None, "power_source": None, "power_mode": None}
        if self.serving is not None:
            info = self.serving.backend.info()
            birth.update({"model": self.serving.ref, "profile": self.serving.manifest.profile,
                          "engine": info["engine"], "providers": info["providers"], "degraded": info["degraded"],
                          "degraded_reason": info["degraded_reason"]})
        if self.dev is not None:
            birth.update({"device_profile": self.dev.config.profile, "power_source": self.dev.power_source,
                          "power_mode": None if self.dev.power_mode is None else self.dev.power_mode.to_dict()})
        if self.store is not None:
            active = self.store.active
            birth["store"] = {"active": None if active is None else active.id,
                              "versions": [s.manifest.version for s in self.store.slots()]}
        return birth

    def _open_sink(self, subscriptions: dict[str, Callable[[str, bytes], None]] | None = None) -> None:
        if self.sink is not None or self.mqtt is None:
            return
        args = {"host": self.mqtt[0], "port": self.mqtt[1], "device_id": self.device, "prefix": self.topic_prefix,
                "birth": self._birth(), **self.settings.kwargs()}
        if subscriptions:
            args["subscriptions"] = subscriptions
        if self.spool is not None:
            self.sink = self.spooling = SpoolingSink(self.spool, args, max_inflight=self.max_inflight)
        else:
            self.sink = MqttPublisher(**args)
        for kind, fields in self._early_events:
            self.sink.publish_event(kind, **fields)
        self._early_events.clear()

    def _update_birth(self) -> None:
        publisher = self.spooling.publisher if self.spooling is not None else self.sink
        if isinstance(publisher, MqttPublisher):
            publisher.update_birth(self._birth())

    # ------------------------------------------------------------------------------ the two modes

    def run(self) -> int:
        try:
            if self.bundle_path is not None:
                with open_session(self.bundle_path, self.pubkey, source=self.source, threads=self.threads,
                                  hardware=self.hardware, state_dir=self.state, stop=self.stop) as sess:
                    self.serving, self.dev = sess, sess.device
                    return self._serve()
            return self._run_store()
        finally:
            self.notifier.stopping("flushing telemetry, publishing offline")
            if self.sink is not None:
                self.sink.close(timeout=5.0)

    def _run_store(self) -> int:
        from edge_agent.activation import Activator
        from edge_agent.commands import NonceStore
        from edge_agent.store import ModelStore
        from edge_agent.transfer import Receiver

        assert self.state is not None
        key = resolve_pubkey(self.pubkey)
        self.store = ModelStore(self.state, key, keep=self.keep, hook=failpoint)
        recovered = self.store.recover()
        nonces = NonceStore(self.state / "nonces.json")
        receiver = Receiver(self.state / "incoming")
        receiver.expire()
        with contextlib.ExitStack() as stack:
            self.activator = Activator(self.store, emit=self.emit, inboxes=self.inboxes, threads=self.threads)
            stack.callback(self.activator.close)
            topic_names = topics(self.topic_prefix, self.device)
            from edge_agent.signing import load_public_key

            pinned = load_public_key(key)
            subs = {topic_names["cmd"]: lambda t, p: self._on_command(p, pinned, nonces),
                    topic_names["deploy"]: lambda t, p: self._on_chunk(p, receiver)}
            for g in self.groups:
                subs[group_deploy_topic(self.topic_prefix, g)] = lambda t, p: self._on_chunk(p, receiver)
            for event in recovered:
                self.emit(event.pop("kind"), **event)
            self._open_sink(subs)
            # transfers an earlier run completed and did not activate (killed in between)
            for path in sorted((self.state / "incoming").glob("*.edgebundle")):
                self.activator.submit(self._mqtt_job(path))
            self.activator.start()
            model = self._initial_model()
            if model is None:
                return 0
            stack.callback(lambda: self.serving.close())
            self.serving = model
            self.dev = open_device(resolve_device(self.hardware, model.manifest.profile), self.state)
            stack.callback(self.dev.close)
            model.open_source(self.source, self.stop)
            self._update_birth()
            return self._serve()

    def _mqtt_job(self, path: Path) -> Any:
        from edge_agent.activation import Job

        return Job("bundle", "mqtt", path=path, remove_after=True)

    def _initial_model(self) -> Any:
        """The store's active version, smoke-tested (a version that fails goes back to the previous one);
        with none, wait for the first bundle to arrive."""
        store, activator = self.store, self.activator
        active = store.active
        while active is not None:
            model = activator.load(active)
            if not isinstance(model, EdgekitError):
                log.info("serving %s from the model store", active.id)
                return model
            reason = getattr(model, "reason", "load_failed")
            back = store.rollback(reason, "start", model.message)
            self.emit("rolled_back", bundle_sha256=active.bundle_sha256, stage="start", reason=reason,
                      message=model.message, to=None if back is None else _slot_ref(back))
            active = back
        log.warning("the model store in %s holds no model that loads: waiting for a bundle (inbox %s, MQTT "
                    "deploy topic)", self.state, ", ".join(map(str, self.inboxes)) or "none")
        self.notifier.ready("no model yet: waiting for a bundle")
        until = time.monotonic() + self.duration if self.duration is not None else float("inf")
        while not self.stop.is_set() and time.monotonic() < until:
            self.notifier.watchdog()
            self._maybe_reload()
            cand = activator.take()
            if cand is not None:
                model = cand.model
                model.open_source(self.source, self.stop)
                store.switch(model.slot)
                failure = _health(model, self.health_n)
                if failure is None:
                    store.commit()
                    activator.finish(cand.job, "activated", model=model.ref, previous=None, smoke=model.smoke)
                    activator.done()
                    model.source.close()
                    model.source = None
                    return model
                model.close()
                store.rollback("health_error", "health", failure)
                activator.finish(cand.job, "rolled_back", reason="health_error", stage="health", message=failure,
                                 to=None)
                activator.done()
            self._handle_commands()
            self.stop.wait(0.05)
        return None

    # ------------------------------------------------------------------------------ MQTT handlers (paho thread)

    def _on_chunk(self, payload: bytes, receiver: Any) -> None:
        try:
            path = receiver.add(payload)
        except TransferError as e:
            self.emit("deploy_rejected", bundle_sha256=getattr(e, "transfer", None), reason="transfer",
                      message=e.message, detail=e.reason)
            return
        if path is not None:
            self.activator.submit(self._mqtt_job(path))

    def _on_command(self, payload: bytes, key: Any, nonces: Any) -> None:
        from edge_agent.commands import rejection_event, verify_command

        try:
            cmd = verify_command(payload, key, self.device, nonces=nonces)
        except CommandError as e:
            log.error("command refused (%s): %s", e.reason, e.message)
            self.emit("command", **rejection_event(e))
            return
        except EdgekitError as e:  # e.g. the nonce store cannot be written: not executed, said so
            log.error("command not executed: %s", e)
            self.emit("command", nonce=None, action=None, result="failed", reason="state_error", detail=e.message)
            return
        log.info("command %s %s (nonce %s)", cmd.action, cmd.args, cmd.nonce)
        self.commands.put(cmd)

    # ------------------------------------------------------------------------------ commands (serving loop)

    def _reply(self, cmd: Any, result: str, reason: str | None = None, **detail: Any) -> None:
        self.emit("command", nonce=cmd.nonce, action=cmd.action, result=result, reason=reason, detail=detail)

    def _handle_commands(self) -> None:
        from edge_agent.activation import Job

        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            store, ref = self.store, {"nonce": cmd.nonce, "action": cmd.action}
            if cmd.action == "set":
                self.window_s = float(cmd.args["telemetry_interval"])
                self._reply(cmd, "done", telemetry_interval=self.window_s)
            elif cmd.action == "bench":
                if self.serving is None or self.serving.source is None:
                    self._reply(cmd, "failed", "no_model", message="no model is being served")
                else:
                    self._reply(cmd, "done", **self._bench(float(cmd.args.get("duration", 10.0))))
            elif cmd.action == "rollback":
                prev = store.previous
                if prev is None:
                    self._reply(cmd, "failed", "no_previous", message="the store holds no previous version")
                else:
                    self.activator.submit(Job("slot", "command", slot=prev, command=ref))
            elif cmd.action == "activate":
                slot = store.find(cmd.args["version"])
                if slot is None:
                    known = ", ".join(s.manifest.version for s in store.slots()) or "none"
                    self._reply(cmd, "failed", "unknown_version",
                                message=f"version {cmd.args['version']!r} is not in the store (has: {known})")
                else:
                    self.activator.submit(Job("slot", "command", slot=slot, command=ref))
            elif cmd.action == "reload":
                if store.active is None:
                    self._reply(cmd, "failed", "no_model", message="the store holds no active version")
                else:
                    self.activator.submit(Job("slot", "command", slot=store.active, command=ref))

    def _bench(self, duration: float) -> dict[str, Any]:
        lat = array("q")
        t0 = time.perf_counter_ns()
        end, n = t0 + int(duration * 1e9), 0
        now = t0
        try:
            while now < end:  # in slices, so the watchdog keeps being fed during a long bench
                k, now = timed_loop(self.serving.backend.run, self.serving.source.next, lat,
                                    min(end, now + int(SLICE_S * 1e9)), _NEVER)
                n += k
                self.notifier.watchdog()
        except SourceEnded as e:
            return {"message": f"the source ended: {e.message}"}
        return {"model": self.serving.ref, "count": n, "fps": round(n / max((now - t0) / 1e9, 1e-9), 2),
                "latency_ms": latency_summary_ms(lat)}

    # ------------------------------------------------------------------------------ switching models

    def _switch(self, cand: Any) -> None:
        """Switch to a smoke-tested model, run its health window, then commit or go back."""
        store, activator, old, new = self.store, self.activator, self.serving, cand.model
        job = cand.job
        failpoint("smoke")
        old.source.close()
        old.source = None
        store.switch(new.slot)
        try:
            new.open_source(self.source, self.stop)
            failure = _health(new, self.health_n)
        except EdgekitError as e:
            failure = f"cannot open the input source for the new model: {e.message}"
        failpoint("health")
        if failure is None:
            store.commit()
            self.serving = new
            old.close()
            self._update_birth()
            if job.command is not None and job.command["action"] == "rollback":
                activator.finish(job, "activated", model=new.ref, previous=old.ref, smoke=new.smoke,
                                 event="rolled_back", stage="command", reason="command")
            else:
                activator.finish(job, "activated", model=new.ref, previous=old.ref, smoke=new.smoke)
        else:
            log.error("the new model %s failed its health window: %s; going back to %s", new.slot.id, failure,
                      old.slot.id)
            new.close()
            store.rollback("health_error", "health", failure)
            old.open_source(self.source, self.stop)
            activator.finish(job, "rolled_back", reason="health_error", stage="health", message=failure,
                             to=old.ref)
        activator.done()

    def _source_events(self, source: Any) -> None:
        """Events when a live source (camera, RTSP, serial) was lost or came back during the window."""
        counts = _source_counts(source)
        if counts is None:
            return
        (attempts, back), (seen_attempts, seen_back) = counts, self._source_seen
        if attempts < seen_attempts or back < seen_back:  # a new source (a new model): counting starts over
            seen_attempts = seen_back = 0
        if attempts > seen_attempts:
            self.emit("error", what="source_reconnect", message=f"the input source {self.source} was lost; "
                      f"{attempts - seen_attempts} reconnect attempt(s) in this window", attempts=attempts,
                      reconnects=back)
        elif back > seen_back:
            self.emit("source_reconnected", message=f"the input source {self.source} is back", reconnects=back)
        self._source_seen = counts

    # ------------------------------------------------------------------------------ the serving loop

    def _serve(self) -> int:
        dev = self.dev
        assert dev is not None  # opened because hardware was given
        sess = self.serving
        info = sess.backend.info()
        if info["degraded"]:
            log.warning("running degraded: %s", info["degraded_reason"])
            self.emit("error", what="backend_degraded", message=info["degraded_reason"], model=sess.ref)
        try:
            timed_loop(sess.backend.run, sess.source.next, array("q"), _NEVER, RUN_WARMUP)  # never counted
        except SourceEnded as e:  # a finite source (video:PATH?loop=0) shorter than the warm-up
            log.info("source ended during warm-up: %s", e.message)
            return 0
        self._open_sink()
        if self.stop.is_set():  # stopped while loading: nothing ran, no window to report
            log.info("stopped before the first window")
            return 0
        # from here on at least one window (possibly partial, even empty) is emitted
        self.notifier.ready(self._status_text())
        mqtt = self.mqtt
        log.info("running %s %s (profile %s) on %s with %s; source %s; windows of %g s; telemetry %s",
                 sess.manifest.name, sess.manifest.version, sess.manifest.profile, info["engine"],
                 ", ".join(info["providers"]), self.source, self.window_s,
                 f"mqtt://{mqtt[0]}:{mqtt[1]}" if mqtt else ("custom sink" if self.sink else "offline"))
        slice_ns = int(SLICE_S * 1e9)
        clock = time.perf_counter_ns
        mono = time.monotonic_ns  # the power sampler's clock
        dev.read()  # baseline for the "has occurred" throttle bits
        run_end = clock() + int(self.duration * 1e9) if self.duration is not None else _NEVER
        finished = ended = False
        activator = self.activator
        while not finished:
            sess = self.serving
            run, next_feeds = sess.backend.run, sess.source.next
            info = sess.backend.info()
            lat = array("q")
            ts_start, cpu0, mono0, start = time.time(), cpu_seconds(), mono(), clock()
            win_end = min(start + int(self.window_s * 1e9), run_end)
            now = start
            while now < win_end and not self.stop.is_set():
                # while an activation is under way, look for its model twenty times as often (every 5 ms)
                step = slice_ns if activator is None or activator.idle.is_set() else slice_ns // 20
                try:
                    _, now = timed_loop(run, next_feeds, lat, min(win_end, now + step), _NEVER)
                except SourceEnded as e:  # end of a finite source, or stopped while reconnecting;
                    log.info("source ended: %s", e.message)  # latencies so far are kept in `lat`
                    ended, now = True, clock()
                    break
                self.notifier.watchdog()  # only after inferences returned: a hung runtime stops the pings
                if self.reload.is_set():
                    break
                if activator is not None and (activator.ready or not self.commands.empty()):
                    break  # end the window here: the next one is the new model's (or runs after the command)
            ts_end, cpu1, mono1 = time.time(), cpu_seconds(), mono()
            # the last window may be partial, even empty
            finished = ended or self.stop.is_set() or now >= run_end
            self._emit_window(sess, info, lat, ts_start, ts_end, cpu0, cpu1, mono0, mono1)
            if not finished:
                self._maybe_reload()
            if activator is not None and not finished:
                self._handle_commands()
                cand = activator.take()
                if cand is not None:
                    self._switch(cand)
                    self.notifier.status(self._status_text())
        return self.emitted

    def _status_text(self) -> str:
        if self.serving is None:
            return "no model yet: waiting for a bundle"
        m = self.serving.manifest
        return f"serving {m.name} {m.version} ({self.serving.backend.info()['engine']})"

    def _maybe_reload(self) -> None:
        """SIGHUP: re-read the config and apply what can change without dropping the model."""
        if not self.reload.is_set():
            return
        self.reload.clear()
        if self.reloader is None:
            log.warning("SIGHUP: no config file to reload (started without --config); nothing changed")
            return
        self.notifier.reloading("reloading the config")
        try:
            live = self.reloader()
        except EdgekitError as e:
            log.error("SIGHUP: the config was not reloaded, the agent goes on as it was: %s", e)
            self.emit("error", what="config_reload", message=e.message)
        else:
            if "window_s" in live and live["window_s"] is not None:
                self.window_s = float(live["window_s"])
            log.info("config reloaded (%s)", ", ".join(f"{k}={v}" for k, v in live.items()) or "nothing to apply")
        self.notifier.ready(self._status_text())

    def _emit_window(self, sess: Any, info: dict[str, Any], lat: array, ts_start: float, ts_end: float,
                     cpu0: float, cpu1: float, mono0: int, mono1: int) -> None:
        dev, sink, spooling = self.dev, self.sink, self.spooling
        assert dev is not None
        reading = dev.read()
        if spooling is not None:
            self.seq = spooling.next_seq
        window = build_window(
            device=self.device, seq=self.seq, ts_start=ts_start, ts_end=ts_end, model=sess.ref,
            backend_info=info, latencies_ns=lat, power=dev.window_power(mono0, mono1),
            temp_c=reading.temp_c, cpu_pct=100.0 * (cpu1 - cpu0) / max(ts_end - ts_start, 1e-9),
            rss_mb=rss_mb(), throttled=reading.throttled, dropped=sink.dropped if sink is not None else 0,
            cpu_mhz=reading.cpu_mhz,
            spool=None if spooling is None else (spooling.spool.depth(), spooling.spool.oldest_age_s()))
        self.seq += 1
        self.emitted += 1
        if self.state is not None and spooling is None:
            save_seq(self.state, self.seq)
        if reading.throttled:
            log.warning("throttling in window %d: %s", window["seq"], "; ".join(reading.reasons))
        self._source_events(sess.source)
        if sink is not None:
            sink.publish_window(window)  # the spooling sink stores it (and gives it its seq) first
        log.info("window %s%s", _summary(window), "" if spooling is None else _telemetry_note(spooling))
        if self.on_window is not None:
            self.on_window(window)


class _NoNotifier:
    """Stands in for ``sdnotify.Notifier`` outside systemd (and in tests)."""

    def ready(self, status: str | None = None) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...
    def reloading(self, status: str | None = None) -> None: ...
    def stopping(self, status: str | None = None) -> None: ...


def _source_counts(source: Any) -> tuple[int, int] | None:
    stats = getattr(source, "stats", None)
    if stats is None:
        return None
    st = stats()
    return int(st.get("reconnect_attempts", 0)), int(st.get("reconnects", 0))


def _health(model: Any, n: int) -> str | None:
    from edge_agent.activation import health_window

    return health_window(model, n)


def _slot_ref(slot: Any) -> dict[str, Any]:
    m = slot.manifest
    return {"name": m.name, "version": m.version, "sha256": m.files[m.model].sha256}
