"""Fuzzing the device's parsers (hypothesis), and "nothing from a bundle is ever executed" (an AST scan).

Every parser that reads bytes or JSON someone else made may only fail with the project's own error:
``parse_manifest`` -> BundleError, ``verify_command`` -> CommandError, ``verify_bundle`` / ``unpack_bundle`` /
``inspect_bundle`` -> BundleError (and nothing is written outside the destination; a failed unpack leaves
nothing behind), ``decode_chunk`` -> TransferError. The crashes fuzzing found are kept as regression tests
at the end of the file.
"""

from __future__ import annotations

import ast
import base64
import copy
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.bundle import inspect_bundle, load_golden, unpack_bundle, verify_bundle
from edge_agent.commands import NonceStore, build_command, verify_command
from edge_agent.errors import BundleError, CommandError, TransferError
from edge_agent.manifest import parse_manifest
from edge_agent.signing import load_private_key, load_public_key, sign
from edge_agent.transfer import decode_chunk, encode_chunk

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
FUZZ_FILES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                              HealthCheck.data_too_large])

# ------------------------------------------------------------------------------------------------ strategies

# JSON as json.loads gives it: NaN/Infinity (Python's json accepts them), lone surrogates (\ud800), and
# integers of any size (a JSON integer has no bound).
HUGE_INTS = st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**308, 2**1023, -(2**1023)])
_SCALARS = (st.none() | st.booleans() | st.integers() | HUGE_INTS | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=20) | st.sampled_from(["", "..", "/", "a/../b", "/etc/passwd", "model.onnx",
                                                      "manifest.json", "1.0.0", "onnx", "onnxruntime", "x" * 300]))


def json_values(scalars: st.SearchStrategy[Any] = _SCALARS) -> st.SearchStrategy[Any]:
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


JSON = json_values()
# integers beyond the float range are left out where a known crash would mask everything else; see the
# xfail reproducers at the end (test_command_integer_beyond_float_range)
IN_FLOAT_RANGE = json_values(st.none() | st.booleans() | st.integers(-(2**1000), 2**1000)
                             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _retype(value: Any) -> list[Any]:
    return [None, True, 0, -1, 1.5, math.nan, "", str(value)[:50], [value], {"v": value}, [], {}]


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any], values: st.SearchStrategy[Any] = JSON) -> Any:
    """``valid`` with 1 to 3 mutations: a field dropped, replaced, retyped, or an unknown one added."""
    doc: Any = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, (dict, list)):
            break
        path = draw(st.sampled_from(list(_paths(doc))))
        node = doc
        for key in path:
            node = node[key]
        op = draw(st.sampled_from(["drop", "replace", "retype", "add"]))
        if op == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=10))] = draw(values)
            continue
        if op == "add" and isinstance(node, list):
            node.append(draw(values))
            continue
        if not path:
            doc = draw(values) if op != "retype" else draw(st.sampled_from(_retype(doc)))
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if op == "drop":
            del parent[path[-1]]
        elif op == "retype":
            parent[path[-1]] = draw(st.sampled_from(_retype(node)))
        else:
            parent[path[-1]] = draw(values)
    return doc


# ------------------------------------------------------------------------------------------------ (a) manifest

SHA = "ab" * 32
VALID_MANIFEST: dict[str, Any] = {
    "schema": 1, "name": "mlp", "version": "1.2.0-rc.1+build.5", "created": "2026-01-01T00:00:00Z",
    "profile": "rpi5", "format": "tflite", "engine": "litert", "model": "model.tflite",
    "files": {"model.tflite": {"sha256": SHA, "size": 10}, "cpu/model.tflite": {"sha256": SHA, "size": 10},
              "labels.txt": {"sha256": SHA, "size": 3}, "golden_in.npz": {"sha256": SHA, "size": 5},
              "golden_out.npz": {"sha256": SHA, "size": 5}, "report.json": {"sha256": SHA, "size": 2}},
    "inputs": [{"name": "x", "shape": [1, 224, 224, 3], "dtype": "int8", "scale": 0.0078, "zero_point": -1}],
    "outputs": [{"name": "y", "shape": [-1, 4], "dtype": "float32"}],
    "runtime": {"engine": "litert", "delegates": ["xnnpack"], "threads": 2, "cpu_fallback": True},
    "tools": {"edgekit": "0.1.0"}, "preprocessing": {"resize": [224, 224], "color": "rgb"},
    "labels": "labels.txt", "report": "report.json", "cpu_model": "cpu/model.tflite",
    "golden": {"inputs": "golden_in.npz", "outputs": "golden_out.npz", "atol": 0.01, "latency_budget_ms": 50},
    "quantization": {"mode": "int8"}, "validation": {"agreement": 0.99},
}


