"""The demo's digits model, made once per test session by running examples/make_digits_model.py.

It runs in a subprocess so TensorFlow is never imported into the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "make_digits_model.py"


def build_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(folder written by make_digits_model.py, its JSON summary)."""
    out = tmp_path_factory.mktemp("digits")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--seed", "0", "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"make_digits_model.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out, json.loads(proc.stdout.strip().splitlines()[-1])
