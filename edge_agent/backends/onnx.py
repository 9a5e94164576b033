"""The onnxruntime backend: one ``InferenceSession`` with the profile's execution providers.

Decisions (all reported by ``info()``, never silent):

* providers are tried in the profile's order; a provider this onnxruntime build does not have is dropped
  when ``cpu_fallback`` is true (the session is then *degraded*, with a reason naming the provider and the
  board's firmware note), and is a ``BackendError`` when it is false;
* after the session is created, ``session.get_providers()`` tells what really runs: if the first requested
  provider is not among them the session is degraded as well (or an error without ``cpu_fallback``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import BackendError, ModelError, missing_extra
from edge_agent.manifest import Manifest, TensorSpec

CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GRAPH_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise missing_extra("onnxruntime", "onnx", "running an ONNX bundle") from e
    return onnxruntime


def firmware_note(profile: str) -> str:
    """Where the board's setup notes live (drivers, runtime builds)."""
    return f"firmware_notes/{profile}.md"


def choose_providers(requested: Sequence[str], available: Sequence[str], *, cpu_fallback: bool,
                     profile: str) -> tuple[list[str], str | None]:
    """The providers to pass to the session, and the degraded reason (None when nothing was dropped).

    Pure decision logic: a requested provider missing from ``available`` is dropped (with CPU appended
    if needed) when ``cpu_fallback`` is true; otherwise it is a ``BackendError``.
    """
    requested = list(requested) or [CPU]
    missing = [p for p in requested if p not in available]
    if not missing:
        return requested, None
    note = firmware_note(profile)
    names = ", ".join(missing)
    if not cpu_fallback:
        raise BackendError(
            f"execution provider {names} requested by profile {profile!r} is not available in this "
            f"onnxruntime build (available: {', '.join(available) or 'none'})",
            hint=f"install the onnxruntime build for the board as described in {note}, or set "
                 "runtime.cpu_fallback = true in the profile to run on CPU (reported as degraded)",
        )
    use = [p for p in requested if p in available]
    if CPU not in use:
        use.append(CPU)
    reason = (f"{names} not available in this onnxruntime build; running on {', '.join(use)} "
              f"(see {note})")
    return use, reason