def test_valid_manifest_is_valid() -> None:
    assert parse_manifest(copy.deepcopy(VALID_MANIFEST)).cpu_model == "cpu/model.tflite"


def _parse_manifest_or_bundle_error(data: Any) -> None:
    try:
        parse_manifest(data)
    except BundleError:
        pass


@FUZZ
@given(JSON)
def test_manifest_arbitrary_json(data: Any) -> None:
    _parse_manifest_or_bundle_error(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(VALID_MANIFEST)) | st.text(max_size=8), JSON, max_size=12))
def test_manifest_arbitrary_objects_with_known_keys(data: dict[str, Any]) -> None:
    _parse_manifest_or_bundle_error(data)


@FUZZ
@given(mutated(VALID_MANIFEST))
def test_manifest_mutations(data: Any) -> None:
    _parse_manifest_or_bundle_error(data)


# ------------------------------------------------------------------------------------------------ (b) commands


@dataclass(frozen=True)
class Keys:
    private: Any
    public: Any


@pytest.fixture(scope="module")
def keys(keypair: tuple[Path, Path]) -> Keys:
    return Keys(load_private_key(keypair[0]), load_public_key(keypair[1]))


NOW = 1_795_000_000.0


def _verify_or_command_error(payload: bytes, keys: Keys) -> None:
    with tempfile.TemporaryDirectory() as d:
        try:
            verify_command(payload, keys.public, "pi-017", nonces=NonceStore(Path(d) / "nonces.json"), now=NOW)
        except CommandError:
            pass


@FUZZ
@given(payload=st.binary(max_size=400))
def test_command_arbitrary_bytes(keys: Keys, payload: bytes) -> None:
    _verify_or_command_error(payload, keys)


@FUZZ
@given(envelope=JSON)
def test_command_arbitrary_json(keys: Keys, envelope: Any) -> None:
    try:
        payload = json.dumps(envelope).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return
    _verify_or_command_error(payload, keys)


def _valid_body(keys: Keys) -> dict[str, Any]:
    payload = build_command(keys.private, "pi-017", "bench", {"duration": 5}, now=NOW, nonce="0" * 32)
    return json.loads(json.loads(payload)["command"])


def _signed(keys: Keys, body: Any) -> bytes | None:
    try:
        text = json.dumps(body, separators=(",", ":"))
        signature = base64.b64encode(sign(keys.private, text.encode("utf-8"))).decode("ascii")
    except (ValueError, TypeError, UnicodeEncodeError):
        return None
    return json.dumps({"command": text, "signature": signature}).encode("utf-8")


@FUZZ
@given(data=st.data())
def test_command_mutated_signed_bodies(keys: Keys, data: st.DataObject) -> None:
    """Bodies signed with the pinned key, so every check after the signature is reached."""
    body = data.draw(mutated(_valid_body(keys), IN_FLOAT_RANGE))
    payload = _signed(keys, body)
    if payload is not None:
        _verify_or_command_error(payload, keys)


@st.composite
def signed_bodies(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> dict[str, Any]:
    """Bodies with exactly the right keys, at most two values replaced by anything: every check after the
    signature and the key set is reached (arguments, device, lifetime, clock, nonce)."""
    issued = draw(st.floats(NOW - 600, NOW + 600) | st.floats(NOW - 2 * 86400, NOW + 2 * 86400))
    arg_values = st.floats(-10, 5000) | st.text(max_size=8) | values
    body = {"schema": 1, "device": "pi-017",
            "action": draw(st.sampled_from(["rollback", "activate", "bench", "set", "reload"])),
            "args": draw(st.sampled_from([{}, {"version": "1.2.0"}, {"duration": 5}, {"telemetry_interval": 30}])
                         | st.dictionaries(st.sampled_from(["version", "duration", "telemetry_interval"])
                                           | st.text(max_size=5), arg_values, max_size=2)),
            "nonce": draw(st.text("0123456789abcdef", min_size=32, max_size=32)),
            "issued": issued, "expires": issued + draw(st.floats(1, 3600) | st.floats(-10, 2 * 86400))}
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2, unique=True)):
        body[key] = draw(values)
    return body


