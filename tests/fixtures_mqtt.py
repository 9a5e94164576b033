"""MQTT fixtures; a test module imports them explicitly:

    from tests.fixtures_mqtt import broker  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mosquitto import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free loopback port, stopped after the test (only this one)."""
    b = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield b
    finally:
        b.stop()
