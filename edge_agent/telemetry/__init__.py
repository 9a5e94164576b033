"""Telemetry: the window schema (``schema``) and its delivery (``mqtt``; a durable spool comes later).

A ``TelemetrySink`` takes finished windows and events. It must never block or raise into the inference
loop: delivery problems are logged and counted, not thrown.
"""

from __future__ import annotations

from typing import Any, Protocol

from edge_agent.telemetry.schema import SCHEMA, build_window, validate_window

__all__ = ["SCHEMA", "TelemetrySink", "build_window", "validate_window"]


class TelemetrySink(Protocol):
    """Where finished windows go (MQTT today; a spool in front of it later)."""

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
