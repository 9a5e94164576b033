"""The LiteRT backend: one TFLite ``Interpreter`` with the profile's delegates.

Runtime: ``ai_edge_litert.interpreter`` (LiteRT, the maintained successor of tflite-runtime); where only
``tflite_runtime`` exists (old Coral images) that is used instead, and ``info()["runtime"]`` says which
(``"ai-edge-litert 2.3.0"`` / ``"tflite-runtime 2.14.0"``). Neither is a ``MissingDependencyError`` naming
the ``tflite`` extra. TensorFlow itself is never imported.

Delegates (``manifest.runtime["delegates"]``, all reported by ``info()``, never silent):

* ``xnnpack`` — LiteRT's built-in CPU delegate, applied with ``num_threads``. It has no library of its own:
  it is switched on by building the interpreter with ``OpResolverType.BUILTIN`` (and off with
  ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` when the profile does not list it, so an empty list means LiteRT's
  plain built-in kernels). LiteRT applies it after the delegates below, to the nodes they left, whatever
  its place in the list;
* ``edgetpu`` — ``load_delegate("libedgetpu.so.1", {"device": runtime["edgetpu_device"]})`` when a device
  (``usb``, ``usb:N``, ``pci:N``) is set;
* ``gpu`` — no GPU delegate library exists for the Interpreter API of ai-edge-litert / tflite-runtime on
  Linux (LiteRT's GPU accelerator belongs to its CompiledModel API), so it is always reported as not
  loadable, with that explanation; a self-built GPU delegate exporting the external-delegate interface can
  be named with ``external:<path>``;
* ``external:<path>`` — ``load_delegate(path)``.

A delegate that cannot be loaded or applied: with ``runtime["cpu_fallback"]`` the model runs on the CPU
with XNNPACK and the backend is *degraded* (``degraded_reason`` names the library, the loader's error
text and ``firmware_notes/<profile>.md``); without it, a ``BackendError`` (exit code 1: a required
accelerator that is missing is a failure of the work, not bad input) with the same text and a hint.

A model compiled for the Edge TPU cannot run on the CPU at all (its ``edgetpu-custom-op`` needs libedgetpu):
such a bundle also ships the uncompiled full-int8 model as ``manifest.cpu_model``, and when the CPU fallback
is taken while the edgetpu delegate is not in use, that model is loaded in place of ``manifest.model`` (the
degraded reason says so).

A delegate that loads but takes none of the model's nodes is no more use than a missing one: when it is
the profile's *first* delegate the backend is degraded as well (an accelerator delegate, e.g. the Edge TPU
with a model not compiled by edgetpu_compiler, is a ``BackendError`` without ``cpu_fallback``; XNNPACK
taking nothing, e.g. tflite-runtime with an INT8 model, is only ever reported as degraded).

Node counts ("N of M nodes delegated"): ``total_nodes`` (M) comes from an interpreter built with
``BUILTIN_WITHOUT_DEFAULT_DELEGATES``, never allocated. In the delegated interpreter each ``DELEGATE`` node
is appended after the model's nodes and replaces a set of them; that set is found by walking back from the
delegate node's outputs to its inputs through the producers of the original nodes
(``nodes_taken_by_delegates``). Delegate nodes present right after construction belong to the loaded
delegates; those that appear with ``allocate_tensors()`` belong to XNNPACK.

Dynamic dimensions: an input whose signature has ``-1`` (e.g. a dynamic batch ``[-1, 42]``) is resized to
1 in that dimension with ``resize_tensor_input`` before allocation; ``info()["resized_inputs"]`` lists them.

Health check at load: ``allocate_tensors()`` and one ``invoke()`` on zeros (or on ``health_feeds``, e.g.
the bundle's golden input): an import that succeeds is no proof (tflite-runtime with numpy 2 imports but
cannot build an interpreter).

Stateful models: ``runtime["reset_state"] = true`` (default false) calls ``reset_all_variables()`` before
each ``run()``, so every sample starts from the model's initial state. It resets the model's *variable
tensors* (the state inputs of RNN/LSTM/SVDF ops) to zero; TFLite resource variables (VAR_HANDLE /
ASSIGN_VARIABLE) are not touched by LiteRT's reset.

Errors: a model LiteRT cannot parse is a ``ModelError``; a custom op the runtime lacks is a ``ModelError``
naming the op ("custom op SignalWindow is not available in this runtime").
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import BackendError, ModelError, missing_extra
from edge_agent.manifest import Manifest, TensorSpec

log = logging.getLogger(__name__)

XNNPACK = "xnnpack"
EDGETPU = "edgetpu"
GPU = "gpu"
EXTERNAL = "external:"
EDGETPU_LIBRARY = "libedgetpu.so.1"
# No GPU delegate library exists for the Interpreter API of ai-edge-litert / tflite-runtime on Linux.
GPU_LIBRARY: str | None = None
_DELEGATE_OP = "DELEGATE"
_UNRESOLVED_CUSTOM = re.compile(r"unresolved custom op:?\s*'?([^\s'.]+)", re.IGNORECASE)
_UNKNOWN_BUILTIN = re.compile(r"Didn't find op for builtin opcode '([^']+)' version '(\d+)'")


@dataclass(frozen=True)
class Runtime:
    """The imported interpreter module and its label (``"ai-edge-litert 2.3.0"``)."""

    module: Any
    label: str


def firmware_note(profile: str) -> str:
    """Where the board's setup notes live (drivers, libedgetpu, runtime builds)."""
    return f"firmware_notes/{profile}.md"


