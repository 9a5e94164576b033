"""Telemetry: the window schema (``schema``), the durable spool (``spool``) and delivery (``mqtt``).

A ``TelemetrySink`` takes finished windows and events. It must never block or raise into the inference
loop: delivery problems are logged and counted, not thrown.
"""

from __future__ import annotations

from typing import Any, Protocol

from edge_agent.telemetry.schema import SCHEMA, build_window, validate_window

__all__ = ["SCHEMA", "TelemetrySink", "build_window", "validate_window"]


class TelemetrySink(Protocol):
    """Where finished windows go (``MqttPublisher``, or ``SpoolingSink``: the spool in front of it)."""

    @property
    def dropped(self) -> int:
        """Windows this sink had to drop (reported in the next window's ``dropped``)."""
        ...

    def publish_window(self, window: dict[str, Any]) -> None:
        ...

    def publish_event(self, kind: str, **fields: Any) -> None:
        ...

    def close(self, timeout: float = 5.0) -> None:
        ...
