"""One run of the agent (``service.run_agent`` builds it): the serving loop, and in store mode the model
store, activation, commands and events.

The loop runs slices of at most ``SLICE_S`` seconds of inferences (``service.timed_loop``); between slices
it feeds the systemd watchdog, looks at the stop and reload flags, and, in store mode, takes a smoke-tested
model from the activator (switch, health window, commit or roll back) and runs queued commands. MQTT
messages (commands, bundle chunks) arrive in paho's thread and are only verified and queued there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.errors import CommandError, EdgekitError, TransferError
from edge_agent.hardware import Device, DeviceOptions, open_device, resolve_device
from edge_agent.service import (
    _NEVER,
    RUN_WARMUP,
    SLICE_S,
    _summary,
    _telemetry_note,
    cpu_seconds,
    open_session,
    resolve_pubkey,
    rss_mb,
    save_seq,
    timed_loop,
)
from edge_agent.sources import SourceEnded
from edge_agent.stats import latency_summary_ms
from edge_agent.telemetry import TelemetrySink
from edge_agent.telemetry.mqtt import MqttPublisher, MqttSettings, group_deploy_topic, topics
from edge_agent.telemetry.schema import build_window
from edge_agent.telemetry.spool import Spool, SpoolingSink

log = logging.getLogger(__name__)


def failpoint(step: str) -> None:
    """Fault injection for the crash tests: ``EDGE_AGENT_FAILPOINT=<step>`` SIGKILLs the agent at that step
    of an activation (docs/deploy.md). Unset in normal operation."""
    if os.environ.get("EDGE_AGENT_FAILPOINT") == step:
        log.warning("failpoint %s: killing the agent (crash test)", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Agent:
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


class NoNotifier:
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
