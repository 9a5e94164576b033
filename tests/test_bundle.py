"""Bundles end to end with real keys and real tar files: build -> inspect/verify/unpack, and every refusal.

Malicious bundles are crafted with tarfile directly. Each refusal is checked for its reason code, for a
message naming the bundle (and the member), and for leaving nothing behind: no destination folder, no
temporary folder, nothing outside the target (the whole tmp_path tree is compared before and after).
"""

from __future__ import annotations

import io
import json
import random
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.keys import init_keys
from converters.package import build_bundle, golden_npz
from edge_agent.bundle import (
    DEFAULT_MAX_MEMBER_BYTES,
    MAX_MANIFEST_BYTES,
    UnpackedBundle,
    inspect_bundle,
    load_golden,
    unpack_bundle,
    verify_bundle,
)
from edge_agent.errors import BundleError
from edge_agent.signing import fingerprint, load_private_key, load_public_key, sign

MODEL = bytes(range(256)) * 40  # 10 KiB: spans several tar blocks
GOLDEN_IN = np.arange(8, dtype=np.float32).reshape(1, 8) / 7
GOLDEN_OUT = np.array([[0.25, 0.75]], dtype=np.float32)

Parts = list[tuple[str, bytes]]


def manifest_fields() -> dict:
    return {
        "name": "digits-mlp",
        "version": "1.2.0",
        "profile": "x86-64",
        "format": "onnx",
        "engine": "onnxruntime",
        "model": "model.onnx",
        "labels": "labels.txt",
        "report": "report.json",
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "atol": 0.01},
        "inputs": [{"name": "x", "shape": [1, 8], "dtype": "float32"}],
        "outputs": [{"name": "probs", "shape": [1, 2], "dtype": "float32"}],
        "runtime": {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "threads": 4},
        "tools": {"edgekit": "0.1.0", "onnxruntime": "1.20.0"},
        "preprocessing": None,
        "quantization": {"mode": "int8", "per_channel": True},
        "validation": {"agreement": 0.99, "size_ratio": 0.27},
    }


def bundle_members() -> dict[str, bytes]:
    return {
        "model.onnx": MODEL,
        "labels.txt": b"zero\none\n",
        "report.json": b'{"agreement": 0.99}\n',
        "golden/inputs.npz": golden_npz({"x": GOLDEN_IN}),
        "golden/outputs.npz": golden_npz({"probs": GOLDEN_OUT}),
    }


@pytest.fixture
def good(tmp_path: Path, keypair: tuple[Path, Path]) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return build_bundle(folder / "good.edgebundle", manifest_fields(), bundle_members(), keypair[0])


