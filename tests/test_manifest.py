"""The manifest contract: parse_manifest accepts a valid manifest and rejects everything else with a
BundleError (and nothing but a BundleError, whatever JSON it is fed)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import BundleError
from edge_agent.manifest import Manifest, check_member_name, parse_manifest

SHA = "ab" * 32


def valid() -> dict[str, Any]:
    return {
        "schema": 1,
        "name": "digits-mlp",
        "version": "1.2.0-rc.1+build.5",
        "created": "2026-11-21T18:00:00Z",
        "profile": "rpi4",
        "format": "tflite",
        "engine": "litert",
        "model": "model.tflite",
        "labels": "labels.txt",
        "report": "report.json",
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "atol": 1},
        "files": {name: {"sha256": SHA, "size": 10} for name in (
            "model.tflite", "labels.txt", "report.json", "golden/inputs.npz", "golden/outputs.npz")},
        "inputs": [{"name": "x", "shape": [1, 28, 28, 1], "dtype": "int8", "scale": 0.0039, "zero_point": -128}],
        "outputs": [{"name": "y", "shape": [1, 10], "dtype": "int8", "scale": 0.00390625, "zero_point": -128}],
        "runtime": {"engine": "litert", "delegates": ["xnnpack"], "threads": 4},
        "tools": {"edgekit": "0.1.0", "tensorflow": "2.18.0"},
        "preprocessing": {"size": [28, 28], "color": "gray", "layout": "NHWC"},
        "quantization": {"mode": "int8"},
        "validation": {"agreement": 0.99},
    }


def test_valid_manifest_parses() -> None:
    m = parse_manifest(valid())
    assert isinstance(m, Manifest)
    assert m.model == "model.tflite" and m.files["model.tflite"].size == 10
    assert m.inputs[0].shape == (1, 28, 28, 1) and m.inputs[0].zero_point == -128
    assert m.outputs[0].scale == 0.00390625
    assert parse_manifest(json.loads(json.dumps(m.to_dict()))) == m  # to_dict round-trips


def test_optional_fields_may_be_absent() -> None:
    d = valid()
    for key in ("labels", "report", "golden", "preprocessing", "quantization", "validation"):
        del d[key]
    m = parse_manifest(d)
    assert m.labels is None and m.golden is None and m.quantization == {} and m.validation == {}


@pytest.mark.parametrize("key", ["name", "version", "created", "profile", "format", "engine", "model", "files",
                                 "inputs", "outputs", "runtime", "tools"])
def test_missing_field(key: str) -> None:
    d = valid()
    del d[key]
    with pytest.raises(BundleError) as e:
        parse_manifest(d)
    assert e.value.reason == "malformed"
    assert repr(key) in e.value.message


@pytest.mark.parametrize(("key", "value"), [
    ("name", 3), ("version", 1), ("created", None), ("files", []), ("inputs", {}), ("runtime", "x"),
    ("tools", ["edgekit"]), ("model", True), ("preprocessing", [1]), ("quantization", "int8"),
    ("validation", 0.99), ("golden", "golden.npz"), ("labels", 5),
])
def test_wrong_type(key: str, value: Any) -> None:
    d = valid()
    d[key] = value
    with pytest.raises(BundleError) as e:
        parse_manifest(d)
    assert e.value.reason in ("malformed", "unsafe_path")


@pytest.mark.parametrize("version", ["1.2", "v1.2.0", "1.2.0.4", "01.2.x", "1.2.0\n", " 1.2.0", ""])
def test_bad_semver(version: str) -> None:
    d = valid()
    d["version"] = version
    with pytest.raises(BundleError, match="semantic version"):
        parse_manifest(d)


@pytest.mark.parametrize("schema", [None, 0, 2, "1", 1.0, True])
def test_unknown_schema(schema: Any) -> None:
    d = valid()
    d["schema"] = schema
    with pytest.raises(BundleError) as e:
        parse_manifest(d)
    assert e.value.reason == "schema"


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a\\b", "", "a//b", "a/", ".hidden",
                                  "a/.b", "model.onnx\n", "mödel.onnx", "a b", "C:/x"])
def test_bad_member_names(name: str) -> None:
    with pytest.raises(BundleError) as e:
        check_member_name(name)
    assert e.value.reason == "unsafe_path"
    d = valid()
    d["files"][name] = {"sha256": SHA, "size": 1}
    with pytest.raises(BundleError) as e:
        parse_manifest(d)
    assert e.value.reason == "unsafe_path"


@pytest.mark.parametrize("name", ["model.onnx", "golden/inputs.npz", "a_b-c.1/d", "_x"])
def test_good_member_names(name: str) -> None:
    assert check_member_name(name) == name


@pytest.mark.parametrize("reserved", ["manifest.json", "manifest.sig"])
def test_reserved_names_cannot_be_listed(reserved: str) -> None:
    d = valid()
    d["files"][reserved] = {"sha256": SHA, "size": 1}
    with pytest.raises(BundleError, match="reserved"):
        parse_manifest(d)


@pytest.mark.parametrize(("key", "value"), [("model", "other.tflite"), ("labels", "other.txt"),
                                            ("report", "r.json")])
def test_referenced_members_must_be_listed(key: str, value: str) -> None:
    d = valid()
    d[key] = value
    with pytest.raises(BundleError, match=r"not listed in manifest\.files"):
        parse_manifest(d)


def test_golden_members_must_be_listed() -> None:
    d = valid()
    del d["files"]["golden/outputs.npz"]
    with pytest.raises(BundleError, match=r"golden\.outputs"):
        parse_manifest(d)


def test_a_file_cannot_also_be_a_folder() -> None:
    d = valid()
    d["files"]["golden"] = {"sha256": SHA, "size": 1}
    with pytest.raises(BundleError, match="'golden'"):
        parse_manifest(d)


@pytest.mark.parametrize("entry", [{"sha256": "AB" * 32, "size": 1}, {"sha256": SHA[:-1], "size": 1},
                                   {"sha256": SHA, "size": -1}, {"sha256": SHA, "size": True},
                                   {"sha256": SHA + "\n", "size": 1}, {"size": 1}, "x"])
def test_bad_file_entries(entry: Any) -> None:
    d = valid()
    d["files"]["model.tflite"] = entry
    with pytest.raises(BundleError) as e:
        parse_manifest(d)
    assert e.value.reason == "malformed"


@pytest.mark.parametrize(("fmt", "engine"), [("onnx", "litert"), ("tflite", "onnxruntime"), ("pt", "torch")])
def test_format_engine_pairs(fmt: str, engine: str) -> None:
    d = valid()
    d["format"], d["engine"] = fmt, engine
    with pytest.raises(BundleError, match="not supported"):
        parse_manifest(d)


@pytest.mark.parametrize(("field", "value"), [
    ("shape", [1, -2]), ("shape", [1, "2"]), ("shape", [True]), ("shape", 3), ("dtype", "float64"),
    ("scale", "0.1"), ("scale", True), ("scale", float("inf")), ("scale", float("nan")), ("scale", 10**400),
    ("zero_point", 1.5), ("zero_point", False), ("name", None),
])
def test_bad_tensor_specs(field: str, value: Any) -> None:
    d = valid()
    d["inputs"][0][field] = value
    with pytest.raises(BundleError) as e:
        parse_manifest(d)
    assert e.value.reason == "malformed"
    assert "manifest.inputs[0]" in e.value.message


def test_needs_an_input_and_an_output() -> None:
    d = valid()
    d["outputs"] = []
    with pytest.raises(BundleError, match="at least one input and one output"):
        parse_manifest(d)


# --------------------------------------------------------------------------------------------------
# fuzzing: whatever JSON arrives, the only possible error is a BundleError

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_bundle_error(data: Any) -> None:
    try:
        parse_manifest(data)
    except BundleError as e:
        assert e.reason in ("malformed", "schema", "unsafe_path")
        assert e.message


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json(data: Any) -> None:
    _parse_or_bundle_error(data)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts/lists of a manifest."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(valid())


@st.composite
def mutated_manifests(draw: st.DrawFn) -> dict[str, Any]:
    d = copy.deepcopy(valid())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent: Any = d
        try:
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            _ = parent[last]  # the path may be gone after an earlier mutation
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add_sibling"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif action == "add_sibling" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    return d


@FUZZ
@given(mutated_manifests())
def test_fuzz_mutated_manifest(data: dict[str, Any]) -> None:
    _parse_or_bundle_error(data)


@FUZZ
@given(st.sampled_from(PATHS), json_values)
def test_fuzz_one_field_replaced(path: tuple, value: Any) -> None:
    d = copy.deepcopy(valid())
    parent: Any = d
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    _parse_or_bundle_error(d)