@FUZZ
@given(body=signed_bodies(IN_FLOAT_RANGE))
def test_command_signed_bodies_any_values(keys: Keys, body: dict[str, Any]) -> None:
    payload = _signed(keys, body)
    if payload is not None:
        _verify_or_command_error(payload, keys)


@FUZZ
@given(data=st.data())
def test_command_mutated_envelopes(keys: Keys, data: st.DataObject) -> None:
    valid = json.loads(build_command(keys.private, "pi-017", "set", {"telemetry_interval": 30}, now=NOW))
    envelope = data.draw(mutated(valid))
    try:
        payload = json.dumps(envelope).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(payload) - 1), st.integers(1, 255)), max_size=3))
    raw = bytearray(payload)
    for pos, xor in flips:
        raw[pos] ^= xor
    _verify_or_command_error(bytes(raw), keys)


# ------------------------------------------------------------------------------------------------ (d) chunks


def _decode_or_transfer_error(payload: bytes) -> None:
    try:
        decode_chunk(payload)
    except TransferError:
        pass


@FUZZ
@given(st.binary(max_size=600))
def test_chunk_arbitrary_bytes(payload: bytes) -> None:
    _decode_or_transfer_error(payload)


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_chunk_arbitrary_bytes_around_a_newline(head: bytes, data: bytes) -> None:
    _decode_or_transfer_error(head + b"\n" + data)


CHUNK_DATA = bytes(range(256)) * 4
VALID_HEADER = {"schema": 1, "transfer": hashlib.sha256(CHUNK_DATA * 3).hexdigest(), "name": "m.edgebundle",
                "size": len(CHUNK_DATA) * 3, "chunk_size": len(CHUNK_DATA), "index": 1, "count": 3,
                "sha256": hashlib.sha256(CHUNK_DATA).hexdigest()}


def test_valid_chunk_is_valid() -> None:
    assert decode_chunk(encode_chunk(VALID_HEADER, CHUNK_DATA))[0].index == 1


@FUZZ
@given(header=mutated(VALID_HEADER), data=st.sampled_from([CHUNK_DATA, b"", CHUNK_DATA[:-1], CHUNK_DATA + b"\n"]))
def test_chunk_mutated_headers(header: Any, data: bytes) -> None:
    try:
        head = json.dumps(header).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return
    _decode_or_transfer_error(head + b"\n" + data)


# ------------------------------------------------------------------------------------------------ (c) bundles

MODEL_NAME = "model.onnx"


@dataclass(frozen=True)
class Base:
    """A valid signed bundle and its parts."""

    data: bytes
    manifest: bytes
    signature: bytes
    model: bytes
    end: int  # offset of the end-of-archive marker
    keys: Keys
    pubkey_path: Path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path], keys: Keys) -> Base:
    from tests.test_agent_cli import make_bundle

    d = tmp_path_factory.mktemp("fuzz-bundle")
    path = make_bundle(d / "mlp.edgebundle", keypair[0])
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        parts = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]
        end = tf.offset
    assert list(parts) == ["manifest.json", "manifest.sig", MODEL_NAME]
    return Base(data, parts["manifest.json"], parts["manifest.sig"], parts[MODEL_NAME], end, keys, keypair[1])


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check_bundle(data: bytes | Callable[[Path], bytes], base: Base, *, must_fail: bool = False,
                 max_member_bytes: int = 1 << 30) -> None:
    """inspect / verify / unpack in a fresh folder: BundleError or a faithful result; nothing written
    outside the destination, nothing left behind by a failed unpack.

    ``data`` may be a function of the folder (for members that aim at an absolute path inside it).
    """
    with tempfile.TemporaryDirectory(prefix="edgekit-fuzz-") as tmp:
        root = Path(tmp)
        (root / "a" / "b" / "out").mkdir(parents=True)
        bundle, dest = root / "a" / "b" / "in.edgebundle", root / "a" / "b" / "out" / "dest"
        bundle.write_bytes(data(root) if callable(data) else data)
        before = _files(root)
        try:
            inspect_bundle(bundle, max_member_bytes)
        except BundleError:
            pass
        try:
            verify_bundle(bundle, base.keys.public, max_member_bytes)
            verified = True
        except BundleError:
            verified = False
        try:
            unpacked = unpack_bundle(bundle, dest, base.keys.public, max_member_bytes)
        except BundleError:
            assert _files(root) == before, "a failed unpack left something behind"
            assert not verified, "verify_bundle accepted what unpack_bundle refused"
            return
        finally:
            assert not (Path.cwd() / "escape").exists()
        assert not must_fail, "a damaged or hostile bundle was accepted"
        assert verified, "unpack_bundle accepted what verify_bundle refused"
        new = _files(root) - before
        assert all(p.startswith("a/b/out/dest") for p in new), f"written outside the destination: {sorted(new)}"
        assert {p.name for p in dest.iterdir()} == {"manifest.json", "manifest.sig", MODEL_NAME}
        assert (dest / "manifest.json").read_bytes() == base.manifest
        assert (dest / MODEL_NAME).read_bytes() == base.model
        assert unpacked.model_path == dest / MODEL_NAME


