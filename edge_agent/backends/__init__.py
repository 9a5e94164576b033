"""Inference backends: one module per runtime behind the small ``Backend`` protocol.

The registry maps an engine name (``manifest.engine``) to the module that implements it. Modules are
imported only when a bundle needs them, so the agent never loads a runtime it does not use, and a missing
runtime package is a ``MissingDependencyError`` naming the extra to install.

A backend module exposes ``create(manifest, model_path, *, threads) -> Backend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import BackendError, InputError
from edge_agent.manifest import Manifest, TensorSpec

REGISTRY: dict[str, str] = {
    "onnxruntime": "edge_agent.backends.onnx",
    "litert": "edge_agent.backends.tflite",
}


class Backend(Protocol):
    """A loaded model, ready to run.

    ``info()`` returns at least ``{"engine", "providers_requested", "providers", "delegate", "degraded",
    "degraded_reason", "threads"}`` where ``providers`` are the ones really in use (for LiteRT: the
    delegates that took at least one node). LiteRT adds ``delegated_nodes`` / ``total_nodes`` ("N of M
    nodes delegated"), ``delegates``, ``runtime``, ``resized_inputs`` and ``reset_state``.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one inference; ``feeds`` in the order of ``inputs``; outputs in the order of ``outputs``."""
        ...

    def info(self) -> dict[str, Any]:
        ...

    def close(self) -> None:
        ...


def create_backend(manifest: Manifest, model_path: Path, *, threads: int | None = None) -> Backend:
    """Create the backend for ``manifest.engine`` with the runtime settings of ``manifest.runtime``.

    ``threads`` overrides ``runtime.threads`` (the profile's value) when given.
    """
    engine = manifest.engine
    if engine not in REGISTRY:
        raise BackendError(f"unknown engine {engine!r}; this edge-agent runs: {', '.join(sorted(REGISTRY))}",
                           hint="build the bundle for a profile whose runtime.engine this agent supports")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    module = importlib.import_module(REGISTRY[engine])
    return module.create(manifest, Path(model_path), threads=threads)
