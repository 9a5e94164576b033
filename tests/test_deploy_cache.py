"""The deploy cache (converters/deploy_cache.py): the key function exhaustively, then the cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.convert import Overrides
from converters.deploy_cache import TOOLS, DeployCache, cache_key, content_digest, tool_versions
from edge_agent.errors import CalibrationError, InputError, ModelError
from edge_agent.preprocess import Preprocessing
from edge_agent.profiles import Profile, load_profile

VERSIONS = {"edgekit": "0.1.0", "tensorflow": "2.21.0", "onnxruntime": "1.31.1", "onnx": "1.23.2",
            "ai-edge-quantizer": "0.10.0", "ai-edge-litert": "2.3.0", "numpy": "2.4.6"}
SAVED_MODEL = {"saved_model.pb": b"graph", "fingerprint.pb": b"fp", "variables/variables.index": b"index",
               "variables/variables.data-00000-of-00001": b"weights"}
RPI4 = load_profile("rpi4")
CALIB = {"cat/a.npy": b"cat a", "cat/b.npy": b"cat b", "dog/c.npy": b"dog c"}


def _tree(root: Path, files: dict[str, bytes], order: Callable[[list[str]], list[str]] = sorted) -> Path:
    for rel in order(list(files)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[rel])
    return root


def _options() -> dict[str, Any]:
    return {"name": "digits", "version": "1.0.0", "mode": None, "seed": 0, "allow_float_ops": False,
            "preprocessing": Preprocessing(size=(28, 28), color="gray", resize_mode="letterbox"),
            "overrides": Overrides(), "signer": "SHA256:0123456789abcdef"}


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Any]:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx model bytes")
    return {"model": model, "calib": str(_tree(tmp_path / "calib", CALIB)), "profile": load_profile("rpi4"),
            "options": _options()}


def _key(i: dict[str, Any], versions: dict[str, str] = VERSIONS) -> str:
    return cache_key(i["model"], i["calib"], i["profile"], i["options"], versions=versions)


# ------------------------------------------------------------------------------------------ same inputs


def test_same_inputs_same_key(inputs: dict[str, Any]) -> None:
    key = _key(inputs)
    assert len(key) == 64 and int(key, 16) >= 0
    assert _key(inputs) == key
    assert _key({**inputs, "options": _options(), "profile": load_profile("rpi4")}) == key


def test_file_order_mtime_and_place_do_not_matter(tmp_path: Path, inputs: dict[str, Any]) -> None:
    key = _key(inputs)
    other = tmp_path / "elsewhere"
    other.mkdir()
    model = other / "model.onnx"  # same content and suffix, another folder
    model.write_bytes(inputs["model"].read_bytes())
    calib = _tree(other / "calib-copy", CALIB, order=lambda names: sorted(names, reverse=True))
    for p in calib.rglob("*"):
        os.utime(p, (1_000_000, 1_000_000))
    assert _key({**inputs, "model": model, "calib": str(calib)}) == key


def test_saved_model_folder_order_and_mtime_do_not_matter(tmp_path: Path, inputs: dict[str, Any]) -> None:
    a = _tree(tmp_path / "a" / "saved", SAVED_MODEL)
    b = _tree(tmp_path / "b" / "saved_other_name", SAVED_MODEL, order=lambda n: sorted(n, reverse=True))
    os.utime(b / "saved_model.pb", (5, 5))
    assert _key({**inputs, "model": a}) == _key({**inputs, "model": b})


def test_option_order_and_tuple_vs_list_do_not_matter(inputs: dict[str, Any]) -> None:
    key = _key(inputs)
    reordered = dict(reversed(list(_options().items())))
    assert _key({**inputs, "options": reordered}) == key
    o = {**_options(), "exclude": ("a", "b"), "tags": {"x", "y", "z"}}
    assert _key({**inputs, "options": o}) == _key({**inputs, "options": {**o, "exclude": ["a", "b"],
                                                                          "tags": {"z", "y", "x"}}})


def test_profile_file_path_does_not_matter(inputs: dict[str, Any]) -> None:
    moved = dataclasses.replace(inputs["profile"], source_file="/somewhere/else/rpi4.toml")
    assert _key({**inputs, "profile": moved}) == _key(inputs)


# ------------------------------------------------------------------------------------------ any change


def test_model_changes_change_the_key(tmp_path: Path, inputs: dict[str, Any]) -> None:
    keys = {_key(inputs)}
    data = inputs["model"].read_bytes()
    for i in range(len(data)):  # every single-byte change of the model file
        changed = bytearray(data)
        changed[i] ^= 0x01
        m = tmp_path / f"m{i}" / "model.onnx"
        m.parent.mkdir()
        m.write_bytes(bytes(changed))
        keys.add(_key({**inputs, "model": m}))
    suffix = tmp_path / "model.tflite"
    suffix.write_bytes(data)
    keys.add(_key({**inputs, "model": suffix}))
    assert len(keys) == len(data) + 2


def test_saved_model_changes_change_the_key(tmp_path: Path, inputs: dict[str, Any]) -> None:
    variants: list[dict[str, bytes]] = [SAVED_MODEL]
    for rel in SAVED_MODEL:
        variants.append({**SAVED_MODEL, rel: SAVED_MODEL[rel] + b"!"})  # one file's content
        variants.append({k: v for k, v in SAVED_MODEL.items() if k != rel})  # one file gone
        renamed = {k: v for k, v in SAVED_MODEL.items() if k != rel}
        renamed[rel + ".bak"] = SAVED_MODEL[rel]  # one file renamed
        variants.append(renamed)
    variants.append({**SAVED_MODEL, "assets/vocab.txt": b"v"})  # a file added
    keys = {_key({**inputs, "model": _tree(tmp_path / f"v{i}", v)}) for i, v in enumerate(variants)}
    empty_dir = _tree(tmp_path / "with-empty", SAVED_MODEL)
    (empty_dir / "assets").mkdir()  # an empty sub-folder
    keys.add(_key({**inputs, "model": empty_dir}))
    assert len(keys) == len(variants) + 1


def test_calibration_changes_change_the_key(tmp_path: Path, inputs: dict[str, Any]) -> None:
    npy = tmp_path / "calib.npy"
    npy.write_bytes(b"samples")
    npz = tmp_path / "calib.npz"
    npz.write_bytes(b"samples")
    moved = {"cat/a.npy": b"cat a", "dog/b.npy": b"cat b", "dog/c.npy": b"dog c"}  # a sample changes class
    sources = [
        None,
        inputs["calib"],
        str(npy),
        str(npz),
        str(_tree(tmp_path / "c1", {**CALIB, "cat/a.npy": b"cat A"})),
        str(_tree(tmp_path / "c2", moved)),
        str(_tree(tmp_path / "c3", {**CALIB, "bird/d.npy": b"bird"})),
        str(_tree(tmp_path / "c4", {k: v for k, v in CALIB.items() if k != "dog/c.npy"})),
    ]
    keys = {_key({**inputs, "calib": s}) for s in sources}
    assert len(keys) == len(sources)


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, "x")
    raise AssertionError(f"no change for {value!r}")


def _profile_variants(p: Profile) -> list[tuple[str, Profile]]:
    """The profile with each leaf field changed, one at a time."""
    out = [("schema", dataclasses.replace(p, schema=p.schema + 1))]
    for section in dataclasses.fields(p):
        value = getattr(p, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            changed = dataclasses.replace(value, **{f.name: _changed(getattr(value, f.name))})
            out.append((f"{section.name}.{f.name}", dataclasses.replace(p, **{section.name: changed})))
    return out


@pytest.mark.parametrize("name", ["rpi4", "jetson-orin-nano", "coral-usb"])
def test_every_profile_field_changes_the_key(inputs: dict[str, Any], name: str) -> None:
    p = load_profile(name)
    base = _key({**inputs, "profile": p})
    variants = _profile_variants(p)
    assert len(variants) > 30
    keys = {}
    for where, variant in variants:
        key = _key({**inputs, "profile": variant})
        assert key != base, where
        keys[key] = where
    assert len(keys) == len(variants)
    assert _key({**inputs, "profile": load_profile("rpi5")}) != _key({**inputs, "profile": load_profile("rpi4")})


def test_every_option_changes_the_key(tmp_path: Path, inputs: dict[str, Any]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\n")
    options = {**_options(), "labels": labels}
    base = _key({**inputs, "options": options})
    variants: list[dict[str, Any]] = []
    for k, v in options.items():
        if k == "mode":
            variants += [{**options, k: m} for m in ("int8", "dynamic", "fp16", "none")]
        elif k == "preprocessing":
            for f in dataclasses.fields(v):
                if f.name in ("size", "mean", "std"):
                    new = tuple(x + 1 for x in getattr(v, f.name))
                elif f.name in ("color", "layout", "resize_mode"):
                    new = {"color": "rgb", "layout": "NHWC", "resize_mode": "crop"}[f.name]
                else:
                    new = _changed(getattr(v, f.name))
                variants.append({**options, k: dataclasses.replace(v, **{f.name: new})})
            variants.append({**options, k: None})
        elif k == "overrides":
            variants += [{**options, k: Overrides(per_channel=False)}, {**options, k: Overrides(ladder=False)},
                         {**options, k: Overrides(exclude_nodes=("n1",))}]
        elif k == "labels":
            other = tmp_path / "labels2.txt"
            other.write_text("zero\nONE\n")  # same kind of file, other content
            variants.append({**options, k: other})
        else:
            variants.append({**options, k: _changed(v)})
        variants.append({kk: vv for kk, vv in options.items() if kk != k})  # the option left out
    variants.append({**options, "extra": 1})
    keys = {_key({**inputs, "options": o}) for o in variants}
    assert base not in keys
    assert len(keys) == len(variants)


def test_a_path_option_stands_for_its_content(tmp_path: Path, inputs: dict[str, Any]) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("cat\ndog\n")
    b.write_text("cat\ndog\n")
    assert _key({**inputs, "options": {"labels": a}}) == _key({**inputs, "options": {"labels": b}})
    assert _key({**inputs, "options": {"labels": a}}) != _key({**inputs, "options": {"labels": str(a)}})


def test_every_tool_version_changes_the_key(inputs: dict[str, Any]) -> None:
    base = _key(inputs)
    keys = set()
    for tool in VERSIONS:
        for v in (VERSIONS[tool] + ".post1", "absent"):
            keys.add(_key(inputs, versions={**VERSIONS, tool: v}))
    assert base not in keys and len(keys) == 2 * len(VERSIONS)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10), max_size=6))
def test_options_key_is_independent_of_insertion_order(options: dict[str, Any]) -> None:
    here = Path(__file__)
    p = RPI4
    forward = cache_key(here, None, p, options, versions=VERSIONS)
    backward = cache_key(here, None, p, dict(reversed(list(options.items()))), versions=VERSIONS)
    assert forward == backward
    changed = cache_key(here, None, p, {**options, "\x00new": 0}, versions=VERSIONS)
    assert changed != forward


# ------------------------------------------------------------------------------------------ refusals


def test_missing_sources_are_errors(tmp_path: Path, inputs: dict[str, Any]) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        _key({**inputs, "model": tmp_path / "nope.onnx"})
    with pytest.raises(CalibrationError, match="does not exist"):
        _key({**inputs, "calib": str(tmp_path / "nope")})
    with pytest.raises(InputError, match="does not exist"):
        _key({**inputs, "options": {"labels": tmp_path / "nope.txt"}})


@pytest.mark.parametrize("value", [object(), float("nan"), float("inf"), {1: "a"}, b"bytes"])
def test_options_without_a_canonical_form_are_errors(inputs: dict[str, Any], value: Any) -> None:
    with pytest.raises(InputError, match="option"):
        _key({**inputs, "options": {"x": value}})


def test_special_files_are_refused(tmp_path: Path, inputs: dict[str, Any]) -> None:
    d = _tree(tmp_path / "calib-fifo", CALIB)
    os.mkfifo(d / "pipe")
    with pytest.raises(CalibrationError, match="not a regular file"):
        _key({**inputs, "calib": str(d)})


def test_symlink_loops_end(tmp_path: Path, inputs: dict[str, Any]) -> None:
    d = _tree(tmp_path / "calib-loop", CALIB)
    (d / "cat" / "loop").symlink_to(d)
    digest = content_digest(d)
    assert ["cat/loop", "folder"] in digest["folder"]
    assert _key({**inputs, "calib": str(d)})


def test_tool_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = tool_versions()
    assert set(versions) == set(TOOLS) and versions["edgekit"] != "absent"
    assert set(versions) >= {"edgekit", "tensorflow", "onnxruntime", "onnx", "ai-edge-quantizer"}
    monkeypatch.setitem(TOOLS, "not-a-tool", ("edgekit-no-such-distribution",))
    assert tool_versions()["not-a-tool"] == "absent"


# ------------------------------------------------------------------------------------------ the cache


KEY_A, KEY_B, KEY_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "out" / "digits-1.0.0-rpi4.edgebundle"
    b.parent.mkdir()
    b.write_bytes(os.urandom(300_000))
    return b


def test_put_then_get(tmp_path: Path, bundle: Path) -> None:
    cache = DeployCache(tmp_path / "cache")
    assert cache.get(KEY_A) is None
    cached = cache.put(KEY_A, bundle)
    assert cached.name == bundle.name and cached.read_bytes() == bundle.read_bytes()
    assert cache.get(KEY_A) == cached
    record = json.loads((cached.parent / "record.json").read_text())
    assert record["key"] == KEY_A and record["size"] == 300_000 and record["bundle"] == bundle.name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [KEY_A]  # no temp folder left
    bundle.unlink()
    assert cache.get(KEY_A) == cached  # a copy, not a link


def test_put_replaces_an_entry(tmp_path: Path, bundle: Path) -> None:
    cache = DeployCache(tmp_path / "cache")
    cache.put(KEY_A, bundle)
    newer = bundle.with_name("digits-1.0.1-rpi4.edgebundle")
    newer.write_bytes(b"newer")
    cached = cache.put(KEY_A, newer)
    assert cache.get(KEY_A) == cached and cached.read_bytes() == b"newer"
    assert sorted(p.name for p in cached.parent.iterdir()) == ["digits-1.0.1-rpi4.edgebundle", "record.json"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [KEY_A]


@pytest.mark.parametrize("damage", ["tamper", "delete_bundle", "delete_record", "bad_record", "wrong_key",
                                    "path_in_record"])
def test_damaged_entries_are_misses(tmp_path: Path, bundle: Path, caplog: pytest.LogCaptureFixture,
                                    damage: str) -> None:
    cache = DeployCache(tmp_path / "cache")
    cached = cache.put(KEY_A, bundle)
    record = cached.parent / "record.json"
    if damage == "tamper":
        data = bytearray(cached.read_bytes())
        data[1000] ^= 1
        cached.write_bytes(bytes(data))
    elif damage == "delete_bundle":
        cached.unlink()
    elif damage == "delete_record":
        record.unlink()
    elif damage == "bad_record":
        record.write_text("{broken")
    elif damage == "wrong_key":
        record.write_text(json.dumps({**json.loads(record.read_text()), "key": KEY_B}))
    else:
        record.write_text(json.dumps({**json.loads(record.read_text()), "bundle": "../../etc/passwd"}))
    with caplog.at_level(logging.WARNING, logger="converters.deploy_cache"):
        assert cache.get(KEY_A) is None
    if damage != "delete_record":
        assert "removed" in caplog.text and not cached.parent.exists()
    cache.put(KEY_A, bundle)
    assert cache.get(KEY_A) is not None


def test_bad_keys_and_bundles_are_refused(tmp_path: Path, bundle: Path) -> None:
    cache = DeployCache(tmp_path / "cache")
    for key in ("../" + "a" * 61, "A" * 64, "a" * 63, ""):
        with pytest.raises(InputError, match="cache key"):
            cache.get(key)
        with pytest.raises(InputError, match="cache key"):
            cache.put(key, bundle)
    with pytest.raises(InputError, match="not a file"):
        cache.put(KEY_A, tmp_path / "missing.edgebundle")


def test_prune_keeps_the_most_recently_used(tmp_path: Path, bundle: Path) -> None:
    cache = DeployCache(tmp_path / "cache")
    for i, key in enumerate((KEY_A, KEY_B, KEY_C)):
        cache.put(key, bundle)
        t = 1_000_000 + i * 100
        os.utime(tmp_path / "cache" / key / "record.json", (t, t))  # A oldest, C newest
    assert cache.keys() == [KEY_C, KEY_B, KEY_A]
    assert cache.get(KEY_A) is not None  # using A makes it the newest
    assert cache.keys()[0] == KEY_A
    assert cache.prune(keep=2) == [KEY_B]
    assert cache.get(KEY_B) is None and cache.get(KEY_A) and cache.get(KEY_C)
    assert cache.prune(keep=2) == []
    assert sorted(cache.prune(keep=0)) == sorted([KEY_A, KEY_C])
    assert cache.keys() == []
    with pytest.raises(InputError):
        cache.prune(keep=-1)


def test_prune_removes_stale_temp_folders_only(tmp_path: Path, bundle: Path) -> None:
    cache = DeployCache(tmp_path / "cache")
    cache.put(KEY_A, bundle)
    stale = tmp_path / "cache" / ".tmp-aaaaaaaaaaaa-deadbeef"
    fresh = tmp_path / "cache" / ".tmp-bbbbbbbbbbbb-deadbeef"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert cache.prune() == []
    assert not stale.exists() and fresh.exists() and cache.get(KEY_A)


def test_empty_or_missing_cache(tmp_path: Path) -> None:
    cache = DeployCache(tmp_path / "never-created")
    assert cache.keys() == [] and cache.prune() == [] and cache.get(KEY_A) is None
    assert not (tmp_path / "never-created").exists()
    assert DeployCache().root == Path.home() / ".cache" / "edgekit" / "deploy"


def test_key_and_cache_together(tmp_path: Path, inputs: dict[str, Any], bundle: Path) -> None:
    cache = DeployCache(tmp_path / "cache")
    key = _key(inputs)
    assert cache.get(key) is None
    cache.put(key, bundle)
    shutil.copy2(inputs["model"], tmp_path / "copy.onnx")
    assert cache.get(_key({**inputs, "model": tmp_path / "copy.onnx"})) is not None
    (tmp_path / "copy.onnx").write_bytes(b"retrained")
    assert cache.get(_key({**inputs, "model": tmp_path / "copy.onnx"})) is None