def test_valid_bundle_unpacks(base: Base) -> None:
    check_bundle(base.data, base)


@FUZZ_FILES
@given(data=st.binary(max_size=3000))
def test_bundle_arbitrary_bytes(base: Base, data: bytes) -> None:
    check_bundle(data, base, must_fail=True)


@FUZZ_FILES
@given(st.data())
def test_bundle_truncations(base: Base, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(base.data) - 1))
    # cutting into the zero padding after the end-of-archive marker leaves a valid bundle
    check_bundle(base.data[:cut], base, must_fail=cut < base.end + 2 * tarfile.BLOCKSIZE)


@FUZZ_FILES
@given(st.data())
def test_bundle_byte_flips(base: Base, data: st.DataObject) -> None:
    raw = bytearray(base.data)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, base.end + 2 * tarfile.BLOCKSIZE - 1) | st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    check_bundle(bytes(raw), base)


# ---- hand-made tar files with hostile members


def _info(name: str, size: int = 0, type_: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, type_, 0o644, 1_700_000_000
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _member(info: tarfile.TarInfo, data: bytes | None = None, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """One member: its header(s) and its data padded to a block (no data when ``data`` is None)."""
    head = info.tobuf(fmt, "utf-8", "surrogateescape")
    if data is None:
        return head
    pad = -len(data) % tarfile.BLOCKSIZE
    return head + data + b"\0" * pad


def _file(name: str, data: bytes, fmt: int = tarfile.USTAR_FORMAT, **kw: Any) -> bytes:
    return _member(_info(name, len(data), **kw), data, fmt)


END = b"\0" * (2 * tarfile.BLOCKSIZE)


def _signed_manifest(base: Base, files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """A manifest listing ``files`` (with the model's other fields), signed with the pinned key."""
    manifest = json.loads(base.manifest)
    manifest["files"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}
    manifest["model"] = next(iter(files))
    raw = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode("utf-8")
    return raw, sign(base.keys.private, raw)


def hostile(kind: str, base: Base, escape: Path) -> bytes:
    """A bundle whose signature verifies but which carries one hostile member (or header)."""
    head = _file("manifest.json", base.manifest) + _file("manifest.sig", base.signature)
    model = _file(MODEL_NAME, base.model)
    if kind == "absolute":
        return head + model + _file(str(escape), b"pwned") + END
    if kind == "absolute-listed":  # the manifest parser refuses it before any tar header is read
        m, s = _signed_manifest(base, {MODEL_NAME: base.model, str(escape): b"pwned"})
        return _file("manifest.json", m) + _file("manifest.sig", s) + model + _file(str(escape), b"pwned") + END
    if kind in ("dotdot", "nested-dotdot", "backslash", "dot", "empty-part"):
        name = {"dotdot": "../../escape", "nested-dotdot": "x/../../../escape", "backslash": "..\\..\\escape",
                "dot": "./model.onnx", "empty-part": "x//escape"}[kind]
        return head + _file(name, b"pwned") + model + END
    if kind == "symlink":  # the listed model, as a link: the signed manifest lists this very name
        return head + _member(_info(MODEL_NAME, 0, tarfile.SYMTYPE, linkname=str(escape))) + END
    if kind == "symlink-then-through":
        m, s = _signed_manifest(base, {MODEL_NAME: base.model, "d/x": b"pwned"})
        return (_file("manifest.json", m) + _file("manifest.sig", s) + model
                + _member(_info("d", 0, tarfile.SYMTYPE, linkname="../../..")) + _file("d/x", b"pwned") + END)
    if kind == "hardlink":
        return head + _member(_info(MODEL_NAME, 0, tarfile.LNKTYPE, linkname="/etc/passwd")) + END
    if kind in ("chardev", "blockdev", "fifo", "contiguous", "unknown-type", "gnu-sparse", "directory"):
        type_ = {"chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE,
                 "contiguous": tarfile.CONTTYPE, "unknown-type": b"Z", "gnu-sparse": tarfile.GNUTYPE_SPARSE,
                 "directory": tarfile.DIRTYPE}[kind]
        info = _info(MODEL_NAME, 0, type_, devmajor=1, devminor=3)
        return head + _member(info, b"" if type_ in (tarfile.CONTTYPE, b"Z") else None) + END
    if kind == "huge":  # a header claiming 1 TiB, and no data
        return head + _member(_info(MODEL_NAME, 1 << 40), None, tarfile.GNU_FORMAT) + END
    if kind == "huge-manifest":
        return _member(_info("manifest.json", 1 << 33), None, tarfile.GNU_FORMAT) + END
    if kind == "size-mismatch":  # listed size differs (the header says more than the manifest)
        return head + _file(MODEL_NAME, base.model + b"extra") + END
    if kind in ("pax-path", "pax-comment"):
        info = _info(MODEL_NAME, len(base.model))
        info.pax_headers = {"path": str(escape)} if kind == "pax-path" else {"comment": "hello"}
        return head + _member(info, base.model, tarfile.PAX_FORMAT) + END
    if kind == "pax-global":
        return head + tarfile.TarInfo.create_pax_global_header({"path": str(escape)}) + model + END
    if kind == "gnu-longname":
        long = "d/" + "x" * 150
        m, s = _signed_manifest(base, {long: base.model})
        return (_file("manifest.json", m) + _file("manifest.sig", s) + _file(long, base.model, tarfile.GNU_FORMAT)
                + END)
    if kind == "duplicate-model":
        return head + model + _file(MODEL_NAME, b"second copy") + END
    if kind == "duplicate-manifest":
        return head + _file("manifest.json", b"{}") + model + END
    if kind == "duplicate-signature":
        return head + _file("manifest.sig", base.signature) + model + END
    if kind == "unlisted":
        return head + model + _file("extra.bin", b"surprise") + END
    if kind == "manifest-not-first":
        return _file("manifest.sig", base.signature) + _file("manifest.json", base.manifest) + model + END
    if kind == "no-signature":
        return _file("manifest.json", base.manifest) + model + END
    if kind == "inside-manifest":
        return head + _file("manifest.json/x", b"pwned") + model + END
    if kind == "trailing-garbage":
        return head + model + END + b"#!/bin/sh\n"
    if kind == "missing-end":
        return head + model
    if kind == "negative-size":
        info = _info(MODEL_NAME, 0)
        block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
        block[124:136] = b"\xff" * 12  # base-256: -1
        block[148:156] = b" " * 8
        block[148:155] = b"%06o\0" % sum(block)
        return head + bytes(block) + END
    raise AssertionError(kind)


HOSTILE = ["absolute", "absolute-listed", "dotdot", "nested-dotdot", "backslash", "dot", "empty-part", "symlink",
           "symlink-then-through", "hardlink", "chardev", "blockdev", "fifo", "contiguous", "unknown-type",
           "gnu-sparse", "directory", "huge", "huge-manifest", "size-mismatch", "pax-path", "pax-comment",
           "pax-global", "gnu-longname", "duplicate-model", "duplicate-manifest", "duplicate-signature",
           "unlisted", "manifest-not-first", "no-signature", "inside-manifest", "trailing-garbage", "missing-end",
           "negative-size"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_bundle_hostile_members(base: Base, kind: str) -> None:
    check_bundle(lambda root: hostile(kind, base, root / "abs-escape"), base, must_fail=True)


@FUZZ_FILES
@given(kind=st.sampled_from(HOSTILE), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                       max_size=2), cut=st.none() | st.integers(0, 10**6))
def test_bundle_hostile_members_damaged(base: Base, kind: str,
                                        flips: list[tuple[int, int]], cut: int | None) -> None:
    raw = bytearray(hostile(kind, base, Path("/nonexistent/abs-escape")))
    for pos, xor in flips:
        raw[pos % len(raw)] ^= xor
    # cutting off the garbage after the end marker makes a good bundle of it
    check_bundle(bytes(raw if cut is None else raw[:cut % (len(raw) + 1)]), base,
                 must_fail=not (kind == "trailing-garbage" and cut is not None))


def test_bundle_member_cap(base: Base) -> None:
    check_bundle(base.data, base, must_fail=True, max_member_bytes=len(base.model) - 1)


# ---- golden arrays are never unpickled


class _Payload:
    """Unpickling this would create ``marker`` (a stand-in for running code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


def test_golden_object_array_is_refused_and_never_unpickled(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    from converters.package import build_bundle
    from tests.models import tiny_mlp

    marker = tmp_path / "unpickled"
    evil = tmp_path / "in.npz"
    np.savez(evil, x=np.array([_Payload(str(marker))], dtype=object))
    good = tmp_path / "out.npz"
    np.savez(good, logits=np.zeros((1, 4), np.float32))
    manifest = {
        "name": "mlp", "version": "1.0.0", "profile": "x86-64", "format": "onnx", "engine": "onnxruntime",
        "model": MODEL_NAME, "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 4], "dtype": "float32"}],
        "runtime": {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"]}, "tools": {"edgekit": "0"},
        "golden": {"inputs": "golden_inputs.npz", "outputs": "golden_outputs.npz", "atol": 0.001},
    }
    members = {MODEL_NAME: tiny_mlp(tmp_path / "m.onnx"), "golden_inputs.npz": evil, "golden_outputs.npz": good}
    bundle = build_bundle(tmp_path / "evil.edgebundle", manifest, members, keypair[0])
    unpacked = unpack_bundle(bundle, tmp_path / "dest", keypair[1])  # the npz is just bytes to the reader
    with pytest.raises(BundleError, match="cannot be read") as e:
        load_golden(unpacked)
    assert e.value.reason == "malformed" and "allow_pickle" in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ AST scan

FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "runpy",
                     "torch", "code", "codeop"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__", "execfile", "breakpoint"}
FORBIDDEN_ATTRS = {"extractall", "extract", "unsafe_load", "full_load", "spec_from_file_location", "exec_module",
                   "load_module", "SourceFileLoader"}
FORBIDDEN_OS = {"system", "popen", "startfile", "execv", "execve", "execvp", "execl", "spawnv", "spawnl"}
NATIVE_LOADERS = {"CDLL", "PyDLL", "LoadLibrary", "load_delegate", "register_custom_ops_library"}
# where native code is loaded today; a new site must be reviewed (see docs/security.md, "Native libraries")
NATIVE_SITES = {("edge_agent/backends/tflite.py", "_load_delegate"),  # manifest.runtime.delegates
                ("edge_agent/doctor.py", "_litert_delegate"),  # the device's own profile (edge-agent doctor)
                ("edge_agent/inotify.py", "create")}  # the C library itself (inotify), never a bundle's path


def _sources() -> list[Path]:
    files = sorted((ROOT / "edge_agent").rglob("*.py"))
    assert len(files) > 20
    return files


class _Scan(ast.NodeVisitor):
    def __init__(self, rel: str, tree: ast.Module) -> None:
        self.rel = rel
        self.tree = tree
        self.problems: list[str] = []
        self.native: set[tuple[str, str]] = set()
        self.functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    def bad(self, node: ast.AST, what: str) -> None:
        self.problems.append(f"{self.rel}:{getattr(node, 'lineno', '?')}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                self.bad(node, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            self.bad(node, f"from {node.module} import ...")
        for alias in node.names:
            if alias.name in FORBIDDEN_ATTRS | {"import_module"} and node.module != "importlib":
                self.bad(node, f"from {node.module} import {alias.name}")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if isinstance(f, ast.Name) and f.id in FORBIDDEN_BUILTINS:
            self.bad(node, f"call to {f.id}()")
        if isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_ATTRS:
            self.bad(node, f"call to .{f.attr}()")
        if (isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_OS and isinstance(f.value, ast.Name)
                and f.value.id == "os"):
            self.bad(node, f"call to os.{f.attr}()")
        if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name):
            if f.value.id in ("yaml", "pickle", "marshal", "torch", "joblib"):
                self.bad(node, f"call to {f.value.id}.load()")
            if f.value.id in ("np", "numpy") and not any(
                    k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords):
                self.bad(node, "numpy.load without allow_pickle=False")
        for k in node.keywords:
            if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                self.bad(node, "allow_pickle is not the constant False")
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                self.bad(node, "subprocess with shell=True")
        if name == "import_module" and not self._constant_module(node):
            self.bad(node, "import_module of a name that is not a constant or a registry entry")
        if name in NATIVE_LOADERS:
            self.native.add((self.rel, self.functions[-1].name if self.functions else "<module>"))
        self.generic_visit(node)

    def _constant_module(self, call: ast.Call) -> bool:
        """import_module's argument is a literal, REGISTRY[...] of a literal dict, or a parameter that every
        caller in this file passes as a literal."""
        if len(call.args) != 1:
            return False
        arg = call.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return True
        if isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
            for stmt in self.tree.body:
                target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                    stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
                if isinstance(target, ast.Name) and target.id == arg.value.id and isinstance(stmt.value, ast.Dict):
                    return all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in stmt.value.values)
            return False
        if isinstance(arg, ast.Name) and self.functions:
            fn = self.functions[-1]
            params = [a.arg for a in fn.args.args]
            if arg.id not in params:
                return False
            i = params.index(arg.id)
            calls = [c for c in ast.walk(self.tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                     and c.func.id == fn.name]
            return bool(calls) and all(len(c.args) > i and isinstance(c.args[i], ast.Constant) for c in calls)
        return False


def test_nothing_from_a_bundle_is_executed() -> None:
    """No pickle, eval/exec, dynamic imports of bundle-chosen names, extractall or allow_pickle in edge_agent/."""
    problems: list[str] = []
    native: set[tuple[str, str]] = set()
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        scan = _Scan(str(path.relative_to(ROOT)), tree)
        scan.visit(tree)
        problems += scan.problems
        native |= scan.native
    assert problems == []
    # Native code is loaded only for LiteRT delegates. Note: in the backend the library path of an
    # `external:<path>` delegate comes from the bundle's manifest.runtime (docs/security.md, "the one
    # exception today"); the doctor reads the device's own profile.
    assert native == NATIVE_SITES


def test_the_scan_catches_what_it_looks_for() -> None:
    src = ("import pickle\nfrom marshal import loads\nimport numpy as np\nimport importlib, tarfile\n"
           "def f(name, t):\n    eval(name)\n    np.load(name)\n    np.load(name, allow_pickle=True)\n"
           "    importlib.import_module(name)\n    t.extractall('.')\n    exec('1')\n")
    tree = ast.parse(src)
    scan = _Scan("x.py", tree)
    scan.visit(tree)
    found = "\n".join(scan.problems)
    for what in ("import pickle", "from marshal", "eval()", "numpy.load without", "allow_pickle is not",
                 "import_module of a name", ".extractall()", "exec()"):
        assert what in found, what


# ------------------------------------------------------------------------------------------------ crashes found
# Reproducers of the crashes the fuzzing found (fixed): an integer beyond the float range in a command, and a
# deeply nested chunk header.


def test_command_integer_beyond_float_range(keys: Keys) -> None:
    body = _valid_body(keys)
    body["issued"] = 10**400
    payload = _signed(keys, body)
    assert payload is not None
    with tempfile.TemporaryDirectory() as d, pytest.raises(CommandError):
        verify_command(payload, keys.public, "pi-017", nonces=NonceStore(Path(d) / "n.json"), now=NOW)


def test_chunk_deeply_nested_header() -> None:
    with pytest.raises(TransferError):
        decode_chunk(b"[" * 4000 + b"\n")