def parts(bundle: Path) -> Parts:
    with tarfile.open(bundle) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def write_tar(path: Path, entries: list, fmt: int = tarfile.USTAR_FORMAT) -> Path:
    """Write a tar from (TarInfo, bytes | None) pairs or (name, bytes) pairs, exactly in that order."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for a, b in entries:
            info, data = (a, b) if isinstance(a, tarfile.TarInfo) else reg(a, b)
            tf.addfile(info, None if data is None else io.BytesIO(data))
    return path


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused(bundle: Path, pub: Path, reason: str, tmp_path: Path, member: str | None = None,
                   max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> BundleError:
    """verify and unpack both refuse with ``reason``; unpack leaves nothing anywhere under tmp_path."""
    with pytest.raises(BundleError) as verified:
        verify_bundle(bundle, pub, max_member_bytes=max_member_bytes)
    err = verified.value
    assert err.reason == reason, str(err)
    assert str(bundle) in err.message
    assert err.hint
    if member is not None:
        assert repr(member) in err.message
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    with pytest.raises(BundleError) as unpacked:
        unpack_bundle(bundle, out / "slot", pub, max_member_bytes=max_member_bytes)
    assert unpacked.value.reason == reason, str(unpacked.value)
    assert not (out / "slot").exists()
    assert snapshot(tmp_path) == before
    assert not (out / "x").exists() and not (tmp_path / "x").exists()
    return err


# --------------------------------------------------------------------------------------------------
# the good path


def test_roundtrip_build_verify_unpack(good: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    pub = load_public_key(keypair[1])
    verified = verify_bundle(good, keypair[1])
    assert verified.signer == fingerprint(pub)
    assert verified.manifest.name == "digits-mlp" and verified.manifest.version == "1.2.0"
    assert verify_bundle(good, pub).manifest == verified.manifest  # a key object works as well as a path

    out = tmp_path / "out"
    out.mkdir()
    unpacked = unpack_bundle(good, out / "slot", keypair[1])
    assert unpacked.root == out / "slot"
    assert unpacked.signer == verified.signer
    assert unpacked.model_path == out / "slot" / "model.onnx"
    assert unpacked.model_path.read_bytes() == MODEL
    for name, data in bundle_members().items():
        assert unpacked.member(name).read_bytes() == data
        assert stat.S_IMODE(unpacked.member(name).stat().st_mode) == 0o644
    assert snapshot(out) == sorted([
        "slot", "slot/golden", "slot/golden/inputs.npz", "slot/golden/outputs.npz", "slot/labels.txt",
        "slot/manifest.json", "slot/manifest.sig", "slot/model.onnx", "slot/report.json",
    ])
    assert stat.S_IMODE((out / "slot").stat().st_mode) == 0o755
    # the unpacked manifest.json / manifest.sig still verify: a slot can be re-checked later
    original = dict(parts(good))
    assert unpacked.member("manifest.json").read_bytes() == original["manifest.json"]
    assert unpacked.member("manifest.sig").read_bytes() == original["manifest.sig"]

    golden = load_golden(unpacked)
    assert golden is not None
    inputs, outputs = golden
    assert len(inputs) == 1 and len(outputs) == 1
    np.testing.assert_array_equal(inputs[0], GOLDEN_IN)
    np.testing.assert_array_equal(outputs[0], GOLDEN_OUT)
    assert inputs[0].dtype == np.float32


def test_tar_layout_and_manifest(good: Path) -> None:
    with tarfile.open(good) as tf:
        members = tf.getmembers()
        manifest_bytes = tf.extractfile("manifest.json").read()  # type: ignore[union-attr]
    names = [m.name for m in members]
    assert names == ["manifest.json", "manifest.sig", "golden/inputs.npz", "golden/outputs.npz",
                     "labels.txt", "model.onnx", "report.json"]
    data = json.loads(manifest_bytes)
    assert manifest_bytes.decode() == json.dumps(data, sort_keys=True, indent=2) + "\n"
    assert data["schema"] == 1
    assert len(data["created"]) == len("2026-11-21T18:00:00Z") and data["created"].endswith("Z")
    assert set(data["files"]) == set(bundle_members())
    assert data["files"]["model.onnx"]["size"] == len(MODEL)
    created = members[0].mtime
    for m in members:
        assert (m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime) == (0o644, 0, 0, "", "", created)
        assert m.type == tarfile.REGTYPE and not m.pax_headers


def test_inspect_without_a_key(good: Path) -> None:
    info = inspect_bundle(good)
    assert info["signed"] is True and info["hashes_ok"] is True
    assert info["manifest"]["name"] == "digits-mlp"
    assert [m["name"] for m in info["members"]][:2] == ["manifest.json", "manifest.sig"]
    assert {"name": "model.onnx", "size": len(MODEL)} in info["members"]


def test_inspect_reports_unsigned_and_bad_hashes(good: Path, tmp_path: Path) -> None:
    p = parts(good)
    unsigned = write_tar(tmp_path / "unsigned.edgebundle", [x for x in p if x[0] != "manifest.sig"])
    assert inspect_bundle(unsigned)["signed"] is False
    assert inspect_bundle(unsigned)["hashes_ok"] is True
    flipped = [(n, bytes([d[0] ^ 1]) + d[1:] if n == "model.onnx" else d) for n, d in p]
    assert inspect_bundle(write_tar(tmp_path / "flip.edgebundle", flipped))["hashes_ok"] is False
    longer = [(n, d + b"!" if n == "labels.txt" else d) for n, d in p]
    assert inspect_bundle(write_tar(tmp_path / "long.edgebundle", longer))["hashes_ok"] is False
    with pytest.raises(BundleError) as e:
        inspect_bundle(write_tar(tmp_path / "evil.edgebundle", [*p, ("../x", b"x")]))
    assert e.value.reason == "unsafe_path"


def test_inspect_refuses_a_signature_out_of_place(good: Path, tmp_path: Path) -> None:
    p = parts(good)
    with pytest.raises(BundleError) as e:
        inspect_bundle(write_tar(tmp_path / "late.edgebundle", [p[0], *p[2:], p[1]]))
    assert e.value.reason == "malformed" and "'manifest.sig'" in e.value.message


def test_cap_is_inclusive(good: Path, keypair: tuple[Path, Path]) -> None:
    verify_bundle(good, keypair[1], max_member_bytes=len(MODEL))
    with pytest.raises(BundleError) as e:
        verify_bundle(good, keypair[1], max_member_bytes=len(MODEL) - 1)
    assert e.value.reason == "too_large" and "'model.onnx'" in e.value.message


def test_bundle_from_files_on_disk(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    members: dict[str, Path | bytes] = {}
    for name, data in bundle_members().items():
        p = src / name.replace("/", "_")
        p.write_bytes(data)
        members[name] = p
    priv = load_private_key(keypair[0])  # a key object works as well as a path
    b = build_bundle(tmp_path / "disk.edgebundle", manifest_fields(), members, priv)
    unpacked = unpack_bundle(b, tmp_path / "slot", keypair[1])
    assert unpacked.model_path.read_bytes() == MODEL
    assert stat.S_IMODE(b.stat().st_mode) == 0o644


def test_bundle_without_golden(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    fields = manifest_fields()
    for key in ("golden", "labels", "report"):
        del fields[key]
    b = build_bundle(tmp_path / "min.edgebundle", fields, {"model.onnx": MODEL}, keypair[0])
    unpacked = unpack_bundle(b, tmp_path / "slot", keypair[1])
    assert load_golden(unpacked) is None
    with pytest.raises(BundleError) as e:
        unpacked.member("labels.txt")
    assert e.value.reason == "missing_member"


def test_golden_with_the_wrong_array_names(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    members = bundle_members()
    members["golden/inputs.npz"] = golden_npz({"not_x": GOLDEN_IN})
    b = build_bundle(tmp_path / "g.edgebundle", manifest_fields(), members, keypair[0])
    unpacked = unpack_bundle(b, tmp_path / "slot", keypair[1])
    with pytest.raises(BundleError) as e:
        load_golden(unpacked)
    assert e.value.reason == "malformed" and "not_x" in e.value.message


def test_golden_npz_is_deterministic_and_plain() -> None:
    assert golden_npz({"x": GOLDEN_IN}) == golden_npz({"x": GOLDEN_IN.copy()})
    with np.load(io.BytesIO(golden_npz({"file": GOLDEN_IN, "a:0": GOLDEN_OUT})), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["file"], GOLDEN_IN)
        np.testing.assert_array_equal(z["a:0"], GOLDEN_OUT)
    with pytest.raises(BundleError):
        golden_npz({"x": np.array([object()], dtype=object)})


def test_dest_that_exists_is_refused_and_untouched(good: Path, keypair: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    dest = tmp_path / "slot"
    dest.mkdir()
    (dest / "keep.txt").write_bytes(b"keep")
    before = snapshot(tmp_path)
    with pytest.raises(BundleError) as e:
        unpack_bundle(good, dest, keypair[1])
    assert e.value.reason == "dest_exists"
    assert snapshot(tmp_path) == before
    assert (dest / "keep.txt").read_bytes() == b"keep"


# --------------------------------------------------------------------------------------------------
# building refuses bad input and leaves nothing


def _no_output(folder: Path, before: list[str]) -> None:
    assert snapshot(folder) == before  # no bundle, no temp file


def test_build_refuses_an_invalid_manifest(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    before = snapshot(tmp_path)
    fields = manifest_fields()
    fields["version"] = "1.2"
    with pytest.raises(BundleError) as e:
        build_bundle(tmp_path / "bad.edgebundle", fields, bundle_members(), keypair[0])
    assert e.value.reason == "malformed" and "version" in e.value.message
    _no_output(tmp_path, before)

    fields = manifest_fields()
    fields["model"] = "other.onnx"  # not among the members
    with pytest.raises(BundleError):
        build_bundle(tmp_path / "bad.edgebundle", fields, bundle_members(), keypair[0])
    _no_output(tmp_path, before)


@pytest.mark.parametrize("field", ["schema", "created", "files"])
def test_build_fills_schema_created_files_itself(tmp_path: Path, keypair: tuple[Path, Path],
                                                 field: str) -> None:
    fields = {**manifest_fields(), field: 1}
    with pytest.raises(BundleError, match=field):
        build_bundle(tmp_path / "b.edgebundle", fields, bundle_members(), keypair[0])
    assert not (tmp_path / "b.edgebundle").exists()


def test_build_refuses_unsafe_names_and_non_json(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(BundleError) as e:
        build_bundle(tmp_path / "b.edgebundle", manifest_fields(), {**bundle_members(), "../x": b"x"}, keypair[0])
    assert e.value.reason == "unsafe_path"
    fields = manifest_fields()
    fields["validation"] = {"agreement": float("nan")}
    with pytest.raises(BundleError, match="NaN"):
        build_bundle(tmp_path / "b.edgebundle", fields, bundle_members(), keypair[0])
    _no_output(tmp_path, before)


# --------------------------------------------------------------------------------------------------
# every refusal, with crafted tars


def _sig_for(manifest_bytes: bytes, priv: Path) -> bytes:
    return sign(load_private_key(priv), manifest_bytes)


def _resigned(p: Parts, priv: Path, edit: Callable[[dict], None]) -> Parts:
    """The same members with an edited manifest, properly signed again with ``priv``."""
    data = json.loads(dict(p)["manifest.json"])
    edit(data)
    mb = json.dumps(data, sort_keys=True, indent=2).encode()
    return [("manifest.json", mb), ("manifest.sig", _sig_for(mb, priv)), *p[2:]]


def _replace(p: Parts, name: str, fn: Callable[[bytes], bytes]) -> Parts:
    return [(n, fn(d) if n == name else d) for n, d in p]


def _with_special(p: Parts, name: str, entry: tuple) -> list:
    return [entry if n == name else (n, d) for n, d in p]


def _abs_name(tmp_path: Path) -> str:
    return str(tmp_path / "x")


CASES: dict[str, tuple[Callable[[Parts, Path, Path], list], str, str | None]] = {
    # name: (craft(parts, tmp_path, private key) -> tar entries, reason, member named in the message)
    "absolute_path": (lambda p, t, k: [*p, (_abs_name(t), b"x")], "unsafe_path", None),
    "dotdot": (lambda p, t, k: [*p, ("../x", b"x")], "unsafe_path", "../x"),
    "dotdot_deep": (lambda p, t, k: [*p, ("golden/../../x", b"x")], "unsafe_path", "golden/../../x"),
    "dotdot_first": (lambda p, t, k: [("../x", b"x"), *p], "unsafe_path", "../x"),
    "backslash": (lambda p, t, k: [*p, ("..\\x", b"x")], "unsafe_path", None),
    "hidden_name": (lambda p, t, k: [*p, (".x", b"x")], "unsafe_path", ".x"),
    "symlink_model": (lambda p, t, k: _with_special(p, "model.onnx", special("model.onnx", tarfile.SYMTYPE,
                                                                             "/etc/passwd")),
                      "link_member", "model.onnx"),
    "symlink_escape": (lambda p, t, k: [*p, special("x", tarfile.SYMTYPE, "../../x")], "link_member", "x"),
    "hardlink": (lambda p, t, k: _with_special(p, "model.onnx", special("model.onnx", tarfile.LNKTYPE,
                                                                        "labels.txt")),
                 "link_member", "model.onnx"),
    "char_device": (lambda p, t, k: [*p, special("x", tarfile.CHRTYPE)], "device_member", "x"),
    "block_device": (lambda p, t, k: [*p, special("x", tarfile.BLKTYPE)], "device_member", "x"),
    "fifo": (lambda p, t, k: [*p, special("x", tarfile.FIFOTYPE)], "device_member", "x"),
    "directory": (lambda p, t, k: [*p[:2], special("golden", tarfile.DIRTYPE), *p[2:]], "extra_member",
                  "golden"),
    "extra_member": (lambda p, t, k: [*p, ("x", b"x")], "extra_member", "x"),
    "duplicate_member": (lambda p, t, k: [*p, ("model.onnx", MODEL)], "extra_member", "model.onnx"),
    "duplicate_manifest": (lambda p, t, k: [*p, p[0]], "extra_member", "manifest.json"),
    "missing_member": (lambda p, t, k: [x for x in p if x[0] != "labels.txt"], "missing_member",
                       "labels.txt"),
    "member_bytes_changed": (lambda p, t, k: _replace(p, "model.onnx", lambda d: d[:-1] + b"\x00"),
                             "tampered", "model.onnx"),
    "member_size_changed": (lambda p, t, k: _replace(p, "labels.txt", lambda d: d + b"two\n"),
                            "tampered", "labels.txt"),
    "golden_swapped": (lambda p, t, k: _replace(p, "golden/outputs.npz",
                                                lambda d: dict(p)["golden/inputs.npz"][: len(d)].ljust(len(d))),
                       "tampered", "golden/outputs.npz"),
    "manifest_modified": (lambda p, t, k: _replace(p, "manifest.json",
                                                   lambda d: d.replace(b'"1.2.0"', b'"9.9.9"')),
                          "bad_signature", "manifest.json"),
    "manifest_hash_edited": (lambda p, t, k: _replace(p, "manifest.json", lambda d: d.replace(
        json.loads(d)["files"]["model.onnx"]["sha256"].encode(), b"0" * 64)), "bad_signature", None),
    "no_signature": (lambda p, t, k: [x for x in p if x[0] != "manifest.sig"], "unsigned", "manifest.sig"),
    "short_signature": (lambda p, t, k: _replace(p, "manifest.sig", lambda d: d[:63]), "unsigned",
                        "manifest.sig"),
    "only_manifest": (lambda p, t, k: p[:1], "unsigned", "manifest.sig"),
    "unknown_schema_signed": (lambda p, t, k: _resigned(p, k, lambda m: m.update(schema=2)), "schema",
                              "manifest.json"),
    "schema_missing_signed": (lambda p, t, k: _resigned(p, k, lambda m: m.pop("schema")), "schema", None),
    "manifest_not_json_signed": (lambda p, t, k: [("manifest.json", b"{nope"),
                                                  ("manifest.sig", _sig_for(b"{nope", k)), *p[2:]],
                                 "malformed", "manifest.json"),
    "manifest_not_utf8_signed": (lambda p, t, k: [("manifest.json", b"\xff\xfe{}"),
                                                  ("manifest.sig", _sig_for(b"\xff\xfe{}", k)), *p[2:]],
                                 "malformed", "manifest.json"),
    "manifest_missing_field_signed": (lambda p, t, k: _resigned(p, k, lambda m: m.pop("inputs")), "malformed",
                                      None),
    "manifest_not_first": (lambda p, t, k: [p[-1], *p[:-1]], "malformed", None),
    "signature_not_second": (lambda p, t, k: [p[0], *p[2:], p[1]], "unsigned", "manifest.sig"),
    "manifest_too_large": (lambda p, t, k: [("manifest.json", b" " * (MAX_MANIFEST_BYTES + 1)), *p[1:]],
                           "too_large", "manifest.json"),
    "signature_too_large": (lambda p, t, k: _replace(p, "manifest.sig", lambda d: d * 2), "unsigned", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal(case: str, good: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    craft, reason, member = CASES[case]
    entries = craft(parts(good), tmp_path, keypair[0])
    bad = write_tar(tmp_path / "in" / f"{case}.edgebundle", entries)
    assert_refused(bad, keypair[1], reason, tmp_path, member=member)


def test_signed_by_another_key(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    other_priv, _ = init_keys(tmp_path / "other")
    other = build_bundle(tmp_path / "other.edgebundle", manifest_fields(), bundle_members(), other_priv)
    err = assert_refused(other, keypair[1], "bad_signature", tmp_path)
    assert fingerprint(load_public_key(keypair[1])) in err.message
    assert "signed by another key" in err.message


def test_member_over_the_cap(good: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    err = assert_refused(good, keypair[1], "too_large", tmp_path, member="model.onnx", max_member_bytes=1024)
    assert "1024" in err.message


def test_extended_pax_header_is_refused(good: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    p = parts(good)
    info, data = reg("model.onnx", MODEL)
    info.pax_headers = {"comment": "x" * 100_000}
    entries = [*[(n, d) for n, d in p if n != "model.onnx"], (info, data)]
    bad = write_tar(tmp_path / "in" / "pax.edgebundle", entries, fmt=tarfile.PAX_FORMAT)
    assert_refused(bad, keypair[1], "malformed", tmp_path)


def test_data_after_the_end_marker(good: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "in" / "trailing.edgebundle"
    bad.write_bytes(good.read_bytes() + b"hidden member?")
    assert_refused(bad, keypair[1], "malformed", tmp_path)


def _cut_points(bundle: Path) -> dict[str, int]:
    with tarfile.open(bundle) as tf:
        m = {i.name: i for i in tf.getmembers()}
    last = m["report.json"]
    last_end = last.offset_data + -(-last.size // 512) * 512
    return {
        "in_first_header": 100,
        "in_manifest_data": m["manifest.json"].offset_data + 10,
        "at_a_header_boundary": m["golden/inputs.npz"].offset,
        "in_a_later_header": m["model.onnx"].offset + 200,
        "in_model_data": m["model.onnx"].offset_data + 5000,
        "before_end_marker": last_end,
        "half_end_marker": last_end + 512,
    }


@pytest.mark.parametrize("cut", ["in_first_header", "in_manifest_data", "at_a_header_boundary",
                                 "in_a_later_header", "in_model_data", "before_end_marker", "half_end_marker"])
def test_truncated(cut: str, good: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    at = _cut_points(good)[cut]
    bad = tmp_path / "in" / f"cut-{cut}.edgebundle"
    bad.write_bytes(good.read_bytes()[:at])
    err = assert_refused(bad, keypair[1], "truncated", tmp_path)
    assert "truncated or not a bundle" in err.message
    with pytest.raises(BundleError) as e:
        inspect_bundle(bad)
    assert e.value.reason == "truncated"


@pytest.mark.parametrize("content", ["empty", "random", "zeros", "text"])
def test_not_a_bundle(content: str, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    data = {"empty": b"", "random": random.Random(7).randbytes(5000), "zeros": bytes(10240),
            "text": b"hello, I am not a tar file\n" * 40}[content]
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / f"{content}.edgebundle"
    bad.write_bytes(data)
    err = assert_refused(bad, keypair[1], "truncated", tmp_path)
    assert "truncated or not a bundle" in err.message


def test_not_found(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope.edgebundle", keypair[1], "not_found", tmp_path)
    with pytest.raises(BundleError) as e:
        inspect_bundle(tmp_path)  # a folder is not a bundle file
    assert e.value.reason == "not_found"


def test_other_key_object_is_refused(good: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError) as e:
        verify_bundle(good, Ed25519PrivateKey.generate().public_key())
    assert e.value.reason == "bad_signature"


def test_unpacked_member_rejects_unlisted_names(good: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    unpacked: UnpackedBundle = unpack_bundle(good, tmp_path / "slot", keypair[1])
    for name in ("../x", "nope.bin"):
        with pytest.raises(BundleError):
            unpacked.member(name)
