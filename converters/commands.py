"""Send a signed command to a device over MQTT and wait for its answer (docs/deploy.md, "Signed commands").

``send_command`` subscribes to ``<prefix>/<device>/events`` first, then publishes the signed command
(``edge_agent.commands.build_command``) QoS 1 on ``<prefix>/<device>/cmd`` and waits for the device's
``command`` event with the same nonce, which it returns. With no answer in time it returns
``{"result": "timeout", ...}``: the command stays valid until it expires, so a device with a persistent
session that comes back before then still runs it (once).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

from converters.events import EventWaiter
from edge_agent.commands import DEFAULT_TTL_S, build_command
from edge_agent.errors import InputError
from edge_agent.signing import load_private_key
from edge_agent.telemetry.mqtt import MqttSettings, check_topic_part, topics


def send_command(host: str, port: int, device: str, action: str, args: Mapping[str, Any], *,
                 key_path: str | os.PathLike[str], prefix: str = "edgekit", settings: MqttSettings | None = None,
                 wait_s: float = 10.0, ttl_s: float = DEFAULT_TTL_S) -> dict[str, Any]:
    """Sign ``action``/``args`` for ``device``, publish it, and return the device's ``command`` event.

    The event has ``nonce``, ``action``, ``result`` (done, rejected, failed), ``reason`` and ``detail``.
    Without an answer within ``wait_s`` s: ``{"result": "timeout", "device", "action", "nonce", "expires",
    "waited_s", "no_subscribers", "message"}``. An unreachable or refusing broker is a ``BrokerError``;
    a bad key, action or arguments an ``InputError`` (nothing is sent).
    """
    check_topic_part(device, "device id")
    check_topic_part(prefix, "topic prefix")
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or wait_s < 0:
        raise InputError(f"wait time {wait_s!r} s must be a number >= 0", hint="e.g. 10")
    key = load_private_key(key_path)
    nonce = secrets.token_hex(16)
    issued = time.time()
    payload = build_command(key, device, action, args, ttl_s=ttl_s, now=issued, nonce=nonce)
    t = topics(prefix, device)
    with EventWaiter(host, port, [t["events"]], settings=settings) as waiter:
        published = waiter.publish(t["cmd"], payload)
        got = waiter.wait(lambda _topic, ev: ev.get("kind") == "command" and ev.get("nonce") == nonce, wait_s)
    if got is not None:
        return got[1]
    message = f"no answer from device {device!r} within {wait_s:g} s"
    if published.no_subscribers:
        message += (f"; nobody is subscribed to {t['cmd']} (the device is offline without a persistent session, "
                    "or runs without MQTT): it will not get this command")
    else:
        message += (f"; the command stays valid until it expires in {ttl_s:g} s from sending: a device that "
                    "reconnects before then still runs it, once")
    return {"result": "timeout", "device": device, "action": action, "nonce": nonce, "expires": issued + ttl_s,
            "waited_s": wait_s, "no_subscribers": published.no_subscribers, "message": message}