def _version(dist: str, package: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # e.g. a runtime built into the OS image, not pip-installed
        return str(getattr(importlib.import_module(package), "__version__", "unknown version"))


def load_runtime() -> Runtime:
    """``ai_edge_litert.interpreter``, else ``tflite_runtime.interpreter``; neither: MissingDependencyError."""
    try:
        mod = importlib.import_module("ai_edge_litert.interpreter")
        return Runtime(mod, f"ai-edge-litert {_version('ai-edge-litert', 'ai_edge_litert')}")
    except ImportError as litert_error:
        if getattr(litert_error, "name", None) not in ("ai_edge_litert", "ai_edge_litert.interpreter"):
            # installed but broken: say so, then try the fallback (whose use info() reports)
            log.warning("ai_edge_litert is installed but cannot be imported (%s); trying tflite_runtime",
                        litert_error)
        try:
            mod = importlib.import_module("tflite_runtime.interpreter")
        except ImportError as e:
            raise missing_extra("ai-edge-litert", "tflite", "running a TFLite bundle") from e
        return Runtime(mod, f"tflite-runtime {_version('tflite-runtime', 'tflite_runtime')}")


# --------------------------------------------------------------------------------------------------
# delegates: pure decisions


@dataclass(frozen=True)
class DelegateSpec:
    """One entry of ``runtime.delegates``: its name, the library to load (None for xnnpack) and options."""

    name: str
    library: str | None
    options: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        opts = ", ".join(f"{k} {v}" for k, v in self.options.items())
        lib = self.library or "built into LiteRT"
        return f"{self.name} delegate ({lib}{'; ' + opts if opts else ''})"


def parse_delegates(delegates: Any, runtime: dict[str, Any]) -> list[DelegateSpec]:
    """``runtime.delegates`` -> specs in the profile's order; unknown entries are a BackendError."""
    if delegates is None:
        return []
    if not isinstance(delegates, (list, tuple)) or not all(isinstance(d, str) for d in delegates):
        raise BackendError(f"runtime.delegates must be a list of names, got {delegates!r}",
                           hint="rebuild the bundle with a valid profile")
    specs: list[DelegateSpec] = []
    for d in delegates:
        if d == XNNPACK:
            specs.append(DelegateSpec(XNNPACK, None))
        elif d == EDGETPU:
            device = runtime.get("edgetpu_device") or ""
            specs.append(DelegateSpec(EDGETPU, EDGETPU_LIBRARY, {"device": str(device)} if device else {}))
        elif d == GPU:
            specs.append(DelegateSpec(GPU, GPU_LIBRARY))
        elif d.startswith(EXTERNAL) and len(d) > len(EXTERNAL):
            specs.append(DelegateSpec(d, d[len(EXTERNAL):]))
        else:
            raise BackendError(f"runtime.delegates: {d!r} is not one of xnnpack, edgetpu, gpu, external:<path>",
                               hint="rebuild the bundle with a valid profile")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BackendError(f"runtime.delegates lists a delegate twice: {names}",
                           hint="rebuild the bundle with a valid profile")
    return specs


def nodes_taken_by_delegates(ops: Sequence[dict[str, Any]], model_nodes: int) -> dict[int, set[int]]:
    """For each DELEGATE node of a delegated interpreter, the indices of the model's nodes it replaced.

    ``ops`` is ``interpreter._get_ops_details()``: the model's own nodes come first (indices
    ``0 .. model_nodes-1``, still listed after delegation), delegate nodes are appended. A delegate node's
    inputs are the tensors its partition reads from outside, its outputs those it hands on; the partition is
    every model node reached walking back from the outputs through tensor producers, stopping at the inputs.
    """
    producer: dict[int, int] = {}
    for op in ops[:model_nodes]:
        for t in op["outputs"]:
            if t >= 0:
                producer[int(t)] = int(op["index"])
    by_index = {int(op["index"]): op for op in ops[:model_nodes]}
    taken: dict[int, set[int]] = {}
    for op in ops[model_nodes:]:
        if op["op_name"] != _DELEGATE_OP:
            continue
        boundary = {int(t) for t in op["inputs"] if t >= 0}
        nodes: set[int] = set()
        stack = [producer[int(t)] for t in op["outputs"] if int(t) in producer]
        while stack:
            n = stack.pop()
            if n in nodes:
                continue
            nodes.add(n)
            for t in by_index[n]["inputs"]:
                t = int(t)
                if t >= 0 and t not in boundary and t in producer:
                    stack.append(producer[t])
        taken[int(op["index"])] = nodes
    return taken


def unresolved_op(message: str) -> str | None:
    """The op named in LiteRT's "Encountered unresolved custom op: SignalWindow." message, if any."""
    m = _UNRESOLVED_CUSTOM.search(message)
    return m.group(1) if m else None


def _concrete(shape: Iterable[int]) -> list[int]:
    return [1 if int(d) < 0 else int(d) for d in shape]


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


# --------------------------------------------------------------------------------------------------
# the backend


class TFLiteBackend:
    """A LiteRT interpreter with the profile's delegates (see the module docstring for every decision)."""

    def __init__(self, model_path: Path, *, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 runtime: dict[str, Any], profile: str, threads: int | None = None,
                 health_feeds: Sequence[np.ndarray] | None = None, cpu_model_path: Path | None = None) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self._interp: Any = None
        self._delegates: list[Any] = []
        rt = load_runtime()
        self._rt = rt
        self._profile = profile
        specs = parse_delegates(runtime.get("delegates"), runtime)
        cpu_fallback = bool(runtime.get("cpu_fallback", False))
        reset_state = runtime.get("reset_state", False)
        if not isinstance(reset_state, bool):
            raise BackendError(f"runtime.reset_state must be true or false, got {reset_state!r}",
                               hint="rebuild the bundle with a valid runtime section")
        n_threads = threads if threads is not None else int(runtime.get("threads") or 1)
        if n_threads < 1:
            raise BackendError(f"runtime.threads must be at least 1, got {n_threads}",
                               hint="rebuild the bundle with a valid profile, or pass --threads")
        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelError(f"model file {model_path} does not exist", hint="rebuild the bundle with edgekit")
        if cpu_model_path is not None and not Path(cpu_model_path).is_file():
            raise ModelError(f"CPU model file {cpu_model_path} does not exist",
                             hint="rebuild the bundle with edgekit")
        resolver = rt.module.OpResolverType

        # 1. the delegates with a library, in the profile's order
        loaded: list[tuple[DelegateSpec, Any]] = []
        failures: list[str] = []
        for spec in specs:
            if spec.name == GPU:
                failures.append(f"{spec.name}: no GPU delegate library exists for {rt.label} on Linux "
                                "(its GPU accelerator belongs to the CompiledModel API, not the Interpreter)")
                continue
            if spec.name == XNNPACK:
                continue
            try:
                loaded.append((spec, self._load_delegate(spec)))
            except BackendError as e:
                failures.append(e.message)
        want_xnnpack = any(s.name == XNNPACK for s in specs)
        reason = self._decide(failures, specs, cpu_fallback, profile)
        use_xnnpack = want_xnnpack or reason is not None  # the CPU fallback runs with XNNPACK
        if reason is not None:
            model_path, reason = self._cpu_model(model_path, cpu_model_path, specs, loaded, reason)

        # 2. the model alone: parses it, checks it against the manifest and counts its nodes (M)
        self._in_idx, self._out_idx, dynamic, total_nodes = self._inspect(model_path, n_threads)

        # 3. the interpreter that will run, delegates applied
        kind = resolver.BUILTIN if use_xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            interp = self._build(model_path, n_threads, kind, [d for _, d in loaded], applying=loaded)
        except BackendError as e:
            if not loaded:
                raise
            reason = self._decide([e.message], specs, cpu_fallback, profile)
            loaded, use_xnnpack = [], True
            assert reason is not None
            cpu_path, reason = self._cpu_model(model_path, cpu_model_path, specs, loaded, reason)
            if cpu_path != model_path:
                model_path = cpu_path
                self._in_idx, self._out_idx, dynamic, total_nodes = self._inspect(model_path, n_threads)
            interp = self._build(model_path, n_threads, resolver.BUILTIN, [])
        self._interp = interp
        self._delegates = [d for _, d in loaded]  # kept alive as long as the interpreter
        explicit_nodes = {int(op["index"]) for op in interp._get_ops_details() if op["op_name"] == _DELEGATE_OP}

        resized: dict[str, list[int]] = {}
        for name, (idx, sig) in dynamic.items():
            shape = _concrete(sig)
            try:
                interp.resize_tensor_input(idx, shape)
            except (ValueError, RuntimeError) as e:
                raise ModelError(f"cannot fix the dynamic input {name!r} {list(sig)} to {shape}: {_short(e)}",
                                 hint="rebuild the model with a fixed batch size of 1") from e
            resized[name] = shape
        self._allocate(interp, model_path)

        # 4. who took which nodes
        taken = nodes_taken_by_delegates(interp._get_ops_details(), total_nodes)
        by_explicit = sum(len(v) for k, v in taken.items() if k in explicit_nodes)
        by_xnnpack = sum(len(v) for k, v in taken.items() if k not in explicit_nodes)
        delegates_info: list[dict[str, Any]] = []
        if loaded:
            name = "+".join(s.name for s, _ in loaded)  # several loaded delegates share one count
            delegates_info.append({"name": name, "library": ", ".join(str(s.library) for s, _ in loaded),
                                   "nodes": by_explicit})
        if use_xnnpack:
            delegates_info.append({"name": XNNPACK, "library": None, "nodes": by_xnnpack})
        in_use = [d["name"] for d in delegates_info if d["nodes"] > 0]
        delegated = by_explicit + by_xnnpack
        if reason is None and specs and total_nodes > 0:
            reason = self._idle_first_delegate(specs[0], loaded, by_explicit, by_xnnpack, total_nodes,
                                               cpu_fallback, model_path)

        self._reset = interp.reset_all_variables if reset_state else None
        self._set, self._invoke, self._get = interp.set_tensor, interp.invoke, interp.get_tensor
        self._health_check(health_feeds, model_path)
        self._info: dict[str, Any] = {
            "engine": "litert",
            "engine_version": rt.label.split(" ", 1)[1],
            "runtime": rt.label,
            "providers_requested": [s.name for s in specs],
            "providers": in_use,
            "delegate": in_use[0] if in_use else None,
            "delegates": delegates_info,
            "delegated_nodes": delegated,
            "total_nodes": total_nodes,
            "degraded": reason is not None,
            "degraded_reason": reason,
            "threads": n_threads,
            "resized_inputs": resized,
            "reset_state": reset_state,
        }

    # ---- construction helpers

    def _inspect(self, model_path: Path, threads: int) -> tuple[list[int], list[int], dict[str, tuple[int, Any]],
                                                                int]:
        """The model alone (no delegate, not allocated): I/O indices checked against the manifest, the dynamic
        inputs, and its node count M."""
        plain = self._build(model_path, threads, self._rt.module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                            [])
        try:
            in_idx, out_idx, dynamic = self._match_io(plain, model_path)
            return in_idx, out_idx, dynamic, len(plain._get_ops_details())
        finally:
            del plain

    @staticmethod
    def _cpu_model(model_path: Path, cpu_model_path: Path | None, specs: list[DelegateSpec],
                   loaded: list[tuple[DelegateSpec, Any]], reason: str) -> tuple[Path, str]:
        """(the model to run, the degraded reason) once the CPU fallback was decided.

        A model compiled for the Edge TPU cannot run without it (its ``edgetpu-custom-op`` needs libedgetpu):
        when the edgetpu delegate is not in use and the bundle has a ``cpu_model``, that model runs instead.
        """
        wanted = any(s.name == EDGETPU for s in specs)
        in_use = any(s.name == EDGETPU for s, _ in loaded)
        if cpu_model_path is None or not wanted or in_use:
            return model_path, reason
        cpu_model_path = Path(cpu_model_path)
        log.warning("the Edge TPU delegate is not in use: running %s in place of %s", cpu_model_path.name,
                    model_path.name)
        return cpu_model_path, (f"{reason}; the bundle's CPU model {cpu_model_path.name} (not compiled for the "
                                f"Edge TPU) runs in place of {model_path.name}, which needs the Edge TPU")

    def _build(self, model_path: Path, threads: int, resolver: Any, delegates: list[Any],
               applying: list[tuple[DelegateSpec, Any]] | None = None) -> Any:
        try:
            return self._rt.module.Interpreter(model_path=str(model_path), num_threads=threads,
                                               experimental_delegates=delegates or None,
                                               experimental_op_resolver_type=resolver)
        except ImportError as e:  # tflite-runtime built for numpy 1 under numpy 2: "_ARRAY_API not found"
            raise BackendError(f"{self._rt.label} cannot build an interpreter: {_short(e)}",
                               hint="tflite-runtime needs numpy<2; install ai-edge-litert instead "
                                    "(pip install 'edgekit[tflite]')") from e
        except (ValueError, RuntimeError) as e:
            if applying:
                names = ", ".join(s.describe() for s, _ in applying)
                raise BackendError(f"{names} loaded but could not be applied to {model_path.name}: {_short(e)}",
                                   hint=f"see {firmware_note(self._profile)}") from e
            raise ModelError(f"{self._rt.label} cannot load the model {model_path.name}: {_short(e)}",
                             hint="the model file is corrupt or truncated, or not a .tflite flatbuffer; "
                                  "rebuild the bundle and copy it again") from e

    def _load_delegate(self, spec: DelegateSpec) -> Any:
        lib = str(spec.library)
        try:
            handle = ctypes.CDLL(lib)
        except OSError as e:
            raise BackendError(f"{spec.describe()} cannot be loaded: {e}") from e
        if not hasattr(handle, "tflite_plugin_create_delegate"):
            raise BackendError(f"{spec.describe()}: {lib} is not a TFLite delegate (it does not export "
                               "tflite_plugin_create_delegate)")
        try:
            return self._rt.module.load_delegate(lib, options=spec.options or None)
        except (OSError, ValueError, RuntimeError) as e:
            raise BackendError(f"{spec.describe()} was found but refused to start: {_short(e)}") from e

    @staticmethod
    def _decide(failures: list[str], specs: list[DelegateSpec], cpu_fallback: bool, profile: str) -> str | None:
        """None when every delegate is in place; the degraded reason with cpu_fallback; else BackendError."""
        if not failures:
            return None
        note = firmware_note(profile)
        what = "; ".join(failures)
        if not cpu_fallback:
            raise BackendError(
                f"a delegate requested by profile {profile!r} is not available: {what}",
                hint=f"set up the accelerator and its library as described in {note} (is it plugged in?), "
                     "or set runtime.cpu_fallback = true in the profile to run on the CPU (reported as degraded)")
        return f"{what}; running on the CPU with XNNPACK (see {note})"

    def _idle_first_delegate(self, first: DelegateSpec, loaded: list[tuple[DelegateSpec, Any]],
                             by_explicit: int, by_xnnpack: int, total_nodes: int, cpu_fallback: bool,
                             model_path: Path) -> str | None:
        """The degraded reason when the profile's first delegate is in place but took no node, else None.

        An accelerator delegate that takes nothing (e.g. a model not compiled for the Edge TPU) is treated
        like a missing one (``BackendError`` without ``cpu_fallback``); XNNPACK taking nothing (unsupported
        ops or dynamic shapes, or tflite-runtime with an INT8 model) is reported as degraded, never an error.
        """
        if first.name == XNNPACK:
            took = by_xnnpack
        elif any(s.name == first.name for s, _ in loaded):
            took = by_explicit
        else:
            return None
        if took > 0:
            return None
        note = firmware_note(self._profile)
        what = f"the {first.name} delegate took none of the {total_nodes} nodes of {model_path.name}"
        if first.name == XNNPACK:
            log.warning("%s (%s): it runs on the built-in kernels", what, self._rt.label)
            return (f"{what} ({self._rt.label}); running on LiteRT's built-in CPU kernels (unsupported ops or "
                    f"dynamic shapes; tflite-runtime does not delegate INT8 models) (see {note})")
        hint = ("compile the model for the Edge TPU with edgetpu_compiler before packaging it"
                if first.name == EDGETPU else "check that the delegate supports this model's ops")
        if not cpu_fallback:
            raise BackendError(f"{what}: it would all run on the CPU", hint=f"{hint}; see {note}, or set "
                               "runtime.cpu_fallback = true to accept the CPU (reported as degraded)")
        cpu = f"XNNPACK ({by_xnnpack} nodes)" if by_xnnpack else "LiteRT's built-in kernels"
        return f"{what} ({hint}); running on the CPU with {cpu} (see {note})"

    def _match_io(self, interp: Any, model_path: Path) -> tuple[list[int], list[int], dict[str, tuple[int, Any]]]:
        """Tensor indices in manifest order, and the inputs with a dynamic dimension (name -> (index, sig))."""
        got_in = {d["name"]: d for d in interp.get_input_details()}
        got_out = {d["name"]: d for d in interp.get_output_details()}
        want_in = [t.name for t in self.inputs]
        want_out = [t.name for t in self.outputs]
        if not set(want_in) <= set(got_in) or not set(want_out) <= set(got_out) or len(want_in) != len(got_in):
            raise ModelError(
                f"model {model_path.name} does not match its manifest: inputs {sorted(got_in)} / outputs "
                f"{sorted(got_out)}, manifest says {sorted(want_in)} / {sorted(want_out)}",
                hint="rebuild the bundle with edgekit")
        dynamic: dict[str, tuple[int, Any]] = {}
        for spec in (*self.inputs, *self.outputs):
            d = got_in.get(spec.name) or got_out[spec.name]
            sig = [int(x) for x in d.get("shape_signature", d["shape"])]
            dtype = np.dtype(d["dtype"]).name
            fits = len(sig) == len(spec.shape) and all(
                a == b or a < 0 or b < 0 for a, b in zip(sig, spec.shape, strict=True))
            if dtype != spec.dtype or not fits:
                raise ModelError(f"model {model_path.name}: tensor {spec.name!r} is {dtype} {sig}, the manifest "
                                 f"says {spec.dtype} {list(spec.shape)}", hint="rebuild the bundle with edgekit")
            scale, zero_point = d.get("quantization", (0.0, 0))
            if spec.scale is not None and (not np.isclose(spec.scale, scale, rtol=1e-6, atol=0.0)
                                           or spec.zero_point != zero_point):
                raise ModelError(f"model {model_path.name}: tensor {spec.name!r} is quantized with scale {scale} "
                                 f"zero point {zero_point}, the manifest says {spec.scale} {spec.zero_point}",
                                 hint="rebuild the bundle with edgekit")
            if spec.name in got_in and any(x < 0 for x in sig):
                dynamic[spec.name] = (int(d["index"]), sig)
        return ([int(got_in[n]["index"]) for n in want_in], [int(got_out[n]["index"]) for n in want_out], dynamic)

    def _allocate(self, interp: Any, model_path: Path) -> None:
        try:
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as e:
            text = _short(e)
            op = unresolved_op(text)
            if op is not None:
                hint = ("this model was compiled for the Edge TPU: it runs only with libedgetpu and the "
                        "accelerator (delegates = [\"edgetpu\"])" if op.startswith("edgetpu")
                        else "the op exists only in the runtime the model was made for (e.g. tflite-micro); "
                             "run the model there, or rebuild it from built-in TFLite ops")
                raise ModelError(f"custom op {op} is not available in this runtime ({self._rt.label}); "
                                 f"model {model_path.name} needs it", hint=hint) from e
            m = _UNKNOWN_BUILTIN.search(text)
            if m is not None:
                raise ModelError(f"op {m.group(1)} version {m.group(2)} of model {model_path.name} is not "
                                 f"supported by {self._rt.label}",
                                 hint="upgrade ai-edge-litert on the device, or convert the model with an "
                                      "older converter") from e
            raise ModelError(f"{self._rt.label} cannot prepare the model {model_path.name}: {text}",
                             hint="the model uses ops or shapes this runtime cannot run; rebuild it") from e

    def _health_check(self, feeds: Sequence[np.ndarray] | None, model_path: Path) -> None:
        if feeds is None:
            feeds = [np.zeros(_concrete(t["shape"]), t["dtype"]) for t in self._input_details()]
        try:
            self.run(feeds)
        except BackendError as e:
            raise BackendError(f"{self._rt.label} built the interpreter for {model_path.name} but its first "
                               f"inference failed: {e.message}",
                               hint=f"check the runtime setup in {firmware_note(self._profile)}") from e
        self._interp.reset_all_variables()  # the health check leaves no state behind

    def _input_details(self) -> list[dict[str, Any]]:
        by_index = {int(d["index"]): d for d in self._interp.get_input_details()}
        return [by_index[i] for i in self._in_idx]

    # ---- the Backend protocol

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Set every input, invoke, return a copy of every output (manifest order)."""
        try:
            if self._reset is not None:
                self._reset()
            for i, x in zip(self._in_idx, feeds, strict=True):
                self._set(i, x)
            self._invoke()
            return [self._get(i) for i in self._out_idx]
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"inference failed: {_short(e)}",
                               hint="check that the input source matches the model's inputs") from e

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        # the bound methods hold the interpreter; the interpreter goes before the delegates it uses
        self._set = self._invoke = self._get = self._reset = None  # type: ignore[assignment]
        self._interp = None
        self._delegates = []


def create(manifest: Manifest, model_path: Path, *, threads: int | None = None,
           health_feeds: Sequence[np.ndarray] | None = None) -> TFLiteBackend:
    """Registry entry point (see edge_agent.backends.create_backend)."""
    return TFLiteBackend(model_path, inputs=manifest.inputs, outputs=manifest.outputs,
                         runtime=dict(manifest.runtime), profile=manifest.profile, threads=threads,
                         health_feeds=health_feeds, cpu_model_path=_member_beside(manifest, model_path))


def _member_beside(manifest: Manifest, model_path: Path) -> Path | None:
    """The path of ``manifest.cpu_model`` in the folder that holds ``manifest.model`` at ``model_path``."""
    if manifest.cpu_model is None:
        return None
    root = Path(model_path)
    for _ in manifest.model.split("/"):
        root = root.parent
    return root.joinpath(*manifest.cpu_model.split("/"))
