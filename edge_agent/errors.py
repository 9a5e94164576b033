"""The project's own errors.

Every error carries a message (what was wrong, and where) and a hint (what to do). Third-party
exceptions are wrapped (``raise BundleError(...) from e``) so a user never sees a bare traceback from
onnxruntime, tarfile or cryptography.

Exit codes of both CLIs follow the class: ``exit_code = 2`` for bad usage or bad input (the user can fix
the call), ``1`` for a failure of the work itself.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message

    def to_dict(self) -> dict[str, str | None]:
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint}


class InputError(EdgekitError):
    """Bad input the user can fix: a missing file, a wrong argument, a malformed source."""

    exit_code = 2


class ProfileError(InputError):
    """A device profile is missing, unknown, or does not validate."""


class BundleError(InputError):
    """A bundle is malformed, tampered with, unsigned, or signed with another key.

    ``reason`` is a short stable code for scripts and events: malformed, schema, truncated, tampered,
    unsigned, bad_signature, unsafe_path, link_member, device_member, too_large, missing_member,
    extra_member, not_found, dest_exists, io_error; unsafe_delegate (activation: an external delegate
    library where bundles are written). docs/bundle.md says what each one means.
    """

    def __init__(self, message: str, hint: str | None = None, reason: str = "malformed") -> None:
        super().__init__(message, hint)
        self.reason = reason

    def to_dict(self) -> dict[str, str | None]:
        return {**super().to_dict(), "reason": self.reason}


class KeyFileError(InputError):
    """A signing or verifying key is missing, malformed, or has unsafe permissions."""


class ModelError(InputError):
    """A model file cannot be read or run (not a model, unsupported opset, unknown op)."""


class CalibrationError(InputError):
    """A calibration or validation source is empty, unreadable, or of the wrong shape."""


class SourceError(InputError):
    """An inference input source cannot be opened or gives data of the wrong shape."""


class MissingDependencyError(InputError):
    """An optional package is not installed; the hint names the extra to install."""


class BackendError(EdgekitError):
    """A runtime could not be created or failed while running."""


class ConversionError(EdgekitError):
    """A conversion or quantization step failed."""


class GateError(ConversionError):
    """The quantized model failed the accuracy gate, and no rung of the recovery ladder passed it.

    ``attempts`` is the table of what was tried (one dict per rung: rung, settings, metric, value,
    threshold, passed, seconds) and ``worst_layers`` the layers with the largest quantization error
    (name, error in dB, nodes); both are JSON-safe and part of ``to_dict()``. No bundle was written.
    """

    def __init__(self, message: str, hint: str | None = None, attempts: list[dict] | None = None,
                 worst_layers: list[dict] | None = None) -> None:
        super().__init__(message, hint)
        self.attempts = list(attempts or [])
        self.worst_layers = list(worst_layers or [])

    def to_dict(self) -> dict:  # type: ignore[override]
        return {**super().to_dict(), "attempts": self.attempts, "worst_layers": self.worst_layers}


class TelemetryError(EdgekitError):
    """Telemetry could not be built or delivered."""


def missing_extra(package: str, extra: str, what: str) -> MissingDependencyError:
    """The error for an optional package that is not installed."""
    return MissingDependencyError(
        f"{what} needs the Python package '{package}', which is not installed",
        hint=f"pip install 'edgekit[{extra}]'",
    )


class CommandError(EdgekitError):
    """A signed command was refused by the device (``edge_agent/commands.py``); nothing was executed.

    ``reason`` is a short stable code for scripts and events: malformed, bad_signature, unsigned,
    wrong_device, expired, not_yet_valid, lifetime, replayed, unknown_action, bad_args (docs/deploy.md).
    ``nonce`` and ``action`` are the command's when they could be read (only to match the answer to the
    request: for unsigned and bad_signature they come from an unverified body), else None.
    """

    def __init__(self, message: str, hint: str | None = None, reason: str = "malformed", *,
                 nonce: str | None = None, action: str | None = None) -> None:
        super().__init__(message, hint)
        self.reason = reason
        self.nonce = nonce
        self.action = action

    def to_dict(self) -> dict[str, str | None]:
        return {**super().to_dict(), "reason": self.reason, "nonce": self.nonce, "action": self.action}


class TransferError(EdgekitError):
    """A bundle transfer (MQTT chunks, ``edge_agent/transfer.py``) was refused or could not be stored.

    ``reason`` is a short stable code for scripts and events: ``malformed`` (no JSON header line),
    ``schema`` (unknown schema, missing/unknown keys, wrong types, bad hex, unsafe name), ``too_large``
    (chunk over 1 MiB or bundle over the device's limit), ``bad_count``, ``bad_index``, ``bad_length``
    (header fields that do not add up), ``bad_chunk`` (a chunk's sha256 differs), ``mismatch`` (a header
    disagrees with the transfer's first one), ``tampered`` (the reassembled file's sha256 is not the
    transfer id), ``changed`` (the sender's file changed while being sent), ``io_error`` (cannot write,
    e.g. disk full).
    """

    def __init__(self, message: str, hint: str | None = None, reason: str = "malformed") -> None:
        super().__init__(message, hint)
        self.reason = reason

    def to_dict(self) -> dict[str, str | None]:
        return {**super().to_dict(), "reason": self.reason}


class PushError(EdgekitError):
    """A bundle could not be delivered to a target (ssh failed, broker unreachable or refusing, disk full)."""


class ModelStoreError(EdgekitError):
    """The device's model store (``<state>/models``) is unreadable, corrupt, or busy with an activation."""


class ActivationError(EdgekitError):
    """A bundle failed its on-device smoke test; the old model goes on serving.

    ``reason`` is the ``rolled_back`` event's code: load_failed, golden_mismatch or latency_budget.
    """

    def __init__(self, message: str, hint: str | None = None, reason: str = "load_failed") -> None:
        super().__init__(message, hint)
        self.reason = reason

    def to_dict(self) -> dict[str, str | None]:
        return {**super().to_dict(), "reason": self.reason}