def provider_options(providers: Sequence[str], runtime: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-provider options, in the order of ``providers`` (TensorRT: engine cache, fp16, int8)."""
    out: list[dict[str, Any]] = []
    for p in providers:
        opts: dict[str, Any] = {}
        if p == TENSORRT:
            cache = runtime.get("trt_cache_dir") or ""
            if cache:
                opts["trt_engine_cache_enable"] = True
                opts["trt_engine_cache_path"] = str(cache)
            if runtime.get("trt_fp16"):
                opts["trt_fp16_enable"] = True
            if runtime.get("trt_int8"):  # QDQ models carry their own scales: no calibration table is used
                opts["trt_int8_enable"] = True
        out.append(opts)
    return out


class OnnxBackend:
    """An onnxruntime session (see module docstring for the provider decisions)."""

    def __init__(self, model_path: Path, *, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 runtime: dict[str, Any], profile: str, threads: int | None = None) -> None:
        ort = _ort()
        self.inputs = inputs
        self.outputs = outputs
        requested = list(runtime.get("providers") or [CPU])
        cpu_fallback = bool(runtime.get("cpu_fallback", False))
        providers, reason = choose_providers(requested, ort.get_available_providers(),
                                             cpu_fallback=cpu_fallback, profile=profile)
        level = runtime.get("graph_optimization", "all")
        if level not in GRAPH_OPT_LEVELS:
            raise BackendError(f"runtime.graph_optimization {level!r} is not one of "
                               f"{', '.join(GRAPH_OPT_LEVELS)}", hint="rebuild the bundle with a valid profile")
        n_threads = threads if threads is not None else int(runtime.get("threads") or 0)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPT_LEVELS[level])
        so.intra_op_num_threads = n_threads
        so.log_severity_level = 3  # errors only: the agent reports fallbacks itself
        options = provider_options(providers, runtime)
        if TENSORRT in providers and runtime.get("trt_cache_dir"):
            try:
                Path(runtime["trt_cache_dir"]).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BackendError(f"cannot create the TensorRT engine cache {runtime['trt_cache_dir']}: "
                                   f"{e.strerror}", hint="create it writable for the agent's user") from e
        self._session = self._open(ort, model_path, so, providers, options, profile)
        in_use = list(self._session.get_providers())
        if requested[0] not in in_use:
            why = (f"{requested[0]} was requested first but the session runs on {', '.join(in_use)} "
                   f"(see {firmware_note(profile)})")
            if not cpu_fallback:
                self._session = None
                raise BackendError(f"onnxruntime could not use {requested[0]}: {why}",
                                   hint="check the accelerator's drivers, or set runtime.cpu_fallback = true")
            reason = reason or why
        self._check_io(model_path)
        self._errors = _ort_errors(ort)
        self._in_names = [t.name for t in inputs]
        self._out_names = [t.name for t in outputs]
        self._info = {
            "engine": "onnxruntime",
            "engine_version": ort.__version__,
            "providers_requested": requested,
            "providers": in_use,
            "delegate": None,
            "degraded": reason is not None,
            "degraded_reason": reason,
            "threads": n_threads or None,  # None: onnxruntime's default (one per physical core)
            "graph_optimization": level,
        }

    @staticmethod
    def _open(ort: Any, model_path: Path, so: Any, providers: list[str], options: list[dict[str, Any]],
              profile: str) -> Any:
        state = ort.capi.onnxruntime_pybind11_state
        try:
            return ort.InferenceSession(str(model_path), sess_options=so, providers=providers,
                                        provider_options=options)
        except (state.InvalidProtobuf, state.InvalidGraph, state.NoSuchFile, state.NotImplemented,
                state.NoModel) as e:
            raise ModelError(f"onnxruntime cannot load the model {model_path.name}: {_short(e)}",
                             hint="the model file is corrupt or uses an op/opset this onnxruntime does not "
                                  "support; rebuild the bundle, or upgrade onnxruntime on the device") from e
        except (state.Fail, state.RuntimeException, state.EPFail, state.InvalidArgument,
                state.EngineError) as e:
            raise BackendError(f"onnxruntime could not create a session for {model_path.name} with "
                               f"{', '.join(providers)}: {_short(e)}",
                               hint=f"check the runtime setup in {firmware_note(profile)}") from e

    def _check_io(self, model_path: Path) -> None:
        got_in = {i.name for i in self._session.get_inputs()}
        got_out = {o.name for o in self._session.get_outputs()}
        want_in = {t.name for t in self.inputs}
        want_out = {t.name for t in self.outputs}
        if not want_in <= got_in or not want_out <= got_out:
            raise ModelError(
                f"model {model_path.name} does not match its manifest: inputs {sorted(got_in)} / outputs "
                f"{sorted(got_out)}, manifest says {sorted(want_in)} / {sorted(want_out)}",
                hint="rebuild the bundle with edgekit")

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(self._out_names, dict(zip(self._in_names, feeds, strict=True)))
        except self._errors as e:
            raise BackendError(f"inference failed: {_short(e)}",
                               hint="check that the input source matches the model's inputs") from e

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        self._session = None


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (pybind11 classes, not RuntimeError subclasses)."""
    state = ort.capi.onnxruntime_pybind11_state
    found = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return found or (RuntimeError,)


def _short(e: BaseException) -> str:
    text = str(e).strip()
    return text.replace("[ONNXRuntimeError] : ", "")[:500]


def create(manifest: Manifest, model_path: Path, *, threads: int | None = None) -> OnnxBackend:
    """Registry entry point (see edge_agent.backends.create_backend)."""
    return OnnxBackend(model_path, inputs=manifest.inputs, outputs=manifest.outputs,
                       runtime=dict(manifest.runtime), profile=manifest.profile, threads=threads)
