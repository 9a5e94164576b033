"""`edgekit convert` for Edge TPU profiles: the edgetpu step with a fake ``edgetpu_compiler`` (the real one is
x86-64 Debian only and not installed here), the CPU-only bundle without it, ``--require-edgetpu``, and the agent
running the bundle's ``cpu_model`` when libedgetpu cannot load.

The fake compiler is the one of tests/test_edgetpu.py: a Python script that parses the documented flags,
writes ``<stem>_edgetpu.tflite`` (a copy of the input with ``edgetpu-custom-op`` appended) and prints a
documented compiler output (tests/data/edgetpu/mapped_v16.txt).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from converters.cli import main
from converters.convert import ConvertResult, convert
from edge_agent.backends import create_backend
from edge_agent.bundle import load_golden, unpack_bundle
from edge_agent.errors import InputError
from edge_agent.profiles import load_profile
from tests.test_backend_tflite import edgetpu_present
from tests.test_edgetpu import fake_compiler, load

RUNS = 10


@pytest.fixture(scope="module")
def keras_cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Keras CNN (8x8x1 -> 3 classes) and 60 calibration samples."""
    import keras

    d = tmp_path_factory.mktemp("tpu_model")
    keras.utils.set_random_seed(1)
    inp = keras.Input(shape=(8, 8, 1), batch_size=1, name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    keras.Model(inp, out).save(d / "cnn.keras")
    np.save(d / "cnn.npy", np.random.default_rng(0).random((60, 8, 8, 1), dtype=np.float32))
    return d / "cnn.keras", d / "cnn.npy"


@pytest.fixture
def no_compiler_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _members(bundle: Path) -> list[str]:
    with tarfile.open(bundle) as tar:
        return tar.getnames()


@pytest.fixture(scope="module")
def compiled(keras_cnn: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
             keypair: tuple[Path, Path]) -> tuple[ConvertResult, list[str]]:
    d = tmp_path_factory.mktemp("tpu_compiled")
    compiler, _ = fake_compiler(d, stdout=load("mapped_v16.txt"))
    steps: list[str] = []
    result = convert(keras_cnn[0], load_profile("coral-usb"), str(keras_cnn[1]), d / "out", keypair[0],
                     edgetpu_compiler=compiler, progress=steps.append, latency_runs=RUNS)
    return result, steps


def test_compiled_bundle_ships_both_models_and_the_compiler_figures(compiled: tuple[ConvertResult, list[str]],
                                                                    keypair: tuple[Path, Path]) -> None:
    result, steps = compiled
    assert steps == ["inspect", "calibration", "quantize", "validate", "golden", "edgetpu", "package"]
    m = result.manifest
    assert m.model == "model_edgetpu.tflite" and m.cpu_model == "model.tflite"
    assert {"model_edgetpu.tflite", "model.tflite"} <= set(_members(result.bundle))
    assert m.runtime["delegates"] == ["edgetpu"]  # the profile's, unchanged
    assert m.validation["edgetpu"] == {"compiled": True, "mapped_ops": 33, "cpu_ops": 0, "first_unmapped_op": None,
                                       "on_chip_bytes": round(1.18 * (1 << 20))}
    tpu = result.report["edgetpu"]
    assert tpu["status"] == "compiled" and tpu["compiler"].endswith("edgetpu_compiler")
    assert tpu["compiler_version"] == "16.0.384591198" and tpu["mapped_ops"] == 33 and tpu["total_ops"] == 33
    assert tpu["output_models"] == ["model_edgetpu.tflite"]
    notes = result.report["notes"]
    assert any(n.startswith("edgetpu_compiler 16.0.384591198: 33 of 33 ops run on the Edge TPU") for n in notes)
    assert any("manifest cpu_model" in n for n in notes)
    # the compiled model is the fake compiler's copy of the uncompiled one (+ the custom op marker)
    unpacked = unpack_bundle(result.bundle, result.bundle.parent / "unpacked", keypair[1])
    compiled_bytes = (unpacked.root / "model_edgetpu.tflite").read_bytes()
    assert compiled_bytes == (unpacked.root / "model.tflite").read_bytes() + b"edgetpu-custom-op"


def test_the_report_in_the_bundle_has_the_edgetpu_section(compiled: tuple[ConvertResult, list[str]]) -> None:
    result, _ = compiled
    with tarfile.open(result.bundle) as tar:
        member = tar.extractfile("report.json")
        assert member is not None
        report = json.loads(member.read())
    assert report["edgetpu"]["status"] == "compiled" and report["edgetpu"]["ops"][0]["op"] == "QUANTIZE"


def test_bundle_inspect_says_compiled(compiled: tuple[ConvertResult, list[str]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "inspect", str(compiled[0].bundle)]) == 0
    out = capsys.readouterr().out
    assert "edge tpu: compiled: 33 ops on the Edge TPU, 0 on the CPU, 1.18 MiB of parameters on chip" in out
    assert "cpu model model.tflite" in out


def test_agent_runs_the_cpu_model_when_libedgetpu_cannot_load(compiled: tuple[ConvertResult, list[str]],
                                                              keypair: tuple[Path, Path], tmp_path: Path) -> None:
    if edgetpu_present():
        pytest.skip("libedgetpu.so.1 is installed on this machine")
    unpacked = unpack_bundle(compiled[0].bundle, tmp_path / "slot", keypair[1])
    backend = create_backend(unpacked.manifest, unpacked.model_path, threads=1)
    try:
        info = backend.info()
        assert info["degraded"] is True and info["providers_requested"] == ["edgetpu"]
        reason = info["degraded_reason"]
        assert "libedgetpu.so.1" in reason
        assert "CPU model model.tflite" in reason and "in place of model_edgetpu.tflite" in reason
        assert info["delegate"] == "xnnpack"
        golden = load_golden(unpacked)
        assert golden is not None and unpacked.manifest.golden is not None
        golden_in, golden_out = golden
        for k in range(len(golden_in[0])):  # the CPU model reproduces the host's golden outputs
            out = backend.run([golden_in[0][k]])
            np.testing.assert_allclose(out[0].astype(np.int32), golden_out[0][k].astype(np.int32),
                                       atol=unpacked.manifest.golden["atol"])
    finally:
        backend.close()


def test_without_cpu_model_the_compiled_model_is_what_runs(compiled: tuple[ConvertResult, list[str]],
                                                           keypair: tuple[Path, Path], tmp_path: Path) -> None:
    """An older bundle (no cpu_model) keeps the old behaviour: the manifest's model runs on the CPU."""
    import dataclasses

    if edgetpu_present():
        pytest.skip("libedgetpu.so.1 is installed on this machine")
    unpacked = unpack_bundle(compiled[0].bundle, tmp_path / "slot", keypair[1])
    manifest = dataclasses.replace(unpacked.manifest, cpu_model=None)
    backend = create_backend(manifest, unpacked.model_path, threads=1)
    try:
        reason = backend.info()["degraded_reason"]
        assert "libedgetpu.so.1" in reason and "in place of" not in reason
    finally:
        backend.close()


def test_without_a_compiler_the_bundle_is_cpu_only(keras_cnn: tuple[Path, Path], tmp_path: Path,
                                                   keypair: tuple[Path, Path], no_compiler_on_path: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    result = convert(keras_cnn[0], load_profile("coral-usb"), str(keras_cnn[1]), tmp_path / "out", keypair[0],
                     latency_runs=RUNS)
    m = result.manifest
    assert m.model == "model.tflite" and m.cpu_model is None
    assert "model_edgetpu.tflite" not in _members(result.bundle)
    assert m.runtime["delegates"] == ["xnnpack"]  # no libedgetpu load for a model the Edge TPU cannot run
    assert m.validation["edgetpu"] == {"compiled": False}
    tpu = result.report["edgetpu"]
    assert tpu["status"] == "cpu_only" and "edgetpu_compiler" in tpu["install"]
    assert any("CPU-only" in n and "edgetpu_compiler" in n for n in result.report["notes"])
    assert main(["bundle", "inspect", str(result.bundle)]) == 0
    assert "edge tpu: CPU-only" in capsys.readouterr().out


def test_require_edgetpu_without_a_compiler_is_exit_2_and_no_bundle(keras_cnn: tuple[Path, Path], tmp_path: Path,
                                                                    keypair: tuple[Path, Path],
                                                                    no_compiler_on_path: None,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert", str(keras_cnn[0]), "--profile", "coral-usb", "--calib", str(keras_cnn[1]), "--out",
                 str(tmp_path / "out"), "--key", str(keypair[0]), "--require-edgetpu", "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert json.loads(out)["error"] == "InputError"
    assert "edgetpu_compiler" in err and "--require-edgetpu" in err
    assert not list((tmp_path / "out").glob("*"))


def test_require_edgetpu_refuses_a_mode_the_edge_tpu_cannot_run(keras_cnn: tuple[Path, Path], tmp_path: Path,
                                                                keypair: tuple[Path, Path]) -> None:
    with pytest.raises(InputError, match="only full-integer int8"):
        convert(keras_cnn[0], load_profile("coral-usb"), str(keras_cnn[1]), tmp_path, keypair[0], mode="fp16",
                require_edgetpu=True)


def test_explicit_compiler_that_does_not_exist_is_exit_2(keras_cnn: tuple[Path, Path], tmp_path: Path,
                                                         keypair: tuple[Path, Path]) -> None:
    with pytest.raises(InputError, match="does not exist"):
        convert(keras_cnn[0], load_profile("coral-usb"), str(keras_cnn[1]), tmp_path, keypair[0],
                edgetpu_compiler=tmp_path / "nope" / "edgetpu_compiler")


def test_manifest_cpu_model_must_be_a_listed_member(compiled: tuple[ConvertResult, list[str]]) -> None:
    from edge_agent.errors import BundleError
    from edge_agent.manifest import parse_manifest

    with tarfile.open(compiled[0].bundle) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        raw = json.loads(member.read())
    assert parse_manifest(raw).cpu_model == "model.tflite"
    assert parse_manifest({k: v for k, v in raw.items() if k != "cpu_model"}).cpu_model is None
    with pytest.raises(BundleError, match=r"manifest\.cpu_model 'other\.tflite' is not listed"):
        parse_manifest({**raw, "cpu_model": "other.tflite"})
    with pytest.raises(BundleError, match="unsafe member name"):
        parse_manifest({**raw, "cpu_model": "../model.tflite"})
