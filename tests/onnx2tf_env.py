"""The real onnx2tf tool environment as a session fixture, shared by the tests that need it (marks ``slow`` and
``onnx2tf``): built once per machine in ~/.cache/edgekit (about 1.5 min and 2.6 GB the first time), reused
afterwards. A test module binds it under its own name: ``onnx2tf_python = onnx2tf_env.onnx2tf_python``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from converters import onnx2tf_tool as o2t
from edge_agent.errors import ConversionError, InputError


@pytest.fixture(scope="session")
def onnx2tf_python() -> Path:
    """The Python of the real tool environment (default location), built when missing; skips when this Python
    or pip cannot build it."""
    t0 = time.perf_counter()
    built = not o2t.installed()
    try:
        py = o2t.ensure_env()
    except InputError as e:  # this Python cannot build it (version)
        pytest.skip(f"cannot build the onnx2tf environment with {sys.executable}: {e.message}")
    except ConversionError as e:
        if "(step: pip install)" in e.message or "(step: venv)" in e.message:
            pytest.skip(f"pip cannot install the onnx2tf pins here: {e.message.splitlines()[-2:]}")
        raise
    if built:
        print(f"\nonnx2tf environment built in {time.perf_counter() - t0:.1f} s at {o2t.default_env_dir()}")
    return py
